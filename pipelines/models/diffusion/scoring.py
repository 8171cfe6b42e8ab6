"""Anomaly maps from a trained diffusion network (pure torch): the per-pixel KL of one reverse step
(Lu et al., "Removing Anomalies as Noises for Industrial Defect Localization", ICCV 2023).

For a clean image x0 and a timestep i of the respaced chain, x_i is drawn from q(x_i | x0); the
model's reverse step p(x_{i-1} | x_i) is compared with the true posterior q(x_{i-1} | x_i, x0).
Both are Gaussians per pixel, so their KL is closed-form. Where the image is normal the network
predicts the noise well and the two agree; where it is not (a scratch, a stain) the network
"removes" the anomaly as if it were noise, its mean moves away from the posterior's and the KL
rises. The KL is that of the bound's term L_{i-1} (`process.Diffusion._vlb_terms`), kept per pixel
instead of averaged.

All timesteps of a batch go through the U-Net in one call (K x B images): on a GPU one large call
is cheaper than K small ones, and on a CPU it is the same work.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipelines.data.sampling import draw_seed
from pipelines.models.diffusion.process import Diffusion, _normal_kl

_LOG2 = math.log(2.0)


def noise_for(row_ids: Sequence[str], purpose: str, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard normal noise, row b's from a CPU generator seeded by (purpose, seed, row
    id): an image gets the same noise in any batch, on any worker, in any rerun."""
    out = torch.empty((len(row_ids), *shape))
    for row, row_id in enumerate(row_ids):
        generator = torch.Generator().manual_seed(draw_seed(purpose, seed, row_id))
        out[row] = torch.randn(shape, generator=generator)
    return out


def noised(diffusion: Diffusion, x0: torch.Tensor, indices: Sequence[int], noise: torch.Tensor) -> torch.Tensor:
    """x_i ~ q(x_i | x0) for every respaced index i of `indices`: (B, K, C, H, W) from x0 (B, C, H, W)
    and noise (B, K, C, H, W)."""
    batch, count = x0.shape[0], len(indices)
    if noise.shape != (batch, count, *x0.shape[1:]):
        raise ValueError(f"noise must be {(batch, count, *x0.shape[1:])}, got {tuple(noise.shape)}")
    t = torch.as_tensor(list(indices), dtype=torch.long, device=x0.device).repeat(batch)
    flat = diffusion.q_sample(x0.repeat_interleave(count, dim=0), t, noise.reshape(batch * count, *x0.shape[1:]))
    return flat.view(batch, count, *x0.shape[1:])


@torch.no_grad()
def reverse_step_outputs(model: nn.Module, diffusion: Diffusion, timesteps: Sequence[int], x0: torch.Tensor,
                         indices: Sequence[int], noise: torch.Tensor,
                         autocast_dtype: torch.dtype | None = None,
                         class_labels: torch.Tensor | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(the network's output object, x_i, i) for every image and respaced index i of `indices`
    (each >= 1), flattened image-major to B*K rows: x_i as `noised`, the network called once with
    timesteps[i] (and, for a class-conditional network, each image's class of `class_labels` (B,)).
    The output object is the network's own (`.sample`, and `.features` for a U-Net with a feature
    head), its tensors in whatever dtype the network ran in."""
    if any(not 1 <= i < diffusion.num_timesteps for i in indices):
        raise ValueError(f"indices must be in 1..{diffusion.num_timesteps - 1}, got {list(indices)}")
    batch = x0.shape[0]
    xt = noised(diffusion, x0, indices, noise).flatten(0, 1)
    index = torch.as_tensor(list(indices), dtype=torch.long, device=x0.device).repeat(batch)
    model_t = torch.as_tensor([timesteps[i] for i in indices], dtype=torch.long, device=x0.device).repeat(batch)
    # None: no autocast of its own (an enclosing one, e.g. a benchmark's, still applies)
    autocast = torch.autocast(x0.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    labels = None if class_labels is None else class_labels.to(x0.device).repeat_interleave(len(indices))
    with autocast:
        output = model(xt, model_t, class_labels=labels)
    return output, xt, index


def kl_from_outputs(diffusion: Diffusion, x0: torch.Tensor, xt: torch.Tensor, index: torch.Tensor,
                    output: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) float32 per-pixel KL in bits from `reverse_step_outputs`' rows and the U-Net's
    output tensor (`.sample`); K = rows / B."""
    count = xt.shape[0] // x0.shape[0]
    output = output.float()  # the KL of small differences in float32 whatever the U-Net ran in
    repeated = x0.repeat_interleave(count, dim=0)
    true_mean, _, true_log_variance = diffusion.posterior_mean_variance(repeated, xt, index)
    mean, _, log_variance, _ = diffusion.p_mean_variance(output, xt, index)
    kl = _normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dim=1) / _LOG2
    return kl.view(x0.shape[0], count, *x0.shape[-2:])


@torch.no_grad()
def posterior_kl_maps(model: nn.Module, diffusion: Diffusion, timesteps: Sequence[int], x0: torch.Tensor,
                      indices: Sequence[int], noise: torch.Tensor,
                      autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, K, H, W) float32: KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)) per pixel, averaged over
    the channels, in bits, for each respaced index i of `indices` (each >= 1).

    `diffusion` is the respaced chain and `timesteps` its training timesteps (`samplers.respaced`):
    the network is called with timesteps[i]. x0 in [-1, 1]; noise as `noised`.
    """
    output, xt, index = reverse_step_outputs(model, diffusion, timesteps, x0, indices, noise, autocast_dtype)
    return kl_from_outputs(diffusion, x0, xt, index, output.sample)
