"""PFM: its compute code (artifact round trip, exact resume), its spec checks, and the whole path
on real Ray (ingest -> gradient training with calibration -> score) on a real texture from
scikit-image, with local and global defects made by generators PFM never saw (it trains on
normal images only).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from imagefiles import write
from pipelines import datasets
from pipelines.errors import SpecError
from pipelines.evaluation.metrics import auroc
from pipelines.models.artifacts import ModelCard, save_artifact
from pipelines.models.methods import GradientTrainingSpec, TrainingContext
from pipelines.models.pfm import PfmConfig, PfmOptim, PfmParams
from pipelines.models.pfm.model import IMPLEMENTATION as PFM
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

SMALL = PfmParams(model=PfmConfig(stages=(1, 2), latent_channels=16, image_size=64),
                  optim=PfmOptim(lr=(3e-3, 3e-4)), training=GradientTrainingSpec(steps=6), variance_steps=4)
CONTEXT = TrainingContext(class_names=("a",), device="cpu", seed=0)


def quiet(*_args, **_kwargs) -> None:
    pass


def texture_crops(count: int, size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
    brick = np.stack([skimage.data.brick()[rows]] * 3, -1)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        y, x = rng.integers(0, brick.shape[0] - size), rng.integers(0, brick.shape[1] - size)
        out.append(brick[y:y + size, x:x + size])
    return np.stack(out)


def trained_state(steps: int, params: PfmParams = SMALL):
    state = PFM.training_state(params, CONTEXT)
    pixels = texture_crops(4, 64, seed=1)
    for _ in range(steps):
        state.train_batch(pixels, np.array(["a"] * 4), torch.Generator(), None)
    return state


def test_saved_model_scores_exactly_as_the_trained_one_and_a_resumed_state_steps_identically(tmp_path):
    state = trained_state(SMALL.training.steps)
    tensors, meta = state.state_tensors()
    published = PFM.published(SMALL, CONTEXT, tensors, meta)
    in_memory = PFM.build(published.config, published.tensors["*"]).eval()
    folder = Location.parse(tmp_path.as_uri())
    save_artifact(folder, "pfm", published.config, published.tensors, thresholds={"*": 1.0}, info={}, lineage={})
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    loaded = ModelCard.read(folder).load().models["*"]
    images = torch.from_numpy(texture_crops(3, 64, seed=5)).permute(0, 3, 1, 2).float() / 255
    a, b = in_memory.score(images, ["x", "y", "z"]), loaded.score(images, ["x", "y", "z"])
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert a.maps.shape == (3, 64, 64) and bool((a.maps >= 0).all())

    # Resume: a state restored from step 3's checkpoint takes the same step 4 as one that ran on.
    ran_on, restored = trained_state(3), PFM.training_state(SMALL, CONTEXT)
    restored.load_state_tensors(*ran_on.state_tensors())
    pixels = texture_crops(4, 64, seed=9)
    for state in (ran_on, restored):
        state.train_batch(pixels, np.array(["a"] * 4), torch.Generator(), None)
    for (name, x), (_, y) in zip(ran_on.state_tensors()[0].items(), restored.state_tensors()[0].items(), strict=True):
        assert torch.equal(x, y), name


def test_the_error_variance_is_the_unbiased_variance_of_the_window(tmp_path):
    state = trained_state(SMALL.training.steps)
    variances = state.variances()
    # Against numpy: recompute the last window's errors by hand from the same steps.
    reference = PFM.training_state(SMALL, CONTEXT)
    pixels = texture_crops(4, 64, seed=1)
    collected: dict[str, list[np.ndarray]] = {}
    for step in range(SMALL.training.steps):
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        errors = reference.module(*reference.features(images))
        if step >= SMALL.training.steps - SMALL.variance_steps:
            for stage, pair in zip(SMALL.model.stages, errors, strict=True):
                for direction, error in zip(("source_to_target", "target_to_source"), pair, strict=True):
                    values = error.detach().double().numpy().transpose(1, 0, 2, 3).reshape(error.shape[1], -1)
                    collected.setdefault(f"variance/{stage}/{direction}", []).append(values)
        reference.train_batch(pixels, np.array(["a"] * 4), torch.Generator(), None)
    for name, chunks in collected.items():
        expected = np.concatenate(chunks, axis=1).var(axis=1, ddof=1)
        np.testing.assert_allclose(variances[name].numpy(), expected, rtol=1e-4)


def test_bad_pfm_parameters_exit_2_naming_them(tmp_path, file_root):
    def spec(pfm: dict) -> dict:
        return {"kind": "train", "name": "pfm-bad", "storage": {"root": file_root}, "method": "pfm",
                "inputs": {"dataset": f"{file_root}/datasets/x/1"}, "outputs": {"model": "m"}, "pfm": pfm}

    cases = [({"model": {"latent_chanels": 8}}, r"pfm\.model\.latent_chanels.*did you mean 'latent_channels'"),
             ({"model": {"target_backbone": "efficientnet_lite0"}}, r"pfm\.model\.target_backbone: must differ"),
             ({"model": {"image_score": "median"}}, r"pfm\.model\.image_score"),
             ({"optim": {"lr": [0.1]}}, r"pfm\.optim\.lr: needs one learning rate per stage"),
             ({"variance_steps": 5000}, r"pfm\.variance_steps: must be at most training\.steps"),
             ({"model": {"stages": [3, 1]}}, r"pfm\.model\.stages")]
    for block, message in cases:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec(block))
    with pytest.raises(SpecError, match=r"per_category.*pfm"):
        parse_spec({**spec({}), "per_category": True})


# ---- the whole path on real Ray ----------------------------------------------------------------

SIZE = 128


def rescaled(image: np.ndarray, factor: float = 1.6) -> np.ndarray:
    """A global defect: the weave at another scale (every patch still looks like brick)."""
    big = Image.fromarray(image).resize((int(SIZE * factor),) * 2, Image.Resampling.BILINEAR)
    return np.asarray(big)[:SIZE, :SIZE]


def patched(image: np.ndarray, seed: int) -> np.ndarray:
    """A local defect: a 24 px patch of another texture (grass)."""
    grass = np.stack([skimage.data.grass()] * 3, -1)
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, grass.shape[0] - 24, 2)
    out = image.copy()
    py, px = rng.integers(16, SIZE - 40, 2)
    out[py:py + 24, px:px + 24] = grass[y:y + 24, x:x + 24]
    return out


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def brick_archive(tmp_path_factory) -> Path:
    """MVTec layout: normal training crops from the top of the image, test crops from the bottom."""
    folder = tmp_path_factory.mktemp("brick")
    for i, pixels in enumerate(texture_crops(40, SIZE, seed=0, rows=slice(0, 256))):
        write(folder / "brick" / "train" / "good" / f"{i:03d}.png", png(pixels))
    test = texture_crops(30, SIZE, seed=1, rows=slice(256, None))
    for i in range(10):
        write(folder / "brick" / "test" / "good" / f"{i:03d}.png", png(test[i]))
        write(folder / "brick" / "test" / "patch" / f"{i:03d}.png", png(patched(test[10 + i], seed=i)))
        write(folder / "brick" / "test" / "rescaled" / f"{i:03d}.png", png(rescaled(test[20 + i])))
    return folder


def test_pfm_trains_on_ray_and_finds_local_and_global_texture_defects(ray_session, s3_root, brick_archive):
    spec = parse_spec(pfm_pipeline(s3_root, brick_archive))
    outcome = run_job(spec, run_id="pfm-1", echo=quiet)
    config = Location.parse(outcome.results["train"].output).join("config.json").read_json()
    assert config["method"] == "pfm" and set(config["thresholds"]) == {"*"}
    scores = datasets.read_table(Location.parse(outcome.results["score"].output)).to_pylist()
    assert len(scores) == 30 and not any(row["error"] for row in scores)
    by_type: dict[str, list[float]] = {}
    for row in scores:
        if not row["error"]:
            by_type.setdefault(row["image_id"].split("/")[2], []).append(row["score"])
    for defect in ("patch", "rescaled"):
        labels = np.r_[np.zeros(10), np.ones(10)]
        value = auroc(labels, np.r_[by_type["good"], by_type[defect]])
        assert value >= 0.9, (defect, value)

    # A score job on the same images with the same model (another run) is byte-identical.
    rerun = {"kind": "score", "name": "rescore", "storage": {"root": s3_root}, "split": "test",
             "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["train"].output},
             "outputs": {"anomaly_maps": True}, "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}}
    again = run_job(parse_spec(rerun), run_id="pfm-2", echo=quiet).results["rescore"]
    columns = ["image_id", "score", "anomaly_map", "error", "label_pred"]
    first = datasets.read_table(Location.parse(outcome.results["score"].output), columns=columns)
    second = datasets.read_table(Location.parse(again.output), columns=columns)
    assert first.equals(second)
    assert first["score"].to_numpy().tobytes() == second["score"].to_numpy().tobytes()


def pfm_pipeline(root: str, images: Path) -> dict:
    return {
        "kind": "pipeline", "name": "pfm-test", "storage": {"root": root}, "ray": {"address": "local"},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "mvtec", "uri": str(images)},
             "outputs": {"dataset": "brick"}},
            {"name": "train", "kind": "train", "method": "pfm", "inputs": {"dataset": "step:ingest"},
             "outputs": {"model": "pfm-brick", "version": "1"},
             "pfm": {"model": {"image_size": SIZE, "image_score": "mean"},
                     "training": {"steps": 40, "checkpoint_every": 20, "log_every": 10, "max_rotation": 0},
                     "variance_steps": 10},
             "threshold": {"method": "normal_quantile", "quantile": 0.9, "holdout_fraction": 0.2},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
            {"name": "score", "kind": "score", "inputs": {"dataset": "step:ingest"}, "model": {"uri": "step:train"},
             "split": "test", "outputs": {"anomaly_maps": True},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
        ],
    }
