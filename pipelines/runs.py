"""Run records under `runs/<run_id>/` in storage: the resolved spec, status and events.

`status.json` holds the run's state and, per step, its state, timings, output, row counts and
error; `events.jsonl` is the run's log. Both are rewritten whole on each update (S3 objects cannot
be appended to; both stay small) through atomic writes, so a reader never sees half a file.

A running run holds a lease, `lease.json`: its owner (host, pid, process start time, a random
token) and an expiry that a heartbeat thread pushes forward every `LEASE_SECONDS / 4`. A second
`adpipe run` of the same run id refuses while the lease is live (`RunInUse`); a run whose lease
expired, or whose owner process is gone from this host, is shown as "abandoned" by `status` and
`list`, and its rerun takes it over. (A run killed by SIGKILL, or whose driver lost the store,
cannot say so itself: the lease is what tells.)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from typing import Any

from pipelines.errors import AdpipeError, InputError, SpecError
from pipelines.spec import JobSpec, dump_spec
from pipelines.storage import Location

RUN_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_run_id(job_name: str) -> str:
    return f"{job_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id):
        raise SpecError("run-id", f"{run_id!r} is not a valid run id (a-z, 0-9, '.', '_', '-'; at most 128)")
    return run_id


def runs_folder(root: Location) -> Location:
    return root.join("runs")


# ---- ownership: who runs a run id now ---------------------------------------------------------

LEASE_NAME = "lease.json"


def lease_seconds() -> float:
    """How long a lease lives without a heartbeat ($ADPIPE_LEASE_SECONDS, default 60)."""
    return float(os.environ.get("ADPIPE_LEASE_SECONDS", "60"))


class RunInUse(AdpipeError):
    """Another live process holds the run's lease: the run was not started (exit 75, try later)."""

    exit_code = 75  # EX_TEMPFAIL: nothing is wrong with the spec; the same command works later


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid())}


def owner_is_gone(owner: dict[str, Any]) -> bool:
    """True only when the owner was on this host and its process no longer exists (or the pid now
    belongs to another process); an owner on another host is judged by the lease's expiry alone."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    started = _process_start(owner["pid"])
    if started is None:
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return owner.get("process_start") is not None and started != owner["process_start"]


def lease_is_live(lease: dict[str, Any] | None, now_s: float | None = None) -> bool:
    if not lease:
        return False
    now_s = time.time() if now_s is None else now_s
    return float(lease.get("expires_at", 0)) > now_s and not owner_is_gone(lease.get("owner", {}))


def read_lease(folder: Location) -> dict[str, Any] | None:
    location = folder.join(LEASE_NAME)
    if not location.exists():
        return None
    try:
        return location.read_json()
    except InputError:  # a torn or foreign file: no valid lease
        return None


def effective_state(status: dict[str, Any], lease: dict[str, Any] | None) -> str:
    """What a reader should believe: a "running" run without a live lease is abandoned."""
    if status.get("state") == "running" and not lease_is_live(lease):
        return "abandoned"
    return status.get("state", "unknown")


class Lease:
    """This process's hold on a run id, renewed by a daemon thread until released."""

    # After writing its lease, a claimant waits this long and reads it back: of two processes
    # that claimed the same free run id at once, only the one whose write landed last proceeds
    # (object stores have no compare-and-swap that pyarrow can use).
    SETTLE_SECONDS = 0.5

    def __init__(self, folder: Location):
        self.folder = folder
        self.location = folder.join(LEASE_NAME)
        self.owner = {**this_process(), "token": secrets.token_hex(8)}
        self.lost = False
        self.run_id: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def owner_record(self) -> dict[str, Any]:
        """The owner as the run's status shows it (without the token)."""
        return {k: v for k, v in self.owner.items() if k != "token"}

    def _write(self) -> None:
        now_s = time.time()
        self.location.write_json({"owner": self.owner, "run_id": self.run_id, "renewed_at": now_s,
                                  "expires_at": now_s + lease_seconds()})

    def acquire(self, run_id: str, what: str | None = None) -> dict[str, Any] | None:
        """Take the lease, or raise RunInUse. Returns the previous, dead lease if one was taken over.
        `what` names the thing held in the refusal (default: the run)."""
        self.run_id = run_id
        previous = read_lease(self.folder)
        if previous is not None and lease_is_live(previous):
            raise RunInUse(self._busy_message(run_id, previous, what))
        self._write()
        time.sleep(self.SETTLE_SECONDS)
        current = read_lease(self.folder)
        if not current or current.get("owner", {}).get("token") != self.owner["token"]:
            raise RunInUse(self._busy_message(run_id, current or {}, what))
        self._thread = threading.Thread(target=self._heartbeat, name=f"adpipe-lease-{run_id}", daemon=True)
        self._thread.start()
        return previous

    @staticmethod
    def _busy_message(run_id: str, lease: dict[str, Any], what: str | None = None) -> str:
        owner = lease.get("owner", {})
        left = max(0.0, float(lease.get("expires_at", 0)) - time.time())
        if what is not None:
            return (f"{what} is held by pid {owner.get('pid')} on {owner.get('host')} (run "
                    f"{lease.get('run_id', '?')!r}; its lease would expire in {left:.0f} s): wait for it to end")
        return (f"run {run_id!r} is being run by pid {owner.get('pid')} on {owner.get('host')} (its lease, "
                f"renewed while it runs, would expire in {left:.0f} s): wait for it to end, or use another run id")

    def _heartbeat(self) -> None:
        while not self._stop.wait(lease_seconds() / 4):
            try:
                current = read_lease(self.folder)
                if current and current.get("owner", {}).get("token") != self.owner["token"]:
                    self.lost = True  # taken over after ours expired (this process stalled)
                    return
                self._write()
            except AdpipeError:
                continue  # the store is unreachable: try again; the lease expires if this lasts

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost:
            self.location.delete()


def refuse_if_held(folder: Location, run_id: str, what: str) -> None:
    """Raise RunInUse if another run holds a live lease on `folder` now: a quick refusal before
    anything starts (the holder's own `Lease.acquire` is still what guarantees exclusion)."""
    lease = read_lease(folder)
    if lease is not None and lease_is_live(lease) and lease.get("run_id") != run_id:
        raise RunInUse(Lease._busy_message(run_id, lease, what))


class RunRecord:
    """The record of one run; every change is written through to storage at once."""

    def __init__(self, folder: Location, status: dict[str, Any], events: list[dict[str, Any]],
                 lease: Lease | None = None):
        self.folder = folder
        self.status = status
        self.events = events
        self.lease = lease  # held while this process runs the run; None for a record only read

    @property
    def run_id(self) -> str:
        return self.status["run_id"]

    @classmethod
    def start(cls, root: Location, run_id: str, spec: JobSpec, spec_fingerprint: str) -> RunRecord:
        """Open a new run, or resume one: the same run id must come with the same spec."""
        folder = runs_folder(root).join(check_run_id(run_id))
        previous = folder.join("status.json")
        if previous.exists():
            status = previous.read_json()
            if status.get("spec_fingerprint") != spec_fingerprint:
                raise SpecError("run-id", f"run {run_id!r} exists with a different spec; "
                                          "rerun it with its own spec, or start a new run")
        lease = Lease(folder)
        dead = lease.acquire(run_id)
        try:
            if previous.exists():
                status = previous.read_json()
                was = effective_state(status, None)
                events = load_events(folder)
                status.update(state="running", attempt=status.get("attempt", 1) + 1, finished_at=None, error=None,
                              owner=lease.owner_record())
                record = cls(folder, status, events, lease)
                if was == "abandoned":
                    record.event("run taken over: its previous attempt ended without a word (killed, or its "
                                 "driver lost the store)", previous_owner=(dead or {}).get("owner"))
                record.event("run resumed", attempt=status["attempt"])
                return record
            status = {
                "run_id": run_id, "name": spec.name, "kind": spec.kind, "state": "running", "attempt": 1,
                "spec_fingerprint": spec_fingerprint, "started_at": now(), "finished_at": None, "error": None,
                "owner": lease.owner_record(),
                "steps": {s.name: {"kind": s.kind, "state": "pending"} for s in spec.steps},
            }
            folder.join("spec.yaml").write_bytes(dump_spec(spec).encode())
            record = cls(folder, status, [], lease)
            record.event("run started", spec=spec.name, kind=spec.kind)
            return record
        except BaseException:
            lease.release()
            raise

    @classmethod
    def load(cls, root: Location, run_id: str) -> RunRecord:
        folder = runs_folder(root).join(check_run_id(run_id))
        status_location = folder.join("status.json")
        if not status_location.exists():
            raise InputError(f"no run {run_id!r} under {runs_folder(root).describe()}")
        status = status_location.read_json()
        lease = read_lease(folder) if status.get("state") == "running" else None
        return cls(folder, {**status, "effective_state": effective_state(status, lease)}, load_events(folder))

    # ---- updates ------------------------------------------------------------------------------

    def _save(self) -> None:
        self.folder.join("status.json").write_json(self.status)

    def event(self, message: str, step: str | None = None, **fields: Any) -> None:
        entry = {"time": now(), "message": message, **({"step": step} if step else {}), **fields}
        self.events.append(entry)
        data = "".join(json.dumps(e, default=str, sort_keys=True) + "\n" for e in self.events)
        self.folder.join("events.jsonl").write_bytes(data.encode())

    def step_state(self, step: str) -> dict[str, Any]:
        return self.status["steps"][step]

    def step_started(self, step: str) -> None:
        self.status["steps"][step] = {**self.step_state(step), "state": "running", "started_at": now(),
                                      "finished_at": None, "error": None}
        self._save()
        self.event("step started", step=step)

    def step_finished(self, step: str, seconds: float, fingerprint: str, result: dict[str, Any],
                      skipped: bool = False) -> None:
        self.status["steps"][step] = {
            **self.step_state(step), "state": "skipped" if skipped else "succeeded",
            "finished_at": now(), "seconds": round(seconds, 3), "fingerprint": fingerprint, **result,
        }
        self._save()
        self.event("step skipped: its output is already published" if skipped else "step succeeded",
                   step=step, seconds=round(seconds, 3), output=result.get("output"), rows=result.get("rows"))

    def step_failed(self, step: str, seconds: float, error: str) -> None:
        self.status["steps"][step] = {**self.step_state(step), "state": "failed", "finished_at": now(),
                                      "seconds": round(seconds, 3), "error": error}
        self._save()
        self.event("step failed", step=step, error=error)

    def check_lease(self) -> None:
        """Raise if another process took the run over (this one stalled past its lease)."""
        if self.lease is not None and self.lease.lost:
            raise RunInUse(f"run {self.run_id!r} was taken over by another process while this one stalled "
                           "past its lease; this process stops")

    def finish(self, error: str | None = None, detail: str | None = None) -> None:
        """Record the end and release the lease (also when the record cannot be written)."""
        try:
            self.status.update(state="failed" if error else "succeeded", finished_at=now(), error=error)
            if detail:
                self.folder.join("error.txt").write_bytes(detail.encode())
            self._save()
            self.event("run failed" if error else "run succeeded", **({"error": error} if error else {}))
        finally:
            if self.lease is not None:
                self.lease.release()


def load_events(folder: Location) -> list[dict[str, Any]]:
    location = folder.join("events.jsonl")
    if not location.exists():
        return []
    return [json.loads(line) for line in location.read_bytes().decode().splitlines() if line.strip()]


def list_runs(root: Location) -> list[dict[str, Any]]:
    """Status of every run under the root, newest first, each with its `effective_state`."""
    statuses = []
    for folder in runs_folder(root).list_dirs():
        status_location = folder.join("status.json")
        if status_location.exists():
            status = status_location.read_json()
            lease = read_lease(folder) if status.get("state") == "running" else None
            statuses.append({**status, "effective_state": effective_state(status, lease)})
    return sorted(statuses, key=lambda s: s.get("started_at") or "", reverse=True)
