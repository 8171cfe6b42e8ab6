"""`synthesize` on real Ray: masks match the changed pixels, provenance on every row, reproducible
bytes, SDAS from a real (tiny) DDPM artifact, and a sanity check that a detector trained on
normals scores the synthetic anomalies above held-out normals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from imagefiles import write
from pipelines import datasets
from pipelines.errors import SpecError
from pipelines.evaluation.metrics import auroc
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

pytestmark = pytest.mark.integration


def quiet(*_args, **_kwargs) -> None:
    pass


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def brick_dataset(ray_session, tmp_path_factory):
    """Normal images = nearly aligned crops of one brick wall with sensor noise, like a part on a
    production line (MVTec layout: train 24, test 8 normals); a texture dataset of other surfaces
    (images bundled with scikit-image, through the `skimage` ingest source). In a file:// root."""
    folder = tmp_path_factory.mktemp("bricks")
    rng = np.random.default_rng(0)
    wall = skdata.brick().astype(float)
    for i in range(32):
        y, x = 100 + rng.integers(-3, 4, 2)
        crop = np.clip(wall[y:y + 128, x:x + 128] + rng.normal(0, 3, (128, 128)), 0, 255).astype(np.uint8)
        split = "train/good" if i < 24 else "test/good"
        write(folder / "mvtec" / "brick" / split / f"{i:03d}.png", png(crop))
    root = f"file://{folder}/store"
    run = run_job(parse_spec({
        "kind": "pipeline", "name": "bricks", "storage": {"root": root},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "mvtec", "uri": str(folder / "mvtec")},
             "outputs": {"dataset": "bricks", "rows_per_part": 8}},
            {"name": "textures", "kind": "ingest",
             "source": {"type": "skimage", "images": ["grass", "gravel", "rocket"]},
             "outputs": {"dataset": "textures"}},
        ]}), run_id="bricks", echo=quiet)
    return root, run.results["ingest"].output, run.results["textures"].output


def synthesize_spec(root: str, images: str, textures: str, **extra) -> dict:
    return {"kind": "synthesize", "name": "synth", "storage": {"root": root}, "inputs": {"dataset": images},
            "outputs": {"dataset": "brick-anomalies"}, "image_size": 64, "per_image": 2,
            "include_normals": True, "seed": 7,
            "sources": [{"type": "texture", "textures": {"dataset": textures}}, {"type": "cutpaste"},
                        {"type": "poisson"}],
            "resources": {"workers": 1, "batch_size": 8}, **extra}


def test_rows_per_part_is_refused_since_output_parts_mirror_input_parts():
    spec = synthesize_spec("file:///tmp/store", "file:///tmp/store/datasets/x/v", "file:///tmp/store/datasets/t/v")
    spec["outputs"]["rows_per_part"] = 64
    with pytest.raises(SpecError) as error:
        parse_spec(spec)
    assert "outputs.rows_per_part" in str(error.value) and "one input part" in str(error.value)


def test_masks_match_changed_pixels_with_provenance_and_the_same_spec_gives_the_same_bytes(brick_dataset):
    root, images, textures = brick_dataset
    spec = parse_spec(synthesize_spec(root, images, textures))
    first = run_job(spec, run_id="synth-a", echo=quiet).results["synth"]
    second = run_job(spec, run_id="synth-b", echo=quiet).results["synth"]
    table_a = datasets.read_table(Location.parse(first.output))
    table_b = datasets.read_table(Location.parse(second.output))
    assert table_a.num_rows == 24 * 3  # 2 anomalies + the normal, per training image
    assert table_a.equals(table_b), "the same spec (seed) must give the same bytes"

    rows = table_a.to_pylist()
    normals = {r["image_id"]: decode(r["image"]) for r in rows if r["label"] == 0}
    synthetic = [r for r in rows if r["label"] == 1]
    assert len(normals) == 24 and len(synthetic) == 48
    assert {r["defect_type"] for r in synthetic} <= {"texture", "cutpaste", "poisson"}
    assert len({r["defect_type"] for r in synthetic}) >= 2
    for r in synthetic:
        source = normals[r["synthesis"]["source_image_id"]]
        image, mask = decode(r["image"]), decode(r["mask"]) > 0
        changed = (image != source).any(axis=-1)
        assert mask.any(), r["image_id"]
        assert not changed[~mask].any(), f"{r['image_id']}: pixels outside the mask changed"
        assert changed[mask].mean() > 0.5, f"{r['image_id']}: the mask is mostly unchanged"
        provenance = r["synthesis"]
        assert provenance["method"] == r["defect_type"] and provenance["seed"] is not None
        assert 0.0 <= provenance["opacity"] <= 1.0
        assert r["split"] == "train" and r["width"] == r["height"] == 64

    summary = Location.parse(f"{root}/runs/synth-a/steps/synth/synthesis_summary.json").read_json()
    assert summary["synthetic"] == 48 and sum(summary["per_source"].values()) == 48
    for picture in ("contact_sheet.png", "coverage.png"):
        with Image.open(io.BytesIO(Location.parse(f"{root}/runs/synth-a/steps/synth/{picture}").read_bytes())) as image:
            image.load()  # a real, complete PNG
            assert image.format == "PNG" and min(image.size) >= 64


def test_sdas_source_from_a_real_ddpm_artifact(brick_dataset, tmp_path):
    import torch

    from pipelines.models.artifacts import ALL_CATEGORIES, save_artifact
    from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
    from pipelines.models.diffusion.training import TrainingState

    root, images, textures = brick_dataset
    config = DdpmConfig(image_size=16, block_out_channels=(16, 32), learned_variance=True)
    state = TrainingState(config, OptimConfig(lr=0.002), total_steps=5)
    for step in range(5):
        state.train_step(torch.rand(4, 3, 16, 16) * 2 - 1, None, torch.Generator().manual_seed(step))
    model = Location.parse(f"{root}/models/ddpm-tiny/1")
    save_artifact(model, "ddpm", config, {ALL_CATEGORIES: state.ema.state_dict()}, info={"class_names": ["brick"]})
    spec = synthesize_spec(root, images, textures, per_image=1, include_normals=False,
                           sources=[{"type": "sdas", "model": {"uri": model.uri}, "steps": 5}],
                           outputs={"dataset": "brick-sdas"})
    result = run_job(parse_spec(spec), run_id="sdas", echo=quiet).results["synth"]
    rows = datasets.read_table(Location.parse(result.output)).to_pylist()
    assert len(rows) == 24 and {r["defect_type"] for r in rows} == {"sdas"}
    for r in rows:
        provenance = r["synthesis"]
        assert 0.1 <= provenance["strength"] <= 0.2 and 0.5 <= provenance["opacity"] <= 1.0
        assert provenance["model_version"] == "ddpm-tiny@1"


def test_a_detector_trained_on_normals_scores_synthetic_anomalies_above_held_out_normals(brick_dataset):
    root, images, textures = brick_dataset
    synthetic = run_job(parse_spec(synthesize_spec(root, images, textures, include_normals=False,
                                                   outputs={"dataset": "brick-check"}, split="test")),
                        run_id="synth-check", echo=quiet).results["synth"].output
    fit = run_job(parse_spec({
        "kind": "train", "name": "fit", "storage": {"root": root}, "method": "padim", "inputs": {"dataset": images},
        "outputs": {"model": "padim-bricks"}, "padim": {"image_size": 64, "kept_channels": 50},
        "threshold": {"holdout_fraction": 0.2}, "resources": {"workers": 1, "batch_size": 8}}),
        run_id="fit-bricks", echo=quiet).results["fit"].output

    def scores(dataset: str, run_id: str, split: str) -> np.ndarray:
        out = run_job(parse_spec({
            "kind": "score", "name": "score", "storage": {"root": root}, "inputs": {"dataset": dataset},
            "model": {"uri": fit}, "split": split, "resources": {"workers": 1, "batch_size": 8}}),
            run_id=run_id, echo=quiet).results["score"].output
        return np.array(datasets.read_table(Location.parse(out)).column("score").to_pylist(), float)

    anomalous = scores(synthetic, "score-synth", "test")
    normal = scores(images, "score-normal", "test")  # the 8 held-out normal crops
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    assert auroc(labels, np.r_[normal, anomalous]) > 0.8


def test_a_rerun_after_a_lost_part_rewrites_only_that_part_without_duplicates(brick_dataset):
    """What a killed run leaves: some parts and their records, no manifest. The rerun of the run id
    keeps the finished parts, redoes the rest under the same names, and publishes each row once."""
    root, images, textures = brick_dataset
    spec = parse_spec(synthesize_spec(root, images, textures, outputs={"dataset": "brick-resume"}))
    first = run_job(spec, run_id="synth-resume", echo=quiet).results["synth"]
    folder = Location.parse(first.output)
    before = datasets.read_table(folder)
    manifest = datasets.read_manifest(folder)
    assert len(manifest.parts) >= 1
    # Simulate the kill: the manifest (written last) is gone, so is the last part and its record.
    folder.join(datasets.MANIFEST_NAME).delete()
    folder.join(manifest.parts[-1].path).delete()
    folder.join("_parts", f"{len(manifest.parts) - 1:05d}.json").delete()
    status = Location.parse(f"{root}/runs/synth-resume/status.json")
    record = status.read_json()
    record["steps"]["synth"]["state"] = "failed"
    status.write_json(record)

    rerun = run_job(spec, run_id="synth-resume", echo=quiet).results["synth"]
    after = datasets.read_table(Location.parse(rerun.output))
    assert after.equals(before)
    # Parts with rows taken from the first attempt: all but the lost one (empty parts do not count).
    assert rerun.details["reused_parts"] == sum(1 for p in manifest.parts[:-1] if p.rows)
    ids = after.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "no duplicate rows"
