"""Job spec validation: good specs parse and round-trip; bad ones name the field and what is allowed.

Pure Python: no Ray is started, nothing touches the network.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import cli
from pipelines.errors import SpecError
from pipelines.spec import (
    DatasetInputSpec,
    DatasetOutputSpec,
    JobSpec,
    RaySpec,
    ResourcesSpec,
    StorageSpec,
    dump_spec,
    load_spec,
    load_spec_text,
    normalize_uri,
    parse_spec,
    spec_to_data,
)
from pipelines.stages.describe import DescribeParams
from pipelines.stages.ingest import ELPVSource, FolderSource, IngestParams, MVTecSource

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "jobs" / "demo.yaml"


# ---- spec builders: each test changes one thing in an otherwise valid spec ---------------------

def ingest_job(**changes: Any) -> dict[str, Any]:
    """A valid single-kind ingest job."""
    job = {
        "kind": "ingest",
        "name": "ingest-mvtec",
        "storage": {"root": "s3://adpipe"},
        "source": {"type": "mvtec", "uri": "s3://datasets/mvtec/", "categories": ["bottle", "cable"]},
        "outputs": {"dataset": "mvtec", "rows_per_part": 128},
    }
    job.update(changes)
    return job


def pipeline_job() -> dict[str, Any]:
    """A valid two-step pipeline: the second step reads the first one's output."""
    return {
        "kind": "pipeline",
        "name": "folder-pipeline",
        "storage": {"root": "/data/store"},
        "steps": [
            {"name": "ingest", "kind": "ingest",
             "source": {"type": "folder", "uri": "/data/images", "category": "screw", "split": "train"},
             "outputs": {"dataset": "screws"}},
            {"name": "describe", "kind": "describe", "inputs": {"dataset": "step:ingest"}},
        ],
    }


def with_changes(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy of `base` with the value at dotted `path` (e.g. `steps.0.outputs`) set; `...` deletes it."""
    data = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        last = int(last)
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


def renamed(base: dict[str, Any], key: str, new_key: str) -> dict[str, Any]:
    """Copy of `base` with top-level `key` spelt `new_key`."""
    return {(new_key if k == key else k): copy.deepcopy(v) for k, v in base.items()}


def spec_error(spec: str | dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as caught:
        if isinstance(spec, str):
            load_spec_text(spec)
        else:
            parse_spec(spec)
    return caught.value


# ---- good specs ------------------------------------------------------------------------------

def test_demo_spec_parses():
    spec = load_spec(DEMO)
    assert spec.kind == "pipeline" and spec.name == "demo"
    assert spec.storage == StorageSpec(root="s3://adpipe-demo")
    assert spec.ray == RaySpec(address="local")
    assert [(s.name, s.kind) for s in spec.steps] == [
        ("ingest-elpv", "ingest"), ("describe-elpv", "describe"), ("ingest-textures", "ingest"),
        ("synthesize-anomalies", "synthesize"), ("fit-padim", "train"), ("score-test", "score"),
        ("evaluate-test", "evaluate")]
    assert spec.step("score-test").params.model.step_reference == "fit-padim"
    assert spec.step("fit-padim").params.threshold.validation.step_reference == "synthesize-anomalies"
    assert spec.step("synthesize-anomalies").params.sources[0].textures.step_reference == "ingest-textures"
    assert spec.step("evaluate-test").params.inputs.step_reference == "score-test"
    ingest = spec.step("ingest-elpv").params
    assert ingest.source == ELPVSource(type="elpv", normal_train_fraction=0.6, split_seed=0)
    assert ingest.outputs == DatasetOutputSpec(dataset="elpv", rows_per_part=256)
    assert ingest.resources == ResourcesSpec(workers=2)
    describe = spec.step("describe-elpv").params
    assert describe == DescribeParams(inputs=DatasetInputSpec("step:ingest-elpv"))
    assert describe.inputs.step_reference == "ingest-elpv"
    with pytest.raises(KeyError):
        spec.step("missing")


def test_single_kind_job_is_one_step_named_after_the_job():
    spec = parse_spec(ingest_job(schedule="0 2 * * *", description="nightly ingest"))
    assert spec.kind == "ingest" and spec.schedule == "0 2 * * *" and spec.description == "nightly ingest"
    assert len(spec.steps) == 1
    (step,) = spec.steps
    assert (step.name, step.kind) == ("ingest-mvtec", "ingest")
    assert isinstance(step.params, IngestParams)
    assert step.params.source == MVTecSource(type="mvtec", uri="s3://datasets/mvtec", categories=("bottle", "cable"))
    assert step.params.outputs == DatasetOutputSpec(dataset="mvtec", rows_per_part=128)
    assert step.params.resources == ResourcesSpec()  # defaults
    assert spec.ray == RaySpec()  # `ray` is optional: embedded Ray


def test_pipeline_with_step_reference():
    spec = parse_spec(pipeline_job())
    assert [s.name for s in spec.steps] == ["ingest", "describe"]
    assert spec.steps[0].params.source == FolderSource(type="folder", uri="file:///data/images",
                                                       category="screw", split="train")
    assert spec.steps[1].params.inputs.step_reference == "ingest"


def test_describe_can_read_a_dataset_uri_instead_of_a_step():
    spec = parse_spec({"kind": "describe", "name": "d", "storage": {"root": "s3://adpipe"},
                       "inputs": {"dataset": "s3://adpipe/datasets/mvtec/v1/"}})
    assert spec.steps[0].params.inputs == DatasetInputSpec("s3://adpipe/datasets/mvtec/v1")
    assert spec.steps[0].params.inputs.step_reference is None


def test_integer_version_is_read_as_a_string():
    spec = load_spec_text(yaml.safe_dump(ingest_job()).replace("rows_per_part: 128", "rows_per_part: 128\n  version: 3"))
    assert spec.steps[0].params.outputs.version == "3"


def test_absolute_path_becomes_file_uri_and_s3_prefix_loses_trailing_slash():
    spec = parse_spec(ingest_job(storage={"root": "/data/x"},
                                 source={"type": "folder", "uri": "s3://bucket/prefix/"}))
    assert spec.storage.root == "file:///data/x"
    assert spec.steps[0].params.source.uri == "s3://bucket/prefix"


@pytest.mark.parametrize(("uri", "expected"), [
    ("/data/x", "file:///data/x"),
    ("/data/x/", "file:///data/x"),
    ("file:///data/x", "file:///data/x"),
    ("file:////data//x/", "file:///data//x"),
    ("/", "file:///"),
    ("s3://bucket", "s3://bucket"),
    ("s3://bucket/", "s3://bucket"),
    ("s3://bucket/prefix/", "s3://bucket/prefix"),
    ("s3://my.bucket-1/a/b", "s3://my.bucket-1/a/b"),
])
def test_normalize_uri(uri, expected):
    assert normalize_uri(uri, "f") == expected


def test_full_storage_ray_and_resources():
    spec = parse_spec(ingest_job(
        storage={"root": "s3://adpipe/team/", "endpoint": "http://127.0.0.1:8333", "region": "us-east-1"},
        ray={"address": "local", "num_cpus": 4, "num_gpus": 0},
        resources={"workers": 4, "cpus_per_worker": 2, "gpus_per_worker": 0.5, "batch_size": 64},
        max_image_pixels=1_000_000,
    ))
    assert spec.storage == StorageSpec(root="s3://adpipe/team", endpoint="http://127.0.0.1:8333", region="us-east-1")
    assert spec.ray == RaySpec(address="local", num_cpus=4, num_gpus=0)
    assert spec.steps[0].params.resources == ResourcesSpec(workers=4, cpus_per_worker=2.0, gpus_per_worker=0.5,
                                                           batch_size=64)
    assert isinstance(spec.steps[0].params.resources.cpus_per_worker, float)


@pytest.mark.parametrize("address", ["local", "auto", "ray://head:10001", "http://head:8265", "https://head:8265/"])
def test_ray_addresses(address):
    assert parse_spec(ingest_job(ray={"address": address})).ray.address == address


GOOD_SPECS = {
    "demo": lambda: load_spec(DEMO),
    "ingest": lambda: parse_spec(ingest_job()),
    "ingest-all-fields": lambda: parse_spec(ingest_job(
        schedule="*/15 * * * 1-5", description="every quarter hour",
        storage={"root": "s3://adpipe", "endpoint": "https://s3.example.com"},
        ray={"address": "ray://head:10001"},
        outputs={"dataset": "mvtec", "version": 3},
        resources={"workers": 3, "gpus_per_worker": 1})),
    "elpv": lambda: parse_spec(ingest_job(source={"type": "elpv", "uri": "/data/elpv/", "categories": ["mono"],
                                                  "normal_train_fraction": 1, "split_seed": 7})),
    "pipeline": lambda: parse_spec(pipeline_job()),
}


@pytest.mark.parametrize("name", GOOD_SPECS)
def test_round_trip(name):
    spec = GOOD_SPECS[name]()
    assert parse_spec(spec_to_data(spec)) == spec
    text = dump_spec(spec)
    assert load_spec_text(text) == spec
    assert dump_spec(load_spec_text(text)) == text


def test_round_trip_data_is_plain_yaml():
    data = spec_to_data(parse_spec(pipeline_job()))
    assert data["steps"][1] == {"name": "describe", "kind": "describe", "inputs": {"dataset": "step:ingest"}}
    assert "version" not in data["steps"][0]["outputs"]  # unset optionals are left out
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_parsed_specs_are_frozen():
    spec = parse_spec(ingest_job())
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


# ---- bad specs -------------------------------------------------------------------------------

PIPELINE = pipeline_job()
INGEST = ingest_job()

BAD_SPECS = [
    # keys
    pytest.param(renamed(INGEST, "storage", "storge"), "storge",
                 "did you mean 'storage'", id="misspelled-top-level-key"),
    pytest.param(with_changes(INGEST, "schedul", "0 2 * * *"), "schedul", "did you mean 'schedule'",
                 id="misspelled-common-key-in-single-kind-job"),
    pytest.param(with_changes(INGEST, "nmae", "x"), "nmae", "did you mean 'name'", id="misspelled-name"),
    pytest.param(with_changes(INGEST, "outputs.rows_per_prt", 10), "outputs.rows_per_prt",
                 "did you mean 'rows_per_part'", id="misspelled-nested-key"),
    pytest.param(with_changes(PIPELINE, "steps.0.outputs.rows_per_prt", 10), "steps[0].outputs.rows_per_prt",
                 "did you mean 'rows_per_part'", id="misspelled-key-in-step"),
    pytest.param(with_changes(PIPELINE, "steps.1.inptus", {"dataset": "step:ingest"}), "steps[1].inptus",
                 "did you mean 'inputs'", id="misspelled-step-key"),
    pytest.param(with_changes(PIPELINE, "stepz", []), "stepz", "did you mean 'steps'", id="misspelled-steps"),
    pytest.param(with_changes(INGEST, "steps", []), "steps", "allowed keys", id="steps-in-single-kind-job"),
    pytest.param(with_changes(PIPELINE, "source", {"type": "elpv"}), "source", "allowed keys: ",
                 id="step-params-at-pipeline-top-level"),
    pytest.param(with_changes(INGEST, "storage.rot", "s3://adpipe"), "storage.rot", "did you mean 'root'",
                 id="misspelled-storage-key"),
    # kind
    pytest.param(with_changes(INGEST, "kind", "ingets"), "kind", "'pipeline', 'ingest', 'describe'",
                 id="unknown-kind"),
    pytest.param(with_changes(INGEST, "kind", ...), "kind", "missing required field", id="missing-kind"),
    pytest.param(with_changes(INGEST, "kind", ["ingest"]), "kind", "expected one of", id="kind-not-a-string"),
    pytest.param(with_changes(PIPELINE, "steps.0.kind", "pipeline"), "steps[0].kind", "'ingest', 'describe'",
                 id="pipeline-as-step-kind"),
    pytest.param(with_changes(PIPELINE, "steps.0.kind", "ingset"), "steps[0].kind", "not a step kind",
                 id="unknown-step-kind"),
    pytest.param(with_changes(PIPELINE, "steps.0.kind", ...), "steps[0].kind", "'ingest', 'describe'",
                 id="step-missing-kind"),
    # required fields
    pytest.param(with_changes(INGEST, "name", ...), "name", "missing required field", id="missing-name"),
    pytest.param(with_changes(INGEST, "storage", ...), "storage", "missing required field", id="missing-storage"),
    pytest.param(with_changes(INGEST, "storage", {}), "storage.root", "missing required field",
                 id="missing-storage-root"),
    pytest.param(with_changes(INGEST, "outputs", ...), "outputs", "missing required field", id="missing-outputs"),
    pytest.param(with_changes(INGEST, "outputs.dataset", ...), "outputs.dataset", "missing required field",
                 id="missing-outputs-dataset"),
    pytest.param(with_changes(PIPELINE, "steps.1.name", ...), "steps[1].name", "missing required field",
                 id="step-missing-name"),
    pytest.param(with_changes(PIPELINE, "steps.1.inputs", ...), "steps[1].inputs", "missing required field",
                 id="describe-missing-inputs"),
    # types
    pytest.param(with_changes(INGEST, "resources", {"workers": "two"}), "resources.workers",
                 "expected an integer, got str 'two'", id="workers-string"),
    pytest.param(with_changes(INGEST, "resources", {"workers": True}), "resources.workers",
                 "expected an integer, got bool True", id="workers-bool"),
    pytest.param(with_changes(INGEST, "resources", {"workers": 2.0}), "resources.workers", "expected an integer",
                 id="workers-float"),
    pytest.param(with_changes(INGEST, "outputs.rows_per_part", 1.5), "outputs.rows_per_part",
                 "expected an integer, got float 1.5", id="rows-per-part-float"),
    pytest.param(with_changes(INGEST, "resources", {"cpus_per_worker": "1"}), "resources.cpus_per_worker",
                 "expected a number", id="cpus-string"),
    pytest.param(with_changes(INGEST, "resources", {"cpus_per_worker": False}), "resources.cpus_per_worker",
                 "expected a number, got bool False", id="cpus-bool"),
    pytest.param(with_changes(INGEST, "source", {"type": "elpv", "split_seed": True}), "source.split_seed",
                 "expected an integer, got bool True", id="seed-bool"),
    pytest.param(with_changes(INGEST, "source", {"type": "elpv", "normal_train_fraction": "half"}),
                 "source.normal_train_fraction", "expected a number", id="fraction-string"),
    pytest.param(with_changes(INGEST, "name", True), "name", "expected a non-empty string, got bool True",
                 id="name-bool"),
    pytest.param(with_changes(INGEST, "name", ""), "name", "non-empty string", id="name-empty"),
    pytest.param(with_changes(INGEST, "storage", "s3://adpipe"), "storage", "expected a mapping, got str",
                 id="storage-not-a-mapping"),
    pytest.param(with_changes(INGEST, "ray", None), "ray", "expected a mapping, got null", id="ray-null"),
    pytest.param(with_changes(INGEST, "outputs", ["mvtec"]), "outputs", "expected a mapping, got a list",
                 id="outputs-list"),
    pytest.param(with_changes(INGEST, "source.categories", "bottle"), "source.categories",
                 "expected a list of a string", id="categories-not-a-list"),
    pytest.param(with_changes(INGEST, "source.categories", [["bottle"]]), "source.categories[0]",
                 "expected a non-empty string, got a list", id="category-not-a-string"),
    pytest.param(with_changes(INGEST, "description", {"a": 1}), "description", "got a mapping",
                 id="description-mapping"),
    # numbers out of range
    pytest.param(with_changes(INGEST, "resources", {"workers": 0}), "resources.workers", "must be > 0, got 0",
                 id="workers-zero"),
    pytest.param(with_changes(INGEST, "resources", {"workers": -2}), "resources.workers", "must be > 0, got -2",
                 id="workers-negative"),
    pytest.param(with_changes(INGEST, "resources", {"gpus_per_worker": -1}), "resources.gpus_per_worker",
                 "must be >= 0", id="gpus-negative"),
    pytest.param(with_changes(INGEST, "resources", {"cpus_per_worker": float("nan")}), "resources.cpus_per_worker",
                 "must be > 0, got nan", id="cpus-nan"),
    pytest.param(with_changes(INGEST, "resources", {"batch_size": 0}), "resources.batch_size", "must be > 0",
                 id="batch-zero"),
    pytest.param(with_changes(INGEST, "outputs.rows_per_part", 0), "outputs.rows_per_part", "must be > 0",
                 id="rows-per-part-zero"),
    pytest.param(with_changes(INGEST, "max_image_pixels", -1), "max_image_pixels", "must be > 0",
                 id="max-pixels-negative"),
    pytest.param(with_changes(PIPELINE, "steps.0.resources", {"workers": 0}), "steps[0].resources.workers",
                 "must be > 0", id="step-workers-zero"),
    # names
    pytest.param(with_changes(INGEST, "name", "Nightly"), "name", "is not a valid name: use 1-63 characters",
                 id="name-uppercase"),
    pytest.param(with_changes(INGEST, "name", "nightly job"), "name", "a-z, 0-9", id="name-space"),
    pytest.param(with_changes(INGEST, "name", "-job"), "name", "starting with a letter or digit",
                 id="name-leading-dash"),
    pytest.param(with_changes(INGEST, "name", "x" * 64), "name", "1-63 characters", id="name-too-long"),
    pytest.param(with_changes(INGEST, "outputs.dataset", "My Data"), "outputs.dataset", "not a valid name",
                 id="dataset-name"),
    pytest.param(with_changes(INGEST, "outputs.version", "v/1"), "outputs.version", "not a valid name",
                 id="version-name"),
    pytest.param(with_changes(PIPELINE, "steps.0.name", "Ingest"), "steps[0].name", "not a valid name",
                 id="step-name-uppercase"),
    # URIs and storage
    pytest.param(with_changes(INGEST, "source.uri", "data/x"), "source.uri",
                 "not a URI: expected file://... or s3://... (absolute paths only)", id="relative-path"),
    pytest.param(with_changes(INGEST, "storage.root", "http://example.com/bucket"), "storage.root",
                 "unsupported URI scheme 'http'", id="http-storage-root"),
    pytest.param(with_changes(INGEST, "storage.root", "file://data/x"), "storage.root", "must be absolute",
                 id="file-uri-relative"),
    pytest.param(with_changes(INGEST, "storage.root", "s3://A_B"), "storage.root", "not a valid bucket name",
                 id="bad-bucket"),
    pytest.param(with_changes(INGEST, "storage.root", "s3://ab/x"), "storage.root", "3-63 of a-z",
                 id="short-bucket"),
    pytest.param(with_changes(INGEST, "storage.root", "s3://"), "storage.root", "not a valid bucket name",
                 id="no-bucket"),
    pytest.param(with_changes(INGEST, "storage.endpoint", "127.0.0.1:8333"), "storage.endpoint",
                 "expected http(s)://host:port", id="endpoint-without-scheme"),
    pytest.param(with_changes(INGEST, "storage.endpoint", "http://key:secret@127.0.0.1:8333"), "storage.endpoint",
                 "credentials are not allowed", id="endpoint-with-credentials"),
    pytest.param(with_changes(INGEST, "storage.secret_key", "hunter2"), "storage.secret_key",
                 "credentials are not allowed in a job spec; set AWS_ACCESS_KEY_ID", id="secret-key"),
    pytest.param(with_changes(INGEST, "storage.access_key", "AKIA"), "storage.access_key",
                 "credentials are not allowed", id="access-key"),
    pytest.param(with_changes(INGEST, "storage.aws_secret_access_key", "x"), "storage.aws_secret_access_key",
                 "credentials are not allowed", id="aws-secret-access-key"),
    pytest.param(with_changes(PIPELINE, "secret_key", "x"), "secret_key", "credentials are not allowed",
                 id="secret-key-top-level"),
    pytest.param(with_changes(PIPELINE, "steps.1.inputs.dataset", "datasets/screws"), "steps[1].inputs.dataset",
                 "not a URI", id="relative-input-dataset"),
    # ray
    pytest.param(with_changes(INGEST, "ray", {"address": "somewhere"}), "ray.address",
                 "expected 'local', 'auto', 'ray://host:port' or 'http://host:8265'", id="ray-address-garbage"),
    pytest.param(with_changes(INGEST, "ray", {"address": "ray://head"}), "ray.address", "ray://host:port",
                 id="ray-address-no-port"),
    pytest.param(with_changes(INGEST, "ray", {"address": "auto", "num_cpus": 4}), "ray.num_cpus",
                 "only applies to the embedded Ray (address: local)", id="num-cpus-remote"),
    pytest.param(with_changes(INGEST, "ray", {"address": "http://head:8265", "num_gpus": 1}), "ray.num_gpus",
                 "only applies to the embedded Ray", id="num-gpus-remote"),
    pytest.param(with_changes(INGEST, "ray", {"num_cpus": 0}), "ray.num_cpus", "must be > 0", id="num-cpus-zero"),
    pytest.param(with_changes(INGEST, "ray", {"adress": "auto"}), "ray.adress", "did you mean 'address'",
                 id="ray-misspelled"),
    # sources
    pytest.param(with_changes(INGEST, "source", {"type": "kaggle"}), "source.type",
                 "expected one of 'mvtec', 'folder', 'elpv'", id="unknown-source-type"),
    pytest.param(with_changes(INGEST, "source", {"uri": "/data/x"}), "source.type",
                 "null is not allowed; expected one of 'mvtec', 'folder', 'elpv'", id="source-without-type"),
    pytest.param(with_changes(INGEST, "source", {"type": ["elpv"]}), "source.type",
                 "expected one of 'mvtec', 'folder', 'elpv'", id="source-type-list"),
    pytest.param(with_changes(INGEST, "source", "/data/x"), "source", "a mapping with a 'type' of 'mvtec'",
                 id="source-not-a-mapping"),
    pytest.param(with_changes(INGEST, "source", {"type": "elpv", "normal_train_fraction": 1.5}),
                 "source.normal_train_fraction", "must be in [0, 1], got 1.5", id="elpv-fraction"),
    pytest.param(with_changes(INGEST, "source", {"type": "elpv", "categories": ["mono", "thin-film"]}),
                 "source.categories[1]", "expected one of 'mono', 'poly'", id="elpv-category"),
    pytest.param(with_changes(INGEST, "source", {"type": "elpv", "category": "mono"}), "source.category",
                 "did you mean 'categories'", id="elpv-category-key"),
    pytest.param(with_changes(INGEST, "source", {"type": "folder", "uri": "/x", "split": "validation"}),
                 "source.split", "'validation' is not allowed; expected one of 'train', 'test'",
                 id="folder-split"),
    pytest.param(with_changes(INGEST, "source", {"type": "mvtec"}), "source.uri", "missing required field",
                 id="mvtec-without-uri"),
    pytest.param(with_changes(INGEST, "source", {"type": "mvtec", "uri": "/x", "split": "train"}), "source.split",
                 "allowed keys: type, uri, categories", id="mvtec-unknown-key"),
    # pipelines
    pytest.param(with_changes(PIPELINE, "steps", []), "steps", "non-empty list of steps", id="empty-steps"),
    pytest.param(with_changes(PIPELINE, "steps", ...), "steps", "non-empty list of steps, got null",
                 id="missing-steps"),
    pytest.param(with_changes(PIPELINE, "steps", {"ingest": {}}), "steps", "got a mapping", id="steps-mapping"),
    pytest.param(with_changes(PIPELINE, "steps.0", "ingest"), "steps[0]", "expected a mapping with 'name' and 'kind'",
                 id="step-not-a-mapping"),
    pytest.param(with_changes(PIPELINE, "steps.1.name", "ingest"), "steps[1].name", "duplicate step name 'ingest'",
                 id="duplicate-step-names"),
    pytest.param({**PIPELINE, "steps": list(reversed(PIPELINE["steps"]))}, "steps[0].inputs.dataset",
                 "'step:ingest' does not name an earlier step (earlier steps: none)", id="reference-to-later-step"),
    pytest.param(with_changes(PIPELINE, "steps.1.inputs.dataset", "step:ingset"), "steps[1].inputs.dataset",
                 "does not name an earlier step (earlier steps: 'ingest')", id="reference-to-unknown-step"),
    pytest.param(with_changes(PIPELINE, "steps.1.inputs.dataset", "step:Ingest"), "steps[1].inputs.dataset",
                 "not a valid name", id="reference-bad-name"),
    pytest.param(with_changes(PIPELINE, "steps.0.storage", {"root": "s3://other"}), "steps[0].storage",
                 "set once for the whole pipeline, at the top level", id="storage-in-step"),
    pytest.param(with_changes(PIPELINE, "steps.0.ray", {"address": "auto"}), "steps[0].ray",
                 "set once for the whole pipeline", id="ray-in-step"),
    pytest.param(with_changes(PIPELINE, "steps.0.schedule", "0 2 * * *"), "steps[0].schedule",
                 "set once for the whole pipeline", id="schedule-in-step"),
    # schedule
    pytest.param(with_changes(INGEST, "schedule", "every night"), "schedule",
                 "not a 5-field cron expression like '0 2 * * *'", id="schedule-words"),
    pytest.param(with_changes(INGEST, "schedule", "0 2 * *"), "schedule", "5-field cron", id="schedule-4-fields"),
    pytest.param(with_changes(INGEST, "schedule", "0 0 2 * * *"), "schedule", "5-field cron",
                 id="schedule-6-fields"),
    # the document itself
    pytest.param("- kind: ingest\n- name: x\n", "", "must be a mapping at the top level, got a list",
                 id="top-level-list"),
    pytest.param("just words\n", "", "must be a mapping at the top level, got str", id="top-level-string"),
    pytest.param("", "", "must be a mapping at the top level, got null", id="empty-document"),
    pytest.param("kind: ingest\nname: [x\nstorage: {}\n", "", "is not valid YAML at line", id="invalid-yaml"),
    pytest.param("kind: ingest\n  name: x\n", "", "is not valid YAML at line 2", id="bad-indentation"),
]


@pytest.mark.parametrize(("spec", "field", "fragment"), BAD_SPECS)
def test_bad_spec(spec, field, fragment):
    error = spec_error(spec)
    assert error.field == field, error
    assert fragment in error.message, error
    assert str(error) == (f"{field}: {error.message}" if field else error.message)


@pytest.mark.parametrize(("spec", "field", "fragment"),
                         [p for p in BAD_SPECS if isinstance(p.values[0], dict)])
def test_bad_spec_as_yaml_text(spec, field, fragment):
    """The same mistakes, written as YAML, give the same error."""
    error = spec_error(yaml.safe_dump(spec))
    assert (error.field, fragment in error.message) == (field, True), error


def test_unknown_key_lists_the_allowed_keys():
    message = spec_error(with_changes(INGEST, "outputs.rows_per_prt", 10)).message
    assert message == ("unknown key 'rows_per_prt'; did you mean 'rows_per_part'? "
                       "(allowed keys: dataset, version, rows_per_part)")


def test_unknown_key_without_a_close_match_has_no_guess():
    message = spec_error(with_changes(INGEST, "zzz", 1)).message
    assert "did you mean" not in message and "allowed keys: kind, name" in message


def test_misspelled_key_is_reported_before_missing_fields():
    """`storge` is a typo to point at, not a missing `storage` (also in a pipeline)."""
    assert spec_error(renamed(PIPELINE, "storage", "storge")).field == "storge"
    assert spec_error(renamed(PIPELINE, "name", "nmae")).field == "nmae"
    step_typo = with_changes(PIPELINE, "steps.0.knid", "ingest")
    del step_typo["steps"][0]["kind"]
    error = spec_error(step_typo)
    assert (error.field, "did you mean 'kind'" in error.message) == ("steps[0].knid", True)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: ingest\nname: ok\nstorage: {root: s3://adpipe\n")
    error = spec_error_from_file(path)
    assert error.field == "" and str(path) in error.message and "line" in error.message


def test_missing_spec_file(tmp_path):
    error = spec_error_from_file(tmp_path / "nope.yaml")
    assert error.message == f"spec file not found: {tmp_path / 'nope.yaml'}"


def test_spec_file_that_is_a_directory(tmp_path):
    assert "cannot read spec file" in spec_error_from_file(tmp_path).message


def spec_error_from_file(path: Path) -> SpecError:
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return caught.value


def test_spec_error_exit_code():
    assert SpecError("x", "y").exit_code == 2


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_validate_demo(capsys):
    assert cli.main(["validate", str(DEMO)]) == 0
    out, err = capsys.readouterr()
    assert "valid pipeline job 'demo'" in out and "ingest-elpv (ingest)" in out and "s3://adpipe-demo" in out
    assert err == ""


def test_cli_validate_misspelled_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(DEMO.read_text().replace("rows_per_part:", "rows_per_prt:"))
    assert cli.main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("adpipe: error: steps[0].outputs.rows_per_prt: unknown key 'rows_per_prt'")
    assert "did you mean 'rows_per_part'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_validate_missing_file(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    assert cli.main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"adpipe: error: spec file not found: {path}"
    assert "Traceback" not in err and out == ""


def test_cli_validate_invalid_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: pipeline\nsteps: [\n")
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML at line" in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_job_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.steps and spec.name
