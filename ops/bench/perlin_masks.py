"""Perlin masks per second: adpipe's batched `perlin_masks` vs anomalib 2.7's `generate_perlin_noise`.

What is measured (one run, same machine, alternating, so the ratio is fair on a noisy machine)
  (a) adpipe: `pipelines.synthesis.perlin.perlin_masks` at --size (256) in batches of --batch-size
      (64) until --masks (512) masks, RealNet's configuration (scales 2**0..2**5 per axis,
      threshold 0.5, rotation U(-90, 90) degrees, empty masks redrawn): everything the function
      does is timed. Also shown, not used in the ratio: the same with max_rotation 0.
  (b) anomalib: `anomalib.data.utils.generators.perlin.generate_perlin_noise(size, size)` (random
      scales 2**0..2**5 per axis, one mask per call; it has no batching) followed by `> 0.5`, timed
      in a separate virtual environment that has anomalib 2.7 (--anomalib-python), in a subprocess
      whose import time is not timed. Note that (b) does not rotate; (a) does.
  Both: torch limited to --threads threads, on --device (cpu), one warm-up call first, then (a)
  and (b) alternate --repeats times; the medians are reported, by wall clock and by the process's
  CPU time. --threads defaults to 1: synthesis runs in Ray tasks of one CPU (Ray sets
  OMP_NUM_THREADS to a task's CPUs), and on a small shared machine more threads than free cores
  make both sides erratic (OpenMP threads wait at every parallel region for a descheduled peer).
  ratio = (a) masks/s / (b) masks/s by wall clock (goal >= 10); the CPU-time ratio is printed too.

anomalib is not a dependency of adpipe. Create its environment once (about 6 GB with torch):

    python3.11 -m venv /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install torch==2.14.1 "anomalib==2.7.*"

    .venv/bin/python ops/bench/perlin_masks.py [--masks 512] [--batch-size 64] [--size 256] [--threads 1]
                     [--repeats 3] [--device cpu] [--anomalib-python /tmp/anomalib-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import anomalib_version  # noqa: E402  (also puts the repository on sys.path)

GOAL = 10.0

# Runs in anomalib's environment: argv = threads size count device; prints one JSON line.
ANOMALIB_TIMER = r"""
import json, sys, time
import torch
import anomalib
from anomalib.data.utils.generators.perlin import generate_perlin_noise

threads, size, count, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), torch.device(sys.argv[4])
torch.set_num_threads(threads)

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

torch.manual_seed(0)
(generate_perlin_noise(size, size, device=device) > 0.5).any()  # warm-up
sync()
start, cpu_start = time.perf_counter(), time.process_time()
for _ in range(count):
    mask = generate_perlin_noise(size, size, device=device) > 0.5
sync()
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "masks": count, "anomalib": anomalib.__version__,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def time_adpipe(count: int, batch_size: int, size: int, device: str, max_rotation: float) -> tuple[float, float]:
    """(wall, CPU) seconds for `count` masks in batches of `batch_size` (after one warm-up batch)."""
    import torch

    from pipelines.synthesis.perlin import PerlinConfig, perlin_masks

    config = PerlinConfig(max_rotation=max_rotation)
    generator = torch.Generator(device=device).manual_seed(0)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    perlin_masks(min(batch_size, count), size, generator, config)  # warm-up
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    done = 0
    while done < count:
        batch = min(batch_size, count - done)
        perlin_masks(batch, size, generator, config)
        done += batch
    sync()
    return time.perf_counter() - start, time.process_time() - cpu_start


def time_anomalib(python: str, threads: int, size: int, count: int, device: str) -> dict:
    completed = subprocess.run([python, "-c", ANOMALIB_TIMER, str(threads), str(size), str(count), device],
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.exit(f"anomalib timing failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=512, help="masks per timed run (both sides)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--anomalib-python", default="/tmp/anomalib-venv/bin/python")
    args = parser.parse_args()

    version = anomalib_version(args.anomalib_python,
                               "from anomalib.data.utils.generators.perlin import generate_perlin_noise")
    if version is None:
        return 2

    import torch

    torch.set_num_threads(args.threads)
    print(f"Perlin masks {args.size}x{args.size}, {args.masks} masks per run, {args.repeats} alternating runs, "
          f"{args.threads} torch threads, device {args.device}; adpipe torch {torch.__version__}, "
          f"anomalib {version}", flush=True)

    ours, ours_cpu, ours_still, theirs, theirs_cpu = [], [], [], [], []
    info: dict = {}
    for repeat in range(1, args.repeats + 1):
        seconds, cpu_seconds = time_adpipe(args.masks, args.batch_size, args.size, args.device, max_rotation=90.0)
        ours.append(args.masks / seconds)
        ours_cpu.append(args.masks / cpu_seconds)
        info = time_anomalib(args.anomalib_python, args.threads, args.size, args.masks, args.device)
        theirs.append(info["masks"] / info["seconds"])
        theirs_cpu.append(info["masks"] / info["cpu_seconds"])
        seconds, _ = time_adpipe(args.masks, args.batch_size, args.size, args.device, max_rotation=0.0)
        ours_still.append(args.masks / seconds)
        print(f"  run {repeat}: adpipe {ours[-1]:8.1f} masks/s | anomalib {theirs[-1]:7.1f} masks/s "
              f"(threads {info['threads']}) | adpipe without rotation {ours_still[-1]:8.1f} masks/s "
              f"| load average {os.getloadavg()[0]:.2f}", flush=True)

    adpipe, anomalib, still = statistics.median(ours), statistics.median(theirs), statistics.median(ours_still)
    adpipe_cpu, anomalib_cpu = statistics.median(ours_cpu), statistics.median(theirs_cpu)
    ratio = adpipe / anomalib
    print(f"adpipe perlin_masks (batch {args.batch_size}, rotation on): {adpipe:9.1f} masks/s "
          f"({1000 / adpipe:.3f} ms/mask; {1000 / adpipe_cpu:.3f} CPU ms/mask)")
    print(f"adpipe perlin_masks (batch {args.batch_size}, no rotation): {still:9.1f} masks/s "
          f"({1000 / still:.3f} ms/mask)  [not in the ratio]")
    print(f"anomalib {info['anomalib']} generate_perlin_noise + threshold: {anomalib:9.1f} masks/s "
          f"({1000 / anomalib:.3f} ms/mask; {1000 / anomalib_cpu:.3f} CPU ms/mask)")
    print(f"ratio {ratio:.1f}x wall-clock (goal >= {GOAL:.0f}x): {'met' if ratio >= GOAL else 'NOT met'}; "
          f"by CPU time {adpipe_cpu / anomalib_cpu:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
