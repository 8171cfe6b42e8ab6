"""`adpipe submit` / `status` / `logs` against a real Ray head started by the test (Ray Jobs API)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imagefiles import png, write
from pipelines.objectstore import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_head(s3_store, tmp_path_factory):
    """`ray start --head --block` on free ports, in a process group of its own so the test can stop
    exactly this cluster (`ray stop` would stop every Ray on the machine). Token authentication is
    turned off for this loopback-only test cluster (see README, troubleshooting)."""
    ports: set[int] = set()
    while len(ports) < 7:  # distinct: two calls of free_port() may return the same port
        ports.add(free_port())
    gcs_port, dashboard_port, *other_ports = sorted(ports)
    # Every port Ray would otherwise take from a fixed default goes on a free port: the test
    # session's embedded Ray already holds the dashboard agent's default 52365, and a head whose
    # agent cannot bind never registers it ("No available agent to submit job", seen in CI).
    fixed_defaults = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                      "runtime-env-agent-port", "ray-client-server-port")
    port_flags = [f"--{flag}={port}" for flag, port in zip(fixed_defaults, other_ports, strict=True)]
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "ADPIPE_RAY_LOG_TO_DRIVER": "1"}
    log = open(tmp_path_factory.mktemp("rayhead") / "head.log", "w")
    head = subprocess.Popen(
        [f"{venv_bin}/ray", "start", "--head", "--block", f"--port={gcs_port}",
         f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
         "--disable-usage-stats", "--include-dashboard=true", *port_flags],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception as error:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                raise RuntimeError(f"Ray head did not start; see {log.name}") from error
            time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)  # `ray start --block` outlives SIGTERM for long; no need to wait for it
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    os.environ.pop("RAY_AUTH_MODE", None)


def adpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def test_submit_status_logs_on_a_real_cluster(ray_head, s3_root, tmp_path):
    images = tmp_path / "images"
    for i in range(4):
        write(images / f"{i}.png", png(seed=i))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "pipeline", "name": "submitted", "storage": {"root": s3_root},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "folder", "uri": str(images)},
             "outputs": {"dataset": "imgs"}},
            {"name": "describe", "kind": "describe", "inputs": {"dataset": "step:ingest"}},
        ],
    }))
    submitted = adpipe("submit", str(spec), "--address", ray_head, "--run-id", "submitted-1")
    assert submitted.returncode == 0, submitted.stderr
    assert "submitted run submitted-1" in submitted.stdout

    from pipelines.submit import wait_for

    assert wait_for(ray_head, "submitted-1", timeout_s=240) == "SUCCEEDED", adpipe(
        "logs", "submitted-1", "--address", ray_head).stdout

    cluster_status = adpipe("status", "submitted-1", "--address", ray_head)
    assert cluster_status.returncode == 0 and "succeeded" in cluster_status.stdout
    record_status = adpipe("status", "submitted-1", "--root", s3_root)
    assert record_status.returncode == 0, record_status.stderr
    assert "succeeded" in record_status.stdout and "rows=4" in record_status.stdout
    logs = adpipe("logs", "submitted-1", "--address", ray_head)
    assert "run submitted-1 succeeded" in logs.stdout and "ingested 4 images" in logs.stdout

    # resubmitting the same run id resumes it: both steps are found done
    again = adpipe("submit", str(spec), "--address", ray_head, "--run-id", "submitted-1", "--wait")
    assert again.returncode == 0, again.stderr + again.stdout
    assert again.stdout.count("skipped") == 2


def test_submit_to_nowhere_is_a_clear_error(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"kind": "ingest", "name": "x", "storage": {"root": str(tmp_path)},
                                    "source": {"type": "elpv"}, "outputs": {"dataset": "x"}}))
    result = adpipe("submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "cannot reach the Ray Jobs API" in result.stderr
    assert "Traceback" not in result.stderr
