"""Metrics core against independent references: scikit-learn for ROC/AUROC/F1, a brute-force
threshold sweep (skimage connected components) for PRO/AUPRO, and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.measure
import sklearn.metrics

from pipelines.evaluation import metrics

SEEDS = [0, 1, 2, 3, 4]


def _tied_sample(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    scores = np.round(rng.random(n) + 0.4 * labels, 1)  # ~15 distinct values: many ties
    return labels, scores


# ---- ROC / AUROC ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_roc_curve_matches_sklearn_with_ties(seed):
    labels, scores = _tied_sample(seed)
    curve = metrics.roc_curve(labels.astype(int), scores)
    fpr, tpr, thresholds = sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)
    np.testing.assert_allclose(curve.thresholds, thresholds[1:])  # sklearn's first is +inf: (0, 0)
    assert len(curve.thresholds) == len(np.unique(scores))
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_sklearn_with_ties(seed):
    labels, scores = _tied_sample(seed)
    assert metrics.auroc(labels, scores) == pytest.approx(sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_hand_cases():
    labels = np.array([0, 0, 1, 1])
    assert metrics.auroc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.auroc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert metrics.auroc(labels, np.full(4, 0.5)) == 0.5
    # One anomaly above everything, one tied with one of two normals: (1 + 0.5) / 2 ... per pair:
    # pairs (a, n): (0.9, 0.1)=1, (0.9, 0.5)=1, (0.5, 0.1)=1, (0.5, 0.5)=0.5 -> 3.5 / 4.
    assert metrics.auroc(labels, np.array([0.1, 0.5, 0.5, 0.9])) == 0.875
    # Infinite scores tie with each other too.
    assert metrics.auroc(np.array([1, 0, 0]), np.array([np.inf, np.inf, 0.0])) == 0.75


def test_roc_errors():
    with pytest.raises(ValueError, match="both classes"):
        metrics.auroc(np.zeros(3, int), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc_curve(np.ones(3, bool), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="shape"):
        metrics.auroc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="shape"):
        metrics.auroc(np.array([[0, 1, 0]]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc(np.array([0, 1, 0]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match="0/1"):
        metrics.auroc(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]))


# ---- F1-max ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_matches_brute_force(seed):
    labels, scores = _tied_sample(seed)
    sweep = {t: sklearn.metrics.f1_score(labels, scores >= t) for t in np.unique(scores)}
    best = max(sweep.values())
    result = metrics.f1_max(labels, scores)
    assert result.f1 == pytest.approx(best, abs=1e-12)
    assert result.threshold == max(t for t, f1 in sweep.items() if f1 == pytest.approx(best, abs=1e-12))
    predicted = scores >= result.threshold
    assert result.precision == pytest.approx(sklearn.metrics.precision_score(labels, predicted))
    assert result.recall == pytest.approx(sklearn.metrics.recall_score(labels, predicted))


def test_f1_max_hand_cases():
    # t=0.8: P=1, R=2/3, F1=0.8; t=0.4: 2/3; t=0.35: P=3/4, R=1, F1=6/7; t=0.1: P=3/5, R=1, F1=0.75.
    result = metrics.f1_max(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8, 0.8]))
    assert (result.threshold, result.precision, result.recall) == (0.35, 0.75, 1.0)
    assert result.f1 == pytest.approx(6 / 7)
    # A tie cannot be split: both samples enter together.
    tied = metrics.f1_max(np.array([True, False]), np.array([0.5, 0.5]))
    assert (tied.precision, tied.recall, tied.threshold) == (0.5, 1.0, 0.5)
    assert tied.f1 == pytest.approx(2 / 3)


# ---- pixel AUROC ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_auroc_matches_sklearn(seed):
    masks, maps = _pixel_sample(seed)
    expected = sklearn.metrics.roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


# ---- PRO / AUPRO ----------------------------------------------------------------------------

def _pixel_sample(seed: int, n: int = 4, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Masks with several (diagonally touching, differently sized) regions per image, the last
    image normal; maps rounded to one decimal, so many pixels tie."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < 0.15
    masks[:, 4:7, 4:9] = True  # at least one larger region per image
    masks[-1] = False
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 1)
    return masks, maps


def _brute_force_pro_points(masks, maps):
    """(fpr, pro) at (0, 0) and at every distinct threshold, descending, straight from the definition."""
    region_maps = []  # (that image's map, the region's pixels) for every region of every image
    for image_mask, image_map in zip(masks, maps):
        labelled = skimage.measure.label(image_mask, connectivity=2)
        region_maps += [(image_map, labelled == k) for k in range(1, labelled.max() + 1)]
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        above = maps >= t
        fpr = np.sum(above & ~masks) / np.sum(~masks)
        pro = np.mean([np.sum((image_map >= t) & region) / np.sum(region) for image_map, region in region_maps])
        points.append((fpr, pro))
    return points


def _brute_force_aupro(masks, maps, fpr_limit):
    """Integrate segment by segment, each clipped to [0, fpr_limit] with linear interpolation."""
    points = _brute_force_pro_points(masks, maps)
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    masks, maps = _pixel_sample(seed)
    assert not masks[-1].any() and masks[:-1].any()
    expected = _brute_force_aupro(masks, maps, fpr_limit)
    assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_pro_curve_points_match_brute_force(seed):
    masks, maps = _pixel_sample(seed)
    points = np.array(_brute_force_pro_points(masks, maps))
    inside = points[points[:, 0] <= 0.3]
    curve = metrics.pro_curve(masks, maps, 0.3)
    np.testing.assert_allclose(curve.fpr[: len(inside)], inside[:, 0], atol=1e-12)
    np.testing.assert_allclose(curve.pro[: len(inside)], inside[:, 1], atol=1e-12)
    assert curve.fpr[-1] == 0.3 and len(curve.fpr) in (len(inside), len(inside) + 1)
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.pro) >= 0)


def test_aupro_hand_cases():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 0:2, 0:2] = True
    masks[1, 3, 3] = True
    # Perfect: every anomalous pixel above every normal one.
    assert metrics.aupro(masks, masks * 0.9 + 0.05) == 1.0
    # Constant map: one threshold, the curve is the diagonal (0,0)-(1,1); PRO(0.3) = 0.3,
    # area = 0.3 * 0.3 / 2 = 0.045, divided by 0.3 -> 0.15.
    assert metrics.aupro(masks, np.full(masks.shape, 0.7)) == pytest.approx(0.15)
    # An image with an empty mask only adds normal pixels: same value.
    padded_masks = np.concatenate([masks, np.zeros((1, 4, 4), bool)])
    assert metrics.aupro(padded_masks, np.full(padded_masks.shape, 0.7)) == pytest.approx(0.15)


def test_aupro_averages_regions_not_pixels():
    # 8-connectivity: (0,0) touches (1,1) diagonally, (1,2) is beside (1,1): one region of 3 pixels
    # (4-connectivity would make two). Only (0,0) scores high.
    mask = np.zeros((1, 4, 4), bool)
    mask[0, [0, 1, 1], [0, 1, 2]] = True
    maps = np.zeros(mask.shape)
    maps[0, 0, 0] = 1.0
    curve = metrics.pro_curve(mask, maps, 0.3)
    # Points: (0, 0); t=1: (0, 1/3); t=0: (1, 1) -> interpolated at 0.3: 1/3 + 0.3 * 2/3 = 8/15.
    np.testing.assert_allclose(curve.fpr, [0.0, 0.0, 0.3])
    np.testing.assert_allclose(curve.pro, [0.0, 1 / 3, 8 / 15])
    assert metrics.aupro(mask, maps) == pytest.approx((1 / 3 + 8 / 15) / 2)
    # Two separate regions of 1 and 4 pixels, only the small one found at t=1: PRO = 1/2 there
    # (pixel recall would be 1/5); at 0.3: 0.5 + 0.3 * 0.5 = 0.65; area / 0.3 = (0.5 + 0.65) / 2.
    mask = np.zeros((1, 5, 5), bool)
    mask[0, 0, 0] = True
    mask[0, 3:5, 3:5] = True
    maps = np.where(np.arange(25).reshape(1, 5, 5) == 0, 1.0, 0.0)
    assert metrics.aupro(mask, maps) == pytest.approx(0.575)


def test_aupro_errors():
    maps = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="no anomalous region"):
        metrics.aupro(np.zeros((2, 3, 3), bool), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        metrics.aupro(np.ones((2, 3, 3), bool), maps)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metrics.aupro(np.ones((2, 3, 3), bool), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metrics.pixel_auroc(np.ones((3, 3), bool), np.zeros((3, 3)))
    masks = np.zeros((2, 3, 3), bool)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="NaN"):
        metrics.aupro(masks, np.where(masks, np.nan, 0.0))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(masks, maps, fpr_limit=0.0)
