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


def moments(sums: torch.Tensor, class_names: Sequence[str] = ()) -> torch.Tensor:
    """(..., K, 2) float32 mean and standard deviation from (..., K, 3) count/sum/sum-of-squares
    sums (a class-conditional model's have a leading class axis, its classes named for the error)."""
    count, total, squares = sums.double().unbind(dim=-1)
    if float(count.min()) < 2:
        if class_names:
            empty = [name for name, counts in zip(class_names, count) if float(counts.min()) < 2]
            raise ValueError(f"diffusion_kl: no map statistics were gathered for class(es) {empty}: the last "
                             "statistics_steps steps never drew them; raise statistics_steps")
        raise ValueError("diffusion_kl: no map statistics were accumulated (statistics_steps)")
    mean = total / count
    variance = ((squares - count * mean * mean) / (count - 1)).clamp_min(1e-12)
    return torch.stack([mean, variance.sqrt()], dim=-1).float()


def map_sums(maps: torch.Tensor) -> torch.Tensor:
    """(K, 3) float64 count, sum and sum of squares per timestep of (B, K, S, S) maps."""
    values = maps.double().transpose(0, 1).flatten(1)
    return torch.stack([torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64),
                        values.sum(dim=1).cpu(), values.pow(2).sum(dim=1).cpu()], dim=1)


def class_map_sums(maps: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, K, 3) `map_sums` of each class's rows of (B, K, S, S) maps."""
    sums = torch.zeros(classes, maps.shape[1], 3, dtype=torch.float64)
    for label in labels.unique().tolist():
        sums[label] = map_sums(maps[labels == label])
    return sums


def map_kinds(config: DiffusionKlConfig) -> tuple[str, ...]:
    """The maps a model makes: the KL always, the feature error with a head."""
    return ("kl", "feature") if config.feature_head.enabled else ("kl",)


def network_for(config: DiffusionKlConfig, unet: UNet2DModel) -> nn.Module:
    """What is trained and scored: the U-Net, wrapped with its feature head when it has one."""
    return UNetWithFeatureHead(unet, config.model, config.feature_head) if config.feature_head.enabled else unet


@torch.no_grad()
def raw_maps(network: nn.Module, diffusion: Diffusion, timesteps: Sequence[int], x0: torch.Tensor,
             indices: Sequence[int], noise: torch.Tensor, extractor: FeatureExtractor | None,
             autocast_dtype: torch.dtype | None = None,
             class_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"kl": (B, K, S, S) KL in bits, and with a feature head "feature": its squared error}, from one
    U-Net call over the B x K noised images; x0 in [-1, 1], noise as `scoring.noised`; `class_labels`
    (B,) for a class-conditional network."""
    output, xt, index = reverse_step_outputs(network, diffusion, timesteps, x0, indices, noise, autocast_dtype,
                                             class_labels=class_labels)
    maps = {"kl": kl_from_outputs(diffusion, x0, xt, index, output.sample)}
    if extractor is not None:
        maps["feature"] = feature_error_maps(output.features, feature_targets(extractor, x0), x0.shape[-1])
    return maps


class DiffusionKl(nn.Module):
    """A trained detector: the U-Net (EMA weights, with its feature head when trained with one) and
    the per-timestep moments of the training images' maps.

    A class-conditional model is built whole (moments (C, K, 2), `class_label` None: it saves, but
    does not score) and scores through `for_class(c)`: the same network, class c's moments."""

    def __init__(self, config: DiffusionKlConfig, network: nn.Module, map_moments: dict[str, torch.Tensor],
                 class_label: int | None = None):
        super().__init__()
        self.config = config
        self.network = network.eval().requires_grad_(False)
        self.class_label = class_label
        if set(map_moments) != set(map_kinds(config)):
            raise ValueError(f"diffusion_kl: moments for {sorted(map_moments)}, "
                             f"the model makes {list(map_kinds(config))}")
        classes = len(config.class_names)
        if config.model.num_classes != classes:
            raise ValueError(f"diffusion_kl: a {config.model.num_classes}-class network with {classes} class names")
        expected = (len(config.scoring.timesteps), 2) if class_label is not None or not classes \
            else (classes, len(config.scoring.timesteps), 2)
        for kind, values in map_moments.items():  # buffers, so that they move with .to()
            if tuple(values.shape) != expected:
                raise ValueError(f"diffusion_kl: {_MOMENTS[kind]} has shape {tuple(values.shape)}, expected {expected}")
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

    def for_class(self, label: int) -> DiffusionKl:
        """Class `label`'s detector of a class-conditional model: the same network (shared, not
        copied), that class's moments."""
        if not self.config.class_conditional or self.class_label is not None:
            raise ValueError("for_class: not a whole class-conditional model")
        return DiffusionKl(self.config, self.network, {kind: self.map_moments(kind)[label]
                                                       for kind in map_kinds(self.config)}, class_label=label)

    def raw_maps(self, images: torch.Tensor, row_ids: Sequence[str],
                 autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`raw_maps` of images in [0, 1], the noise of x_i seeded by each image's id."""
        scoring = self.config.scoring
        x0 = images.float() * 2 - 1
        noise = noise_for(row_ids, _NOISE_PURPOSE, scoring.seed, (len(scoring.timesteps), *x0.shape[1:])).to(x0.device)
        labels = None
        if self.config.class_conditional:
            if self.class_label is None:
                raise ValueError("a class-conditional diffusion_kl model scores through a category's model "
                                 "(for_class; loading the artifact gives one per category)")
            labels = torch.full((x0.shape[0],), self.class_label, dtype=torch.long, device=x0.device)
        return raw_maps(self.network, self.diffusion, self.timesteps, x0, scoring.timesteps, noise, self.extractor,
                        autocast_dtype, class_labels=labels)

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
    def score(self, images: torch.Tensor, row_ids: Sequence[str],
              autocast_dtype: torch.dtype | None = None) -> ScoreBatch:
        """`autocast_dtype` (the "bf16" capability): the U-Net call only runs under autocast; the
        KL, the feature error and everything after them are float32."""
        size = self.config.model.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"diffusion_kl expects {size}x{size} inputs, got {tuple(images.shape[-2:])}")
        raw = self.raw_maps(images, row_ids, autocast_dtype)
        maps = gaussian_blur(self.combined(raw).mean(dim=1), self.config.scoring.map_sigma)
        return ScoreBatch(top_mean(maps, self.config.scoring.top_pixels), maps)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.class_label is not None:  # saving it would write the shared network once per class
            raise ValueError("one class's view of a class-conditional diffusion_kl model is not saved on its own: "
                             "save the whole model")
        parts = {"unet": self.unet}
        if isinstance(self.network, UNetWithFeatureHead):
            parts["head"] = self.network.head
        tensors = {f"{part}/{k}": v.detach().cpu().contiguous()
                   for part, module in parts.items() for k, v in module.state_dict().items()}
        moments_ = {_MOMENTS[kind]: self.map_moments(kind).cpu().contiguous() for kind in map_kinds(self.config)}
        return {**tensors, **moments_}


def _ddpm_params(params: DiffusionKlParams) -> DdpmParams:
    return DdpmParams(model=params.model, optim=params.optim, training=params.training,
                      class_conditional=params.class_conditional)


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
    the step's generator): (K, 3) per map kind, (C, K, 3) per class when class-conditional."""

    def __init__(self, params: DiffusionKlParams, context: TrainingContext):
        self.params = params
        config = params.artifact(context.class_names)
        self.kinds = map_kinds(config)
        self.classes = len(config.class_names)
        self.ddpm = DdpmTrainingState(_ddpm_params(params), context,
                                      build=lambda model: network_for(config, DDPM.build(model, None)))
        self.extractor = (feature_extractor(params.feature_head).to(self.ddpm.state.device)
                          if params.feature_head.enabled else None)
        self.diffusion, self.timesteps = respaced(params.model, params.scoring.respaced_steps)
        shape = (self.classes,) * bool(self.classes) + (len(params.scoring.timesteps), 3)
        self.sums = {kind: torch.zeros(shape, dtype=torch.float64) for kind in self.kinds}

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
        labels = self.ddpm.class_labels(batch)
        maps = raw_maps(state.ema, self.diffusion, self.timesteps, x0, self.params.scoring.timesteps, noise,
                        self.extractor, autocast_dtype=autocast_dtype, class_labels=labels)
        for kind in self.kinds:
            self.sums[kind] += (map_sums(maps[kind]) if labels is None
                                else class_map_sums(maps[kind], labels.cpu(), self.classes))

    def _checked(self) -> dict:
        return {"statistics_steps": self.params.statistics_steps,
                "scoring_timesteps": list(self.params.scoring.timesteps),
                "respaced_steps": self.params.scoring.respaced_steps,
                "feature_head": self.params.feature_head.enabled,
                "class_conditional": self.params.class_conditional}

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = self.ddpm.state_tensors()
        return ({**tensors, **{_STATISTICS[kind]: self.sums[kind].clone() for kind in self.kinds}},
                {**meta, **self._checked()})

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for key, value in self._checked().items():
            # Checkpoints from before a switch existed were written with it off.
            if meta.get(key, False if key in ("feature_head", "class_conditional") else None) != value:
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
        conditioning = (f", class-conditional over {len(config.class_names)} classes" if config.class_conditional
                        else "")
        return (f"diffusion_kl ({config.model.image_size}px, channels {list(config.model.block_out_channels)}"
                f"{', learned variance' if config.model.learned_variance else ''}{conditioning}; timesteps "
                f"{list(scoring.timesteps)} of {scoring.respaced_steps}, {scoring.normalisation} normalisation, "
                f"top {scoring.top_pixels} pixels{mix})")

    @staticmethod
    def build(config: DiffusionKlConfig, tensors: dict[str, torch.Tensor] | None) -> DiffusionKl:
        if tensors is None:  # untrained: unit moments
            unit = torch.tensor([[0.0, 1.0]] * len(config.scoring.timesteps))
            if config.class_conditional:
                unit = unit.expand(len(config.class_names), -1, -1)
            return DiffusionKl(config, network_for(config, DDPM.build(config.model, None)),
                               {kind: unit for kind in map_kinds(config)})
        network = network_for(config, unet_from(config.model, tensors, "unet/"))
        if isinstance(network, UNetWithFeatureHead):
            network.head.load_state_dict({k[len("head/"):]: v for k, v in tensors.items() if k.startswith("head/")})
        return DiffusionKl(config, network, {kind: tensors[_MOMENTS[kind]] for kind in map_kinds(config)})

    @staticmethod
    def category_models(config: DiffusionKlConfig, models: dict[str, DiffusionKl]) -> dict[str, DiffusionKl]:
        """A class-conditional artifact's one model becomes one per class (the network shared): each
        category is scored with its class and standardised by its own moments, and is calibrated
        and looked up on its own."""
        if not config.class_conditional:
            return models
        whole = models[ALL_CATEGORIES]
        return {name: whole.for_class(label) for label, name in enumerate(config.class_names)}

    @staticmethod
    def training_state(params: DiffusionKlParams, context: TrainingContext) -> DiffusionKlTrainingState:
        return DiffusionKlTrainingState(params, context)

    @staticmethod
    def published(params: DiffusionKlParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The EMA network and the map moments of the last checkpoint, under the all-categories key
        (a class-conditional model's moments per class: `category_models` splits it at load)."""
        config = params.artifact(context.class_names)
        published = {**_published_weights(config, ema_weights(tensors)),
                     **{_MOMENTS[kind]: moments(tensors[_STATISTICS[kind]], config.class_names)
                        for kind in map_kinds(config)}}
        return Published(
            config=config,
            tensors={ALL_CATEGORIES: published},
            info={"class_names": list(context.class_names), "steps": meta["step"], "weights": "ema",
                  "statistics_steps": params.statistics_steps},
            summary=DiffusionKlImplementation.describe(config))


IMPLEMENTATION = DiffusionKlImplementation()
