"""The `generate` job on real Ray: ELPV cells -> a VQGAN trained with Ray Train -> generated normal
images with provenance, prompts.parquet and a contact sheet; a rerun is byte-identical; CLIP
selection with a checkpoint named in the spec (a tiny random open_clip model, see tiny_clip.py);
a missing CLIP checkpoint or an unknown object word exits 2 naming the problem.
"""

from __future__ import annotations

import re
import uuid

import pyarrow.parquet as pq
import pytest
import yaml
from tiny_clip import TINY_CLIP_NAME, save_tiny_clip

from imagefiles import small_elpv
from pipelines import datasets
from pipelines.cli import main as cli_main
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

pytestmark = pytest.mark.integration

SHOTS, PER_IMAGE = 3, 2


def quiet(*_args, **_kwargs) -> None:
    pass


def generate_step(selection: str = "features", **extra) -> dict:
    return {"name": "generate", "kind": "generate", "inputs": {"dataset": "step:ingest"},
            "model": {"uri": "step:vqgan"},
            "outputs": {"dataset": "cells-generated", "version": "1"},
            "objects": [{"category": "mono", "word": "solar cell"}], "selection": selection,
            "shots": SHOTS, "per_image": PER_IMAGE, "prompts": {"max_words": 6},
            "generator": {"copies": 3, "rounds": 2, "adapt_steps": 2}, "seed": 0,
            "resources": {"workers": 1, "cpus_per_worker": 1}, **extra}


def pipeline(root: str, source: str, generate: dict) -> dict:
    return {"kind": "pipeline", "name": "generate-normals", "storage": {"root": root}, "steps": [
        {"name": "ingest", "kind": "ingest", "source": {"type": "elpv", "uri": source, "normal_train_fraction": 0.6},
         "outputs": {"dataset": "cells", "rows_per_part": 16}},
        {"name": "vqgan", "kind": "train", "method": "vqgan", "inputs": {"dataset": "step:ingest"},
         "outputs": {"model": "vqgan-cells"},
         "vqgan": {"model": {"image_size": 32}, "training": {"steps": 30, "checkpoint_every": 30}},
         "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 4}},
        generate]}


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate")
    root = f"file://{folder}/store"
    source = small_elpv(folder / "elpv", normals=16, defects=2)
    outcome = run_job(parse_spec(pipeline(root, source, generate_step())), run_id="gen-1", echo=quiet)
    return root, source, outcome, folder


def test_generated_normals_read_back_with_provenance(trained):
    root, _, outcome, _ = trained
    folder = Location.parse(outcome.results["generate"].output)
    manifest = datasets.read_manifest(folder, table="images")
    table = datasets.read_table(folder)
    assert manifest.rows == table.num_rows == SHOTS * PER_IMAGE
    rows = table.to_pylist()
    normals = datasets.read_table(Location.parse(outcome.results["ingest"].output)).to_pylist()
    train_normals = {r["image_id"] for r in normals if r["split"] == "train" and r["label"] == 0
                     and r["category"] == "mono"}
    model_version = "vqgan-cells@" + Location.parse(outcome.results["vqgan"].output).name
    for row in rows:
        assert (row["label"], row["split"], row["category"], row["width"]) == (0, "train", "mono", 32)
        synthesis = row["synthesis"]
        assert synthesis["method"] == "text-guided-vqgan" and synthesis["prompt"] == "a photo of a solar cell"
        assert synthesis["source_image_id"] in train_normals
        assert synthesis["model_version"] == model_version and synthesis["seed"] is not None
    assert len({r["synthesis"]["source_image_id"] for r in rows}) == SHOTS
    assert len({r["image"] for r in rows}) == len(rows)  # every generated image differs

    report = Location.parse(root).join("runs", "gen-1", "steps", "generate")
    prompts = pq.read_table(report.join("prompts.parquet").path).to_pylist()
    assert prompts[0]["prompt"] == "a photo of a solar cell" and prompts[0]["selected"]
    assert sum(p["selected"] for p in prompts) == 1
    assert "a photo of a solar cell with photovoltaic cell" in [p["prompt"] for p in prompts]
    assert all(p["cosine"] is None and p["selection"] == "features" for p in prompts)
    assert report.join("contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_is_byte_identical(trained):
    root, source, outcome, _ = trained
    step = generate_step(outputs={"dataset": "cells-generated", "version": "again"})
    spec = {"kind": "generate", "name": "again", "storage": {"root": root},
            **{k: v for k, v in step.items() if k not in ("name", "kind")},
            "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["vqgan"].output}}
    again = run_job(parse_spec(spec), run_id="gen-2", echo=quiet).results["again"]
    columns = ["image_id", "image", "synthesis"]
    first = datasets.read_table(Location.parse(outcome.results["generate"].output), columns=columns)
    assert first.equals(datasets.read_table(Location.parse(again.output), columns=columns))


def test_clip_selection_scores_every_prompt(trained):
    root, _, outcome, folder = trained
    checkpoint, config = save_tiny_clip(folder / "clip")
    step = generate_step("clip", clip={"model": TINY_CLIP_NAME, "checkpoint": checkpoint.as_uri(),
                                       "model_config": config.as_uri()},
                         outputs={"dataset": "cells-generated", "version": "clip"})
    spec = {"kind": "generate", "name": "clip", "storage": {"root": root},
            **{k: v for k, v in step.items() if k not in ("name", "kind")},
            "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["vqgan"].output}}
    result = run_job(parse_spec(spec), run_id="gen-clip", echo=quiet).results["clip"]
    prompts = pq.read_table(Location.parse(root).join("runs", "gen-clip", "steps", "clip", "prompts.parquet")
                            .path).to_pylist()
    assert all(p["cosine"] is not None and p["l2_distance"] is not None for p in prompts)
    chosen = [p for p in prompts if p["selected"]]
    assert len(chosen) == 1 and not chosen[0]["outlier"]
    kept = [p["cosine"] for p in prompts if not p["outlier"]]
    assert chosen[0]["cosine"] == max(kept)
    rows = datasets.read_table(Location.parse(result.output)).to_pylist()
    assert {r["synthesis"]["prompt"] for r in rows} == {chosen[0]["prompt"]}


@pytest.mark.parametrize("change, message", [
    ({"selection": "clip", "clip": {"model": "ViT-B-32", "checkpoint": "MISSING"}},
     "CLIP checkpoint .* does not exist.*selection: features"),
    ({"objects": [{"category": "mono", "word": "qwzxv"}]}, "WordNet has no noun 'qwzxv'"),
    ({"objects": [{"category": "poly", "word": "solar cell"}]}, "0 normal images of category 'poly'"),
    ({"generator": {"copeis": 3}}, r"generator\.copeis.*did you mean 'copies'"),
])
def test_bad_generate_inputs_exit_2_naming_them(trained, tmp_path, capsys, change, message):
    root, _, outcome, folder = trained
    step = {**generate_step(), **change}
    if "clip" in change:
        step["clip"] = {**change["clip"], "checkpoint": (folder / "no-such-clip.safetensors").as_uri()}
    spec = {"kind": "generate", "name": "bad", "storage": {"root": root},
            **{k: v for k, v in step.items() if k not in ("name", "kind")},
            "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["vqgan"].output}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert cli_main(["run", str(path), "--run-id", f"bad-{uuid.uuid4().hex[:8]}"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
