"""Detection adapter: Hungarian matching, set loss, forward/backward on a tiny U-Net, the config under fast_dev_run."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from heads.detection import DetectionAdapter, fit_adapter, hungarian_match, match_cost, set_criterion

CATEGORIES = ["digit0", "circle", "digit1"]


def tiny_unet(folder: Path) -> Path:
    """A random 3-channel 32-px UNet2DModel saved as a diffusers folder."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                norm_num_groups=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_unet(tmp_path_factory.mktemp("unet") / "tiny")


def _adapter(unet_dir: Path, **kwargs) -> DetectionAdapter:
    torch.manual_seed(0)
    kwargs.setdefault("width", 32 if kwargs.get("head") == "dense" else 16)  # FCOSHead: GroupNorm of 32 groups
    return DetectionAdapter(str(unet_dir), ["mid_block", "up_blocks.0", "up_blocks.1"], 20, CATEGORIES,
                            output_strides=[4, 8, 16], num_queries=8, **kwargs)


@pytest.mark.parametrize("shape", [(6, 4), (9, 9), (12, 1), (5, 0)])
def test_hungarian_equals_scipy_and_brute_force(shape) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 10 + shape[1])
    for _ in range(5):
        cost = torch.rand(shape, generator=gen)
        rows, cols = hungarian_match(cost)
        ref_rows, ref_cols = linear_sum_assignment(cost.double().numpy())
        assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()
        assert sorted(cols.tolist()) == list(range(shape[1]))
        if shape[1] and shape[0] <= 6:  # the optimum, by trying every assignment
            best = min(sum(cost[q, n] for n, q in enumerate(p)) for p in itertools.permutations(range(shape[0]),
                                                                                               shape[1]))
            assert float(cost[rows, cols].sum()) == pytest.approx(float(best), abs=1e-6)


def test_hungarian_bad_input() -> None:
    with pytest.raises(ValueError, match="3 targets but only 2 queries"):
        hungarian_match(torch.rand(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(torch.tensor([[float("nan")]]))


def test_matching_finds_the_right_query_and_loss_rewards_it() -> None:
    target = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])
    labels = torch.tensor([2, 0])
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.9, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]])
    logits = torch.full((4, 3), -4.0)
    logits[3, 2] = logits[1, 0] = 4.0
    rows, cols = hungarian_match(match_cost(logits, boxes, labels, target))
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 3, 1: 1}
    good = set_criterion(logits[None], boxes[None], [(labels, target)])
    bad = set_criterion(logits.flip(0)[None] * 0, boxes.flip(1)[None], [(labels, target)])
    assert good["l1"] == pytest.approx(0, abs=1e-6) and good["giou"] == pytest.approx(0, abs=1e-6)
    assert all(bad[k] > good[k] for k in good)


def _batch(n: int = 4, size: int = 32) -> dict:
    from difffeat.data.coco import SceneDetection, collate_detection

    return collate_detection([SceneDetection(n, size=size, classes=[0, 1, 2])[i] for i in range(n)])


@pytest.mark.parametrize("head", ["set", "dense"])
def test_forward_backward_frozen_backbone(unet_dir, head) -> None:
    adapter = _adapter(unet_dir, head=head)
    before = {k: v.clone() for k, v in adapter.encoder.backbone.state_dict().items()}
    terms = adapter.loss(_batch())
    assert torch.isfinite(terms["loss"]) and terms["loss"] > 0
    terms["loss"].backward()
    grads = [p.grad for p in adapter.head.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in adapter.encoder.backbone.parameters())
    opt = adapter.configure_optimizers()
    opt.step()
    assert all(torch.equal(v, adapter.encoder.backbone.state_dict()[k]) for k, v in before.items())
    assert not any(k.startswith("encoder.") for k in adapter.state_dict())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in adapter.head.parameters()}


@pytest.mark.parametrize("head", ["set", "dense"])
def test_adapter_learns_and_predicts_from_taps(unet_dir, head) -> None:
    from difffeat.data.coco import SceneDetection

    adapter = _adapter(unet_dir, lr=3e-3, head=head)
    data = SceneDetection(4, size=32, classes=[0, 1, 2])
    losses = fit_adapter(adapter, data, steps=60, batch_size=4, progress=False)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    batch = _batch()
    ref = adapter.predict(batch["image"], score_threshold=0.0)
    raw = adapter.encoder.extractor(batch["image"])  # the taps at their own resolution
    got = adapter.predict_taps({layer: v for (layer, _), v in raw.items()}, (32, 32), score_threshold=0.0)
    for r, g in zip(ref, got, strict=True):
        assert torch.allclose(r["boxes"], g["boxes"], atol=1e-4) and torch.equal(r["labels"], g["labels"])
        assert (r["boxes"][:, 2:] >= r["boxes"][:, :2]).all() and r["boxes"].max() <= 32
    with pytest.raises(KeyError, match="not recorded"):
        adapter.predict_taps({}, (32, 32))


def test_adapter_bad_categories(unet_dir) -> None:
    with pytest.raises(ValueError, match="distinct"):
        DetectionAdapter(str(unet_dir), ["mid_block"], 20, ["a", "a"])
    with pytest.raises(KeyError, match="valid"):
        DetectionAdapter(str(unet_dir), ["mid_block"], 20, ["a"], head="yolo")


def test_config_fast_dev_run(unet_dir, tmp_path) -> None:
    from difffeat.cli import main

    config = Path(__file__).parents[2] / "configs" / "detection_adapter.yaml"
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1", "--model.backbone", str(unet_dir),
          "--model.layers", "[mid_block, up_blocks.0, up_blocks.1]", "--model.width", "32",
          "--data.size", "32", "--data.batch_size", "2", "--trainer.default_root_dir", str(tmp_path)])
