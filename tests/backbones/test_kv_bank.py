"""A K/V bank that holds the query's own keys and values reproduces plain self-attention.

KV fusion's query pass attends over ``[own K; bank K]`` with values ``[own V; bank V]`` (token axis). When
the bank is the query's own pass, every key appears twice with its own value: each softmax weight
``exp(s_i) / Σ exp(s_j)`` becomes ``2 exp(s_i) / 2 Σ exp(s_j)``, the same, so the output is plain
self-attention exactly in exact arithmetic and to float rounding in practice. With ``k`` shots of the
query itself the keys appear ``k + 1`` times: the same argument. A bank from another image must change
the output: that is what makes the checks able to fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difffeat.backbones import create_backbone
from difffeat.backbones.attention import KVFusion


def _attention(dtype: torch.dtype) -> tuple[nn.Module, KVFusion, nn.Module]:
    """The first self-attention of ``sd-unet-tiny`` (diffusers' AttnProcessor2_0), alone, with its fusion."""
    backbone = create_backbone("sd-unet-tiny").to(dtype)
    attn = next(m for n, m in backbone.model.named_modules() if n.endswith("attn1"))
    holder = nn.Module()
    holder.attn1 = attn
    return attn, KVFusion(holder), backbone


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
@pytest.mark.parametrize("shots", [1, 3])
def test_a_bank_of_the_querys_own_keys_reproduces_self_attention(dtype, tol, shots) -> None:
    attn, fusion, _ = _attention(dtype)
    g = torch.Generator().manual_seed(shots)
    x = torch.randn(2, 64, attn.query_dim, generator=g, dtype=dtype)  # two episodes of 8x8 tokens
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        plain = attn(x)
        keys, values = attn.to_k(x), attn.to_v(x)
        with fusion.write(shots=shots):
            attn(x.repeat_interleave(shots, 0))  # each episode's shots are consecutive: the query itself, k times
        with fusion.read():  # hooks registered after fusion's (inside read) see the extended keys and values
            watch = [getattr(attn, p).register_forward_hook(lambda _m, _i, out, p=p: seen.__setitem__(p, out))
                     for p in ("to_k", "to_v")]
            fused = attn(x)
        for h in watch:
            h.remove()
        other = torch.randn(2 * shots, 64, attn.query_dim, generator=g, dtype=dtype)
        with fusion.write(shots=shots):
            attn(other)
        with fusion.read():
            foreign = attn(x)
    # concatenation means the token axis: [own; shot 1; …; shot k], each a copy of the query's own
    assert torch.equal(seen["to_k"], keys.repeat(1, shots + 1, 1))
    assert torch.equal(seen["to_v"], values.repeat(1, shots + 1, 1))
    err = (fused - plain).abs().max().item()
    assert err <= tol * plain.abs().max().item()
    assert (foreign - plain).abs().max().item() > 1e3 * max(err, tol)


def test_the_bank_lays_shots_along_the_token_axis() -> None:
    attn, fusion, _ = _attention(torch.float64)
    a, b = torch.randn(2, 1, 16, attn.query_dim, dtype=torch.float64).unbind()
    with torch.no_grad(), fusion.write(shots=2):
        attn(torch.cat([a, b]))
    key = next(k for k in fusion.bank if k.endswith("to_k"))
    assert torch.equal(fusion.bank[key], torch.cat([attn.to_k(a), attn.to_k(b)], 1).detach())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_the_whole_unet_with_its_own_bank_at_every_attention_resolution_is_the_plain_unet(dtype, tol) -> None:
    _, _, backbone = _attention(dtype)
    fusion = KVFusion(backbone.model)
    # sd-unet-tiny has self-attention at the full 8x8 grid (down_blocks.0, up_blocks.1) and at 4x4 (mid_block)
    assert {n.split(".")[0] for n in fusion.attns} == {"down_blocks", "up_blocks", "mid_block"}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype), torch.tensor([10, 400])
    with torch.no_grad():
        plain = backbone(x, t)
        with fusion.write(shots=1):
            backbone(x, t)
        assert len(fusion.bank) == 2 * len(fusion.attns)
        with fusion.read():
            fused = backbone(x, t)
        with fusion.write(shots=1):
            backbone(x.flip(0), t)  # the other episode's image in each bank
        with fusion.read():
            swapped = backbone(x, t)
    err = (fused - plain).abs().max().item()
    assert err <= tol * plain.abs().max().item()
    assert (swapped - plain).abs().max().item() > 100 * max(err, tol * plain.abs().max().item())
