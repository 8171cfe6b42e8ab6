"""PFM: its compute code (artifact round trip, exact resume), its spec checks, and the whole path
on real Ray (ingest -> gradient training with calibration -> score) on a real texture from
scikit-image, with local and global defects made by generators PFM never saw (it trains on
normal images only).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from texture_defects import SIZE, texture_crops, write_brick_archive

from pipelines import datasets
from pipelines.errors import InputError, SpecError
from pipelines.evaluation.metrics import auroc
from pipelines.models.artifacts import ModelCard, save_artifact
from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext
from pipelines.models.pfm import PfmConfig, PfmOptim, PfmParams
from pipelines.models.pfm.model import IMPLEMENTATION as PFM
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

SMALL = PfmParams(model=PfmConfig(stages=(1, 2), latent_channels=(16, 16), image_size=64),
                  optim=PfmOptim(lr=(3e-3, 3e-4)), training=GradientTrainingSpec(steps=6), variance_steps=4)
CONTEXT = TrainingContext(class_names=("a",), device="cpu", seed=0)


def quiet(*_args, **_kwargs) -> None:
    pass


def trained_state(steps: int, params: PfmParams = SMALL):
    state = PFM.training_state(params, CONTEXT)
    pixels = texture_crops(4, 64, seed=1)
    for _ in range(steps):
        state.train_batch(TrainingBatch(pixels, np.array(["a"] * 4)), torch.Generator(), None)
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
        state.train_batch(TrainingBatch(pixels, np.array(["a"] * 4)), torch.Generator(), None)
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
        reference.train_batch(TrainingBatch(pixels, np.array(["a"] * 4)), torch.Generator(), None)
        if step >= SMALL.training.steps - SMALL.variance_steps:
            # the errors of the mapping just updated, in eval mode (BatchNorm's running statistics)
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
            errors = reference.module.eval()(*reference.features(images))
            reference.module.train()
            for stage, pair in zip(SMALL.model.stages, errors, strict=True):
                for direction, error in zip(("source_to_target", "target_to_source"), pair, strict=True):
                    values = error.detach().double().numpy().transpose(1, 0, 2, 3).reshape(error.shape[1], -1)
                    collected.setdefault(f"variance/{stage}/{direction}", []).append(values)
    for name, chunks in collected.items():
        expected = np.concatenate(chunks, axis=1).var(axis=1, ddof=1)
        np.testing.assert_allclose(variances[name].numpy(), expected, rtol=1e-4)


def test_bad_pfm_parameters_exit_2_naming_them(tmp_path, file_root):
    def spec(pfm: dict) -> dict:
        return {"kind": "train", "name": "pfm-bad", "storage": {"root": file_root}, "method": "pfm",
                "inputs": {"dataset": f"{file_root}/datasets/x/1"}, "outputs": {"model": "m"}, "pfm": pfm}

    cases = [({"model": {"latent_chanels": 8}}, r"pfm\.model\.latent_chanels.*did you mean 'latent_channels'"),
             ({"model": {"target_backbone": "efficientnet_lite1"}}, r"pfm\.model\.target_backbone: must differ"),
             ({"model": {"image_score": "median"}}, r"pfm\.model\.image_score"),
             ({"optim": {"lr": [0.1]}}, r"pfm\.optim\.lr: needs one learning rate per stage"),
             ({"variance_steps": 5000}, r"pfm\.variance_steps: must be at most training\.steps"),
             ({"model": {"stages": [3, 1]}}, r"pfm\.model\.stages"),
             ({"model": {"latent_channels": [16]}}, r"pfm\.model\.latent_channels: needs one width >= 1 per stage")]
    for block, message in cases:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec(block))
    with pytest.raises(SpecError, match=r"per_category.*pfm"):
        parse_spec({**spec({}), "per_category": True})


# ---- the whole path on real Ray ----------------------------------------------------------------

@pytest.fixture(scope="module")
def brick_archive(tmp_path_factory) -> Path:
    return write_brick_archive(tmp_path_factory.mktemp("brick"))


def test_pfm_trains_on_ray_and_finds_local_and_global_texture_defects(ray_session, s3_root, brick_archive):
    spec = parse_spec(pfm_pipeline(s3_root, brick_archive))
    outcome = run_job(spec, run_id="pfm-1", echo=quiet)
    config = Location.parse(outcome.results["train"].output).join("config.json").read_json()
    assert config["method"] == "pfm" and set(config["thresholds"]) == {"*"}
    # The summary gives the one network's images once, not "0 images" per model key.
    train_summary = outcome.results["train"].summary
    assert f"on {config['info']['trained_images']} images" in train_summary[0], train_summary
    assert any(line.strip().startswith("*: threshold ") for line in train_summary), train_summary
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


def test_the_default_bottleneck_is_the_authors_ratio_and_an_old_single_width_model_is_refused():
    # 0.8 x Lite2's 24 / 48 / 120 channels at stages 1-3, as 200 / 400 / 900 is for ResNet50's 256 / 512 / 1024
    assert PfmConfig().latents() == (19, 38, 96)
    assert PfmConfig(latent_channels=(8, 8, 8)).latents() == (8, 8, 8)
    old = dataclasses.replace(SMALL.model, latent_channels=200)  # as a config.json of an earlier adpipe reads back
    with pytest.raises(InputError, match="earlier adpipe.*retrain"):
        PFM.build(old, None)
