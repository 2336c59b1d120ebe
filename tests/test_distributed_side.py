"""Side networks trained outside DDP (discriminator, enhancer) stay identical on every rank (2 gloo ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moas.train.distributed import all_ranks_agree, average_gradients


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        net[1].bias.requires_grad_(False)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x = torch.full((2, 4), float(rank + 1))  # each rank sees different data
        net(x).pow(2).sum().backward()
        local = [p.grad.clone() for p in net.parameters() if p.requires_grad]
        average_gradients(net.parameters())
        opt.step()
        agree_all = all_ranks_agree(True)
        agree_one = all_ranks_agree(rank == 0)
        torch.save(
            {
                "local": local,
                "averaged": [p.grad for p in net.parameters() if p.requires_grad],
                "weights": [p.detach() for p in net.parameters()],
                "agree": torch.tensor([agree_all, agree_one]),
            },
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_average_gradients_and_agreement_over_two_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for g0, g1, a0, a1 in zip(r0["local"], r1["local"], r0["averaged"], r1["averaged"], strict=True):
        assert not torch.allclose(g0, g1)  # the ranks really had different gradients
        assert torch.allclose(a0, (g0 + g1) / 2) and torch.equal(a0, a1)
    for w0, w1 in zip(r0["weights"], r1["weights"], strict=True):
        assert torch.equal(w0, w1)  # after the step the two copies are still identical
    assert r0["agree"].tolist() == [True, False] and r1["agree"].tolist() == [True, False]


def _train_worker(rank: int, port: int, root: str, data: str) -> None:
    import os

    from moas.config import load_config
    from moas.train.distributed import shutdown_distributed
    from moas.train.loop import build_trainer

    from .conftest import TINY_CONFIG

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    over = {
        "data": {"data_dir": data, "cache_dir": f"{root}/cache"},
        "train": {
            "checkpoint_dir": f"{root}/ckpt",
            "run_dir": f"{root}/runs",
            "save_path": f"{root}/model.pt",
            "log_dir": f"{root}/logs",
            "max_steps": 3,
            "epochs": 4,
            "grad_accum_steps": 2,
            "sample_every": 0,
            "save_every": 100,
        },
        "resources": {"cpu_threads": 1},
    }
    trainer = build_trainer(load_config(None, TINY_CONFIG, over, use_env=False), progress=False)
    try:
        trainer.run()
        state = {
            "model": trainer.parts.model.state_dict(),
            "ema": trainer.parts.ema.model.state_dict(),
            "enhancer": trainer.parts.domain.enhancer.state_dict(),
            "step": torch.tensor(trainer.state.global_step),
        }
        torch.save(state, f"{root}/rank{rank}.pt")
        dist.barrier()
    finally:
        shutdown_distributed()


def test_ddp_ranks_end_with_identical_weights(tmp_path, demo_dir):
    """Two gloo ranks train on different shards of each epoch; DDP (generator) and the averaged side
    networks (enhancer) must leave both copies bit-identical after three steps and an epoch boundary."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_worker, args=(port, str(tmp_path), str(demo_dir / "train")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert int(r0["step"]) == int(r1["step"]) == 3
    # The EMA copy's routing statistics (not weights) also count rank 0's validation passes.
    stats = ("call_count", "success_rate", "load_sum", "load_calls")
    for part in ("model", "ema", "enhancer"):
        assert r0[part].keys() == r1[part].keys()
        keys = [k for k in r0[part] if part != "ema" or k.rsplit(".", 1)[-1] not in stats]
        diff = [k for k in keys if not torch.equal(r0[part][k], r1[part][k])]
        assert not diff, f"{part}: {len(diff)} tensors differ between the ranks, e.g. {diff[:3]}"
