"""DDPM (Ho et al. 2020) with the improved-DDPM learned variance (Nichol & Dhariwal 2021): training
and ancestral sampling, in plain torch. The Ray Train glue lives in `pipelines/stages`; nothing here
knows about Ray.

- The network is a diffusers `UNet2DModel` predicting the noise eps (and, with `learned_variance`,
  a second set of channels v in [-1, 1] that interpolates the reverse-process log variance between
  the posterior variance and beta_t).
- The noise schedule comes from a diffusers `DDPMScheduler` built from the same config, so a saved
  model also runs in a stock diffusers pipeline. Its coefficient tables are kept here in float64;
  tensors on the model side are float32.
- Loss: the noise MSE ("L_simple"); with a learned variance plus `vlb_weight` times the variational
  bound, whose gradient reaches only the variance channels (stop-gradient on the mean).
- `TrainingState` is the one train step, used by the Ray Train loop and by a plain loop alike, and
  what a checkpoint holds (flat tensors + JSON; nothing is pickled).
- `sample` is ancestral sampling over respaced timesteps with RealNet's SDAS strength s: the noise
  term is scaled by sqrt(1 + s).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from pipelines.errors import SpecError

_ATTENTION_HEAD_DIM = 8  # diffusers' default; attention needs channels divisible by it
_MAX_NORM_GROUPS = 32  # diffusers' (and improved DDPM's) GroupNorm group count
_LOG2 = math.log(2.0)


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
            raise SpecError(f"{path}.block_out_channels", f"must be a non-empty list of positive integers, got {list(channels)}")
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
            raise SpecError(f"{path}.beta_schedule", f"expected 'linear' or 'squaredcos_cap_v2', got {self.beta_schedule!r}")
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


def lr_multiplier(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Factor on `optim.lr` at 0-based `step`: linear warm-up (1/W, 2/W, ..., 1), then constant or
    a cosine from 1 down to `min_lr_ratio` at `total_steps` (and held there after)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- the diffusion process -------------------------------------------------------------------


def _normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (log_var2 - log_var1 - 1.0 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """log P(x) per element for 8-bit data scaled to [-1, 1]: the Gaussian's mass on x's bin of width
    2/255; the outermost bins extend to -inf and +inf (Ho et al. 2020, eq. 13)."""
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255)
    lower = inv_std * (x - mean - 1.0 / 255)
    # Mass between the edges, computed on the side of the mean where it is not a difference of
    # two numbers close to 1 (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)).
    mass = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                       torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_mass = torch.log(mass.clamp(min=1e-12))
    return torch.where(x < -0.999, torch.special.log_ndtr(upper),
                       torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_mass))


def _mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class Diffusion:
    """The forward process q and the reverse-process parameterisation p, from a beta table.

    Coefficient tables are float64; each lookup is cast to the data's dtype (float32) before it
    touches a tensor, so model-side arithmetic stays float32. `t` is a (B,) int64 tensor.
    """

    def __init__(self, config: DdpmConfig):
        self.config = config
        self._set_betas(build_scheduler(config).betas.to(torch.float64))

    @classmethod
    def _with_betas(cls, config: DdpmConfig, betas: torch.Tensor) -> Diffusion:
        """A process with other betas: the respaced chain used for sampling."""
        diffusion = cls.__new__(cls)
        diffusion.config = config
        diffusion._set_betas(betas.to(torch.float64))
        return diffusion

    def _set_betas(self, betas: torch.Tensor) -> None:
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, beta~_t), Ho et al. eq. 6-7.
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        # beta~_0 = 0: its log is replaced by beta~_1's, as in improved DDPM (only a lower bound
        # of the learned-range interpolation at t = 0, where no noise is ever added).
        first = self.posterior_variance[1:2] if len(betas) > 1 else betas[:1]  # a 1-step chain: unused
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as (B, 1, 1, 1) in `like`'s dtype and device."""
        values = table.to(t.device)[t].to(device=like.device, dtype=like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I), reparameterised with `noise`."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def posterior_mean_variance(self, x0, xt, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x0); the last two as (B,1,1,1)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    def p_mean_variance(self, model_output, xt, t, *, clip_x0: bool = False):
        """(mean, variance, log variance, predicted x0) of p(x_{t-1} | x_t) from the network output.

        Fixed variance: beta~_t. Learned: log var = f log beta_t + (1 - f) log beta~_t with
        f = (v + 1) / 2 (improved DDPM eq. 15). `clip_x0` clamps x0 to [-1, 1] (sampling only; the
        training bound uses the unclipped prediction).
        """
        channels = xt.shape[1]
        if self.config.learned_variance:
            eps, v = model_output[:, :channels], model_output[:, channels:]
            min_log = self._at(self.posterior_log_variance_clipped, t, xt)
            max_log = self._at(torch.log(self.betas), t, xt)
            fraction = (v + 1) / 2
            log_variance = fraction * max_log + (1 - fraction) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output
            variance = self._at(self.posterior_variance, t, xt)
            log_variance = self._at(self.posterior_log_variance_clipped, t, xt)
        pred_x0 = self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        if clip_x0:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.posterior_mean_variance(pred_x0, xt, t)
        return mean, variance, log_variance, pred_x0

    def _vlb_terms(self, model_output, x0, xt, t) -> torch.Tensor:
        """Per example, in bits per dimension: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and
        the decoder's -log p(x0 | x1) for t == 0 (the terms L_{t-1} of Ho et al. eq. 5)."""
        true_mean, _, true_log_variance = self.posterior_mean_variance(x0, xt, t)
        mean, _, log_variance, _ = self.p_mean_variance(model_output, xt, t)
        kl = _mean_over_pixels(_normal_kl(true_mean, true_log_variance, mean, log_variance)) / _LOG2
        nll = -_mean_over_pixels(_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / _LOG2
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: nn.Module, x0: torch.Tensor, class_labels: torch.Tensor | None,
                        generator: torch.Generator, *, autocast_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{"loss", "mse", "vlb"}, each a scalar averaged over the batch.

        t ~ U{0..T-1} and the noise are drawn from `generator` (on its device). "vlb" is the
        one-sample estimate T * L_t of the whole bound L_vlb = sum_t L_t (bits/dim, improved DDPM's
        definition), so `vlb_weight` is the paper's lambda: loss = mse + lambda * vlb. It is
        computed with the predicted mean detached, so it trains only the variance channels.
        """
        batch = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=generator.device).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        xt = self.q_sample(x0, t, noise)
        autocast = torch.autocast(xt.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with autocast:
            output = model(xt, t, class_labels=class_labels).sample
        output = output.float()  # the losses run in float32 whatever the forward ran in
        eps = output[:, : x0.shape[1]]
        mse = _mean_over_pixels((noise - eps) ** 2).mean()
        if self.config.learned_variance:
            frozen = torch.cat([eps.detach(), output[:, x0.shape[1]:]], dim=1)
            vlb = self._vlb_terms(frozen, x0, xt, t).mean() * self.num_timesteps
        else:
            vlb = torch.zeros((), device=x0.device)
        return {"loss": mse + self.config.vlb_weight * vlb, "mse": mse, "vlb": vlb}


# ---- training --------------------------------------------------------------------------------


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

    def __init__(self, config: DdpmConfig, optim: OptimConfig, total_steps: int, device: str = "cpu", seed: int = 0):
        self.config = config.validate("model")
        self.optim = optim.validate("optim")
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.total_steps = total_steps
        self.device = torch.device(device)
        # Built on the CPU from `seed` so that every rank starts from the same weights; the fork
        # keeps the caller's global generator untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build_unet(config)
        self.module: UNet2DModel = module.to(self.device).train()
        self.forward_model: nn.Module = self.module  # the Ray glue swaps in a DDP wrapper
        self.ema: UNet2DModel = copy.deepcopy(self.module).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay
        )
        self.diffusion = Diffusion(config)
        self.step = 0

    def train_step(self, images: torch.Tensor, class_labels: torch.Tensor | None, generator: torch.Generator,
                   autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
        """One optimizer step on images in [-1, 1], (B, C, H, W). Random draws (t, noise, dropout)
        come from `generator` only."""
        images = images.to(self.device, torch.float32)
        low, high = torch.aminmax(images)
        if low < -1 or high > 1:
            raise ValueError(f"images must be scaled to [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]")
        class_labels = _check_labels(self.config, class_labels, images.shape[0], self.device)
        lr = self.optim.lr * lr_multiplier(self.step, self.total_steps, self.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        rng = contextlib.nullcontext()
        if self.config.dropout > 0:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
            rng = _global_rng_seeded(seed, self.device)
        with rng:
            losses = self.diffusion.training_losses(self.forward_model, images, class_labels, generator,
                                                    autocast_dtype=autocast_dtype)
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
        for ema, live in zip(self.ema.buffers(), self.module.buffers(), strict=True):
            ema.copy_(live)

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
        optimizer = self.optimizer.state_dict()
        adam_steps = {}
        for index, state in optimizer["state"].items():
            for name, value in state.items():
                if name == "step":
                    adam_steps[str(index)] = float(value)
                else:
                    tensors[f"optim/{index}/{name}"] = value.detach().to("cpu", copy=True).contiguous()
        groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer["param_groups"]]
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
            raise ValueError(f"not a DDPM training checkpoint: format {meta.get('format')!r}, expected {_META_FORMAT!r}")
        mine = _to_json({"config": dataclasses.asdict(self.config), "optim": dataclasses.asdict(self.optim),
                         "total_steps": self.total_steps})
        for key, value in mine.items():
            if meta.get(key) != value:
                raise ValueError(f"checkpoint {key} differs from this run's: checkpoint {meta.get(key)}, this run {value}")
        expected = {f"{prefix}/{name}" for prefix, model in (("model", self.module), ("ema", self.ema))
                    for name in model.state_dict()}
        adam_steps = meta["optimizer"]["adam_steps"]  # empty before the first step
        expected |= {f"optim/{index}/{name}" for index in adam_steps for name in ("exp_avg", "exp_avg_sq")}
        if set(tensors) != expected:
            missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"checkpoint tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for prefix, model in (("model", self.module), ("ema", self.ema)):
            model.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")})
        # Clone: the optimizer may keep the given tensors as its state and update them in place.
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, index, name = key.split("/")
                state.setdefault(int(index), {})[name] = value.clone()
        for index, step in adam_steps.items():
            state[int(index)]["step"] = torch.tensor(step, dtype=torch.float32)
        count = len(list(self.module.parameters()))
        groups = [{**group, "betas": tuple(group["betas"]), "params": list(range(count))}
                  for group in meta["optimizer"]["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.step = int(meta["step"])


def _check_labels(config: DdpmConfig, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
    if config.num_classes == 0:
        if labels is not None:
            raise ValueError("class labels given to an unconditional model (num_classes = 0)")
        return None
    if labels is None:
        raise ValueError(f"the model is class-conditional (num_classes = {config.num_classes}): class labels are required")
    labels = torch.as_tensor(labels).to(device=device, dtype=torch.long).reshape(-1)
    if labels.shape[0] != batch:
        raise ValueError(f"got {labels.shape[0]} class labels for {batch} images")
    if labels.numel() and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(f"class labels must be in 0..{config.num_classes - 1}, got {labels.tolist()}")
    return labels


# ---- sampling --------------------------------------------------------------------------------


def _respaced_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """diffusers' "leading" spacing, ascending: 0, r, 2r, ..., (steps-1) r with r = T // steps.
    It always ends the chain at t = 0, so the last step is the true decoder step."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps} (the training timesteps), got {steps}")
    ratio = num_train_timesteps // steps
    return [i * ratio for i in range(steps)]


def _respaced(config: DdpmConfig, steps: int) -> tuple[Diffusion, list[int]]:
    """The chain over the kept timesteps s_0 < s_1 < ...: beta_i = 1 - ab[s_i] / ab[s_{i-1}] (ab[s_-1]
    = 1), so its cumulative products are the original ab at the kept steps (improved DDPM sec. 4)."""
    timesteps = _respaced_timesteps(config.num_train_timesteps, steps)
    alphas_cumprod = Diffusion(config).alphas_cumprod[timesteps]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return Diffusion._with_betas(config, 1.0 - alphas_cumprod / previous), timesteps


def _p_sample_step(diffusion: Diffusion, model_output, x, index: int, noise,
                   variance_scale: float | torch.Tensor) -> torch.Tensor:
    """x_{t-1} = mean + sqrt(1 + s) * sigma * noise at respaced index `index`; no noise at index 0.
    `variance_scale` is one s, or one per image (a (N,) tensor)."""
    t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
    mean, _, log_variance, _ = diffusion.p_mean_variance(model_output, x, t, clip_x0=True)
    if index == 0:
        return mean
    if isinstance(variance_scale, torch.Tensor):
        scale = torch.sqrt(1.0 + variance_scale.to(x.device, torch.float32)).view(-1, 1, 1, 1)
    else:
        scale = math.sqrt(1.0 + variance_scale)
    return mean + scale * torch.exp(0.5 * log_variance) * noise


def _normal(generator: torch.Generator | Sequence[torch.Generator], start: int, n: int, shape: tuple[int, ...],
            device: str) -> torch.Tensor:
    """(n, *shape) standard normal noise: from one generator, or row i from its own generator
    `generator[start + i]` (so that an image's noise does not depend on the others in its batch)."""
    if isinstance(generator, torch.Generator):
        return torch.randn((n, *shape), generator=generator, device=generator.device).to(device)
    return torch.stack([torch.randn(shape, generator=g, device=g.device).to(device)
                        for g in generator[start:start + n]])


@torch.no_grad()
def _sample_tensor(model: UNet2DModel, config: DdpmConfig, count: int, steps: int,
                   generator: torch.Generator | Sequence[torch.Generator], class_labels=None,
                   variance_scale: float | Sequence[float] = 0.0, device: str = "cpu",
                   batch_size: int = 16) -> torch.Tensor:
    """`sample` before quantisation: float32 (count, C, H, W) in [-1, 1], on `device`."""
    if count < 0 or batch_size < 1:
        raise ValueError(f"need count >= 0 and batch_size >= 1, got {count} and {batch_size}")
    if not isinstance(generator, torch.Generator) and len(generator) != count:
        raise ValueError(f"one generator per image: got {len(generator)} for {count} images")
    scales = [variance_scale] if isinstance(variance_scale, (int, float)) else list(variance_scale)
    if not isinstance(variance_scale, (int, float)) and len(scales) != count:
        raise ValueError(f"one variance_scale per image: got {len(scales)} for {count} images")
    if not all(math.isfinite(s) and s >= 0 for s in scales):
        raise ValueError(f"variance_scale (SDAS strength) must be finite numbers >= 0, got {variance_scale}")
    labels = _check_labels(config, class_labels, count, device)
    diffusion, timesteps = _respaced(config, steps)
    shape = (config.in_channels, config.image_size, config.image_size)
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            chunk_labels = None if labels is None else labels[start:start + n]
            chunk_scale = variance_scale if isinstance(variance_scale, (int, float)) else \
                torch.tensor(scales[start:start + n], dtype=torch.float32)
            x = _normal(generator, start, n, shape, device)
            for index in reversed(range(len(timesteps))):
                t = torch.full((n,), timesteps[index], dtype=torch.long, device=device)
                output = model(x, t, class_labels=chunk_labels).sample.float()
                noise = None
                if index > 0:  # drawn after the forward, like diffusers' DDPMScheduler.step
                    noise = _normal(generator, start, n, shape, device)
                x = _p_sample_step(diffusion, output, x, index, noise, chunk_scale)
            chunks.append(x)
        return torch.cat(chunks) if chunks else torch.empty((0, *shape), device=device)
    finally:
        model.train(was_training)


def sample(model: UNet2DModel, config: DdpmConfig, count: int, steps: int,
           generator: torch.Generator | Sequence[torch.Generator], class_labels: torch.Tensor | None = None,
           variance_scale: float | Sequence[float] = 0.0, device: str = "cpu", batch_size: int = 16) -> np.ndarray:
    """Ancestral sampling over `steps` timesteps spaced like diffusers' default ("leading":
    0, r, ..., (steps-1) r with r = T // steps), as uint8 (count, H, W, C).

    Predicted x0 is clipped to [-1, 1]; the variance is the respaced posterior variance, or the
    learned interpolation between it and the respaced beta. `variance_scale` is RealNet's SDAS
    strength s: the noise term is multiplied by sqrt(1 + s) (0 gives normal samples). Deterministic
    given `generator` (all noise is drawn from it, on its device, then moved to `device`). With one
    generator (and one s) per image, each image's noise depends only on its own generator.
    """
    images = _sample_tensor(model, config, count, steps, generator, class_labels, variance_scale, device, batch_size)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
