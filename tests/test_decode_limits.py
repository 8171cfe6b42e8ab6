"""Decoding is bounded in pixels and in bytes, checked from the header before any pixel is read."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imagefiles import encode
from pipelines.data.images import DEFAULT_MAX_DECODE_BYTES, ImageDecodeError, decode_bytes, inspect_image
from pipelines.data.preprocess import decode_rgb, to_rgb8


def test_a_small_16_bit_png_of_huge_size_is_refused_before_decoding():
    """124 KB on disk, 64 M pixels (under the pixel limit), about 0.85 GiB to decode."""
    code = """
import io, resource, sys, time
import numpy as np
from PIL import Image
from pipelines.data.images import ImageDecodeError
from pipelines.data.preprocess import decode_rgb
buffer = io.BytesIO()
Image.fromarray(np.zeros((7999, 7999), np.uint16)).save(buffer, format="PNG")
data = buffer.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
try:
    decode_rgb(data, 256)
    print("decoded")
except ImageDecodeError as error:
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"{len(data)} {time.monotonic() - start:.3f} {grown} {error}")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    size, seconds, grown_kib, message = out.stdout.strip().split(" ", 3)
    assert int(size) < 200_000
    assert "7999x7999 I;16 image would take about 854 MiB, over the limit of 512 MiB" in message
    assert float(seconds) < 0.5 and int(grown_kib) < 50_000  # refused from the header: nothing decoded


@pytest.mark.parametrize("mode,allowed_pixels", [("L", 64_000_000), ("RGB", 64_000_000), ("I;16", 38_347_922),
                                                 ("RGBA", 28_256_363)])
def test_the_byte_limit_is_smaller_for_16_bit_and_alpha_images(mode, allowed_pixels):
    assert decode_bytes(allowed_pixels, 1, mode) <= DEFAULT_MAX_DECODE_BYTES
    assert decode_bytes(allowed_pixels + 1, 1, mode) > DEFAULT_MAX_DECODE_BYTES or mode in ("L", "RGB")


def test_an_explicit_byte_limit_is_an_error_row_reason():
    data = encode(Image.fromarray(np.zeros((100, 100, 3), np.uint8)))
    assert inspect_image(data, max_bytes=7 * 100 * 100).width == 100
    with pytest.raises(ImageDecodeError, match=r"100x100 RGB image would take about 0 MiB, over the limit"):
        inspect_image(data, max_bytes=7 * 100 * 100 - 1)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_conversion_matches_the_float_formula(mode):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (40, 30))
    image = Image.fromarray(values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]),
                            mode if mode != "I;16" else None)
    got = np.asarray(to_rgb8(image))[..., 0].astype(int)
    if mode == "F":
        expected = (values - values.min()) / (values.max() - values.min()) * 255.0 + 0.5
    else:
        expected = np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255)
    assert np.abs(got - expected.astype(np.uint8)).max() <= (1 if mode == "F" else 0)
    assert decode_rgb(encode(image.convert("I;16") if mode == "I;16" else image.convert("L")), 16).shape == (16, 16, 3)


@pytest.mark.parametrize("shape", [(24, 24, 3), (24, 24, 1), (24, 24)])
def test_the_stages_png_encoder_is_lossless_and_reads_back_as_rgb(shape):
    """`encode_png` (what sample, synthesize and generate store) round-trips through the decoder
    the scorers use: colour exactly, grey (2-D or one channel) replicated to three channels."""
    from pipelines.data.preprocess import encode_png

    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    png = encode_png(pixels)
    assert png.startswith(b"\x89PNG")
    grey = pixels.reshape(24, 24, -1)
    assert np.array_equal(decode_rgb(png, 24), np.broadcast_to(grey, (24, 24, 3)))
    assert encode_png(pixels) == png  # the same bytes every time (reruns are byte-identical)
