"""Decoding checks for stored images: what an ingest accepts, and why it refuses the rest."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from pipelines.data.limits import DEFAULT_MAX_PIXELS

# What decoding one image may hold in memory. A pixel limit alone is not a memory bound: a 124 KB
# 16-bit 7999x7999 PNG passes 64 M pixels and once took 1.66 GB to decode. 512 MiB admits 8-bit
# RGB and grayscale up to the pixel limit, 16-bit up to about 38 M pixels, RGBA up to 28 M.
DEFAULT_MAX_DECODE_BYTES = 512 * 2**20
# Bytes per pixel that decoding to 8-bit RGB (`pipelines.data.preprocess.decode_rgb`) holds at its
# peak, by PIL mode: PIL's own buffer (RGB is stored in 4 bytes), each conversion's copy, and
# the final array (3 bytes). Modes not listed count as the most expensive.
DECODE_BYTES_PER_PIXEL = {"1": 8, "L": 8, "P": 8, "RGB": 7, "CMYK": 11, "YCbCr": 11, "LAB": 11, "HSV": 11,
                          "I;16": 14, "I;16L": 14, "I;16B": 14, "I;16N": 14, "I": 16, "F": 16,
                          "RGBA": 19, "RGBa": 19, "LA": 19, "La": 19, "PA": 19}
WORST_DECODE_BYTES_PER_PIXEL = 20


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message is the reason recorded for the user."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    color_mode: str
    format: str


def decode_bytes(width: int, height: int, mode: str) -> int:
    """About how many bytes decoding a `width x height` image of PIL `mode` holds at its peak."""
    return width * height * DECODE_BYTES_PER_PIXEL.get(mode, WORST_DECODE_BYTES_PER_PIXEL)


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> ImageInfo:
    """Fully decode `data` (a truncated file only fails when its pixels are read) and describe it.

    Both limits are checked from the header, before any pixel is decoded."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want one clear limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image too large: {width}x{height} pixels is over the limit of {max_pixels}")
                needed = decode_bytes(width, height, image.mode)
                if needed > max_bytes:
                    raise ImageDecodeError(
                        f"image too large: decoding this {width}x{height} {image.mode} image would take about "
                        f"{needed / 2**20:.0f} MiB, over the limit of {max_bytes / 2**20:.0f} MiB")
                if width == 0 or height == 0:
                    raise ImageDecodeError(f"image has no pixels ({width}x{height})")
                image.load()
                return ImageInfo(width=width, height=height, color_mode=image.mode, format=image.format or "")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image too large: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated", "broken PNG file").
        raise ImageDecodeError(f"cannot decode image: {error}") from None
