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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipelines.datasets import fingerprint
from pipelines.errors import AdpipeError, JobFailed, RunInterrupted
from pipelines.runs import RunRecord, new_run_id
from pipelines.spec import JobSpec, StepSpec, spec_to_data
from pipelines.spec_fields import RaySpec, step_references
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
    data.pop("description", None)
    return fingerprint(data)


@contextmanager
def ray_runtime(ray_spec: RaySpec, address_override: str | None = None, *,
                log_to_driver: bool | None = None) -> Iterator[None]:
    """Join the Ray the spec names, or start an embedded one; leave an existing session alone.

    An embedded Ray (`address: local`) listens on loopback only. Ray binds the servers of a node
    (GCS, raylet, the core worker of the driver and of every worker, dashboard and runtime-env
    agents, metrics exporters) to 127.0.0.1 only when the node's IP is loopback; otherwise to all
    interfaces or to the node's outward IP. `_node_ip_address="127.0.0.1"` alone is not enough on
    Linux: Ray 2.60 swaps a loopback node address for the outward one
    (`ray._private.services.resolve_ip_for_localhost` -> `get_node_ip_address`) unless
    `ray_constants.ENABLE_RAY_CLUSTER` is false, as it is by default on macOS and Windows (from
    $RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read when ray is imported, which it already is here). It is
    made false while the node starts (its processes get the address on their command lines), and
    the outcome is checked. Cluster runs keep Ray's defaults, token authentication included.
    `log_to_driver` defaults to $ADPIPE_RAY_LOG_TO_DRIVER (1).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address_override or ray_spec.address
    if address.startswith("http"):
        raise AdpipeError(f"ray.address {address!r} is a Ray Jobs API address: use 'adpipe submit'")
    if log_to_driver is None:
        log_to_driver = os.environ.get("ADPIPE_RAY_LOG_TO_DRIVER", "1") == "1"
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, "configure_logging": False}
    if address == "local":
        from ray._private import ray_constants

        # address="local" always starts a new embedded instance; without it ray.init() would join
        # whatever cluster /tmp/ray/ray_current_cluster or $RAY_ADDRESS points at.
        loopback = "127.0.0.1"
        kwargs.update(address="local", num_cpus=ray_spec.num_cpus, num_gpus=ray_spec.num_gpus,
                      include_dashboard=False, _node_ip_address=loopback)
        cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(**kwargs)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        node_ip = ray.util.get_node_ip_address()
        if node_ip != loopback:
            ray.shutdown()
            raise RuntimeError(f"the embedded Ray came up on {node_ip}, not on {loopback}: this Ray "
                               "version resolves node addresses differently (see ray_runtime)")
    else:
        kwargs["address"] = address
        ray.init(**kwargs)
    # Our own summaries say what happened; Ray Data's progress bars would interleave with them.
    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = os.environ.get("ADPIPE_PROGRESS", "0") == "1"
    # A failing UDF's own exception, not Ray Data's UserCodeException: the wrapper crosses the
    # process boundary without its __cause__, and the cause (e.g. a StorageError) is what to report.
    data_context.raise_original_map_exception = True
    try:
        yield
    except BaseException as raised:
        release_frames(raised)
        raise
    finally:
        ray.shutdown()


def release_frames(error: BaseException) -> None:
    """Drop the local variables of the finished frames that `error` (and the errors chained to it)
    passed through, then collect, so what they held is released now.

    An error raised mid-iteration (SIGTERM during a stage, a failing batch) keeps the stage's
    frames alive through its traceback, and with them the Ray Data iterators and their streaming
    executors' threads. Released before `ray.shutdown()`, the iterators close their executors while
    Ray is still up; left alone, shutdown ran under live executors, which once held a terminated run
    for over a minute on a loaded 2-core machine. The traceback still formats (file, line, code);
    only the frames' locals are gone. Executing frames (the caller's) are left as they are."""
    import gc

    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]
    gc.collect()


def already_published(step: StepSpec, context: StepContext, previous: dict[str, Any]) -> bool:
    if previous.get("state") not in ("succeeded", "skipped") or previous.get("fingerprint") != context.fingerprint:
        return False
    record = STAGE_KINDS[step.kind].published_record(step, context)
    if record is None or not record.exists():
        return False
    return record.read_json().get("lineage", {}).get("step_fingerprint") == context.fingerprint


def raise_on_sigterm() -> None:
    """Turn SIGTERM into RunInterrupted, so a terminated run records that it failed and why.
    (Main thread only; the CLI asks for it through `run_job(handle_sigterm=True)`.)"""
    import signal

    def handler(signum: int, _frame: Any) -> None:
        raise RunInterrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)


def root_cause(error: BaseException) -> BaseException:
    """The error that started it all: Ray wraps a task's exception (RayTaskError, UserCodeException,
    Ray Data's own wrappers); the innermost cause is what the user needs to see (e.g. the decode
    task's read error), and an AdpipeError there keeps its exit code."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "cause", None)
        if not isinstance(inner, BaseException):
            inner = error.__cause__
        module = type(error).__module__ or ""
        if inner is None or not (module.startswith("ray") or isinstance(inner, AdpipeError)):
            break
        error = inner
    return error


def _record_failure(record: RunRecord, step: str | None, seconds: float, message: str,
                    detail: str | None) -> str:
    """Write the failure into the run record and release the lease. If the store itself is what
    failed, the record cannot be written: the traceback goes to a local file instead, and the
    first error (not this later one) is what the user sees. Returns where the traceback is."""
    where = record.folder.join("error.txt").uri
    try:
        if step is not None:
            record.step_failed(step, seconds, message)
        record.finish(error=message, detail=detail)
    except AdpipeError as unwritable:
        import tempfile

        fallback = os.path.join(tempfile.gettempdir(), f"adpipe-{record.run_id}-error.txt")
        with open(fallback, "w") as out:
            out.write(f"{message}\n\n{detail or ''}\nthe run record could not be written: {unwritable}\n")
        where = fallback
        log.warning("could not record the failure of run %s: %s", record.run_id, unwritable)
    return where


def run_job(spec: JobSpec, run_id: str | None = None, ray_address: str | None = None,
            echo: Any = print, handle_sigterm: bool = False) -> RunOutcome:
    """Run every step of `spec`; raise JobFailed (exit 1) or an input/spec error (exit 2).

    Any error ends the run as "failed" in its record, with the first error's message (the root
    cause of a Ray task's failure, not a later error while recording it)."""
    root = storage_root(spec)
    run_id = run_id or new_run_id(spec.name)
    record = RunRecord.start(root, run_id, spec, spec_fingerprint(spec))
    outcome = RunOutcome(run_id=run_id, record_uri=record.folder.uri)
    echo(f"run {run_id}: {spec.kind} {spec.name!r}, record at {record.folder.uri}")
    step_outputs: dict[str, str] = {}
    current = None
    started = time.monotonic()
    try:
        # Ray is started (or joined) for the first step that has work to do: a rerun whose steps
        # are all published already finishes without it.
        with ExitStack() as ray_scope:
            if handle_sigterm:
                raise_on_sigterm()
            ray_started = False
            for step in spec.steps:
                current = step.name
                record.check_lease()
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
                    if not ray_started:
                        ray_scope.enter_context(ray_runtime(spec.ray, ray_address))
                        ray_started = True
                        record.event("ray ready", address=ray_address or spec.ray.address)
                        if handle_sigterm:  # again: ray.init installs a SIGTERM handler of its own that aborts
                            raise_on_sigterm()
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
    except BaseException as raised:
        error = root_cause(raised)
        if isinstance(error, AdpipeError):
            message, detail = str(error), None
        elif isinstance(error, (KeyboardInterrupt, RunInterrupted)):
            signal_name = error.signal_name if isinstance(error, RunInterrupted) else "SIGINT"
            message, detail = f"interrupted ({signal_name})", None
        else:  # a bug or an infrastructure failure: keep the traceback in the record
            first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
            message, detail = f"{type(error).__name__}: {first_line}", traceback.format_exc()
        kept = _record_failure(record, current, time.monotonic() - started, message, detail)
        if isinstance(error, AdpipeError):
            raise error from (raised if error is not raised else None)
        if not isinstance(error, Exception):
            raise
        where = f"in step {current!r}" if current else "before its first step"
        raise JobFailed(f"run {run_id} failed {where}: {message} (traceback in {kept})") from raised
    record.finish()
    echo(f"run {run_id} succeeded")
    return outcome
