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
        with pytest.raises(ValueError, match="query batch 2"), fusion.read():
            backbone(query.repeat(2, 1, 1, 1), t.repeat(2))


def _tiny() -> tuple:
    backbone = create_backbone("sd-unet-tiny")
    return backbone, KVFusion(backbone.model), torch.randn(1, 4, 8, 8), torch.tensor([10])


class _QueryOnlyProcessor:
    """An attention processor that never calls ``to_k`` / ``to_v`` (keys and values are the queries)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q = attn.to_q(hidden_states)
        return attn.to_out[1](attn.to_out[0](q))


def test_kv_fusion_hooks_are_gone_outside_its_contexts() -> None:
    backbone, fusion, x, t = _tiny()
    with torch.no_grad():
        plain = backbone(x, t)
        with fusion.write(shots=1):
            backbone(x, t)
        with fusion.read():
            backbone(x, t)
        assert torch.equal(backbone(x, t), plain)


def test_kv_fusion_refuses_a_read_without_a_support_pass() -> None:
    backbone, fusion, x, t = _tiny()
    with torch.no_grad(), pytest.raises(RuntimeError, match="no support pass"), fusion.read():
        backbone(x, t)


def test_kv_fusion_fails_loudly_when_a_fused_qkv_processor_skips_the_projections() -> None:
    backbone, fusion, x, t = _tiny()
    backbone.model.fuse_qkv_projections()  # the fused processor calls to_qkv, never to_k / to_v
    with (torch.no_grad(), pytest.raises(RuntimeError, match=r"down_blocks\.0\.attentions\.0\..*attn1"),
          fusion.write(shots=1)):
        backbone(x, t)
    assert not fusion.bank


def test_kv_fusion_names_the_one_attention_whose_processor_skips_the_projections() -> None:
    backbone, fusion, x, t = _tiny()
    names = list(fusion.attns)
    fusion.attns[names[-1]].set_processor(_QueryOnlyProcessor())
    with torch.no_grad(), pytest.raises(RuntimeError) as err, fusion.write(shots=1):
        backbone(x, t)
    assert names[-1] in str(err.value) and not any(n in str(err.value) for n in names[:-1])
    assert not fusion.bank


def test_kv_fusion_fails_loudly_when_the_query_pass_skips_the_projections() -> None:
    backbone, fusion, x, t = _tiny()
    with torch.no_grad():
        with fusion.write(shots=1):
            backbone(x, t)
        name = next(iter(fusion.attns))
        fusion.attns[name].set_processor(_QueryOnlyProcessor())
        with pytest.raises(RuntimeError, match="query pass") as err, fusion.read():
            backbone(x, t)
    assert name in str(err.value)
    assert not fusion.bank


def test_an_aborted_support_pass_leaves_no_bank() -> None:
    backbone, fusion, x, t = _tiny()

    def abort(*_):
        raise KeyboardInterrupt  # e.g. the user stops a run after every attention has written

    handle = backbone.model.conv_out.register_forward_hook(abort)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt), fusion.write(shots=1):
        backbone(x, t)
    handle.remove()
    assert not fusion.bank
    with torch.no_grad(), pytest.raises(RuntimeError, match="no support pass"), fusion.read():
        backbone(x, t)  # the aborted support does not leak into the next query


def test_an_aborted_query_pass_leaves_no_bank() -> None:
    backbone, fusion, x, t = _tiny()
    with torch.no_grad():
        with fusion.write(shots=1):
            backbone(x, t)
        assert fusion.bank
        with pytest.raises(ValueError, match="query batch 2"), fusion.read():
            backbone(x.repeat(2, 1, 1, 1), t.repeat(2))
    assert not fusion.bank
