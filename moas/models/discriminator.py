"""AnimeStyleDiscriminator: the original's anime/manga-aesthetics critic (base 48 channels).

Four stride-2 3×3 convolutions (48 → 96 → 192 → 384) with LeakyReLU(0.2), BatchNorm after all but the
first and Dropout2d(0.25) after the first two; ``anime_features`` (1×1 convs 384 → 192 → 96); a classifier
of global average pooling, Linear(96 → 1) and Sigmoid. Training gives it its own AdamW
(``moas.train.trained_net.discriminator_optimizer``).
"""

from __future__ import annotations

import torch
from torch import nn


class AnimeStyleDiscriminator(nn.Module):
    def __init__(self, base_channels: int = 48) -> None:
        super().__init__()
        c = base_channels
        self.init_args = {"base_channels": base_channels}
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Dropout2d(0.25),
            nn.Conv2d(c, 2 * c, 3, 2, 1),
            nn.BatchNorm2d(2 * c),
            nn.LeakyReLU(0.2),
            nn.Dropout2d(0.25),
            nn.Conv2d(2 * c, 4 * c, 3, 2, 1),
            nn.BatchNorm2d(4 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 8 * c, 3, 2, 1),
            nn.BatchNorm2d(8 * c),
            nn.LeakyReLU(0.2),
        )
        self.anime_features = nn.Sequential(
            nn.Conv2d(8 * c, 4 * c, 1), nn.LeakyReLU(0.2), nn.Conv2d(4 * c, 2 * c, 1), nn.LeakyReLU(0.2)
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probability that each image is a real anime illustration: (B, 3, H, W) in [-1, 1] → (B, 1)."""
        return self.classifier(self.anime_features(self.features(x)))
