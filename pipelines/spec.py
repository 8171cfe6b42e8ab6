"""Job specs: YAML parsed once, at the edge, into frozen dataclasses.

Every field is checked before anything runs: unknown keys (with a "did you mean"), wrong types,
missing fields and values outside their allowed set raise `SpecError` naming the dotted field path
and what is allowed. Stage kinds register their parameter class in `pipelines.stages`; adding a
kind is adding a module there, nothing here changes.

Whatever a file holds, reading it ends in a spec or in one `SpecError` line, quickly: the file is
stat()ed before it is opened (a FIFO or a device is never read) and must be small UTF-8; the YAML
loader refuses duplicate keys, deep nesting and alias bombs; every number is finite and bounded;
URIs cannot hold `..`, empty segments, queries, fragments, backslashes or control characters.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import stat
import types
import typing
import urllib.parse
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

# Bounds on what a spec may hold at all; fields check their own, narrower ranges on top.
MAX_INTEGER = 2**31 - 1  # no count, size or seed needs more; far beyond it is a typo or an overflow
MAX_LIST_ITEMS = 1000  # the longest real list is a few dozen categories
MAX_IMAGE_SIZE = 4096  # pixels per side: a 4096^2 RGB float batch is already 200 MB per image
MAX_URI_LENGTH = 4096  # PATH_MAX; S3 keys stop at 1024 bytes
MAX_SPEC_BYTES = 1 << 20  # a job spec is a few KB: a bigger file is a mistake, not a spec
MAX_YAML_DEPTH = 64  # nesting levels; the deepest real field is 5 levels down
MAX_YAML_NODES = 10_000  # values once aliases are expanded; a real spec has a few hundred


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: a message quotes a huge value without becoming one.

    repr also escapes newlines and control characters, so the message stays one printable line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"  # str() would refuse
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 5]}...{text[-2:]}"


# --------------------------------------------------------------------------------------------
# Field checks shared by stage parameter classes
# --------------------------------------------------------------------------------------------


def check_name(value: str, field_path: str) -> None:
    if not NAME_PATTERN.match(value):
        raise SpecError(field_path, f"{short_repr(value)} is not a valid name: use {NAME_RULE}")


def check_names(values: tuple[str, ...] | None, field_path: str) -> None:
    """A list of names that become path components or model keys (categories): each a valid name."""
    if values is None:
        return
    if not values:
        raise SpecError(field_path, "is an empty list: name at least one, or leave the key out for all of them")
    for index, value in enumerate(values):
        check_name(value, f"{field_path}[{index}]")


# Characters a storage URI must not hold: a NUL ends the path for C libraries, `\` is a separator
# to Windows and some S3 gateways, and `?` / `#` would start a query or fragment for an HTTP client
# (the S3 one among them) while pyarrow takes them as part of a file name.
_URI_FORBIDDEN = {"?": "a query string ('?')", "#": "a fragment ('#')", "\\": "a backslash"}


def _check_uri_path(path: str, value: str, field_path: str) -> None:
    """Refuse path segments that are empty (`a//b`) or, also once percent-decoded, `.` or `..`:
    pyarrow, S3 gateways and HTTP clients disagree on what those mean, and `..` can leave the tree."""
    for segment in path.split("/") if path else ():
        if not segment:
            raise SpecError(field_path, f"{short_repr(value)} has an empty path segment ('//'): write each '/' once")
        decoded = urllib.parse.unquote(segment)
        if decoded in (".", ".."):
            how = f" ({segment!r} percent-decodes to it)" if decoded != segment else ""
            raise SpecError(field_path, f"{short_repr(value)} has a {decoded!r} path segment{how}: "
                                        "'.' and '..' are not allowed in a storage URI")
        if decoded != segment and re.search(r"[/\\?#\x00-\x1f\x7f]", decoded):
            raise SpecError(field_path, f"{short_repr(value)}: {segment!r} percent-encodes a '/', '\\', '?', '#' "
                                        "or control character, which is not allowed in a storage URI")


def normalize_uri(value: str, field_path: str, *, schemes: tuple[str, ...] = ("file", "s3")) -> str:
    """Return the canonical form of a storage URI, or raise naming the field.

    Accepts `file:///abs/path`, a plain absolute path (turned into `file://`), and
    `s3://bucket/prefix`. Relative paths are refused: a spec must mean the same thing wherever
    it runs (a Ray cluster has another working directory). So are paths that could mean another
    place than they seem to: `..` / `.` segments (also percent-encoded), empty segments, control
    characters, backslashes, query strings and fragments.
    """
    allowed = " or ".join(f"{s}://..." for s in schemes)
    if len(value) > MAX_URI_LENGTH:
        raise SpecError(field_path, f"{short_repr(value)} is {len(value)} characters long; "
                                    f"a storage URI has at most {MAX_URI_LENGTH}")
    bad = re.search(r"[?#\\\x00-\x1f\x7f]", value)
    if bad:
        what = _URI_FORBIDDEN.get(bad.group(), f"a control character ({bad.group()!r})")
        raise SpecError(field_path, f"{short_repr(value)} contains {what}, which is not allowed in a storage URI")
    if value.startswith("/") and "file" in schemes:
        value = "file://" + value
    match = re.match(r"^([a-z0-9]+)://(.*)$", value)
    if not match:
        raise SpecError(field_path, f"{short_repr(value)} is not a URI: expected {allowed} (absolute paths only)")
    scheme, rest = match.groups()
    if scheme not in schemes:
        raise SpecError(field_path, f"unsupported URI scheme {scheme!r} in {short_repr(value)}: expected {allowed}")
    if scheme == "file":
        if not rest.startswith("/"):
            raise SpecError(field_path, f"{short_repr(value)}: file URIs must be absolute, like file:///data/images")
        path = "/" + rest.lstrip("/")
        _check_uri_path(path.strip("/"), value, field_path)
        return "file://" + path.rstrip("/") if path != "/" else "file:///"
    bucket, _, key = rest.partition("/")
    if not BUCKET_PATTERN.match(bucket) or ".." in bucket:
        raise SpecError(
            field_path,
            f"{short_repr(value)}: {short_repr(bucket)} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')",
        )
    key = key.rstrip("/")  # not lstrip: `s3://b//x` names the key "/x", another object than "x"
    _check_uri_path(key, value, field_path)
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def check_positive(value: float, field_path: str, *, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):  # written so that NaN fails too
        bound = ">= 0" if allow_zero else "> 0"
        raise SpecError(field_path, f"must be {bound}, got {value}")


def check_image_size(value: int, field_path: str, *, minimum: int, multiple: int = 1) -> None:
    """An image side in pixels: at least what the model needs, at most MAX_IMAGE_SIZE."""
    if not minimum <= value <= MAX_IMAGE_SIZE or value % multiple:
        rule = f"a multiple of {multiple} " if multiple > 1 else ""
        raise SpecError(field_path, f"must be {rule}between {minimum} and {MAX_IMAGE_SIZE} pixels, got {value}")


# 5-field cron, as the nightly wrapper's crontab and a Kubernetes CronJob read it: (field, lowest,
# highest, names). Day of week 7 is Sunday again, as in Vixie cron.
_CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_CRON_ITEM = re.compile(r"^(?:(\*)|([0-9]{1,9}|[a-z]+)(?:-([0-9]{1,9}|[a-z]+))?)(?:/([0-9]{1,9}))?$")
CRON_RULE = "'*', a value, a range a-b, a list a,b and steps */n or a-b/n"


def check_cron(expression: str, field_path: str) -> None:
    """A 5-field cron expression, every field checked against its range (no dependency needed)."""
    fields = expression.split()
    if len(fields) != 5:
        raise SpecError(field_path, f"{short_repr(expression)} is not a 5-field cron expression like '0 2 * * *' "
                                    "(minute hour day-of-month month day-of-week)")
    for text, rule in zip(fields, _CRON_FIELDS):
        name, low, high, _ = rule
        for item in text.lower().split(","):
            match = _CRON_ITEM.match(item)
            if not match:
                raise SpecError(field_path, f"{short_repr(expression)}: {short_repr(item)} is not a valid {name} "
                                            f"field (use {CRON_RULE})")
            star, start, end, step = match.groups()
            if not star:
                first = _cron_value(start, rule, expression, field_path)
                if end is not None and _cron_value(end, rule, expression, field_path) < first:
                    raise SpecError(field_path, f"{short_repr(expression)}: the {name} range {start}-{end} runs "
                                                "backwards")
            if step is not None and not 1 <= int(step) <= high - low + 1:
                raise SpecError(field_path, f"{short_repr(expression)}: {name} step {int(step)} must be between 1 "
                                            f"and {high - low + 1}")


def _cron_value(token: str, rule: tuple, expression: str, field_path: str) -> int:
    name, low, high, names = rule
    if token.isdigit():
        number = int(token)
    elif token in names:
        number = names.index(token) + low
    else:
        allowed = f"a number or {names[0]}-{names[-1]}" if names else "a number"
        raise SpecError(field_path, f"{short_repr(expression)}: {short_repr(token)} is not a {name} ({allowed})")
    if not low <= number <= high:
        raise SpecError(field_path, f"{short_repr(expression)}: {name} {number} is out of range {low}-{high}")
    return number


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
        if "@" in (self.endpoint or ""):
            raise SpecError(f"{path}.endpoint", "credentials are not allowed in a job spec")
        if self.endpoint is not None and not _is_host_url(self.endpoint.rstrip("/")):
            raise SpecError(f"{path}.endpoint", f"{short_repr(self.endpoint)}: expected http(s)://host:port")
        return dataclasses.replace(self, root=root)


# host[:port]: a DNS name or IPv4 address (`_` for container names), or an [IPv6] address. Nothing
# else: no path, query, fragment, credentials or whitespace can ride along to the HTTP client.
_HOST_PORT = r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]{2,45}\])(?::(\d{1,5}))?"


def _is_host_url(value: str, scheme: str = "https?", port_required: bool = False) -> bool:
    match = re.fullmatch(f"{scheme}://{_HOST_PORT}", value)
    if not match:
        return False
    port = match.group(1)
    return (port is not None or not port_required) and (port is None or 1 <= int(port) <= 65535)


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
            or _is_host_url(self.address, scheme="ray", port_required=True)
            or _is_host_url(self.address.rstrip("/"))
        ):
            raise SpecError(
                f"{path}.address",
                f"{short_repr(self.address)}: expected 'local', 'auto', 'ray://host:port' or 'http://host:8265'",
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
    return f"{type(value).__name__} {short_repr(value)}"


def _check_number(value: int | float, path: str) -> None:
    """Every number in a spec is finite and of a sane magnitude, whatever the field: `.inf`, `.nan`
    and `1e30` pass a `> 0` check, and then overflow a float() or an int() far from the spec."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(path, f"{value} is not allowed: numbers in a job spec must be finite")
    if abs(value) > MAX_INTEGER:
        raise SpecError(path, f"{short_repr(value)} is out of range: numbers in a job spec are at most "
                              f"{MAX_INTEGER} in magnitude")


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
        if len(value) > MAX_LIST_ITEMS:
            raise SpecError(path, f"has {len(value)} items; a list in a job spec has at most {MAX_LIST_ITEMS}")
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
        _check_number(value, path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, f"expected a number, got {_describe(value)}")
        _check_number(value, path)
        return float(value)
    if tp is str:
        # YAML reads `version: 3` as an int; a number where a string is expected is meant as text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise SpecError(path, f"expected a non-empty string, got {value} (quote it if it is meant as text)")
            if isinstance(value, int) and value.bit_length() > 128:
                raise SpecError(path, f"expected a non-empty string, got {short_repr(value)}")
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


def _key_path(key: Any, path: str) -> str:
    """The dotted field path of a key as the user wrote it, kept to one short printable line."""
    text = str(key) if isinstance(key, str) and key.isprintable() and len(key) <= 60 else short_repr(key)
    return f"{path}.{text}" if path else text


def unknown_key_error(key: Any, allowed: typing.Iterable[str], path: str) -> SpecError:
    allowed = list(allowed)
    guess = difflib.get_close_matches(str(key)[:100], allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return SpecError(_key_path(key, path), f"unknown key {short_repr(key)}{hint} (allowed keys: {', '.join(allowed)})")


def check_keys(data: Mapping[Any, Any], allowed: typing.Iterable[str], path: str) -> None:
    """Refuse keys outside `allowed`, with a "did you mean" (or a word on credentials)."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            if str(key).lower() in ("access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key", "password", "token"):
                raise SpecError(_key_path(key, path),
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
                        f"{short_repr(kind)} is not a step kind; expected one of {', '.join(map(repr, STAGE_KINDS))}")
    params = parse_dataclass(STAGE_KINDS[kind].params, body, path)
    return StepSpec(name=name, kind=kind, params=params)


def parse_spec(data: Any) -> JobSpec:
    """Validate a job spec given as plain data (what YAML loads) and return the typed spec."""
    from pipelines.stages.registry import STAGE_KINDS

    if not isinstance(data, Mapping):
        raise SpecError("", f"a job spec must be a mapping at the top level, got {_describe(data)}")
    kinds = ("pipeline", *STAGE_KINDS)
    if "kind" not in data:
        # `knd: score` is a typo to point at, not a missing `kind` (no other top-level key is close to it).
        for key in data:
            if difflib.get_close_matches(str(key)[:100], ["kind"], n=1, cutoff=0.6):
                raise SpecError(_key_path(key, ""), f"unknown key {short_repr(key)}; did you mean 'kind'?")
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
    if schedule is not None:
        check_cron(schedule, "schedule")
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


# --------------------------------------------------------------------------------------------
# Reading spec files
# --------------------------------------------------------------------------------------------


class _SpecChecks:
    """What `yaml.SafeLoader` lacks, each an error naming the line (mixed into the loaders below):

    - a key given twice in one mapping (`safe_load` silently keeps the last one);
    - nesting deeper than MAX_YAML_DEPTH (the composer recurses per level: 10,000 `[` exhausted
      the stack) and more than MAX_YAML_NODES values with aliases expanded (a "billion laughs" of
      nested aliases is a few lines on disk and exponential for whatever walks the data);
    - a scalar its tag cannot convert: `!!int x`, `!!bool maybe` and an integer of 5,000 digits
      raised ValueError / KeyError out of the constructor, not a YAML error.
    Dates and times stay text: `version: 2026-11-21` is a name, and `2026-13-45` raised ValueError.
    """

    parser: type  # the reader + scanner + parser (C or Python) of the concrete loader

    def __init__(self, text: str, source: str):
        self.parser.__init__(self, text)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self.source = source
        self.depth = 0
        self.nodes = 0
        self.anchor_sizes: dict[str, int] = {}  # values under each anchor, its aliases expanded

    def located_error(self, problem: str, mark: yaml.Mark) -> SpecError:
        return SpecError("", f"{self.source} line {mark.line + 1}, column {mark.column + 1}: {problem}")

    def count_nodes(self, nodes: int, mark: yaml.Mark) -> None:
        self.nodes += nodes
        if self.nodes > MAX_YAML_NODES:
            raise self.located_error(f"more than {MAX_YAML_NODES} values with YAML aliases expanded; "
                             "a job spec has a few hundred", mark)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.count_nodes(self.anchor_sizes.get(event.anchor, 1), event.start_mark)
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise self.located_error(f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        before = self.nodes
        node = super().compose_node(parent, index)
        self.depth -= 1
        self.count_nodes(1, event.start_mark)
        if event.anchor is not None:
            self.anchor_sizes[event.anchor] = self.nodes - before
        return node

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_at: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: explicit keys override merged ones
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_at.get(key)
                except TypeError:  # unhashable: the base class explains that
                    continue
                if earlier is not None:
                    raise self.located_error(f"duplicate key {short_repr(key)} (first at line {earlier.line + 1}); "
                                     "give each key once", key_node.start_mark)
                first_at[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = self.construct_scalar(node)
        if len(text) > 32:
            raise self.located_error(f"a {len(text)}-digit integer is out of range (at most {MAX_INTEGER})",
                                     node.start_mark)
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise self.located_error(f"{short_repr(text)} is not an integer", node.start_mark) from None

    def construct_yaml_float(self, node: yaml.Node) -> float:
        try:
            return super().construct_yaml_float(node)
        except ValueError:
            text = short_repr(self.construct_scalar(node))
            raise self.located_error(f"{text} is not a number", node.start_mark) from None

    def construct_yaml_bool(self, node: yaml.Node) -> bool:
        try:
            return super().construct_yaml_bool(node)
        except KeyError:
            text = short_repr(self.construct_scalar(node))
            raise self.located_error(f"{text} is not true/false", node.start_mark) from None


_SpecChecks.yaml_constructors = {
    **yaml.constructor.SafeConstructor.yaml_constructors,
    "tag:yaml.org,2002:int": _SpecChecks.construct_yaml_int,
    "tag:yaml.org,2002:float": _SpecChecks.construct_yaml_float,
    "tag:yaml.org,2002:bool": _SpecChecks.construct_yaml_bool,
    "tag:yaml.org,2002:timestamp": yaml.constructor.SafeConstructor.construct_scalar,
}
_SpecChecks.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}


class _PythonParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own reader, scanner and parser, for where libyaml is missing."""

    def __init__(self, text: str):
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)

    def fetch_flow_collection_start(self, TokenClass: type) -> None:
        # Every '[' or '{' may start a simple key; the scanner reads ahead through all of them and
        # re-checks each pending key per token, quadratic in the depth (10,000 '[' took 2.5 s), so
        # the depth is bounded here, before the composer sees the first node.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                            self.get_mark())
        super().fetch_flow_collection_start(TokenClass)


class _PythonSpecLoader(_SpecChecks, yaml.composer.Composer, _PythonParser, yaml.constructor.SafeConstructor,
                        yaml.resolver.Resolver):
    parser = _PythonParser


if yaml.__with_libyaml__:
    class _LibyamlSpecLoader(_SpecChecks, yaml.composer.Composer, yaml.cyaml.CParser,
                             yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        parser = yaml.cyaml.CParser


# libyaml scans and parses in C; PyYAML's Python scanner is some 30x slower (one 1 MB line of a
# fuzzed spec took 30 s). Composing and constructing, where the checks are, is Python in both.
_SpecLoader = _LibyamlSpecLoader if yaml.__with_libyaml__ else _PythonSpecLoader

# What YAML 1.1 streams may hold (PyYAML's Reader.NON_PRINTABLE; libyaml checks the same).
_NOT_YAML_CHARACTER = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_spec_file(path: str | Path) -> str:
    """The text of a spec file; refused, without blocking, unless it is a small regular UTF-8 file.

    Reading a FIFO waits for a writer, /dev/zero never ends and /dev/stdin may be a terminal, so
    the path is stat()ed before it is opened (opening a FIFO can block too), and what was opened is
    fstat()ed again in case the path was swapped in between.
    """
    shown = _shown_path(path)
    if not shown:
        raise SpecError("", "no spec file given: the path is empty")

    def not_regular(mode: int) -> SpecError:
        what = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
        return SpecError("", f"cannot read spec file {shown}: it is {what}, not a regular file")

    def too_big(size: int) -> SpecError:
        return SpecError("", f"cannot read spec file {shown}: {size} bytes is more than a job spec's "
                             f"{MAX_SPEC_BYTES} (1 MiB)")

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise SpecError("", f"spec file not found: {shown}") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        raise SpecError("", f"cannot read spec file {shown}: {getattr(error, 'strerror', None) or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise not_regular(info.st_mode)
    if info.st_size > MAX_SPEC_BYTES:
        raise too_big(info.st_size)
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise not_regular(mode)
            raw = file.read(MAX_SPEC_BYTES + 1)
    except OSError as error:
        raise SpecError("", f"cannot read spec file {shown}: {error.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:  # it grew since the stat()
        raise too_big(len(raw))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise SpecError("", f"{shown} is not UTF-8 text: byte 0x{raw[error.start]:02x} at line {line} "
                            "cannot be decoded (save the file as UTF-8)") from None


def _shown_path(path: str | Path) -> str:
    """A path as messages show it: as is, unless a newline or the like would break the line."""
    return str(path) if str(path).isprintable() else short_repr(str(path), limit=200)


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML job spec file."""
    return load_spec_text(read_spec_file(path), source=_shown_path(path))


def load_spec_text(text: str, source: str = "<spec>") -> JobSpec:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError("", f"{source}: {len(text)} characters is more than a job spec's {MAX_SPEC_BYTES} "
                            "bytes (1 MiB)")
    try:
        loader = _SpecLoader(text, source)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as error:  # no mark, and a position in bytes or in characters
        bad = _NOT_YAML_CHARACTER.search(text)
        where = f" at line {text.count(chr(10), 0, bad.start()) + 1}" if bad else ""
        character = ord(bad.group()) if bad else error.character
        raise SpecError("", f"{source} is not valid YAML{where}: the character U+{character:04X} is not allowed "
                            "in YAML (control characters other than tab and newline)") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(error, "problem", None) or error).replace("\n", " ")  # one line on the terminal
        raise SpecError("", f"{source} is not valid YAML{where}: {problem}") from None
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
