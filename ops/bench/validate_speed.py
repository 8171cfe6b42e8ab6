"""Wall time of `adpipe validate` on every job spec under jobs/, in one fresh process.

What is measured: one new interpreter (`sys.executable -c ...`, the repository as working
directory) that calls `pipelines.cli.main(["validate", path])` for each `jobs/*.yaml` in turn and
exits; the wall clock from before the process is started until it has exited, so interpreter
start-up and every import are in the figure. Run --repeats (5) times after one warm-up run (that
fills the OS file cache); the median and the fastest are printed. The child also reports which of
torch / ray / diffusers / timm it imported (none, if validation stays light) and its own time in
the validations alone. Goal: median under 1.5 s.

    .venv/bin/python ops/bench/validate_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOAL_SECONDS = 1.5
HEAVY = ("torch", "ray", "diffusers", "timm")

CHILD = r"""
import contextlib, io, json, sys, time
started = time.perf_counter()
from pipelines import cli
imported = time.perf_counter()
codes = {}
for path in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()):
        codes[path] = cli.main(["validate", path])
done = time.perf_counter()
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print(json.dumps({"codes": codes, "heavy": heavy, "import_cli_s": imported - started, "validate_s": done - imported}))
""".replace("HEAVY", repr(HEAVY))


def run_once(specs: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *specs], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the validating process failed (exit {done.returncode}):\n{done.stderr}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    specs = [str(p) for p in sorted((REPO / "jobs").glob("*.yaml"))]
    run_once(specs)  # warm-up: the OS file cache, .pyc files
    runs = [run_once(specs) for _ in range(max(1, args.repeats))]
    walls = [seconds for seconds, _ in runs]
    report = runs[walls.index(min(walls))][1]
    invalid = {Path(p).name: code for p, code in report["codes"].items() if code != 0}
    median = statistics.median(walls)
    print(f"adpipe validate, {len(specs)} specs under jobs/ in one fresh process ({sys.executable}):")
    print(f"  wall clock, process start to exit: median {median:.3f} s, fastest {min(walls):.3f} s "
          f"over {len(walls)} runs (goal < {GOAL_SECONDS} s)")
    print(f"  of the fastest run: importing pipelines.cli {report['import_cli_s']:.3f} s, "
          f"the {len(specs)} validations {report['validate_s']:.3f} s")
    print(f"  heavy modules imported: {', '.join(report['heavy']) or 'none'}")
    if invalid:
        print(f"  specs refused (exit code): {invalid}")
    ok = median < GOAL_SECONDS and not report["heavy"] and not invalid
    print("  goal met" if ok else "  GOAL NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
