"""Fuzzing `adpipe validate`: a malformed spec exits 2 with one line on stderr, and never a traceback,
an "unexpected error" (exit 1) or a hang.

The cases are generated deterministically (a fixed seed) by mutating the shipped specs under jobs/:
keys deleted, misspelt or added; values replaced by wrong types, non-finite or absurd numbers,
negative counts, huge strings, nested structures and unsafe paths; and the YAML text itself broken
(duplicate keys, truncation, non-UTF-8 bytes, deep nesting, alias bombs, unsafe tags). Each case runs
`adpipe validate` in process (a subprocess per case would take minutes); the spec paths that could
block a reader (a FIFO, /dev/zero, a pipe as /dev/stdin) run as subprocesses with a timeout.

Where a mutation is invalid whatever field it lands on (a negative or non-finite number where a
number was, an unsafe path where a URI was, a duplicate key, bytes that are not UTF-8, ...) the case
must also exit 2: a fuzzer that only checks for crashes would accept a validator that accepts all.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import cli

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
SEED = 20261122
DATA_CASES = 320  # mutations of a parsed spec, written back as YAML
TEXT_CASES = 80  # mutations of a spec's text
CASE_SECONDS = 2.0
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter: 0.2 s for every case, not 1 s


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # the mutation
    content: bytes
    must_fail: bool  # invalid wherever the mutation landed
    detail: str = ""  # what was changed, for a failure message


# ---- mutating parsed specs ----------------------------------------------------------------------

def _nodes(node: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every node below the root: mapping values and list items."""
    found = []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        found.append(((*path, key), value))
        found += _nodes(value, (*path, key))
    return found


def _mappings(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every mapping, the root included."""
    return [path] + [p for p, v in _nodes(node, path) if isinstance(v, dict)] if isinstance(node, dict) else []


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def _typo(rng: random.Random, word: str) -> str:
    chars = list(word)
    i = rng.randrange(len(chars))
    how = rng.choice(["swap", "drop", "double", "upper", "replace"])
    if how == "swap" and len(chars) > 1:
        i = min(i, len(chars) - 2)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    elif how == "drop" and len(chars) > 1:
        del chars[i]
    elif how == "double":
        chars.insert(i, chars[i])
    elif how == "upper":
        chars[i] = chars[i].upper() if chars[i].islower() else "X"
    else:
        chars[i] = "q" if chars[i] != "q" else "z"
    typo = "".join(chars)
    return typo if typo != word else word + "x"


BAD_NUMBERS = [float("inf"), float("-inf"), float("nan"), 1.0e30, -1.0e30, 10**40, -(10**40), 2**63, -1, -0.5]
UNSAFE_PATHS = ["/..", "/a/../b", "/a/%2e%2e/b", "/a/%2E%2e/b", "/a/.%2e/b", "/a/%2e./b", "/a/\x00b", "/a?x=1",
                "/a#frag", "/a\\b", "/a//b", "/./a", "/a%2fb", "/a/\n/b"]
ODD_VALUES = ["", " ", "x" * 100_000, "Upper Case", "..", "../../etc/passwd", "step:", "step:Nope", "\x00",
              "line\nbreak", "ünïcødé", 0, 1, True, False, None, [], {}, [[[[[]]]]], {"a": {"b": {"c": None}}},
              [None], [1, "two", 3.0], {"": 1}, {None: 1}, {1: 2}, "0 2 * * *", "*/0 * * * *", "s3://",
              "file://", "s3://bucket/" + "k/" * 2000, 2**31, 1e-300, 0.0, "1e30", ".inf", "-1"]


def _unsafe_uri(rng: random.Random, uri: str) -> str:
    """`uri` made unsafe: a `..` segment (plain or percent-encoded), a NUL, a query, `//`, ..."""
    attack = rng.choice(UNSAFE_PATHS)
    if uri.startswith("step:"):
        return "/data" + attack
    return uri.rstrip("/") + attack


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _data_case(rng: random.Random, index: int, job: Path, data: dict) -> Case:
    data = copy.deepcopy(data)
    op = rng.choice(["delete", "misspell", "replace", "replace", "replace", "number", "number", "uri", "add",
                     "container"])
    nodes = _nodes(data)
    numbers = [p for p, v in nodes if isinstance(v, (int, float)) and not isinstance(v, bool)]
    uris = [p for p, v in nodes if isinstance(v, str) and v.startswith(("s3://", "/", "file://", "step:"))]
    if (op == "number" and not numbers) or (op == "uri" and not uris):
        op = "replace"
    must_fail = True
    if op == "delete":
        path = rng.choice([p for p, _ in nodes if isinstance(_get(data, p[:-1]), dict)])
        del _get(data, path[:-1])[path[-1]]
        detail, must_fail = f"deleted {_dotted(path)}", False
    elif op == "misspell":  # an unknown key
        parent_path = rng.choice(_mappings(data))
        parent = _get(data, parent_path)
        key = rng.choice(list(parent))
        typo = _typo(rng, str(key))
        renamed = {(typo if k == key else k): v for k, v in parent.items()}
        if parent_path:
            _get(data, parent_path[:-1])[parent_path[-1]] = renamed
        else:
            data = renamed
        detail = f"{_dotted((*parent_path, key))} spelt {typo!r}"
    elif op == "add":  # an unknown key
        parent_path = rng.choice(_mappings(data))
        key = rng.choice(["extra", "zzz", "secret_key", "Kind", "名前"])
        _get(data, parent_path)[key] = rng.choice([1, "x", None, [1]])
        detail = f"added {_dotted((*parent_path, key))}"
    else:
        if op == "number":  # every number in a job spec is a finite, sane, non-negative one
            path = rng.choice(numbers)
            value = rng.choice(BAD_NUMBERS)
        elif op == "uri":
            path = rng.choice(uris)
            value = _unsafe_uri(rng, _get(data, path))
        elif op == "container":  # no scalar field takes a mapping
            path = rng.choice([p for p, v in nodes if isinstance(v, (str, int, float))])
            value = rng.choice([{"nested": {"deeper": [1, 2]}}, {"type": "x"}])
        else:
            path = rng.choice(nodes)[0]
            value = copy.deepcopy(rng.choice(ODD_VALUES))
            must_fail = False
        _get(data, path[:-1])[path[-1]] = value
        detail = f"{_dotted(path)} = {repr(value)[:60]}"
    content = yaml.dump(data, Dumper=DUMPER, sort_keys=False, allow_unicode=True).encode()
    return Case(f"{index:03d}-{job.stem}-{op}", op, content, must_fail, detail)


# ---- mutating spec text -------------------------------------------------------------------------

def _alias_bomb(levels: int = 9, width: int = 10) -> str:
    """The "billion laughs": each anchor a list of `width` aliases of the one before."""
    lines = ["lol0: &lol0 [lol]"]
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines)


def _text_case(rng: random.Random, index: int, job: Path, text: str) -> Case:
    lines = text.splitlines(keepends=True)
    top_level = [i for i, line in enumerate(lines) if line[:1].isalpha() and ":" in line]
    op = rng.choice(["duplicate-top", "duplicate-line", "truncate", "bytes", "nesting", "junk", "tab",
                     "alias-bomb", "big-int", "tag", "nul", "merge", "date", "bom"])
    must_fail = False
    if op == "duplicate-top":
        line = lines[rng.choice(top_level)]
        if not line.rstrip().endswith(":"):  # a scalar key: `name: x` twice
            lines.append("\n" + line if not lines[-1].endswith("\n") else line)
            must_fail = True
        else:
            lines.insert(rng.randrange(len(lines) + 1), line)  # a block key: maybe valid YAML, maybe not
    elif op == "duplicate-line":
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
    elif op == "truncate":
        cut = rng.randrange(len(text))
        return Case(f"{index:03d}-{job.stem}-{op}", op, text[:cut].encode(), False)
    elif op == "bytes":
        raw = text.encode()
        at = rng.randrange(len(raw))
        return Case(f"{index:03d}-{job.stem}-{op}", op,
                    raw[:at] + rng.choice([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\x80"]) + raw[at:], True)
    elif op == "nesting":
        depth = rng.choice([100, 1000, 10_000, 50_000])
        opener = rng.choice(["[", "{a: ", "- "])
        if opener == "- ":
            nested = "".join("  " * d + "-\n" for d in range(min(depth, 500)))
            lines.append("description:\n" + nested)
        else:
            lines.append("description: " + opener * depth + "\n")
        must_fail = True
    elif op == "junk":
        i = rng.randrange(len(lines))
        at = rng.randrange(len(lines[i]) + 1)
        lines[i] = lines[i][:at] + rng.choice([":", "{", "}", "[", "&", "*", "!", "%", "@", "`", "|", ">", "'", '"',
                                               ": :", "? ", "---\n", "...\n"]) + lines[i][at:]
    elif op == "tab":
        i = rng.randrange(len(lines))
        lines[i] = "\t" + lines[i]
    elif op == "alias-bomb":
        key = rng.choice(["description", "categories", "name"])
        lines.append(f"x-bomb: {{{_alias_bomb().replace(chr(10), ', ')}}}\n{key}: *lol9\n")
        must_fail = True
    elif op == "big-int":
        lines.append(rng.choice(["seed", "rows_per_part", "fpr_limit"]) + ": " + "9" * rng.choice([30, 5000, 20_000])
                     + "\n")
        must_fail = True  # either an unknown key or an absurd number
    elif op == "tag":
        lines.append(rng.choice(["description: !!python/object/apply:os.system ['true']\n",
                                 "description: !!binary '%%%'\n", "description: !custom x\n",
                                 "description: !!set {a, b}\n", "description: !!omap [a: 1]\n",
                                 "description: !!int abc\n", "description: !!bool maybe\n",
                                 "description: !!float x\n", "description: !!int [1]\n"]))
        must_fail = True
    elif op == "nul":
        i = rng.randrange(len(lines))
        lines[i] = lines[i].rstrip("\n") + "\x00\n"
        must_fail = True
    elif op == "merge":
        lines.append(rng.choice(["<<: 5\n", "<<: [1, 2]\n", "extra: &x {a: 1}\n<<: *x\n"]))
        must_fail = True
    elif op == "date":
        lines.append(rng.choice(["description: 2026-13-45\n", "description: 2026-02-30 25:61:61\n",
                                 "description: 2026-11-21\n", "description: !!timestamp 2026-99-99\n"]))
    elif op == "bom":
        lines.insert(0, "\ufeff")
    return Case(f"{index:03d}-{job.stem}-{op}", op, "".join(lines).encode(), must_fail)


def _fixed(name: str, content: bytes, must_fail: bool = True) -> Case:
    return Case(name, name, content, must_fail)


def _fixed_cases() -> list[Case]:
    """Hand-written: the worst of what the generator draws only sometimes, and the edges of the document."""
    demo = (REPO / "jobs" / "demo.yaml").read_text()
    return [
        _fixed("deep-brackets", b"[" * 10_000),
        _fixed("deep-mappings", b"{a: " * 10_000),
        _fixed("alias-bomb-top", (_alias_bomb() + "\n").encode()),
        _fixed("huge-file", demo.encode() + b"#" * (1 << 20) + b"\n"),
        _fixed("latin-1", "description: caf\xe9\n".encode("latin-1") + demo.encode()),
        _fixed("utf-16", demo.encode("utf-16")),
        _fixed("nul-in-text", demo.replace("name: demo", "name: de\x00mo").encode()),
        _fixed("duplicate-nested-key",
               demo.replace("      split_seed: 0", "      split_seed: 0\n      split_seed: 1").encode()),
        _fixed("duplicate-kind", (demo + "kind: pipeline\n").encode()),
        _fixed("kind-misspelt", demo.replace("kind: pipeline", "knd: pipeline").encode()),
        _fixed("digits-5000", demo.replace("split_seed: 0", "split_seed: " + "9" * 5000).encode()),
        _fixed("bad-date", demo.replace("name: demo", "name: 2026-13-45").encode(), must_fail=False),
        _fixed("schedule-not-supported", (demo + 'schedule: "0 2 * * *"\n').encode()),
        _fixed("empty", b""),
        _fixed("only-comment", b"# nothing\n"),
        _fixed("two-documents", (demo + "---\n" + demo).encode()),
    ]


def generate_cases(data_cases: int = DATA_CASES, text_cases: int = TEXT_CASES) -> list[Case]:
    rng = random.Random(SEED)
    texts = {job: job.read_text() for job in JOBS}
    parsed = {job: yaml.safe_load(text) for job, text in texts.items()}
    cases = [_data_case(rng, i, job, parsed[job]) for i, job in
             ((i, rng.choice(JOBS)) for i in range(data_cases))]
    cases += [_text_case(rng, data_cases + i, job, texts[job]) for i, job in
              ((i, rng.choice(JOBS)) for i in range(text_cases))]
    return cases + _fixed_cases()


@functools.cache
def all_cases() -> list[Case]:
    """Generated once, when the first case runs: at collection time it would slow every pytest run."""
    return generate_cases()


CASE_COUNT = DATA_CASES + TEXT_CASES + len(_fixed_cases())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Validate one good spec first: the first import of the parameter classes is no case's time."""
    assert cli.main(["validate", str(JOBS[0])]) == 0
    return tmp_path_factory.mktemp("fuzz")


def test_the_cases_are_deterministic_and_varied():
    cases = all_cases()
    assert len(cases) == CASE_COUNT >= 400
    assert [c.content for c in generate_cases(40, 0)[:40]] == [c.content for c in cases[:40]]
    assert sum(c.must_fail for c in cases) >= 200
    assert len({c.op for c in cases}) >= 30


@pytest.mark.timeout(30)  # a hang fails its case, not the whole run
@pytest.mark.parametrize("index", range(CASE_COUNT))
def test_validate_exits_0_or_2_with_one_line(index, folder, capsys):
    case = all_cases()[index]
    path = folder / f"{case.name}.yaml"
    path.write_bytes(case.content)
    started = time.perf_counter()
    code = cli.main(["validate", str(path)])
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert seconds < CASE_SECONDS, f"{case.name} took {seconds:.1f} s"
    assert code in (0, 2), f"{case.name} ({case.detail}): {err}"
    if code == 0:
        assert err == "" and out.startswith(f"{path}: valid "), (case.name, out, err)
        shown = case.content[:2000].decode(errors="replace")
        assert not case.must_fail, f"{case.name} ({case.detail}) accepted:\n{shown}"
    else:
        lines = err.splitlines()
        assert len(lines) == 1 and err.endswith("\n") and lines[0].startswith("adpipe: error: "), (case.name, err)
        assert lines[0].strip() != "adpipe: error:" and out == "", (case.name, out, err)


# ---- spec paths that must not be read: each in a subprocess, since a hang would hang pytest ------

def _validate_subprocess(path: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", path], capture_output=True,
                          text=True, timeout=60, cwd=REPO, **kwargs)


def _assert_refused(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adpipe: error: ") and fragment in lines[0], done.stderr


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading would block forever
    started = time.monotonic()
    _assert_refused(_validate_subprocess(str(fifo)), "not a regular file")
    assert time.monotonic() - started < 30


def test_dev_zero_is_refused():
    _assert_refused(_validate_subprocess("/dev/zero"), "not a regular file")


def test_dev_stdin_on_an_open_pipe_is_refused():
    read_end, write_end = os.pipe()  # held open: a read would wait for a writer that never writes
    try:
        _assert_refused(_validate_subprocess("/dev/stdin", stdin=read_end), "not a regular file")
    finally:
        os.close(read_end)
        os.close(write_end)
