"""Decoding checks for stored images: what an ingest accepts, and why it refuses the rest."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message is the reason recorded for the user."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    color_mode: str
    format: str


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode `data` (a truncated file only fails when its pixels are read) and describe it."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; we want one clear limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(f"image too large: {width}x{height} pixels is over the limit of {max_pixels}")
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
