"""The diffusion process: `Diffusion` holds the forward process q, the posterior q(x_{t-1} | x_t, x0)
and the reverse-process parameterisation p of DDPM (Ho et al. 2020), with the learned variance of
improved DDPM (Nichol & Dhariwal 2021), and computes the training losses.

- Loss: the noise MSE ("L_simple"); with a learned variance plus `vlb_weight` times the
  variational bound, whose gradient reaches only the variance channels (stop-gradient on the mean).
- The beta table comes from the diffusers scheduler (`unet.build_scheduler`); the coefficient
  tables are kept here in float64, tensors on the model side are float32.

Samplers (and scoring) build on this class rather than extend it: the bound's terms (`_vlb_terms`)
and the math helpers below (normal KL, discretized Gaussian log-likelihood) are there to reuse.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipelines.models.diffusion.config import DdpmConfig
from pipelines.models.diffusion.unet import build_scheduler

_LOG2 = math.log(2.0)

# Extra loss terms from the same forward as the noise loss: output object -> {name: (weight, loss)}.
AuxiliaryLoss = Callable[[Any], dict[str, tuple[float, torch.Tensor]]]


def _normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (log_var2 - log_var1 - 1.0 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


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
        return (self._at(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

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
        pred_x0 = (self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt
                   - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps)
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
                        generator: torch.Generator, *, autocast_dtype: torch.dtype | None = None,
                        auxiliary: AuxiliaryLoss | None = None) -> dict[str, torch.Tensor]:
        """{"loss", "mse", "vlb"}, each a scalar averaged over the batch, and the `auxiliary` terms.

        t ~ U{0..T-1} and the noise are drawn from `generator` (on its device). "vlb" is the
        one-sample estimate T * L_t of the whole bound L_vlb = sum_t L_t (bits/dim, improved DDPM's
        definition), so `vlb_weight` is the paper's lambda: loss = mse + lambda * vlb. It is
        computed with the predicted mean detached, so it trains only the variance channels.
        `auxiliary`, given the network's output object (a second head's prediction from the same
        forward), returns {name: (weight, loss)}: each loss is reported and weight x loss added.
        """
        batch = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=generator.device).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        xt = self.q_sample(x0, t, noise)
        autocast = torch.autocast(xt.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with autocast:
            result = model(xt, t, class_labels=class_labels)
        output = result.sample.float()  # the losses run in float32 whatever the forward ran in
        eps = output[:, : x0.shape[1]]
        mse = _mean_over_pixels((noise - eps) ** 2).mean()
        if self.config.learned_variance:
            frozen = torch.cat([eps.detach(), output[:, x0.shape[1]:]], dim=1)
            vlb = self._vlb_terms(frozen, x0, xt, t).mean() * self.num_timesteps
        else:
            vlb = torch.zeros((), device=x0.device)
        losses = {"loss": mse + self.config.vlb_weight * vlb, "mse": mse, "vlb": vlb}
        for name, (weight, value) in (auxiliary(result) if auxiliary else {}).items():
            losses[name] = value
            losses["loss"] = losses["loss"] + weight * value
        return losses
