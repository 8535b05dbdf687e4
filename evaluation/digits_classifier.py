"""An offline feature detector for small grayscale data: a small CNN classifier of handwritten digits.

FID needs NVIDIA's Inception-v3 (a download); the demo runs offline on scikit-learn's 8x8 digits upscaled to 16x16.
This module holds a classifier trained once on those digits (``python -m demo.train_digits_classifier``) whose
penultimate layer serves as the feature space of a Frechet distance, as classifier features do in FID (Heusel et
al. 2017) and in the MNIST/LeNet variants of it. Distances in this space are "FD-digits": comparable only with
each other, never with FID.

The trained network ships as a weights-only file (``formats.export`` format, loads with
``torch.load(weights_only=True)``); ``fid.py --detector=PATH`` recognises it by content. Like every detector it is
called as ``detector(images, return_features=True)`` on NCHW images with values in [0, 255].
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from torch_utils import persistence

#: Pixel values the detector interface promises (uint8 range).
PIXEL_MAX = 255.0


@persistence.persistent_class
class DigitsClassifier(torch.nn.Module):
    """Two stages of (conv 3x3, SiLU, conv 3x3, SiLU, 2x2 average pool), a fully connected feature layer, logits.

    SiLU rather than ReLU keeps every feature away from an exact zero, so feature covariances are not singular
    through dead units. All arguments are keyword-only (the weights-only format records them by name).

    Args:
        img_resolution: side of the square images the network sees (others are resized to it).
        channels: convolution channels per stage; each stage halves the resolution.
        feature_dim: size F of the penultimate layer, the features returned with ``return_features=True``.
        num_classes: number of logits.
    """

    #: The Frechet distance in this feature space is FD-digits, not FID (``evaluation.features.distance_name``).
    distance_name = 'fd_digits'

    def __init__(self, *, img_resolution: int = 16, channels: Sequence[int] = (16, 32), feature_dim: int = 64,
                 num_classes: int = 10):
        super().__init__()
        if img_resolution % (2 ** len(channels)):
            raise ValueError(f'img_resolution {img_resolution} is not divisible by 2^{len(channels)} '
                             f'(one halving per stage)')
        self.img_resolution = int(img_resolution)
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        layers: list[torch.nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.SiLU(),
                       torch.nn.Conv2d(c_out, c_out, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2)]
            c_in = c_out
        side = self.img_resolution // 2 ** len(channels)
        self.trunk = torch.nn.Sequential(*layers, torch.nn.Flatten())
        self.feature = torch.nn.Sequential(torch.nn.Linear(c_in * side * side, feature_dim), torch.nn.SiLU())
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel values [B, 1|3, H, W] in [0, 255] (any dtype) -> float32 [B, 1, R, R] in [-1, 1].

        RGB is averaged to gray (fid.py repeats grayscale to three channels, which this undoes exactly); other
        sizes are resized to ``img_resolution`` with antialiased bilinear interpolation.

        Raises:
            ValueError: the images are not 4-D with 1 or 3 channels.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f'expected images [B, 1 or 3, H, W], got shape {list(images.shape)}')
        x = images.to(self.head.weight.device, torch.float32)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[2:] != (self.img_resolution, self.img_resolution):
            x = F.interpolate(x, size=(self.img_resolution, self.img_resolution), mode='bilinear',
                              align_corners=False, antialias=True)
        return x * (2 / PIXEL_MAX) - 1

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        """Logits [B, num_classes], or with ``return_features`` the penultimate features [B, feature_dim]
        (float32) of images [B, 1|3, H, W] with values in [0, 255]."""
        features = self.feature(self.trunk(self.prepare(images)))
        return features if return_features else self.head(features)


def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    """Fraction of ``images`` (uint8 [N, C, H, W]) whose arg-max logit equals ``labels`` ([N] int)."""
    correct = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            logits = net(images[start:start + batch])
            correct += int((logits.argmax(dim=1).cpu() == labels[start:start + batch].cpu()).sum())
    return correct / max(images.shape[0], 1)
