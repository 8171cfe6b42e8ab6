"""Scoring memory: does the `score` stage's peak memory grow with the size of the archive?

What is measured
  The real `score` stage (through `run_job`, S3 Parquet in -> S3 Parquet out) scores an archive
  of N ELPV images, then one of FACTOR x N images (default 150 and 1,500), with the same model and
  settings, in the same embedded Ray. A background thread walks the driver's process tree every
  0.2 s (psutil when importable, else /proc) and sums the resident set size (RSS) of the driver
  and of every Ray worker process (tasks, actors, idle workers: titles "ray::..."); Ray's own
  system processes (raylet, GCS, agents) are summed apart, and the SeaweedFS server is left out.
  The peak of that sum is reset when each scoring step starts, so each figure is the peak during
  that step only (set-up, ingest and training are not measured). Reported: both peaks, the growth
  from N to FACTOR x N in percent (goal < 15%), and the processes at each peak. RSS counts Ray
  object store pages a process has mapped (shared memory) in that process, so the share of
  shared memory at the peak is shown too.

Set-up (not measured): a SeaweedFS S3 server in a temporary folder, ONE embedded Ray with all
cores, ELPV ingested into S3, the demo's PaDiM (EfficientNet-Lite0, stages 1-3, 100 channels,
256 px) fitted per cell type on normal training cells (capped by --train-per-category), and the
two archives: the first N and the first FACTOR x N cells in dataset order (256 rows per part).

    .venv/bin/python ops/bench/score_memory.py [--images 150] [--factor 10] [--batch-size 16]
                                               [--workers 1] [--cpus-per-worker 1] [--maps]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchlib as bench  # noqa: E402  (sets up sys.path and Ray's environment first)


def describe_peak(sampler: bench.ProcessSampler) -> list[str]:
    lines = []
    at = sampler.peak_at
    shmem = sum(p.shmem for p in sampler.peak_processes if bench.classify(p, sampler.driver) != "ray-system")
    lines.append(f"at {sampler.peak_seconds:.1f} s into the step: driver {bench.mib(at.get('driver', 0))} "
                 f"+ Ray workers {bench.mib(at.get('worker', 0))}; "
                 f"of which shared memory (object store pages) {bench.mib(shmem)}; "
                 f"Ray system processes apart: {bench.mib(at.get('ray-system', 0))}")
    top = sorted(sampler.peak_processes, key=lambda p: -p.rss)
    for process in top[:6]:
        kind = bench.classify(process, sampler.driver)
        title = "driver (this script)" if kind == "driver" else process.title
        lines.append(f"  {bench.mib(process.rss):>10s} (shm {bench.mib(process.shmem):>8s}, "
                     f"anon {bench.mib(process.anon):>9s})  {kind:10s} "
                     f"{title[:80]}")
    return lines


def wait_for_scorers_to_exit(weed_pid: int, timeout: float = 60.0) -> None:
    """Ray Data stops a finished step's actors asynchronously: let them go before the next peak."""
    deadline = time.monotonic() + timeout
    while bench.find_processes("Scorer", {weed_pid}) and time.monotonic() < deadline:
        time.sleep(0.5)


def measure(args: argparse.Namespace, archives: list[tuple[int, str]], prepared: bench.Prepared, stack: dict,
            results: list[dict]) -> None:
    """Score each archive in turn; the sampler's peak is reset when each scoring step starts."""
    sampler = bench.ProcessSampler(interval=args.interval, exclude={stack["weed_pid"]}).start()
    try:
        for count, archive in archives:
            wait_for_scorers_to_exit(stack["weed_pid"])
            bench.wait_until_quiet(args.wait_quiet)
            bench.log(f"scoring {count} images (anomaly maps {'ON' if args.maps else 'OFF'}); "
                      f"peak reset at the step's start ... (load average {bench.load_average()})")
            run = bench.score_archive(archive, prepared.model_uri, workers=args.workers,
                                      cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                                      maps=args.maps, name=f"bench-score-{count}",
                                      echo=bench.prefixed(f"score {count}"), on_start=sampler.reset)
            sampler.sample()
            results.append({"images": count, "run": run, "peak": sampler.peak_total, "peak_anon": sampler.peak_anon,
                            "baseline": sampler.first_total or 0, "samples": sampler.samples,
                            "lines": describe_peak(sampler)})
            bench.log(f"  peak {bench.mib(sampler.peak_total)} over {sampler.samples} samples")
    finally:
        sampler.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=150, help="N: images in the small archive (default 150)")
    parser.add_argument("--factor", type=int, default=10, help="the large archive has FACTOR x N images (default 10)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="scorer actors (default 1, as in jobs/demo.yaml)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--maps", action="store_true", help="also encode and store anomaly maps (default off)")
    parser.add_argument("--train-per-category", type=int, default=100,
                        help="normal training cells per cell type to fit on (0: all of them; default 100)")
    parser.add_argument("--interval", type=float, default=0.2, help="sampling interval in seconds (default 0.2)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each measurement wait up to this long for other processes to calm down")
    parser.add_argument("--ray-logs", action="store_true", help="show Ray worker logs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary S3 data folder")
    args = parser.parse_args(argv)
    problem = bench.starvation_problem(args.workers, args.cpus_per_worker)
    if problem:
        parser.error(problem)
    large = args.images * args.factor
    if not 0 < args.images or large > 2624:
        parser.error(f"FACTOR x N = {large} must be in 1..2624 (the ELPV dataset)")
    total_started = time.monotonic()
    results = []

    with bench.object_store(keep=args.keep) as stack:
        # In a child process with its own Ray: this driver and the Ray measured below then hold
        # nothing of ingest and training.
        prepared = bench.prepare_model_in_subprocess(args.train_per_category, args.batch_size, workers=2,
                                                     ray_logs=args.ray_logs)
        bench.log(f"ingest + train done in {prepared.seconds:.1f} s (child process); model {prepared.model_uri}")
        archives = []
        for count in (args.images, large):
            archive = f"{bench.ROOT}/datasets/elpv-{count}/1"
            bench.take_rows(prepared.dataset_uri, archive, count=count)
            archives.append((count, archive))
        with bench.ray_session(ray_logs=args.ray_logs):
            measure(args, archives, prepared, stack, results)

    small, big = results
    growth = (big["peak"] - small["peak"]) / small["peak"] * 100
    print()
    print("=" * 100)
    print(f"score memory: peak RSS of driver + Ray worker processes DURING THE SCORING STEP ONLY "
          f"(peak reset when the step starts; sampled every {args.interval:g} s; "
          f"{'psutil' if bench.psutil else '/proc'}; SeaweedFS and Ray system processes not in the sum)")
    print(f"  batch {args.batch_size}, {args.workers} scorer actor(s) x {args.cpus_per_worker:g} CPU, "
          f"anomaly maps {'ON' if args.maps else 'OFF'}, {os.cpu_count()} cores")
    for result in results:
        run = result["run"]
        print(f"  {result['images']:5d} images: peak {bench.mib(result['peak']):>10s}  "
              f"(at the step's start {bench.mib(result['baseline'])}; step {run.step_seconds:.1f} s, "
              f"{run.stage_images_per_second} images/s, {result['samples']} samples)")
        print("\n".join("      " + line for line in result["lines"]))
    anon_growth = (big["peak_anon"] - small["peak_anon"]) / small["peak_anon"] * 100
    print(f"  private anonymous memory only (RssAnon: no shared library pages counted once per process, no "
          f"object store pages): peak {bench.mib(small['peak_anon'])} -> {bench.mib(big['peak_anon'])} "
          f"({anon_growth:+.1f}%)")
    print(f"  growth from {small['images']} to {big['images']} images: {growth:+.1f}%   "
          f"(goal < 15%: {'MET' if growth < 15 else 'NOT MET'})")
    print(f"  whole benchmark: {time.monotonic() - total_started:.0f} s")
    print("=" * 100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
