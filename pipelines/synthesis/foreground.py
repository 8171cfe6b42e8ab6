"""Object foreground masks: where on an object image a synthetic anomaly may be placed.

RealNet (docs/methods.md#foreground-masks) intersects its Perlin masks with the object's foreground for object
categories (textures use the whole image). The foreground is a global gray-level threshold, Otsu's
or the triangle method, both computed here from the 256-bin histogram, then cleaned by a binary
closing (fills small holes and gaps) and an opening (drops specks) with square structuring
elements. The morphology runs on the mask padded by replicating its edge, so a foreground that
touches the image border is not eaten away there.

An empty result (a blank image, or a threshold that selects nothing) gives an all-True mask: the
foreground only restricts where anomalies go and must never block synthesis.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

# ITU-R BT.601 luma, the weights of PIL's "L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 -> (H, W) uint8 (BT.601 luma, rounded half to even)."""
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W) or (H, W, 3), got {image.shape}")
    return np.clip(np.rint(image @ _LUMA), 0, 255).astype(np.uint8)


def otsu_threshold(histogram: np.ndarray) -> int:
    """Otsu's threshold of a 256-bin gray-level histogram: the level t maximising the
    between-class variance w0 w1 (mu0 - mu1)^2 of the classes <= t and > t (the first such t)."""
    counts = np.asarray(histogram, dtype=np.float64)
    levels = np.arange(counts.size, dtype=np.float64)
    w0 = np.cumsum(counts)[:-1]  # class "<= t" for t = 0 .. 254
    total = counts.sum()
    w1 = total - w0
    s0 = np.cumsum(counts * levels)[:-1]
    s1 = (counts * levels).sum() - s0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - s1 / w1) ** 2
    between = np.where((w0 > 0) & (w1 > 0), between, -1.0)
    if between.max() < 0:  # one gray level: nothing above it
        return int(np.flatnonzero(counts)[-1]) if total else 0
    return int(np.argmax(between))


def triangle_threshold(histogram: np.ndarray) -> int:
    """Triangle method (Zack, Rogers & Latt 1977) on a 256-bin gray-level histogram.

    A line joins the histogram's peak to the far end of its longer tail (the last non-empty bin on
    that side; the dark side on a tie); the threshold is the bin between them (tail end included,
    peak excluded) whose top lies farthest below that line, the one nearest the tail end on a tie.
    Returned as a level t with the class above being `gray > t` (the knee bin itself is below).
    """
    counts = np.asarray(histogram, dtype=np.float64)
    filled = np.flatnonzero(counts)
    if filled.size == 0:
        return 0
    low, high = int(filled[0]), int(filled[-1])
    if low == high:
        return low
    peak = int(np.argmax(counts))
    if peak - low >= high - peak:  # the longer tail is on the dark side
        end, bins = low, np.arange(low, peak)
    else:
        end, bins = high, np.arange(high, peak, -1)
    # Signed distance below the line through (end, 0) and (peak, counts[peak]), up to a factor.
    distance = counts[peak] * np.abs(bins - end) - abs(peak - end) * counts[bins]
    return int(bins[np.argmax(distance)])


def foreground_mask(image: np.ndarray, method: Literal["otsu", "triangle"] = "otsu", invert: bool = False,
                    closing: int = 3, opening: int = 3) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 image -> (H, W) bool foreground.

    Gray levels above the threshold (below or equal with `invert`, for dark objects on a bright
    background) are foreground; then a binary closing with a `closing` x `closing` square and an
    opening with an `opening` x `opening` square (0 or 1: skipped). An empty result is all True.
    """
    if method not in ("otsu", "triangle"):
        raise ValueError(f"method must be 'otsu' or 'triangle', got {method!r}")
    for name, value in (("closing", closing), ("opening", opening)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    gray = to_gray(image)
    histogram = np.bincount(gray.ravel(), minlength=256)
    threshold = otsu_threshold(histogram) if method == "otsu" else triangle_threshold(histogram)
    mask = gray <= threshold if invert else gray > threshold
    pad = max(closing, opening)
    if pad > 1:
        padded = np.pad(mask, pad, mode="edge")
        if closing > 1:
            padded = ndimage.binary_closing(padded, structure=np.ones((closing, closing), dtype=bool))
        if opening > 1:
            padded = ndimage.binary_opening(padded, structure=np.ones((opening, opening), dtype=bool))
        mask = padded[pad:-pad, pad:-pad]
    if not mask.any():
        return np.ones(gray.shape, dtype=bool)
    return np.ascontiguousarray(mask)
