"""The `adpipe` command as a user runs it: a subprocess with its own embedded Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imagefiles import png, truncated_png, write
from pipelines import datasets
from pipelines.storage import Location

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
ADPIPE = [sys.executable, "-m", "pipelines.cli"]


def adpipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADPIPE_RAY_LOG_TO_DRIVER": "0"}
    return subprocess.run([*ADPIPE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def folder_pipeline(root: str, images: Path, rows_per_part: int, workers: int = 2) -> dict:
    return {
        "kind": "pipeline", "name": "cli-test", "storage": {"root": root},
        "ray": {"address": "local", "num_cpus": 2},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "folder", "uri": str(images), "category": "c"},
             "outputs": {"dataset": "imgs", "rows_per_part": rows_per_part}, "resources": {"workers": workers}},
            {"name": "describe", "kind": "describe", "inputs": {"dataset": "step:ingest"}},
        ],
    }


def slow_folder_job(tmp_path: Path, file_root: str, run_id: str, count: int, seed: int) -> tuple[Path, Path]:
    """A folder ingest slow enough to interrupt: noise compresses badly, so each file takes real
    time to decode. Returns the spec and the folder its dataset will be written to."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8), "L").save(images / f"{i:03d}.png")
    spec = write_spec(tmp_path / "job.yaml", folder_pipeline(file_root, images, rows_per_part=4, workers=1))
    return spec, Path(file_root[len("file://"):]) / "datasets" / "imgs" / run_id


def start_run(spec: Path, run_id: str, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "ADPIPE_RAY_LOG_TO_DRIVER": "0"}
    return subprocess.Popen([*ADPIPE, "run", str(spec), "--run-id", run_id], cwd=REPO, env=env, **popen)


def test_run_status_logs_list_and_rerun(tmp_path, file_root):
    images = tmp_path / "images"
    for i in range(5):
        write(images / f"{i}.png", png(seed=i))
    write(images / "bad.png", truncated_png())
    spec = write_spec(tmp_path / "job.yaml", folder_pipeline(file_root, images, rows_per_part=2))

    done = adpipe("run", str(spec), "--run-id", "cli-run-1")
    assert done.returncode == 0, done.stderr
    assert "ingested 5 images from 6 files" in done.stdout
    assert "rejected 1 files" in done.stdout and "bad.png" in done.stdout
    assert "run cli-run-1 succeeded" in done.stdout
    assert "Traceback" not in done.stderr

    status = adpipe("status", "cli-run-1", "--root", file_root)
    assert status.returncode == 0 and "succeeded" in status.stdout
    assert "rows=5" in status.stdout and "rejected=1" in status.stdout
    logs = adpipe("logs", "cli-run-1", "--spec", str(spec))
    assert logs.returncode == 0 and "[ingest] step succeeded" in logs.stdout and "run succeeded" in logs.stdout
    listing = adpipe("list", "--root", file_root)
    assert listing.returncode == 0 and "cli-run-1" in listing.stdout and "steps 2/2" in listing.stdout

    again = adpipe("run", str(spec), "--run-id", "cli-run-1")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped") == 2
    # Nothing left to do: the rerun did not start Ray at all.
    assert adpipe("logs", "cli-run-1", "--spec", str(spec)).stdout.count("ray ready") == 1
    assert (Path(file_root[len("file://"):]) / "runs/cli-run-1/status.json").exists()

    # the same run id with a changed spec is refused rather than mixed up
    changed = folder_pipeline(file_root, images, rows_per_part=3)
    other = adpipe("run", str(write_spec(tmp_path / "changed.yaml", changed)), "--run-id", "cli-run-1")
    assert other.returncode == 2 and "different spec" in other.stderr


def test_bad_spec_and_bad_input_exit_2_with_a_message(tmp_path, file_root):
    spec = folder_pipeline(file_root, tmp_path / "images", rows_per_part=2)
    spec["steps"][0]["outputs"]["rows_per_prt"] = spec["steps"][0]["outputs"].pop("rows_per_part")
    bad = adpipe("run", str(write_spec(tmp_path / "bad.yaml", spec)))
    assert bad.returncode == 2
    assert "steps[0].outputs.rows_per_prt" in bad.stderr and "did you mean 'rows_per_part'" in bad.stderr
    assert "Traceback" not in bad.stderr

    missing = adpipe("run", str(write_spec(tmp_path / "missing.yaml",
                                           folder_pipeline(file_root, tmp_path / "nowhere", 2))))
    assert missing.returncode == 2 and "no files under" in missing.stderr and "nowhere" in missing.stderr
    assert "Traceback" not in missing.stderr

    unknown_run = adpipe("status", "no-such-run", "--root", file_root)
    assert unknown_run.returncode == 2 and "no run 'no-such-run'" in unknown_run.stderr


def test_an_empty_run_id_is_refused_before_anything_runs(tmp_path, file_root):
    """`--run-id ''` once meant "no run id" (`if args.run_id:`) and started a run under a new one."""
    spec = write_spec(tmp_path / "job.yaml", folder_pipeline(file_root, tmp_path / "images", rows_per_part=2))
    for command in (["run", str(spec), "--run-id", ""],
                    ["submit", str(spec), "--address", "http://127.0.0.1:1", "--run-id", ""]):
        done = adpipe(*command, timeout=120)
        assert (done.returncode, done.stderr) == (2, "adpipe: error: run-id: '' is not a valid run id "
                                                     "(a-z, 0-9, '.', '_', '-'; at most 128)\n"), done.stderr
    assert not Path(file_root[len("file://"):]).exists(), "nothing may be written for a refused run"


def test_killed_run_leaves_no_manifest_and_rerun_has_no_duplicates(tmp_path, file_root):
    spec, dataset = slow_folder_job(tmp_path, file_root, "kill-run", count=120, seed=0)
    process = start_run(spec, "kill-run", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((dataset / "_parts").glob("*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the embedded Ray with it
    process.wait(timeout=30)
    written = len(list(dataset.glob("part-*.parquet")))
    assert written >= 3, "the run should have been killed part-way"
    assert not (dataset / "_manifest.json").exists(), "a killed run must not publish"

    # The record still says "running"; its owner is gone, so status and list say abandoned.
    status = adpipe("status", "kill-run", "--root", file_root)
    assert status.returncode == 0 and "run kill-run: abandoned" in status.stdout, status.stdout
    assert f"pid {process.pid}" in status.stdout
    listing = adpipe("list", "--root", file_root)
    assert any(line.split()[:2] == ["kill-run", "abandoned"] for line in listing.stdout.splitlines()), listing.stdout

    rerun = adpipe("run", str(spec), "--run-id", "kill-run")
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stdout  # finished parts were reused, not redone
    events = adpipe("logs", "kill-run", "--root", file_root).stdout
    assert "run taken over" in events
    assert "run kill-run: succeeded" in adpipe("status", "kill-run", "--root", file_root).stdout
    table = datasets.read_table(Location.parse(f"file://{dataset}"))
    ids = table.column("image_id").to_pylist()
    assert len(ids) == 120 and len(set(ids)) == 120


def test_a_terminated_run_records_that_it_failed_and_why(tmp_path, file_root):
    spec, dataset = slow_folder_job(tmp_path, file_root, "term-run", count=120, seed=1)
    process = start_run(spec, "term-run", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((dataset / "_parts").glob("*.json")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    # Usually gone within 3 s. (Before ray_runtime released the failed stage's frames, Ray's
    # shutdown could run under a still-running Ray Data executor: once over a minute.)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 143 and "interrupted by SIGTERM" in stderr, stderr
    status = adpipe("status", "term-run", "--root", file_root).stdout
    assert "run term-run: failed" in status and "interrupted (SIGTERM)" in status, status
    assert not (Path(file_root[len("file://"):]) / "runs" / "term-run" / "lease.json").exists()


def test_a_second_run_of_a_run_id_in_progress_is_refused(tmp_path, file_root):
    """While another process holds the run's lease (here: this test process), `adpipe run` of the
    same run id refuses with exit 75 and one line, and starts nothing."""
    from pipelines.runs import Lease

    images = tmp_path / "images"
    write(images / "a.png", png())
    spec = write_spec(tmp_path / "job.yaml", folder_pipeline(file_root, images, rows_per_part=2))
    lease = Lease(Location.parse(file_root).join("runs", "busy-run"))
    lease.acquire("busy-run")
    try:
        second = adpipe("run", str(spec), "--run-id", "busy-run")
    finally:
        lease.release()
    assert second.returncode == 75, second.stderr
    assert f"run 'busy-run' is being run by pid {os.getpid()}" in second.stderr and "another run id" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert not (Path(file_root[len("file://"):]) / "runs" / "busy-run" / "status.json").exists()
    assert adpipe("run", str(spec), "--run-id", "busy-run").returncode == 0  # once it is free
