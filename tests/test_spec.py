"""Job spec validation: good specs parse and round-trip; bad ones name the field and what is allowed.

Pure Python: no Ray is started, nothing touches the network.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import cli
from pipelines import spec as spec_module
from pipelines.errors import SpecError
from pipelines.params.describe import DescribeParams
from pipelines.params.ingest import ELPVSource, FolderSource, IngestParams, MVTecSource
from pipelines.spec import dump_spec, load_spec, load_spec_text, parse_spec, spec_to_data
from pipelines.spec_fields import (
    DatasetInputSpec,
    DatasetOutputSpec,
    RaySpec,
    ResourcesSpec,
    StorageSpec,
    normalize_uri,
)

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
    spec = parse_spec(ingest_job(description="nightly ingest"))
    assert spec.kind == "ingest" and spec.description == "nightly ingest"
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
    text = yaml.safe_dump(ingest_job()).replace("rows_per_part: 128", "rows_per_part: 128\n  version: 3")
    spec = load_spec_text(text)
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
    ("file:////data/x/", "file:///data/x"),  # extra leading slashes collapse; `//` inside is refused
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
        description="every quarter hour",
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


def shipped(name: str) -> dict[str, Any]:
    """A job spec under jobs/, as plain data."""
    return yaml.safe_load((REPO / "jobs" / f"{name}.yaml").read_text())


DEMO_DATA = shipped("demo")  # steps: 0 ingest, 1 describe, 2 ingest, 3 synthesize, 4 train, 5 score, 6 evaluate
PADIM_JOB = shipped("train-padim")
DDPM_JOB = shipped("train-ddpm")
DDPM_SMALL = shipped("train-ddpm-small")  # steps: 0 ingest, 1 train (ddpm), 2 sample
SYNTH_JOB = shipped("synthesize-anomalies")
SCORE_JOB = shipped("score-archive")
NIGHTLY_JOB = shipped("nightly")
EVALUATE_JOB = shipped("evaluate")

BAD_SPECS = [
    # keys
    pytest.param(renamed(INGEST, "storage", "storge"), "storge",
                 "did you mean 'storage'", id="misspelled-top-level-key"),
    pytest.param(with_changes(INGEST, "descripton", "x"), "descripton", "did you mean 'description'",
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
                 "nan is not allowed: numbers in a job spec must be finite", id="cpus-nan"),
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
    # schedule: only a nightly job has one (the platform's CronJob does the timing)
    pytest.param(with_changes(INGEST, "schedule", "0 2 * * *"), "schedule", "only a nightly job has a schedule "
                 "(kind: nightly, see jobs/nightly.yaml)", id="schedule"),
    pytest.param(with_changes(PIPELINE, "schedule", "0 2 * * *"), "schedule", "only a nightly job",
                 id="schedule-pipeline"),
    pytest.param(with_changes(PIPELINE, "steps.0.schedule", "0 2 * * *"), "steps[0].schedule", "only a nightly job",
                 id="schedule-in-step"),
    pytest.param(with_changes(NIGHTLY_JOB, "schedule", "61 2 * * *"), "schedule", "is not a cron expression",
                 id="nightly-bad-cron"),
    pytest.param(with_changes(NIGHTLY_JOB, "retention_days", 0), "retention_days", "must be > 0",
                 id="nightly-retention-zero"),
    pytest.param(with_changes(NIGHTLY_JOB, "table.identifier", "scores"), "table.identifier",
                 "expected namespace.table", id="nightly-identifier"),
    pytest.param(with_changes(NIGHTLY_JOB, "archive.name", "../x"), "archive.name", "not a valid name",
                 id="nightly-archive-name"),
    # numbers: finite, of a sane magnitude, and no negative counts or seeds
    pytest.param(with_changes(INGEST, "resources", {"cpus_per_worker": float("inf")}), "resources.cpus_per_worker",
                 "inf is not allowed: numbers in a job spec must be finite", id="cpus-inf"),
    pytest.param(with_changes(INGEST, "resources", {"gpus_per_worker": float("nan")}), "resources.gpus_per_worker",
                 "nan is not allowed", id="gpus-nan"),
    pytest.param(with_changes(INGEST, "source", {"type": "elpv", "normal_train_fraction": float("-inf")}),
                 "source.normal_train_fraction", "-inf is not allowed", id="fraction-minus-inf"),
    pytest.param(with_changes(EVALUATE_JOB, "fpr_limit", float("inf")), "fpr_limit", "must be finite",
                 id="fpr-limit-inf"),
    pytest.param(with_changes(INGEST, "resources", {"cpus_per_worker": 1e30}), "resources.cpus_per_worker",
                 "1e+30 is out of range: numbers in a job spec are at most 2147483647 in magnitude", id="float-1e30"),
    pytest.param(with_changes(SYNTH_JOB, "sources.0.weight", -1e30), "sources[0].weight", "-1e+30 is out of range",
                 id="float-minus-1e30"),
    pytest.param(with_changes(INGEST, "resources", {"workers": 2**31}), "resources.workers",
                 "2147483648 is out of range", id="int-2-pow-31"),
    pytest.param(with_changes(INGEST, "resources", {"batch_size": 2**63}), "resources.batch_size",
                 "is out of range", id="int-2-pow-63"),
    pytest.param(with_changes(INGEST, "max_image_pixels", 2**40), "max_image_pixels", "is out of range",
                 id="max-pixels-huge"),
    pytest.param(with_changes(INGEST, "name", float("inf")), "name", "got inf (quote it if it is meant as text)",
                 id="name-inf"),
    pytest.param(with_changes(INGEST, "source", {"type": "elpv", "split_seed": -1}), "source.split_seed",
                 "must be >= 0, got -1", id="elpv-seed-negative"),
    pytest.param(with_changes(PADIM_JOB, "padim.seed", -1), "padim.seed", "must be >= 0", id="padim-seed-negative"),
    pytest.param(with_changes(SYNTH_JOB, "seed", -1), "seed", "must be >= 0", id="synthesize-seed-negative"),
    pytest.param(with_changes(DDPM_SMALL, "steps.2.seed", -1), "steps[2].seed", "must be >= 0",
                 id="sample-seed-negative"),
    pytest.param(with_changes(EVALUATE_JOB, "seed", -1), "seed", "must be >= 0", id="evaluate-seed-negative"),
    pytest.param(with_changes(DDPM_JOB, "ddpm.training.seed", -1), "ddpm.training.seed", "must be >= 0",
                 id="training-seed-negative"),
    pytest.param(with_changes(EVALUATE_JOB, "anomalous_examples", -1), "anomalous_examples", "must be >= 0",
                 id="anomalous-examples-negative"),
    pytest.param(with_changes(EVALUATE_JOB, "normal_examples", -3), "normal_examples", "must be >= 0",
                 id="normal-examples-negative"),
    pytest.param(with_changes(DEMO_DATA, "steps.6.normal_examples", -1), "steps[6].normal_examples", "must be >= 0",
                 id="step-normal-examples-negative"),
    pytest.param(with_changes(SYNTH_JOB, "per_image", -1), "per_image", "must be > 0", id="per-image-negative"),
    pytest.param(with_changes(DDPM_SMALL, "steps.2.count", -16), "steps[2].count", "must be > 0",
                 id="sample-count-negative"),
    pytest.param(with_changes(DDPM_SMALL, "steps.2.outputs.rows_per_part", -1), "steps[2].outputs.rows_per_part",
                 "must be > 0", id="rows-per-part-negative"),
    pytest.param(with_changes(SYNTH_JOB, "sources.0.steps", -20), "sources[0].steps", "must be > 0",
                 id="sdas-steps-negative"),
    pytest.param(with_changes(DDPM_JOB, "ddpm.optim.warmup_steps", -1), "ddpm.optim.warmup_steps", "must be >= 0",
                 id="warmup-negative"),
    pytest.param(with_changes(INGEST, "max_image_pixels", 0), "max_image_pixels", "must be > 0", id="max-pixels-zero"),
    pytest.param(with_changes(SCORE_JOB, "max_image_pixels", 0), "max_image_pixels", "must be > 0",
                 id="score-max-pixels-zero"),
    pytest.param(with_changes(DEMO_DATA, "steps.5.max_image_pixels", -1), "steps[5].max_image_pixels", "must be > 0",
                 id="step-score-max-pixels-negative"),
    pytest.param(with_changes(SYNTH_JOB, "max_image_pixels", 0), "max_image_pixels", "must be > 0",
                 id="synthesize-max-pixels-zero"),
    pytest.param(with_changes(PADIM_JOB, "max_image_pixels", -5), "max_image_pixels", "must be > 0",
                 id="train-max-pixels-negative"),
    # image sizes and PaDiM's channels
    pytest.param(with_changes(SYNTH_JOB, "image_size", 8192), "image_size",
                 "must be between 16 and 4096 pixels, got 8192", id="synthesize-image-size-huge"),
    pytest.param(with_changes(SYNTH_JOB, "image_size", 8), "image_size", "between 16 and 4096", id="synthesize-tiny"),
    pytest.param(with_changes(SYNTH_JOB, "image_size", 16), "perlin.max_scale_exponent",
                 "more than the image size 16", id="perlin-cells-above-image-size"),
    pytest.param(with_changes(PADIM_JOB, "padim.image_size", 4128), "padim.image_size",
                 "must be a multiple of 32 between 32 and 4096 pixels, got 4128", id="padim-image-size-huge"),
    pytest.param(with_changes(PADIM_JOB, "padim.image_size", 100), "padim.image_size", "a multiple of 32",
                 id="padim-image-size-not-multiple"),
    pytest.param(with_changes(PADIM_JOB, "padim.image_size", 0), "padim.image_size", "between 32 and 4096",
                 id="padim-image-size-zero"),
    pytest.param(with_changes(DDPM_JOB, "ddpm.model.image_size", 8192), "ddpm.model.image_size",
                 "between 8 and 4096 pixels", id="ddpm-image-size-huge"),
    pytest.param(with_changes(DDPM_SMALL, "steps.1.ddpm.model.image_size", 4), "steps[1].ddpm.model.image_size",
                 "between 8 and 4096 pixels, got 4", id="ddpm-image-size-tiny"),
    pytest.param(with_changes(PADIM_JOB, "padim.kept_channels", 177), "padim.kept_channels",
                 "must be at most 176, the channels of efficientnet_lite0 stages [1, 2, 3] (24 + 40 + 112), got 177",
                 id="kept-channels-above-lite0"),
    pytest.param(with_changes(PADIM_JOB, "padim", {"backbone": "efficientnet_lite2", "stages": [1, 2, 3],
                                                   "kept_channels": 193}),
                 "padim.kept_channels", "must be at most 192", id="kept-channels-above-lite2"),
    pytest.param(with_changes(PADIM_JOB, "padim", {"stages": [4], "kept_channels": 321}), "padim.kept_channels",
                 "must be at most 320", id="kept-channels-above-stage-4"),
    pytest.param(with_changes(PADIM_JOB, "padim.backbone", "resnet18"), "padim.backbone",
                 "expected one of efficientnet_lite0, efficientnet_lite1, efficientnet_lite2", id="unknown-backbone"),
    pytest.param(with_changes(PADIM_JOB, "padim.stages", [1, 5]), "padim.stages", "increasing indices in 0..4",
                 id="padim-stage-5"),
    pytest.param(with_changes(DDPM_JOB, "padim", {"kept_channels": 0}), "padim",
                 "is the 'padim' method's block, but this step's method is 'ddpm'", id="padim-block-in-a-ddpm-job"),
    # names that become path components, model keys or report sections
    pytest.param(with_changes(INGEST, "source.categories", ["bottle", "../etc"]), "source.categories[1]",
                 "'../etc' is not a valid name", id="mvtec-category-path"),
    pytest.param(with_changes(INGEST, "source.categories", []), "source.categories",
                 "is an empty list", id="mvtec-categories-empty"),
    pytest.param(with_changes(INGEST, "source.categories", ["a"] * 1001), "source.categories",
                 "has 1001 items; a list in a job spec has at most 1000", id="list-too-long"),
    pytest.param(with_changes(INGEST, "source", {"type": "folder", "uri": "/x", "category": "Line 7"}),
                 "source.category", "not a valid name", id="folder-category"),
    pytest.param(with_changes(INGEST, "source", {"type": "elpv", "categories": []}), "source.categories",
                 "is an empty list", id="elpv-categories-empty"),
    pytest.param(with_changes(INGEST, "source", {"type": "skimage", "images": []}), "source.images",
                 "is an empty list", id="skimage-images-empty"),
    pytest.param(with_changes(PADIM_JOB, "categories", ["a/b"]), "categories[0]", "not a valid name",
                 id="train-category"),
    pytest.param(with_changes(DDPM_SMALL, "steps.2.categories", ["Mono"]), "steps[2].categories[0]",
                 "not a valid name", id="sample-category"),
    pytest.param(with_changes(SYNTH_JOB, "categories", [".."]), "categories[0]", "not a valid name",
                 id="synthesize-category"),
    pytest.param(with_changes(SYNTH_JOB, "foreground.categories", ["bottle", "x/y"]), "foreground.categories[1]",
                 "not a valid name", id="foreground-category"),
    pytest.param(with_changes(SCORE_JOB, "outputs.archive", "../line-7"), "outputs.archive", "not a valid name",
                 id="archive-name"),
    pytest.param(with_changes(PADIM_JOB, "outputs.model", "models/x"), "outputs.model", "not a valid name",
                 id="model-name"),
    pytest.param(with_changes(PIPELINE, "steps.1.name", ".."), "steps[1].name", "not a valid name",
                 id="step-name-dots"),
    # unsafe paths (normalize_uri: see test_normalize_uri_refuses_unsafe_paths for every form)
    pytest.param(with_changes(INGEST, "storage.root", "s3://adpipe/../other"), "storage.root",
                 "has a '..' path segment: '.' and '..' are not allowed in a storage URI", id="root-dot-dot"),
    pytest.param(with_changes(SCORE_JOB, "model.uri", "s3://adpipe/models/%2E%2e/x"), "model.uri",
                 "has a '..' path segment ('%2E%2e' percent-decodes to it)", id="model-uri-encoded-dot-dot"),
    pytest.param(with_changes(PIPELINE, "steps.1.inputs.dataset", "/data/x?version=2"), "steps[1].inputs.dataset",
                 "contains a query string ('?')", id="input-query"),
    pytest.param(with_changes(INGEST, "source.uri", "/data/mvtec\x00/x"), "source.uri",
                 "contains a control character ('\\x00')", id="source-nul"),
    pytest.param(with_changes(INGEST, "storage.root", "/data//store"), "storage.root", "empty path segment ('//')",
                 id="root-empty-segment"),
    # host:port addresses carry nothing else
    pytest.param(with_changes(INGEST, "storage.endpoint", "http://127.0.0.1:8333/path"), "storage.endpoint",
                 "expected http(s)://host:port", id="endpoint-with-path"),
    pytest.param(with_changes(INGEST, "storage.endpoint", "http://127.0.0.1:8333?x=1"), "storage.endpoint",
                 "expected http(s)://host:port", id="endpoint-with-query"),
    pytest.param(with_changes(INGEST, "storage.endpoint", "http://127.0.0.1:99999"), "storage.endpoint",
                 "expected http(s)://host:port", id="endpoint-port-out-of-range"),
    pytest.param(with_changes(INGEST, "ray", {"address": "ray://head:10001/x"}), "ray.address", "ray://host:port",
                 id="ray-address-with-path"),
    pytest.param(with_changes(INGEST, "ray", {"address": "http://head:8265#x"}), "ray.address", "http://host:8265",
                 id="ray-address-with-fragment"),
    # a misspelt `kind` is a typo to point at
    pytest.param(renamed(INGEST, "kind", "knd"), "knd", "unknown key 'knd'; did you mean 'kind'?", id="knd"),
    pytest.param(renamed(PIPELINE, "kind", "kidn"), "kidn", "did you mean 'kind'?", id="kidn"),
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


# ---- what a fuzzer found: numbers, paths, YAML and spec files ---------------------------

@pytest.mark.parametrize(("uri", "fragment"), [
    ("/data/../x", "has a '..' path segment"),
    ("/data/x/..", "has a '..' path segment"),
    ("s3://adpipe/..", "has a '..' path segment"),
    ("s3://adpipe/a/%2e%2e/b", "('%2e%2e' percent-decodes to it)"),
    ("s3://adpipe/a/%2E%2E/b", "('%2E%2E' percent-decodes to it)"),
    ("/data/%2e./x", "has a '..' path segment ('%2e.'"),
    ("file:///data/.%2E/x", "has a '..' path segment ('.%2E'"),
    ("/data/./x", "has a '.' path segment"),
    ("/data/%2e/x", "has a '.' path segment"),
    ("/data/a%2fb", "percent-encodes a '/'"),
    ("/data/a%00b", "percent-encodes"),
    ("/data/a%5cb", "percent-encodes"),
    ("/data/a\x00b", "contains a control character ('\\x00')"),
    ("/data/a\nb", "contains a control character ('\\n')"),
    ("/data/x?versionId=2", "contains a query string ('?')"),
    ("s3://adpipe/x#frag", "contains a fragment ('#')"),
    ("/data\\x", "contains a backslash"),
    ("C:\\data\\x", "contains a backslash"),
    ("/data//x", "has an empty path segment ('//')"),
    ("s3://adpipe//x", "has an empty path segment"),  # the key "/x", another object than "x"
    ("s3://adpipe/a//b/", "has an empty path segment"),
    ("s3://a..b/x", "not a valid bucket name"),
    ("/" + "x" * 5000, "is 5001 characters long; a storage URI has at most 4096"),
])
def test_normalize_uri_refuses_unsafe_paths(uri, fragment):
    with pytest.raises(SpecError) as caught:
        normalize_uri(uri, "f")
    assert caught.value.field == "f" and fragment in caught.value.message, caught.value
    assert len(str(caught.value)) < 300 and str(caught.value).isprintable()


URI_FIELDS = [  # every URI field of the shipped specs, and the few optional ones they leave out
    (PADIM_JOB, "storage.root"), (PADIM_JOB, "inputs.dataset"), (SCORE_JOB, "model.uri"),
    (SCORE_JOB, "inputs.dataset"), (EVALUATE_JOB, "inputs.dataset"), (EVALUATE_JOB, "images"),
    (SYNTH_JOB, "sources.0.model.uri"), (SYNTH_JOB, "sources.1.textures.dataset"),
    (DEMO_DATA, "steps.4.threshold.validation.dataset"), (DEMO_DATA, "steps.0.source.uri"),
    (INGEST, "source.uri"), (ingest_job(source={"type": "folder", "uri": "/x"}), "source.uri"),
]


@pytest.mark.parametrize(("base", "path"), URI_FIELDS, ids=[p for _, p in URI_FIELDS])
def test_every_uri_field_refuses_a_dot_dot_segment(base, path):
    value = {"dataset": "s3://adpipe/x/../y"} if path == "images" else "s3://adpipe/x/../y"
    error = spec_error(with_changes(base, path, value))
    expected = path.replace(".0.", "[0].").replace(".1.", "[1].").replace(".4.", "[4].").replace("steps.0", "steps[0]")
    assert error.field == (expected + ".dataset" if path == "images" else expected), error
    assert "'..' path segment" in error.message


def test_every_number_in_a_spec_is_checked_not_only_the_typed_ones():
    """A float and an int far beyond any field's range, in a field whose own check is only `> 0`."""
    for value in (float("inf"), 1e30, 2**31, 10**20, 10**400):  # float(10**400) raised OverflowError
        assert "resources.cpus_per_worker" == spec_error(ingest_job(resources={"cpus_per_worker": value})).field
    # The same number as YAML text: a 5000-digit literal once raised ValueError from int().
    text = yaml.safe_dump(ingest_job()).replace("rows_per_part: 128", "rows_per_part: " + "9" * 5000)
    error = spec_error(text)
    assert error.field == "" and "a 5000-digit integer is out of range" in error.message and "line 5" in error.message


def test_huge_values_are_cut_short_in_messages():
    for spec in (with_changes(INGEST, "name", "x" * 100_000), with_changes(INGEST, "source.uri", "y" * 100_000),
                 with_changes(INGEST, "z" * 100_000, 1), with_changes(INGEST, "resources", {"workers": 10**400}),
                 with_changes(INGEST, "name", 10**400)):
        error = spec_error(spec)
        assert len(str(error)) < 400 and str(error).isprintable(), str(error)[:500]


def test_a_key_with_a_newline_stays_on_one_line():
    error = spec_error(with_changes(INGEST, "outputs.ver\nsion", "1"))
    assert error.field == "outputs.'ver\\nsion'" and str(error).isprintable()


def test_backbone_channel_table_matches_timm():
    """The channel table PaDiM's validation uses (torch-free) against the real timm models."""
    timm = pytest.importorskip("timm")
    from pipelines.models.backbone_channels import STAGE_CHANNELS
    from pipelines.models.backbones import BACKBONES

    assert set(STAGE_CHANNELS) == set(BACKBONES)
    for name, channels in STAGE_CHANNELS.items():
        model = timm.create_model(BACKBONES[name].timm_name, pretrained=False, features_only=True,
                                  out_indices=(0, 1, 2, 3, 4))
        assert tuple(model.feature_info.channels()) == channels, name


def test_kept_channels_may_be_all_of_them():
    spec = parse_spec(with_changes(PADIM_JOB, "padim.kept_channels", 176))
    assert spec.steps[0].params.method_params.kept_channels == 176


@pytest.fixture(params=["libyaml", "python"])
def yaml_loader(request, monkeypatch):
    """Each YAML check with libyaml's parser (the default) and with PyYAML's own (where libyaml is missing)."""
    if request.param == "libyaml":
        if not yaml.__with_libyaml__:
            pytest.skip("PyYAML without libyaml")
        monkeypatch.setattr(spec_module, "_SpecLoader", spec_module._LibyamlSpecLoader)
    else:
        monkeypatch.setattr(spec_module, "_SpecLoader", spec_module._PythonSpecLoader)
    return request.param


def good_text() -> str:
    return yaml.safe_dump(ingest_job(), sort_keys=False)


@pytest.mark.parametrize(("text", "fragment"), [
    (good_text() + "name: again\n", "line 14, column 1: duplicate key 'name' (first at line 2); give each key once"),
    (good_text().replace("  dataset: mvtec\n", "  dataset: mvtec\n  dataset: other\n"),
     "line 13, column 3: duplicate key 'dataset' (first at line 12)"),
    ("kind: pipeline\nsteps:\n- name: a\n  kind: describe\n  name: b\n", "line 5, column 3: duplicate key 'name'"),
    ("kind: x\n1: a\n1.0: b\n", "duplicate key 1.0"),  # equal keys of one dict, whatever their spelling
    ("[" * 10_000, "nest"),
    ("{a: " * 10_000, "nested more than 64 levels deep"),
    ("- " * 10_000, "nested more than 64 levels deep"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")),
     "more than 10000 values with YAML aliases expanded"),
    ("kind: ingest\nname: " + "9" * 5000 + "\n", "line 2, column 7: a 5000-digit integer is out of range"),
    ("kind: ingest\nseed: !!int abc\n", "line 2, column 7: 'abc' is not an integer"),
    ("kind: ingest\nseed: !!float x\n", "'x' is not a number"),
    ("kind: ingest\nflag: !!bool maybe\n", "'maybe' is not true/false"),
    ("kind: ingest\nname: x\x00\n", "is not valid YAML at line 2: the character U+0000 is not allowed"),
    ("kind: ingest\nname: é\x07\n", "is not valid YAML at line 2: the character U+0007 is not allowed"),
    ("kind: ingest\n---\nkind: ingest\n", "is not valid YAML at line 2"),
])
def test_yaml_that_safe_load_accepts_or_crashes_on(yaml_loader, text, fragment):
    started = time.perf_counter()
    error = spec_error(text)
    assert time.perf_counter() - started < 2
    assert error.field == "" and fragment in error.message, error
    assert str(error).isprintable(), str(error)  # one line on the terminal


def test_merge_keys_may_override_what_they_merge(yaml_loader):
    """`<<: *defaults` then a key of its own is not a duplicate key."""
    spec = load_spec_text(
        "kind: pipeline\nname: p\nstorage: {root: /data/store}\nsteps:\n"
        "  - {name: a, kind: ingest, source: {type: skimage}, outputs: {dataset: a},\n"
        "     resources: &res {workers: 3, batch_size: 8}}\n"
        "  - {name: b, kind: ingest, source: {type: skimage}, outputs: {dataset: b},\n"
        "     resources: {<<: *res, workers: 1}}\n")
    assert [s.params.resources for s in spec.steps] == [ResourcesSpec(workers=3, batch_size=8),
                                                        ResourcesSpec(workers=1, batch_size=8)]


def test_dates_are_text(yaml_loader):
    """`version: 2026-11-21` is a name; `2026-13-45` raised ValueError from datetime."""
    text = yaml.safe_dump(ingest_job(description="x"), sort_keys=False)
    text = text.replace("rows_per_part: 128", "rows_per_part: 128\n  version: 2026-11-21").replace(
        "description: x", "description: 2026-13-45 25:61:61")
    spec = load_spec_text(text)
    assert spec.steps[0].params.outputs.version == "2026-11-21" and spec.description == "2026-13-45 25:61:61"
    assert load_spec_text(text.replace("version: ", "version: !!timestamp ")).steps[0].params.outputs.version \
        == "2026-11-21"


def test_a_spec_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("kind: ingest\ndescription: café\n".encode("latin-1"))
    assert spec_error_from_file(path).message == f"{path} is not UTF-8 text: byte 0xe9 at line 2 cannot be " \
                                                 "decoded (save the file as UTF-8)"


@pytest.mark.timeout(30)  # a FIFO opened for reading waits for a writer: a regression hangs here
def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    assert spec_error_from_file(fifo).message == f"cannot read spec file {fifo}: it is a FIFO, not a regular file"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_is_refused(device):
    assert spec_error_from_file(Path(device)).message == \
        f"cannot read spec file {device}: it is a character device, not a regular file"


def test_a_huge_spec_file_is_refused_without_being_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as file:
        file.truncate(2 << 20)  # sparse: nothing is written, nothing need be read
    assert spec_error_from_file(path).message == \
        f"cannot read spec file {path}: 2097152 bytes is more than a job spec's 1048576 (1 MiB)"


@pytest.mark.parametrize(("path", "fragment"), [("", "no spec file given: the path is empty"),
                                                ("a\x00b.yaml", "cannot read spec file 'a\\x00b.yaml'"),
                                                ("x" * 5000, "cannot read spec file")])
def test_odd_spec_paths(path, fragment):
    message = spec_error_from_file(path).message
    assert fragment in message and message.isprintable(), message


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


@pytest.mark.parametrize("argv", [["run", str(DEMO), "--run-id", ""],
                                  ["submit", str(DEMO), "--address", "http://127.0.0.1:1", "--run-id", ""],
                                  ["run", str(DEMO), "--run-id", "Bad Id"]])
def test_cli_refuses_an_empty_or_bad_run_id_before_anything_runs(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"adpipe: error: run-id: {argv[-1]!r} is not a valid run id (a-z, 0-9, '.', '_', '-'; at most 128)\n"


@pytest.mark.parametrize(("change", "expected"), [
    (lambda text: text.replace("root: s3://adpipe-demo", "root: s3://adpipe-demo/%2e%2e/other"),
     "adpipe: error: storage.root: 's3://adpipe-demo/%2e%2e/other' has a '..' path segment ('%2e%2e' "
     "percent-decodes to it): '.' and '..' are not allowed in a storage URI"),
    (lambda text: text.replace("kind: pipeline", "knd: pipeline"),
     "adpipe: error: knd: unknown key 'knd'; did you mean 'kind'?"),
    (lambda text: text + 'schedule: "0 2 * * *"\n',
     "adpipe: error: schedule: only a nightly job has a schedule (kind: nightly, see jobs/nightly.yaml); run other "
     "jobs from cron or a Kubernetes CronJob\n"),
    (lambda text: text.replace("      split_seed: 0\n", "      split_seed: 0\n      split_seed: 1\n"),
     "adpipe: error: {path} line 23, column 7: duplicate key 'split_seed' (first at line 22); give each key once"),
    (lambda text: text.replace("kept_channels: 100", "kept_channels: 177"),
     "adpipe: error: steps[4].padim.kept_channels: must be at most 176, the channels of efficientnet_lite0"),
    (lambda text: text.replace("cpus_per_worker: 1", "cpus_per_worker: .inf"),
     "adpipe: error: steps[5].resources.cpus_per_worker: inf is not allowed: numbers in a job spec must be finite"),
    (lambda text: text.replace("image_size: 256\n      seed", "image_size: 8192\n      seed"),
     "adpipe: error: steps[4].padim.image_size: must be a multiple of 32 between 32 and 4096 pixels, got 8192"),
])
def test_cli_validate_refuses_with_one_line(tmp_path, capsys, change, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(change(DEMO.read_text()))
    assert cli.main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(expected.format(path=path)), err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_job_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.steps and spec.name
