"""FD-digits and the samplers."""

from __future__ import annotations

import pytest
import torch

from difffeat.backbones import create_backbone
from difffeat.data import load_digits_split
from difffeat.metrics import DigitsFeatureNet, fd_digits
from difffeat.sample import sample


@pytest.fixture(scope="module")
def net() -> DigitsFeatureNet:
    torch.manual_seed(0)
    return DigitsFeatureNet().eval()  # an untrained network: the statistic, not its calibration, is tested


def test_fd_is_near_zero_for_the_same_set_and_grows_with_distortion(net) -> None:
    real = load_digits_split("test")[0]
    same = fd_digits(real, real, net)
    noisy = fd_digits((real + 0.5 * torch.randn_like(real)).clamp(-1, 1), real, net)
    noise = fd_digits(torch.rand_like(real) * 2 - 1, real, net)
    assert abs(same) < 1e-3 and 0 < noisy < noise


def test_feature_net_accepts_torchmetrics_uint8_rgb(net) -> None:
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    assert net(x).shape == (2, DigitsFeatureNet.num_features)


@pytest.mark.parametrize("name,objective", [("dit-digits", "flow"), ("unet2d-tiny", "eps")])
def test_samplers_are_seeded_and_bounded(name, objective) -> None:
    from difffeat.train import SCHEDULERS

    backbone = create_backbone(name, scheduler=SCHEDULERS[objective])
    a = sample(backbone, 5, steps=3, seed=1, batch_size=2)
    assert a.shape == (5, 1, 16, 16) and a.abs().max() <= 1
    assert torch.equal(a, sample(backbone, 5, steps=3, seed=1, batch_size=2))
    assert not torch.equal(a, sample(backbone, 5, steps=3, seed=2, batch_size=2))
