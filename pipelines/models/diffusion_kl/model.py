"""`method: diffusion_kl`: the detector, its train state and its side of the method contract.
Pure torch; no Ray. The U-Net, its training step and its checkpoints are the DDPM's
(`pipelines.models.diffusion`); what is added is the scoring and the statistics it is normalised by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

from pipelines.models.anomaly_maps import gaussian_blur, top_mean
from pipelines.models.artifacts import ALL_CATEGORIES
from pipelines.models.diffusion.config import DdpmParams
from pipelines.models.diffusion.method import IMPLEMENTATION as DDPM
from pipelines.models.diffusion.method import DdpmTrainingState, ema_weights, to_model_input, unet_from
from pipelines.models.diffusion.samplers import respaced
from pipelines.models.diffusion.scoring import noise_for, posterior_kl_maps
from pipelines.models.diffusion_kl import DiffusionKlConfig, DiffusionKlParams
from pipelines.models.methods import Published, ScoreBatch, TrainingBatch, TrainingContext

_STATISTICS = "kl_statistics"  # (K, 3) float64 sums per timestep: count, sum, sum of squares of the map values
_NOISE_PURPOSE = "diffusion_kl:noise"  # with the scoring seed and the image id: the noise of x_i


def moments(sums: torch.Tensor) -> torch.Tensor:
    """(K, 2) float32 mean and standard deviation from (K, 3) count/sum/sum-of-squares sums."""
    count, total, squares = sums.double().unbind(dim=1)
    if float(count.min()) < 2:
        raise ValueError("diffusion_kl: no KL statistics were accumulated (statistics_steps)")
    mean = total / count
    variance = ((squares - count * mean * mean) / (count - 1)).clamp_min(1e-12)
    return torch.stack([mean, variance.sqrt()], dim=1).float()


class DiffusionKl(nn.Module):
    """A trained detector: the U-Net (EMA weights) and the per-timestep KL moments of the training images."""

    kl_moments: torch.Tensor  # (K, 2) mean and standard deviation; a buffer, so it moves with .to()

    def __init__(self, config: DiffusionKlConfig, unet: UNet2DModel, kl_moments: torch.Tensor):
        super().__init__()
        self.config = config
        self.unet = unet.eval().requires_grad_(False)
        self.register_buffer("kl_moments", kl_moments.float().clone())
        self.diffusion, self.timesteps = respaced(config.model, config.scoring.respaced_steps)

    def kl_maps(self, images: torch.Tensor, row_ids: Sequence[str]) -> torch.Tensor:
        """(B, K, S, S) raw KL maps (bits) of images in [0, 1]."""
        scoring = self.config.scoring
        x0 = images.float() * 2 - 1
        noise = noise_for(row_ids, _NOISE_PURPOSE, scoring.seed, (len(scoring.timesteps), *x0.shape[1:])).to(x0.device)
        return posterior_kl_maps(self.unet, self.diffusion, self.timesteps, x0, scoring.timesteps, noise)

    def normalised(self, kl: torch.Tensor) -> torch.Tensor:
        if self.config.scoring.normalisation == "per_image":
            flat = kl.flatten(2)
            mean, std = flat.mean(dim=2), flat.std(dim=2).clamp_min(1e-12)
        else:
            mean, std = self.kl_moments[:, 0].expand(kl.shape[0], -1), self.kl_moments[:, 1].expand(kl.shape[0], -1)
        return (kl - mean[..., None, None]) / std[..., None, None]

    @torch.inference_mode()
    def score(self, images: torch.Tensor, row_ids: Sequence[str]) -> ScoreBatch:
        size = self.config.model.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"diffusion_kl expects {size}x{size} inputs, got {tuple(images.shape[-2:])}")
        maps = gaussian_blur(self.normalised(self.kl_maps(images, row_ids)).mean(dim=1), self.config.scoring.map_sigma)
        return ScoreBatch(top_mean(maps, self.config.scoring.top_pixels), maps)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"unet/{k}": v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()},
                "kl_moments": self.kl_moments.cpu().contiguous()}


def _ddpm_params(params: DiffusionKlParams) -> DdpmParams:
    return DdpmParams(model=params.model, optim=params.optim, training=params.training)


class DiffusionKlTrainingState:
    """The DDPM's train state, plus the KL-map sums of the EMA network over the last
    `statistics_steps` steps (on the batch just trained on, noise from the step's generator)."""

    def __init__(self, params: DiffusionKlParams, context: TrainingContext):
        self.params = params
        self.ddpm = DdpmTrainingState(_ddpm_params(params), context)
        self.diffusion, self.timesteps = respaced(params.model, params.scoring.respaced_steps)
        self.kl_sums = torch.zeros(len(params.scoring.timesteps), 3, dtype=torch.float64)

    @property
    def step(self) -> int:
        return self.ddpm.step

    @property
    def module(self) -> nn.Module:
        return self.ddpm.module

    @property
    def forward_model(self) -> nn.Module:
        return self.ddpm.forward_model

    @forward_model.setter
    def forward_model(self, model: nn.Module) -> None:
        self.ddpm.forward_model = model

    def train_batch(self, batch: TrainingBatch, generator: torch.Generator,
                    autocast_dtype: torch.dtype | None) -> dict[str, float]:
        metrics = self.ddpm.train_batch(batch, generator, autocast_dtype)
        if self.step > self.params.training.steps - self.params.statistics_steps:
            self._accumulate(batch, generator, autocast_dtype)
        return metrics

    def _accumulate(self, batch: TrainingBatch, generator: torch.Generator, autocast_dtype: torch.dtype | None) -> None:
        state = self.ddpm.state
        x0 = to_model_input(batch.pixels, state.device)
        shape = (x0.shape[0], len(self.params.scoring.timesteps), *x0.shape[1:])
        noise = torch.randn(shape, generator=generator, device=generator.device).to(state.device)
        kl = posterior_kl_maps(state.ema, self.diffusion, self.timesteps, x0, self.params.scoring.timesteps, noise,
                               autocast_dtype=autocast_dtype).double().transpose(0, 1).flatten(1)  # (K, B*S*S)
        self.kl_sums += torch.stack([torch.full((kl.shape[0],), float(kl.shape[1]), dtype=torch.float64),
                                     kl.sum(dim=1).cpu(), kl.pow(2).sum(dim=1).cpu()], dim=1)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = self.ddpm.state_tensors()
        return ({**tensors, _STATISTICS: self.kl_sums.clone()},
                {**meta, "statistics_steps": self.params.statistics_steps,
                 "scoring_timesteps": list(self.params.scoring.timesteps),
                 "respaced_steps": self.params.scoring.respaced_steps})

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        mine = {"statistics_steps": self.params.statistics_steps,
                "scoring_timesteps": list(self.params.scoring.timesteps),
                "respaced_steps": self.params.scoring.respaced_steps}
        for key, value in mine.items():
            if meta.get(key) != value:
                raise ValueError(f"checkpoint {key} {meta.get(key)} differs from this run's {value}")
        self.ddpm.load_state_tensors({k: v for k, v in tensors.items() if k != _STATISTICS}, meta)
        self.kl_sums = tensors[_STATISTICS].double().clone()


class DiffusionKlImplementation:
    """What `pipelines.models.diffusion_kl`'s record names."""

    @staticmethod
    def describe(config: DiffusionKlConfig) -> str:
        scoring = config.scoring
        return (f"diffusion_kl ({config.model.image_size}px, channels {list(config.model.block_out_channels)}"
                f"{', learned variance' if config.model.learned_variance else ''}; timesteps "
                f"{list(scoring.timesteps)} of {scoring.respaced_steps}, {scoring.normalisation} normalisation, "
                f"top {scoring.top_pixels} pixels)")

    @staticmethod
    def build(config: DiffusionKlConfig, tensors: dict[str, torch.Tensor] | None) -> DiffusionKl:
        if tensors is None:  # untrained: unit moments
            moments_ = torch.tensor([[0.0, 1.0]] * len(config.scoring.timesteps))
            return DiffusionKl(config, DDPM.build(config.model, None), moments_)
        return DiffusionKl(config, unet_from(config.model, tensors, "unet/"), tensors["kl_moments"])

    @staticmethod
    def training_state(params: DiffusionKlParams, context: TrainingContext) -> DiffusionKlTrainingState:
        return DiffusionKlTrainingState(params, context)

    @staticmethod
    def published(params: DiffusionKlParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The EMA U-Net and the KL moments of the last checkpoint, one model for every category."""
        return Published(
            config=params.artifact,
            tensors={ALL_CATEGORIES: {**ema_weights(tensors, "unet/"), "kl_moments": moments(tensors[_STATISTICS])}},
            info={"class_names": list(context.class_names), "steps": meta["step"], "weights": "ema",
                  "statistics_steps": params.statistics_steps},
            summary=DiffusionKlImplementation.describe(params.artifact))


IMPLEMENTATION = DiffusionKlImplementation()
