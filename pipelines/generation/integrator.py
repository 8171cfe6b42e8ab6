"""The knowledge integrator (CVPR 2024 text-guided generation): generate candidate sets of normal
images with a variance-aware generator, score each set, keep the best. Pure torch/numpy, no Ray.

Each round the generator first adapts toward the category's real images (a few Adam steps of MSE
between its reconstructions and them: the paper keeps updating it so), then makes `per_image`
images from every real image by decoding the per-patch mean latent of augmented copies of it.
The set is scored as a whole:

- `clip`: cosine between the set's mean (unit) image embedding and the chosen prompt's text
  embedding, the paper's criterion;
- `features`: how close the set's mean feature is to the real images' (distance, negated) plus
  `diversity_weight` times the mean pairwise distance within the set, since a set of copies of
  the inputs would otherwise win; features are unit-normalised first.

The generator is whatever implements the "generate" capability of the method contract:
`adapt(model, images, steps, lr, seed) -> model` (a new model; the input is left alone) and
`vary(model, images, copies, generator) -> images`, images (B, 3, S, S) in [0, 1].
Every random draw is seeded from (seed, key, round, source image id, copy), so a rerun gives the
same images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.data.sampling import draw_seed


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def clip_set_score(image_embeddings: np.ndarray, text_embedding: np.ndarray) -> float:
    return float(_unit(_unit(image_embeddings).mean(axis=0)) @ _unit(text_embedding))


def features_set_score(image_embeddings: np.ndarray, real_embeddings: np.ndarray, diversity_weight: float) -> float:
    generated, real = _unit(image_embeddings), _unit(real_embeddings)
    distance = float(np.linalg.norm(generated.mean(axis=0) - real.mean(axis=0)))
    n = len(generated)
    pairwise = np.linalg.norm(generated[:, None] - generated[None], axis=-1)
    diversity = float(pairwise.sum() / (n * (n - 1))) if n > 1 else 0.0
    return -distance + diversity_weight * diversity


@dataclass(frozen=True)
class IntegratorSettings:
    per_image: int
    copies: int
    rounds: int
    adapt_steps: int
    adapt_lr: float
    diversity_weight: float


@dataclass
class GeneratedSet:
    images: torch.Tensor  # (N, 3, S, S) in [0, 1], N = sources x per_image, source-major
    source_index: list[int]  # which real image each came from
    copy_index: list[int]
    seeds: list[int]
    best_round: int
    round_scores: list[float] = field(default_factory=list)


def seed_of(seed: int, key: str, round_index: int, source_id: str, copy: int) -> int:
    return draw_seed("generate", seed, f"{key}:{round_index}:{source_id}:{copy}")


def integrate(implementation: Any, model: Any, sources: torch.Tensor, source_ids: Sequence[str],
              settings: IntegratorSettings, embed_images: Callable[[torch.Tensor], np.ndarray],
              set_score: Callable[[np.ndarray], float], seed: int, key: str) -> GeneratedSet:
    """The best of `settings.rounds` generated sets; `key` (the category) separates the seeds of
    categories generated with one spec."""
    best: GeneratedSet | None = None
    scores: list[float] = []
    current = model
    for round_index in range(settings.rounds):
        if settings.adapt_steps:
            current = implementation.adapt(current, sources, settings.adapt_steps, settings.adapt_lr,
                                           seed=draw_seed("generate-adapt", seed, f"{key}:{round_index}"))
        images, source_index, copy_index, seeds = [], [], [], []
        for index, source_id in enumerate(source_ids):
            for copy in range(settings.per_image):
                image_seed = seed_of(seed, key, round_index, source_id, copy)
                generator = torch.Generator(device=sources.device).manual_seed(image_seed)
                images.append(implementation.vary(current, sources[index:index + 1], settings.copies, generator))
                source_index.append(index)
                copy_index.append(copy)
                seeds.append(image_seed)
        batch = torch.cat(images).clamp(0, 1)
        score = float(set_score(embed_images(batch)))
        scores.append(score)
        if best is None or score > max(scores[:-1]):
            best = GeneratedSet(batch, source_index, copy_index, seeds, round_index)
    assert best is not None  # rounds >= 1 (validated)
    best.round_scores = scores
    return best
