"""The DDPM's side of the method contract (`pipelines.models.methods`): build a U-Net from an
artifact, the state the gradient train path (`pipelines.stages.train_gradient`) drives, and what a
finished run publishes (the EMA weights). Pure torch; no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel

from pipelines.models.artifacts import ALL_CATEGORIES
from pipelines.models.diffusion import samplers
from pipelines.models.diffusion.config import DdpmConfig, DdpmParams
from pipelines.models.diffusion.process import AuxiliaryLoss
from pipelines.models.diffusion.training import TrainingState
from pipelines.models.diffusion.unet import build_scheduler, build_unet
from pipelines.models.methods import Published, TrainingBatch, TrainingContext


def to_model_input(pixels: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float in [-1, 1], the DDPM's data range."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class DdpmTrainingState:
    """`TrainingState` of the contract: categories become class labels when the model is
    class-conditional; the U-Net's own `TrainingState` does the step and the checkpoint."""

    def __init__(self, params: DdpmParams, context: TrainingContext,
                 build: Callable[[DdpmConfig], torch.nn.Module] = build_unet):
        self.config = model_config(params, context.class_names)
        self.classes = {name: index for index, name in enumerate(context.class_names)}
        self.state = TrainingState(self.config, params.optim, params.training.steps, device=context.device,
                                   seed=params.training.seed, build=build)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def module(self) -> torch.nn.Module:
        return self.state.module

    @property
    def forward_model(self) -> torch.nn.Module:
        return self.state.forward_model

    @forward_model.setter
    def forward_model(self, model: torch.nn.Module) -> None:
        self.state.forward_model = model

    def train_batch(self, batch: TrainingBatch, generator: torch.Generator, autocast_dtype: torch.dtype | None,
                    auxiliary: Callable[[torch.Tensor], AuxiliaryLoss] | None = None) -> dict[str, float]:
        """One step; `auxiliary`, given the batch as model input, makes the step's extra loss terms."""
        device = self.state.device
        labels = self.class_labels(batch)
        images = to_model_input(batch.pixels, device)
        return self.state.train_step(images, labels, generator, autocast_dtype=autocast_dtype,
                                     auxiliary=auxiliary(images) if auxiliary else None)

    def class_labels(self, batch: TrainingBatch) -> torch.Tensor | None:
        """(B,) class indices of the batch's categories, on the training device; None when unconditional."""
        if not self.config.num_classes:
            return None
        return torch.tensor([self.classes[c] for c in batch.categories], dtype=torch.long, device=self.state.device)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.state.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.state.load_state_tensors(tensors, meta)


def model_config(params: DdpmParams, class_names: tuple[str, ...]) -> DdpmConfig:
    """The network that is trained and saved: one class per category when class-conditional."""
    return replace(params.model, num_classes=len(class_names) if params.class_conditional else 0)


def ema_weights(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The EMA U-Net of a training checkpoint's tensors (what is published), its names under `prefix`."""
    return {prefix + name[len("ema/"):]: tensor for name, tensor in tensors.items() if name.startswith("ema/")}


def unet_from(config: DdpmConfig, tensors: dict[str, torch.Tensor], prefix: str) -> UNet2DModel:
    """The U-Net whose weights are the `prefix`-named tensors of an artifact (a detector's, beside its own)."""
    return DdpmImplementation.build(config, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


class DdpmImplementation:
    @staticmethod
    def build(config: DdpmConfig, tensors: dict[str, torch.Tensor] | None) -> UNet2DModel:
        model = build_unet(config)
        if tensors is not None:
            model.load_state_dict(tensors, strict=True)
        return model

    @staticmethod
    def sample(model: UNet2DModel, config: DdpmConfig, count: int, steps: int,
               generators: Sequence[torch.Generator], class_labels: torch.Tensor | None = None,
               variance_scale: float | Sequence[float] = 0.0, device: str = "cpu",
               batch_size: int = 16) -> np.ndarray:
        """uint8 (count, H, W, C) images: ancestral sampling, one generator (and strength) per image."""
        return samplers.sample(model, config, count, steps, generators, class_labels=class_labels,
                               variance_scale=variance_scale, device=device, batch_size=batch_size)

    @staticmethod
    def training_state(params: DdpmParams, context: TrainingContext) -> DdpmTrainingState:
        return DdpmTrainingState(params, context)

    @staticmethod
    def published(params: DdpmParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The EMA weights of the last checkpoint, under the all-categories key."""
        config = model_config(params, context.class_names)
        ema = ema_weights(tensors)
        conditioning = (f"class-conditional over {config.num_classes} classes" if config.num_classes
                        else "unconditional")
        return Published(
            config=config, tensors={ALL_CATEGORIES: ema},
            info={"class_names": list(context.class_names), "steps": meta["step"], "optim": meta.get("optim"),
                  "scheduler": dict(build_scheduler(config).config), "weights": "ema"},
            summary=(f"ddpm ({config.image_size}px, channels {list(config.block_out_channels)}, {conditioning}"
                     f"{', learned variance' if config.learned_variance else ''})"))


IMPLEMENTATION = DdpmImplementation()
