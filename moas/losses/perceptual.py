"""VGG16 perceptual loss, used only when pretrained VGG16 weights are on disk; never random.

Weights are looked for at a given path, then in the torch hub cache (``<hub>/checkpoints/vgg16-*.pth``,
where ``torchvision`` puts them). Nothing is downloaded. When none are found the term is switched off with
one logged notice; a VGG with random weights would only add noise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

LAYERS = (3, 8, 15, 22)  # relu1_2, relu2_2, relu3_3, relu4_3 in torchvision's vgg16().features
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_notified = False


def find_vgg16_weights(path: str | None = None) -> Path | None:
    """A local VGG16 state-dict file: the given path, else the torch hub cache; None when there is none."""
    if path:
        p = Path(path).expanduser()
        return p if p.is_file() else None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(hub.glob("vgg16-*.pth")) if hub.is_dir() else []
    return found[0] if found else None


class VGGPerceptualLoss(nn.Module):
    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features[: LAYERS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample L1 between VGG16 features at relu1_2…relu4_3 of images in [-1, 1]."""
        x = torch.cat([pred, target], 0).float()
        x = ((x + 1) / 2 - self.mean) / self.std
        b = pred.shape[0]
        total = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LAYERS:
                total = total + F.l1_loss(x[:b], x[b:], reduction="none").flatten(1).mean(1)
        return total  # (B,)


def load_vgg_perceptual(path: str | None = None) -> VGGPerceptualLoss | None:
    """The perceptual loss with local pretrained weights, or None (with one notice per process)."""
    global _notified
    found = find_vgg16_weights(path)
    reason = None
    if found is None:
        reason = f"no VGG16 weights at {path}" if path else "no VGG16 weights in the torch hub cache"
    else:
        try:
            from torchvision.models import vgg16

            net = vgg16(weights=None)
            state = torch.load(found, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
            return VGGPerceptualLoss(net.features)
        except Exception as e:  # any unreadable file: the term is off, never random
            reason = f"VGG16 weights at {found} could not be loaded ({type(e).__name__})"
    if not _notified:
        log.info("VGG perceptual loss switched off: %s (nothing is downloaded).", reason)
        _notified = True
    return None
