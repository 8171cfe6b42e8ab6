"""DDPM compute code, checked against independent references: closed forms in float64 numpy,
torch.distributions, numeric integration, and diffusers' own DDPMScheduler sampling loop."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DDPMScheduler
from scipy import integrate, stats

from pipelines.errors import SpecError
from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
from pipelines.models.diffusion.process import Diffusion, _discretized_gaussian_log_likelihood, _normal_kl
from pipelines.models.diffusion.samplers import _p_sample_step, respaced, sample, sample_tensor
from pipelines.models.diffusion.training import TrainingState, lr_multiplier
from pipelines.models.diffusion.unet import build_scheduler, build_unet

TINY = DdpmConfig(image_size=16, block_out_channels=(16, 32), attention_blocks=(1,), layers_per_block=1)
T = 1000


def _linear_tables():
    """Ho et al.'s linear schedule, float64, computed here independently of the module."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return betas, alphas_cumprod, np.append(1.0, alphas_cumprod[:-1])


def _bayes_posterior(x0, xt, t):
    """q(x_{t-1} | x_t, x0) by Gaussian conditioning: prior q(x_{t-1}|x0) = N(sqrt(ab') x0, 1-ab'),
    likelihood q(x_t|x_{t-1}) = N(sqrt(a_t) x_{t-1}, beta_t); precisions add. t > 0."""
    betas, _, prev = _linear_tables()
    precision = 1.0 / (1.0 - prev[t]) + (1.0 - betas[t]) / betas[t]
    variance = 1.0 / precision
    mean = variance * (np.sqrt(prev[t]) * x0 / (1.0 - prev[t]) + np.sqrt(1.0 - betas[t]) * xt / betas[t])
    return mean, variance


def _col(values):
    return np.asarray(values, dtype=np.float64).reshape(-1, 1, 1, 1)


# ---- forward process and bound terms ---------------------------------------------------------


def test_q_sample_matches_closed_form():
    rng = np.random.default_rng(0)
    x0, noise = rng.uniform(-1, 1, (4, 3, 4, 4)), rng.standard_normal((4, 3, 4, 4))
    t = np.array([0, 1, 500, 999])
    _, ab, _ = _linear_tables()
    expected = np.sqrt(_col(ab[t])) * x0 + np.sqrt(1 - _col(ab[t])) * noise
    got = Diffusion(DdpmConfig()).q_sample(torch.tensor(x0, dtype=torch.float32), torch.tensor(t),
                                           torch.tensor(noise, dtype=torch.float32))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-6)


def test_posterior_matches_bayes_rule():
    rng = np.random.default_rng(1)
    x0, xt = rng.uniform(-1, 1, (4, 3, 4, 4)), rng.standard_normal((4, 3, 4, 4))
    t = np.array([1, 2, 300, 999])
    mean, variance, log_variance = Diffusion(DdpmConfig()).posterior_mean_variance(
        torch.tensor(x0, dtype=torch.float32), torch.tensor(xt, dtype=torch.float32), torch.tensor(t))
    expected_mean, expected_variance = _bayes_posterior(x0, xt, _col(t).astype(int))
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(variance.numpy().ravel(), expected_variance.ravel(), rtol=1e-4)
    np.testing.assert_allclose(log_variance.numpy().ravel(), np.log(expected_variance.ravel()), rtol=1e-4)
    # t = 0: x_{-1} is x0 itself.
    zero = torch.zeros(4, dtype=torch.long)
    mean0, variance0, _ = Diffusion(DdpmConfig()).posterior_mean_variance(
        torch.tensor(x0, dtype=torch.float32), torch.tensor(xt, dtype=torch.float32), zero)
    np.testing.assert_allclose(mean0.numpy(), x0, atol=1e-6)
    assert float(variance0.abs().max()) == 0.0


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    lv1, lv2 = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, torch.exp(0.5 * lv1)),
                                                 torch.distributions.Normal(m2, torch.exp(0.5 * lv2)))
    got = _normal_kl(m1, lv1, m2, lv2)
    torch.testing.assert_close(got.mean(dim=(1, 2, 3)) / math.log(2), expected.mean(dim=(1, 2, 3)) / math.log(2))


def _integrated_log_likelihood(x, mean, std):
    """log of the Gaussian density integrated numerically over x's 8-bit bin; the outermost bins are
    open-ended (cut at 40 standard deviations, beyond which the mass is below 1e-300)."""
    low = mean - 40 * std if x < -0.999 else x - 1 / 255
    high = mean + 40 * std if x > 0.999 else x + 1 / 255
    mass = integrate.quad(stats.norm(mean, std).pdf, low, high, points=[mean] if low < mean < high else None,
                          epsabs=0, epsrel=1e-12, limit=200)[0]
    return math.log(mass)


def test_discretized_decoder_nll_matches_numeric_integration():
    rng = np.random.default_rng(2)
    x = np.concatenate([[-1.0, 1.0, -1.0, 1.0], rng.integers(0, 256, 12) / 127.5 - 1])
    mean = np.clip(x + rng.normal(0, 0.05, x.shape), -1.2, 1.2)
    std = rng.uniform(0.005, 0.3, x.shape)
    got = _discretized_gaussian_log_likelihood(torch.tensor(x), torch.tensor(mean), torch.tensor(np.log(std)))
    expected = [_integrated_log_likelihood(*args) for args in zip(x, mean, std, strict=True)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_vlb_terms_learned_variance_match_references():
    config = DdpmConfig(learned_variance=True)
    betas, ab, prev = _linear_tables()
    rng = np.random.default_rng(3)
    x0 = rng.integers(0, 256, (3, 3, 4, 4)) / 127.5 - 1
    xt, eps = rng.standard_normal((3, 3, 4, 4)), rng.standard_normal((3, 3, 4, 4))
    v = rng.uniform(-1, 1, (3, 3, 4, 4))
    t = np.array([0, 7, 640])
    # At t = 0 a realistic x_t (from x0 and nearly the predicted noise), else every bin's mass underflows.
    xt[0] = np.sqrt(ab[0]) * x0[0] + np.sqrt(1 - ab[0]) * (eps[0] + 0.3 * rng.standard_normal((3, 4, 4)))
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = Diffusion(config)._vlb_terms(as_t(np.concatenate([eps, v], 1)), as_t(x0), as_t(xt), torch.tensor(t))

    tt = _col(t).astype(int)
    pred_x0 = (xt - np.sqrt(1 - ab[tt]) * eps) / np.sqrt(ab[tt])
    posterior_variance = betas * (1 - prev) / (1 - ab)
    min_log = np.log(np.where(tt == 0, posterior_variance[1], posterior_variance[tt]))
    frac = (v + 1) / 2
    p_log_var = frac * np.log(betas[tt]) + (1 - frac) * min_log
    # t > 0: KL between Gaussians, from torch.distributions.
    for i in (1, 2):
        p_mean, _ = _bayes_posterior(pred_x0[i], xt[i], t[i])
        q_mean, q_var = _bayes_posterior(x0[i], xt[i], t[i])
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(torch.tensor(q_mean), math.sqrt(q_var)),
            torch.distributions.Normal(torch.tensor(p_mean), torch.tensor(np.exp(0.5 * p_log_var[i]))))
        assert float(got[i]) == pytest.approx(float(kl.mean()) / math.log(2), rel=1e-4)
    # t = 0: the decoder's NLL of x0 around p's mean (= predicted x0, unclipped).
    nll = -np.mean([_integrated_log_likelihood(a, b, c) for a, b, c in
                    zip(x0[0].ravel(), pred_x0[0].ravel(), np.exp(0.5 * p_log_var[0]).ravel(), strict=True)])
    assert float(got[0]) == pytest.approx(nll / math.log(2), rel=1e-4)


# ---- sampling --------------------------------------------------------------------------------


def _diffusers_loop(model, config, count, steps, seed, labels=None):
    """The reference: a stock diffusers DDPMScheduler ("leading" spacing) driven step by step."""
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True,
                              variance_type="learned_range" if config.learned_variance else "fixed_small")
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((count, config.in_channels, config.image_size, config.image_size), generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model(x, torch.full((count,), int(t)), class_labels=labels).sample
            x = scheduler.step(output, t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("learned", [False, True])
def test_sampler_matches_diffusers_scheduler(learned):
    config = TINY if not learned else DdpmConfig(**{**TINY.__dict__, "learned_variance": True})
    torch.manual_seed(0)
    model = build_unet(config).eval()
    expected = _diffusers_loop(model, config, 2, 10, seed=7)
    got = sample_tensor(model, config, 2, 10, torch.Generator().manual_seed(7), batch_size=2)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_sdas_strength_scales_only_the_noise_term():
    diffusion, timesteps = respaced(TINY, 20)
    assert timesteps == list(range(0, 1000, 50))
    g = torch.Generator().manual_seed(0)
    output, x, noise = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    mean = _p_sample_step(diffusion, output, x, 5, torch.zeros_like(noise), 0.0)
    deviations = [_p_sample_step(diffusion, output, x, 5, noise, s) - mean for s in (0.0, 0.15, 1.0)]
    torch.testing.assert_close(deviations[1], math.sqrt(1.15) * deviations[0])
    torch.testing.assert_close(deviations[2], math.sqrt(2.0) * deviations[0])
    assert float(deviations[0].abs().mean()) > 0
    # The last step (t = 0) adds no noise whatever the strength.
    torch.testing.assert_close(_p_sample_step(diffusion, output, x, 0, noise, 1.0),
                               _p_sample_step(diffusion, output, x, 0, None, 0.0))


def test_sample_is_uint8_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = build_unet(TINY).train()
    first = sample(model, TINY, 3, 4, torch.Generator().manual_seed(1), batch_size=2)
    again = sample(model, TINY, 3, 4, torch.Generator().manual_seed(1), batch_size=2)
    assert first.dtype == np.uint8 and first.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(first, again)
    assert model.training  # the mode is restored
    stronger = sample(model, TINY, 3, 4, torch.Generator().manual_seed(1), batch_size=2, variance_scale=0.2)
    assert not np.array_equal(first, stronger)
    with pytest.raises(ValueError, match="steps"):
        sample(model, TINY, 1, 1001, torch.Generator())


def test_per_image_generators_make_each_sample_independent_of_its_batch():
    """The synthesize stage seeds each row's SDAS sample by the row: the same row must come out the
    same whichever rows Ray Data put in its batch, and in whatever order."""
    torch.manual_seed(0)
    model = build_unet(TINY).eval()

    def draw(seeds, strengths, batch_size=4):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sample_tensor(model, TINY, len(seeds), 4, generators, variance_scale=strengths,
                                   batch_size=batch_size)

    together = draw([11, 12, 13], [0.1, 0.15, 0.2])
    alone = torch.cat([draw([11], [0.1]), draw([12], [0.15]), draw([13], [0.2])])
    reordered = draw([13, 11], [0.2, 0.1], batch_size=1)
    # Equal up to float32 rounding: a convolution over a batch of 3 and one over a batch of 1 may
    # take different CPU kernels, whose last bits differ and grow a little over the sampling
    # chain (seen: 1.2e-5 on one of 2304 values, in [-1, 1]). What must not differ is the noise.
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reordered, together[[2, 0]], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])
    # A per-image strength is the same as that strength given alone.
    torch.testing.assert_close(draw([12], [0.15]), sample_tensor(
        model, TINY, 1, 4, [torch.Generator().manual_seed(12)], variance_scale=0.15), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one generator per image"):
        sample_tensor(model, TINY, 3, 4, [torch.Generator()])
    with pytest.raises(ValueError, match="one variance_scale per image"):
        sample_tensor(model, TINY, 2, 4, [torch.Generator(), torch.Generator()], variance_scale=[0.1])


# ---- training --------------------------------------------------------------------------------


def test_loss_goes_down_on_constant_images():
    state = TrainingState(TINY, OptimConfig(lr=1e-3, schedule="constant"), total_steps=60, seed=0)
    images = torch.full((4, 3, 16, 16), 0.5)
    g = torch.Generator().manual_seed(0)
    losses = [state.train_step(images, None, g)["loss"] for _ in range(60)]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert state.step == 60


class _Recording(torch.nn.Module):
    """Wraps the U-Net and keeps its output, so the test can read the gradient that reaches it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, class_labels=None):
        out = self.unet(x, t, class_labels=class_labels)
        out.sample.retain_grad()
        self.output = out.sample
        return out


def test_hybrid_loss_vlb_trains_only_the_variance_channels():
    config = DdpmConfig(**{**TINY.__dict__, "learned_variance": True})
    torch.manual_seed(0)
    model = _Recording(build_unet(config))
    diffusion = Diffusion(config)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    grads = {}
    for term in ("vlb", "mse"):
        losses = diffusion.training_losses(model, x0, None, torch.Generator().manual_seed(3))
        losses[term].backward()
        grads[term] = model.output.grad
        model.zero_grad()
    vlb = losses["vlb"].detach()
    assert torch.isfinite(vlb) and float(vlb) > 0
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.001 * losses["vlb"])
    assert float(grads["vlb"][:, :3].abs().max()) == 0.0  # mean (eps) channels: stop-gradient
    assert float(grads["vlb"][:, 3:].abs().max()) > 0
    assert float(grads["mse"][:, 3:].abs().max()) == 0.0  # L_simple does not see the variance
    assert float(grads["mse"][:, :3].abs().max()) > 0
    # The fixed-variance model has no bound term.
    assert float(Diffusion(TINY).training_losses(build_unet(TINY), x0, None, torch.Generator())["vlb"]) == 0.0


def test_class_labels_change_the_output():
    config = DdpmConfig(**{**TINY.__dict__, "num_classes": 3})
    torch.manual_seed(0)
    model = build_unet(config).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    with torch.no_grad():
        outputs = [model(x, t, class_labels=torch.tensor([c])).sample for c in range(3)]
    assert float((outputs[0] - outputs[1]).abs().max()) > 1e-4
    assert float((outputs[1] - outputs[2]).abs().max()) > 1e-4
    state = TrainingState(config, OptimConfig(), total_steps=5)
    with pytest.raises(ValueError, match="class labels are required"):
        state.train_step(torch.zeros(2, 3, 16, 16), None, torch.Generator())
    with pytest.raises(ValueError, match=r"0\.\.2"):
        state.train_step(torch.zeros(2, 3, 16, 16), torch.tensor([0, 3]), torch.Generator())


def test_bfloat16_autocast_step_runs():
    state = TrainingState(TINY, OptimConfig(), total_steps=2)
    out = state.train_step(torch.zeros(2, 3, 16, 16), None, torch.Generator(), autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(v) for v in out.values())
    assert set(out) == {"loss", "mse", "vlb", "lr", "grad_norm"}


def test_same_seed_same_weights_and_global_rng_untouched():
    before = torch.get_rng_state()
    a, b = (TrainingState(TINY, OptimConfig(), 5, seed=3) for _ in range(2))
    c = TrainingState(TINY, OptimConfig(), 5, seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = (s.module.state_dict() for s in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(torch.equal(sa[k], a.ema.state_dict()[k]) for k in sa)


def test_save_restore_is_bitwise_exact():
    config = DdpmConfig(**{**TINY.__dict__, "learned_variance": True, "num_classes": 2, "dropout": 0.1})
    optim = OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", ema_decay=0.9, weight_decay=0.01)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1])
    a = TrainingState(config, optim, total_steps=10, seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.train_step(images, labels, g)
    tensors, meta = a.state_tensors()
    tensors = safetensors.torch.load(safetensors.torch.save(tensors))  # no shared-memory errors
    meta = json.loads(json.dumps(meta))
    b = TrainingState(config, optim, total_steps=10, seed=1)  # other weights, overwritten by the load
    b.load_state_tensors(tensors, meta)
    assert b.step == 3
    results = []
    for state in (a, b):
        g = torch.Generator().manual_seed(42)
        results.append([state.train_step(images, labels, g) for _ in range(2)])
    assert results[0] == results[1]
    (ta, ma), (tb, mb) = a.state_tensors(), b.state_tensors()
    assert ma == mb and ma["step"] == 5
    assert set(ta) == set(tb) and any(k.startswith("optim/") for k in ta) and any(k.startswith("ema/") for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)

    fresh = TrainingState(config, optim, total_steps=10)  # a step-0 checkpoint has no optimizer state yet
    b.load_state_tensors(*fresh.state_tensors())
    assert b.step == 0 and all(torch.equal(v, fresh.state_tensors()[0][k]) for k, v in b.state_tensors()[0].items())

    other = TrainingState(DdpmConfig(**{**config.__dict__, "num_classes": 3}), optim, total_steps=10)
    with pytest.raises(ValueError, match="config differs"):
        other.load_state_tensors(tensors, meta)


# ---- schedules and configuration -------------------------------------------------------------


def test_lr_multiplier_known_points():
    optim = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, optim) == pytest.approx(0.1)
    assert lr_multiplier(4, 110, optim) == pytest.approx(0.5)
    assert lr_multiplier(9, 110, optim) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, optim) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, optim) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, 110, optim) == pytest.approx(0.1)
    assert lr_multiplier(500, 110, optim) == pytest.approx(0.1)
    constant = OptimConfig(warmup_steps=0, schedule="constant")
    assert lr_multiplier(0, 10, constant) == lr_multiplier(99, 10, constant) == 1.0


@pytest.mark.parametrize(("changes", "field", "message"), [
    ({"image_size": 30, "block_out_channels": (32, 64, 64)}, "model.image_size", "multiple of 4"),
    ({"attention_blocks": (2,)}, "model.attention_blocks[0]", "out of range"),
    ({"attention_blocks": (0, 0)}, "model.attention_blocks", "duplicate"),
    ({"block_out_channels": ()}, "model.block_out_channels", "non-empty"),
    ({"block_out_channels": (16, 0)}, "model.block_out_channels", "positive"),
    ({"block_out_channels": (32, 48)}, "model.block_out_channels", "GroupNorm"),
    ({"block_out_channels": (4, 4), "image_size": 16}, "model.block_out_channels", "multiple of 8"),
    ({"num_classes": -1}, "model.num_classes", "positive"),
    ({"num_train_timesteps": 1}, "model.num_train_timesteps", "at least 2"),
    ({"dropout": 1.0}, "model.dropout", "[0, 1)"),
    ({"beta_schedule": "cosine"}, "model.beta_schedule", "squaredcos"),
])
def test_ddpm_config_validation(changes, field, message):
    with pytest.raises(SpecError) as error:
        DdpmConfig(**{**TINY.__dict__, **changes}).validate("model")
    assert error.value.field == field and message in error.value.message


def test_valid_configs_build():
    assert TINY.validate("model") is TINY
    assert DdpmConfig().validate("model") == DdpmConfig()
    unet = build_unet(DdpmConfig(image_size=32, block_out_channels=(32, 64, 64), attention_blocks=(2,)))
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
    assert build_scheduler(DdpmConfig(learned_variance=True)).config.variance_type == "learned_range"


@pytest.mark.parametrize(("changes", "field"), [
    ({"lr": 0.0}, "optim.lr"), ({"beta2": 1.0}, "optim.beta2"), ({"warmup_steps": -1}, "optim.warmup_steps"),
    ({"min_lr_ratio": 1.5}, "optim.min_lr_ratio"), ({"grad_clip": -1.0}, "optim.grad_clip"),
    ({"ema_decay": 1.0}, "optim.ema_decay"), ({"schedule": "step"}, "optim.schedule"),
])
def test_optim_config_validation(changes, field):
    assert OptimConfig().validate("optim") == OptimConfig()
    with pytest.raises(SpecError) as error:
        OptimConfig(**changes).validate("optim")
    assert error.value.field == field
