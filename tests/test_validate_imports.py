"""`adpipe validate` and spec parsing stay light: no torch, Ray, diffusers or timm, and no import cycles.

Each check runs in a fresh interpreter: in the test process those modules are long imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOBS = sorted((REPO / "jobs").glob("*.yaml"))
HEAVY = ("torch", "ray", "diffusers", "timm")

# Every layer of spec parsing, lowest first; each must import on its own (a cycle fails one of them).
SPEC_MODULES = ["pipelines.spec_fields", "pipelines.params.ingest", "pipelines.params.describe",
                "pipelines.params.train", "pipelines.params.sample", "pipelines.params.synthesize",
                "pipelines.params.score", "pipelines.params.evaluate", "pipelines.params", "pipelines.spec"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_validating_every_shipped_spec_imports_no_torch_or_ray():
    """The same code path as `adpipe validate jobs/<spec>.yaml`, for every spec under jobs/."""
    assert JOBS
    code = f"""
import sys
from pipelines import cli
for path in {[str(p) for p in JOBS]!r}:
    assert cli.main(["validate", path]) == 0, path
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
assert not heavy, heavy
"""
    done = _python(code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": valid ") == len(JOBS), done.stdout


def test_each_spec_module_imports_alone_without_torch_or_ray():
    code = f"""
import importlib, sys
for name in {SPEC_MODULES!r}:
    for loaded in [m for m in sys.modules if m == "pipelines" or m.startswith("pipelines.")]:
        del sys.modules[loaded]
    importlib.import_module(name)  # an import cycle through `name` fails here
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
    assert not heavy, (name, heavy)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
