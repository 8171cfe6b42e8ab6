"""The nightly job on the real stack: a day-partitioned archive on the local S3 server, PaDiM on
real Ray, the Iceberg table in a SQLite catalog. Which partitions each night ingests, scores and
loads; reruns that change nothing; a model rollout that rescores the retention window; drift
alarms; one night at a time per archive; a killed scorer, a killed driver and a store outage
mid-night, finished by reruns with exact rows; no secret leaks."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imagefiles import encode, publish_archive
from pipelines import cli
from pipelines.errors import InputError, SpecError
from pipelines.evaluation.drift import population_stability_index
from pipelines.orchestrator import run_job, spec_fingerprint
from pipelines.params.nightly import NightlyParams
from pipelines.runs import Lease, RunInUse
from pipelines.spec import load_spec, parse_spec
from pipelines.stages import scores_table
from pipelines.storage import Location

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
PADIM = {"backbone": "efficientnet_lite0", "stages": [1, 2], "kept_channels": 16, "image_size": 64, "seed": 0}


def quiet(*_args, **_kwargs) -> None:
    pass


def texture(seed: int, shift: float = 0.0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.indices((72, 72)).sum(0) % 8 * 16 + rng.normal(0, 4, (72, 72))
    if shift:  # a night whose camera went wrong: noisy and washed out
        base = base * (1 - shift) + 255 * shift + rng.normal(0, 60 * shift, base.shape)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8), "L")


@pytest.fixture(scope="module")
def models(ray_session, tmp_path_factory):
    """Two versions of one PaDiM model (a rollout), trained on textures of category "tex". The
    second is the first published again under version 2 (config.json last, as a publish does): a
    new version is what the nightly job keys on, whatever the tensors."""
    root = f"file://{tmp_path_factory.mktemp('nightly-models')}"
    train = [(f"train/{i}.png", encode(texture(i)), "tex", "train", 0) for i in range(24)]
    images = publish_archive(Location.parse(root).join("datasets", "tex", "1"), [train[:12], train[12:]])
    spec = parse_spec({"kind": "train", "name": "fit", "storage": {"root": root}, "method": "padim",
                       "inputs": {"dataset": images.uri}, "outputs": {"model": "padim-tex", "version": "1"},
                       "padim": PADIM, "threshold": {"holdout_fraction": 0.25},
                       "resources": {"workers": 1, "batch_size": 8}})
    first = Location.parse(run_job(spec, echo=quiet).results["fit"].output)
    second = first.parent().join("2")
    for name in sorted((f.uri.rsplit("/", 1)[1] for f in first.list_files()), key=lambda n: n == "config.json"):
        second.join(name).write_bytes(first.join(name).read_bytes())
    return first.uri, second.uri


def add_partition(archive: Location, day: str, count: int, seed: int, shift: float = 0.0) -> None:
    for i in range(count):
        archive.join(f"date={day}", "cam-1", f"{i:03d}.png").write_bytes(encode(texture(seed * 1000 + i, shift)))


def nightly_spec(root: str, archive: Location, model: str, catalog: Path, **extra) -> dict:
    return {"kind": "nightly", "name": "line-7", "storage": {"root": root},
            "archive": {"uri": archive.uri, "name": "line-7", "category": "tex", "rows_per_part": 4},
            "model": {"uri": model}, "retention_days": 3, "schedule": "0 2 * * *",
            "table": {"catalog": {"uri": f"sqlite:///{catalog}"}},
            "resources": {"workers": 1, "batch_size": 8}, **extra}


def night(spec: dict, day: str):
    """One night, with the run id `adpipe nightly` gives it (the same for every rerun of it)."""
    parsed = parse_spec({**spec, "night": day})
    return run_job(parsed, run_id=f"line-7-{day}-{spec_fingerprint(parsed)[:8]}", echo=quiet).results["line-7"]


def table_counts(spec: dict, root: str) -> dict[tuple[str, str], int]:
    params = parse_spec(spec).steps[0].params
    properties = scores_table.catalog_properties(params.table.catalog, Location.parse(root))
    rows = scores_table.open_table(params.table, properties).scan(selected_fields=("day", "model")).to_arrow()
    counts = rows.group_by(["day", "model"]).aggregate([("day", "count")]).to_pylist()
    return {(str(r["day"]), r["model"]): r["day_count"] for r in counts}


def snapshot_ids(spec: dict, root: str) -> list[int]:
    params = parse_spec(spec).steps[0].params
    properties = scores_table.catalog_properties(params.table.catalog, Location.parse(root))
    return [s.snapshot_id for s in scores_table.open_table(params.table, properties).snapshots()]


def test_three_nights_a_rollout_and_reruns_that_change_nothing(models, s3_root, tmp_path):
    v1, v2 = models
    archive = Location.parse(s3_root).join("archive")
    root = f"{s3_root}/store"
    add_partition(archive, "2026-11-18", 3, seed=18)  # outside every window below: never touched
    add_partition(archive, "2026-11-19", 6, seed=19)
    add_partition(archive, "2026-11-20", 5, seed=20)
    spec_v1 = nightly_spec(root, archive, v1, tmp_path / "catalog.db")
    model_v1 = "padim-tex@1"

    first = night(spec_v1, "2026-11-20")  # window 11-18 .. 11-20: all three new
    assert first.details["partitions_scored"] == ["date=2026-11-18", "date=2026-11-19", "date=2026-11-20"]
    assert table_counts(spec_v1, root) == {("2026-11-18", model_v1): 3, ("2026-11-19", model_v1): 6,
                                           ("2026-11-20", model_v1): 5}
    commits = snapshot_ids(spec_v1, root)

    add_partition(archive, "2026-11-21", 4, seed=21)
    second = night(spec_v1, "2026-11-21")  # window 11-19 .. 11-21: only the new day is work
    assert second.details["partitions_ingested"] == ["date=2026-11-21"]
    assert second.details["partitions_scored"] == ["date=2026-11-21"]
    assert second.details["partitions_loaded"] == ["date=2026-11-21"]
    assert table_counts(spec_v1, root)[("2026-11-21", model_v1)] == 4
    after_second = snapshot_ids(spec_v1, root)
    new = after_second[len(commits):]
    assert new, "the night committed nothing"
    # One commit per night: every new snapshot carries this night's run id (an overwrite is a delete
    # and an append snapshot of one atomic catalog commit).
    params = parse_spec(spec_v1).steps[0].params
    properties = scores_table.catalog_properties(params.table.catalog, Location.parse(root))
    table = scores_table.open_table(params.table, properties)
    assert {table.snapshot_by_id(s).summary.additional_properties["adpipe.night"] for s in new} == {"2026-11-21"}

    # Rollout on the third night: v2 rescores the whole window 11-20 .. 11-22, v1's rows stay.
    add_partition(archive, "2026-11-22", 2, seed=22)
    spec_v2 = nightly_spec(root, archive, v2, tmp_path / "catalog.db")
    third = night(spec_v2, "2026-11-22")
    assert third.details["partitions_scored"] == ["date=2026-11-20", "date=2026-11-21", "date=2026-11-22"]
    assert third.details["partitions_ingested"] == ["date=2026-11-22"]
    assert table_counts(spec_v2, root) == {
        ("2026-11-18", model_v1): 3, ("2026-11-19", model_v1): 6, ("2026-11-20", model_v1): 5,
        ("2026-11-21", model_v1): 4,
        ("2026-11-20", "padim-tex@2"): 5, ("2026-11-21", "padim-tex@2"): 4, ("2026-11-22", "padim-tex@2"): 2}

    # Lineage on every row: the image, the partition, the model, the run and the spec.
    rows = scores_table.open_table(params.table, properties).scan(
        row_filter="model == 'padim-tex@2'").to_arrow()
    assert rows.num_rows == 11 and rows["error"].null_count == 11
    for row in rows.to_pylist():
        assert row["source_uri"] == f"{archive.uri}/{row['image_id']}"
        assert row["partition"] == f"date={row['day'].isoformat()}" and row["image_id"].startswith(row["partition"])
        assert row["run_id"] and row["spec_fingerprint"] and row["scored_at"] and row["archive"] == "line-7"
        assert row["scores_uri"].startswith(f"{root}/scores/line-7/padim-tex@2/{row['day'].isoformat()}/part-")

    # Reruns of any night change nothing: no ingest, no scoring, no commit.
    before = snapshot_ids(spec_v2, root)
    manifests = {p: Location.parse(f"{root}/scores/line-7/{p}/_manifest.json").read_bytes()
                 for p in ("padim-tex@1/2026-11-21", "padim-tex@2/2026-11-22")}
    for spec, day in ((spec_v2, "2026-11-22"), (spec_v1, "2026-11-21")):
        again = night(spec, day)
        assert (again.details["partitions_ingested"], again.details["partitions_scored"],
                again.details["partitions_loaded"]) == ([], [], []), (day, again.details)
    assert snapshot_ids(spec_v2, root) == before
    assert {p: Location.parse(f"{root}/scores/line-7/{p}/_manifest.json").read_bytes() for p in manifests} \
        == manifests

    # A late file in a scored day: that day (only) is ingested, scored and loaded again, not duplicated.
    archive.join("date=2026-11-22", "cam-2", "late.png").write_bytes(encode(texture(999)))
    late = night(spec_v2, "2026-11-22")
    assert late.details["partitions_scored"] == ["date=2026-11-22"] == late.details["partitions_loaded"]
    assert table_counts(spec_v2, root)[("2026-11-22", "padim-tex@2")] == 3

    # `adpipe query`: yesterday's anomalies above threshold, the README's recipe.
    spec_file = tmp_path / "nightly.yaml"
    spec_file.write_text(yaml.safe_dump({**spec_v2, "ray": {"address": "local"}}))
    result = scores_table.query(params.table, properties,
                                "select day, count(*) as images, count(*) filter (where label_pred) as flagged "
                                "from scores where model = 'padim-tex@2' group by day order by day")
    assert result.column("images").to_pylist() == [5, 4, 3]
    with pytest.raises(InputError, match="query failed: .*no_such_column"):
        scores_table.query(params.table, properties, "select no_such_column from scores")
    # Rerunning the first night too changes nothing (its window's days are all loaded for v1).
    assert night(spec_v1, "2026-11-20").details["partitions_loaded"] == []


def test_a_shifted_night_raises_a_drift_alert_and_exit_3(models, file_root, tmp_path, capsys):
    v1, _ = models
    archive = Location.parse(file_root).join("archive")
    for index, day in enumerate(("2026-10-01", "2026-10-02", "2026-10-03")):
        add_partition(archive, day, 24, seed=100 + index)
    spec = nightly_spec(file_root, archive, v1, tmp_path / "catalog.db",
                        drift={"reference_nights": 2, "bins": 4, "max_psi": 1.0, "min_images": 10})
    spec["retention_days"] = 5
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump({**spec, "ray": {"address": "local"}}))
    assert cli.main(["nightly", str(path), "--date", "2026-10-03"]) == 0  # normal nights: no alert
    report = json.loads(next((Path(file_root[7:]) / "runs").glob("line-7-2026-10-03-*/nightly-report.json"))
                        .read_text())
    [tex] = report["categories"]
    assert tex["judged"] and tex["psi"] < 1.0 and report["alerts"] == []

    add_partition(archive, "2026-10-04", 24, seed=104, shift=0.6)
    assert cli.main(["nightly", str(path), "--date", "2026-10-04"]) == 3
    err = capsys.readouterr().err
    assert "alert(s)" in err and "tex: score distribution drifted" in err
    [folder] = list((Path(file_root[7:]) / "runs").glob("line-7-2026-10-04-*"))
    report = json.loads((folder / "nightly-report.json").read_text())
    [tex] = report["categories"]
    assert tex["psi"] > 1.0 and tex["reference_nights"] == ["date=2026-10-02", "date=2026-10-03"]
    assert report["alerts"] and "PSI" in report["alerts"][0]
    assert "tr class=\"alert\"" in (folder / "nightly-report.html").read_text()
    metrics = (folder / "metrics.prom").read_text()
    assert 'adpipe_nightly_alerts{archive="line-7",category="tex",model="padim-tex@1"} 1.0' in metrics
    assert "adpipe_nightly_score_psi{" in metrics and "adpipe_nightly_images_per_second{" in metrics
    assert cli.main(["status", folder.name, "--root", file_root]) == 0
    assert "ALERT tex: score distribution drifted" in capsys.readouterr().out


@pytest.fixture
def postgres(monkeypatch):
    """A throwaway PostgreSQL server on loopback (Debian's postgresql package) with a password
    user: the catalog a production deployment uses. Skipped where the server is not installed,
    except in CI (CI=true), where that fails the test."""
    import glob
    import shutil
    import tempfile

    from pipelines.objectstore import free_port

    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL (initdb) is not installed; ops/test.sh installs it where it can")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(found).resolve().parent
    folder = Path(tempfile.mkdtemp(prefix="adpipe-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    password = "pg-canary-" + os.urandom(6).hex()
    (folder / "pw").write_text(password)
    if as_user:
        shutil.chown(folder / "pw", "postgres")
    port = free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "adpipe",
                    "--pwfile", str(folder / "pw"), "-A", "scram-sha-256"], check=True, capture_output=True)
    (folder / "pw").unlink()
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-w", "-l", str(folder / "log"),
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    monkeypatch.setenv("PGPASSWORD", password)  # libpq's: the catalog URI holds no password
    try:
        yield f"postgresql+psycopg2://adpipe@127.0.0.1:{port}/postgres", password
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_one_night_at_a_time_per_archive_with_a_postgresql_catalog(models, file_root, postgres):
    """The refusal while another night of the archive runs; then the night, its table in a real
    PostgreSQL catalog whose password (from the environment, as libpq reads it) is in no record."""
    v1, _ = models
    uri, password = postgres
    archive = Location.parse(file_root).join("archive")
    add_partition(archive, "2026-09-01", 2, seed=1)
    spec = nightly_spec(file_root, archive, v1, Path("unused"))
    spec["table"] = {"catalog": {"uri": uri}}
    other = Lease(Location.parse(file_root).join("nightly", "line-7"))
    other.acquire("line-7-another-night")  # another night of the same archive is running
    try:
        with pytest.raises(RunInUse, match="archive 'line-7' .one night at a time. is held by pid"):
            night(spec, "2026-09-01")
    finally:
        other.release()
    assert not Location.parse(file_root).join("scores").exists(), "the refused night wrote scores"
    assert night(spec, "2026-09-01").details["partitions_scored"] == ["date=2026-09-01"]
    assert table_counts(spec, file_root) == {("2026-09-01", "padim-tex@1"): 2}
    store = Path(file_root[len("file://"):])
    for path in store.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path


def _processes_named(root_pid: int, text: str) -> list:
    import psutil

    found = []
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if text in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_faults_mid_night_concurrent_runs_killed_processes_a_store_outage_then_exact_rows(models, tmp_path):
    """On a private S3 server, one night of 2 x 40 images: a second run of the same night and one
    of another spec for the same archive are refused (exit 75) while it runs; a scorer actor's
    process is killed (Ray restarts it), then the driver with its embedded Ray (kill -9); the rerun is cut by the S3
    server stopping (exit 1, naming the store); after a restart of the server, a rerun completes
    with exactly one row per image, reusing the parts done before. The S3 secret keys, in every
    process's environment, appear in no output, record, report or catalog."""
    import pyarrow.fs as pafs

    from pipelines import objectstore

    v1, _ = models
    state = tmp_path / "store"
    store = objectstore.start(state, buckets=["nightly-faults"])
    secrets = [store.secret_key]
    try:
        s3 = pafs.S3FileSystem(endpoint_override=store.endpoint.split("://")[1], scheme="http", region="us-east-1",
                               access_key=store.access_key, secret_key=store.secret_key)
        for day in ("2026-08-01", "2026-08-02"):
            for i in range(40):
                with s3.open_output_stream(f"nightly-faults/archive/date={day}/cam-1/{i:03d}.png") as out:
                    out.write(encode(texture(int(day[-2:]) * 100 + i)))
        root = "s3://nightly-faults/store"
        spec = nightly_spec(root, Location("s3://nightly-faults/archive", None), v1, tmp_path / "catalog.db",
                            drift={"max_psi": None})
        spec["resources"]["batch_size"] = 2
        path = tmp_path / "nightly.yaml"
        path.write_text(yaml.safe_dump({**spec, "ray": {"address": "local", "num_cpus": 2}}))
        command = [sys.executable, "-m", "pipelines.cli", "nightly", str(path), "--date", "2026-08-02"]

        def start(env):
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)

        def parts_done():
            return sum(len(s3.get_file_info(pafs.FileSelector(f"nightly-faults/store/scores/line-7/padim-tex@1/"
                                                              f"{day}/_parts", allow_not_found=True)))
                       for day in ("2026-08-01", "2026-08-02"))

        def wait_for(process, condition, what):
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and process.poll() is None and not condition():
                time.sleep(0.1)
            assert process.poll() is None, f"the night ended before {what}:\n" + process.communicate()[0]

        env = {**os.environ, **store.env(), "ADPIPE_RAY_LOG_TO_DRIVER": "1"}
        outputs = []
        first = start(env)
        # Two runs of the same night at once, started as soon as this one holds the archive: the same
        # spec is the same run id (the run's lease refuses); another spec of the archive is another
        # run id (the archive's lease refuses). Exit 75 for both, and neither writes anything.
        wait_for(first, lambda: s3.get_file_info("nightly-faults/store/nightly/line-7/lease.json").type
                 == pafs.FileType.File, "it held the archive")
        other_spec = tmp_path / "other.yaml"
        other_spec.write_text(yaml.safe_dump({**spec, "anomaly_maps": True, "ray": {"address": "local"}}))
        refused = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for argv in (command, [*command[:4], str(other_spec), *command[5:]])]
        same, other = (process.communicate(timeout=120)[0] for process in refused)  # while the night runs
        assert first.poll() is None, "the night ended before the second runs were refused"
        assert refused[0].returncode == 75 and "is being run by pid" in same, same
        assert refused[1].returncode == 75, other
        assert "archive 'line-7' (one night at a time) is held by pid" in other, other
        outputs += [same, other]
        wait_for(first, lambda: parts_done() >= 1 and _processes_named(first.pid, "Scorer"), "a part was scored")
        _processes_named(first.pid, "Scorer")[0].kill()  # SIGKILL one scorer actor's process
        done_then = parts_done()
        wait_for(first, lambda: parts_done() >= done_then + 2, "the restarted scorer went on")
        os.killpg(first.pid, signal.SIGKILL)  # then the driver and its embedded Ray
        outputs.append(first.communicate()[0])
        assert parts_done() < 20, "the night was killed too late to leave work for the rerun"

        second = start(env)
        before = parts_done()
        wait_for(second, lambda: parts_done() > before, "the store could be stopped")
        objectstore.stop_server(store)
        outputs.append(second.communicate(timeout=300)[0])
        assert second.returncode == 1, outputs[-1]
        [line] = [x for x in outputs[-1].splitlines() if x.startswith("adpipe:")]
        assert line.startswith("adpipe: error: cannot ") and "s3://nightly-faults/" in line, line

        store = objectstore.start(state)  # the same data, new ports and keys
        secrets.append(store.secret_key)
        env = {**os.environ, **store.env(), "ADPIPE_RAY_LOG_TO_DRIVER": "0"}
        third = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        outputs.append(third.stdout + third.stderr)
        assert third.returncode == 0, outputs[-1]
        assert "parts from an earlier attempt" in third.stdout, third.stdout
        query = subprocess.run([sys.executable, "-m", "pipelines.cli", "query", str(path), "--format", "csv",
                                "select day, count(*) as n, count(distinct image_id) as ids, "
                                "count(*) filter (where error is null) as ok from scores group by day order by day"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert query.returncode == 0, query.stderr
        assert query.stdout.splitlines()[1:] == ["2026-08-01,40,40,40", "2026-08-02,40,40,40"], query.stdout
        outputs.append(query.stdout + query.stderr)

        s3 = pafs.S3FileSystem(endpoint_override=store.endpoint.split("://")[1], scheme="http", region="us-east-1",
                               access_key=store.access_key, secret_key=store.secret_key)
        records = [i.path for i in s3.get_file_info(pafs.FileSelector("nightly-faults/store/runs", recursive=True))
                   if i.type == pafs.FileType.File]
        assert any(r.endswith("nightly-report.json") for r in records), records
        stored = [s3.open_input_stream(r).read() for r in records] + [(tmp_path / "catalog.db").read_bytes()]
        for secret in secrets:
            assert not any(secret in text for text in outputs), "a secret key in the output"
            assert not any(secret.encode() in data for data in stored), "a secret key in a record or the catalog"
    finally:
        objectstore.stop_server(store)


# ---- no Ray ------------------------------------------------------------------------------------


def test_nightly_spec_checks_and_the_night_from_the_schedule(tmp_path):
    base = {"kind": "nightly", "name": "n", "storage": {"root": f"file://{tmp_path}"},
            "archive": {"uri": f"file://{tmp_path}/a", "name": "line-7"}, "model": {"uri": f"file://{tmp_path}/m"}}
    params: NightlyParams = parse_spec({**base, "schedule": "30 1 * * *"}).steps[0].params
    at = datetime.datetime(2026, 12, 3, 1, 0, tzinfo=datetime.UTC)  # before tonight's 01:30: last night's run
    assert params.night_date(at) == datetime.date(2026, 12, 1)
    assert params.night_date(at.replace(hour=15)) == datetime.date(2026, 12, 2)
    assert params.window(datetime.date(2026, 12, 2))[0] == datetime.date(2026, 11, 3)  # 30 days
    with pytest.raises(SpecError, match="schedule: 'every night' is not a cron expression"):
        parse_spec({**base, "schedule": "every night"})
    with pytest.raises(SpecError, match="night: '2026-13-01' is not a date"):
        parse_spec({**base, "night": "2026-13-01"})
    with pytest.raises(SpecError, match="table.catalog.uri: credentials are not allowed"):
        parse_spec({**base, "table": {"catalog": {"uri": "postgresql://adpipe:hunter2@db/iceberg"}}})
    with pytest.raises(SpecError, match="schedule: only a nightly job has a schedule"):
        parse_spec({"kind": "score", "name": "s", "storage": {"root": f"file://{tmp_path}"}, "schedule": "0 2 * * *",
                    "inputs": {"dataset": f"file://{tmp_path}/d"}, "model": {"uri": f"file://{tmp_path}/m"}})
    with pytest.raises(InputError, match="table.catalog.uri is needed"):
        scores_table.catalog_properties(params.table.catalog, Location.parse("s3://bucket/root"))
    os.environ["PYICEBERG_CATALOG__ADPIPE__URI"] = "postgresql+psycopg2://adpipe:hunter2@db/iceberg"
    try:
        with pytest.raises(InputError, match="PYICEBERG_CATALOG__ADPIPE__URI holds a password") as refused:
            scores_table.catalog_properties(params.table.catalog, Location.parse("s3://bucket/root"))
        assert "hunter2" not in str(refused.value)
    finally:
        del os.environ["PYICEBERG_CATALOG__ADPIPE__URI"]
    assert load_spec(REPO / "jobs" / "nightly.yaml").kind == "nightly"
    # `adpipe nightly` / `adpipe query` take only nightly specs; a bad --date is refused before anything runs.
    assert cli.main(["nightly", str(REPO / "jobs" / "demo.yaml")]) == 2
    assert cli.main(["query", str(REPO / "jobs" / "demo.yaml"), "select 1"]) == 2
    assert cli.main(["nightly", str(REPO / "jobs" / "nightly.yaml"), "--date", "yesterday"]) == 2


def test_psi_against_a_direct_computation():
    rng = np.random.default_rng(0)
    reference, current = rng.normal(0, 1, 5000), rng.normal(0.5, 1, 4000)
    # Independent: decile edges of the reference, counts by explicit comparisons, +1/2 per bin.
    edges = np.quantile(reference, np.arange(1, 10) / 10)

    def shares(values):
        bins = [np.sum(values <= edges[0])] + [np.sum((values > lo) & (values <= hi))
                                              for lo, hi in zip(edges, edges[1:])] + [np.sum(values > edges[-1])]
        return (np.asarray(bins) + 0.5) / (len(values) + 0.5 * 10)
    expected = float(np.sum((shares(current) - shares(reference)) * np.log(shares(current) / shares(reference))))
    assert population_stability_index(reference, current, 10) == pytest.approx(expected, rel=1e-12)
    assert population_stability_index(reference, reference, 10) == pytest.approx(0.0, abs=1e-12)
    # By hand: a quarter of the mass moved from the lower to the upper of 2 bins.
    ref = np.array([0.0] * 50 + [1.0] * 50)
    cur = np.array([0.0] * 25 + [1.0] * 75)
    low, high = 25.5 / 101, 75.5 / 101
    assert population_stability_index(ref, cur, 2) == pytest.approx(
        (low - 0.5) * np.log(low / 0.5) + (high - 0.5) * np.log(high / 0.5))


def test_psi_pvalue_holds_its_level_on_samples_of_one_distribution():
    """Under no drift the p-value is about uniform: about 1% of same-distribution nights alarm at
    0.01 (checked by simulation, also on small nights), while a real shift does."""
    from pipelines.evaluation.drift import psi_pvalue

    rng = np.random.default_rng(1)
    for n_ref, n_cur in ((200, 60), (40, 40), (48, 24)):
        pvalues = [psi_pvalue(population_stability_index(rng.normal(size=n_ref), rng.normal(size=n_cur), 10),
                              n_ref, n_cur, 10) for _ in range(400)]
        assert np.mean(np.asarray(pvalues) < 0.01) < 0.03, (n_ref, n_cur)
    shifted = population_stability_index(ref := rng.normal(size=200), rng.normal(0.8, 1, 60), 10)
    assert psi_pvalue(shifted, len(ref), 60, 10) < 0.01


def test_a_table_made_by_an_older_version_gains_the_new_columns_and_its_partitioning(tmp_path):
    """A table from before a column was added (or whose creator died before partitioning it) is
    brought up to date on open, without touching its rows."""
    from pyiceberg.catalog import load_catalog

    from pipelines.params.nightly import TableSpec

    root = Location.parse(f"file://{tmp_path}/root")
    properties = scores_table.catalog_properties(TableSpec().catalog, root)
    catalog = load_catalog(properties["name"], **{k: v for k, v in properties.items() if k != "name"})
    catalog.create_namespace("adpipe")
    old = scores_table.TABLE_SCHEMA.remove(scores_table.TABLE_SCHEMA.get_field_index("scores_uri"))
    catalog.create_table("adpipe.nightly_scores", schema=old)
    table = scores_table.open_table(TableSpec(), properties)
    assert table.schema().column_names == scores_table.TABLE_SCHEMA.names
    assert [f.name for f in table.spec().fields] == ["day", "model"]
    assert properties["uri"] == f"sqlite:///{tmp_path}/root/catalog/iceberg.db"
