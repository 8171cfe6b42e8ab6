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
from pipelines.models.backbones import FeatureExtractor
from pipelines.models.diffusion.config import DdpmParams
from pipelines.models.diffusion.method import IMPLEMENTATION as DDPM
from pipelines.models.diffusion.method import DdpmTrainingState, ema_weights, to_model_input, unet_from
from pipelines.models.diffusion.process import AuxiliaryLoss, Diffusion
from pipelines.models.diffusion.samplers import respaced
from pipelines.models.diffusion.scoring import kl_from_outputs, noise_for, reverse_step_outputs
from pipelines.models.diffusion_kl import DiffusionKlConfig, DiffusionKlParams
from pipelines.models.diffusion_kl.feature_head import (
    UNetWithFeatureHead,
    feature_error_maps,
    feature_extractor,
    feature_mse,
    feature_targets,
)
from pipelines.models.methods import Published, ScoreBatch, TrainingBatch, TrainingContext

# (K, 3) float64 sums per timestep: count, sum, sum of squares of the map values
_STATISTICS = {"kl": "kl_statistics", "feature": "feature_statistics"}
_MOMENTS = {"kl": "kl_moments", "feature": "feature_moments"}  # (K, 2) mean and standard deviation, published
_NOISE_PURPOSE = "diffusion_kl:noise"  # with the scoring seed and the image id: the noise of x_i


def moments(sums: torch.Tensor) -> torch.Tensor:
    """(K, 2) float32 mean and standard deviation from (K, 3) count/sum/sum-of-squares sums."""
    count, total, squares = sums.double().unbind(dim=1)
    if float(count.min()) < 2:
        raise ValueError("diffusion_kl: no map statistics were accumulated (statistics_steps)")
    mean = total / count
    variance = ((squares - count * mean * mean) / (count - 1)).clamp_min(1e-12)
    return torch.stack([mean, variance.sqrt()], dim=1).float()


def map_sums(maps: torch.Tensor) -> torch.Tensor:
    """(K, 3) float64 count, sum and sum of squares per timestep of (B, K, S, S) maps."""
    values = maps.double().transpose(0, 1).flatten(1)
    return torch.stack([torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64),
                        values.sum(dim=1).cpu(), values.pow(2).sum(dim=1).cpu()], dim=1)


def map_kinds(config: DiffusionKlConfig) -> tuple[str, ...]:
    """The maps a model makes: the KL always, the feature error with a head."""
    return ("kl", "feature") if config.feature_head.enabled else ("kl",)


def network_for(config: DiffusionKlConfig, unet: UNet2DModel) -> nn.Module:
    """What is trained and scored: the U-Net, wrapped with its feature head when it has one."""
    return UNetWithFeatureHead(unet, config.model, config.feature_head) if config.feature_head.enabled else unet


@torch.no_grad()
def raw_maps(network: nn.Module, diffusion: Diffusion, timesteps: Sequence[int], x0: torch.Tensor,
             indices: Sequence[int], noise: torch.Tensor, extractor: FeatureExtractor | None,
             autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """{"kl": (B, K, S, S) KL in bits, and with a feature head "feature": its squared error}, from one
    U-Net call over the B x K noised images; x0 in [-1, 1], noise as `scoring.noised`."""
    output, xt, index = reverse_step_outputs(network, diffusion, timesteps, x0, indices, noise, autocast_dtype)
    maps = {"kl": kl_from_outputs(diffusion, x0, xt, index, output.sample)}
    if extractor is not None:
        maps["feature"] = feature_error_maps(output.features, feature_targets(extractor, x0), x0.shape[-1])
    return maps


class DiffusionKl(nn.Module):
    """A trained detector: the U-Net (EMA weights, with its feature head when trained with one) and
    the per-timestep moments of the training images' maps."""

    def __init__(self, config: DiffusionKlConfig, network: nn.Module, map_moments: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.network = network.eval().requires_grad_(False)
        if set(map_moments) != set(map_kinds(config)):
            raise ValueError(f"diffusion_kl: moments for {sorted(map_moments)}, "
                             f"the model makes {list(map_kinds(config))}")
        for kind, values in map_moments.items():  # buffers, so that they move with .to()
            self.register_buffer(_MOMENTS[kind], values.float().clone())
        self.extractor = feature_extractor(config.feature_head) if config.feature_head.enabled else None
        self.diffusion, self.timesteps = respaced(config.model, config.scoring.respaced_steps)

    @property
    def unet(self) -> UNet2DModel:
        return self.network.unet if isinstance(self.network, UNetWithFeatureHead) else self.network

    def to(self, *args: Any, **kwargs: Any) -> DiffusionKl:  # the shared extractor moves too
        super().to(*args, **kwargs)
        if self.extractor is not None:
            self.extractor.to(next(self.network.parameters()).device)
        return self

    def map_moments(self, kind: str) -> torch.Tensor:
        return getattr(self, _MOMENTS[kind])

    def raw_maps(self, images: torch.Tensor, row_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """`raw_maps` of images in [0, 1], the noise of x_i seeded by each image's id."""
        scoring = self.config.scoring
        x0 = images.float() * 2 - 1
        noise = noise_for(row_ids, _NOISE_PURPOSE, scoring.seed, (len(scoring.timesteps), *x0.shape[1:])).to(x0.device)
        return raw_maps(self.network, self.diffusion, self.timesteps, x0, scoring.timesteps, noise, self.extractor)

    def kl_maps(self, images: torch.Tensor, row_ids: Sequence[str]) -> torch.Tensor:
        """(B, K, S, S) raw KL maps (bits) of images in [0, 1]."""
        return self.raw_maps(images, row_ids)["kl"]

    def normalised(self, maps: torch.Tensor, kind: str = "kl") -> torch.Tensor:
        if self.config.scoring.normalisation == "per_image":
            flat = maps.flatten(2)
            mean, std = flat.mean(dim=2), flat.std(dim=2).clamp_min(1e-12)
        else:
            fitted = self.map_moments(kind)
            mean, std = fitted[:, 0].expand(maps.shape[0], -1), fitted[:, 1].expand(maps.shape[0], -1)
        return (maps - mean[..., None, None]) / std[..., None, None]

    def combined(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K, S, S): the standardised KL, mixed alpha : 1 - alpha with the standardised feature error."""
        kl = self.normalised(maps["kl"], "kl")
        if "feature" not in maps:
            return kl
        alpha = self.config.scoring.alpha
        return alpha * kl + (1 - alpha) * self.normalised(maps["feature"], "feature")

    @torch.inference_mode()
    def score(self, images: torch.Tensor, row_ids: Sequence[str]) -> ScoreBatch:
        size = self.config.model.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"diffusion_kl expects {size}x{size} inputs, got {tuple(images.shape[-2:])}")
        maps = gaussian_blur(self.combined(self.raw_maps(images, row_ids)).mean(dim=1), self.config.scoring.map_sigma)
        return ScoreBatch(top_mean(maps, self.config.scoring.top_pixels), maps)

    def tensors(self) -> dict[str, torch.Tensor]:
        parts = {"unet": self.unet}
        if isinstance(self.network, UNetWithFeatureHead):
            parts["head"] = self.network.head
        tensors = {f"{part}/{k}": v.detach().cpu().contiguous()
                   for part, module in parts.items() for k, v in module.state_dict().items()}
        moments_ = {_MOMENTS[kind]: self.map_moments(kind).cpu().contiguous() for kind in map_kinds(self.config)}
        return {**tensors, **moments_}


def _ddpm_params(params: DiffusionKlParams) -> DdpmParams:
    return DdpmParams(model=params.model, optim=params.optim, training=params.training)


def _published_weights(config: DiffusionKlConfig, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The artifact's `unet/*` (and `head/*`) tensors from the EMA network's state dict."""
    if not config.feature_head.enabled:
        return {f"unet/{k}": v for k, v in ema.items()}
    renamed = {}
    for name, tensor in ema.items():
        part, _, rest = name.partition(".")  # UNetWithFeatureHead's `unet.*` and `head.*`
        renamed[f"{part}/{rest}"] = tensor
    return renamed


class DiffusionKlTrainingState:
    """The DDPM's train state (with the feature head's loss when there is one), plus the map sums of
    the EMA network over the last `statistics_steps` steps (on the batch just trained on, noise from
    the step's generator)."""

    def __init__(self, params: DiffusionKlParams, context: TrainingContext):
        self.params = params
        config = params.artifact
        self.kinds = map_kinds(config)
        self.ddpm = DdpmTrainingState(_ddpm_params(params), context,
                                      build=lambda model: network_for(config, DDPM.build(model, None)))
        self.extractor = (feature_extractor(params.feature_head).to(self.ddpm.state.device)
                          if params.feature_head.enabled else None)
        self.diffusion, self.timesteps = respaced(params.model, params.scoring.respaced_steps)
        self.sums = {kind: torch.zeros(len(params.scoring.timesteps), 3, dtype=torch.float64) for kind in self.kinds}

    @property
    def kl_sums(self) -> torch.Tensor:
        return self.sums["kl"]

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

    def _feature_loss(self, x0: torch.Tensor) -> AuxiliaryLoss:
        assert self.extractor is not None
        targets = feature_targets(self.extractor, x0)
        weight = self.params.feature_head.weight
        return lambda output: {"feature_mse": (weight, feature_mse(output.features, targets))}

    def train_batch(self, batch: TrainingBatch, generator: torch.Generator,
                    autocast_dtype: torch.dtype | None) -> dict[str, float]:
        auxiliary = self._feature_loss if self.extractor is not None else None
        metrics = self.ddpm.train_batch(batch, generator, autocast_dtype, auxiliary=auxiliary)
        if self.step > self.params.training.steps - self.params.statistics_steps:
            self._accumulate(batch, generator, autocast_dtype)
        return metrics

    def _accumulate(self, batch: TrainingBatch, generator: torch.Generator, autocast_dtype: torch.dtype | None) -> None:
        state = self.ddpm.state
        x0 = to_model_input(batch.pixels, state.device)
        shape = (x0.shape[0], len(self.params.scoring.timesteps), *x0.shape[1:])
        noise = torch.randn(shape, generator=generator, device=generator.device).to(state.device)
        maps = raw_maps(state.ema, self.diffusion, self.timesteps, x0, self.params.scoring.timesteps, noise,
                        self.extractor, autocast_dtype=autocast_dtype)
        for kind in self.kinds:
            self.sums[kind] += map_sums(maps[kind])

    def _checked(self) -> dict:
        return {"statistics_steps": self.params.statistics_steps,
                "scoring_timesteps": list(self.params.scoring.timesteps),
                "respaced_steps": self.params.scoring.respaced_steps,
                "feature_head": self.params.feature_head.enabled}

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = self.ddpm.state_tensors()
        return ({**tensors, **{_STATISTICS[kind]: self.sums[kind].clone() for kind in self.kinds}},
                {**meta, **self._checked()})

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for key, value in self._checked().items():
            if meta.get(key, False if key == "feature_head" else None) != value:
                raise ValueError(f"checkpoint {key} {meta.get(key)} differs from this run's {value}")
        statistics = set(_STATISTICS.values())
        self.ddpm.load_state_tensors({k: v for k, v in tensors.items() if k not in statistics}, meta)
        self.sums = {kind: tensors[_STATISTICS[kind]].double().clone() for kind in self.kinds}


class DiffusionKlImplementation:
    """What `pipelines.models.diffusion_kl`'s record names."""

    @staticmethod
    def describe(config: DiffusionKlConfig) -> str:
        scoring = config.scoring
        head = config.feature_head
        mix = (f"; feature head on {head.backbone} stage {head.stage}, alpha {scoring.alpha}" if head.enabled
               else "; KL only")
        return (f"diffusion_kl ({config.model.image_size}px, channels {list(config.model.block_out_channels)}"
                f"{', learned variance' if config.model.learned_variance else ''}; timesteps "
                f"{list(scoring.timesteps)} of {scoring.respaced_steps}, {scoring.normalisation} normalisation, "
                f"top {scoring.top_pixels} pixels{mix})")

    @staticmethod
    def build(config: DiffusionKlConfig, tensors: dict[str, torch.Tensor] | None) -> DiffusionKl:
        if tensors is None:  # untrained: unit moments
            unit = torch.tensor([[0.0, 1.0]] * len(config.scoring.timesteps))
            return DiffusionKl(config, network_for(config, DDPM.build(config.model, None)),
                               {kind: unit for kind in map_kinds(config)})
        network = network_for(config, unet_from(config.model, tensors, "unet/"))
        if isinstance(network, UNetWithFeatureHead):
            network.head.load_state_dict({k[len("head/"):]: v for k, v in tensors.items() if k.startswith("head/")})
        return DiffusionKl(config, network, {kind: tensors[_MOMENTS[kind]] for kind in map_kinds(config)})

    @staticmethod
    def training_state(params: DiffusionKlParams, context: TrainingContext) -> DiffusionKlTrainingState:
        return DiffusionKlTrainingState(params, context)

    @staticmethod
    def published(params: DiffusionKlParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The EMA network and the map moments of the last checkpoint, one model for every category."""
        config = params.artifact
        published = {**_published_weights(config, ema_weights(tensors)),
                     **{_MOMENTS[kind]: moments(tensors[_STATISTICS[kind]]) for kind in map_kinds(config)}}
        return Published(
            config=config,
            tensors={ALL_CATEGORIES: published},
            info={"class_names": list(context.class_names), "steps": meta["step"], "weights": "ema",
                  "statistics_steps": params.statistics_steps},
            summary=DiffusionKlImplementation.describe(params.artifact))


IMPLEMENTATION = DiffusionKlImplementation()
