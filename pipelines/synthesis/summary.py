"""Pictures that tell whether a synthetic dataset looks right (pure: numpy, PIL, matplotlib)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

OVERLAY_COLOUR = np.array([255, 40, 40], np.float32)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the mask tinted red (outline-free, so thin masks stay visible)."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * OVERLAY_COLOUR
    return np.rint(out).clip(0, 255).astype(np.uint8)


def contact_sheet_png(images: list[np.ndarray], masks: list[np.ndarray], captions: list[str],
                      tile: int = 128) -> bytes:
    """One row per example: image | mask | overlay, each `tile` px, captioned; PNG bytes."""
    caption_height = 14
    sheet = Image.new("RGB", (3 * tile, max(1, len(images)) * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (image, mask, caption) in enumerate(zip(images, masks, captions)):
        top = row * (tile + caption_height)
        panels = [image, np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2), overlay(image, mask)]
        for column, panel in enumerate(panels):
            sheet.paste(Image.fromarray(panel).resize((tile, tile), Image.Resampling.NEAREST),
                        (column * tile, top + caption_height))
        draw.text((2, top + 1), f"{caption}  coverage {mask.mean():.1%}", fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def coverage_histogram_png(coverages: list[float], per_source: dict[str, int]) -> bytes:
    """Histogram of the fraction of each image inside its mask, with the counts per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3), dpi=100)
    axis.hist(coverages, bins=20, range=(0, 1), color="#c0392b")
    axis.set_xlabel("mask coverage (fraction of the image)")
    axis.set_ylabel("synthetic images")
    axis.set_title(", ".join(f"{k}: {v}" for k, v in sorted(per_source.items())) or "no synthetic images",
                   fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
