"""CT standardization metrics: PSNR / SSIM on the HU range, GLCM and first-order features in ROIs, CCC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.feature import graycomatrix, graycoprops

from difffeat.data.ct import make_phantom, tissue_labels
from heads.ct_metrics import (
    DATA_RANGE_HU,
    FEATURE_NAMES,
    GLCM_PROPS,
    CTStandardizationMetrics,
    concordance,
    first_order,
    glcm_features,
    psnr_ssim,
    texture_features,
)


def test_psnr_ssim_on_hu_range() -> None:
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:24, 8:24] = 500
    psnr, ssim = psnr_ssim(target + 20, target)
    assert DATA_RANGE_HU == 2048
    assert psnr[0].item() == pytest.approx(10 * math.log10(2048 ** 2 / 400), abs=1e-4)
    assert psnr_ssim(target, target)[1].tolist() == pytest.approx([1.0, 1.0])
    # values beyond +1024 HU are clipped in both images: bone at 3000 vs 1024 is no error
    bone = target.clone()
    bone[:, :, 0, 0] = 3000
    clipped = target.clone()
    clipped[:, :, 0, 0] = 1024
    assert torch.equal(psnr_ssim(bone + 20, target)[0], psnr_ssim(clipped + 20, target)[0])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        psnr_ssim(target[0], target[0])
    assert ssim[0] < 1


def test_glcm_matches_skimage_on_full_roi_and_ignores_outside() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 60, (24, 24))
    roi = np.ones_like(hu, bool)
    got = glcm_features(hu, roi, (-160, 240))
    q = np.clip(np.floor((hu + 160) / 25), 0, 15).astype(np.uint8)
    ref = graycomatrix(q, [1, 2], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=16, symmetric=True)
    np.testing.assert_allclose(got, [graycoprops(ref, p).mean() for p in GLCM_PROPS], rtol=1e-10)
    part = np.zeros_like(roi)
    part[4:20, 4:20] = True
    a = glcm_features(hu, part, (-160, 240))
    other = hu.copy()
    other[~part] = 5000  # outside the ROI: no influence
    np.testing.assert_array_equal(a, glcm_features(other, part, (-160, 240)))
    assert not np.allclose(a, got)
    assert np.isnan(glcm_features(hu, np.zeros_like(roi), (-160, 240))).all()
    smooth = np.full_like(hu, 40.0) + np.linspace(0, 30, 24)[None]
    assert glcm_features(hu, roi, (-160, 240))[0] > glcm_features(smooth, roi, (-160, 240))[0]  # noise: contrast up


def test_first_order_and_vector() -> None:
    v = np.arange(100, dtype=float).reshape(10, 10)
    roi = np.ones_like(v, bool)
    fo = first_order(v, roi)
    assert fo[0] == pytest.approx(49.5) and fo[1] == pytest.approx(v.std()) and fo[2] == pytest.approx(0, abs=1e-12)
    assert np.isnan(first_order(v, np.zeros_like(roi))).all()
    hu = make_phantom("chest", 64, 0, 0)
    f = texture_features(hu, tissue_labels(hu))
    assert f.shape == (len(FEATURE_NAMES),) and np.isfinite(f).all()
    assert f[FEATURE_NAMES.index("lung.fo.mean")] == pytest.approx(-850, abs=30)
    sl = make_phantom("shepp_logan", 64, 0, 2)
    g = texture_features(sl, tissue_labels(sl))
    assert np.isfinite(g[FEATURE_NAMES.index("soft_tissue.glcm.contrast")])


def test_concordance() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, len(FEATURE_NAMES)))
    same = concordance(x, x)
    assert all(v == pytest.approx(1.0) for v in same.values())
    shifted = concordance(x + 1.0, x)
    assert all(v < 0.9 for v in shifted.values())
    assert concordance(-x, x)[FEATURE_NAMES[0]] < 0
    holes = x.copy()
    holes[:18, 0] = np.nan  # two pairs left: NaN
    holes[:5, 1] = np.nan  # fifteen left: computed on those
    c = concordance(holes, x)
    assert math.isnan(c[FEATURE_NAMES[0]]) and c[FEATURE_NAMES[1]] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tables of one shape"):
        concordance(x[:, :3], x[:, :3])


def test_metric_accumulates_like_one_pass() -> None:
    phantoms = [make_phantom("chest", 64, 0, i) for i in range(6)]
    target = torch.tensor(np.stack(phantoms))[:, None]
    labels = torch.tensor(np.stack([tissue_labels(p) for p in phantoms]))
    pred = target + torch.randn(target.shape, generator=torch.Generator().manual_seed(0)) * 30
    one = CTStandardizationMetrics()
    one.update(pred, target, labels)
    two = CTStandardizationMetrics()
    two.update(pred[:4], target[:4], labels[:4])
    two.update(pred[4:], target[4:], labels[4:])
    a, b = one.compute(), two.compute()
    assert a.keys() == b.keys() and {"psnr", "ssim", "ccc_mean"} <= set(a)
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k]), k
    perfect = CTStandardizationMetrics()
    perfect.update(target, target, labels)
    assert perfect.compute()["ccc_mean"] == pytest.approx(1.0) and a["ccc_mean"] < 1
