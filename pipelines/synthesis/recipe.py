"""One synthetic anomaly from one normal image: choose a source, make a mask, blend (pure: no Ray).

The recipe is RealNet's: `A = (1-M) * I + (1-delta) * (M * I) + delta * (M * P)` with a Perlin mask
M (optionally inside the object's foreground) and an anomaly source P: a texture crop or an SDAS
diffusion sample. CutPaste and Poisson (NSA-style) sources bring their own patch-shaped mask.
Every random choice comes from generators seeded by (seed, image id, copy index), so a row is
the same whichever worker computes it and a rerun gives the same bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.synthesis.blend import blend
from pipelines.synthesis.foreground import foreground_mask
from pipelines.synthesis.perlin import PerlinConfig, perlin_masks
from pipelines.synthesis.sources import cutpaste_source, poisson_patch_source, texture_source

PERLIN_METHODS = ("texture", "sdas")  # sources blended through a Perlin mask


@dataclass(frozen=True)
class SourcePlan:
    """A source as the recipe needs it (the stage builds these from the spec)."""

    method: str  # texture | sdas | cutpaste | poisson
    weight: float
    opacity: tuple[float, float]  # delta range


@dataclass(frozen=True)
class Synthetic:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    method: str
    opacity: float
    seed: int
    strength: float | None = None  # SDAS s
    coverage: float = 0.0  # fraction of the image inside the mask


def row_seed(seed: int, image_id: str, copy: int) -> int:
    digest = hashlib.sha256(f"synthesize:{seed}:{image_id}:{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # fits int64 (the synthesis struct's seed)


def choose_source(plans: tuple[SourcePlan, ...], rng: np.random.Generator) -> SourcePlan:
    weights = np.array([p.weight for p in plans], float)
    return plans[int(rng.choice(len(plans), p=weights / weights.sum()))]


def resize_rgb(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 -> (H, W, 3) uint8, antialiased bilinear; unchanged when already that size."""
    if pixels.shape[:2] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def synthesize_one(image: np.ndarray, plan: SourcePlan, seed: int, *, perlin: PerlinConfig,
                   foreground: dict[str, Any] | None = None, textures: list[np.ndarray] | None = None,
                   sdas_sample: np.ndarray | None = None, sdas_strength: float | None = None,
                   donor: np.ndarray | None = None) -> Synthetic:
    """Apply `plan` to `image` with the generators of `seed`.

    texture: a crop of one of `textures` through a Perlin mask; sdas: `sdas_sample` (one SDAS
    sample made by the caller, at any size) through a Perlin mask; cutpaste: a jittered patch of the
    image itself; poisson: a patch of `donor` (another normal image) cloned seamlessly.
    `foreground` (keyword arguments of `foreground_mask`) keeps Perlin masks on the object.
    """
    rng = np.random.default_rng(seed)
    size = image.shape[:2]
    delta = float(rng.uniform(*plan.opacity))
    if plan.method in PERLIN_METHODS:
        generator = torch.Generator().manual_seed(seed)
        inside = None
        if foreground is not None:
            inside = torch.from_numpy(foreground_mask(image, **foreground))[None]
        if size[0] != size[1]:
            raise ValueError(f"Perlin masks need square images, got {size}")
        mask = perlin_masks(1, size[0], generator, perlin, foreground=inside)[0].numpy()
        if plan.method == "texture":
            if not textures:
                raise ValueError("the texture source has no textures")
            source = texture_source(textures[int(rng.integers(len(textures)))], size, rng)
        else:
            if sdas_sample is None:
                raise ValueError("the sdas source needs a sample")
            source = resize_rgb(sdas_sample, size)
    elif plan.method == "cutpaste":
        source, mask = cutpaste_source(image, rng)
    elif plan.method == "poisson":
        if donor is None:
            raise ValueError("the poisson source needs a donor image")
        source, mask = poisson_patch_source(image, resize_rgb(donor, size), rng)
    else:
        raise ValueError(f"unknown anomaly source {plan.method!r}")
    blended = blend(image, mask, source, delta)
    return Synthetic(image=blended, mask=mask, method=plan.method, opacity=delta, seed=seed,
                     strength=sdas_strength if plan.method == "sdas" else None,
                     coverage=float(mask.mean()))
