"""The nightly job at scale: N simulated nights of an archive on local S3, in one run.

What is measured (one embedded Ray, one SeaweedFS S3 server, the demo's PaDiM at 256 px):
  nights   night i writes a new day partition of --images real ELPV mono cells into the archive
           (date=YYYY-MM-DD/cam-1/*.png on S3), then runs `kind: nightly` for that day through
           `run_job` (ingest the new partition, score it, load it into the Iceberg table, drift
           report). Per night: wall seconds, rows scored, peak RSS of this (driver) process.
  nothing  the same night again, with nothing new (listing the window, reading manifests and the
           table's snapshot summary, no Ray work): wall seconds, at several archive sizes. Goal:
           seconds, independent of the archive's size (the window bounds the work).
  plain    the plain `score` job on the last night's ingested images: wall seconds; the ratio
           normal-night images/s / plain score images/s (goal >= 0.8). The night also ingests
           the partition and loads the table, which the plain job does not.
  rollout  the last night with a new model version: the whole retention window is rescored and
           loaded: wall seconds and images/s.
  memory   the driver's peak RSS per night, first nights vs last nights (goal: flat).

    .venv/bin/python ops/bench/nightly.py [--nights 30] [--images 32] [--retention 10]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchlib as b  # noqa: E402


class PeakRss:
    """This process's peak RSS while the block runs (sampled every 50 ms)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--images", type=int, default=32, help="images per night")
    parser.add_argument("--retention", type=int, default=10, help="retention_days of the spec")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import pyarrow.compute as pc

    from pipelines import datasets
    from pipelines.orchestrator import run_job, spec_fingerprint
    from pipelines.spec import parse_spec
    from pipelines.storage import Location

    with b.bench_stack() as stack:
        prepared = b.prepare_model(train_per_category=64, batch_size=args.batch_size, workers=1)
        second = b.prepare_model(train_per_category=48, batch_size=args.batch_size, workers=1)  # a new version
        mono = datasets.read_table(Location.parse(prepared.dataset_uri), ["image", "category"])
        cells = [row["image"] for row in mono.filter(pc.equal(mono["category"], "mono")).to_pylist()]
        b.log(f"{len(cells)} mono cells to build nights from; models {prepared.model_uri}, {second.model_uri}")
        archive = Location.parse(f"{b.ROOT}/archive/line-7")
        catalog = Path(stack["state_dir"]) / "catalog.db"
        first_day = datetime.date(2026, 1, 1)

        def spec(model: str, day: datetime.date):
            return parse_spec({
                "kind": "nightly", "name": "bench-nightly", "storage": {"root": b.ROOT},
                "archive": {"uri": archive.uri, "name": "line-7", "category": "mono"},
                "model": {"uri": model}, "retention_days": args.retention, "night": day.isoformat(),
                "table": {"catalog": {"uri": f"sqlite:///{catalog}"}},
                "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": args.batch_size}})

        def night(model: str, day: datetime.date):
            parsed = spec(model, day)
            started = time.monotonic()
            with PeakRss() as rss:
                result = run_job(parsed, run_id=f"bench-{day}-{spec_fingerprint(parsed)[:8]}", echo=b.quiet) \
                    .results["bench-nightly"]
            return time.monotonic() - started, result, rss.peak

        rows = []
        phases: list[dict] = []
        nothing = []
        for index in range(args.nights):
            day = first_day + datetime.timedelta(days=index)
            for i in range(args.images):
                cell = cells[(index * args.images + i) % len(cells)]
                archive.join(f"date={day}", "cam-1", f"{i:04d}.png").write_bytes(cell)
            seconds, result, peak = night(prepared.model_uri, day)
            rows.append((day, seconds, result.details["rows_scored"], peak))
            phases.append(result.details["seconds"])
            b.log(f"night {index + 1:2d} {day}: {seconds:6.2f} s, scored {result.details['rows_scored']}, "
                  f"loaded {result.details['rows_loaded']}, peak RSS {peak / 2**20:.0f} MiB")
            if (index + 1) in (args.retention, args.nights) or (index + 1) == args.nights // 2:
                again, result, _ = night(prepared.model_uri, day)
                assert not result.details["partitions_scored"] and not result.details["partitions_loaded"]
                nothing.append((index + 1, again))
                b.log(f"  nothing new after {index + 1} nights: {again:.2f} s")
        last_day = first_day + datetime.timedelta(days=args.nights - 1)

        plain = b.score_archive(f"{b.ROOT}/datasets/line-7/{last_day}", prepared.model_uri, workers=1,
                                cpus_per_worker=1, batch_size=args.batch_size, maps=False, name="bench-plain")
        rollout_seconds, rollout, _ = night(second.model_uri, last_day)

    normal = [seconds for _, seconds, scored, _ in rows[1:] if scored == args.images]
    night_rate = args.images / statistics.median(normal)
    plain_rate = plain.images / plain.wall_seconds
    peaks = [peak for *_, peak in rows]
    third = max(1, len(peaks) // 3)
    print()
    print(f"nightly bench: {args.nights} nights x {args.images} images, retention {args.retention} days, "
          f"PaDiM 256 px, 1 scorer (1 CPU), batch {args.batch_size}; machine load {b.load_average()}")
    print(f"  first night (nothing before it):   {rows[0][1]:.2f} s")
    print(f"  normal night, median of {len(normal)}:     {statistics.median(normal):.2f} s "
          f"(min {min(normal):.2f}, max {max(normal):.2f}) = {night_rate:.2f} images/s")
    print(f"  plain score job, same images:      {plain.wall_seconds:.2f} s = {plain_rate:.2f} images/s")
    print(f"  ratio night / plain score:         {night_rate / plain_rate:.2f} (goal >= 0.8)")
    print("  normal night by phase (median s): " + ", ".join(
        f"{name} {statistics.median(p[name] for p in phases[1:]):.2f}" for name in phases[0]))
    print("  rollout by phase (s): " + ", ".join(f"{k} {v:.2f}" for k, v in rollout.details["seconds"].items()))
    for count, seconds in nothing:
        print(f"  nothing new after {count:2d} nights:      {seconds:.2f} s")
    print(f"  rollout backfill ({len(rollout.details['partitions_scored'])} partitions, "
          f"{rollout.details['rows_scored']} images): {rollout_seconds:.2f} s = "
          f"{rollout.details['rows_scored'] / rollout_seconds:.2f} images/s")
    print(f"  driver peak RSS, first {third} nights: {max(peaks[:third]) / 2**20:.0f} MiB; "
          f"last {third} nights: {max(peaks[-third:]) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
