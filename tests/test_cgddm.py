"""`method: cgddm`: the reconstruction against diffusers' DDIMScheduler (an independent DDIM), what
conditioning and blur guidance change, a clean image reconstructed closer to itself than one with
a pasted defect whose map peaks inside the defect, spec errors, and the whole path on real Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from texture_defects import png

from imagefiles import corrupt_png, publish_archive, write
from pipelines import datasets
from pipelines.errors import SpecError
from pipelines.evaluation.metrics import auroc
from pipelines.models.cgddm import CgddmParams, CgddmScoring
from pipelines.models.cgddm.model import IMPLEMENTATION as CGDDM
from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
from pipelines.models.diffusion.reconstruction import Guidance, reconstruct
from pipelines.models.diffusion.samplers import respaced
from pipelines.models.diffusion.unet import build_unet
from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

TINY = DdpmConfig(image_size=16, block_out_channels=(16, 32), attention_blocks=())


def quiet(*_args, **_kwargs) -> None:
    pass


def ramps(count: int, seed: int, size: int = 16) -> np.ndarray:
    """(count, size, size, 3) uint8 normal images: a grey level plus a horizontal ramp either way
    (learnable in a few hundred CPU steps)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-20, 20, size)[None, None, :, None]
    base = rng.uniform(100, 140, (count, 1, 1, 1)) + ramp * rng.choice([-1, 1], (count, 1, 1, 1))
    return np.broadcast_to(base, (count, size, size, 3)).round().astype(np.uint8).copy()


def with_square(pixels: np.ndarray, y: int, x: int, side: int) -> np.ndarray:
    out = pixels.copy()
    out[y:y + side, x:x + side] = 250
    return out


def test_unguided_reconstruction_is_diffusers_ddim_from_the_noised_input():
    torch.manual_seed(0)
    model = build_unet(TINY).eval()
    diffusion, timesteps = respaced(TINY, 50)
    g = torch.Generator().manual_seed(1)
    images, noise = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 3, 16, 16, generator=g)
    got, calls = reconstruct(model, diffusion, timesteps, images, noise, 10, Guidance(condition_scale=0.0))
    assert calls == 11

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    scheduler.set_timesteps(50)
    chain = [int(t) for t in scheduler.timesteps if t <= timesteps[10]]
    assert chain == timesteps[10::-1]
    x = scheduler.add_noise(images, noise, torch.tensor([chain[0]]))
    with torch.no_grad():
        for t in chain:
            output = model(x, torch.full((2,), t)).sample
            x = scheduler.step(output, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_conditioning_pulls_toward_the_input_and_blur_guidance_costs_a_call_per_guided_step():
    torch.manual_seed(0)
    model = build_unet(TINY).eval()
    diffusion, timesteps = respaced(TINY, 50)
    g = torch.Generator().manual_seed(2)
    images, noise = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 3, 16, 16, generator=g)
    errors = [float((reconstruct(model, diffusion, timesteps, images, noise, 10, Guidance(condition_scale=w))[0]
                     - images).abs().mean()) for w in (0.0, 1.0, 3.0)]
    assert errors[0] > errors[1] > errors[2], errors  # an untrained network: only the pull brings it back
    plain, _ = reconstruct(model, diffusion, timesteps, images, noise, 10, Guidance(guidance_below=5))
    guided, calls = reconstruct(model, diffusion, timesteps, images, noise, 10,
                                Guidance(guidance_scale=1.3, guidance_below=5))
    assert calls == 11 + 6 and not torch.equal(plain, guided)
    with pytest.raises(ValueError, match="start must be an index in 1..49"):
        reconstruct(model, diffusion, timesteps, images, noise, 50, Guidance())


def trained_detector(steps: int = 150):
    params = CgddmParams(model=TINY, optim=OptimConfig(lr=2e-3, ema_decay=0.9),
                         training=GradientTrainingSpec(steps=steps),
                         # At 16 px the backbone's stride-4 and -8 grids are 4x4 and 2x2 cells:
                         # the pixel difference alone is the map here.
                         scoring=CgddmScoring(feature_weight=0.0, map_sigma=1.0, top_pixels=8)).validate("cgddm")
    context = TrainingContext(class_names=("a",), device="cpu", seed=0)
    state = CGDDM.training_state(params, context)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        state.train_batch(TrainingBatch(pixels=ramps(4, step), categories=np.array(["a"] * 4)), generator, None)
    published = CGDDM.published(params, context, *state.state_tensors())
    [tensors] = published.tensors.values()
    return CGDDM.build(published.config, tensors)


def test_a_clean_image_reconstructs_closer_than_a_defect_and_the_map_peaks_inside_it():
    model = trained_detector()
    normal = ramps(4, 1000)
    defect = np.stack([with_square(normal[i], 3 + 2 * i, 8 - i, 4) for i in range(4)])
    to_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    ids = ["n0", "n1", "n2", "n3"]
    clean, _ = model.reconstructions(to_tensor(normal), ids)
    broken, _ = model.reconstructions(to_tensor(defect), ids)
    clean_error = (clean - to_tensor(normal)).abs().mean(dim=(1, 2, 3))
    defect_error = (broken - to_tensor(defect)).abs().mean(dim=(1, 2, 3))
    assert (defect_error > clean_error).all(), (clean_error, defect_error)
    result = model.score(to_tensor(defect), ids)
    for i in range(4):
        y, x = divmod(int(result.maps[i].argmax()), 16)
        assert 3 + 2 * i - 1 <= y <= 3 + 2 * i + 4 and 8 - i - 1 <= x <= 8 - i + 4, (i, y, x)
    assert (result.scores > model.score(to_tensor(normal), ids).scores).all()
    again = model.score(to_tensor(defect), ids)
    assert torch.equal(result.scores, again.scores) and torch.equal(result.maps, again.maps)
    # bf16 autocast (the score stage's precision on GPUs; CPU autocast here): the U-Net calls run in
    # bf16, so the maps move, but the squares are still found, the same way on every rerun.
    low = [model.score(to_tensor(defect), ids, autocast_dtype=torch.bfloat16) for _ in range(2)]
    assert low[0].maps.dtype == torch.float32 and not torch.equal(low[0].maps, result.maps)
    assert torch.equal(low[0].maps, low[1].maps)
    for i in range(4):
        y, x = divmod(int(low[0].maps[i].argmax()), 16)
        assert 3 + 2 * i - 1 <= y <= 3 + 2 * i + 4 and 8 - i - 1 <= x <= 8 - i + 4, (i, y, x)
    assert (low[0].scores > model.score(to_tensor(normal), ids, autocast_dtype=torch.bfloat16).scores).all()
    # The map without a reconstruction error: 0 (a feature difference of identical images too).
    pixel, feature = model.difference_maps(to_tensor(normal), to_tensor(normal))
    assert float(pixel.abs().max()) == 0 and float(feature.abs().max()) < 1e-5


def test_bad_parameters_are_refused_naming_the_field(file_root):
    def spec(block: dict) -> dict:
        return {"kind": "train", "name": "cg-bad", "storage": {"root": file_root}, "method": "cgddm",
                "inputs": {"dataset": f"{file_root}/datasets/x/1"}, "outputs": {"model": "m"}, "cgddm": block}

    cases = [({"scoring": {"start_step": 50}}, r"cgddm\.scoring\.start_step: must be an index in 1..49"),
             ({"scoring": {"start_step": 0}}, r"cgddm\.scoring\.start_step"),
             ({"scoring": {"guidance_scale": 0.5}}, r"cgddm\.scoring\.guidance_scale: must be >= 1"),
             ({"scoring": {"blur_sigma": 0}}, r"cgddm\.scoring\.blur_sigma: must be > 0 when guidance_scale > 1"),
             ({"scoring": {"condition_scale": -1}}, r"cgddm\.scoring\.condition_scale"),
             ({"scoring": {"feature_backbone": "resnet50"}}, r"cgddm\.scoring\.feature_backbone"),
             ({"scoring": {"feature_stages": [2, 1]}}, r"cgddm\.scoring\.feature_stages"),
             ({"scoring": {"respaced_steps": 1}}, r"cgddm\.scoring\.respaced_steps"),
             ({"model": {"num_classes": 2}}, r"cgddm\.model\.num_classes")]
    for block, message in cases:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec(block))


def cgddm_pipeline(root: str, images) -> dict:
    return {
        "kind": "pipeline", "name": "cg-test", "storage": {"root": root}, "ray": {"address": "local"},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "mvtec", "uri": str(images)},
             "outputs": {"dataset": "ramps"}},
            {"name": "train", "kind": "train", "method": "cgddm", "inputs": {"dataset": "step:ingest"},
             "outputs": {"model": "cg-ramps", "version": "1"},
             "cgddm": {"model": {"image_size": 16, "block_out_channels": [16, 32], "attention_blocks": []},
                       "optim": {"lr": 2e-3, "ema_decay": 0.9},
                       "training": {"steps": 150, "checkpoint_every": 75, "log_every": 50, "max_rotation": 0},
                       "scoring": {"feature_weight": 0.0, "map_sigma": 1.0, "top_pixels": 8}},
             "threshold": {"method": "normal_quantile", "quantile": 0.9, "holdout_fraction": 0.2},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 4}},
            {"name": "score", "kind": "score", "inputs": {"dataset": "step:ingest"}, "model": {"uri": "step:train"},
             "split": "test", "outputs": {"anomaly_maps": True},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
        ],
    }


def test_cgddm_trains_on_ray_finds_squares_and_reruns_byte_identically(ray_session, s3_root, tmp_path):
    folder = tmp_path / "archive"
    for i, pixels in enumerate(ramps(32, 0)):
        write(folder / "ramps" / "train" / "good" / f"{i:03d}.png", png(pixels))
    test = ramps(16, 1)
    for i in range(8):
        write(folder / "ramps" / "test" / "good" / f"{i:03d}.png", png(test[i]))
        write(folder / "ramps" / "test" / "square" / f"{i:03d}.png", png(with_square(test[8 + i], 2 + i, 9 - i, 4)))
    outcome = run_job(parse_spec(cgddm_pipeline(s3_root, folder)), run_id="cg-1", echo=quiet)
    config = Location.parse(outcome.results["train"].output).join("config.json").read_json()
    assert config["method"] == "cgddm" and config["info"]["weights"] == "ema"
    scored = Location.parse(outcome.results["score"].output)
    rows = datasets.read_table(scored).to_pylist()
    assert len(rows) == 16 and not any(r["error"] for r in rows)
    good = [r["score"] for r in rows if "/good/" in r["image_id"]]
    bad = [r["score"] for r in rows if "/square/" in r["image_id"]]
    assert auroc(np.r_[np.zeros(8), np.ones(8)], np.r_[good, bad]) >= 0.9

    rerun = {"kind": "score", "name": "rescore", "storage": {"root": s3_root}, "split": "test",
             "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["train"].output},
             "outputs": {"anomaly_maps": True}, "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}}
    again = run_job(parse_spec(rerun), run_id="cg-2", echo=quiet).results["rescore"]
    columns = ["image_id", "score", "anomaly_map", "error", "label_pred"]
    assert datasets.read_table(scored, columns=columns).sort_by("image_id").equals(
        datasets.read_table(Location.parse(again.output), columns=columns).sort_by("image_id"))

    # Bad bytes in an archive another system wrote: an error row each, every other row scored.
    entries = [(r["image_id"], r["image"], "ramps", "test", r["label"])
               for r in datasets.read_table(Location.parse(outcome.results["ingest"].output)).to_pylist()
               if r["split"] == "test"][:3]
    odd = publish_archive(Location.parse(s3_root).join("datasets", "odd-ramps", "1"),
                          [entries + [("bad/corrupt.png", corrupt_png(), "ramps", "test", 1)]])
    result = run_job(parse_spec({**rerun, "inputs": {"dataset": odd.uri}}), run_id="cg-3",
                     echo=quiet).results["rescore"]
    odd_rows = {r["image_id"]: r for r in datasets.read_table(Location.parse(result.output)).to_pylist()}
    assert len(odd_rows) == 4 and [i for i, r in odd_rows.items() if r["error"]] == ["bad/corrupt.png"]

