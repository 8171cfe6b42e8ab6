"""PFM's model, its train step and its side of the method contract. Pure torch; no Ray.

Features: the configured stages of both frozen backbones (shared per process with every other
model that uses them), each L2-normalised over channels at every position, so that the two
networks' different feature scales do not matter.

Mapping, per level (`LevelMapping`, the shape of the authors' code): source -> latent and
target -> latent (two 1x1 conv + BatchNorm + ReLU layers each), one shared middle layer (1x1
conv) to the bottleneck `latent`, latent -> target and latent -> source (three 1x1 conv layers
each). Loss: the mean squared error of both directions, summed over levels.

Map: per level and direction, the squared error divided by that channel's variance of the
errors on the training images (measured after each of the last `variance_steps` steps, with the
mapping in eval mode as it scores), summed over
channels; averaged over the two directions, bilinearly upsampled to the image, averaged over
levels, smoothed (Gaussian, `map_sigma`). Image score: the map's max (or mean, `image_score`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import InputError
from pipelines.models.anomaly_maps import gaussian_blur, image_scores
from pipelines.models.artifacts import ALL_CATEGORIES, renamed
from pipelines.models.backbones import shared_feature_extractor
from pipelines.models.methods import Published, ScoreBatch, TrainingBatch, TrainingContext
from pipelines.models.optimizer_state import optimizer_tensors, restore_optimizer
from pipelines.models.pfm import PfmConfig, PfmParams

DIRECTIONS = ("source_to_target", "target_to_source")
_META_FORMAT = "adpipe.pfm-train/1"


def _layers(widths: Sequence[int], last_plain: bool) -> nn.Sequential:
    """1x1 convolutions through `widths`, each followed by BatchNorm + ReLU, except the last
    when `last_plain` (an output that must reach any value: features, or the shared code)."""
    layers: list[nn.Module] = []
    for index, (inputs, outputs) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Conv2d(inputs, outputs, kernel_size=1))
        if not (last_plain and index == len(widths) - 2):
            layers += [nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class LevelMapping(nn.Module):
    """Both directions of one level through a shared middle layer, shaped as the authors' code
    (MB-PFM): each side's encoder widens to `c/2 + latent` and `2 latent`, the shared layer
    narrows to `latent`, each decoder widens back through `2 latent` and `c/2 + latent` to the
    other network's `c` channels."""

    def __init__(self, source_channels: int, target_channels: int, latent: int):
        super().__init__()
        s, t, k = source_channels, target_channels, latent
        self.source_in = _layers((s, s // 2 + k, 2 * k), last_plain=False)
        self.target_in = _layers((t, t // 2 + k, 2 * k), last_plain=False)
        self.middle = _layers((2 * k, k), last_plain=True)
        self.to_target = _layers((k, 2 * k, t // 2 + k, t), last_plain=True)
        self.to_source = _layers((k, 2 * k, s // 2 + k, s), last_plain=True)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (target predicted from source, source predicted from target)."""
        return (self.to_target(self.middle(self.source_in(source))),
                self.to_source(self.middle(self.target_in(target))))


class Mappings(nn.Module):
    """The trainable part: one `LevelMapping` per stage. Called on both networks' features, it
    returns every level's two errors (what DDP wraps and what the loss and the map are made of)."""

    def __init__(self, config: PfmConfig):
        super().__init__()
        self.levels = nn.ModuleList(
            LevelMapping(s, t, latent)
            for s, t, latent in zip(config.channels(config.source_backbone), config.channels(config.target_backbone),
                                    config.latents(), strict=True))

    def forward(self, source: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Per level (error source->target, error target->source), each (B, C, h, w)."""
        errors: list[tuple[torch.Tensor, ...]] = []
        for level, a_source, a_target in zip(self.levels, source, target, strict=True):
            predicted_target, predicted_source = level(a_source, a_target)
            errors.append((a_target - predicted_target, a_source - predicted_source))
        return errors


class PairedFeatures:
    """Both frozen backbones' normalised features of a batch of images in [0, 1]."""

    def __init__(self, config: PfmConfig):
        self.config = config
        self.source = shared_feature_extractor(config.source_backbone, config.stages)
        self.target = shared_feature_extractor(config.target_backbone, config.stages)

    def to(self, device: torch.device | str) -> PairedFeatures:
        self.source.to(device)
        self.target.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"PFM expects {size}x{size} inputs, got {tuple(images.shape[-2:])}")
        source, target = self.source(images), self.target(images)
        # Float32 and L2-normalised over channels: the mapping (and its errors) in full precision
        # whatever the backbone ran in.
        normalise = [F.normalize(f.float(), dim=1).contiguous() for f in source]
        return normalise, [F.normalize(f.float(), dim=1).contiguous() for f in target]


def mapping_loss(errors: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    return sum((e.pow(2).mean() for pair in errors for e in pair), start=torch.zeros(()))


def variance_names(config: PfmConfig) -> list[str]:
    return [f"variance/{stage}/{direction}" for stage in config.stages for direction in DIRECTIONS]


def error_channels(config: PfmConfig) -> list[int]:
    """Channels of each error, in `variance_names` order (source->target errors are target features)."""
    target, source = config.channels(config.target_backbone), config.channels(config.source_backbone)
    return [c for pair in zip(target, source, strict=True) for c in pair]


class Pfm(nn.Module):
    """A trained PFM: mappings + per-channel error variances; `score` is the contract's call."""

    def __init__(self, config: PfmConfig, mappings: Mappings, variances: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.features = PairedFeatures(config)
        self.mappings = mappings.eval().requires_grad_(False)
        self.variances = {name: variances[name].float().contiguous() for name in variance_names(config)}

    def to(self, *args: Any, **kwargs: Any) -> Pfm:  # the shared extractors and the variances move too
        super().to(*args, **kwargs)
        device = next(self.mappings.parameters()).device
        self.features.to(device)
        self.variances = {name: v.to(device) for name, v in self.variances.items()}
        return self

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image scores (B,), anomaly maps (B, S, S)), float32."""
        source, target = self.features(images)
        with torch.autocast(images.device.type, enabled=False):  # errors are small differences
            errors = self.mappings(source, target)
            maps = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
            for stage, pair in zip(self.config.stages, errors, strict=True):
                level = torch.zeros_like(pair[0][:, 0])
                for direction, error in zip(DIRECTIONS, pair, strict=True):
                    variance = self.variances[f"variance/{stage}/{direction}"].view(1, -1, 1, 1)
                    level += (error.pow(2) / variance).sum(1) / len(DIRECTIONS)
                maps += F.interpolate(level[:, None], size=images.shape[-2:], mode="bilinear",
                                      align_corners=False)[:, 0]
            maps = gaussian_blur(maps / len(errors), self.config.map_sigma)
        return image_scores(maps, self.config.image_score), maps

    def score(self, images: torch.Tensor, row_ids: Sequence[str]) -> ScoreBatch:
        """PFM draws no noise: the row ids are not used."""
        scores, maps = self(images)
        return ScoreBatch(scores, maps)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"mappings/{k}": v.detach().cpu().contiguous() for k, v in self.mappings.state_dict().items()},
                **{k: v.cpu() for k, v in self.variances.items()}}


def build_mappings(config: PfmConfig, seed: int) -> Mappings:
    # Built on the CPU from the seed, in a fork of the global generator, so that every rank starts
    # from the same weights and the caller's random state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Mappings(config)


class PfmTrainingState:
    """`TrainingState` of the method contract: one Adam step on the mapping loss; the error
    variances accumulated over the last `variance_steps` steps; what a checkpoint holds."""

    def __init__(self, params: PfmParams, context: TrainingContext):
        self.params = params
        self.config = params.model
        self.device = torch.device(context.device)
        self.features = PairedFeatures(self.config).to(self.device)
        self.module: Mappings = build_mappings(self.config, params.training.seed).to(self.device).train()
        self.forward_model: nn.Module = self.module  # the Ray glue swaps in a DDP wrapper
        self.optimizer = torch.optim.Adam(
            [{"params": level.parameters(), "lr": lr} for level, lr in zip(self.module.levels, params.optim.lr,
                                                                            strict=True)],
            weight_decay=params.optim.weight_decay)
        self.step = 0
        # Sums over the variance window, per level and direction: count of positions, sum, sum of squares.
        self.error_sums = {name: torch.zeros(3, channels, dtype=torch.float64)
                           for name, channels in zip(variance_names(self.config), error_channels(self.config),
                                                     strict=True)}

    def train_batch(self, batch: TrainingBatch, generator: torch.Generator,
                    autocast_dtype: torch.dtype | None) -> dict[str, float]:
        """One step on a batch of normal images. Nothing is random here (the generator is unused)."""
        images = torch.from_numpy(np.ascontiguousarray(batch.pixels)).to(self.device)
        images = images.permute(0, 3, 1, 2).float().div(255)
        autocast = (torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            source, target = self.features(images)  # the frozen backbones: the costly part, no gradients
        return self.train_features(source, target)

    def train_features(self, source: list[torch.Tensor], target: list[torch.Tensor]) -> dict[str, float]:
        """One step on both backbones' normalised features (`PairedFeatures`) of a batch: for a
        caller that computes them once per image and trains many steps on them."""
        self.optimizer.zero_grad(set_to_none=True)
        errors = self.forward_model(source, target)
        loss = mapping_loss(errors)
        loss.backward()
        self.optimizer.step()
        if self.step >= self.params.training.steps - self.params.variance_steps:
            self._accumulate(self._scoring_errors(source, target))
        self.step += 1
        return {"loss": float(loss.item()), "lr": float(self.params.optim.lr[0])}

    @torch.no_grad()
    def _scoring_errors(self, source: list[torch.Tensor], target: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """The errors of the mapping as just updated, in eval mode (BatchNorm's running
        statistics), as the scorer will see them; the training batch's statistics would differ."""
        self.module.eval()
        try:
            return self.module(source, target)
        finally:
            self.module.train()

    @torch.no_grad()
    def _accumulate(self, errors: list[tuple[torch.Tensor, ...]]) -> None:
        flat = [e for pair in errors for e in pair]
        for name, error in zip(variance_names(self.config), flat, strict=True):
            values = error.detach().double().transpose(0, 1).reshape(error.shape[1], -1)  # (C, B*h*w)
            self.error_sums[name] += torch.stack([
                torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64, device=values.device),
                values.sum(1), values.pow(2).sum(1)]).cpu()

    def variances(self) -> dict[str, torch.Tensor]:
        return variances_from_sums(self.error_sums)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model/{k}": v.detach().to("cpu", copy=True).contiguous()
                   for k, v in self.module.state_dict().items()}
        tensors.update({f"error_sums/{k}": v.clone() for k, v in self.error_sums.items()})
        optimizer_state, adam_steps = optimizer_tensors(self.optimizer)
        tensors.update(optimizer_state)
        return tensors, {"format": _META_FORMAT, "step": self.step, "adam_steps": adam_steps,
                         "steps": self.params.training.steps, "variance_steps": self.params.variance_steps}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("format") != _META_FORMAT:
            raise ValueError(f"not a PFM training checkpoint: format {meta.get('format')!r}")
        for key in ("steps", "variance_steps"):
            if meta.get(key) != getattr(self.params.training if key == "steps" else self.params, key):
                raise ValueError(f"checkpoint {key} {meta.get(key)} differs from this run's")
        self.module.load_state_dict(renamed(tensors, "model/"))
        self.error_sums = {k[len("error_sums/"):]: v.clone() for k, v in tensors.items()
                           if k.startswith("error_sums/")}
        restore_optimizer(self.optimizer, tensors, meta["adam_steps"])
        self.step = int(meta["step"])


def variances_from_sums(error_sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel variance of the errors, floored so that a channel the mapping reproduces
    exactly does not divide by zero."""
    out = {}
    for name, (count, total, squares) in error_sums.items():
        if float(count.min()) < 2:
            raise ValueError("PFM: no training errors were accumulated for the variance (variance_steps)")
        mean = total / count
        variance = (squares - count * mean * mean) / (count - 1)
        out[name] = variance.clamp_min(1e-12).float().contiguous()
    return out


class PfmImplementation:
    """What `pipelines.models.pfm`'s record names."""

    @staticmethod
    def describe(config: PfmConfig) -> str:
        return (f"pfm ({config.source_backbone} <-> {config.target_backbone}, stages {list(config.stages)}, "
                f"latent {list(config.latents())}, {config.image_size}px, image score {config.image_score})")

    @staticmethod
    def build(config: PfmConfig, tensors: dict[str, torch.Tensor] | None) -> Pfm:
        if not isinstance(config.latent_channels, tuple):
            # adpipe before the mapping took the authors' shape saved one width for every level
            raise InputError("this PFM model was saved by an earlier adpipe whose mapping had one layer per side "
                             "(latent_channels a single number); retrain it with this version")
        mappings = Mappings(config)
        if tensors is None:  # untrained: unit variances
            return Pfm(config, mappings, {name: torch.ones(channels) for name, channels
                                          in zip(variance_names(config), error_channels(config), strict=True)})
        mappings.load_state_dict({k[len("mappings/"):]: v for k, v in tensors.items() if k.startswith("mappings/")},
                                 strict=True)
        return Pfm(config, mappings, tensors)

    @staticmethod
    def training_state(params: PfmParams, context: TrainingContext) -> PfmTrainingState:
        return PfmTrainingState(params, context)

    @staticmethod
    def published(params: PfmParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The mappings and the error variances of the last checkpoint, one model for every category."""
        mappings = renamed(tensors, "model/", "mappings/")
        sums = {k[len("error_sums/"):]: v for k, v in tensors.items() if k.startswith("error_sums/")}
        return Published(
            config=params.model, tensors={ALL_CATEGORIES: {**mappings, **variances_from_sums(sums)}},
            info={"class_names": list(context.class_names), "steps": meta["step"],
                  "variance_steps": params.variance_steps},
            summary=PfmImplementation.describe(params.model))


IMPLEMENTATION = PfmImplementation()
