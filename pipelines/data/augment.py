"""Training-time augmentation of decoded images (pure: numpy + PIL, no Ray, no torch).

Every random choice comes from a generator seeded by (seed, image_id, epoch), so an epoch's
augmented images are the same whichever worker or task computes them, and a rerun sees the same
data. DiffAD trains with a random rotation of up to 5 degrees; flips are optional (right for many
textures, wrong for oriented parts).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image


def augmentation_rng(seed: int, image_id: str, epoch: int) -> np.random.Generator:
    digest = hashlib.sha256(f"augment:{seed}:{epoch}:{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def rotate_and_flip(pixels: np.ndarray, degrees: float, hflip: bool, vflip: bool) -> np.ndarray:
    """Rotate an (H, W, C) uint8 image about its centre (bilinear, corners filled with black, as
    torchvision's RandomRotation does), then flip. Same shape and dtype out."""
    out = pixels
    if degrees:
        out = np.asarray(Image.fromarray(out).rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0))
    if hflip:
        out = out[:, ::-1]
    if vflip:
        out = out[::-1]
    return np.ascontiguousarray(out)


def augment_batch(batch: dict[str, np.ndarray], *, seed: int, epoch: int, max_rotation: float, hflip: bool,
                  vflip: bool) -> dict[str, np.ndarray]:
    """map_batches UDF over decoded rows: a random rotation in [-max_rotation, max_rotation]
    degrees and, where enabled, a flip with probability 1/2 each. Undecodable rows pass unchanged
    (their `error` is set; the consumer skips and counts them)."""
    pixels = batch["pixels"].copy()
    # Training pairs (`pipelines.data.synthetic_pairs`): the clean image and the mask move with the image.
    clean = batch["clean"].copy() if "clean" in batch else None
    masks = batch["mask"].copy() if "mask" in batch else None
    for index, image_id in enumerate(batch["image_id"]):
        if batch["error"][index]:
            continue
        rng = augmentation_rng(seed, str(image_id), epoch)
        degrees = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation else 0.0
        flip_h, flip_v = rng.random() < 0.5, rng.random() < 0.5
        moves = (degrees, hflip and flip_h, vflip and flip_v)
        pixels[index] = rotate_and_flip(pixels[index], *moves)
        if clean is not None:
            clean[index] = rotate_and_flip(clean[index], *moves)
        if masks is not None and masks[index].any():
            masks[index] = rotate_and_flip(masks[index].astype(np.uint8) * 255, *moves) > 127
    return {**batch, "pixels": pixels, **({"clean": clean} if clean is not None else {}),
            **({"mask": masks} if masks is not None else {})}
