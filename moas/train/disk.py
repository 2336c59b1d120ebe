"""Disk space for a run: the disk plan (what each kind of file takes, how many exist at once) and the check
before training.

A disk that fills up hours into a run loses nothing (saves are atomic) but stops the run; so training says
up front what its files will take, fails at once when not even one checkpoint fits, and warns when the peak
will not. :func:`plan_disk` is arithmetic on byte counts (:class:`NetBytes`, from :func:`bytes_of` — a
module built on the meta device will do — or from parameter counts) and a replay of the run's saves with
the rotation of :mod:`moas.train.rotation`, so ``--dry-run`` can print it without building a model.
Sizes are in GB of 10^9 bytes.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from moas.errors import MoasError

log = logging.getLogger("moas.train.loop")
GB = 10**9
# The torch file format's cost per stored tensor (zip entry, 64-byte alignment, pickle record) and per file
# (config, RNG states, schedule): measured on tiny-config checkpoints, where they are about 1 %.
TENSOR_OVERHEAD = 300
FILE_OVERHEAD = 30_000
# A safetensors model file: a JSON header entry per tensor, and the config, arguments and provenance.
MODEL_TENSOR_OVERHEAD = 120
MODEL_FILE_OVERHEAD = 20_000


@dataclass(frozen=True)
class NetBytes:
    """One network's sizes in bytes, as the file formats store it."""

    state: int  # its state_dict (weights and buffers)
    trainable: int  # its trainable parameters: AdamW keeps two moments of each, three with AMSGrad
    bf16: int  # its state_dict with the float32 tensors in bf16 (weights-only checkpoints)
    tensors: int = 0  # state_dict entries
    trainable_tensors: int = 0  # trainable parameter tensors (each has its own optimizer entries)

    @classmethod
    def fp32(cls, params: int, trainable: int | None = None) -> NetBytes:
        """From parameter counts alone: float32 weights, no buffers, no per-tensor overhead."""
        n = params if trainable is None else trainable
        return cls(4 * params, 4 * n, 2 * params)

    def __add__(self, other: NetBytes) -> NetBytes:
        return NetBytes(*(a + b for a, b in zip(_fields(self), _fields(other), strict=True)))


def _fields(n: NetBytes) -> tuple[int, ...]:
    return (n.state, n.trainable, n.bf16, n.tensors, n.trainable_tensors)


NO_NET = NetBytes(0, 0, 0)


def bytes_of(module: torch.nn.Module | None) -> NetBytes:
    """A network's sizes (:data:`NO_NET` for None); works on a module built on the meta device."""
    if module is None:
        return NO_NET
    state = module.state_dict()
    trainable = [p for p in module.parameters() if p.requires_grad]
    return NetBytes(
        state=sum(t.numel() * t.element_size() for t in state.values()),
        trainable=sum(p.numel() * p.element_size() for p in trainable),
        bf16=sum(t.numel() * (2 if t.dtype == torch.float32 else t.element_size()) for t in state.values()),
        tensors=len(state),
        trainable_tensors=len(trainable),
    )


@dataclass(frozen=True)
class FileSizes:
    """Bytes of one file of each kind."""

    full: int  # a resumable checkpoint: weights, EMA, optimizer states, side networks, RNG, ...
    thinned: int  # the same without the optimizer states
    ema_bf16: int  # weights only: the EMA generator and super-resolution stage in bf16, and the enhancer
    model_file: int  # models/*.safetensors: the EMA generator, the enhancer and the EMA stage, float32


def file_sizes(
    generator: NetBytes,
    enhancer: NetBytes = NO_NET,
    discriminator: NetBytes = NO_NET,
    amsgrad: bool = True,
    sr: NetBytes = NO_NET,
) -> FileSizes:
    """The size of each kind of file, from the networks' sizes (the side networks' AdamW is AMSGrad; the
    super-resolution stage ``sr`` has an EMA copy and a plain AdamW)."""
    side = enhancer + discriminator
    moments = 3 if amsgrad else 2
    # Each trainable tensor also has a 4-byte step count in the optimizer state.
    optimizer = moments * generator.trainable + 3 * side.trainable + 4 * (generator + side).trainable_tensors
    optimizer += 2 * sr.trainable + 4 * sr.trainable_tensors
    optimizer_tensors = (moments + 1) * generator.trainable_tensors + 4 * side.trainable_tensors
    optimizer_tensors += 3 * sr.trainable_tensors

    def ckpt(data: int, tensors: int) -> int:
        return data + TENSOR_OVERHEAD * tensors + FILE_OVERHEAD

    weights = 2 * generator.state + side.state + 2 * sr.state
    weight_tensors = 2 * generator.tensors + side.tensors + 2 * sr.tensors
    kept = generator + enhancer + sr  # what generation reads
    return FileSizes(
        full=ckpt(weights + optimizer, weight_tensors + optimizer_tensors),
        thinned=ckpt(weights, weight_tensors),
        ema_bf16=ckpt(generator.bf16 + enhancer.state + sr.bf16, kept.tensors),
        model_file=kept.state + MODEL_TENSOR_OVERHEAD * kept.tensors + MODEL_FILE_OVERHEAD,
    )


@dataclass(frozen=True)
class SavePolicy:
    """When a run writes checkpoints and what it keeps: the ``train.*`` settings of the same names."""

    epochs: int
    save_every: int = 5
    keep_last: int = 30
    keep_optimizer_last: int = 3
    old_checkpoint: str = "thinned"  # full | thinned | ema_bf16
    milestones: frozenset[int] = field(default_factory=frozenset)  # moas.train.saving.milestone_epochs
    save_every_steps: int = 0
    steps_per_epoch: int = 0  # optimizer steps per epoch; 0 = unknown (step checkpoints then at worst)
    keep_emergency: int = 2

    @classmethod
    def of(cls, train: object, milestones: Iterable[int], steps_per_epoch: int = 0) -> SavePolicy:
        """From an object with the ``train.*`` settings of these names (a ``TrainConfig``)."""
        names = {f.name for f in fields(cls)} - {"milestones", "steps_per_epoch"}
        settings = {n: getattr(train, n) for n in names}
        return cls(**settings, milestones=frozenset(milestones), steps_per_epoch=steps_per_epoch)

    @property
    def reduces(self) -> bool:
        return self.old_checkpoint != "full" and self.keep_optimizer_last > 0


def save_sequence(p: SavePolicy) -> list[tuple[str, bool]]:
    """The checkpoints a run writes, in order: (``"epoch"`` or ``"step"``, whether it is a milestone)."""
    out: list[tuple[str, bool]] = []
    for epoch in range(1, p.epochs + 1):
        if p.save_every_steps and p.steps_per_epoch:
            before, after = (epoch - 1) * p.steps_per_epoch, epoch * p.steps_per_epoch
            out += [("step", False)] * (after // p.save_every_steps - before // p.save_every_steps)
        if epoch % p.save_every == 0 or epoch == p.epochs or epoch in p.milestones:
            out.append(("epoch", epoch in p.milestones))
    return out


class _File:
    def __init__(self, kind: str, milestone: bool) -> None:
        self.kind, self.milestone, self.full = kind, milestone, True


def replay(p: SavePolicy, sizes: FileSizes) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Replay the run's saves as :func:`moas.train.saving.save_at_boundary` does them (write, rotate, then
    reduce older ones one by one beside themselves): ((full, older) checkpoints at the byte peak, (full,
    older) left at the end, saves)."""
    old = {"full": sizes.full, "thinned": sizes.thinned, "ema_bf16": sizes.ema_bf16}[p.old_checkpoint]
    files: list[_File] = []
    peak = (0, 0)

    def note(full: int, older: int) -> None:
        nonlocal peak
        if full * sizes.full + older * old > peak[0] * sizes.full + peak[1] * old:
            peak = (full, older)

    def count() -> tuple[int, int]:
        full = sum(f.full for f in files)
        return full, len(files) - full

    sequence = save_sequence(p)
    for kind, milestone in sequence:
        files.append(_File(kind, milestone))
        note(*count())
        for k in ("epoch", "step"):
            rotated = [f for f in files if f.kind == k and not f.milestone]
            gone = {id(f) for f in rotated[: max(len(rotated) - p.keep_last, 0)]}
            files = [f for f in files if id(f) not in gone]
        if p.reduces:
            for f in [f for f in files if f.full][: -p.keep_optimizer_last]:
                full, older = count()
                note(full, older + 1)  # the reduced copy is written beside the original
                f.full = False
    return peak, count(), len(sequence)


@dataclass(frozen=True)
class DiskPlan:
    """What a run's checkpoints and model files take (bytes), and how many of each kind exist at once."""

    sizes: FileSizes
    policy: SavePolicy
    saves: int  # checkpoints written over the run (step checkpoints only when steps_per_epoch is known)
    peak_full: int  # full checkpoints at the peak, the one being written included
    peak_old: int  # older (reduced) checkpoints at that moment, one being rewritten included
    end_full: int  # full checkpoints left at the end
    end_old: int  # older ones left at the end
    emergency_full: int  # full checkpoints that emergency ones add at most
    emergency_old: int  # older-size checkpoints that emergency ones add at most
    model_files: int = 2  # best_model and last_model

    @property
    def old(self) -> int:
        """Bytes of one older checkpoint."""
        s = self.sizes
        return {"full": s.full, "thinned": s.thinned, "ema_bf16": s.ema_bf16}[self.policy.old_checkpoint]

    @property
    def checkpoint_bytes(self) -> int:
        """The checkpoint folder at its fullest."""
        full, old = self.peak_full + self.emergency_full, self.peak_old + self.emergency_old
        return full * self.sizes.full + old * self.old

    @property
    def model_bytes(self) -> int:
        return self.model_files * self.sizes.model_file

    @property
    def total_bytes(self) -> int:
        return self.checkpoint_bytes + self.model_bytes

    @property
    def end_bytes(self) -> int:
        return self.end_full * self.sizes.full + self.end_old * self.old

    def describe(self) -> str:
        """A few lines for the user."""
        p, s = self.policy, self.sizes
        kept = f"the newest {p.keep_optimizer_last}" if p.reduces else "all kept"
        old_name = {"thinned": "thinned (no optimizer state)", "ema_bf16": "ema_bf16 (weights only)"}
        lines = [
            f"Disk plan: {self.saves} checkpoints over {p.epochs} epochs; at most "
            f"{self.checkpoint_bytes / GB:.1f} GB of checkpoints + {self.model_bytes / GB:.1f} GB of model "
            f"files = {self.total_bytes / GB:.1f} GB.",
            f"  full (resumable): {s.full / GB:.2f} GB each; at most {self.peak_full} at once "
            f"({kept} + 1 being written)",
        ]
        if p.reduces:
            lines.append(
                f"  {old_name[p.old_checkpoint]}: {self.old / GB:.2f} GB each; at most {self.peak_old} at "
                f"once (older ones, milestones among them)"
            )
        lines.append(f"  model files (best_model, last_model): {s.model_file / GB:.2f} GB each")
        old_kind = p.old_checkpoint if p.reduces else "full"
        extra = [f"{n} {k}" for n, k in ((self.emergency_full, "full"), (self.emergency_old, old_kind)) if n]
        lines.append(
            f"  emergency_*.pt (out of memory, crashes; up to {p.keep_emergency} kept): at most "
            f"{' + '.join(extra) or 'nothing'} more"
        )
        lines.append(
            f"  left at the end: {self.end_full} full + {self.end_old} {old_kind} = {self.end_bytes / GB:.1f} GB"
        )
        return "\n".join(lines)


def plan_disk(
    policy: SavePolicy,
    generator: NetBytes,
    enhancer: NetBytes = NO_NET,
    discriminator: NetBytes = NO_NET,
    amsgrad: bool = True,
    sr: NetBytes = NO_NET,
) -> DiskPlan:
    """The disk plan of a run: each kind of file's size and the most of each kind on disk at once.

    ``generator``, ``enhancer`` and ``discriminator`` come from :func:`bytes_of` (a meta-device module is
    enough) or :meth:`NetBytes.fp32`; the side networks are those that train (``NO_NET`` otherwise), and
    ``sr`` the super-resolution stage (its EMA copy is counted here).
    """
    sizes = file_sizes(generator, enhancer, discriminator, amsgrad, sr)
    (peak_full, peak_old), (end_full, end_old), saves = replay(policy, sizes)
    if policy.save_every_steps and not policy.steps_per_epoch:
        # Step checkpoints of unknown count: at worst keep_last of them, older ones reduced (or all full).
        if policy.reduces:
            peak_old, end_old = peak_old + policy.keep_last, end_old + policy.keep_last
        else:
            peak_full, end_full = peak_full + policy.keep_last, end_full + policy.keep_last
    if policy.reduces:
        # Each emergency checkpoint adds one older-size file: itself reduced, or the epoch/step checkpoint it
        # pushed out of the newest full ones. Keeping one full, the newest epoch/step checkpoint stays full
        # beside a newer emergency one instead.
        em_full = 1 if policy.keep_optimizer_last == 1 and policy.keep_emergency else 0
        em_old = policy.keep_emergency - em_full
    else:
        em_full, em_old = policy.keep_emergency, 0
    return DiskPlan(sizes, policy, saves, peak_full, peak_old, end_full, end_old, em_full, em_old)


def checkpoint_size_estimate(
    model: torch.nn.Module, side: list[torch.nn.Module], amsgrad: bool
) -> tuple[int, int]:
    """(bytes of a resumable checkpoint, bytes once its optimizer state is thinned away), estimated.

    Weights and the EMA copy, plus AdamW's two (three with AMSGrad) tensors per trainable weight, for the
    generator and the ``side`` networks (discriminator, enhancer; AMSGrad). Within a few per cent of the
    real files.
    """
    others = NO_NET
    for m in side:
        others = others + bytes_of(m)
    sizes = file_sizes(bytes_of(model), others, NO_NET, amsgrad)
    return sizes.full, sizes.thinned


def check_disk_space(directory: Path, plan: DiskPlan) -> None:
    """Log what the run's files will take; stop with one sentence if one checkpoint cannot fit; warn if the
    peak (:attr:`DiskPlan.total_bytes`) will not."""
    full, need = plan.sizes.full, plan.total_bytes
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    log.info(
        "Checkpoints: about %.2f GB each (%.2f GB once %s); at most %d full + %d older at once, with the "
        "model files about %.1f GB; %.1f GB free in %s.",
        full / GB,
        plan.old / GB,
        plan.policy.old_checkpoint if plan.policy.reduces else "kept full",
        plan.peak_full + plan.emergency_full,
        plan.peak_old + plan.emergency_old,
        need / GB,
        free / GB,
        directory,
    )
    if free < full:
        raise MoasError(
            f"Only {free / GB:.2f} GB is free in {directory} but one checkpoint needs about {full / GB:.2f} GB; "
            "free some space or point --checkpoint_dir at a larger disk."
        )
    if free < need:
        log.warning(
            "The kept checkpoints may not fit: about %.1f GB needed, %.1f GB free in %s. Lower "
            'train.keep_last / train.keep_optimizer_last, set train.old_checkpoint = "ema_bf16" or free '
            "space; a failed save stops training with the earlier checkpoints intact.",
            need / GB,
            free / GB,
            directory,
        )
