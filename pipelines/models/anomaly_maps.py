"""What detectors share to turn feature-grid errors into anomaly maps and image scores (pure torch).

- `gaussian_blur`: the smoothing of an upsampled map (sigma 4 px, scipy's reflect borders and
  truncate 4), as PaDiM's and PFM's reference code smooth theirs.
- `image_scores`: a map to one score per image. ``max`` is the papers' choice and sees the most
  anomalous spot (a local defect); ``mean`` averages every position, so it rises with a change that
  is everywhere but small at each place (a global defect: a recoloured or rescaled texture).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pipelines.models.methods import IMAGE_SCORES

ImageScore = Literal["max", "mean"]


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = int(4 * sigma + 0.5)  # scipy's truncate=4.0
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflected borders."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def top_mean(maps: torch.Tensor, count: int) -> torch.Tensor:
    """(B, H, W) maps -> (B,): the mean of each map's `count` highest values (all, if it has fewer);
    between `max` (count 1) and `mean` (count H*W)."""
    flat = maps.flatten(1)
    return flat.topk(min(count, flat.shape[1]), dim=1).values.mean(dim=1)


def image_scores(maps: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, H, W) maps -> (B,) image scores."""
    if reduction == "max":
        return maps.amax(dim=(1, 2))
    if reduction == "mean":
        return maps.mean(dim=(1, 2))
    raise ValueError(f"unknown image score {reduction!r}; expected one of {', '.join(IMAGE_SCORES)}")
