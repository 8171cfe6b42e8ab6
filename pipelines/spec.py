"""Job specs: YAML parsed once, at the edge, into frozen dataclasses.

Every field is checked before anything runs: unknown keys (with a "did you mean"), wrong types,
missing fields and values outside their allowed set raise `SpecError` naming the dotted field path
and what is allowed. Stage kinds register their parameter class in `pipelines.stages`; adding a
kind is adding a module there, nothing here changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.errors import SpecError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
NAME_RULE = "1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
# S3 bucket naming rules (the subset that matters for a typo): 3-63 chars, lowercase, digits, '.', '-'.
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
STEP_REFERENCE_PREFIX = "step:"


# --------------------------------------------------------------------------------------------
# Field checks shared by stage parameter classes
# --------------------------------------------------------------------------------------------


def check_name(value: str, field_path: str) -> None:
    if not NAME_PATTERN.match(value):
        raise SpecError(field_path, f"{value!r} is not a valid name: use {NAME_RULE}")


def normalize_uri(value: str, field_path: str, *, schemes: tuple[str, ...] = ("file", "s3")) -> str:
    """Return the canonical form of a storage URI, or raise naming the field.

    Accepts `file:///abs/path`, a plain absolute path (turned into `file://`), and
    `s3://bucket/prefix`. Relative paths are refused: a spec must mean the same thing wherever
    it runs (a Ray cluster has another working directory).
    """
    allowed = " or ".join(f"{s}://..." for s in schemes)
    if value.startswith("/") and "file" in schemes:
        value = "file://" + value
    match = re.match(r"^([a-z0-9]+)://(.*)$", value)
    if not match:
        raise SpecError(field_path, f"{value!r} is not a URI: expected {allowed} (absolute paths only)")
    scheme, rest = match.groups()
    if scheme not in schemes:
        raise SpecError(field_path, f"unsupported URI scheme {scheme!r} in {value!r}: expected {allowed}")
    if scheme == "file":
        if not rest.startswith("/"):
            raise SpecError(field_path, f"{value!r}: file URIs must be absolute, like file:///data/images")
        path = "/" + rest.lstrip("/")
        return "file://" + path.rstrip("/") if path != "/" else "file:///"
    bucket, _, key = rest.partition("/")
    if not BUCKET_PATTERN.match(bucket):
        raise SpecError(
            field_path,
            f"{value!r}: {bucket!r} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')",
        )
    key = key.strip("/")
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def check_positive(value: float, field_path: str, *, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):  # written so that NaN fails too
        bound = ">= 0" if allow_zero else "> 0"
        raise SpecError(field_path, f"must be {bound}, got {value}")


# --------------------------------------------------------------------------------------------
# Parts common to every job
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageSpec:
    """Where outputs and run records live. Credentials never go here: they come from the
    environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the standard AWS files."""

    root: str
    endpoint: str | None = None  # S3 endpoint URL; default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL
    region: str | None = None

    def validate(self, path: str) -> StorageSpec:
        root = normalize_uri(self.root, f"{path}.root")
        if self.endpoint is not None and not re.match(r"^https?://[^/\s]+/?$", self.endpoint):
            raise SpecError(f"{path}.endpoint", f"{self.endpoint!r}: expected http(s)://host:port")
        if "@" in (self.endpoint or ""):
            raise SpecError(f"{path}.endpoint", "credentials are not allowed in a job spec")
        return dataclasses.replace(self, root=root)


@dataclass(frozen=True)
class RaySpec:
    """Which Ray to run on: `local` starts an embedded one; `auto` / `ray://host:10001` join a
    running cluster; `http://head:8265` is a Ray Jobs API address (the spec is submitted there)."""

    address: str = "local"
    num_cpus: int | None = None  # embedded Ray only; default: all cores
    num_gpus: int | None = None  # embedded Ray only

    def validate(self, path: str) -> RaySpec:
        if not (
            self.address in ("local", "auto")
            or re.match(r"^ray://[^/\s]+:\d+$", self.address)
            or re.match(r"^https?://[^/\s]+$", self.address.rstrip("/"))
        ):
            raise SpecError(
                f"{path}.address",
                f"{self.address!r}: expected 'local', 'auto', 'ray://host:port' or 'http://host:8265'",
            )
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None:
                check_positive(value, f"{path}.{name}", allow_zero=name == "num_gpus")
                if self.address != "local":
                    raise SpecError(f"{path}.{name}", "only applies to the embedded Ray (address: local)")
        return self


@dataclass(frozen=True)
class ResourcesSpec:
    """How wide a step runs. `workers` parallel tasks/actors, each with these resources."""

    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 32

    def validate(self, path: str) -> ResourcesSpec:
        check_positive(self.workers, f"{path}.workers")
        check_positive(self.cpus_per_worker, f"{path}.cpus_per_worker")
        check_positive(self.gpus_per_worker, f"{path}.gpus_per_worker", allow_zero=True)
        check_positive(self.batch_size, f"{path}.batch_size")
        return self


@dataclass(frozen=True)
class DatasetOutputSpec:
    """A dataset a step publishes: `datasets/<dataset>/<version>/` under the storage root."""

    dataset: str
    version: str | None = None  # default: the run id, so a rerun of the same run lands in place
    # Only for steps that cut new rows into parts (ingest, sample); steps that transform an input
    # dataset (synthesize) write one output part per input part, and reject this field.
    rows_per_part: int | None = None

    DEFAULT_ROWS_PER_PART = 256

    def validate(self, path: str) -> DatasetOutputSpec:
        check_name(self.dataset, f"{path}.dataset")
        if self.version is not None:
            check_name(self.version, f"{path}.version")
        if self.rows_per_part is not None:
            check_positive(self.rows_per_part, f"{path}.rows_per_part")
        return self

    @property
    def part_rows(self) -> int:
        return self.rows_per_part or self.DEFAULT_ROWS_PER_PART


@dataclass(frozen=True)
class DatasetInputSpec:
    """A dataset a step reads: `step:<name>` (an earlier step's output) or a dataset URI."""

    dataset: str

    def validate(self, path: str) -> DatasetInputSpec:
        if self.dataset.startswith(STEP_REFERENCE_PREFIX):
            check_name(self.dataset[len(STEP_REFERENCE_PREFIX) :], f"{path}.dataset")
            return self
        return DatasetInputSpec(normalize_uri(self.dataset, f"{path}.dataset"))

    @property
    def step_reference(self) -> str | None:
        if self.dataset.startswith(STEP_REFERENCE_PREFIX):
            return self.dataset[len(STEP_REFERENCE_PREFIX) :]
        return None


@dataclass(frozen=True)
class ModelInputSpec:
    """A model a step reads: `step:<name>` (an earlier train step's output) or a model URI."""

    uri: str

    def validate(self, path: str) -> ModelInputSpec:
        if self.uri.startswith(STEP_REFERENCE_PREFIX):
            check_name(self.uri[len(STEP_REFERENCE_PREFIX) :], f"{path}.uri")
            return self
        return ModelInputSpec(normalize_uri(self.uri, f"{path}.uri"))

    @property
    def step_reference(self) -> str | None:
        if self.uri.startswith(STEP_REFERENCE_PREFIX):
            return self.uri[len(STEP_REFERENCE_PREFIX) :]
        return None


@dataclass(frozen=True)
class StepSpec:
    """One stage invocation. A single-kind job is a pipeline of one step named after the job."""

    name: str
    kind: str
    params: Any  # the stage kind's parameter dataclass


@dataclass(frozen=True)
class JobSpec:
    kind: str
    name: str
    storage: StorageSpec
    ray: RaySpec
    steps: tuple[StepSpec, ...]
    schedule: str | None = None
    description: str | None = None

    def step(self, name: str) -> StepSpec:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


COMMON_KEYS = ("kind", "name", "description", "storage", "ray", "schedule")
CRON_PATTERN = re.compile(r"^(\S+\s+){4}\S+$")


# --------------------------------------------------------------------------------------------
# Generic typed conversion
# --------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SpecError(path, f"{_describe(value)} is not allowed; expected one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise SpecError(path, f"must not be null; expected {_type_name(tp)}")
        members = [o for o in options if o is not type(None)]
        if all(dataclasses.is_dataclass(m) for m in members) and len(members) > 1:
            return _convert_tagged(members, value, path)
        errors = []
        for option in members:
            try:
                return _convert(option, value, path)
            except SpecError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else SpecError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SpecError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
        return tuple(_convert(item_type, item, f"{path}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(path, f"expected true/false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        # YAML reads `version: 3` as an int; a number where a string is expected is meant as text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str) or not value:
            raise SpecError(path, f"expected a non-empty string, got {_describe(value)}")
        return value
    raise TypeError(f"spec field type {tp!r} at {path} is not supported by the parser")


def _convert_tagged(members: list[type], value: Any, path: str) -> Any:
    """Choose among dataclasses by their `type` literal (e.g. source: {type: mvtec, ...})."""
    by_tag = {}
    for member in members:
        tag_type = typing.get_type_hints(member)["type"]
        for tag in typing.get_args(tag_type):
            by_tag[tag] = member
    if not isinstance(value, Mapping):
        raise SpecError(path, f"expected a mapping with a 'type' of {', '.join(map(repr, by_tag))}, got {_describe(value)}")
    tag = value.get("type")
    if not isinstance(tag, str) or tag not in by_tag:
        raise SpecError(f"{path}.type", f"{_describe(tag)} is not allowed; expected one of {', '.join(map(repr, by_tag))}")
    return parse_dataclass(by_tag[tag], value, path)


def unknown_key_error(key: Any, allowed: typing.Iterable[str], path: str) -> SpecError:
    allowed = list(allowed)
    guess = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    where = f"{path}.{key}" if path else str(key)
    return SpecError(where, f"unknown key {key!r}{hint} (allowed keys: {', '.join(allowed)})")


def check_keys(data: Mapping[Any, Any], allowed: typing.Iterable[str], path: str) -> None:
    """Refuse keys outside `allowed`, with a "did you mean" (or a word on credentials)."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            if str(key).lower() in ("access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key", "password", "token"):
                raise SpecError(f"{path}.{key}" if path else str(key),
                                "credentials are not allowed in a job spec; set AWS_ACCESS_KEY_ID / "
                                "AWS_SECRET_ACCESS_KEY in the environment or the AWS credentials file")
            raise unknown_key_error(key, allowed, path)


def _param_keys(kind: str) -> list[str]:
    from pipelines.stages.registry import STAGE_KINDS

    return [f.name for f in dataclasses.fields(STAGE_KINDS[kind].params) if f.init]


def parse_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build a frozen dataclass from a mapping, checking keys and types; then its `validate`."""
    if not isinstance(data, Mapping):
        raise SpecError(path, f"expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    check_keys(data, names, path)
    kwargs = {}
    for f in fields:
        sub = f"{path}.{f.name}" if path else f.name
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(sub, f"missing required field ({_type_name(hints[f.name])})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    return validate(path) if validate else obj


# --------------------------------------------------------------------------------------------
# Job spec parsing
# --------------------------------------------------------------------------------------------


def _parse_step(kind: str, name: str, body: Mapping[str, Any], path: str) -> StepSpec:
    from pipelines.stages.registry import STAGE_KINDS

    if kind not in STAGE_KINDS:
        raise SpecError(f"{path}.kind" if path else "kind",
                        f"{kind!r} is not a step kind; expected one of {', '.join(map(repr, STAGE_KINDS))}")
    params = parse_dataclass(STAGE_KINDS[kind].params, body, path)
    return StepSpec(name=name, kind=kind, params=params)


def parse_spec(data: Any) -> JobSpec:
    """Validate a job spec given as plain data (what YAML loads) and return the typed spec."""
    from pipelines.stages.registry import STAGE_KINDS

    if not isinstance(data, Mapping):
        raise SpecError("", f"a job spec must be a mapping at the top level, got {_describe(data)}")
    kinds = ("pipeline", *STAGE_KINDS)
    if "kind" not in data:
        raise SpecError("kind", f"missing required field; expected one of {', '.join(map(repr, kinds))}")
    kind = data["kind"]
    if kind not in kinds:
        raise SpecError("kind", f"{_describe(kind)} is not a job kind; expected one of {', '.join(map(repr, kinds))}")
    # Unknown keys first: a misspelt `storge` is a typo to point at, not a missing `storage`.
    check_keys(data, [*COMMON_KEYS, *(["steps"] if kind == "pipeline" else _param_keys(kind))], "")
    if "name" not in data:
        raise SpecError("name", f"missing required field ({NAME_RULE})")
    name = _convert(str, data["name"], "name")
    check_name(name, "name")
    if "storage" not in data:
        raise SpecError("storage", "missing required field (a mapping with 'root: file:///... or s3://bucket/...')")
    storage = parse_dataclass(StorageSpec, data["storage"], "storage")
    ray = parse_dataclass(RaySpec, data.get("ray", {}), "ray")
    schedule = _convert(str | None, data.get("schedule"), "schedule")
    if schedule is not None and not CRON_PATTERN.match(schedule):
        raise SpecError("schedule", f"{schedule!r} is not a 5-field cron expression like '0 2 * * *'")
    description = _convert(str | None, data.get("description"), "description")
    body = {k: v for k, v in data.items() if k not in COMMON_KEYS}

    if kind == "pipeline":
        steps = _parse_pipeline_steps(body)
    else:
        steps = (_parse_step(kind, name, body, ""),)
    return JobSpec(kind=kind, name=name, storage=storage, ray=ray, steps=steps,
                   schedule=schedule, description=description)


def _parse_pipeline_steps(body: Mapping[str, Any]) -> tuple[StepSpec, ...]:
    from pipelines.stages.registry import STAGE_KINDS

    raw_steps = body.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise SpecError("steps", f"a pipeline needs a non-empty list of steps, got {_describe(raw_steps)}")
    steps: list[StepSpec] = []
    for index, raw in enumerate(raw_steps):
        path = f"steps[{index}]"
        if not isinstance(raw, Mapping):
            raise SpecError(path, f"expected a mapping with 'name' and 'kind', got {_describe(raw)}")
        for key in ("storage", "ray", "schedule"):
            if key in raw:
                raise SpecError(f"{path}.{key}", f"'{key}' is set once for the whole pipeline, at the top level")
        step_kinds = ", ".join(map(repr, STAGE_KINDS))
        if "kind" not in raw:
            check_keys(raw, ["name", "kind", *dict.fromkeys(k for s in STAGE_KINDS for k in _param_keys(s))], path)
            raise SpecError(f"{path}.kind", f"missing required field; expected one of {step_kinds}")
        step_kind = _convert(str, raw["kind"], f"{path}.kind")
        if step_kind in STAGE_KINDS:
            check_keys(raw, ["name", "kind", *_param_keys(step_kind)], path)
        if "name" not in raw:
            raise SpecError(f"{path}.name", f"missing required field ({NAME_RULE})")
        step_name = _convert(str, raw["name"], f"{path}.name")
        check_name(step_name, f"{path}.name")
        if any(s.name == step_name for s in steps):
            raise SpecError(f"{path}.name", f"duplicate step name {step_name!r}")
        body = {k: v for k, v in raw.items() if k not in ("name", "kind")}
        step = _parse_step(step_kind, step_name, body, path)
        _check_references(step, [s.name for s in steps], path)
        steps.append(step)
    return tuple(steps)


def step_references(params: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(field path, step name) for every `step:<name>` reference in a step's parameters, nested too."""
    found = []
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if isinstance(value, (DatasetInputSpec, ModelInputSpec)):
            if value.step_reference:
                inner = "dataset" if isinstance(value, DatasetInputSpec) else "uri"
                found.append((f"{prefix}{f.name}.{inner}", value.step_reference))
        elif dataclasses.is_dataclass(value):
            found += step_references(value, f"{prefix}{f.name}.")
    return found


def _check_references(step: StepSpec, earlier: list[str], path: str) -> None:
    for field_path, target in step_references(step.params):
        if target not in earlier:
            known = ", ".join(map(repr, earlier)) or "none"
            raise SpecError(f"{path}.{field_path}",
                            f"'step:{target}' does not name an earlier step (earlier steps: {known})")


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("", f"spec file not found: {path}") from None
    except OSError as error:
        raise SpecError("", f"cannot read spec file {path}: {error.strerror}") from None
    return load_spec_text(text, source=str(path))


def load_spec_text(text: str, source: str = "<spec>") -> JobSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError("", f"{source} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    return parse_spec(data)


def spec_to_data(value: Any) -> Any:
    """Plain data (YAML/JSON-ready) for a parsed spec or any part of it; inverse of `parse_spec`."""
    if isinstance(value, JobSpec):
        out: dict[str, Any] = {"kind": value.kind, "name": value.name}
        if value.description:
            out["description"] = value.description
        out["storage"] = spec_to_data(value.storage)
        out["ray"] = spec_to_data(value.ray)
        if value.schedule:
            out["schedule"] = value.schedule
        if value.kind == "pipeline":
            out["steps"] = [{"name": s.name, "kind": s.kind, **spec_to_data(s.params)} for s in value.steps]
        else:
            out.update(spec_to_data(value.steps[0].params))
        return out
    if dataclasses.is_dataclass(value):
        return {f.name: spec_to_data(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, tuple):
        return [spec_to_data(v) for v in value]
    return value


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec_to_data(spec), sort_keys=False)


__all__ = [
    "DatasetInputSpec", "DatasetOutputSpec", "JobSpec", "ModelInputSpec", "RaySpec", "ResourcesSpec", "StepSpec",
    "StorageSpec", "dump_spec", "load_spec", "load_spec_text", "normalize_uri",
    "parse_dataclass", "parse_spec", "spec_to_data", "step_references",
]
