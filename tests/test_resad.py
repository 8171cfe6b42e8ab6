"""ResAD: its compute parts against independent computations (nearest-reference residuals, the
flow's likelihood and log-determinant), the artifact round trip, a single image scoring as in its
batch and an exact resume, its spec checks, and the whole path on real Ray: trained on two
textures' synthetic anomalies, a score job with `references:` scores a third texture it never saw
from 4 normal images of it, and finds pasted squares of another texture (a defect its training
synthesis did not make); on a trained texture it finds a global defect (the weave rescaled).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from texture_defects import crops_of, write_textures_archive

from pipelines import datasets
from pipelines.errors import InputError, SpecError
from pipelines.evaluation.metrics import auroc
from pipelines.models.artifacts import ModelCard, save_artifact
from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext
from pipelines.models.resad import ResadConfig, ResadParams
from pipelines.models.resad.model import IMPLEMENTATION as RESAD
from pipelines.models.resad.model import LevelFlow, nearest_residuals, positional_encoding
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

SMALL = ResadParams(model=ResadConfig(image_size=64, shots=2, coupling_blocks=2, flow_hidden=16,
                                      positional_channels=8),
                    training=GradientTrainingSpec(steps=8), reference_buffer=4, statistics_steps=3)
CONTEXT = TrainingContext(class_names=("brick", "grass"), device="cpu", seed=0)


def quiet(*_args, **_kwargs) -> None:
    pass


def pairs_batch(seed: int) -> TrainingBatch:
    """Per texture (brick, grass) 2 normal crops and 2 with a square of one colour (mask = the square)."""
    rng = np.random.default_rng(seed)
    clean = np.concatenate([crops_of("brick", 4, 64, seed), crops_of("grass", 4, 64, seed)])
    pixels, masks = clean.copy(), np.zeros((8, 64, 64), bool)
    for i in (0, 1, 4, 5):
        y, x = rng.integers(8, 40, 2)
        masks[i, y:y + 16, x:x + 16] = True
        pixels[i][masks[i]] = rng.integers(0, 255, 3)
    return TrainingBatch(pixels, np.array(["brick"] * 4 + ["grass"] * 4), clean, masks)


def test_residuals_are_against_the_cosine_nearest_reference_position():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    references = rng.normal(size=(7, 5)).astype(np.float32)
    references[3] = 10 * features[1, :, 2, 1]  # same direction, other length: cosine picks it
    got = nearest_residuals(torch.tensor(features), torch.tensor(references)).numpy()
    queries = features.transpose(0, 2, 3, 1).reshape(-1, 5)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        references / np.linalg.norm(references, axis=1, keepdims=True)).T
    expected = (queries - references[cosine.argmax(1)]).reshape(2, 3, 4, 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1, :, 2, 1], -9 * features[1, :, 2, 1], rtol=1e-5)


def test_flow_likelihood_is_the_change_of_variables_formula():
    torch.manual_seed(0)
    flow = LevelFlow(channels=6, condition=4, hidden=8, blocks=3, clamp=1.9)
    x = torch.randn(5, 6)
    condition = positional_encoding(1, 5, 4)
    # fresh couplings are the identity: the NLL per channel is a standard normal's
    expected = (0.5 * x.pow(2) + 0.5 * np.log(2 * np.pi)).mean(1)
    torch.testing.assert_close(flow.negative_log_likelihood(x, condition), expected)
    for coupling in flow.couplings:  # now a real transform: check the log-determinant numerically
        torch.nn.init.normal_(coupling.subnet[-1].weight, std=0.5)
    coupling = flow.couplings[0]
    _, log_det = coupling(x, condition)
    for row in range(len(x)):
        def transform(v: torch.Tensor, row: int = row) -> torch.Tensor:
            return coupling(v[None], condition[row:row + 1])[0][0]

        jacobian = torch.autograd.functional.jacobian(transform, x[row])
        torch.testing.assert_close(log_det[row], torch.linalg.slogdet(jacobian)[1], rtol=1e-5, atol=1e-5)
    permuted = x
    total = torch.zeros(len(x))
    for block, c in enumerate(flow.couplings):
        permuted, block_log_det = c(permuted[:, getattr(flow, f"permutation{block}")], condition)
        total = total + block_log_det
    nll = (0.5 * permuted.pow(2).sum(1) + 3 * np.log(2 * np.pi) - total) / 6
    torch.testing.assert_close(flow.negative_log_likelihood(x, condition), nll)


def trained_state(steps: int):
    state = RESAD.training_state(SMALL, CONTEXT)
    for step in range(steps):
        state.train_batch(pairs_batch(step), torch.Generator().manual_seed(step), None)
    return state


def test_saved_model_scores_exactly_as_the_trained_one_and_a_resumed_state_steps_identically(tmp_path):
    state = trained_state(SMALL.training.steps)
    tensors, meta = state.state_tensors()
    published = RESAD.published(SMALL, CONTEXT, tensors, meta)
    assert sorted(published.tensors) == ["brick", "grass"]  # one model (own references) per class
    in_memory = RESAD.build(SMALL.model, published.tensors["grass"]).eval()
    folder = Location.parse(tmp_path.as_uri())
    save_artifact(folder, "resad", published.config, published.tensors, thresholds={"brick": 1.0, "grass": 1.0})
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    loaded = ModelCard.read(folder).load().models["grass"]
    images = torch.from_numpy(pairs_batch(99).pixels).permute(0, 3, 1, 2).float() / 255
    a, b = in_memory.score(images, [""] * 8), loaded.score(images, [""] * 8)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps) and a.maps.shape == (8, 64, 64)
    # one image alone scores as in the batch (batch norm is in eval mode, references are fixed)
    torch.testing.assert_close(in_memory.score(images[2:3], [""]).scores, a.scores[2:3], atol=1e-5, rtol=1e-5)
    # another class's references change the scores; the networks are shared, not copied
    other = RESAD.with_references(loaded, images[4:6])
    assert other.network is loaded.network and not torch.equal(other.score(images, [""] * 8).scores, b.scores)

    for cut in (1, 6):  # before every class has its shots, and while the statistics are gathered
        reference, resumed = trained_state(cut), RESAD.training_state(SMALL, CONTEXT)
        resumed.load_state_tensors(*reference.state_tensors())
        for step in range(cut, SMALL.training.steps):
            m1 = reference.train_batch(pairs_batch(step), torch.Generator().manual_seed(step), None)
            m2 = resumed.train_batch(pairs_batch(step), torch.Generator().manual_seed(step), None)
            assert m1 == m2, (cut, step)
        for (k1, v1), (k2, v2) in zip(sorted(reference.state_tensors()[0].items()),
                                      sorted(resumed.state_tensors()[0].items()), strict=True):
            assert k1 == k2 and torch.equal(v1, v2), k1


def test_a_class_waits_for_its_shots_and_an_idle_step_moves_no_batch_norm_statistics():
    state = RESAD.training_state(SMALL, CONTEXT)
    before = {k: v.clone() for k, v in state.module.state_dict().items()}
    first = state.train_batch(pairs_batch(0), torch.Generator().manual_seed(0), None)
    assert first["trained_rows"] == 0  # no buffered normals yet: nothing to take residuals against
    for key, value in state.module.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [len(b[0]) for b in state.buffers.values()] == [2, 2]  # the normal rows, not the anomalies
    assert state.train_batch(pairs_batch(1), torch.Generator().manual_seed(1), None)["trained_rows"] == 8


def test_bad_parameters_are_refused_naming_the_field():
    def spec(block: dict) -> dict:
        return {"kind": "train", "name": "t", "storage": {"root": "file:///tmp/x"}, "method": "resad",
                "inputs": {"dataset": "file:///tmp/x/datasets/d/1"}, "outputs": {"model": "m"}, "resad": block}

    cases = [({"model": {"shot": 4}}, r"resad\.model\.shot"),
             ({"model": {"shots": 0}}, r"resad\.model\.shots"),
             ({"model": {"positional_channels": 6}}, r"resad\.model\.positional_channels: must be a multiple of 4"),
             ({"model": {"image_score": "median"}}, r"resad\.model\.image_score"),
             ({"reference_buffer": 2}, r"resad\.reference_buffer: must hold at least model\.shots"),
             ({"statistics_steps": 5000}, r"resad\.statistics_steps: must be less than training\.steps"),
             ({"optim": {"lr": 0}}, r"resad\.optim\.lr")]
    for block, message in cases:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec(block))
    score = {"kind": "score", "name": "s", "storage": {"root": "file:///tmp/x"}, "inputs": {"dataset": "file:///tmp/d"},
             "model": {"uri": "file:///tmp/m"}}
    for references, message in (({"dataset": "file:///tmp/d", "count": 4}, r"references\.category"),
                                ({"dataset": "file:///tmp/d", "category": "a", "count": 0}, r"references\.count"),
                                ({"dataset": "file:///tmp/d", "category": "a", "shots": 4}, r"references\.shots")):
        with pytest.raises(SpecError, match=message):
            parse_spec({**score, "references": references})


# ---- the whole path on real Ray ----------------------------------------------------------------


@pytest.fixture(scope="module")
def textures_run(ray_session, tmp_path_factory):
    folder = write_textures_archive(tmp_path_factory.mktemp("textures"), trained=("brick", "grass"), unseen="gravel")
    root = f"file://{tmp_path_factory.mktemp('store')}"
    return root, folder, run_job(parse_spec(resad_pipeline(root, folder)), run_id="resad-1", echo=quiet)


def test_resad_scores_a_texture_it_never_saw_from_four_normal_images(textures_run):
    root, _, outcome = textures_run
    config = Location.parse(outcome.results["train"].output).join("config.json").read_json()
    assert config["method"] == "resad" and config["categories"] == ["brick", "grass"]
    scored = Location.parse(outcome.results["score"].output)
    scores = datasets.read_table(scored).to_pylist()
    assert len(scores) == 40 and not any(row["error"] for row in scores)
    # gravel, never trained on, against 4 of its normals: pasted brick squares; brick, trained on:
    # the weave rescaled 1.6x, a global defect. With the default training seed 0, reproducible since
    # the batches arrive in order (train_gradient), gravel 0.90 and brick 0.98. Across training
    # seeds 0-4 the transfer is fragile at this scale (120 steps, 4 shots): gravel 0.90, 0.82, 1.00,
    # 0.50, 0.87 (seed 3 stays at chance with 360 steps, 0.54); brick 0.98-1.00.
    for category, defect in (("gravel", "patch"), ("brick", "rescaled")):
        rows = [r for r in scores if r["category"] == category]
        good = [r["score"] for r in rows if "/good/" in r["image_id"]]
        bad = [r["score"] for r in rows if f"/{defect}/" in r["image_id"]]
        value = auroc(np.r_[np.zeros(10), np.ones(10)], np.r_[good, bad])
        assert value >= 0.8, (category, defect, value)
    scores = [r for r in scores if r["category"] == "gravel"]
    manifest = scored.join(datasets.MANIFEST_NAME).read_json()
    references = manifest["extra"]["references"]
    assert references["category"] == "gravel" and len(references["image_ids"]) == 4
    assert all(i.startswith("gravel/train/good/") for i in references["image_ids"])
    assert all(r["threshold"] == pytest.approx(references["threshold"]) for r in scores)
    # the default threshold: the highest score of a reference against the other three
    model = ModelCard.read(Location.parse(outcome.results["train"].output)).load().models["brick"]
    shots = decoded_references(root, references["image_ids"])
    leave_one_out = [float(RESAD.with_references(model, torch.cat([shots[:i], shots[i + 1:]])).score(
        shots[i:i + 1], [""]).scores[0]) for i in range(4)]
    assert references["threshold"] == pytest.approx(max(leave_one_out), rel=1e-5)

    # the same job again: the same references, byte-identical rows
    spec = {**resad_pipeline(root, None)["steps"][-1], "storage": {"root": root},
            "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["train"].output}}
    spec["references"] = {**spec["references"], "dataset": outcome.results["ingest"].output}
    again = run_job(parse_spec(spec), run_id="resad-2", echo=quiet).results["score"]
    columns = ["image_id", "score", "anomaly_map", "label_pred"]
    assert datasets.read_table(scored, columns=columns).sort_by("image_id").equals(
        datasets.read_table(Location.parse(again.output), columns=columns).sort_by("image_id"))


def test_without_references_an_unseen_category_gets_error_rows(textures_run):
    root, _, outcome = textures_run
    spec = {**resad_pipeline(root, None)["steps"][-1], "storage": {"root": root},
            "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["train"].output}}
    del spec["references"]
    result = run_job(parse_spec(spec), run_id="resad-3", echo=quiet).results["score"]
    rows = datasets.read_table(Location.parse(result.output)).to_pylist()
    gravel = [r for r in rows if r["category"] == "gravel"]
    assert len(rows) == 40 and len(gravel) == 20
    assert all(r["error"] == "no model for category 'gravel'" and r["score"] is None for r in gravel)
    assert not any(r["error"] for r in rows if r["category"] == "brick")


def test_references_that_are_scored_too_or_too_few_or_for_another_method_are_refused(textures_run):
    root, _, outcome = textures_run
    base = {**resad_pipeline(root, None)["steps"][-1], "storage": {"root": root},
            "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["train"].output}}
    references = {**base["references"], "dataset": outcome.results["ingest"].output}
    with pytest.raises(InputError, match=r"reference image 'gravel/train/good/\d+\.png' would be scored too"):
        run_job(parse_spec({**base, "split": None, "references": references}), run_id="resad-4", echo=quiet)
    with pytest.raises(InputError, match=r"has 24 normal images of category 'gravel', split 'train'; "
                                         r"references\.count asks for 30"):
        run_job(parse_spec({**base, "references": {**references, "count": 30}}), run_id="resad-5", echo=quiet)


def decoded_references(root: str, image_ids: list[str]) -> torch.Tensor:
    """The reference images as the scorer saw them (128 px PNGs, the model's size: no resize)."""
    import io

    from PIL import Image

    table = datasets.read_table(Location.parse(root).join("datasets", "textures", "resad-1"),
                                columns=["image_id", "image"]).to_pylist()
    by_id = {row["image_id"]: row["image"] for row in table}
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(by_id[i])).convert("RGB")) for i in image_ids])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def resad_pipeline(root: str, images) -> dict:
    return {
        "kind": "pipeline", "name": "resad-test", "storage": {"root": root}, "ray": {"address": "local"},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "mvtec", "uri": str(images)},
             "outputs": {"dataset": "textures"}},
            {"name": "donors", "kind": "ingest", "source": {"type": "skimage", "images": ["rocket", "coffee"]},
             "outputs": {"dataset": "donors"}},
            {"name": "synthesize", "kind": "synthesize", "inputs": {"dataset": "step:ingest"},
             "categories": ["brick", "grass"], "outputs": {"dataset": "texture-anomalies"}, "image_size": 128,
             "per_image": 2, "include_normals": True, "seed": 3,
             "sources": [{"type": "texture", "textures": {"dataset": "step:donors"}}, {"type": "cutpaste"}],
             "resources": {"workers": 1, "batch_size": 8}},
            {"name": "train", "kind": "train", "method": "resad", "inputs": {"dataset": "step:synthesize"},
             "categories": ["brick", "grass"], "outputs": {"model": "resad-textures", "version": "1"},
             "resad": {"model": {"image_size": 128, "coupling_blocks": 4, "flow_hidden": 64},
                       "training": {"steps": 120, "checkpoint_every": 60, "log_every": 20, "max_rotation": 0},
                       "statistics_steps": 20},
             "threshold": {"method": "normal_quantile", "quantile": 0.9, "holdout_fraction": 0.2},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
            {"name": "score", "kind": "score", "inputs": {"dataset": "step:ingest"}, "model": {"uri": "step:train"},
             "split": "test", "outputs": {"anomaly_maps": True},
             "references": {"dataset": "step:ingest", "category": "gravel", "count": 4},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
        ],
    }
