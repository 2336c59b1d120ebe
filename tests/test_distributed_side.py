"""Side networks trained outside DDP (discriminator, enhancer) stay identical on every rank (2 gloo ranks):
the gradient averaging and the all-ranks agreement they use. A whole two-process training run, its resume
and its ranks' identical weights: tests/test_faults_process.py."""

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
