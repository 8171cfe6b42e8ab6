"""Blending an anomaly source into a normal image under a mask (RealNet, docs/methods.md#the-blend).

    A = (1 - M) * I + (1 - delta) * (M * I) + delta * (M * P)

with I the image, P the anomaly source, M the binary mask and delta the opacity. Outside the mask
A is I; inside it is `(1 - delta) * I + delta * P`, computed in float32, rounded half to even
(`np.rint`) and clipped to uint8. The output starts as a copy of the image and only the masked
pixels are written, so every pixel outside the mask is bit-identical to the input by construction.
"""

from __future__ import annotations

import math

import numpy as np


def blend(image: np.ndarray, mask: np.ndarray, source: np.ndarray, opacity: float) -> np.ndarray:
    """(H, W, C) uint8 image and source, (H, W) bool mask, opacity delta in [0, 1] -> (H, W, C) uint8."""
    if image.dtype != np.uint8 or source.dtype != np.uint8:
        raise ValueError(f"image and source must be uint8, got {image.dtype} and {source.dtype}")
    if image.ndim != 3 or source.shape != image.shape:
        raise ValueError(f"image and source must both be (H, W, C), got {image.shape} and {source.shape}")
    if mask.dtype != np.bool_ or mask.shape != image.shape[:2]:
        raise ValueError(f"mask must be bool {image.shape[:2]}, got {mask.dtype} {mask.shape}")
    if isinstance(opacity, bool) or not (math.isfinite(opacity) and 0 <= opacity <= 1):
        raise ValueError(f"opacity must be in [0, 1], got {opacity!r}")
    delta = np.float32(opacity)
    out = image.copy()
    inside = (np.float32(1) - delta) * image[mask].astype(np.float32) + delta * source[mask].astype(np.float32)
    out[mask] = np.clip(np.rint(inside), 0, 255).astype(np.uint8)
    return out


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels where any channel differs between two (H, W, C) or (H, W) images."""
    if before.shape != after.shape:
        raise ValueError(f"images differ in shape: {before.shape} and {after.shape}")
    differs = before != after
    return differs.any(axis=-1) if differs.ndim == 3 else differs
