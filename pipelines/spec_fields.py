"""The building blocks of job specs: field checks, the common field dataclasses and the typed
conversion from plain data, shared by the job level (`pipelines.spec`) and the stage parameter
classes (`pipelines.params`).

Only the standard library and `pipelines.errors` are imported here: a parameter class that builds
on these, and anything that validates a spec, stays free of torch, Ray, pyarrow and YAML.

A parameter dataclass is parsed field by field from its type hints (`parse_dataclass`), then its
`validate(path)` runs. Two hooks let a class take over: a classmethod `from_spec_data(data, path)`
parses (and validates) the mapping itself, e.g. where one field chooses which block the others are
(the train step's `method`), and may call `parse_fields` for the generic walk; an instance method
`to_spec_data()` gives its plain data back for `spec_to_data`. A class with `from_spec_data`
checks its own keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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


# --------------------------------------------------------------------------------------------
# Generic typed conversion
# --------------------------------------------------------------------------------------------


def describe_value(value: Any) -> str:
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


def convert_value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SpecError(path,
                            f"{describe_value(value)} is not allowed; expected one of {', '.join(map(repr, allowed))}")
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
                return convert_value(option, value, path)
            except SpecError as error:
                errors.append(error)
        raise (errors[0] if len(errors) == 1
               else SpecError(path, f"expected {_type_name(tp)}, got {describe_value(value)}"))
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SpecError(path, f"expected {_type_name(tp)}, got {describe_value(value)}")
        if len(value) > MAX_LIST_ITEMS:
            raise SpecError(path, f"has {len(value)} items; a list in a job spec has at most {MAX_LIST_ITEMS}")
        return tuple(convert_value(item_type, item, f"{path}[{i}]") for i, item in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(path, f"expected true/false, got {describe_value(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, f"expected an integer, got {describe_value(value)}")
        _check_number(value, path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, f"expected a number, got {describe_value(value)}")
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
            raise SpecError(path, f"expected a non-empty string, got {describe_value(value)}")
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
        raise SpecError(path, f"expected a mapping with a 'type' of {', '.join(map(repr, by_tag))}, "
                              f"got {describe_value(value)}")
    tag = value.get("type")
    if not isinstance(tag, str) or tag not in by_tag:
        raise SpecError(f"{path}.type",
                        f"{describe_value(tag)} is not allowed; expected one of {', '.join(map(repr, by_tag))}")
    return parse_dataclass(by_tag[tag], value, path)


def key_path(key: Any, path: str) -> str:
    """The dotted field path of a key as the user wrote it, kept to one short printable line."""
    text = str(key) if isinstance(key, str) and key.isprintable() and len(key) <= 60 else short_repr(key)
    return f"{path}.{text}" if path else text


def unknown_key_error(key: Any, allowed: typing.Iterable[str], path: str) -> SpecError:
    allowed = list(allowed)
    guess = difflib.get_close_matches(str(key)[:100], allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return SpecError(key_path(key, path), f"unknown key {short_repr(key)}{hint} (allowed keys: {', '.join(allowed)})")


def check_keys(data: Mapping[Any, Any], allowed: typing.Iterable[str], path: str) -> None:
    """Refuse keys outside `allowed`, with a "did you mean" (or a word on credentials)."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            if str(key).lower() in ("access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key",
                                    "password", "token"):
                raise SpecError(key_path(key, path),
                                "credentials are not allowed in a job spec; set AWS_ACCESS_KEY_ID / "
                                "AWS_SECRET_ACCESS_KEY in the environment or the AWS credentials file")
            raise unknown_key_error(key, allowed, path)


def parse_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build a frozen dataclass from a mapping, checking keys and types; then its `validate`.

    A class with a classmethod `from_spec_data(data, path)` parses the mapping itself: it is given
    the mapping as written and returns the validated object (keys, types and `validate` are its
    business then; `parse_fields` is the generic walk, for one that only adds checks to it)."""
    if not isinstance(data, Mapping):
        raise SpecError(path, f"expected a mapping, got {describe_value(data)}")
    from_spec_data = getattr(cls, "from_spec_data", None)
    if from_spec_data is not None:
        return from_spec_data(data, path)
    return parse_fields(cls, data, path)


def parse_fields(cls: type, data: Any, path: str) -> Any:
    """The generic walk of `parse_dataclass`, whatever hooks the class has: every init field from
    the mapping by its type hint (unknown keys and missing required fields refused), then `validate`."""
    if not isinstance(data, Mapping):
        raise SpecError(path, f"expected a mapping, got {describe_value(data)}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    check_keys(data, names, path)
    kwargs = {}
    for f in fields:
        sub = f"{path}.{f.name}" if path else f.name
        if f.name in data:
            kwargs[f.name] = convert_value(hints[f.name], data[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(sub, f"missing required field ({_type_name(hints[f.name])})")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    return validate(path) if validate else obj


def step_references(params: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(field path, step name) for every `step:<name>` reference in a step's parameters, nested
    in dataclasses and lists too (a synthesize step's sources). A class whose spec key for a field
    differs from the field's name (the train step's method block) says so with `spec_key(name)`."""
    found: list[tuple[str, str]] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, (DatasetInputSpec, ModelInputSpec)):
            if value.step_reference:
                inner = "dataset" if isinstance(value, DatasetInputSpec) else "uri"
                found.append((f"{path}.{inner}", value.step_reference))
        elif isinstance(value, tuple):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            key = getattr(value, "spec_key", lambda name: name)
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{path}.{key(f.name)}" if path else key(f.name))

    walk(params, prefix.rstrip("."))
    return found


def spec_to_data(value: Any) -> Any:
    """Plain data (YAML/JSON-ready) for a parsed part of a spec; inverse of `parse_dataclass`.

    Unset optional fields (None) are left out; a dataclass with `to_spec_data()` gives its own."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_spec_data = getattr(value, "to_spec_data", None)
        if to_spec_data is not None:
            return to_spec_data()
        return {f.name: spec_to_data(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, tuple):
        return [spec_to_data(v) for v in value]
    return value


__all__ = [
    "MAX_IMAGE_SIZE", "MAX_INTEGER", "MAX_LIST_ITEMS", "MAX_URI_LENGTH", "NAME_PATTERN", "NAME_RULE",
    "STEP_REFERENCE_PREFIX", "DatasetInputSpec", "DatasetOutputSpec", "ModelInputSpec", "RaySpec", "ResourcesSpec",
    "StorageSpec", "check_image_size", "check_keys", "check_name", "check_names", "check_positive", "convert_value",
    "describe_value", "key_path", "normalize_uri", "parse_dataclass", "parse_fields", "short_repr", "spec_to_data",
    "step_references", "unknown_key_error",
]
