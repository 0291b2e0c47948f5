"""The HSNet-style correlation head: its correlation statistics, its dependence on the support, its module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from heads.fewshot_correlation import CorrelationFewShotModule, CorrelationSegmenter, correlation_maps


def _brute_force(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor, groups: list[int],
                 top_k: int) -> torch.Tensor:
    """The statistics one query position and one tap at a time."""
    e, shots, hs, ws = support.shape[0], support.shape[1], *support.shape[-2:]
    h, w = query.shape[-2:]
    out = torch.zeros(e, 3 * len(groups), h, w)
    for i in range(e):
        for j in range(shots):
            fg = F.interpolate(masks[i, j][None, None].float(), size=(hs, ws), mode="area").flatten() > 0
            start = 0
            for g, width in enumerate(groups):
                s = support[i, j, start:start + width].permute(1, 2, 0).reshape(-1, width)
                for y in range(h):
                    for x in range(w):
                        cos = F.cosine_similarity(query[i, start:start + width, y, x][None], s, dim=1)
                        on = cos[fg].sort(descending=True).values
                        off = cos[~fg]
                        out[i, 3 * g, y, x] += (on[0] if len(on) else -1) / shots
                        out[i, 3 * g + 1, y, x] += torch.cat([on, torch.full((top_k,), -1.0)])[:top_k].mean() / shots
                        out[i, 3 * g + 2, y, x] += (off.max() if len(off) else -1) / shots
                start += width
    return out


@pytest.mark.parametrize("shots", [1, 3])
def test_correlation_maps_equal_a_per_position_computation(shots) -> None:
    g = torch.Generator().manual_seed(shots)
    groups = [3, 5]
    query, support = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, shots, 8, 4, 4, generator=g)
    masks = torch.zeros(2, shots, 16, 16, dtype=torch.bool)
    masks[:, :, 2:9, 3:7] = True
    masks[1, 0, 15, 15] = True  # a single pixel marks its whole cell (any overlap counts)
    got = correlation_maps(query, support, masks, groups, top_k=4)
    torch.testing.assert_close(got, _brute_force(query, support, masks, groups, 4), rtol=0, atol=1e-5)
    assert got.shape == (2, 6, 4, 4)


def test_one_pixel_support_keeps_a_foreground_cell_and_empty_support_gives_minus_one() -> None:
    query, support = torch.randn(1, 4, 4, 4), torch.randn(1, 1, 4, 4, 4)
    masks = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    masks[0, 0, 5, 5] = True
    fg_best = correlation_maps(query, support, masks, [4])[0, 0]
    assert (fg_best > -1).all()  # the one cell it touches is foreground at the 4x4 grid
    empty = correlation_maps(query, support, torch.zeros_like(masks), [4])[0]
    assert (empty[:2] == -1).all() and (empty[2] > -1).all()


def _features(images: torch.Tensor) -> torch.Tensor:
    """A fixed, image-dependent stand-in for frozen features: 4x4 grids of pooled colours and their squares."""
    pooled = F.adaptive_avg_pool2d(images, 4)
    return torch.cat([pooled, pooled**2], 1)


def test_the_head_reads_its_support_by_construction() -> None:
    torch.manual_seed(0)
    head = CorrelationSegmenter(_features, groups=[3, 3]).eval()
    support, query = torch.rand(2, 1, 3, 16, 16), torch.rand(2, 3, 16, 16)
    masks = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    masks[:, :, :8] = True
    with torch.no_grad():
        own = head(support, masks, query)
        other = head(support, ~masks, query)
        swapped = head(support.flip(0), masks, query)
    assert own.shape == (2, 16, 16)
    assert (own - other).abs().mean() > 1e-3 and (own - swapped).abs().mean() > 1e-3


def test_bad_episodes_fail_before_any_feature_is_computed() -> None:
    calls = []

    def features(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return _features(images)

    head = CorrelationSegmenter(features, groups=[3, 3])
    support, query = torch.rand(1, 1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="empty"):
        head(support, torch.zeros(1, 1, 16, 16, dtype=torch.bool), query)
    with pytest.raises(ValueError, match=r"\(E, k, H, W\)"):
        head(support, torch.ones(1, 1, 8, 8, dtype=torch.bool), query)
    with pytest.raises(ValueError, match="tap widths"):
        CorrelationSegmenter(features, groups=[])
    assert not calls
    assert head.predict(support, torch.zeros(1, 1, 16, 16, dtype=torch.bool), query,
                        allow_empty_support=True).shape == (1, 16, 16)


def test_module_trains_the_decoder_only_and_lowers_the_loss() -> None:
    L.seed_everything(0, verbose=False)
    module = CorrelationFewShotModule(backbone="sd-unet-scenes", layers=["up_blocks.1", "up_blocks.2"],
                                      timesteps=[10], feature_size=8, width=16, lr=1e-2)
    frozen = {k: v.clone() for k, v in module.extractor.backbone.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batch = {"support": torch.rand(2, 1, 3, 32, 32, generator=g) * 2 - 1,
             "support_mask": torch.zeros(2, 1, 32, 32, dtype=torch.bool),
             "query": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
             "query_mask": torch.zeros(2, 32, 32, dtype=torch.bool)}
    batch["support_mask"][:, :, 4:20, 4:20] = True
    batch["query_mask"][:, 8:24, 8:24] = True
    optimiser = module.configure_optimizers()
    assert {id(p) for g in optimiser.param_groups for p in g["params"]} == \
        {id(p) for p in module.model.decoder.parameters()}
    module.log = lambda *a, **k: None
    losses = []
    for _ in range(30):
        loss = module.training_step(batch, 0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    for k, v in module.extractor.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
