"""Reconstructing an image with a trained network (pure torch): CGDDM's conditioned, blur-guided
denoising from a partially noised copy of the image (METHODS: CGDDM; the guidance is Hong et al.,
ICCV 2023, "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance").

The chain is deterministic DDIM (Song et al. 2021, eta = 0) over `steps` respaced timesteps
(`samplers.respaced`), started at index `start` with x_start drawn from q(x_start | y) for the input
y, not from pure noise: the network only has to repair what the noise hid, so a normal image comes
back close to itself and an anomaly comes back as what a normal image would hold there.

At every step, with eps the network's noise prediction at x_t:

- **Conditioning** toward the input: eps <- eps - w sqrt(1 - ab_t) (y_t - x_t), with y_t the input
  noised to t by the same starting noise. The predicted x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
  then moves toward y by w (1 - ab_t) / sqrt(ab_t) (y_t - x_t): the trajectory is pulled back to the
  input where it drifts, without copying it (w = 0: plain DDIM).
- **Blur guidance** (for indices at most `guidance_below`): the predicted x0 is blurred (Gaussian,
  `blur_sigma`), noised back to t with eps, and run through the network again; eps <-
  eps_blur + s (eps - eps_blur). With s > 1 the step moves away from what the network predicts for
  a detail-free image, sharpening the reconstruction's fine texture (s = 1: off). One more network
  call per guided step.

The learned-variance channels, if any, are unused: DDIM with eta = 0 has no variance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.models.anomaly_maps import gaussian_blur
from pipelines.models.diffusion.process import Diffusion


@dataclass(frozen=True)
class Guidance:
    condition_scale: float = 1.0  # w
    guidance_scale: float = 1.0  # s: 1 = no blur guidance
    blur_sigma: float = 3.0  # px
    guidance_below: int = 0  # blur guidance at respaced indices <= this (small t)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    batch, channels = images.shape[:2]
    return gaussian_blur(images.flatten(0, 1), sigma).view(batch, channels, *images.shape[2:])


def _eps(model: nn.Module, x: torch.Tensor, timestep: int, channels: int,
         autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The network's noise prediction, in float32 whatever it ran in (the chain's arithmetic stays float32)."""
    t = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
    with torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
        return model(x, t).sample[:, :channels].float()


@torch.no_grad()
def reconstruct(model: nn.Module, diffusion: Diffusion, timesteps: list[int], images: torch.Tensor,
                noise: torch.Tensor, start: int, guidance: Guidance,
                autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """(reconstructions (B, C, H, W) in [-1, 1], network calls made) of images in [-1, 1].

    `diffusion`/`timesteps`: the respaced chain (`samplers.respaced`); `start`: its index to start
    from (1 .. len - 1); `noise` (B, C, H, W): the starting noise (seeded per image by the caller);
    `autocast_dtype`: the network calls only run under autocast in it (bf16 on a GPU).
    """
    if not 1 <= start < diffusion.num_timesteps:
        raise ValueError(f"start must be an index in 1..{diffusion.num_timesteps - 1}, got {start}")
    channels = images.shape[1]
    ab = diffusion.alphas_cumprod.to(torch.float64)
    x = diffusion.q_sample(images, torch.full((images.shape[0],), start, dtype=torch.long), noise)
    calls = 0
    for index in range(start, -1, -1):
        a_t = float(ab[index])
        a_prev = float(ab[index - 1]) if index > 0 else 1.0  # unused at index 0
        eps = _eps(model, x, timesteps[index], channels, autocast_dtype)
        calls += 1
        if guidance.condition_scale:
            y_t = a_t ** 0.5 * images + (1 - a_t) ** 0.5 * noise
            eps = eps - guidance.condition_scale * (1 - a_t) ** 0.5 * (y_t - x)
        if guidance.guidance_scale != 1.0 and index <= guidance.guidance_below:
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            blurred = a_t ** 0.5 * _blur(x0, guidance.blur_sigma) + (1 - a_t) ** 0.5 * eps
            eps_blur = _eps(model, blurred, timesteps[index], channels, autocast_dtype)
            calls += 1
            eps = eps_blur + guidance.guidance_scale * (eps - eps_blur)
        x0 = ((x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5).clamp(-1, 1)
        if index == 0:
            return x0, calls
        eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5  # the noise consistent with the clamped x0
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x, calls
