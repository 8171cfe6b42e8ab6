"""DDPM training speed: the Ray Train job with 1 worker vs a plain single-process loop.

What is measured (one run, same machine, so the ratio is fair even on a noisy machine)
  (a) plain loop: `TrainingState.train_step` (the very function the Ray Train workers call) on the
      identical U-Net, batch size and images, already decoded in memory as float tensors; torch
      limited to the threads a worker gets (`int(cpus_per_worker)`); the first --warmup steps are
      not timed. Run before and after (b); the mean of both is used (the machine drifts).
  (b) the real `train` stage (`method: ddpm`) through `run_job` on an embedded Ray: ELPV cells in
      the local S3 store -> Ray Data decode + augment tasks -> TorchTrainer with 1 worker ->
      checkpoints to S3 -> model artifact. Steady-state steps/s = the steps of every logged
      interval after the first (which includes start-up and the first batches) over their time,
      from the job's own metrics (train_metrics.jsonl); the whole step's wall time is printed too.
  ratio = (b) steady-state steps/s / (a) steps/s  (goal >= 0.9).

    .venv/bin/python ops/bench/ddpm_train_speed.py [--image-size 64] [--channels 32,64,128] [--batch-size 8]
                                                   [--steps 60]   (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bench  # noqa: E402


def plain_loop(model: dict, optim: dict, pixels, batch_size: int, steps: int, warmup: int, threads: int) -> float:
    """Steps/s of the in-memory loop over `pixels` (N, H, W, 3 uint8), after `warmup` steps."""
    import torch

    from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
    from pipelines.models.diffusion.training import TrainingState

    torch.set_num_threads(threads)
    config = DdpmConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()})
    state = TrainingState(config, OptimConfig(**optim), total_steps=steps + warmup, seed=0)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    batches = [images[i:i + batch_size] for i in range(0, len(images) - batch_size + 1, batch_size)]
    started = None
    for step in range(steps + warmup):
        if step == warmup:
            started = time.perf_counter()
        state.train_step(batches[step % len(batches)], None, torch.Generator().manual_seed(step))
    return steps / (time.perf_counter() - started)


def decoded_cells(uri: str, image_size: int, count: int):
    """The first `count` normal training cells of the ingested dataset, decoded like the job does."""
    import numpy as np

    from pipelines import datasets
    from pipelines.data.preprocess import decode_rgb

    table = datasets.read_table(bench.location(uri), columns=["image", "split", "label", "category"])
    rows = [r for r in table.to_pylist() if r["split"] == "train" and r["label"] == 0 and r["category"] == "mono"]
    return np.stack([decode_rgb(r["image"], image_size) for r in rows[:count]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", default="32,64,128",
                        help="U-Net block widths (default 32,64,128: 2.5 M parameters)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="steps of the Ray job (and timed plain-loop steps)")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = parser.parse_args(argv)
    from pipelines.orchestrator import run_job
    from pipelines.spec import parse_spec

    model = {"image_size": args.image_size, "block_out_channels": [int(c) for c in args.channels.split(",")],
             "layers_per_block": 1}
    optim = {"lr": 0.0005, "warmup_steps": 10}
    threads = max(1, int(args.cpus_per_worker))
    with bench.bench_stack():
        bench.log("ingesting ELPV into the local S3 store")
        ingest = run_job(parse_spec({
            "kind": "ingest", "name": "bench-ingest", "storage": {"root": bench.ROOT},
            "source": {"type": "elpv", "normal_train_fraction": 0.6}, "outputs": {"dataset": "elpv"}}),
            echo=bench.quiet).results
        dataset = next(iter(ingest.values())).output
        pixels = decoded_cells(dataset, args.image_size, 256)
        bench.log(f"plain loop (before): {len(pixels)} cells in memory, batch {args.batch_size}, {threads} thread(s)")
        plain_before = plain_loop(model, optim, pixels, args.batch_size, args.steps, args.warmup, threads)
        bench.log(f"  {plain_before:.2f} steps/s")

        spec = parse_spec({
            "kind": "train", "name": "bench-ddpm", "storage": {"root": bench.ROOT}, "method": "ddpm",
            "inputs": {"dataset": dataset}, "outputs": {"model": "bench-ddpm"}, "categories": ["mono"],
            "ddpm": model, "optim": optim,
            "training": {"steps": args.steps, "checkpoint_every": args.steps, "log_every": args.log_every},
            "resources": {"workers": 1, "cpus_per_worker": args.cpus_per_worker, "batch_size": args.batch_size}})
        bench.log(f"Ray Train job: 1 worker x {args.cpus_per_worker:g} CPU, {args.steps} steps")
        started = time.monotonic()
        outcome = run_job(spec, echo=bench.prefixed("train"))
        wall = time.monotonic() - started
        result = outcome.results["bench-ddpm"]
        history = [json.loads(line) for line in bench.location(result.details["metrics"]).read_bytes()
                   .decode().splitlines()]
        intervals = [h for h in history if "images_per_second" in h]
        steady, previous_step = [], intervals[0]["step"]
        for entry in intervals[1:]:
            steps = entry["step"] - previous_step
            steady.append((steps, steps * args.batch_size / entry["images_per_second"]))
            previous_step = entry["step"]
        ray_steps_per_second = sum(s for s, _ in steady) / sum(t for _, t in steady)
        compute = sum(h["compute_fraction"] for h in intervals[1:]) / len(intervals[1:])
        waiting = sum(h["data_wait_fraction"] for h in intervals[1:]) / len(intervals[1:])

        bench.log("plain loop (after)")
        plain_after = plain_loop(model, optim, pixels, args.batch_size, args.steps, args.warmup, threads)
        bench.log(f"  {plain_after:.2f} steps/s")
    plain = (plain_before + plain_after) / 2
    ratio = ray_steps_per_second / plain
    from pipelines.models.diffusion.config import DdpmConfig
    from pipelines.models.diffusion.unet import build_unet

    params = sum(p.numel() for p in build_unet(DdpmConfig(**{**model, "block_out_channels": tuple(
        model["block_out_channels"])})).parameters())
    print()
    print(f"DDPM training speed: U-Net {params / 1e6:.2f} M parameters, {args.image_size} px, batch {args.batch_size}, "
          f"{threads} thread(s), {args.steps} steps")
    print(f"  plain loop, data in memory:     {plain:.2f} steps/s (before {plain_before:.2f}, after {plain_after:.2f})")
    print(f"  Ray Train job, 1 worker:        {ray_steps_per_second:.2f} steps/s steady state "
          f"({sum(s for s, _ in steady)} steps after the first log interval); whole step {wall:.1f} s wall "
          f"for {args.steps} steps, start-up and export included")
    print(f"  in the Ray worker's steady state: {compute:.0%} of the time in train steps, {waiting:.0%} waiting "
          f"for data, {max(0.0, 1 - compute - waiting):.0%} other (reports, metrics writes)")
    print(f"  ratio Ray Train / plain:        {ratio:.2f}   (goal >= 0.9: {'MET' if ratio >= 0.9 else 'NOT MET'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
