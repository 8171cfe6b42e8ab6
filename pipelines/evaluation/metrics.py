"""Anomaly detection metrics, pure numpy/scipy: ROC/AUROC, F1-max, pixel AUROC, PRO/AUPRO.

Ties are exact everywhere: all samples with the same score enter the curve together (one point
per distinct threshold; "score >= threshold" is predicted anomalous). AUPRO follows MVTec AD:
regions are the 8-connected components of each ground-truth mask; at each threshold PRO is the
mean over all regions of the fraction of the region at or above it, FPR the fraction of all normal
pixels (of all images) at or above it; the PRO-over-FPR curve is integrated (trapezoid) from 0 to
`fpr_limit`, the point at exactly `fpr_limit` interpolated, and divided by `fpr_limit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


@dataclass(frozen=True, eq=False)
class RocCurve:
    """One point per distinct threshold, from (0, 0) to (1, 1).

    `thresholds[i]` (descending) gives the point `(fpr[i + 1], tpr[i + 1])`; point 0 is "nothing
    is positive", so `len(fpr) == len(tpr) == len(thresholds) + 1`.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


@dataclass(frozen=True, eq=False)
class F1Result:
    f1: float
    threshold: float  # a score value; "score >= threshold" is anomalous
    precision: float
    recall: float


@dataclass(frozen=True, eq=False)
class ProCurve:
    """PRO against FPR from (0, 0) up to and including FPR == fpr_limit (interpolated there)."""

    fpr: np.ndarray
    pro: np.ndarray


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError(f"{what} contain {int(np.isnan(scores).sum())} NaN value(s)")
    return scores


def _check_labels(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.shape != np.shape(scores):
        raise ValueError(f"labels and scores differ in shape: {labels.shape} vs {np.shape(scores)}")
    scores = _check_scores(scores, "scores").ravel()
    labels = labels.ravel()
    if labels.dtype != bool:
        bad = ~np.isin(labels, (0, 1))
        if bad.any():
            raise ValueError(f"labels must be 0/1 (or bool); found {np.unique(labels[bad])[:5].tolist()}")
        labels = labels.astype(bool)
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        raise ValueError(f"both classes are needed; got {positives} anomalous and "
                         f"{labels.size - positives} normal samples")
    return labels, scores


def _tie_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal values in a sorted array."""
    return np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1]


def _counts_at_thresholds(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with the true and false positive counts of `score >= t`."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    ends = _tie_ends(sorted_scores)
    true_positives = np.cumsum(labels[order])[ends]
    false_positives = (ends + 1) - true_positives
    return sorted_scores[ends], true_positives, false_positives


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> RocCurve:
    """Exact ROC curve of `scores` (higher = more anomalous) against 0/1 `labels`."""
    labels, scores = _check_labels(labels, scores)
    thresholds, tp, fp = _counts_at_thresholds(labels, scores)
    return RocCurve(fpr=np.r_[0.0, fp / np.count_nonzero(~labels)],
                    tpr=np.r_[0.0, tp / np.count_nonzero(labels)], thresholds=thresholds)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the exact ROC curve (trapezoid; a tie counts one half)."""
    curve = roc_curve(labels, scores)
    return float(np.trapezoid(curve.tpr, curve.fpr))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> F1Result:
    """The best F1 over all thresholds `score >= t`, t a score value (the highest such t on ties)."""
    labels, scores = _check_labels(labels, scores)
    thresholds, tp, fp = _counts_at_thresholds(labels, scores)
    precision = tp / (tp + fp)  # tp + fp >= 1: every threshold is some sample's score
    recall = tp / np.count_nonzero(labels)
    f1 = 2 * tp / (2 * tp + fp + (np.count_nonzero(labels) - tp))
    best = int(np.argmax(f1))
    return F1Result(float(f1[best]), float(thresholds[best]), float(precision[best]), float(recall[best]))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels: `masks` (N, H, W) bool ground truth, `maps` (N, H, W) scores."""
    masks, maps = _check_masks_maps(masks, maps)
    return auroc(masks.ravel(), maps.ravel())


def _check_masks_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks and maps must both be (N, H, W); got {masks.shape} and {maps.shape}")
    if masks.dtype != bool:
        bad = ~np.isin(masks, (0, 1))
        if bad.any():
            raise ValueError(f"masks must be 0/1 (or bool); found {np.unique(masks[bad])[:5].tolist()}")
        masks = masks.astype(bool)
    return masks, _check_scores(maps, "anomaly maps")


def pro_curve(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> ProCurve:
    """The PRO curve (one point per distinct map value) up to FPR == `fpr_limit`."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    masks, maps = _check_masks_maps(masks, maps)

    # 1. Number the regions (8-connected components) of all images consecutively; 0 = normal.
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    regions = 0
    for i, mask in enumerate(masks):
        labelled, count = scipy.ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_ids[i] = np.where(labelled > 0, labelled + regions, 0)
        regions += count
    normal_pixels = np.count_nonzero(~masks)
    if regions == 0:
        raise ValueError("the ground-truth masks have no anomalous region")
    if normal_pixels == 0:
        raise ValueError("the ground-truth masks have no normal pixel")

    # 2. Sort pixels by score once; at each distinct threshold (end of a tie run) read off
    #    FPR = normal pixels so far / all normal pixels, and
    #    PRO = sum over regions of (region pixels so far / region size) / number of regions,
    #    i.e. a cumulative sum in which each anomalous pixel weighs 1 / (its region's size * regions).
    flat_regions = region_ids.ravel()
    order = np.argsort(-maps.ravel(), kind="stable")
    sorted_regions = flat_regions[order]
    ends = _tie_ends(maps.ravel()[order])
    sizes = np.bincount(flat_regions, minlength=regions + 1)
    weights = np.where(sorted_regions > 0, 1.0 / (sizes[sorted_regions] * regions), 0.0)
    fpr = np.r_[0.0, np.cumsum(sorted_regions == 0)[ends] / normal_pixels]
    pro = np.r_[0.0, np.minimum(np.cumsum(weights)[ends], 1.0)]  # clip float round-off

    # 3. Cut at fpr_limit; interpolate linearly between the points either side of it.
    inside = np.count_nonzero(fpr <= fpr_limit)  # fpr is non-decreasing: a prefix
    fpr_cut, pro_cut = fpr[:inside], pro[:inside]
    if fpr_cut[-1] < fpr_limit:  # then fpr[inside] > fpr_limit exists, since fpr[-1] == 1
        before, after = inside - 1, inside
        share = (fpr_limit - fpr[before]) / (fpr[after] - fpr[before])
        fpr_cut = np.r_[fpr_cut, fpr_limit]
        pro_cut = np.r_[pro_cut, pro[before] + share * (pro[after] - pro[before])]
    return ProCurve(fpr=fpr_cut, pro=pro_cut)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (1.0 is perfect)."""
    curve = pro_curve(masks, maps, fpr_limit)
    return float(np.trapezoid(curve.pro, curve.fpr) / fpr_limit)
