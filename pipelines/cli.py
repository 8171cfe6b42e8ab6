"""The `adpipe` command line. Exit codes: 0 ok, 1 job failed, 2 bad spec or input, 3 the job
succeeded but raised alerts (nightly drift or error limits), 75 the run (or archive) is busy."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from pipelines.errors import AdpipeError, InputError, RunInterrupted
from pipelines.storage import Location

ROOT_ENV = "ADPIPE_STORAGE_ROOT"
ALERTS_EXIT = 3


def _root(args: argparse.Namespace) -> Location:
    from pipelines.orchestrator import storage_root
    from pipelines.spec import load_spec
    from pipelines.spec_fields import normalize_uri

    if args.root:
        return Location.parse(normalize_uri(args.root, "--root"))
    if args.spec:
        return storage_root(load_spec(args.spec))
    if os.environ.get(ROOT_ENV):
        return Location.parse(normalize_uri(os.environ[ROOT_ENV], ROOT_ENV))
    raise InputError(f"where are the runs? give --root URI or --spec SPEC, or set {ROOT_ENV}")


def cmd_validate(args: argparse.Namespace) -> int:
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    steps = ", ".join(f"{s.name} ({s.kind})" for s in spec.steps)
    print(f"{args.spec}: valid {spec.kind} job {spec.name!r}; steps: {steps}; storage: {spec.storage.root}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.orchestrator import run_job
    from pipelines.runs import check_run_id
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    if args.run_id is not None:  # `--run-id ''` is a mistake to refuse, not "no run id"
        check_run_id(args.run_id)
    address = args.ray_address or spec.ray.address
    if address.startswith("http"):
        return _submit(spec, address, args.run_id, wait=True)
    outcome = run_job(spec, run_id=args.run_id, ray_address=args.ray_address, handle_sigterm=True)
    return _alerts_exit(outcome)


def _alerts_exit(outcome) -> int:
    alerts = [alert for result in outcome.results.values() for alert in result.details.get("alerts") or ()]
    if alerts:
        print(f"adpipe: {len(alerts)} alert(s) in run {outcome.run_id} (exit {ALERTS_EXIT}):", file=sys.stderr)
        for alert in alerts:
            print(f"  {alert}", file=sys.stderr)
        return ALERTS_EXIT
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    """One night of a `kind: nightly` spec: the night from --date or the spec's schedule, and a run
    id that is the same for every attempt of that night with that spec (reruns resume it)."""
    import dataclasses

    from pipelines.errors import SpecError
    from pipelines.orchestrator import run_job, spec_fingerprint
    from pipelines.params.nightly import parse_date
    from pipelines.runs import check_run_id
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    if spec.kind != "nightly":
        raise SpecError("kind", f"{args.spec} is a {spec.kind!r} job; 'adpipe nightly' runs kind: nightly specs")
    [step] = spec.steps
    night = parse_date(args.date, "--date") if args.date else step.params.night_date()
    step = dataclasses.replace(step, params=dataclasses.replace(step.params, night=night.isoformat()))
    spec = dataclasses.replace(spec, steps=(step,))
    run_id = args.run_id or f"{spec.name}-{night.isoformat()}-{spec_fingerprint(spec)[:8]}"
    check_run_id(run_id)
    # Another night of the archive running: refuse now, not after starting Ray (the stage's own
    # lease on the archive is what excludes; this only answers sooner).
    from pipelines.orchestrator import storage_root
    from pipelines.runs import refuse_if_held
    from pipelines.stages.nightly import archive_lease

    folder, what = archive_lease(storage_root(spec), step.params)
    refuse_if_held(folder, run_id, what)
    outcome = run_job(spec, run_id=run_id, ray_address=args.ray_address, handle_sigterm=True)
    return _alerts_exit(outcome)


def cmd_query(args: argparse.Namespace) -> int:
    """SQL (DuckDB) over the nightly scores table of a spec, exposed as the view `scores`."""
    from pipelines.orchestrator import storage_root
    from pipelines.spec import load_spec
    from pipelines.stages import scores_table

    spec = load_spec(args.spec)
    if spec.kind != "nightly":
        raise InputError(f"{args.spec} is a {spec.kind!r} job; 'adpipe query' reads a nightly job's table")
    params = spec.steps[0].params
    result = scores_table.query(params.table, scores_table.catalog_properties(params.table.catalog,
                                                                              storage_root(spec)), args.sql)
    print(result.to_pandas().to_string(index=False) if args.format == "table" else result.to_pandas().to_csv(
        index=False), end="" if args.format == "csv" else "\n")
    return 0


def _submit(spec, address: str, run_id: str | None, wait: bool) -> int:
    from pipelines.submit import job_logs, submit_spec, wait_for

    run_id = submit_spec(spec, address, run_id)
    print(f"submitted run {run_id} to {address}")
    print(f"follow it with: adpipe status {run_id} --address {address}    adpipe logs {run_id} --address {address}")
    if not wait:
        return 0
    state = wait_for(address, run_id)
    print(job_logs(address, run_id), end="")
    print(f"run {run_id}: Ray job {state.lower()}")
    return 0 if state == "SUCCEEDED" else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.runs import check_run_id
    from pipelines.spec import load_spec

    spec = load_spec(args.spec)
    if args.run_id is not None:  # `--run-id ''` is a mistake to refuse, not "no run id"
        check_run_id(args.run_id)
    return _submit(spec, args.address, args.run_id, args.wait)


def _print_status(status: dict) -> None:
    state = status.get("effective_state", status["state"])
    if state == "abandoned":
        owner = status.get("owner") or {}
        state = (f"abandoned (recorded as running, but its process pid {owner.get('pid')} on {owner.get('host')} "
                 "is gone or stopped renewing its lease; a rerun with this run id takes it over)")
    print(f"run {status['run_id']}: {state} (job {status['name']!r}, kind {status['kind']}, "
          f"attempt {status.get('attempt', 1)}, started {status['started_at']}"
          + (f", finished {status['finished_at']})" if status.get("finished_at") else ")"))
    if status.get("error"):
        print(f"  error: {status['error']}")
    for name, step in status["steps"].items():
        parts = [f"  {name:<20} {step['kind']:<10} {step['state']:<10}"]
        if step.get("seconds") is not None:
            parts.append(f"{step['seconds']:8.1f} s")
        if step.get("rows") is not None:
            parts.append(f"rows={step['rows']}")
        if step.get("rejected"):
            parts.append(f"rejected={step['rejected']}")
        if step.get("output"):
            parts.append(f"-> {step['output']}")
        if step.get("error"):
            parts.append(f"error: {step['error']}")
        print(" ".join(parts))
        for alert in (step.get("details") or {}).get("alerts") or ():
            print(f"    ALERT {alert}")


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.runs import RunRecord

    if args.address and not (args.root or args.spec or os.environ.get(ROOT_ENV)):
        from pipelines.submit import latest_submission

        job = latest_submission(args.address, args.run_id)
        state = str(job.status).split(".")[-1]
        print(f"run {args.run_id}: Ray job {job.submission_id} {state.lower()}"
              + (f" ({job.message})" if job.message else ""))
        return 0
    status = RunRecord.load(_root(args), args.run_id).status
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from pipelines.runs import RunRecord

    if args.address:
        from pipelines.submit import job_logs

        print(job_logs(args.address, args.run_id), end="")
        return 0
    for event in RunRecord.load(_root(args), args.run_id).events:
        extra = {k: v for k, v in event.items() if k not in ("time", "message", "step")}
        step = f"[{event['step']}] " if event.get("step") else ""
        fields = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in extra.items())
        print(f"{event['time']} {step}{event['message']}" + (f" {fields}" if fields else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from pipelines.runs import list_runs

    runs = list_runs(_root(args))
    if not runs:
        print("no runs")
    for status in runs:
        steps = status.get("steps", {})
        done = sum(1 for s in steps.values() if s.get("state") in ("succeeded", "skipped"))
        state = status.get("effective_state", status["state"])
        print(f"{status['run_id']:<48} {state:<10} {status['started_at']}  steps {done}/{len(steps)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adpipe", description="Industrial anomaly detection batch jobs on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a job spec without running it")
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a job spec (embedded Ray by default)")
    p.add_argument("spec")
    p.add_argument("--run-id", help="run id to use; an existing run id resumes that run")
    p.add_argument("--ray-address", help="override the spec's ray.address (local, auto, ray://..., http://...)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("nightly", help="run one night of a kind: nightly spec (incremental re-scoring)")
    p.add_argument("spec")
    p.add_argument("--date", help="the day to score, YYYY-MM-DD (default: from the spec's schedule)")
    p.add_argument("--run-id", help="run id to use (default: <name>-<date>-<spec fingerprint>)")
    p.add_argument("--ray-address", help="override the spec's ray.address (local, auto, ray://...)")
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("query", help="SQL over a nightly spec's scores table (DuckDB; the table is `scores`)")
    p.add_argument("spec")
    p.add_argument("sql", help="e.g. \"select image_id, score from scores where day = current_date - 1 "
                               "and label_pred\"")
    p.add_argument("--format", choices=("table", "csv"), default="table")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster (Ray Jobs API)")
    p.add_argument("spec")
    p.add_argument("--address", required=True, help="Ray Jobs API address, e.g. http://head:8265")
    p.add_argument("--run-id", help="run id to use; an existing run id resumes that run")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.set_defaults(func=cmd_submit)

    for name, func, help_text in (("status", cmd_status, "show a run's state and steps"),
                                  ("logs", cmd_logs, "show a run's events (or its Ray job logs with --address)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run_id", metavar="RUN")
        p.add_argument("--root", help=f"storage root holding runs/ (default: ${ROOT_ENV})")
        p.add_argument("--spec", help="take the storage root from this job spec")
        p.add_argument("--address", help="Ray Jobs API address, to ask the cluster")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print status.json")
        p.set_defaults(func=func)

    p = sub.add_parser("list", help="list runs under a storage root")
    p.add_argument("--root", help=f"storage root holding runs/ (default: ${ROOT_ENV})")
    p.add_argument("--spec", help="take the storage root from this job spec")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdpipeError as error:
        print(f"adpipe: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("adpipe: interrupted", file=sys.stderr)
        return 130
    except RunInterrupted as error:
        print(f"adpipe: interrupted by {error.signal_name}", file=sys.stderr)
        return 143
    except Exception as error:  # a bug: one line for the user, the traceback on request
        if args.debug:
            raise
        print(f"adpipe: unexpected error: {type(error).__name__}: {error} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
