"""Run a job spec: open the run record, bring up Ray, run each step in order.

A step whose published output already carries its fingerprint (same kind, same parameters, same
resolved inputs) is skipped, so rerunning a run id redoes only what did not finish. Ray is joined
or started here and nowhere else.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipelines.datasets import fingerprint
from pipelines.errors import AdpipeError, JobFailed
from pipelines.runs import RunRecord, new_run_id
from pipelines.spec import JobSpec, RaySpec, StepSpec, spec_to_data, step_references
from pipelines.stages.registry import STAGE_KINDS, StepContext, StepResult
from pipelines.storage import Location, S3Settings

log = logging.getLogger("adpipe")


@dataclass
class RunOutcome:
    run_id: str
    record_uri: str
    results: dict[str, StepResult] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def storage_root(spec: JobSpec) -> Location:
    return Location.parse(spec.storage.root, S3Settings(spec.storage.endpoint, spec.storage.region))


def step_fingerprint(step: StepSpec, step_outputs: dict[str, str]) -> str:
    references = {name: step_outputs.get(name) for _, name in step_references(step.params)}
    return fingerprint({"kind": step.kind, "params": spec_to_data(step.params), "inputs": references})


def spec_fingerprint(spec: JobSpec) -> str:
    data = spec_to_data(spec)
    data.pop("ray", None)  # where it runs does not change what it produces
    data.pop("schedule", None)
    data.pop("description", None)
    return fingerprint(data)


@contextmanager
def ray_runtime(ray_spec: RaySpec, address_override: str | None = None) -> Iterator[None]:
    """Join the Ray the spec names, or start an embedded one; leave an existing session alone."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address_override or ray_spec.address
    if address.startswith("http"):
        raise AdpipeError(f"ray.address {address!r} is a Ray Jobs API address: use 'adpipe submit'")
    kwargs: dict[str, Any] = {"log_to_driver": os.environ.get("ADPIPE_RAY_LOG_TO_DRIVER", "1") == "1",
                              "configure_logging": False}
    if address == "local":
        # address="local" always starts a new embedded instance; without it ray.init() would join
        # whatever cluster /tmp/ray/ray_current_cluster or $RAY_ADDRESS points at.
        kwargs.update(address="local", num_cpus=ray_spec.num_cpus, num_gpus=ray_spec.num_gpus,
                      include_dashboard=False)
    else:
        kwargs["address"] = address
    ray.init(**kwargs)
    # Our own summaries say what happened; Ray Data's progress bars would interleave with them.
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("ADPIPE_PROGRESS", "0") == "1"
    try:
        yield
    finally:
        ray.shutdown()


def already_published(step: StepSpec, context: StepContext, previous: dict[str, Any]) -> bool:
    if previous.get("state") not in ("succeeded", "skipped") or previous.get("fingerprint") != context.fingerprint:
        return False
    record = STAGE_KINDS[step.kind].published_record(step, context)
    if not record.exists():
        return False
    return record.read_json().get("lineage", {}).get("step_fingerprint") == context.fingerprint


def run_job(spec: JobSpec, run_id: str | None = None, ray_address: str | None = None,
            echo: Any = print) -> RunOutcome:
    """Run every step of `spec`; raise JobFailed (exit 1) or an input/spec error (exit 2)."""
    root = storage_root(spec)
    run_id = run_id or new_run_id(spec.name)
    record = RunRecord.start(root, run_id, spec, spec_fingerprint(spec))
    outcome = RunOutcome(run_id=run_id, record_uri=record.folder.uri)
    echo(f"run {run_id}: {spec.kind} {spec.name!r}, record at {record.folder.uri}")
    step_outputs: dict[str, str] = {}
    current = None
    started = time.monotonic()
    try:
        with ray_runtime(spec.ray, ray_address):
            for step in spec.steps:
                current = step.name
                previous = dict(record.step_state(step.name))
                context = StepContext(run_id=run_id, step=step, root=root,
                                      fingerprint=step_fingerprint(step, step_outputs),
                                      step_outputs=step_outputs, record=record)
                started = time.monotonic()
                if already_published(step, context, previous):
                    result = StepResult(output=previous.get("output"), rows=previous.get("rows"),
                                        rejected=previous.get("rejected", 0), details=previous.get("details", {}),
                                        summary=tuple(previous.get("summary", ())))
                    record.step_finished(step.name, time.monotonic() - started, context.fingerprint,
                                         result.to_status(), skipped=True)
                    outcome.skipped.append(step.name)
                    echo(f"[{step.name}] already done in an earlier attempt of this run: skipped")
                else:
                    echo(f"[{step.name}] {step.kind} ...")
                    record.step_started(step.name)
                    result = STAGE_KINDS[step.kind].run(step, context)
                    seconds = time.monotonic() - started
                    record.step_finished(step.name, seconds, context.fingerprint, result.to_status())
                    echo(f"[{step.name}] done in {seconds:.1f} s")
                for line in result.summary:
                    echo(f"  {line}")
                outcome.results[step.name] = result
                if result.output:
                    step_outputs[step.name] = result.output
    except AdpipeError as error:
        if current is not None:
            record.step_failed(current, time.monotonic() - started, str(error))
        record.finish(error=str(error))
        raise
    except Exception as error:  # a bug or an infrastructure failure: keep the traceback in the record
        first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        message = f"{type(error).__name__}: {first_line}"
        if current is not None:
            record.step_failed(current, time.monotonic() - started, message)
        record.finish(error=message, detail=traceback.format_exc())
        where = f"in step {current!r}" if current else "before its first step"
        raise JobFailed(f"run {run_id} failed {where}: {message} "
                        f"(traceback in {record.folder.join('error.txt').uri})") from error
    record.finish()
    echo(f"run {run_id} succeeded")
    return outcome
