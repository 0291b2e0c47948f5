"""DiffusionEncoder: the SMP / timm encoder contract, SMP decoders and a torchvision FPN built on it."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torchvision.ops import FeaturePyramidNetwork

from difffeat.encoder import DiffusionEncoder


@pytest.fixture(scope="module")
def encoder() -> DiffusionEncoder:
    return DiffusionEncoder("unet2d-tiny", ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0"], 10,
                            output_strides=[2, 4, 8, 16])


def test_contract_matches_smp_and_timm(encoder) -> None:
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    maps = encoder(x)
    assert len(maps) == len(encoder.out_channels) == 5
    assert [m.shape[1] for m in maps] == list(encoder.out_channels)
    assert [16 // m.shape[-1] for m in maps] == [1, 2, 4, 8, 16]
    assert encoder.feature_info.reduction() == [2, 4, 8, 16] and encoder.output_stride == 16
    assert encoder.feature_info.channels() == list(encoder.out_channels[1:])
    assert encoder.feature_info.module_name() == encoder.layers
    assert torch.equal(maps[0], x)


def test_taps_are_ordered_by_stride_and_equal_strides_are_refused() -> None:
    enc = DiffusionEncoder("unet2d-tiny", ["up_blocks.0", "down_blocks.0"], 10)
    strides = dict(zip(enc.layers, enc.strides, strict=True))
    info = enc.backbone.feature_info
    assert enc.layers == sorted(["up_blocks.0", "down_blocks.0"], key=lambda n: info[n].stride)
    assert strides == {n: info[n].stride for n in enc.layers}
    with pytest.raises(ValueError, match="two maps at one stride"):
        DiffusionEncoder("unet2d-tiny", ["down_blocks.1", "mid_block"], 10)
    with pytest.raises(ValueError, match="one increasing stride"):
        DiffusionEncoder("unet2d-tiny", ["down_blocks.1", "mid_block"], 10, output_strides=[4])


def test_frozen_encoder_is_deterministic_per_image(encoder) -> None:
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    whole = encoder(x)
    alone = encoder(x[2:3])
    assert all(torch.equal(a[2:3], b) for a, b in zip(whole, alone, strict=True))


@pytest.mark.parametrize("decoder", ["unet", "fpn"])
def test_smp_decoder_trains_one_step_on_the_frozen_encoder(encoder, decoder) -> None:
    torch.manual_seed(0)
    if decoder == "unet":
        dec = UnetDecoder(encoder_channels=encoder.out_channels, decoder_channels=(16, 16, 8, 8), n_blocks=4)
        head = SegmentationHead(8, 1, kernel_size=3)
    else:
        dec = FPNDecoder(encoder_channels=encoder.out_channels, encoder_depth=4, pyramid_channels=32,
                         segmentation_channels=32, dropout=0.0)
        head = SegmentationHead(32, 1, kernel_size=1, upsampling=2)  # FPN's output sits at stride 2 here
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    opt = torch.optim.Adam([*dec.parameters(), *head.parameters()], lr=3e-3)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    y = (x > 0).float()  # a target the input determines
    losses = []
    for _ in range(6):
        logits = head(dec(encoder(x)))
        assert logits.shape == y.shape
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in encoder.backbone.state_dict().items())


def test_torchvision_fpn_takes_the_maps(encoder) -> None:
    fpn = FeaturePyramidNetwork(list(encoder.out_channels[1:]), out_channels=8)
    maps = encoder(torch.rand(2, 1, 16, 16) * 2 - 1)[1:]
    out = fpn(OrderedDict((n, m) for n, m in zip(encoder.layers, maps, strict=True)))
    assert [o.shape for o in out.values()] == [torch.Size([2, 8, *m.shape[-2:]]) for m in maps]


def test_finetuned_encoder_gets_gradients() -> None:
    enc = DiffusionEncoder("unet2d-tiny", ["down_blocks.1"], 10, finetune=True)
    enc.train()
    enc(torch.rand(2, 1, 16, 16) * 2 - 1)[1].square().mean().backward()
    grads = [p.grad for p in enc.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
