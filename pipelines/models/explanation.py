"""Gradient denoising (Lu et al., ICCV 2023, "Removing Anomalies as Noises for Industrial Defect
Localization"): an explainable reconstruction of an anomalous image. The image is pushed, step by
step, down the gradient of PaDiM's Mahalanobis distance, written as a diffusion forward step whose
noise is the normalised gradient:

    x <- sqrt(1 - s^2) x - s g,   g = grad_x D(x) / RMS(grad_x D(x))

(s = `step_size`, 0.02; g scaled to unit root-mean-square per element, as the noise of a diffusion
step is), and every `denoise_every` steps (5) the diffusion U-Net takes one reverse step from x
(the mean of p(x_{i-1} | x_i) at index `denoise_index` of the `respaced_steps` chain), which pulls
the image back toward what normal images look like. What changes is where the detector saw the
anomaly; the frames show the defect fade while the rest stays. Pure torch; no Ray.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipelines.models.diffusion.config import DdpmConfig
from pipelines.models.diffusion.samplers import respaced


@dataclass(frozen=True)
class GradientDenoising:
    steps: int = 100
    step_size: float = 0.02  # s: the paper's
    denoise_every: int = 5  # the paper's: one diffusion step every 5 gradient steps; 0 = never
    respaced_steps: int = 250  # the chain of the denoising step (diffusion_kl's scoring chain)
    denoise_index: int = 5  # index of that chain the reverse step is taken at: a small t
    frames: int = 6  # snapshots kept, evenly spaced from the input to the last step


@dataclass(frozen=True)
class Explanation:
    frames: np.ndarray  # (F, B, S, S, 3) uint8: the input first, the last step's image last
    distances: np.ndarray  # (F, B) float: the PaDiM mean distance of each frame
    steps: tuple[int, ...]  # the gradient step each frame was taken after (0 = the input)


def denoiser(unet: nn.Module, model: DdpmConfig, settings: GradientDenoising) -> Callable[[torch.Tensor], torch.Tensor]:
    """x in [-1, 1] -> the mean of the U-Net's reverse step from x taken as x_i (i = `denoise_index`)."""
    if model.num_classes:
        raise ValueError("gradient denoising needs an unconditional diffusion model")
    diffusion, timesteps = respaced(model, settings.respaced_steps)
    index = settings.denoise_index

    @torch.no_grad()
    def step(x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        model_t = torch.full((x.shape[0],), timesteps[index], dtype=torch.long, device=x.device)
        output = unet(x, model_t).sample.float()
        mean, _, _, _ = diffusion.p_mean_variance(output, x, t, clip_x0=True)
        return mean

    return step


def snapshot_steps(settings: GradientDenoising) -> tuple[int, ...]:
    """The gradient steps after which a frame is kept: 0 (the input) .. `steps`, evenly spaced."""
    count = max(2, settings.frames)
    return tuple(sorted({round(k * settings.steps / (count - 1)) for k in range(count)}))


def gradient_denoise(images: torch.Tensor, distance: Callable[[torch.Tensor], torch.Tensor],
                     denoise: Callable[[torch.Tensor], torch.Tensor] | None,
                     settings: GradientDenoising) -> Explanation:
    """Gradient denoising of images (B, 3, S, S) in [0, 1]. `distance` maps images in [0, 1] to (B,)
    differentiable anomaly distances (PaDiM's `mean_distance`); `denoise` maps x in [-1, 1] to the
    reverse step's mean (`denoiser`), or None for gradient steps alone. Deterministic: no noise."""
    keep = set(snapshot_steps(settings))
    shrink, s = math.sqrt(1.0 - settings.step_size ** 2), settings.step_size
    x = images.float() * 2 - 1
    frames, distances = [], []

    def record(x: torch.Tensor, value: torch.Tensor) -> None:
        pixels = ((x.detach() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        frames.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
        distances.append(value.detach().double().cpu().numpy())

    for step in range(settings.steps + 1):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = distance((x + 1) / 2)
            (gradient,) = torch.autograd.grad(value.sum(), x)
        if step in keep:
            record(x, value)
        if step == settings.steps:
            break
        rms = gradient.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
        x = shrink * x.detach() - s * gradient / rms[:, None, None, None]
        if denoise is not None and settings.denoise_every and (step + 1) % settings.denoise_every == 0:
            x = denoise(x)
        x = x.clamp(-1, 1)
    return Explanation(frames=np.stack(frames), distances=np.stack(distances), steps=tuple(sorted(keep)))


def strip(frames: np.ndarray) -> np.ndarray:
    """(F, S, S, 3) uint8 frames of one image -> (S, F*S + (F-1)*gap, 3): side by side, white gaps."""
    gap = max(2, frames.shape[1] // 32)
    white = np.full((frames.shape[1], gap, 3), 255, np.uint8)
    parts = [part for frame in frames for part in (frame, white)][:-1]
    return np.concatenate(parts, axis=1)


def gif(frames: np.ndarray, frame_ms: int = 400) -> bytes:
    """An endlessly looping GIF of one image's (F, S, S, 3) uint8 frames; the last one held longer."""
    from PIL import Image

    pictures = [Image.fromarray(frame) for frame in frames]
    durations = [frame_ms] * (len(pictures) - 1) + [frame_ms * 4]
    out = io.BytesIO()
    pictures[0].save(out, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return out.getvalue()
