"""Scoring throughput: the `score` stage against the bare model it runs, in one process, one run.

What is measured
  (a) bare model: the fitted PaDiM artifact loaded with `TrainedModels.load`, the archive's
      images decoded up front into memory (`decode_rgb`, not timed), then a timed loop of the
      model's forward pass over exactly the archive's images: per category model, consecutive
      full batches of `--batch-size` (the last one zero-padded, as the scorer pads it), with
      torch limited to the threads the scorer actor gets (`int(cpus_per_worker)`). One warm-up
      batch per model is not timed. The loop runs before the pipeline step and again after it
      (this machine's speed drifts with other work); the ratio uses the mean of both. With
      --maps, the PNG encoding of the maps is timed apart (stage work, not model work).
  (b) whole pipeline: the real `score` stage through `run_job` (Ray Data decode tasks reading the
      archive's Parquet parts from S3 -> scorer actor pool -> the driver writing score parts and
      the manifest to S3) on the same archive, same batch size, same image size, anomaly maps off
      (default) or on (--maps); the output says which. Reported: the stage's own figure
      (`images_per_second` in its StepResult details: scored images over the stage's whole run
      time, planning and publishing included) and images over the wall time around `run_job`.
      Actor start-up (imports, model load) is part of the step, as it is in production.
  ratio = stage images/s / bare images/s (goal >= 0.8). With --workers W > 1 the bare figure is
  also scaled by W (an upper bound: W independent copies of the bare loop).

While the step runs a background sampler reads /proc every 0.2 s: the CPU seconds each process
of the Ray session used, and a timeline of the Ray workers' titles (when the decode tasks ran,
when the scorer actor was in __init__ and when it was scoring). CPU used by other processes on
the machine is reported beside each figure (--wait-quiet waits for a calm machine first).
--profile also records the scorer actor with py-spy and summarizes where its time went.

Set-up (not timed): a SeaweedFS S3 server in a temporary folder, ONE embedded Ray with all cores,
ELPV ingested into S3 (2,624 cells), the demo's PaDiM (EfficientNet-Lite0, stages 1-3, 100
channels, 256 px) fitted per cell type on normal training cells (capped by
--train-per-category to keep the run short: the fit does not change what scoring costs), and an
archive of the first --images cells (dataset order, both cell types, 256 rows per part).

    .venv/bin/python ops/bench/score_throughput.py [--images 512] [--batch-size 16] [--workers 1]
                    [--cpus-per-worker 1] [--maps] [--profile] [--wait-quiet SECONDS]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _benchlib as bench  # noqa: E402  (sets up sys.path and Ray's environment first)


def bare_model(archive_uri: str, model_uri: str, batch_size: int, threads: int, maps: bool) -> dict:
    import torch

    from pipelines import datasets
    from pipelines.data.preprocess import decode_rgb
    from pipelines.models.artifacts import TrainedModels
    from pipelines.models.inference import encode_map, to_tensor

    started = time.monotonic()
    detector = TrainedModels.load(bench.location(model_uri))
    load_seconds = time.monotonic() - started
    model_bytes = bench.location(model_uri).join("model.safetensors")
    model_bytes = model_bytes.fs.get_file_info(model_bytes.path).size
    size = detector.image_size
    table = datasets.read_table(bench.location(archive_uri), columns=["image", "category"])
    images = table["image"].to_pylist()
    categories = table["category"].to_pylist()
    started = time.monotonic()
    pixels = np.stack([decode_rgb(data, size) for data in images])
    decode_seconds = time.monotonic() - started

    groups: dict[str, list[int]] = collections.defaultdict(list)
    for index, category in enumerate(categories):
        key = detector.key_for(category)
        if key is None:
            raise SystemExit(f"no model for category {category!r}")
        groups[key].append(index)
    batches = []  # (key, indices of up to batch_size images)
    for key in sorted(groups):
        members = groups[key]
        batches += [(key, members[i:i + batch_size]) for i in range(0, len(members), batch_size)]

    def forward(key: str, members: list[int]) -> tuple[np.ndarray, np.ndarray]:
        batch = np.zeros((batch_size, size, size, 3), np.uint8)
        batch[: len(members)] = pixels[members]
        with torch.inference_mode():
            scores, anomaly_maps = detector.models[key](to_tensor(batch))
        return scores[: len(members)].numpy(), anomaly_maps[: len(members)].numpy()

    # What the scorer does for the same rows (pipelines.models.inference.score_in_slots): per input
    # part (256 rows here) and category model, one zero-padded pass per group of rows
    # seq // batch_size, assuming Ray Data's batches start at part starts (256 % 16 == 0).
    from pipelines.datasets import read_manifest

    pipeline_passes, start = 0, 0
    for part in read_manifest(bench.location(archive_uri)).parts:
        keys = [detector.key_for(c) for c in categories[start:start + part.rows]]
        pipeline_passes += len({(seq // batch_size, key) for seq, key in enumerate(keys)})
        start += part.rows

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for key in sorted(groups):  # warm-up: one batch per model, not timed
            forward(key, groups[key][:batch_size])
        load = bench.ForeignLoad()
        own = bench.own_cpu_seconds()
        started = time.monotonic()
        kept_maps, pass_seconds = [], []
        for key, members in batches:
            pass_started = time.monotonic()
            _, batch_maps = forward(key, members)
            pass_seconds.append(time.monotonic() - pass_started)
            if maps:
                kept_maps.append(batch_maps)
        seconds = time.monotonic() - started
        foreign, _ = load.stop(bench.own_cpu_seconds() - own)
        encode_seconds = None
        if maps:
            started = time.monotonic()
            for batch_maps in kept_maps:
                for anomaly_map in batch_maps:
                    encode_map(anomaly_map)
            encode_seconds = time.monotonic() - started
    finally:
        torch.set_num_threads(previous_threads)
    median_pass = float(np.median(pass_seconds))
    return {"images": len(images), "seconds": seconds, "images_per_second": len(images) / seconds,
            "median_pass_seconds": median_pass, "load_seconds": load_seconds, "model_bytes": model_bytes,
            "median_images_per_second": len(images) / (median_pass * len(batches)),
            "forward_passes": len(batches), "pipeline_passes": pipeline_passes, "foreign_cpu": foreign,
            "models": {k: len(v) for k, v in groups.items()},
            "decode_ms_per_image": 1000 * decode_seconds / len(images),
            "encode_ms_per_image": 1000 * encode_seconds / len(images) if encode_seconds is not None else None}


class ActorProfiler:
    """py-spy record of the scorer actor while the step runs (started as soon as it appears)."""

    def __init__(self, exclude: set[int], rate: int = 50):
        self.exclude, self.rate = exclude, rate
        self.output = Path(tempfile.mkdtemp(prefix="adpipe-bench-spy-")) / "scorer.txt"
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None
        self.started = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> ActorProfiler:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            found = bench.find_processes("Scorer", self.exclude)
            if found:
                self.pid = found[0].pid
                spy = Path(sys.executable).with_name("py-spy")
                self.started = time.monotonic()
                self.process = subprocess.Popen(
                    [str(spy), "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
                     "--nonblocking", "--output", str(self.output)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.process.wait()  # py-spy stops when the actor exits
                self.seconds = time.monotonic() - self.started
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: py-spy writes what it has
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._thread.join(timeout=15)
        if self.process is not None and not self.seconds:
            self.seconds = time.monotonic() - self.started

    def summary(self) -> list[str]:
        if self.pid is None or not self.output.exists():
            return ["py-spy: no scorer actor profile was recorded"]
        stacks = []
        for line in self.output.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks.append((stack, int(count)))
        expected = self.rate * self.seconds
        # py-spy's raw format: "function (file.py:line)" frames, file names shortened.
        buckets = [
            ("actor start-up (_MapWorker.__init__)", "_MapWorker.__init__ ("),
            ("Scorer.__call__ (all of it)", "Scorer.__call__ ("),
            ("  PaDiM forward", "Padim.forward ("),
            ("    backbone (Padim.embed)", "Padim.embed ("),
            ("    gaussian_blur", "gaussian_blur ("),
            ("  encode_map (PNG)", "encode_map ("),
            ("  to_tensor", "to_tensor ("),
        ]
        lines = [f"py-spy record of the scorer actor (pid {self.pid}), {self.seconds:.1f} s at {self.rate} Hz: "
                 f"{sum(c for _, c in stacks)} samples of running Python threads (~{expected:.0f} = one thread busy)"]
        for label, marker in buckets:
            count = sum(c for s, c in stacks if marker in s)
            lines.append(f"  {label:34s} {count:6d} samples  {count / max(expected, 1):6.1%} of the actor's lifetime")
        other = collections.Counter()
        for stack, count in stacks:
            if "Scorer.__call__ (" not in stack and "_MapWorker.__init__ (" not in stack:
                frames = stack.split(";")
                other[frames[-1][:110]] += count
        if other:
            lines.append("  busiest leaf frames outside start-up and Scorer.__call__:")
            lines += [f"    {count:6d}  {frame}" for frame, count in other.most_common(6)]
        lines.append(f"  raw stacks: {self.output}")
        return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="images to score (default 512; ELPV has 2624)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="scorer actors (default 1, as in jobs/demo.yaml)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="CPUs per scorer actor; its torch threads = int(this) (default 1)")
    parser.add_argument("--maps", action="store_true", help="also encode and store anomaly maps (default off)")
    parser.add_argument("--train-per-category", type=int, default=100,
                        help="normal training cells per cell type to fit on (0: all of them; default 100)")
    parser.add_argument("--no-bare-after", dest="bare_after", action="store_false",
                        help="time the bare model only before the step, not also after it")
    parser.add_argument("--profile", action="store_true", help="py-spy record the scorer actor during the step")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each measurement wait up to this long for other processes to calm down")
    parser.add_argument("--ray-logs", action="store_true", help="show Ray worker logs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary S3 data folder")
    args = parser.parse_args(argv)
    problem = bench.starvation_problem(args.workers, args.cpus_per_worker)
    if problem:
        parser.error(problem)
    if not 0 < args.images <= 2624:
        parser.error("--images must be in 1..2624 (the ELPV dataset)")
    threads = max(1, int(args.cpus_per_worker))
    total_started = time.monotonic()

    with bench.bench_stack(ray_logs=args.ray_logs, keep=args.keep) as stack:
        prepared = bench.prepare_model(args.train_per_category, args.batch_size, workers=2)
        bench.log(f"ingest + train done in {prepared.seconds:.1f} s; model {prepared.model_uri}")
        archive = f"{bench.ROOT}/datasets/elpv-{args.images}/1"
        bench.take_rows(prepared.dataset_uri, archive, count=args.images)
        bench.log(f"archive of {args.images} images: {archive}")

        bench.wait_until_quiet(args.wait_quiet)
        bench.log(f"(a) bare model, {threads} torch thread(s), batch {args.batch_size} ... "
                  f"(load average {bench.load_average()})")
        bares = [bare_model(archive, prepared.model_uri, args.batch_size, threads, args.maps)]
        bench.log(f"    {bares[0]['images_per_second']:.2f} images/s ({bares[0]['forward_passes']} forward passes)")

        bench.wait_until_quiet(args.wait_quiet)
        exclude = {stack["weed_pid"]}
        sampler = bench.ProcessSampler(exclude=exclude).start()
        profiler = ActorProfiler(exclude).start() if args.profile else None
        marks = {}

        def step_starts() -> None:
            sampler.reset()
            marks["load"] = bench.ForeignLoad()
            marks["weed"] = bench.cpu_seconds(stack["weed_pid"]) or 0.0

        bench.log(f"(b) score stage, {args.workers} actor(s) x {args.cpus_per_worker:g} CPU, batch {args.batch_size}, "
                  f"anomaly maps {'ON' if args.maps else 'OFF'} ... (load average {bench.load_average()})")
        try:
            run = bench.score_archive(archive, prepared.model_uri, workers=args.workers,
                                      cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                                      maps=args.maps, echo=bench.prefixed("score"), on_start=step_starts)
            sampler.sample()
            weed_cpu = (bench.cpu_seconds(stack["weed_pid"]) or 0.0) - marks["weed"]
            cpu = sampler.cpu_by_process()
            timeline = sampler.timeline("Scorer") + sampler.timeline("decode_parts")
            foreign, foreign_seconds = marks["load"].stop(sum(seconds for _, _, seconds in cpu) + weed_cpu)
        finally:
            sampler.stop()
            if profiler is not None:
                profiler.stop()

        if args.bare_after:
            bench.wait_until_quiet(args.wait_quiet)
            bench.log("(a') bare model again, after the step (the machine's speed drifts) ...")
            bares.append(bare_model(archive, prepared.model_uri, args.batch_size, threads, args.maps))
            bench.log(f"    {bares[1]['images_per_second']:.2f} images/s")

    stage_ips = run.stage_images_per_second or 0.0
    wall_ips = run.images / run.wall_seconds
    bare = bares[0]
    bare_ips = float(np.mean([b["images_per_second"] for b in bares]))
    bare_median_ips = float(np.mean([b["median_images_per_second"] for b in bares]))
    ratio = stage_ips / bare_ips
    print()
    print("=" * 100)
    print(f"score throughput: {run.images} ELPV images, batch {args.batch_size}, {bench.PADIM['image_size']} px, "
          f"PaDiM {bench.PADIM['backbone']} stages {bench.PADIM['stages']} x {bench.PADIM['kept_channels']} ch, "
          f"{os.cpu_count()} cores")
    print(f"  models: {bare['models']} (images per category model)")
    print(f"  (a) bare model forward, {threads} torch thread(s), {bare['forward_passes']} passes of {args.batch_size} "
          f"(decode alone {bare['decode_ms_per_image']:.1f} ms/image, not timed):")
    for label, result in zip(("before the step", "after the step "), bares):
        print(f"      {label}: {result['images_per_second']:8.2f} images/s ({result['seconds']:.1f} s; "
              f"median pass {result['median_pass_seconds']:.3f} s -> "
              f"{result['median_images_per_second']:.2f} images/s); "
              f"{bench.foreign_note(result['foreign_cpu'], result['seconds'])}")
    print(f"      bare figure used below: {bare_ips:.2f} images/s (mean of {len(bares)})")
    print(f"      TrainedModels.load from S3 (model.safetensors {bare['model_bytes'] / 2**20:.0f} MiB) took "
          f"{bare['load_seconds']:.1f} s here (warm imports); the stage does it in each scorer actor "
          "(the driver reads only config.json)")
    if bare["encode_ms_per_image"] is not None:
        both = run.images / (run.images / bare_ips + bare["encode_ms_per_image"] * run.images / 1000)
        print(f"      + PNG map encoding {bare['encode_ms_per_image']:.1f} ms/image -> bare forward + encode: "
              f"{both:.2f} images/s")
    print(f"      the scorer's slot geometry needs {bare['pipeline_passes']} passes for the same rows "
          f"(mixed-category groups cost one pass per category)")
    print(f"  (b) score stage, anomaly maps {'ON' if args.maps else 'OFF'}, {args.workers} actor(s) x "
          f"{args.cpus_per_worker:g} CPU:")
    print(f"      stage's own figure (StepResult images_per_second): {stage_ips:8.2f} images/s")
    print(f"      wall around run_job: {run.wall_seconds:.1f} s -> {wall_ips:8.2f} images/s "
          f"(step {run.step_seconds:.1f} s in the run record)")
    submits = [first for first, _, _, title in timeline if "Scorer" in title and title.endswith(".submit")]
    if submits:
        first_batch = min(submits)
        steady = run.images / max(run.wall_seconds - first_batch, 1e-9)
        print(f"      of which start-up until the scorer's first batch: {first_batch:.1f} s; from then on "
              f"{steady:.2f} images/s (ratio to bare {steady / bare_ips:.2f})")
    print(f"  ratio pipeline / bare: {ratio:.2f}   (goal >= 0.8: {'MET' if ratio >= 0.8 else 'NOT MET'}; "
          f"against the median-pass bare figure: {stage_ips / bare_median_ips:.2f})")
    if args.workers > 1:
        print(f"  ratio pipeline / (bare x {args.workers} workers): {stage_ips / (bare_ips * args.workers):.2f}")
    print(f"  where the step's CPU time went ({run.step_seconds:.1f} s wall x {os.cpu_count()} cores; "
          "sampled every 0.2 s):")
    for pid, title, seconds in cpu[:8]:
        if seconds >= 0.05:
            print(f"    {seconds:7.1f} CPU s  {title[:90]}  (pid {pid})")
    print(f"    {weed_cpu:7.1f} CPU s  SeaweedFS (S3 server)")
    print(f"  timeline of the step (seconds after it started; process titles sampled every 0.2 s; "
          f"the step ended at {run.wall_seconds:.1f}):")
    for first, last, pid, title in sorted(timeline):
        print(f"    {first:6.1f} - {last:6.1f}  pid {pid:<7d} {title[:90]}")
    print(f"    during the step {bench.foreign_note(foreign, foreign_seconds)}")
    if profiler is not None:
        print("\n".join("  " + line for line in profiler.summary()))
    print(f"  load average at the end: {bench.load_average()} (other work on the machine skews these figures)")
    print(f"  whole benchmark: {time.monotonic() - total_started:.0f} s")
    print("=" * 100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
