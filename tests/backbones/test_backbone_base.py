"""The adapter contract in backbones/base.py: spec(), digests, multi-stream taps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from difffeat.backbones import Backbone, create_backbone
from difffeat.extract import FeatureExtractor
from difffeat.noise import NoiseSchedule
from difffeat.readout import Identity

TINY = ["unet2d-tiny", "sd-unet-tiny", "dit-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_rebuilt_backbone_has_an_equal_spec(name) -> None:
    """No false refusals: the same settings give the same spec (and so the same store key)."""
    first, again = create_backbone(name), create_backbone(name)
    assert first.spec() == again.spec()
    assert json.loads(json.dumps(first.spec())) == first.spec()  # plain JSON, as the manifest keeps it
    assert create_backbone(name, seed=1).spec()["weights"] != first.spec()["weights"]


def test_weights_digest_with_a_zero_dim_buffer() -> None:
    backbone = create_backbone("unet2d-tiny")
    backbone.model.register_buffer("step", torch.tensor(3))
    before, spec = backbone.weights_digest(), backbone.spec()
    backbone.model.step.fill_(4)
    assert backbone.weights_digest() != before
    assert backbone.spec()["weights"] != spec["weights"]


# ----------------------------------------------------------------- a block returning two streams
class _JointBlock(nn.Module):
    """Returns ``(text, image)`` as a joint text-image block does: 16 text tokens of width 6, an 8-channel map."""

    def __init__(self) -> None:
        super().__init__()
        self.text = nn.Linear(4, 6)
        self.image = nn.Conv2d(4, 8, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text(h.flatten(2).transpose(1, 2)), self.image(h)


class _JointModel(nn.Module):
    """A toy denoiser on 1×4×4 inputs with a diffusers-like ``config``."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=1, sample_size=4)
        self.conv_in = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList([_JointBlock()])
        self.conv_out = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        return self.conv_out(self.blocks[0](h)[1])


class _ImageStream(Backbone):
    """Reads the image stream (element 1) of ``blocks.*``."""

    output_streams = {"blocks": 1}  # noqa: RUF012

    def tap_names(self) -> list[str]:
        return ["conv_in", "blocks.0"]

    def denoise(self, x_t, t, cond=None):
        return self.model(x_t, t)


class _DefaultStream(_ImageStream):
    """The same model with no stream declared: element 0 (the text tokens)."""

    output_streams = {}  # noqa: RUF012


def _joint(cls: type[Backbone]) -> Backbone:
    torch.manual_seed(0)
    return cls(_JointModel(), NoiseSchedule.from_config({})).eval()


def test_declared_stream_is_the_one_tapped() -> None:
    backbone = _joint(_ImageStream)
    info = backbone.feature_info["blocks.0"]
    assert (info.kind, info.channels, info.stride) == ("map", 8, 1)
    x, t = torch.rand(2, 1, 4, 4) * 2 - 1, torch.tensor([3, 700])
    with torch.no_grad(), backbone.tap(["blocks.0"]) as found:
        backbone.run(x, t)
    with torch.no_grad():
        expected = backbone.model.blocks[0](backbone.model.conv_in(x) + t.float().view(-1, 1, 1, 1) / 1000)[1]
    torch.testing.assert_close(found["blocks.0"], expected, rtol=0, atol=0)
    feats = FeatureExtractor(backbone, ["blocks.0"], [10], readout=Identity())(x)
    assert feats[("blocks.0", 10)].shape == (2, 8, 4, 4)


def test_without_a_declared_stream_element_zero_is_tapped() -> None:
    backbone = _joint(_DefaultStream)
    info = backbone.feature_info["blocks.0"]
    assert (info.kind, info.channels, info.grid) == ("tokens", 6, (4, 4))
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    with torch.no_grad(), backbone.tap(["blocks.0"]) as found:
        backbone.run(x, torch.tensor([3, 700]))
    assert found["blocks.0"].shape == (2, 16, 6)


def test_read_output_longest_prefix_wins() -> None:
    backbone = _joint(_ImageStream)
    backbone.output_streams = {"blocks": 1, "blocks.1": 0}
    a, b = torch.zeros(1), torch.ones(1)
    assert backbone.read_output("blocks", (a, b)) is b
    assert backbone.read_output("blocks.0.attn", (a, b)) is b
    assert backbone.read_output("blocks.1", (a, b)) is a
    assert backbone.read_output("blocksx", (a, b)) is a  # a name prefix is not a path prefix
    assert backbone.read_output("conv_in", a) is a
    with pytest.raises(IndexError, match="stream 1.*1 elements"):
        backbone.read_output("blocks.0", (a,))
