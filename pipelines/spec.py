"""Job specs: YAML parsed once, at the edge, into frozen dataclasses.

Every field is checked before anything runs: unknown keys (with a "did you mean"), wrong types,
missing fields and values outside their allowed set raise `SpecError` naming the dotted field path
and what is allowed. This module is the job level (kind, name, storage, ray, steps, reading the
file); the field checks and the typed conversion are `pipelines.spec_fields`, and each stage kind's
parameter class is in `pipelines.params` (`STAGE_PARAMS`): adding a kind changes nothing here.
None of these import torch or Ray, so `adpipe validate` does not either.

Whatever a file holds, reading it ends in a spec or in one `SpecError` line, quickly: the file is
stat()ed before it is opened (a FIFO or a device is never read) and must be small UTF-8; the YAML
loader refuses duplicate keys, deep nesting and alias bombs; every number is finite and bounded;
URIs cannot hold `..`, empty segments, queries, fragments, backslashes or control characters.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipelines import spec_fields
from pipelines.errors import SpecError
from pipelines.params import STAGE_PARAMS
from pipelines.spec_fields import (
    MAX_INTEGER,
    NAME_RULE,
    RaySpec,
    StorageSpec,
    check_keys,
    check_name,
    convert_value,
    describe_value,
    key_path,
    parse_dataclass,
    short_repr,
    step_references,
)

MAX_SPEC_BYTES = 1 << 20  # a job spec is a few KB: a bigger file is a mistake, not a spec
MAX_YAML_DEPTH = 64  # nesting levels; the deepest real field is 5 levels down
MAX_YAML_NODES = 10_000  # values once aliases are expanded; a real spec has a few hundred


@dataclass(frozen=True)
class StepSpec:
    """One stage invocation. A single-kind job is a pipeline of one step named after the job."""

    name: str
    kind: str
    params: Any  # the stage kind's parameter dataclass (`pipelines.params.STAGE_PARAMS[kind]`)


@dataclass(frozen=True)
class JobSpec:
    kind: str
    name: str
    storage: StorageSpec
    ray: RaySpec
    steps: tuple[StepSpec, ...]
    description: str | None = None

    def step(self, name: str) -> StepSpec:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


COMMON_KEYS = ("kind", "name", "description", "storage", "ray")
# Keys adpipe once took and no longer does, with why: refused with that reason, not "unknown key".
RETIRED_KEYS = {
    "schedule": "only a nightly job has a schedule (kind: nightly, see jobs/nightly.yaml); run other jobs from cron "
                "or a Kubernetes CronJob",
}


# --------------------------------------------------------------------------------------------
# Job spec parsing
# --------------------------------------------------------------------------------------------


def _param_keys(kind: str) -> list[str] | None:
    """The keys a step of this kind takes; None where its parameter class checks its own keys
    (`from_spec_data`, e.g. the train step, whose keys depend on its method)."""
    params = STAGE_PARAMS[kind]
    if hasattr(params, "from_spec_data"):
        return None
    return [f.name for f in dataclasses.fields(params) if f.init]


def _check_keys_first(data: Mapping[Any, Any], fixed: list[str], kinds: list[str], path: str) -> None:
    """Unknown keys before anything else: a misspelt `storge` is a typo to point at, not a missing
    `storage`. `fixed` are the keys this mapping takes whatever its kind, `kinds` the stage kinds
    whose parameters may be there too. Where one of them checks its own keys, only near misses of
    the fixed keys are reported here (like `knd` for `kind`); its class reports the others."""
    keys = [own for kind in kinds if (own := _param_keys(kind)) is not None]
    if len(keys) == len(kinds):
        check_keys(data, dict.fromkeys([*fixed, *(k for own in keys for k in own)]), path)
        return
    fields = {f.name for kind in kinds for f in dataclasses.fields(STAGE_PARAMS[kind])}
    for key in data:
        if key in fixed or key in fields:
            continue
        guess = difflib.get_close_matches(str(key)[:100], fixed, n=1, cutoff=0.6)
        if guess:
            raise SpecError(key_path(key, path), f"unknown key {short_repr(key)}; did you mean {guess[0]!r}?")


def _refuse_retired_keys(data: Mapping[Any, Any], path: str) -> None:
    """Refuse a retired key, unless the mapping's kind takes a parameter of that name."""
    kind = data.get("kind")
    own = _param_keys(kind) if isinstance(kind, str) and kind in STAGE_PARAMS else None
    for key, reason in RETIRED_KEYS.items():
        if key in data and key not in (own or ()):
            raise SpecError(key_path(key, path), reason)


def _parse_step(kind: str, name: str, body: Mapping[str, Any], path: str) -> StepSpec:
    if kind not in STAGE_PARAMS:
        raise SpecError(f"{path}.kind" if path else "kind",
                        f"{short_repr(kind)} is not a step kind; expected one of {', '.join(map(repr, STAGE_PARAMS))}")
    params = parse_dataclass(STAGE_PARAMS[kind], body, path)
    return StepSpec(name=name, kind=kind, params=params)


def parse_spec(data: Any) -> JobSpec:
    """Validate a job spec given as plain data (what YAML loads) and return the typed spec."""
    if not isinstance(data, Mapping):
        raise SpecError("", f"a job spec must be a mapping at the top level, got {describe_value(data)}")
    _refuse_retired_keys(data, "")
    kinds = ("pipeline", *STAGE_PARAMS)
    if "kind" not in data:
        # `knd: score` is a typo to point at, not a missing `kind` (no other top-level key is close to it).
        for key in data:
            if difflib.get_close_matches(str(key)[:100], ["kind"], n=1, cutoff=0.6):
                raise SpecError(key_path(key, ""), f"unknown key {short_repr(key)}; did you mean 'kind'?")
        raise SpecError("kind", f"missing required field; expected one of {', '.join(map(repr, kinds))}")
    kind = data["kind"]
    if kind not in kinds:
        raise SpecError("kind",
                        f"{describe_value(kind)} is not a job kind; expected one of {', '.join(map(repr, kinds))}")
    if kind == "pipeline":
        _check_keys_first(data, [*COMMON_KEYS, "steps"], [], "")
    else:
        _check_keys_first(data, list(COMMON_KEYS), [kind], "")
    if "name" not in data:
        raise SpecError("name", f"missing required field ({NAME_RULE})")
    name = convert_value(str, data["name"], "name")
    check_name(name, "name")
    if "storage" not in data:
        raise SpecError("storage", "missing required field (a mapping with 'root: file:///... or s3://bucket/...')")
    storage = parse_dataclass(StorageSpec, data["storage"], "storage")
    ray = parse_dataclass(RaySpec, data.get("ray", {}), "ray")
    description = convert_value(str | None, data.get("description"), "description")
    body = {k: v for k, v in data.items() if k not in COMMON_KEYS}

    if kind == "pipeline":
        steps = _parse_pipeline_steps(body)
    else:
        steps = (_parse_step(kind, name, body, ""),)
    return JobSpec(kind=kind, name=name, storage=storage, ray=ray, steps=steps, description=description)


def _parse_pipeline_steps(body: Mapping[str, Any]) -> tuple[StepSpec, ...]:
    raw_steps = body.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise SpecError("steps", f"a pipeline needs a non-empty list of steps, got {describe_value(raw_steps)}")
    steps: list[StepSpec] = []
    for index, raw in enumerate(raw_steps):
        path = f"steps[{index}]"
        if not isinstance(raw, Mapping):
            raise SpecError(path, f"expected a mapping with 'name' and 'kind', got {describe_value(raw)}")
        _refuse_retired_keys(raw, path)
        for key in ("storage", "ray"):
            if key in raw:
                raise SpecError(f"{path}.{key}", f"'{key}' is set once for the whole pipeline, at the top level")
        if "kind" not in raw:
            _check_keys_first(raw, ["name", "kind"], list(STAGE_PARAMS), path)
            raise SpecError(f"{path}.kind", f"missing required field; expected one of "
                                            f"{', '.join(map(repr, STAGE_PARAMS))}")
        step_kind = convert_value(str, raw["kind"], f"{path}.kind")
        if step_kind in STAGE_PARAMS:
            _check_keys_first(raw, ["name", "kind"], [step_kind], path)
        if "name" not in raw:
            raise SpecError(f"{path}.name", f"missing required field ({NAME_RULE})")
        step_name = convert_value(str, raw["name"], f"{path}.name")
        check_name(step_name, f"{path}.name")
        if any(s.name == step_name for s in steps):
            raise SpecError(f"{path}.name", f"duplicate step name {step_name!r}")
        body = {k: v for k, v in raw.items() if k not in ("name", "kind")}
        step = _parse_step(step_kind, step_name, body, path)
        _check_references(step, [s.name for s in steps], path)
        steps.append(step)
    return tuple(steps)


def _check_references(step: StepSpec, earlier: list[str], path: str) -> None:
    for field_path, target in step_references(step.params):
        if target not in earlier:
            known = ", ".join(map(repr, earlier)) or "none"
            raise SpecError(f"{path}.{field_path}",
                            f"'step:{target}' does not name an earlier step (earlier steps: {known})")


# --------------------------------------------------------------------------------------------
# Reading spec files
# --------------------------------------------------------------------------------------------


if TYPE_CHECKING:  # PyYAML is untyped here (see pyproject.toml): the mixin's methods are its loader's
    from yaml import SafeLoader as _LoaderBase
else:
    _LoaderBase = object


class _SpecChecks(_LoaderBase):
    """What `yaml.SafeLoader` lacks, each an error naming the line (mixed into the loaders below):

    - a key given twice in one mapping (`safe_load` silently keeps the last one);
    - nesting deeper than MAX_YAML_DEPTH (the composer recurses per level: 10,000 `[` exhausted
      the stack) and more than MAX_YAML_NODES values with aliases expanded (a "billion laughs" of
      nested aliases is a few lines on disk and exponential for whatever walks the data);
    - a scalar its tag cannot convert: `!!int x`, `!!bool maybe` and an integer of 5,000 digits
      raised ValueError / KeyError out of the constructor, not a YAML error.
    Dates and times stay text: `version: 2026-11-21` is a name, and `2026-13-45` raised ValueError.
    """

    parser: type[Any]  # the reader + scanner + parser (C or Python) of the concrete loader

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
        out["storage"] = spec_fields.spec_to_data(value.storage)
        out["ray"] = spec_fields.spec_to_data(value.ray)
        if value.kind == "pipeline":
            out["steps"] = [{"name": s.name, "kind": s.kind, **spec_fields.spec_to_data(s.params)} for s in value.steps]
        else:
            out.update(spec_fields.spec_to_data(value.steps[0].params))
        return out
    return spec_fields.spec_to_data(value)


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec_to_data(spec), sort_keys=False)


__all__ = [
    "COMMON_KEYS", "JobSpec", "StepSpec", "dump_spec", "load_spec", "load_spec_text", "parse_spec", "read_spec_file",
    "spec_to_data",
]
