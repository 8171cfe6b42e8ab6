"""RealNet: its compute parts against independent computations (AFS criterion, RRS), the artifact
round trip and an exact resume, its spec checks, the synthetic-pairs data path, and the whole
path on real Ray (ingest -> synthesize with include_normals -> train -> score) on a real texture:
trained on Perlin-masked textures and CutPaste, it must find a grass patch and a rescaled weave,
defects made by generators it never saw.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from texture_defects import texture_crops, write_brick_archive

from imagefiles import corrupt_png, publish_archive
from pipelines import datasets
from pipelines.data.synthetic_pairs import pair_rows
from pipelines.errors import InputError, SpecError
from pipelines.evaluation.metrics import auroc
from pipelines.models.artifacts import ModelCard, save_artifact
from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext
from pipelines.models.realnet import RealnetConfig, RealnetParams
from pipelines.models.realnet.model import IMPLEMENTATION as REALNET
from pipelines.models.realnet.model import afs_mismatch, choose_channels, residual_selection
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

SMALL = RealnetParams(
    model=RealnetConfig(afs_channels=(8, 12, 16), rrs_channels=8, reconstruction_width=16, discriminator_width=16,
                        image_size=64, score_pool=8),
    training=GradientTrainingSpec(steps=8), afs_steps=2)
CONTEXT = TrainingContext(class_names=("a",), device="cpu", seed=0)


def quiet(*_args, **_kwargs) -> None:
    pass


def pairs_batch(seed: int) -> TrainingBatch:
    """4 normal brick crops and 4 with a square of one colour (mask = the square)."""
    rng = np.random.default_rng(seed)
    clean = texture_crops(8, 64, seed=seed)
    pixels, masks = clean.copy(), np.zeros((8, 64, 64), bool)
    for i in range(4):
        y, x = rng.integers(8, 40, 2)
        masks[i, y:y + 16, x:x + 16] = True
        pixels[i][masks[i]] = rng.integers(0, 255, 3)
    return TrainingBatch(pixels, np.array(["a"] * 8), clean, masks)


def test_afs_criterion_matches_numpy_and_keeps_the_channels_that_follow_the_mask():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(3, 6, 8, 8))
    masks = np.zeros((3, 32, 32), bool)
    masks[:, 8:20, 4:16] = True
    anomalous = clean + rng.normal(scale=0.3, size=clean.shape)
    cells = masks.reshape(3, 8, 4, 8, 4).mean((2, 4))  # the mask's share of each 4x4 cell
    anomalous[:, [1, 4]] = clean[:, [1, 4]] + 3 * cells[:, None]  # channels 1 and 4 change with the mask
    got = afs_mismatch(torch.tensor(anomalous), torch.tensor(clean), torch.tensor(masks)).numpy()
    change = ((anomalous - clean) ** 2).reshape(3, 6, -1)
    low, high = change.min(-1, keepdims=True), change.max(-1, keepdims=True)
    expected = (((change - low) / (high - low) - cells.reshape(3, 1, -1)) ** 2).mean(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert choose_channels(torch.tensor(got.sum(0)), 2).tolist() == [1, 4]


def test_rrs_keeps_the_top_channels_by_spatial_max_and_by_spatial_mean():
    residuals = torch.rand(2, 10, 6, 6, generator=torch.Generator().manual_seed(0))
    residuals[0, 3] += 5 * (torch.arange(36).view(6, 6) == 7)  # a peak: local
    residuals[0, 8] += 0.5  # raised everywhere: global
    chosen = residual_selection(residuals, 2)
    for image in range(2):
        r = residuals[image].numpy()
        by_max = np.argsort(-r.max(axis=(1, 2)), kind="stable")[:2]
        by_mean = np.argsort(-r.mean(axis=(1, 2)), kind="stable")[:2]
        np.testing.assert_array_equal(chosen[image].numpy(), r[np.r_[by_max, by_mean]])
    assert torch.equal(chosen[0, 0], residuals[0, 3]) and torch.equal(chosen[0, 2], residuals[0, 8])


def trained_state(steps: int):
    state = REALNET.training_state(SMALL, CONTEXT)
    for step in range(steps):
        state.train_batch(pairs_batch(step), torch.Generator(), None)
    return state


def test_saved_model_scores_exactly_as_the_trained_one_and_a_resumed_state_steps_identically(tmp_path):
    state = trained_state(SMALL.training.steps)
    assert state.selected is not None and [len(s) for s in state.selected] == [8, 12, 16]
    tensors, meta = state.state_tensors()
    published = REALNET.published(SMALL, CONTEXT, tensors, meta)
    in_memory = REALNET.build(SMALL.model, published.tensors["*"]).eval()
    folder = Location.parse(tmp_path.as_uri())
    save_artifact(folder, "realnet", published.config, published.tensors, thresholds={"*": 0.5}, info={}, lineage={})
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    loaded = ModelCard.read(folder).load().models["*"]
    images = torch.from_numpy(pairs_batch(99).pixels).permute(0, 3, 1, 2).float() / 255
    a, b = in_memory.score(images, [""] * 8), loaded.score(images, [""] * 8)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert a.maps.shape == (8, 64, 64) and float(a.maps.min()) >= 0 and float(a.maps.max()) <= 1
    # one image alone scores as in the batch (no batch statistics anywhere)
    assert torch.allclose(in_memory.score(images[2:3], [""]).scores, a.scores[2:3], atol=1e-6)

    # resume across the AFS boundary (step 1 of 2) and inside training: bitwise the same steps
    for cut in (1, 5):
        reference, resumed = trained_state(cut), REALNET.training_state(SMALL, CONTEXT)
        resumed.load_state_tensors(*reference.state_tensors())
        for step in range(cut, SMALL.training.steps):
            m1 = reference.train_batch(pairs_batch(step), torch.Generator(), None)
            m2 = resumed.train_batch(pairs_batch(step), torch.Generator(), None)
            assert m1 == m2, (cut, step)
        for (k1, v1), (k2, v2) in zip(sorted(reference.state_tensors()[0].items()),
                                      sorted(resumed.state_tensors()[0].items()), strict=True):
            assert k1 == k2 and torch.equal(v1, v2), k1


def test_pairs_are_half_normal_with_clean_sources_and_bad_rows_are_kept_as_errors():
    pixels = np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((6, 4, 4, 3), np.uint8)
    masks = np.zeros((6, 4, 4), bool)
    masks[[1, 2, 4], 0, 0] = True
    block = {"image_id": np.array(["n0", "n0#synth-0", "n0#synth-1", "n1", "n1#synth-0", "n2#synth-0"], object),
             "category": np.array(["a"] * 6, object), "label": np.array([0, 1, 1, 0, 1, 1], np.int8),
             "source_image_id": np.array(["", "n0", "n0", "", "n1", "n2"], object),
             "pixels": pixels, "mask": masks, "error": np.array(["", "", "", "", "", ""], object)}
    out = pair_rows(block, seed=0, epoch=0)
    good = [i for i, e in enumerate(out["error"]) if not e]
    assert sorted(out["label"][good].tolist()) == [0, 0, 1, 1]  # one anomaly per normal
    for i in good:
        source = str(out["image_id"][i]).split("#")[0]
        assert out["clean"][i][0, 0, 0] == {"n0": 0, "n1": 3}[source]
        assert out["mask"][i].any() == (out["label"][i] == 1)
    bad = [i for i, e in enumerate(out["error"]) if e]
    assert [out["image_id"][i] for i in bad] == ["n2#synth-0"] and "'n2'" in out["error"][bad[0]]
    chosen = {tuple(pair_rows(block, seed=0, epoch=e)["image_id"]) for e in range(6)}
    assert len(chosen) > 1  # another anomaly of n0 (and another order) in other epochs


def test_bad_parameters_are_refused_naming_the_field():
    def spec(block: dict) -> dict:
        return {"kind": "train", "name": "t", "storage": {"root": "file:///tmp/x"}, "method": "realnet",
                "inputs": {"dataset": "file:///tmp/x/datasets/d/1"}, "outputs": {"model": "m"}, "realnet": block}

    cases = [({"model": {"afs_channel": [1, 2, 3]}}, r"realnet\.model\.afs_channel"),
             ({"model": {"afs_channels": [16, 24]}}, r"realnet\.model\.afs_channels: needs one count per stage"),
             ({"model": {"afs_channels": [16, 24, 500]}}, r"realnet\.model\.afs_channels"),
             ({"model": {"rrs_channels": 1000}}, r"realnet\.model\.rrs_channels: must be at most"),
             ({"model": {"image_size": 100}}, r"realnet\.model\.image_size"),
             ({"afs_steps": 5000}, r"realnet\.afs_steps: must be less than training\.steps"),
             ({"optim": {"lr": -1}}, r"realnet\.optim\.lr")]
    for block, message in cases:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec(block))


# ---- the whole path on real Ray ----------------------------------------------------------------


@pytest.fixture(scope="module")
def brick_run(ray_session, tmp_path_factory):
    folder = write_brick_archive(tmp_path_factory.mktemp("brick"))
    root = f"file://{tmp_path_factory.mktemp('store')}"
    spec = parse_spec(realnet_pipeline(root, folder))
    return root, folder, run_job(spec, run_id="realnet-1", echo=quiet)


def test_realnet_trains_on_synthetic_pairs_and_finds_defects_it_never_saw(brick_run):
    root, folder, outcome = brick_run
    config = Location.parse(outcome.results["train"].output).join("config.json").read_json()
    assert config["method"] == "realnet" and set(config["thresholds"]) == {"*"}
    assert config["info"]["afs_images"] > 0 and 25 < config["info"]["trained_images"] < 40  # less the held-out normals
    scores = datasets.read_table(Location.parse(outcome.results["score"].output)).to_pylist()
    assert len(scores) == 30 and not any(row["error"] for row in scores)
    by_type: dict[str, list[float]] = {}
    for row in scores:
        by_type.setdefault(row["image_id"].split("/")[2], []).append(row["score"])
    # Local: a grass patch, pasted as a square (training saw Perlin-masked gravel/rocket and CutPaste).
    # Global: the weave rescaled 1.6x. RealNet sees it through RRS's mean-pooled residual channels
    # (unit-tested above), but weakly and unsteadily at this test's budget: 0.67-0.88 over reruns
    # of this test (150 steps on a fixed set of anomalies; 0.98-1.0 in-process with anomalies drawn
    # fresh every step), so only "above chance" is asserted here: README "Global defects".
    for defect, floor in (("patch", 0.9), ("rescaled", 0.6)):
        value = auroc(np.r_[np.zeros(10), np.ones(10)], np.r_[by_type["good"], by_type[defect]])
        assert value >= floor, (defect, value)

    # Another score job, on an archive written by another system with the same images plus a
    # corrupt one: an error row for that one, byte-identical rows for the others.
    files = sorted((folder / "brick" / "test").rglob("*.png"))
    entries = [(f"brick/test/{p.parent.name}/{p.name}", p.read_bytes(), "brick", "test", 0) for p in files]
    archive = publish_archive(Location.parse(root).join("datasets", "odd", "1"),
                              [entries[:15], [*entries[15:], ("brick/test/bad/corrupt.png", corrupt_png(), "brick",
                                                              "test", 1)]])
    rerun = {"kind": "score", "name": "rescore", "storage": {"root": root}, "split": "test",
             "inputs": {"dataset": archive.uri}, "model": {"uri": outcome.results["train"].output},
             "outputs": {"anomaly_maps": True}, "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}}
    again = run_job(parse_spec(rerun), run_id="realnet-2", echo=quiet).results["rescore"]
    columns = ["image_id", "score", "anomaly_map", "error", "label_pred"]
    first = datasets.read_table(Location.parse(outcome.results["score"].output), columns=columns).sort_by("image_id")
    second = datasets.read_table(Location.parse(again.output), columns=columns).sort_by("image_id")
    bad = [row for row in second.to_pylist() if row["error"]]
    assert [row["image_id"] for row in bad] == ["brick/test/bad/corrupt.png"] and bad[0]["score"] is None
    assert first.equals(second.filter(pc.invert(pc.equal(second["image_id"], "brick/test/bad/corrupt.png"))))


def test_realnet_refuses_a_dataset_without_synthetic_anomalies(brick_run):
    root, _, outcome = brick_run
    spec = realnet_pipeline(root, None)["steps"][3]
    spec = {**spec, "kind": "train", "storage": {"root": root}, "inputs": {"dataset": outcome.results["ingest"].output}}
    with pytest.raises(InputError, match=r"no synthetic anomaly made from them.*include_normals: true"):
        run_job(parse_spec(spec), run_id="realnet-3", echo=quiet)


def realnet_pipeline(root: str, images) -> dict:
    return {
        "kind": "pipeline", "name": "realnet-test", "storage": {"root": root}, "ray": {"address": "local"},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "mvtec", "uri": str(images)},
             "outputs": {"dataset": "brick"}},
            {"name": "textures", "kind": "ingest", "source": {"type": "skimage", "images": ["gravel", "rocket"]},
             "outputs": {"dataset": "textures"}},
            {"name": "synthesize", "kind": "synthesize", "inputs": {"dataset": "step:ingest"},
             "outputs": {"dataset": "brick-anomalies"}, "image_size": 128, "per_image": 4, "include_normals": True,
             "seed": 3, "sources": [{"type": "texture", "textures": {"dataset": "step:textures"}},
                                    {"type": "cutpaste"}],
             "resources": {"workers": 1, "batch_size": 8}},
            {"name": "train", "kind": "train", "method": "realnet", "inputs": {"dataset": "step:synthesize"},
             "outputs": {"model": "realnet-brick", "version": "1"},
             "realnet": {"model": {"image_size": 128, "afs_channels": [12, 20, 48], "rrs_channels": 16,
                                   "reconstruction_width": 32, "discriminator_width": 32},
                         "optim": {"lr": 3e-3},
                         "training": {"steps": 150, "checkpoint_every": 75, "log_every": 25, "max_rotation": 0},
                         "afs_steps": 4},
             "threshold": {"method": "normal_quantile", "quantile": 0.9, "holdout_fraction": 0.2},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
            {"name": "score", "kind": "score", "inputs": {"dataset": "step:ingest"}, "model": {"uri": "step:train"},
             "split": "test", "outputs": {"anomaly_maps": True},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
        ],
    }
