"""Run ownership: leases, abandoned runs, takeover; exit codes of infrastructure failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from pipelines import runs
from pipelines.errors import StorageError
from pipelines.orchestrator import root_cause
from pipelines.runs import Lease, RunInUse, effective_state, lease_is_live, owner_is_gone, read_lease
from pipelines.storage import Location


def test_a_live_lease_refuses_a_second_owner_and_is_released(tmp_path):
    folder = Location.parse(str(tmp_path)).join("runs", "r1")
    first = Lease(folder)
    assert first.acquire("r1") is None
    assert lease_is_live(read_lease(folder))
    with pytest.raises(RunInUse, match=r"run 'r1' is being run by pid \d+ on .*another run id"):
        Lease(folder).acquire("r1")
    first.release()
    assert read_lease(folder) is None
    second = Lease(folder)
    second.acquire("r1")
    second.release()


def test_the_heartbeat_keeps_a_short_lease_alive_and_an_unrenewed_one_expires(tmp_path, monkeypatch):
    monkeypatch.setenv("ADPIPE_LEASE_SECONDS", "1.2")
    folder = Location.parse(str(tmp_path)).join("runs", "r2")
    lease = Lease(folder)
    lease.acquire("r2")
    time.sleep(2.5)  # two lease lifetimes: only the heartbeat keeps it live
    assert lease_is_live(read_lease(folder))
    lease._stop.set()  # the process stalls: no more heartbeats
    lease._thread.join()
    time.sleep(1.5)
    stale = read_lease(folder)
    assert stale is not None and not lease_is_live(stale)
    assert effective_state({"state": "running"}, stale) == "abandoned"
    assert effective_state({"state": "succeeded"}, stale) == "succeeded"
    taker = Lease(folder)
    assert taker.acquire("r2")["owner"]["token"] == lease.owner["token"]  # took the dead lease over
    assert read_lease(folder)["owner"]["token"] == taker.owner["token"]
    taker.release()


def test_an_owner_process_that_is_gone_is_seen_at_once_on_its_host():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    owner = {**runs.this_process(), "pid": child.pid, "process_start": "1"}
    assert owner_is_gone(owner)
    assert not owner_is_gone(runs.this_process())
    assert not owner_is_gone({**runs.this_process(), "host": "another-host", "pid": child.pid})
    far_future = {"owner": owner, "expires_at": time.time() + 3600}
    assert not lease_is_live(far_future)  # expiry far away, but its process has gone


def test_root_cause_unwraps_ray_task_errors_to_the_first_failure(ray_session):
    import ray

    @ray.remote
    def read_from_a_dead_store():
        raise StorageError("cannot read s3://b/x (endpoint http://127.0.0.1:1): cannot connect to the S3 endpoint")

    with pytest.raises(Exception) as caught:
        ray.get(read_from_a_dead_store.remote())
    cause = root_cause(caught.value)
    assert isinstance(cause, StorageError) and "cannot connect" in str(cause)
    assert cause.exit_code == 1


def test_a_store_outage_mid_run_exits_1_naming_the_first_failure(tmp_path):
    """The run's store stops while a step reads and writes it: exit 1 (infrastructure), the message
    names the storage failure, not a later failure to write the run's status."""
    from pipelines import objectstore

    store = objectstore.start(tmp_path / "store", buckets=["outage"])
    try:
        env = {**os.environ, **store.env(), "ADPIPE_RAY_LOG_TO_DRIVER": "0"}
        spec = tmp_path / "job.yaml"
        spec.write_text("kind: ingest\nname: outage\nstorage: {root: s3://outage/root}\n"
                        "ray: {address: local, num_cpus: 2}\nsource: {type: elpv}\n"
                        "outputs: {dataset: elpv, rows_per_part: 32}\nresources: {workers: 1}\n")
        process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(spec), "--run-id", "o1"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        s3 = pafs.S3FileSystem(endpoint_override=store.endpoint.split("://")[1], scheme="http", region="us-east-1",
                               access_key=store.access_key, secret_key=store.secret_key)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            found = s3.get_file_info(pafs.FileSelector("outage/root/datasets/elpv/o1/_parts", allow_not_found=True))
            if found:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the job ended before the store could be stopped"
        objectstore.stop_server(store)  # mid-step: parts are being written
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stderr
        lines = [line for line in stderr.splitlines() if line.startswith("adpipe:")]
        assert len(lines) == 1, stderr
        # The first failure: a part's read or write on the store, with the store's answer.
        assert lines[0].startswith("adpipe: error: cannot ") and "s3://outage/root/" in lines[0], lines[0]
        assert "unexpected error" not in stderr and "status.json" not in lines[0]
    finally:
        objectstore.stop_server(store)


# Runs in a child process (ray_runtime leaves the session's Ray alone and shuts down only one it
# started). A stage fails mid-iteration with its Ray Data iterator held in a local variable, as a
# stage's loop holds it; the caller keeps the error while it records the failure, as run_job does.
FAILING_MID_ITERATION = """
import json
import ray, ray.data
from pipelines.orchestrator import ray_runtime
from pipelines.spec_fields import RaySpec

closed_while_ray_was_up = []

def batches():
    iterator = ray.data.range(4000, override_num_blocks=40).map_batches(lambda b: b).iter_batches(batch_size=10)
    try:
        yield from iterator
    finally:
        closed_while_ray_was_up.append(ray.is_initialized())

def stage():
    stream = batches()
    for number, _ in enumerate(stream):
        if number == 3:
            raise RuntimeError("a batch failed")

try:
    with ray_runtime(RaySpec(address="local", num_cpus=1)):
        stage()
except RuntimeError as held:
    print(json.dumps({"closed": closed_while_ray_was_up, "error": str(held)}))
"""


def test_an_error_mid_iteration_closes_the_iterators_before_ray_shuts_down(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "ADPIPE_RAY_LOG_TO_DRIVER": "0",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    # Without the release the child printed its report and then never exited: its streaming
    # executor's threads kept it alive (the timeout is what fails then).
    done = subprocess.run([sys.executable, "-c", FAILING_MID_ITERATION], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] == "a batch failed"
    # Closed once, while Ray was still up: not later, under an already shut-down Ray (or never).
    assert report["closed"] == [True], report
