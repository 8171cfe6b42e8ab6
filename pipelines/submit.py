"""Submit a job spec to a running Ray cluster through the Ray Jobs API.

The cluster runs the same entry point as a local run (`adpipe run spec.yaml --run-id ID
--ray-address auto`) on the validated spec, shipped as the job's working directory. Clusters with
token authentication are supported the way Ray supports them: `RAY_AUTH_MODE=token` and
`RAY_AUTH_TOKEN` (or ~/.ray/auth_token) in the submitting environment. Storage credentials are not
shipped: the cluster's own environment provides them.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.errors import AdpipeError, InputError
from pipelines.runs import new_run_id
from pipelines.spec import JobSpec, dump_spec

RUN_ID_METADATA_KEY = "adpipe_run_id"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120.0


def jobs_client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"cannot reach the Ray Jobs API at {address}: {first_line}") from None


def submit_spec(spec: JobSpec, address: str, run_id: str | None = None) -> str:
    """Submit and return the run id (also the Ray submission id of its first attempt)."""
    client = jobs_client(address)
    run_id = run_id or new_run_id(spec.name)
    taken = {job.submission_id for job in client.list_jobs()}
    submission_id = run_id
    attempt = 1
    while submission_id in taken:  # resubmitting a run id (to resume it) is a new Ray job
        attempt += 1
        submission_id = f"{run_id}--attempt{attempt}"
    with tempfile.TemporaryDirectory(prefix="adpipe-submit-") as folder:
        (Path(folder) / "spec.yaml").write_text(dump_spec(spec))
        entrypoint = f"adpipe run spec.yaml --run-id {shlex.quote(run_id)} --ray-address auto"
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                  runtime_env={"working_dir": folder},
                                  metadata={RUN_ID_METADATA_KEY: run_id, "adpipe_job": spec.name})
                break
            except RuntimeError as error:
                # A head that has just started answers the Jobs API before its job agent is up
                # ("No available agent to submit job"): wait for it rather than fail.
                if "No available agent" in str(error) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                first_line = next((line for line in str(error).splitlines() if line.strip()), "")
                hint = ""
                if "No available agent" in first_line:
                    hint = (" (the head's dashboard agent never registered: see the head's dashboard_agent.log;"
                            " a second Ray on the same machine holding port 52365 is the usual cause: start"
                            " the head with --dashboard-agent-listen-port=<a free port>)")
                raise AdpipeError(f"the Ray Jobs API at {address} refused the job: {first_line}{hint}") from None
    return run_id


def submissions_for(address: str, run_id: str) -> list[Any]:
    """Ray job records of every attempt of a run, oldest first."""
    client = jobs_client(address)
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get(RUN_ID_METADATA_KEY) == run_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def latest_submission(address: str, run_id: str) -> Any:
    jobs = submissions_for(address, run_id)
    if not jobs:
        raise InputError(f"no Ray job for run {run_id!r} at {address}")
    return jobs[-1]


def job_logs(address: str, run_id: str) -> str:
    return jobs_client(address).get_job_logs(latest_submission(address, run_id).submission_id)


def wait_for(address: str, run_id: str, timeout_s: float = 3600, poll_s: float = 1.0) -> str:
    """Block until the run's latest Ray job ends; return its final state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = str(latest_submission(address, run_id).status).split(".")[-1]
        if state in TERMINAL_STATES:
            return state
        time.sleep(poll_s)
    raise AdpipeError(f"run {run_id} did not finish within {timeout_s:.0f} s")
