"""The network and the noise schedule, built with diffusers from a `DdpmConfig`.

The network is a diffusers `UNet2DModel` predicting the noise eps (and, with `learned_variance`, a
second set of channels v in [-1, 1] that interpolates the reverse-process log variance between the
posterior variance and beta_t; Nichol & Dhariwal 2021). The noise schedule is a diffusers
`DDPMScheduler` built from the same config, so a saved model also runs in a stock diffusers
pipeline. `check_class_labels` is the conditioning check that training and sampling share.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from pipelines.models.diffusion.config import _ATTENTION_HEAD_DIM, DdpmConfig, _norm_groups


def build_unet(config: DdpmConfig) -> UNet2DModel:
    levels = range(len(config.block_out_channels))
    attention = set(config.attention_blocks)
    down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(levels))  # deepest first
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.in_channels * (2 if config.learned_variance else 1),
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=_ATTENTION_HEAD_DIM,
        norm_num_groups=_norm_groups(config.block_out_channels),
        num_class_embeds=config.num_classes or None,
        dropout=config.dropout,
    )


def build_scheduler(config: DdpmConfig) -> DDPMScheduler:
    # "linear" is diffusers' beta 1e-4 .. 0.02 (Ho et al.); clip_sample keeps predicted x0 in [-1, 1].
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        variance_type="learned_range" if config.learned_variance else "fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    )


def check_class_labels(config: DdpmConfig, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
    if config.num_classes == 0:
        if labels is not None:
            raise ValueError("class labels given to an unconditional model (num_classes = 0)")
        return None
    if labels is None:
        raise ValueError(
            f"the model is class-conditional (num_classes = {config.num_classes}): class labels are required")
    labels = torch.as_tensor(labels).to(device=device, dtype=torch.long).reshape(-1)
    if labels.shape[0] != batch:
        raise ValueError(f"got {labels.shape[0]} class labels for {batch} images")
    if labels.numel() and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(f"class labels must be in 0..{config.num_classes - 1}, got {labels.tolist()}")
    return labels
