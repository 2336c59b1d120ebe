"""Distributed data parallel: ``torchrun --nproc_per_node N -m moas train ...``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init_distributed` reads
them, joins the process group (NCCL on CUDA, gloo on CPU) and pins each process to ``cuda:LOCAL_RANK``.
Each rank trains on its own shard of every epoch's batch plan (all ranks get the same number of batches);
DDP averages gradients, so the effective batch is micro-batch × accumulation × world size. Only rank 0
writes logs, checkpoints, TensorBoard and the model file; every rank reads the same checkpoint on resume.

Multi-node: run the same command on every node with ``--nnodes M --node_rank R --master_addr HOST
--master_port PORT`` (or ``--rdzv_endpoint HOST:PORT``); the checkpoint folder must be shared (or rank 0's
node must be the one resumed from).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moas.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_max(self, value: float) -> float:
        """The largest ``value`` over all ranks (identity when not distributed)."""
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def all_mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=_reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _reduce_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_ranks_agree(ok: bool) -> bool:
    """True only when ``ok`` holds on every rank (so all ranks skip a step together or none does)."""
    if not is_distributed():
        return ok
    t = torch.tensor([1.0 if ok else 0.0], device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def all_ranks_agree_on_device(ok: torch.Tensor) -> torch.Tensor:
    """``all_ranks_agree`` for a 0-dim bool flag that stays on the device: the collective is queued, not
    waited for."""
    if not is_distributed():
        return ok
    t = ok.to(_reduce_device(), torch.float32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return (t[0] > 0.5).to(ok.device)


def average_gradients(params) -> None:
    """Average the gradients of modules trained outside DDP (discriminator, enhancer) over all ranks.

    The generator is wrapped in DDP; these side networks take their own optimizer steps, so without this
    every rank's copy would drift apart (each sees its own shard) while only rank 0's is saved. One flat
    all-reduce per step; parameters without a gradient take part as zeros so every rank sends the same size.
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_reduce_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.device)
        offset += n


def broadcast_from_main(tensors) -> None:
    """Copy rank 0's values of ``tensors`` to every rank, in place (no-op when not distributed).

    For state changed outside the optimizer, such as the continuous-learning controller's routing bias and
    expert weights: DDP keeps parameters in step only through the gradients it averages."""
    if not is_distributed():
        return
    for t in tensors:
        buf = t.detach().to(_reduce_device())
        dist.broadcast(buf, src=0)
        with torch.no_grad():
            t.copy_(buf.to(t.device))


def context_from_env(environ: dict[str, str] | None = None) -> DistContext:
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)."
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}.")
    return DistContext(rank, world, local)


def init_distributed(device_name: str) -> tuple[DistContext, str]:
    """Join the process group when launched by torchrun; returns the context and the device to use."""
    ctx = context_from_env()
    if not ctx.enabled:
        return ctx, device_name
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank)
        device_name = f"cuda:{ctx.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    log.info("DDP: rank %d of %d (%s).", ctx.rank, ctx.world_size, "nccl" if use_cuda else "gloo")
    return ctx, device_name


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
