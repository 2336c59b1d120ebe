"""The loss stack (``AdvancedLossFunctions``) and its terms; see ``stack.py``."""

from moas.losses.anatomy import AnatomicalDetector, anatomical_loss
from moas.losses.gan import FAKE_LABEL, REAL_LABEL, discriminator_loss, generator_gan_loss
from moas.losses.image import (
    color_harmony_loss,
    combined_loss,
    gram_loss,
    line_art_loss,
    sobel_magnitude,
    ssim,
    ssim_loss,
)
from moas.losses.perceptual import VGGPerceptualLoss, find_vgg16_weights, load_vgg_perceptual
from moas.losses.stack import DEFAULT_WEIGHTS, TERMS, AdvancedLossFunctions, LossResult

__all__ = [
    "DEFAULT_WEIGHTS",
    "FAKE_LABEL",
    "REAL_LABEL",
    "TERMS",
    "AdvancedLossFunctions",
    "AnatomicalDetector",
    "LossResult",
    "VGGPerceptualLoss",
    "anatomical_loss",
    "color_harmony_loss",
    "combined_loss",
    "discriminator_loss",
    "find_vgg16_weights",
    "generator_gan_loss",
    "gram_loss",
    "line_art_loss",
    "load_vgg_perceptual",
    "sobel_magnitude",
    "ssim",
    "ssim_loss",
]
