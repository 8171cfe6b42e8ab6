"""The DDPM parameter dataclasses and their checks: `DdpmConfig` (what is learnt; saved with the
weights, rebuilding from it gives the same network), `OptimConfig` (how it is learnt) and
`DdpmParams` (the train step's `ddpm:` block: those two, the training run and class conditioning).

Only the standard library and torch-free project modules are imported here, so that a
job spec parses and validates without torch, numpy or diffusers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.errors import SpecError
from pipelines.models.methods import GradientTrainingSpec
from pipelines.spec_fields import check_image_size, parse_fields

_ATTENTION_HEAD_DIM = 8  # diffusers' default; attention needs channels divisible by it
_MAX_NORM_GROUPS = 32  # diffusers' (and improved DDPM's) GroupNorm group count


def _norm_groups(channels: tuple[int, ...]) -> int:
    """GroupNorm groups: 32 as usual, fewer for narrow (test-sized) networks."""
    return min(_MAX_NORM_GROUPS, min(channels))

@dataclass(frozen=True)
class DdpmConfig:
    """The model: what is learnt. Saved with the weights; rebuilding from it gives the same network."""

    image_size: int = 64
    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_blocks: tuple[int, ...] = ()  # levels with self-attention (the middle block always has it)
    layers_per_block: int = 1
    num_classes: int = 0  # > 0: class-conditional (one unified model over categories)
    learned_variance: bool = False  # output (eps, v), trained with the hybrid loss
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    vlb_weight: float = 0.001  # lambda of the hybrid loss L_simple + lambda * L_vlb
    dropout: float = 0.0

    def validate(self, path: str) -> DdpmConfig:
        channels = self.block_out_channels
        if not channels or any(c <= 0 for c in channels):
            raise SpecError(f"{path}.block_out_channels",
                            f"must be a non-empty list of positive integers, got {list(channels)}")
        groups = _norm_groups(channels)
        if any(c % groups for c in channels):
            raise SpecError(
                f"{path}.block_out_channels",
                f"every channel count must be divisible by the GroupNorm group count {groups} "
                f"(= min(32, smallest channel count)), got {list(channels)}",
            )
        levels = len(channels)
        factor = 2 ** (levels - 1)
        if self.image_size <= 0 or self.image_size % factor:
            raise SpecError(
                f"{path}.image_size",
                f"must be a positive multiple of {factor} (the U-Net halves it {levels - 1} times "
                f"for {levels} levels), got {self.image_size}",
            )
        for i, level in enumerate(self.attention_blocks):
            if not 0 <= level < levels:
                raise SpecError(f"{path}.attention_blocks[{i}]", f"level {level} out of range 0..{levels - 1}")
        if len(set(self.attention_blocks)) != len(self.attention_blocks):
            raise SpecError(f"{path}.attention_blocks", f"duplicate levels in {list(self.attention_blocks)}")
        for level in (*self.attention_blocks, levels - 1):  # the last level: the middle block's attention
            if channels[level] % _ATTENTION_HEAD_DIM:
                raise SpecError(
                    f"{path}.block_out_channels",
                    f"level {level} has attention, so its channel count must be a multiple of "
                    f"{_ATTENTION_HEAD_DIM} (the head size), got {channels[level]}",
                )
        positive = {"in_channels": self.in_channels, "layers_per_block": self.layers_per_block}
        for name, value in positive.items():
            if value < 1:
                raise SpecError(f"{path}.{name}", f"must be at least 1, got {value}")
        if self.num_classes < 0:
            raise SpecError(f"{path}.num_classes", f"must be 0 (unconditional) or positive, got {self.num_classes}")
        if self.num_train_timesteps < 2:
            raise SpecError(f"{path}.num_train_timesteps", f"must be at least 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in ("linear", "squaredcos_cap_v2"):
            raise SpecError(f"{path}.beta_schedule",
                            f"expected 'linear' or 'squaredcos_cap_v2', got {self.beta_schedule!r}")
        if not (math.isfinite(self.vlb_weight) and self.vlb_weight >= 0):
            raise SpecError(f"{path}.vlb_weight", f"must be a finite number >= 0, got {self.vlb_weight}")
        if not 0 <= self.dropout < 1:
            raise SpecError(f"{path}.dropout", f"must be in [0, 1), got {self.dropout}")
        return self


@dataclass(frozen=True)
class OptimConfig:
    """How the model is learnt: AdamW, linear warm-up then constant or cosine lr, grad clip, EMA."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "cosine"  # after warm-up
    min_lr_ratio: float = 0.0  # cosine ends at min_lr_ratio * lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    ema_decay: float = 0.999

    def validate(self, path: str) -> OptimConfig:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SpecError(f"{path}.lr", f"must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SpecError(f"{path}.weight_decay", f"must be a finite number >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise SpecError(f"{path}.{name}", f"must be in [0, 1), got {value}")
        if self.warmup_steps < 0:
            raise SpecError(f"{path}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("constant", "cosine"):
            raise SpecError(f"{path}.schedule", f"expected 'constant' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SpecError(f"{path}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise SpecError(f"{path}.grad_clip", f"must be a finite number >= 0 (0 = off), got {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise SpecError(f"{path}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        return self


@dataclass(frozen=True)
class DdpmParams:
    """The train step's `ddpm:` block: the network, how it is optimised, the training run."""

    model: DdpmConfig = DdpmConfig()
    optim: OptimConfig = OptimConfig()
    training: GradientTrainingSpec = GradientTrainingSpec()
    class_conditional: bool = False  # one model over all categories, the category embedded as a class

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def validate(self, path: str) -> DdpmParams:
        # DdpmConfig checks that the U-Net can halve it; the bounds are every image size's.
        check_image_size(self.model.image_size, f"{path}.model.image_size", minimum=8)
        if self.model.num_classes:
            raise SpecError(f"{path}.model.num_classes", "is set from the dataset's categories: "
                                                         f"use {path}.class_conditional: true instead")
        return self

    @classmethod
    def from_spec_data(cls, data: Mapping[str, Any], path: str) -> DdpmParams:
        """The generic parse, after pointing keys of the old layout (U-Net fields directly under
        `ddpm:`, `class_conditional` under `training:`) to where they are written now."""
        network = {f.name for f in dataclasses.fields(DdpmConfig)}
        for key in data:
            if key in network:
                raise SpecError(f"{path}.{key}", f"the U-Net's settings are written under {path}.model now: "
                                                 f"write {path}.model.{key}")
        training = data.get("training")
        if isinstance(training, Mapping) and "class_conditional" in training:
            raise SpecError(f"{path}.training.class_conditional",
                            f"is written as {path}.class_conditional now (it is the DDPM's, not the training run's)")
        return parse_fields(cls, data, path)
