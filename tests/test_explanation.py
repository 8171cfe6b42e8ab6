"""Gradient denoising (diffusion_kl's paper): the update rule against its closed form on a quadratic
distance, PaDiM's differentiable distance against an independent numpy Mahalanobis distance, the
reconstruction of real brick crops with pasted grass (the patch changes, the rest much less, the
distance falls), and the evaluate step's `explain:` block on real Ray (strips in the report, GIFs,
distances in metrics.json, wrong models refused with exit 2)."""

from __future__ import annotations

import io
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from texture_defects import patched, texture_crops, write_brick_archive

from pipelines import cli
from pipelines.errors import SpecError
from pipelines.models.artifacts import save_artifact
from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
from pipelines.models.diffusion.training import TrainingState
from pipelines.models.explanation import GradientDenoising, denoiser, gif, gradient_denoise, snapshot_steps, strip
from pipelines.models.padim import PadimConfig
from pipelines.models.padim.model import IMPLEMENTATION as PADIM
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

NETWORK = DdpmConfig(image_size=32, block_out_channels=(16, 32), attention_blocks=(), learned_variance=True)


def quiet(*_args, **_kwargs) -> None:
    pass


def as_input(pixels: np.ndarray, size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, size, size) in [0, 1], area-resized."""
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(images, size=(size, size), mode="area")


@pytest.fixture(scope="module")
def brick_models():
    """A PaDiM (64 px) fitted on 40 brick crops and a 32 px DDPM trained 200 steps on them."""
    train = texture_crops(40, 128, seed=0, rows=slice(0, 256))
    config = PadimConfig(image_size=64, kept_channels=50, map_sigma=2.0)
    fitter = PADIM.fitter(config, PADIM.plan(config))
    statistics = fitter.new_statistics()
    fitter.update(statistics, as_input(train, 64))
    padim = fitter.model(statistics)
    state = TrainingState(NETWORK, OptimConfig(lr=1e-3, ema_decay=0.9), 200)
    generator = torch.Generator().manual_seed(0)
    x0 = as_input(train, 32) * 2 - 1
    for _ in range(200):
        state.train_step(x0[torch.randint(0, 40, (8,), generator=generator)], None, generator)
    return config, padim, state.ema


def test_a_step_is_a_diffusion_step_whose_noise_is_the_normalised_gradient():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0.2, 0.8, (2, 3, 8, 8))).float()
    target = torch.from_numpy(rng.uniform(0, 1, (1, 3, 8, 8))).float()
    settings = GradientDenoising(steps=1, step_size=0.2, denoise_every=0, frames=2)
    result = gradient_denoise(images, lambda x: (x - target).pow(2).flatten(1).sum(dim=1), None, settings)
    x = images.double().numpy() * 2 - 1
    gradient = (images.double().numpy() - target.double().numpy())  # d/dx of (((x + 1) / 2 - c)^2): ((x+1)/2 - c)
    rms = np.sqrt((gradient ** 2).reshape(2, -1).mean(axis=1))[:, None, None, None]
    expected = np.sqrt(1 - 0.04) * x - 0.2 * gradient / rms
    expected_pixels = np.clip(np.round((np.clip(expected, -1, 1) + 1) * 127.5), 0, 255).transpose(0, 2, 3, 1)
    assert result.steps == (0, 1) and result.frames.shape == (2, 2, 8, 8, 3)
    assert np.abs(result.frames[1].astype(int) - expected_pixels).max() <= 1
    np.testing.assert_allclose(result.distances[0], ((images - target) ** 2).flatten(1).sum(1).numpy(), rtol=1e-5)
    assert (result.distances[1] < result.distances[0]).all()
    assert snapshot_steps(GradientDenoising(steps=100, frames=6)) == (0, 20, 40, 60, 80, 100)


def test_padim_mean_distance_is_the_mean_mahalanobis_distance_and_has_gradients(brick_models):
    config, padim, _ = brick_models
    images = as_input(texture_crops(2, 128, seed=3, rows=slice(256, None)), 64)
    embedding = padim.embed(images).double().numpy()  # (B, D, h, w)
    mean, inverse = padim.mean.double().numpy(), padim.inverse_covariance.double().numpy()  # (P, D), (P, D, D)
    b, d, h, w = embedding.shape
    delta = embedding.reshape(b, d, h * w).transpose(0, 2, 1) - mean[None]
    expected = np.sqrt(np.einsum("bpi,pij,bpj->bp", delta, inverse, delta)).mean(axis=1)
    x = images.clone().requires_grad_(True)
    got = padim.mean_distance(x)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-4)
    (gradient,) = torch.autograd.grad(got.sum(), x)
    assert gradient.abs().sum() > 0
    # Any size: resized to the model's 64 px first.
    np.testing.assert_allclose(padim.mean_distance(F.interpolate(images, size=(32, 32), mode="area")).detach(),
                               padim.mean_distance(F.interpolate(F.interpolate(images, size=(32, 32), mode="area"),
                                                                 size=(64, 64), mode="bilinear")).detach(), rtol=1e-5)


def test_gradient_denoising_removes_the_pasted_patch_more_than_the_rest(brick_models):
    _, padim, unet = brick_models
    clean = texture_crops(4, 128, seed=1, rows=slice(256, None))
    defective = np.stack([patched(clean[i], seed=i) for i in range(2)])
    mask = torch.from_numpy((np.abs(defective.astype(int) - clean[:2].astype(int)).sum(-1) > 0)[:, None].astype(
        np.float32))
    mask = F.interpolate(mask, size=(32, 32), mode="area")[:, 0].numpy() > 0.5
    images = as_input(np.concatenate([defective, clean[2:]]), 32)
    settings = GradientDenoising()
    result = gradient_denoise(images, padim.mean_distance, denoiser(unet, NETWORK, settings), settings)
    change = np.abs(result.frames[-1].astype(int) - result.frames[0].astype(int)).mean(axis=-1)  # (B, S, S)
    for b in range(2):
        inside, outside = change[b][mask[b]].mean(), change[b][~mask[b]].mean()
        assert inside > 1.5 * outside, (b, inside, outside)
        assert result.distances[-1, b] < 0.9 * result.distances[0, b]
    again = gradient_denoise(images, padim.mean_distance, denoiser(unet, NETWORK, settings), settings)
    assert np.array_equal(again.frames, result.frames)  # no noise: a rerun is identical

    # Without the denoising steps the whole image drifts: the U-Net is what keeps the rest in place.
    alone = gradient_denoise(images, padim.mean_distance, None, GradientDenoising(denoise_every=0))
    drift = np.abs(alone.frames[-1].astype(int) - alone.frames[0].astype(int)).mean(axis=-1)
    assert drift[0][~mask[0]].mean() > 1.2 * change[0][~mask[0]].mean()  # 12.4 against 8.3 measured

    picture = strip(result.frames[:, 0])
    assert picture.shape == (32, 6 * 32 + 5 * 2, 3)
    with Image.open(io.BytesIO(gif(result.frames[:, 0]))) as animation:
        assert animation.format == "GIF" and animation.n_frames == 6


# ---- the evaluate step's explain: block, on real Ray ------------------------------------------

def pipeline(root: str, archive, diffusion_uri: str, **explain) -> dict:
    return {
        "kind": "pipeline", "name": "explain-test", "storage": {"root": root}, "ray": {"address": "local"},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "mvtec", "uri": str(archive)},
             "outputs": {"dataset": "brick"}},
            {"name": "train", "kind": "train", "method": "padim", "inputs": {"dataset": "step:ingest"},
             "outputs": {"model": "padim-brick", "version": "1"},
             "padim": {"image_size": 64, "kept_channels": 50, "map_sigma": 2.0},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
            {"name": "score", "kind": "score", "inputs": {"dataset": "step:ingest"}, "model": {"uri": "step:train"},
             "split": "test", "outputs": {"anomaly_maps": True},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
            {"name": "evaluate", "kind": "evaluate", "inputs": {"dataset": "step:score"}, "anomalous_examples": 4,
             "normal_examples": 2,
             "explain": {"padim": {"uri": "step:train"}, "diffusion": {"uri": diffusion_uri}, "count": 2,
                         "steps": 40, **explain}},
        ],
    }


def test_evaluate_explains_the_most_anomalous_images(ray_session, brick_models, s3_root, tmp_path, capsys):
    _, _, unet = brick_models
    diffusion = Location.parse(s3_root).join("models", "ddpm-brick", "1")
    save_artifact(diffusion, "ddpm", NETWORK, {"*": unet.state_dict()})
    archive = write_brick_archive(tmp_path / "archive")
    outcome = run_job(parse_spec(pipeline(s3_root, archive, diffusion.uri)), run_id="explain-1", echo=quiet)
    evaluated = outcome.results["evaluate"]
    folder = Location.parse(evaluated.output)
    metrics = folder.join("metrics.json").read_json()
    explanations = metrics["explanations"]
    assert len(explanations) == 2 and metrics["explanation_notes"] == []
    for entry in explanations:
        assert entry["steps"] == [0, 8, 16, 24, 32, 40]
        assert entry["padim_distances"][-1] < entry["padim_distances"][0]
        with Image.open(io.BytesIO(Location.parse(entry["gif"]).read_bytes())) as animation:
            assert animation.n_frames == 6 and animation.size == (32, 32)
        with Image.open(io.BytesIO(Location.parse(entry["strip"]).read_bytes())) as picture:
            assert picture.size == (6 * 32 + 5 * 2, 32)
    report = folder.join("report.html").read_bytes().decode()
    for entry in explanations:
        assert f'alt="gradient denoising of {entry["image_id"]}"' in report
    assert "explained 2 images by gradient denoising" in "\n".join(evaluated.summary)

    # Models that cannot explain are refused by name, before any image is read: exit 2, no traceback.
    bad = pipeline(s3_root, archive, "step:train")  # a PaDiM as the diffusion model
    bad["steps"] = bad["steps"][:2] + [bad["steps"][3]]
    bad["steps"][2]["inputs"] = {"dataset": outcome.results["score"].output}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["run", str(path), "--run-id", "explain-2"]) == 2
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    err = capsys.readouterr().err
    assert "explain.diffusion" in err and "'padim' model" in err and "Traceback" not in err


def test_bad_explain_blocks_are_refused_naming_the_field(file_root):
    def spec(explain: dict, **more) -> dict:
        return {"kind": "evaluate", "name": "e", "storage": {"root": file_root},
                "inputs": {"dataset": f"{file_root}/scores/x/1"},
                "explain": {"padim": {"uri": "file:///m/p"}, "diffusion": {"uri": "file:///m/d"}, **explain}, **more}

    cases = [({"step_size": 1.5}, r"explain\.step_size: must be in \(0, 1\)"),
             ({"frames": 1}, r"explain\.frames: must be at least 2"),
             ({"denoise_index": 0}, r"explain\.denoise_index"),
             ({"denoise_every": -1}, r"explain\.denoise_every"),
             ({"stpes": 10}, r"explain\.stpes"),
             ({"count": 9}, r"explain\.count: explains images the report shows: at most anomalous_examples \(8\)")]
    for explain, message in cases:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec(explain))
    with pytest.raises(SpecError, match=r"explain\.padim"):
        parse_spec({**spec({}), "explain": {"diffusion": {"uri": "file:///m/d"}}})
