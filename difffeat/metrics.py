"""FD-digits: a Fréchet distance for 16×16 digits, the offline stand-in for FID.

FID needs Inception weights, which cannot be had here. FD-digits is torchmetrics' Fréchet distance
(``FrechetInceptionDistance`` with a custom feature network) on the 64-d penultimate features of a small
CNN classifier that the project trains once on the digits *training* split (with labels, ±1 px shifts;
60 epochs, seed 0; 98.3% test accuracy) and caches as safetensors. It is the statistic FID uses in
another feature space: it ranks generators, but its values are not comparable with FID numbers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from difffeat.data import load_digits_split
from difffeat.store import atomic_write

__all__ = ["DigitsFeatureNet", "fd_digits", "load_fd_network"]

CACHE = Path(".cache/difffeat/fd-digits")


class DigitsFeatureNet(nn.Module):
    """Conv(32) → Conv(64, /2) → Conv(64, /2) → GAP → Linear(64) features → Linear(10) classes.

    ``forward`` returns the 64-d features; it accepts float images in ``[-1, 1]`` or the ``uint8`` images
    in ``[0, 255]`` that torchmetrics passes (3 channels are averaged to grey, sizes resized to 16×16).
    """

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.GELU())
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-d features ``(B, 64)`` of images ``x`` (see the class docstring for what it accepts)."""
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-1] != 16:
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        return self.body(x.float())


def _train(seed: int = 0, epochs: int = 60) -> DigitsFeatureNet:
    images, labels = load_digits_split("train")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            shifted = torch.roll(images[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()),
                                 dims=(2, 3))  # ±1 px shifts
            loss = F.cross_entropy(net.classifier(net(shifted)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def load_fd_network(cache: str | Path = CACHE, seed: int = 0) -> DigitsFeatureNet:
    """The FD-digits network: trained once (about 20 s on 2 cores) and cached, then loaded."""
    key = hashlib.sha256(f"DigitsFeatureNet-v2-seed{seed}".encode()).hexdigest()[:12]
    path = Path(cache) / f"net-{key}.safetensors"
    net = DigitsFeatureNet()
    if path.exists():
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    net = _train(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save(net.state_dict()))
    return net


@torch.no_grad()
def fd_digits(fake: torch.Tensor, real: torch.Tensor | None = None, net: DigitsFeatureNet | None = None) -> float:
    """Fréchet distance between ``fake`` and ``real`` images in FD-digits feature space.

    Images are ``(N, 1, 16, 16)`` in ``[-1, 1]``; ``real`` defaults to the digits test split (540 images).
    """
    real = load_digits_split("test")[0] if real is None else real
    metric = FrechetInceptionDistance(feature=net or load_fd_network(), normalize=True)
    metric.update(((real + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1), real=True)
    metric.update(((fake + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1), real=False)
    return float(metric.compute())
