"""Run records under `runs/<run_id>/` in storage: the resolved spec, status and events.

`status.json` holds the run's state and, per step, its state, timings, output, row counts and
error; `events.jsonl` is the run's log. Both are rewritten whole on each update (S3 objects cannot
be appended to; both stay small) through atomic writes, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

from pipelines.errors import InputError, SpecError
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


class RunRecord:
    """The record of one run; every change is written through to storage at once."""

    def __init__(self, folder: Location, status: dict[str, Any], events: list[dict[str, Any]]):
        self.folder = folder
        self.status = status
        self.events = events

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
            events = load_events(folder)
            status.update(state="running", attempt=status.get("attempt", 1) + 1, finished_at=None, error=None)
            record = cls(folder, status, events)
            record.event("run resumed", attempt=status["attempt"])
            return record
        status = {
            "run_id": run_id, "name": spec.name, "kind": spec.kind, "state": "running", "attempt": 1,
            "spec_fingerprint": spec_fingerprint, "started_at": now(), "finished_at": None, "error": None,
            "steps": {s.name: {"kind": s.kind, "state": "pending"} for s in spec.steps},
        }
        folder.join("spec.yaml").write_bytes(dump_spec(spec).encode())
        record = cls(folder, status, [])
        record.event("run started", spec=spec.name, kind=spec.kind)
        return record

    @classmethod
    def load(cls, root: Location, run_id: str) -> RunRecord:
        folder = runs_folder(root).join(check_run_id(run_id))
        status_location = folder.join("status.json")
        if not status_location.exists():
            raise InputError(f"no run {run_id!r} under {runs_folder(root).describe()}")
        return cls(folder, status_location.read_json(), load_events(folder))

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

    def finish(self, error: str | None = None, detail: str | None = None) -> None:
        self.status.update(state="failed" if error else "succeeded", finished_at=now(), error=error)
        if detail:
            self.folder.join("error.txt").write_bytes(detail.encode())
        self._save()
        self.event("run failed" if error else "run succeeded", **({"error": error} if error else {}))


def load_events(folder: Location) -> list[dict[str, Any]]:
    location = folder.join("events.jsonl")
    if not location.exists():
        return []
    return [json.loads(line) for line in location.read_bytes().decode().splitlines() if line.strip()]


def list_runs(root: Location) -> list[dict[str, Any]]:
    """Status of every run under the root, newest first."""
    statuses = []
    for folder in runs_folder(root).list_dirs():
        status_location = folder.join("status.json")
        if status_location.exists():
            statuses.append(status_location.read_json())
    return sorted(statuses, key=lambda s: s.get("started_at") or "", reverse=True)
