"""What the embedded stack exposes: Ray's sockets (loopback only) and task arguments (no secrets)."""

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import storage
from pipelines.errors import StorageError
from pipelines.objectstore import free_port
from pipelines.storage import Location

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:  # gRPC's [::ffff:127.0.0.1]
        address = address.ipv4_mapped
    return address.is_loopback


def listening_sockets(processes) -> list[dict]:
    """TCP sockets in LISTEN and bound, unconnected UDP sockets of `processes` (psutil.Process)."""
    import psutil
    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path

    found = []
    for process in processes:
        try:
            name, connections = process.name(), process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for conn in connections:
            tcp = conn.type == socket.SOCK_STREAM
            if (conn.status == psutil.CONN_LISTEN) if tcp else (not conn.raddr and conn.laddr and conn.laddr.port):
                found.append({"pid": process.pid, "name": name, "proto": "tcp" if tcp else "udp",
                              "ip": conn.laddr.ip, "port": conn.laddr.port})
    return found


def exposed(sockets: list[dict]) -> list[str]:
    return [f"{s['proto']} {s['ip']}:{s['port']} ({s['name']}, pid {s['pid']})"
            for s in sockets if not is_loopback(s["ip"])]


# Runs in a child process: ray_runtime's embedded Ray (what `adpipe run` with `ray.address: local`
# starts), with a task and an actor so that workers are up, then its process tree's sockets,
# sampled for a while (agents and metrics servers come up after ray.init returns).
EMBEDDED_RUN = """
import json, os, sys, time
import ray, psutil
from pipelines.orchestrator import ray_runtime
from pipelines.spec_fields import RaySpec
from test_network import listening_sockets

@ray.remote
def task_pid():
    return os.getpid()

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

with ray_runtime(RaySpec(address="local", num_cpus=1)):
    actor = Actor.remote()
    workers = {ray.get(actor.pid.remote()), *ray.get([task_pid.remote() for _ in range(4)])}
    me = psutil.Process()
    sockets = {}
    for _ in range(12):
        for s in listening_sockets([me, *me.children(recursive=True)]):
            sockets[(s["proto"], s["ip"], s["port"], s["pid"])] = s
        time.sleep(1)
    print(json.dumps({"driver": os.getpid(), "workers": sorted(workers), "sockets": list(sockets.values())}))
"""


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    env = {**os.environ, "ADPIPE_RAY_LOG_TO_DRIVER": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           # The autoscaler's and the dashboard's metrics servers take fixed default ports; another
           # Ray on this machine (the session's) may hold them. Free ones make sure they are seen.
           "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", EMBEDDED_RUN], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    sockets = report["sockets"]
    listeners = {s["name"] for s in sockets}
    # Not vacuous: the GCS, the raylet, the driver's and the workers' core workers were all seen.
    assert {"gcs_server", "raylet"} <= listeners, sockets
    assert any(s["pid"] == report["driver"] for s in sockets), sockets
    assert any(s["pid"] in report["workers"] for s in sockets), sockets
    assert any(s["port"] == int(env["AUTOSCALER_METRIC_PORT"]) for s in sockets), sockets
    assert exposed(sockets) == []


def test_the_session_ray_listens_on_loopback_only(ray_session):
    import psutil

    ray = ray_session
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    driver = psutil.Process()
    ray_roots = [p for p in driver.children() if session_dir in " ".join(p.cmdline())]
    assert ray_roots, "no Ray process of this session found"
    processes = [p for root in ray_roots for p in [root, *root.children(recursive=True)]]
    sockets = listening_sockets([driver, *processes])
    assert {"gcs_server", "raylet"} <= {s["name"] for s in sockets}, sockets
    assert exposed(sockets) == []


# ---- no S3 secrets in pickled locations ---------------------------------------------------------


def test_a_pickled_location_carries_no_secret_and_still_reads(s3_store, s3_root):
    import ray.cloudpickle

    location = Location.parse(s3_root).join("pickled.json")
    location.write_json({"ok": 1})
    # pickle, and cloudpickle with protocol 5 as Ray serializes task arguments and objects
    for data in (pickle.dumps(location), ray.cloudpickle.dumps(location, protocol=5)):
        leaked = s3_store.secret_key.encode() in data  # (not in the assertion: a report would show it)
        assert not leaked, "the S3 secret key is in the pickled Location"
    storage._FILESYSTEMS.clear()  # as in a fresh process: nothing built yet
    copy = pickle.loads(data)
    assert copy == location and copy.settings == location.settings and copy.fs is not location.fs
    assert copy.read_json() == {"ok": 1}
    assert pickle.loads(pickle.dumps(Location.parse("file:///tmp/x"))).uri == "file:///tmp/x"


def test_a_ray_task_reads_a_location_with_its_own_environment(ray_session, s3_store, s3_root):
    ray = ray_session

    def read_in_worker(location: Location) -> tuple[str, object]:  # local: pickled by value
        try:
            return "read", location.read_bytes()
        except StorageError as error:
            return "error", str(error)

    location = Location.parse(s3_root).join("task.bin")
    location.write_bytes(b"payload")
    task = ray.remote(read_in_worker)
    assert ray.get(task.remote(location)) == ("read", b"payload")
    # The worker's identity is its own, not the driver's: a worker with another secret is refused.
    other = task.options(runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": "not-the-secret-456"}})
    outcome, message = ray.get(other.remote(location))
    assert outcome == "error" and ("secret key does not match" in message or "access denied" in message)
    leaked = "not-the-secret-456" in message or s3_store.secret_key in message
    assert not leaked, "a secret is in the error message"
