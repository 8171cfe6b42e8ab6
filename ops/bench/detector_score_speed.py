"""Images/s of each detector in the `score` job: padim, pfm, realnet and resad, same images, one run.

What is measured
  One pipeline on one embedded Ray and a SeaweedFS S3 server: ELPV ingested (the demo's split
  seed 0), scikit-image textures ingested, RealNet's and ResAD's synthetic mix made from the mono
  normal training cells, then each detector trained on mono with the detector block of its job
  file (jobs/demo.yaml for PaDiM, jobs/train-pfm.yaml, jobs/train-realnet.yaml,
  jobs/train-resad.yaml), only the step count cut to --steps: what a model learnt does not change
  what scoring it costs. Then one `score` step per detector over the same rows (the mono test
  split), with the job files' score settings: 1 scorer actor x 1 CPU, batch 8, anomaly maps on.
  ResAD scores against 4 normal mono training cells (`references:`), as its job scores a new
  category.

Reported per detector: the score stage's own figure (scored images over the stage's whole run,
planning, actor start-up with its model load, and publishing included), the step's seconds, and
the training step's seconds at --steps. The bare forward pass of each detector, without Ray and
decoding, is `ops/bench/detector_quality.py`'s "forward images/s".

    .venv/bin/python ops/bench/detector_score_speed.py [--steps 30] [--detectors padim,pfm,realnet,resad]

About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

import _benchlib as bench  # noqa: E402  (sets up sys.path and Ray's environment first)

DETECTORS = ("padim", "pfm", "realnet", "resad")
JOB_FILES = {"padim": "demo.yaml", "pfm": "train-pfm.yaml", "realnet": "train-realnet.yaml",
             "resad": "train-resad.yaml"}
SCORING = {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}  # the job files' score resources


def job_step(method: str, kind: str) -> dict:
    """The first step of `kind` (for train: of `method`) in `method`'s job file."""
    spec = yaml.safe_load((bench.REPO / "jobs" / JOB_FILES[method]).read_text())
    for step in spec["steps"]:
        if step["kind"] == kind and (kind != "train" or step.get("method") == method):
            return copy.deepcopy(step)
    raise SystemExit(f"jobs/{JOB_FILES[method]} has no {kind} step for {method}")


def shortened(train: dict, method: str, steps: int) -> dict:
    """The job file's train step at `steps` steps (and statistics windows that fit in them)."""
    block = train[method]
    if "training" in block:
        block["training"].update(steps=steps, checkpoint_every=steps, log_every=max(1, steps // 3))
    for window in ("variance_steps", "statistics_steps", "afs_steps"):
        if window in block:
            block[window] = min(block[window], max(1, steps // 2))
    return train


def pipeline(detectors: list[str], steps: int) -> dict:
    steps_out: list[dict] = [
        {"name": "ingest-elpv", "kind": "ingest",
         "source": {"type": "elpv", "categories": ["mono"], "normal_train_fraction": 0.6, "split_seed": 0},
         "outputs": {"dataset": "elpv-mono", "rows_per_part": 256}, "resources": {"workers": 2}},
    ]
    if {"realnet", "resad"} & set(detectors):
        steps_out.append({"name": "ingest-textures", "kind": "ingest",
                          "source": {"type": "skimage", "images": ["gravel", "rocket", "coffee", "chelsea"]},
                          "outputs": {"dataset": "textures"}})
        mix = job_step("realnet", "synthesize")
        mix.update(name="synthesize", inputs={"dataset": "step:ingest-elpv"},
                   outputs={"dataset": "elpv-mono-mix"})
        mix["sources"][0]["textures"] = {"dataset": "step:ingest-textures"}
        mix.pop("categories", None)
        steps_out.append(mix)
    for method in detectors:
        train = shortened(job_step(method, "train"), method, steps)
        train.update(name=f"train-{method}", outputs={"model": f"{method}-elpv-mono"},
                     inputs={"dataset": "step:synthesize" if method in ("realnet", "resad") else "step:ingest-elpv"})
        train.pop("categories", None)
        if method == "padim":  # the demo calibrates on synthetic anomalies; the threshold's cost is not scoring's
            train["threshold"] = {"method": "normal_quantile", "quantile": 0.99, "holdout_fraction": 0.1}
        steps_out.append(train)
        score = {"name": f"score-{method}", "kind": "score", "inputs": {"dataset": "step:ingest-elpv"},
                 "model": {"uri": f"step:train-{method}"}, "split": "test", "outputs": {"anomaly_maps": True},
                 "resources": dict(SCORING)}
        if method == "resad":
            score["references"] = {"dataset": "step:ingest-elpv", "category": "mono", "count": 4,
                                   "split": "train", "seed": 0}
        steps_out.append(score)
    return {"kind": "pipeline", "name": "bench-detector-score-speed", "storage": {"root": bench.ROOT},
            "ray": {"address": "local"}, "steps": steps_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps per gradient-trained detector")
    parser.add_argument("--detectors", default=",".join(DETECTORS), help="comma-separated, of " + ", ".join(DETECTORS))
    parser.add_argument("--ray-logs", action="store_true", help="show Ray worker logs")
    args = parser.parse_args(argv)
    detectors = args.detectors.split(",")
    unknown = sorted(set(detectors) - set(DETECTORS))
    if unknown:
        parser.error(f"unknown detectors {unknown}; known: {', '.join(DETECTORS)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    from pipelines.orchestrator import run_job
    from pipelines.runs import RunRecord
    from pipelines.spec import parse_spec

    started = time.monotonic()
    with bench.bench_stack(ray_logs=args.ray_logs):
        outcome = run_job(parse_spec(pipeline(detectors, args.steps)), echo=bench.prefixed("run"))
        record = RunRecord.load(bench.location(bench.ROOT), outcome.run_id)
        seconds = {name: float(record.step_state(name).get("seconds", float("nan"))) for name in outcome.results}
    print()
    print("=" * 100)
    print(f"score job per detector: ELPV mono test split, 1 scorer actor x 1 CPU, batch 8, anomaly maps on, "
          f"{os.cpu_count()} cores; gradient-trained detectors trained {args.steps} steps")
    print(f"  {'detector':10s} {'rows':>5s} {'stage images/s':>15s} {'score step s':>13s} {'train step s':>13s}")
    for method in detectors:
        result = outcome.results[f"score-{method}"]
        print(f"  {method:10s} {result.rows or 0:5d} {result.details.get('images_per_second') or 0:15.2f} "
              f"{seconds[f'score-{method}']:13.1f} {seconds[f'train-{method}']:13.1f}")
    print(f"  whole benchmark: {time.monotonic() - started:.0f} s; load average at the end: {bench.load_average()}")
    print("=" * 100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
