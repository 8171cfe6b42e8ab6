"""Sampling from a trained network: ancestral sampling (Ho et al. 2020) over respaced timesteps
(improved DDPM, Nichol & Dhariwal 2021, sec. 4) with RealNet's SDAS strength s, which scales the
noise term by sqrt(1 + s) (0 gives normal samples).

`sample` returns uint8 images, `sample_tensor` the float images before quantisation. Other
samplers (DDIM, guided) belong in modules of their own beside this one, reusing the respacing here
and `process.Diffusion`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import UNet2DModel

from pipelines.models.diffusion.config import DdpmConfig
from pipelines.models.diffusion.process import Diffusion
from pipelines.models.diffusion.unet import check_class_labels


def _respaced_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """diffusers' "leading" spacing, ascending: 0, r, 2r, ..., (steps-1) r with r = T // steps.
    It always ends the chain at t = 0, so the last step is the true decoder step."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps} (the training timesteps), got {steps}")
    ratio = num_train_timesteps // steps
    return [i * ratio for i in range(steps)]


def respaced(config: DdpmConfig, steps: int) -> tuple[Diffusion, list[int]]:
    """The chain over the kept timesteps s_0 < s_1 < ...: beta_i = 1 - ab[s_i] / ab[s_{i-1}] (ab[s_-1]
    = 1), so its cumulative products are the original ab at the kept steps (improved DDPM sec. 4)."""
    timesteps = _respaced_timesteps(config.num_train_timesteps, steps)
    alphas_cumprod = Diffusion(config).alphas_cumprod[timesteps]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return Diffusion._with_betas(config, 1.0 - alphas_cumprod / previous), timesteps


def _p_sample_step(diffusion: Diffusion, model_output, x, index: int, noise,
                   variance_scale: float | torch.Tensor) -> torch.Tensor:
    """x_{t-1} = mean + sqrt(1 + s) * sigma * noise at respaced index `index`; no noise at index 0.
    `variance_scale` is one s, or one per image (a (N,) tensor)."""
    t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
    mean, _, log_variance, _ = diffusion.p_mean_variance(model_output, x, t, clip_x0=True)
    if index == 0:
        return mean
    if isinstance(variance_scale, torch.Tensor):
        scale: torch.Tensor | float = torch.sqrt(1.0 + variance_scale.to(x.device, torch.float32)).view(-1, 1, 1, 1)
    else:
        scale = math.sqrt(1.0 + variance_scale)
    return mean + scale * torch.exp(0.5 * log_variance) * noise


def _normal(generator: torch.Generator | Sequence[torch.Generator], start: int, n: int, shape: tuple[int, ...],
            device: str) -> torch.Tensor:
    """(n, *shape) standard normal noise: from one generator, or row i from its own generator
    `generator[start + i]` (so that an image's noise does not depend on the others in its batch)."""
    if isinstance(generator, torch.Generator):
        return torch.randn((n, *shape), generator=generator, device=generator.device).to(device)
    return torch.stack([torch.randn(shape, generator=g, device=g.device).to(device)
                        for g in generator[start:start + n]])


@torch.no_grad()
def sample_tensor(model: UNet2DModel, config: DdpmConfig, count: int, steps: int,
                   generator: torch.Generator | Sequence[torch.Generator], class_labels=None,
                   variance_scale: float | Sequence[float] = 0.0, device: str = "cpu",
                   batch_size: int = 16) -> torch.Tensor:
    """`sample` before quantisation: float32 (count, C, H, W) in [-1, 1], on `device`."""
    if count < 0 or batch_size < 1:
        raise ValueError(f"need count >= 0 and batch_size >= 1, got {count} and {batch_size}")
    if not isinstance(generator, torch.Generator) and len(generator) != count:
        raise ValueError(f"one generator per image: got {len(generator)} for {count} images")
    scales = [variance_scale] if isinstance(variance_scale, (int, float)) else list(variance_scale)
    if not isinstance(variance_scale, (int, float)) and len(scales) != count:
        raise ValueError(f"one variance_scale per image: got {len(scales)} for {count} images")
    if not all(math.isfinite(s) and s >= 0 for s in scales):
        raise ValueError(f"variance_scale (SDAS strength) must be finite numbers >= 0, got {variance_scale}")
    labels = check_class_labels(config, class_labels, count, device)
    diffusion, timesteps = respaced(config, steps)
    shape = (config.in_channels, config.image_size, config.image_size)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            chunk_labels = None if labels is None else labels[start:start + n]
            chunk_scale = variance_scale if isinstance(variance_scale, (int, float)) else \
                torch.tensor(scales[start:start + n], dtype=torch.float32)
            x = _normal(generator, start, n, shape, device)
            for index in reversed(range(len(timesteps))):
                t = torch.full((n,), timesteps[index], dtype=torch.long, device=device)
                output = model(x, t, class_labels=chunk_labels).sample.float()
                noise = None
                if index > 0:  # drawn after the forward, like diffusers' DDPMScheduler.step
                    noise = _normal(generator, start, n, shape, device)
                x = _p_sample_step(diffusion, output, x, index, noise, chunk_scale)
            chunks.append(x)
        return torch.cat(chunks) if chunks else torch.empty((0, *shape), device=device)
    finally:
        model.train(was_training)


def sample(model: UNet2DModel, config: DdpmConfig, count: int, steps: int,
           generator: torch.Generator | Sequence[torch.Generator], class_labels: torch.Tensor | None = None,
           variance_scale: float | Sequence[float] = 0.0, device: str = "cpu", batch_size: int = 16) -> np.ndarray:
    """Ancestral sampling over `steps` timesteps spaced like diffusers' default ("leading":
    0, r, ..., (steps-1) r with r = T // steps), as uint8 (count, H, W, C).

    Predicted x0 is clipped to [-1, 1]; the variance is the respaced posterior variance, or the
    learned interpolation between it and the respaced beta. `variance_scale` is RealNet's SDAS
    strength s: the noise term is multiplied by sqrt(1 + s) (0 gives normal samples). Deterministic
    given `generator` (all noise is drawn from it, on its device, then moved to `device`). With one
    generator (and one s) per image, each image's noise depends only on its own generator.
    """
    images = sample_tensor(model, config, count, steps, generator, class_labels, variance_scale, device, batch_size)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
