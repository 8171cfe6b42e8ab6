"""Training: `TrainingState` is the one train step (AdamW with the `lr_multiplier` schedule,
gradient clipping, EMA), used by the Ray Train loop in `pipelines/stages` and by a plain loop
alike, and what a checkpoint holds (flat tensors + JSON; nothing is pickled).

A step is deterministic given the caller's generator: t, the noise and (through
`_global_rng_seeded`) dropout are all drawn from it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Callable

import torch
from torch import nn

from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
from pipelines.models.diffusion.process import AuxiliaryLoss, Diffusion
from pipelines.models.diffusion.unet import build_unet, check_class_labels
from pipelines.models.optimizer_state import optimizer_tensor_names, optimizer_tensors, restore_optimizer


def lr_multiplier(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Factor on `optim.lr` at 0-based `step`: linear warm-up (1/W, 2/W, ..., 1), then constant or
    a cosine from 1 down to `min_lr_ratio` at `total_steps` (and held there after)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def _global_rng_seeded(seed: int, device: torch.device):
    """Dropout draws from torch's global generator; seeding it from the caller's generator inside a
    fork makes a step depend on that generator alone, and leaves the global state as it was."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _to_json(value):
    return json.loads(json.dumps(value))


_META_FORMAT = "adpipe.ddpm-train/1"


class TrainingState:
    """Model, EMA copy, optimizer and step counter: what one train step changes and a checkpoint holds."""

    def __init__(self, config: DdpmConfig, optim: OptimConfig, total_steps: int, device: str = "cpu", seed: int = 0,
                 build: Callable[[DdpmConfig], nn.Module] = build_unet):
        self.config = config.validate("model")
        self.optim = optim.validate("optim")
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.total_steps = total_steps
        self.device = torch.device(device)
        # Built on the CPU from `seed` so that every rank starts from the same weights; the fork
        # keeps the caller's global generator untouched. `build` may wrap the U-Net (a detector's
        # extra head): whatever it returns is trained, averaged and checkpointed as one module.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build(config)
        self.module: nn.Module = module.to(self.device).train()
        self.forward_model: nn.Module = self.module  # the Ray glue swaps in a DDP wrapper
        self.ema: nn.Module = copy.deepcopy(self.module).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay
        )
        self.diffusion = Diffusion(config)
        self.step = 0

    def train_step(self, images: torch.Tensor, class_labels: torch.Tensor | None, generator: torch.Generator,
                   autocast_dtype: torch.dtype | None = None,
                   auxiliary: AuxiliaryLoss | None = None) -> dict[str, float]:
        """One optimizer step on images in [-1, 1], (B, C, H, W). Random draws (t, noise, dropout)
        come from `generator` only; `auxiliary` as `Diffusion.training_losses`."""
        images = images.to(self.device, torch.float32)
        low, high = torch.aminmax(images)
        if low < -1 or high > 1:
            raise ValueError(f"images must be scaled to [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]")
        class_labels = check_class_labels(self.config, class_labels, images.shape[0], self.device)
        lr = self.optim.lr * lr_multiplier(self.step, self.total_steps, self.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        rng: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self.config.dropout > 0:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
            rng = _global_rng_seeded(seed, self.device)
        with rng:
            losses = self.diffusion.training_losses(self.forward_model, images, class_labels, generator,
                                                    autocast_dtype=autocast_dtype, auxiliary=auxiliary)
        losses["loss"].backward()
        parameters = list(self.module.parameters())
        if self.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        return {**{k: float(v.item()) for k, v in losses.items()}, "lr": lr, "grad_norm": float(grad_norm.item())}

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.optim.ema_decay
        for ema, live in zip(self.ema.parameters(), self.module.parameters(), strict=True):
            ema.lerp_(live, 1.0 - decay)
        for ema_buffer, live_buffer in zip(self.ema.buffers(), self.module.buffers(), strict=True):
            ema_buffer.copy_(live_buffer)

    # ---- checkpoints ----

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta): independent contiguous CPU tensors for safetensors, and JSON-able meta.

        Keys: "model/<name>", "ema/<name>", "optim/<param index>/<exp_avg|exp_avg_sq>". The
        caller's generator state is not part of it: save it alongside for an exact resume.
        """
        tensors: dict[str, torch.Tensor] = {}
        for prefix, model in (("model", self.module), ("ema", self.ema)):
            for name, value in model.state_dict().items():
                tensors[f"{prefix}/{name}"] = value.detach().to("cpu", copy=True).contiguous()
        optimizer_state, adam_steps = optimizer_tensors(self.optimizer)
        tensors.update(optimizer_state)
        groups = [{k: v for k, v in group.items() if k != "params"}
                  for group in self.optimizer.state_dict()["param_groups"]]
        meta = {
            "format": _META_FORMAT,
            "step": self.step,
            "total_steps": self.total_steps,
            "config": dataclasses.asdict(self.config),
            "optim": dataclasses.asdict(self.optim),
            "optimizer": {"param_groups": groups, "adam_steps": adam_steps},
        }
        return tensors, _to_json(meta)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore exactly what `state_tensors` saved; the next step is bitwise the one that would
        have followed. The configs and total_steps must be the ones this state was built with."""
        if meta.get("format") != _META_FORMAT:
            raise ValueError(
                f"not a DDPM training checkpoint: format {meta.get('format')!r}, expected {_META_FORMAT!r}")
        mine = _to_json({"config": dataclasses.asdict(self.config), "optim": dataclasses.asdict(self.optim),
                         "total_steps": self.total_steps})
        for key, value in mine.items():
            if meta.get(key) != value:
                raise ValueError(
                    f"checkpoint {key} differs from this run's: checkpoint {meta.get(key)}, this run {value}")
        expected = {f"{prefix}/{name}" for prefix, model in (("model", self.module), ("ema", self.ema))
                    for name in model.state_dict()}
        adam_steps = meta["optimizer"]["adam_steps"]  # empty before the first step
        expected |= optimizer_tensor_names(adam_steps)
        if set(tensors) != expected:
            missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"checkpoint tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for prefix, model in (("model", self.module), ("ema", self.ema)):
            model.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")})
        count = len(list(self.module.parameters()))
        groups = [{**group, "betas": tuple(group["betas"]), "params": list(range(count))}
                  for group in meta["optimizer"]["param_groups"]]
        restore_optimizer(self.optimizer, tensors, adam_steps, groups)
        self.step = int(meta["step"])
