import math

import numpy as np
import py_sod_metrics as sod
import pytest
import torch
from torchmetrics.utilities.data import dim_zero_cat

from heads.dis_metrics import DIS_METRIC_NAMES, DISMetrics, dis_image_scores, to_reference_images


def _blob(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _dataset(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(float32 probability map, bool mask) pairs of several sizes, with the corner cases of the reference."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i, (h, w) in enumerate([(24, 32), (24, 32), (17, 21), (30, 30), (24, 32), (9, 40), (24, 32), (20, 20)]):
        gt = _blob(h, w, h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-3, 3), min(h, w) / 3)
        gt[1, 1:-1] = True  # a one-pixel-wide line: its skeleton matters to HCE
        if i == 4:
            gt[:] = True  # all-foreground ground truth
        if i == 5:
            gt[:] = False  # all-background ground truth
        soft = np.clip(0.8 * gt + rng.normal(0, 0.25, (h, w)), 0, 1)
        soft[rng.random((h, w)) < 0.03] = 1.0  # scattered false positives
        if i == 6:
            soft[:] = 0.4  # a constant map: the reference does not min-max normalise it
        pairs.append((soft.astype(np.float32), gt))
    return pairs


def _reference(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """PySODMetrics run as its own evaluation loop over 8-bit images (pred bytes, 0/255 masks)."""
    mae, wfm, sm, em, hce = sod.MAE(), sod.WeightedFmeasure(), sod.Smeasure(), sod.Emeasure(), \
        sod.HumanCorrectionEffortMeasure()
    fm = sod.FmeasureV2({"fm": sod.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3)})
    for pred, gt in pairs:
        pred8 = (pred * 255).astype(np.uint8) if pred.dtype != np.uint8 else pred
        gt8 = gt.astype(np.uint8) * 255
        for evaluator in (mae, wfm, sm, em, hce, fm):
            evaluator.step(pred8, gt8)
    f, e = fm.get_results()["fm"], em.get_results()["em"]
    return {"fm_max": f["dynamic"].max(), "fm_mean": f["dynamic"].mean(), "fm_adp": f["adaptive"],
            "wfm": wfm.get_results()["wfm"], "mae": mae.get_results()["mae"], "sm": sm.get_results()["sm"],
            "em_adp": e["adp"], "em_mean": e["curve"].mean(), "em_max": e["curve"].max(),
            "hce": hce.get_results()["hce"]}


def _feed(metric: DISMetrics, pairs, batch_sizes=None) -> None:
    """Same-size runs as (B, 1, H, W) batches, or every image as its own (1, H, W) list item."""
    if batch_sizes is None:
        metric.update([torch.from_numpy(p)[None] for p, _ in pairs], [torch.from_numpy(g)[None] for _, g in pairs])
        return
    start = 0
    for b in batch_sizes:
        chunk = pairs[start:start + b]
        start += b
        if len({p.shape for p, _ in chunk}) == 1:
            metric.update(torch.from_numpy(np.stack([p for p, _ in chunk]))[:, None],
                          torch.from_numpy(np.stack([g for _, g in chunk])))
        else:
            metric.update([torch.from_numpy(p) for p, _ in chunk], [torch.from_numpy(g) for _, g in chunk])
    assert start == len(pairs)


def _assert_scores(got: dict[str, torch.Tensor], want: dict[str, float], tol: float = 1e-12) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float64
        assert math.isclose(float(got[name]), float(want[name]), rel_tol=tol, abs_tol=tol), \
            (name, float(got[name]), float(want[name]))


def test_matches_pysodmetrics_on_one_pass():
    pairs = _dataset()
    metric = DISMetrics()
    _feed(metric, pairs)
    got, want = metric.compute(), _reference(pairs)
    assert tuple(got) == DIS_METRIC_NAMES
    for name in want:  # same per-image values in the same order: the very same floats
        assert float(got[name]) == float(want[name]), name
    assert 0 < float(got["fm_max"]) <= 1 and float(got["hce"]) > 0


@pytest.mark.parametrize("case", ["all_foreground", "all_background"])
def test_degenerate_ground_truth_matches_reference(case):
    rng = np.random.default_rng(1)
    gt = np.full((12, 15), case == "all_foreground")
    pairs = [(rng.random((12, 15)).astype(np.float32), gt), (np.zeros((12, 15), np.float32), gt)]
    metric = DISMetrics()
    _feed(metric, pairs, [2])
    got, want = metric.compute(), _reference(pairs)
    _assert_scores(got, want)
    if case == "all_background":
        assert float(got["wfm"]) == 0.0  # the reference's convention for empty ground truth
    per_image = dis_image_scores(*[(p * 255).astype(np.uint8) for p in [pairs[1][0]]], gt.astype(np.uint8) * 255)
    # an all-zero prediction: S-measure is 1 - mean(p) = 1 on empty ground truth, mean(p) = 0 on full
    assert float(per_image["sm"]) == (0.0 if case == "all_foreground" else 1.0)


def test_uint8_predictions_are_the_png_bytes_and_floats_truncate():
    pairs = _dataset(2)[:3]
    as_uint8 = [((p * 255).astype(np.uint8), g) for p, g in pairs]
    a, b = DISMetrics(), DISMetrics()
    _feed(a, pairs)
    _feed(b, as_uint8)
    _assert_scores(a.compute(), b.compute(), tol=0)
    pred, _ = to_reference_images(torch.tensor([[[0.0, 0.999, 1.0, 0.5]]]), torch.tensor([[[0, 1, 1, 0]]]))[0]
    assert pred.tolist() == [[0, 254, 255, 127]]


def test_uneven_batches_equal_one_pass():
    pairs = _dataset(3)
    reordered = [pairs[i] for i in (0, 1, 4, 6, 2, 3, 5, 7)]  # runs of equal sizes batch as tensors
    one, batched = DISMetrics(), DISMetrics()
    _feed(one, reordered)
    _feed(batched, reordered, [1, 3, 2, 1, 1])
    _assert_scores(batched.compute(), one.compute(), tol=0)
    assert batched.num_images == len(pairs)


def test_merged_halves_equal_one_pass():
    pairs = _dataset(4)
    whole, first, second = DISMetrics(), DISMetrics(), DISMetrics()
    _feed(whole, pairs)
    _feed(first, pairs[:5], [2, 3])
    _feed(second, pairs[5:], [1, 2])
    first.merge_state(second)
    _assert_scores(first.compute(), whole.compute(), tol=0)


def test_simulated_ddp_cat_of_states_equals_one_pass():
    pairs = _dataset(5)
    ranks = [DISMetrics(), DISMetrics()]
    _feed(ranks[0], pairs[0::2])  # a DistributedSampler-like deal
    _feed(ranks[1], pairs[1::2])
    gathered = DISMetrics()
    for name, reduce in gathered._reductions.items():
        assert reduce is dim_zero_cat, name  # every state is gathered by concatenation
        setattr(gathered, name, torch.cat([dim_zero_cat(getattr(r, name)) for r in ranks]))
    reordered = pairs[0::2] + pairs[1::2]
    assert gathered.num_images == len(pairs)
    # a different image order only reorders the final float64 sums
    _assert_scores(gathered.compute(), _reference(reordered), tol=0)
    _assert_scores(gathered.compute(), _reference(pairs), tol=1e-12)


def test_without_hce_and_reset():
    pairs = _dataset(6)[:2]
    metric = DISMetrics(with_hce=False)
    _feed(metric, pairs)
    got = metric.compute()
    assert "hce" not in got and set(got) == set(DIS_METRIC_NAMES) - {"hce"}
    want = _reference(pairs)
    _assert_scores(got, {k: v for k, v in want.items() if k != "hce"})
    metric.reset()
    with pytest.raises(RuntimeError, match="before any image"):
        metric.compute()


@pytest.mark.parametrize(("preds", "target", "error", "match"), [
    (torch.rand(2, 8, 8), torch.zeros(2, 8, 9), ValueError, r"\(8, 8\) and ground truth \(8, 9\)"),
    (torch.rand(2, 8, 8), torch.zeros(3, 8, 8), ValueError, "2 predictions but 3"),
    (torch.rand(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), ValueError, "3 channels"),
    (torch.rand(8, 8), torch.zeros(8, 8), ValueError, r"\(B, H, W\) or \(B, 1, H, W\)"),
    (torch.full((1, 4, 4), 1.5), torch.zeros(1, 4, 4), ValueError, r"probabilities in \[0, 1\].*1\.5"),
    (torch.full((1, 4, 4), -0.1), torch.zeros(1, 4, 4), ValueError, r"\[0, 1\]"),
    (torch.full((1, 4, 4), float("nan")), torch.zeros(1, 4, 4), ValueError, r"\[0, 1\]"),
    (torch.zeros(1, 4, 4, dtype=torch.int64), torch.zeros(1, 4, 4), TypeError, "uint8"),
    (torch.rand(1, 4, 4), torch.full((1, 4, 4), 255, dtype=torch.uint8), ValueError, r"binary.*\[255\]"),
    (torch.rand(1, 4, 4), torch.full((1, 4, 4), 0.5), ValueError, "binary"),
    ([torch.rand(4, 4)], [torch.zeros(4, 5)], ValueError, "image 0"),
])
def test_bad_input_raises_and_leaves_state_unchanged(preds, target, error, match):
    metric = DISMetrics()
    with pytest.raises(error, match=match):
        metric.update(preds, target)
    assert metric.num_images == 0


def test_bad_image_late_in_batch_adds_nothing():
    metric = DISMetrics()
    preds = [torch.rand(6, 6), torch.rand(6, 6), torch.full((6, 6), 2.0)]
    with pytest.raises(ValueError, match="prediction 2"):
        metric.update(preds, [torch.zeros(6, 6, dtype=torch.bool)] * 3)
    assert metric.num_images == 0


def test_bool_and_float_binary_ground_truth_agree():
    pairs = _dataset(7)[:2]
    a, b = DISMetrics(), DISMetrics()
    preds = [torch.from_numpy(p) for p, _ in pairs]
    a.update(preds, [torch.from_numpy(g) for _, g in pairs])
    b.update(preds, [torch.from_numpy(g).float()[None] for _, g in pairs])
    _assert_scores(a.compute(), b.compute(), tol=0)



def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pairs = _dataset(8)
        for split in (5, 8):  # 8: the second process sees no image at all
            metric = DISMetrics()
            mine = pairs[:split] if rank == 0 else pairs[split:]
            if mine:
                _feed(metric, mine)
            scores = metric.compute()  # torchmetrics gathers the states of both processes here
            torch.save({k: float(v) for k, v in scores.items()}, f"{out}.{split}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_pass(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "scores")
    # fork: the workers inherit the imports (spawning re-imports torch, OpenCV … in each, ~20 s)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True, start_method="fork")
    want = _reference(_dataset(8))
    for split in (5, 8):
        for rank in range(2):
            got = torch.load(f"{out}.{split}.{rank}")
            assert set(got) == set(want)
            for name in want:
                assert math.isclose(got[name], float(want[name]), rel_tol=1e-12, abs_tol=1e-12), (split, rank, name)
