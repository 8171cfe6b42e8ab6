"""Train (PaDiM) and score on real Ray: odd and broken images, idempotent reruns, resume."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from imagefiles import archive_table, corrupt_png, encode, jpeg, png, publish_archive, truncated_png
from pipelines import datasets
from pipelines.errors import InputError, SpecError
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location
from pipelines.tables import IMAGES_SCHEMA

pytestmark = pytest.mark.integration
PADIM = {"backbone": "efficientnet_lite0", "stages": [1, 2], "kept_channels": 16, "image_size": 64, "seed": 0}


def quiet(*_args, **_kwargs) -> None:
    pass


def texture(seed: int, size=(80, 80), defect: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = (np.indices(size).sum(0) % 8 * 16 + rng.normal(0, 4, size)).clip(0, 255).astype(np.uint8)
    if defect:
        base[30:50, 30:50] = 255
    return Image.fromarray(base, "L")


def image_rows(entries: list[tuple[str, bytes, str, int | None]]) -> pa.Table:
    return archive_table([(i, d, "tex", split, label) for i, d, split, label in entries])


def publish_images(folder: Location, parts: list[list[tuple[str, bytes, str, int | None]]]) -> Location:
    """An archive written by some other system (category "tex"): same schema, no ingest-time checks."""
    return publish_archive(folder, [[(i, d, "tex", split, label) for i, d, split, label in p] for p in parts])


@pytest.fixture(scope="module")
def trained_model(ray_session, tmp_path_factory):
    root = f"file://{tmp_path_factory.mktemp('score-root')}"
    train = [(f"train/{i}.png", encode(texture(i)), "train", 0) for i in range(24)]
    images = publish_images(Location.parse(root).join("datasets", "tex", "1"), [train[:12], train[12:]])
    spec = parse_spec({"kind": "train", "name": "fit", "storage": {"root": root}, "method": "padim",
                       "inputs": {"dataset": images.uri}, "outputs": {"model": "padim-tex"}, "padim": PADIM,
                       "threshold": {"holdout_fraction": 0.25}, "resources": {"workers": 2, "batch_size": 8}})
    result = run_job(spec, echo=quiet).results["fit"]
    return root, result.output


def score_spec(root: str, archive: str, model: str, maps: bool = True) -> dict:
    return {"kind": "score", "name": "score-it", "storage": {"root": root}, "inputs": {"dataset": archive},
            "model": {"uri": model}, "outputs": {"anomaly_maps": maps},
            "max_image_pixels": 4_000_000, "resources": {"workers": 1, "batch_size": 4}}


@pytest.fixture(scope="module")
def odd_archive(trained_model):
    root, _ = trained_model
    big = Image.new("L", (2100, 2000), 128)  # 4.2 M pixels: over this spec's limit
    parts = [
        [("ok/gray.png", encode(texture(100)), "test", 0),
         ("ok/rgb.png", encode(texture(101).convert("RGB")), "test", 0),
         ("ok/rgba.png", png("RGBA", (80, 80)), "test", 0),
         ("ok/16bit.png", png("I;16", (80, 80)), "test", None),
         ("ok/defect.png", encode(texture(102, defect=True)), "test", 1)],
        [("bad/corrupt.png", corrupt_png(), "test", 1),
         ("bad/truncated.png", truncated_png(), "test", 0),
         ("bad/empty.png", b"", "test", 0),
         ("bad/oversized.png", encode(big), "test", 0),
         ("ok/large.jpg", encode(texture(103, size=(1200, 900)).convert("RGB"), "JPEG"), "test", 0),
         ("ok/small.jpg", jpeg((30, 20)), "test", 0)],
    ]
    return publish_images(Location.parse(root).join("datasets", "archive", "1"), parts)


def test_every_input_row_gets_a_score_row_errors_only_on_bad_ones(trained_model, odd_archive):
    root, model = trained_model
    result = run_job(parse_spec(score_spec(root, odd_archive.uri, model)), echo=quiet).results["score-it"]
    table = datasets.read_table(Location.parse(result.output))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert table.num_rows == 11 and len(rows) == 11
    bad = {i for i, r in rows.items() if r["error"]}
    assert bad == {"bad/corrupt.png", "bad/truncated.png", "bad/empty.png", "bad/oversized.png"}
    assert "too large" in rows["bad/oversized.png"]["error"]
    assert rows["bad/empty.png"]["error"] == "empty file"
    for image_id, row in rows.items():
        if image_id in bad:
            assert row["score"] is None and row["label_pred"] is None
        else:
            assert np.isfinite(row["score"]) and row["anomaly_map"][:4] == b"\x89PNG"
            assert row["label_pred"] == (row["score"] >= row["threshold"])
    assert rows["ok/16bit.png"]["label"] is None and rows["ok/defect.png"]["label"] == 1
    assert rows["ok/defect.png"]["score"] > max(rows[i]["score"] for i in ("ok/gray.png", "ok/rgb.png"))
    assert result.rejected == 4 and result.details["errors"] == 4
    manifest = datasets.read_manifest(Location.parse(result.output))
    assert manifest.table == "scores" and manifest.extra["errors"] == 4


def test_rerun_is_byte_identical_and_resume_reuses_finished_parts(trained_model, odd_archive):
    root, model = trained_model
    spec = parse_spec(score_spec(root, odd_archive.uri, model))
    first = run_job(spec, run_id="score-a", echo=quiet).results["score-it"]
    second = run_job(spec, run_id="score-b", echo=quiet).results["score-it"]
    columns = ["image_id", "score", "anomaly_map", "anomaly_map_min", "anomaly_map_max", "error", "label_pred"]
    table_a = datasets.read_table(Location.parse(first.output), columns=columns)
    table_b = datasets.read_table(Location.parse(second.output), columns=columns)
    assert table_a.equals(table_b)
    assert table_a["score"].to_numpy(zero_copy_only=False).tobytes() == \
        table_b["score"].to_numpy(zero_copy_only=False).tobytes()

    # As if the run died after its first part: no manifest, part 1 missing. Resume the run.
    folder = Location.parse(first.output)
    folder.join(datasets.MANIFEST_NAME).delete()
    folder.join(datasets.part_name(1)).delete()
    resumed = run_job(spec, run_id="score-a", echo=quiet).results["score-it"]
    assert resumed.details["reused_parts"] == 1
    table_resumed = datasets.read_table(folder, columns=columns)
    assert table_resumed.equals(table_a)


def test_scoring_a_missing_model_or_a_non_image_dataset_is_an_input_error(trained_model, odd_archive):
    root, model = trained_model
    with pytest.raises(InputError, match="config.json is missing"):
        run_job(parse_spec(score_spec(root, odd_archive.uri, f"{root}/models/nope/1")), echo=quiet)


def test_a_scorer_pool_holding_every_cpu_is_refused_not_left_hanging(trained_model, odd_archive):
    # The session's Ray has 2 CPUs: 2 scorer actors x 1 CPU would leave nothing for the decode tasks.
    root, model = trained_model
    spec = score_spec(root, odd_archive.uri, model)
    spec["resources"] = {"workers": 2, "cpus_per_worker": 1, "batch_size": 4}
    with pytest.raises(InputError, match=r"resources: 2 scorer worker\(s\) x 1 CPU .* 2 CPUs"):
        run_job(parse_spec(spec), echo=quiet)


def test_decode_tasks_do_not_import_torch():
    """Decode workers import `pipelines.stages.image_batches` by name; pulling torch (and every
    stage) in with it cost about 800 MB of RSS per worker and seconds of start-up."""
    code = "import sys, pipelines.stages.image_batches; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_threshold_f1_max_on_labelled_validation_images(trained_model):
    root, _ = trained_model
    validation = [(f"val/n{i}.png", encode(texture(200 + i)), "test", 0) for i in range(6)] + \
                 [(f"val/a{i}.png", encode(texture(300 + i, defect=True)), "test", 1) for i in range(6)]
    folder = publish_images(Location.parse(root).join("datasets", "val", "1"), [validation])
    spec = parse_spec({"kind": "train", "name": "fit-f1", "storage": {"root": root}, "method": "padim",
                       "inputs": {"dataset": f"{root}/datasets/tex/1"}, "outputs": {"model": "padim-f1"},
                       "padim": PADIM, "threshold": {"method": "f1_max", "holdout_fraction": 0.25,
                                                     "validation": {"dataset": folder.uri}},
                       "resources": {"workers": 1, "batch_size": 8}})
    model_folder = Location.parse(run_job(spec, echo=quiet).results["fit-f1"].output)
    config = model_folder.join("config.json").read_json()
    calibration = config["info"]["calibration"]["tex"]
    assert calibration["method"] == "f1_max" and calibration["anomalous_images"] == 6
    assert calibration["f1"] == 1.0  # the white squares are trivially separable
    from pipelines.models.artifacts import TrainedModels

    detector = TrainedModels.load(model_folder)
    assert detector.thresholds["tex"] == calibration["threshold"]


def test_a_manifest_named_like_a_path_cannot_place_scores_outside_the_root(trained_model, tmp_path):
    """The scores folder is named after the archive's manifest, which comes from storage."""
    root, model = trained_model
    folder = Location.parse(str(tmp_path)).join("archive", "1")
    records = [datasets.write_part(folder, 0, image_rows([("a.png", encode(texture(7)), "test", 0)]))]
    datasets.publish(folder, name="../../escaped", version="1", table="images", schema=IMAGES_SCHEMA,
                     parts=records, lineage={})
    before = {p for p in Location.parse(root).list_files()}
    with pytest.raises(InputError, match=r"names it '../../escaped'.*set outputs.archive"):
        run_job(parse_spec(score_spec(root, folder.uri, model)), echo=quiet)
    written = {p for p in Location.parse(root).list_files()} - before
    assert all("/runs/" in p.uri for p in written), written  # only the failed run's own record
    assert not (tmp_path.parent / "escaped").exists() and not list(tmp_path.parent.parent.glob("escaped"))


def test_bf16_is_refused_for_a_detector_that_scores_in_float32_only(trained_model, odd_archive):
    root, model = trained_model
    spec = score_spec(root, odd_archive.uri, model)
    spec["precision"] = "bf16"
    with pytest.raises(SpecError, match=r"^precision: bf16 autocast is for GPU workers"):
        parse_spec(spec)
    # With GPU workers asked for, the padim model itself is refused, on the driver, before any actor.
    spec["resources"] = {**spec["resources"], "gpus_per_worker": 1}
    with pytest.raises(InputError, match=r"precision: bf16: .* is a 'padim' model, which scores in float32 only"):
        run_job(parse_spec(spec), echo=quiet)
    with pytest.raises(SpecError, match=r"^precision"):
        parse_spec({**score_spec(root, odd_archive.uri, model), "precision": "half"})


def test_the_scoring_precision_is_bf16_only_for_a_capable_detector_on_gpus():
    from pipelines.models.inference import scoring_precision

    capable, plain = frozenset({"bf16"}), frozenset({"references"})
    assert scoring_precision("auto", capable, gpu=True) == "bf16"
    assert scoring_precision("auto", capable, gpu=False) == "fp32"
    assert scoring_precision("auto", plain, gpu=True) == "fp32"
    assert scoring_precision("fp32", capable, gpu=True) == "fp32"
    assert scoring_precision("bf16", capable, gpu=True) == "bf16"
    with pytest.raises(ValueError, match="float32 only"):
        scoring_precision("bf16", plain, gpu=True)
