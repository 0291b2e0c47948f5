"""Readout shapes and layouts."""

from __future__ import annotations

import pytest
import torch

from difffeat.backbones import FeatureInfo
from difffeat.readout import AdaptiveKxK, GlobalAvg, Identity, PerPixel, TokenMean, as_map, concat_features

MAP = FeatureInfo("m", 8, 2, None, "map", 0)
TOK = FeatureInfo("t", 8, None, (4, 4), "tokens", 1)


def test_tokens_fold_onto_their_grid_row_major() -> None:
    tokens = torch.arange(2 * 16 * 8, dtype=torch.float32).reshape(2, 16, 8)
    m = as_map(tokens, TOK)
    assert m.shape == (2, 8, 4, 4)
    assert torch.equal(m[:, :, 1, 2], tokens[:, 1 * 4 + 2])


@pytest.mark.parametrize("x,info", [(torch.randn(2, 8, 4, 4), MAP), (torch.randn(2, 16, 8), TOK)])
def test_readout_shapes(x, info) -> None:
    assert GlobalAvg()(x, info).shape == (2, 8)
    assert TokenMean()(x, info).shape == (2, 8)
    assert AdaptiveKxK(2)(x, info).shape == (2, 32)
    assert AdaptiveKxK(2, flatten=False, output_fmt="NLC")(x, info).shape == (2, 4, 8)
    assert PerPixel(16)(x, info).shape == (2, 8, 16, 16)
    assert PerPixel(16, output_fmt="NLC")(x, info).shape == (2, 256, 8)
    assert Identity()(x, info).shape == (2, 8, 4, 4)


def test_global_average_equals_mean() -> None:
    x = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(GlobalAvg()(x, MAP), x.mean((2, 3)))


def test_bad_output_format() -> None:
    with pytest.raises(ValueError, match="NCHW"):
        PerPixel(output_fmt="NHWC")


def test_concat_features_per_pixel() -> None:
    feats = {("a", 1): torch.randn(2, 3, 8, 8), ("b", 1): torch.randn(2, 5, 8, 8)}
    assert concat_features(feats).shape == (2, 8, 8, 8)
