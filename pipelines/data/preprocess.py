"""Decode stored image bytes into the fixed-size RGB arrays models take, and encode arrays back
into the PNG bytes the stages store (pure: no Ray, no torch).

Grayscale is replicated to three channels, 16-bit images are scaled to 8 bits by their bit depth,
alpha is dropped (composited over black), and the result is resized to `size x size` with an
antialiased bilinear filter. Failures raise `ImageDecodeError` with the reason for the row.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from pipelines.data.images import inspect_image
from pipelines.data.limits import DEFAULT_MAX_PIXELS


def to_rgb8(image: Image.Image) -> Image.Image:
    # Integer and float32 arithmetic, in place where possible: float64 copies of a large 16-bit
    # image cost 8 bytes a pixel each (see DECODE_BYTES_PER_PIXEL).
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array: np.ndarray = np.asarray(image).astype(np.int32 if image.mode == "I" else np.uint32)  # 65535 * 255 fits
        peak = 65535 if image.mode.startswith("I;16") or array.max() > 255 else 255
        np.clip(array, 0, peak, out=array)
        array *= 255
        array += peak // 2
        array //= peak  # round(value / peak * 255)
        image = Image.fromarray(array.astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32).copy()
        low = float(array.min())
        span = max(float(array.max()) - low, 1e-12)
        array -= low
        array *= 255.0 / span
        array += 0.5
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    return image.convert("RGB")


def decode_rgb(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> (size, size, 3) uint8."""
    inspect_image(data, max_pixels)  # the full decode check, with the reasons users see
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            rgb = to_rgb8(image)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(rgb, dtype=np.uint8)


def encode_png(pixels: np.ndarray, optimize: bool = False) -> bytes:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> PNG bytes. The stages' datasets use the default
    (fast, deterministic bytes); reports pass `optimize` for smaller pages."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(
        buffer, format="PNG", optimize=optimize)
    return buffer.getvalue()


def decode_mask(data: bytes | None, size: int) -> np.ndarray | None:
    """Mask PNG -> (size, size) bool (nearest resize, so edges stay binary), or None."""
    if not data:
        return None
    with Image.open(io.BytesIO(data)) as image:
        mask = image.convert("L")
        if mask.size != (size, size):
            mask = mask.resize((size, size), Image.Resampling.NEAREST)
        return np.asarray(mask) > 127
