"""Validation loss on ``--val_dir``: the weighted diffusion loss at fixed timesteps and fixed noise.

Fixing t and ε (from a seeded generator) removes the sampling noise of the training loss, so the value is
comparable from one epoch to the next and between runs on the same validation folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from moas.data.dataset import ArtDataset, collate, to_model_range
from moas.data.sampler import BucketBatchSampler
from moas.data.textbank import TextBank
from moas.diffusion.schedule import NoiseSchedule

TIMESTEPS = (50, 250, 500, 750, 950)  # spread over the schedule; each image is scored at all of them


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    dataset: ArtDataset,
    bank: TextBank,
    schedule: NoiseSchedule,
    device: torch.device,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    # One image size per batch (aspect buckets); every image exactly once, in order.
    order = BucketBatchSampler(
        dataset.bucket_ids, [1.0] * len(dataset), batch_size, shuffle=False, fill=False
    )
    for batch in DataLoader(dataset, batch_sampler=order, collate_fn=collate):
        x0 = to_model_range(batch["pixels"]).to(device)  # (B, 3, H, W)
        text = bank.batch(batch["captions"], device)
        for step in TIMESTEPS:
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            pred = model(schedule.add_noise(x0, noise, t), t, text).float()
            per = F.mse_loss(pred, schedule.target(x0, noise, t), reduction="none").mean((1, 2, 3))
            total += (per * schedule.loss_weight(t)).sum().item()
            count += x0.shape[0]
    return total / max(count, 1)
