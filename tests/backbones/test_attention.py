"""Model surgery on diffusers denoisers: the support input convolution and KV fusion."""

from __future__ import annotations

import pytest
import torch

from difffeat.backbones import create_backbone
from difffeat.backbones.attention import DualConvIn, KVFusion, support_conv_in


def test_support_conv_reproduces_the_original_when_mask_channels_equal_image_channels() -> None:
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    support = support_conv_in(conv)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(support(torch.cat([x, x], 1)), conv(x))
    assert support.in_channels == 6


def test_dual_conv_in_routes_by_channel_count() -> None:
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    dual = DualConvIn(conv)
    x = torch.randn(2, 3, 10, 10)
    assert dual.query is conv
    torch.testing.assert_close(dual(x), conv(x))
    torch.testing.assert_close(dual(torch.cat([x, -x], 1)), dual.support(torch.cat([x, -x], 1)))


def test_kv_fusion_with_an_empty_bank_is_plain_self_attention() -> None:
    backbone = create_backbone("sd-unet-tiny")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        plain = backbone(x, t)
        fusion = KVFusion(backbone.model)
        with fusion.read():
            assert torch.equal(backbone(x, t), plain)


def test_kv_fusion_lets_the_query_see_the_support() -> None:
    backbone = create_backbone("sd-unet-tiny")
    fusion = KVFusion(backbone.model)
    query, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    support = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        plain = backbone(query, t)
        with fusion.write(shots=3):
            backbone(support, t.repeat(3))
        key = next(k for k in fusion.bank if k.endswith("to_k"))
        assert fusion.bank[key].shape[0] == 1 and fusion.bank[key].shape[1] % 3 == 0
        with fusion.read():
            fused = backbone(query, t)
        assert not fusion.bank  # cleared after the episode
        assert not torch.allclose(fused, plain)
        # the support itself, fused with itself as a 1-shot bank, still runs
        with fusion.write(shots=1):
            backbone(query, t)
        with fusion.read(), pytest.raises(ValueError, match="query batch 2"):
            backbone(query.repeat(2, 1, 1, 1), t.repeat(2))
