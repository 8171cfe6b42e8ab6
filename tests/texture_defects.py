"""Real texture images with defects made in the test (shared by the detector tests): crops of
scikit-image's brick wall; a *local* defect (a patch of another texture, grass) and a *global* one
(the whole weave rescaled: every patch still looks like brick, the statistics of the image do not).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from imagefiles import write

SIZE = 128  # px of the archive's images


def texture_crops(count: int, size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
    brick = np.stack([skimage.data.brick()[rows]] * 3, -1)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        y, x = rng.integers(0, brick.shape[0] - size), rng.integers(0, brick.shape[1] - size)
        out.append(brick[y:y + size, x:x + size])
    return np.stack(out)


def rescaled(image: np.ndarray, factor: float = 1.6) -> np.ndarray:
    """A global defect: the weave at another scale (every patch still looks like brick)."""
    big = Image.fromarray(image).resize((int(SIZE * factor),) * 2, Image.Resampling.BILINEAR)
    return np.asarray(big)[:SIZE, :SIZE]


def patched(image: np.ndarray, seed: int) -> np.ndarray:
    """A local defect: a 24 px patch of another texture (grass)."""
    grass = np.stack([skimage.data.grass()] * 3, -1)
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, grass.shape[0] - 24, 2)
    out = image.copy()
    py, px = rng.integers(16, SIZE - 40, 2)
    out[py:py + 24, px:px + 24] = grass[y:y + 24, x:x + 24]
    return out


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_brick_archive(folder: Path) -> Path:
    """MVTec layout: 40 normal training crops from the top of the image; test crops from the
    bottom: 10 good, 10 with a grass patch (`patch`), 10 rescaled (`rescaled`)."""
    for i, pixels in enumerate(texture_crops(40, SIZE, seed=0, rows=slice(0, 256))):
        write(folder / "brick" / "train" / "good" / f"{i:03d}.png", png(pixels))
    test = texture_crops(30, SIZE, seed=1, rows=slice(256, None))
    for i in range(10):
        write(folder / "brick" / "test" / "good" / f"{i:03d}.png", png(test[i]))
        write(folder / "brick" / "test" / "patch" / f"{i:03d}.png", png(patched(test[10 + i], seed=i)))
        write(folder / "brick" / "test" / "rescaled" / f"{i:03d}.png", png(rescaled(test[20 + i])))
    return folder


def crops_of(texture: str, count: int, size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
    """`count` random crops of a scikit-image texture (brick, grass, gravel) as RGB."""
    image = np.stack([getattr(skimage.data, texture)()[rows]] * 3, -1)
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, image.shape[0] - size, count)
    xs = rng.integers(0, image.shape[1] - size, count)
    return np.stack([image[y:y + size, x:x + size] for y, x in zip(ys, xs)])


def pasted(image: np.ndarray, donor: np.ndarray, seed: int, side: int = 24) -> np.ndarray:
    """A local defect: a `side` px square of another texture's crop pasted at a random place."""
    rng = np.random.default_rng(seed)
    out = image.copy()
    y, x = rng.integers(8, image.shape[0] - side - 8, 2)
    out[y:y + side, x:x + side] = donor[y:y + side, x:x + side]
    return out


def write_textures_archive(folder: Path, trained: tuple[str, ...], unseen: str, train_count: int = 24) -> Path:
    """MVTec layout with several texture categories: `train_count` normal training crops of each
    (top half of the texture); for the `unseen` one a test split (bottom half): 10 good and 10
    with a square of brick (or grass, for brick) pasted in; for the first trained one a test
    split of 10 good and 10 rescaled 1.6x (a global defect)."""
    for name in (*trained, unseen):
        for i, pixels in enumerate(crops_of(name, train_count, SIZE, seed=0, rows=slice(0, 256))):
            write(folder / name / "train" / "good" / f"{i:03d}.png", png(pixels))
    seen = crops_of(trained[0], 20, SIZE, seed=1, rows=slice(256, None))
    for i in range(10):
        write(folder / trained[0] / "test" / "good" / f"{i:03d}.png", png(seen[i]))
        write(folder / trained[0] / "test" / "rescaled" / f"{i:03d}.png", png(rescaled(seen[10 + i])))
    test = crops_of(unseen, 20, SIZE, seed=1, rows=slice(256, None))
    donors = crops_of("grass" if unseen == "brick" else "brick", 10, SIZE, seed=2)
    for i in range(10):
        write(folder / unseen / "test" / "good" / f"{i:03d}.png", png(test[i]))
        write(folder / unseen / "test" / "patch" / f"{i:03d}.png", png(pasted(test[10 + i], donors[i], seed=i)))
    return folder
