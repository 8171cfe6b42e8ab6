"""Shared set-up for the scoring benchmarks in ops/bench/ (not a test module; adpipe never imports it).

`object_store()` starts a local SeaweedFS S3 server in a temporary folder and exports its
endpoint and credentials; `ray_session()` starts ONE embedded Ray; `bench_stack()` is both. Each
tears down what it started on the way out, also on an error, Ctrl-C or SIGTERM.
`prepare_model()` ingests ELPV into the store and fits PaDiM with the demo's configuration through
`run_job` (`prepare_model_in_subprocess()` does it in a child process with its own Ray);
`take_rows()` cuts an images archive of exactly N rows out of the ingested dataset;
`score_archive()` runs the real `score` stage on it through `run_job` (joining the running Ray).
`ProcessSampler` walks this process's tree every 0.2 s (psutil if importable, else /proc): RSS
peaks and CPU seconds per process, plus when each Ray worker title was seen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Before Ray is imported anywhere.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

BUCKET = "adpipe-bench"
ROOT = f"s3://{BUCKET}"

# The demo's model (jobs/demo.yaml): PaDiM on EfficientNet-Lite0 stages 1-3, 100 channels, 256 px.
PADIM = {"backbone": "efficientnet_lite0", "stages": [1, 2, 3], "kept_channels": 100, "image_size": 256, "seed": 0}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def quiet(*_args, **_kwargs) -> None:
    pass


def prefixed(prefix: str) -> Callable[[str], None]:
    return lambda line: print(f"    {prefix}| {line}", flush=True)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


ANOMALIB_SETUP_HELP = """anomalib's environment was not found at {path}. Create it once (about 6 GB with torch):

    python3.11 -m venv /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install torch==2.14.1 "anomalib==2.7.*"

or pass --anomalib-python PATH to a python that has anomalib 2.7."""


def anomalib_version(python: str, needs: str) -> str | None:
    """anomalib's version in the environment of `python` after running the import line `needs`, or
    None (with the reason and the set-up help on stderr). anomalib is not a dependency of adpipe: the
    comparisons with it run in a separate virtual environment, in subprocesses."""
    import subprocess

    if not Path(python).is_file():
        print(ANOMALIB_SETUP_HELP.format(path=python), file=sys.stderr)
        return None
    probe = subprocess.run([python, "-c", f"import anomalib; {needs}; print(anomalib.__version__)"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        print(f"{python} cannot run {needs!r}:\n{probe.stderr[-2000:]}\n", file=sys.stderr)
        print(ANOMALIB_SETUP_HELP.format(path=python), file=sys.stderr)
        return None
    return probe.stdout.strip().splitlines()[-1]


def _sigterm_to_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def object_store(keep: bool = False) -> Iterator[dict]:
    """A SeaweedFS S3 server in a temporary folder, its env exported; stopped on the way out."""
    from pipelines import objectstore, storage

    previous_handler = signal.signal(signal.SIGTERM, _sigterm_to_exit)
    state_dir = Path(tempfile.mkdtemp(prefix="adpipe-bench-"))
    saved_env: dict[str, str | None] = {}
    store = None
    try:
        started = time.monotonic()
        store = objectstore.start(state_dir, buckets=[BUCKET])
        for key, value in store.env().items():
            saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        storage._FILESYSTEMS.clear()  # nothing built before now may keep other credentials
        log(f"SeaweedFS S3 at {store.endpoint} (pid {store.pid}) in {time.monotonic() - started:.1f} s")
        yield {"state_dir": str(state_dir), "weed_pid": store.pid}
    finally:
        if store is not None:
            objectstore.stop_server(store)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage._FILESYSTEMS.clear()
        if not keep:
            shutil.rmtree(state_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_handler)
        log("SeaweedFS stopped" + (f"; its data kept in {state_dir}" if keep else ""))


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, ray_logs: bool = False) -> Iterator[int]:
    """One embedded Ray (`address="local"`, all cores by default); shut down on the way out."""
    import ray.data

    num_cpus = num_cpus or os.cpu_count() or 1
    started = time.monotonic()
    previous_handler = signal.getsignal(signal.SIGTERM)
    from pipelines.orchestrator import ray_runtime
    from pipelines.spec_fields import RaySpec

    embedded = contextlib.ExitStack()  # the product's embedded Ray: loopback only, same settings
    embedded.enter_context(ray_runtime(RaySpec(address="local", num_cpus=num_cpus), log_to_driver=ray_logs))
    # Ray's core worker installs a native SIGTERM handler that ends the process on the spot; ours
    # raises SystemExit instead, so that Ray and the S3 server are shut down by the finally blocks.
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        log(f"embedded Ray with {num_cpus} CPUs in {time.monotonic() - started:.1f} s "
            f"(load average now {load_average()})")
        yield num_cpus
    finally:
        with contextlib.suppress(Exception):
            embedded.close()
        signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
        log("Ray stopped")


@contextlib.contextmanager
def bench_stack(num_cpus: int | None = None, ray_logs: bool = False, keep: bool = False) -> Iterator[dict]:
    """A SeaweedFS S3 server + one embedded Ray; both stopped on the way out, whatever happens."""
    with object_store(keep) as store, ray_session(num_cpus, ray_logs) as cpus:
        yield {**store, "num_cpus": cpus}


# ---- data and model -----------------------------------------------------------------------------


def location(uri: str):
    from pipelines.storage import Location

    return Location.parse(uri)


def take_rows(source_uri: str, dest_uri: str, count: int | None = None,
              keep: Callable[[pa.Table], np.ndarray] | None = None, per_category: int | None = None,
              rows_per_part: int = 256) -> int:
    """Publish an images dataset made of rows of another one (in its order): the first `count`
    rows, or those `keep` selects (at most `per_category` of each category). Returns the rows."""
    from pipelines import datasets
    from pipelines.tables import IMAGES_SCHEMA

    source, dest = location(source_uri), location(dest_uri)
    manifest = datasets.read_manifest(source)
    chosen: list[pa.Table] = []
    taken, per_cat = 0, {}
    for part in datasets.part_locations(source, manifest):
        if count is not None and taken >= count:
            break
        table = pq.read_table(part.path, filesystem=part.fs, schema=IMAGES_SCHEMA)
        if keep is not None:
            table = table.filter(pa.array(keep(table)))
        if per_category is not None:
            mask = np.zeros(table.num_rows, bool)
            for i, cat in enumerate(table["category"].to_pylist()):
                if per_cat.get(cat, 0) < per_category:
                    per_cat[cat] = per_cat.get(cat, 0) + 1
                    mask[i] = True
            table = table.filter(pa.array(mask))
        if count is not None:
            table = table.slice(0, count - taken)
        chosen.append(table)
        taken += table.num_rows
    if count is not None and taken < count:
        raise SystemExit(f"the source dataset has only {taken} rows; asked for {count}")
    table = pa.concat_tables(chosen).combine_chunks()
    records = [datasets.write_part(dest, i, table.slice(start, rows_per_part))
               for i, start in enumerate(range(0, table.num_rows, rows_per_part))]
    datasets.publish(dest, name=dest.parent().name, version=dest.name, table="images", schema=IMAGES_SCHEMA,
                     parts=records, lineage={"bench_source": source_uri})
    return table.num_rows


@dataclass
class Prepared:
    dataset_uri: str  # the whole ingested ELPV dataset
    model_uri: str
    seconds: float


def prepare_model(train_per_category: int, batch_size: int, workers: int) -> Prepared:
    """Ingest ELPV (all 2,624 cells) into S3 and fit the demo's PaDiM on normal training cells."""
    from pipelines.orchestrator import run_job
    from pipelines.spec import parse_spec

    started = time.monotonic()
    ingest = parse_spec({
        "kind": "ingest", "name": "bench-ingest", "storage": {"root": ROOT},
        "source": {"type": "elpv", "normal_train_fraction": 0.6, "split_seed": 0},
        "outputs": {"dataset": "elpv", "rows_per_part": 256}, "resources": {"workers": 2},
    })
    dataset_uri = run_job(ingest, echo=prefixed("ingest")).results["bench-ingest"].output
    train_input = dataset_uri
    if train_per_category > 0:
        # The fit only sets PaDiM's Gaussians: scoring costs the same whatever it was fitted on,
        # so a capped training set keeps the benchmark short.
        def normal_train(table: pa.Table) -> np.ndarray:
            return pc.and_(pc.equal(table["split"], "train"), pc.equal(table["label"], 0)) \
                .fill_null(False).to_numpy(zero_copy_only=False)

        train_input = f"{ROOT}/datasets/elpv-train-subset/1"
        rows = take_rows(dataset_uri, train_input, keep=normal_train, per_category=train_per_category)
        log(f"training subset: {rows} normal training cells ({train_per_category} per cell type at most)")
    train = parse_spec({
        "kind": "train", "name": "bench-train", "storage": {"root": ROOT}, "method": "padim",
        "inputs": {"dataset": train_input}, "outputs": {"model": "padim-elpv"}, "padim": PADIM,
        "per_category": True, "threshold": {"method": "normal_quantile", "quantile": 0.99, "holdout_fraction": 0.2},
        "resources": {"workers": workers, "batch_size": batch_size},
    })
    model_uri = run_job(train, echo=prefixed("train")).results["bench-train"].output
    return Prepared(dataset_uri, model_uri, time.monotonic() - started)


def prepare_model_in_subprocess(train_per_category: int, batch_size: int, workers: int,
                                ray_logs: bool = False) -> Prepared:
    """`prepare_model` in a child Python with its own embedded Ray (started and stopped there), so
    that nothing of ingest and training stays in this process or in Ray workers afterwards."""
    import json
    import subprocess

    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "import signal, _benchlib as b\n"
            "signal.signal(signal.SIGTERM, b._sigterm_to_exit)\n"
            f"with b.ray_session(ray_logs={ray_logs!r}):\n"
            f"    p = b.prepare_model({train_per_category}, {batch_size}, {workers})\n"
            "print('PREPARED ' + json.dumps(p.__dict__), flush=True)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    prepared = None
    try:
        for line in process.stdout:
            if line.startswith("PREPARED "):
                prepared = Prepared(**json.loads(line[len("PREPARED "):]))
            else:
                print(line, end="", flush=True)
        code = process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
    if code != 0 or prepared is None:
        raise SystemExit(f"preparing the model failed (exit {code})")
    return prepared


@dataclass
class ScoreRun:
    images: int
    wall_seconds: float  # around run_job (run record + the step)
    step_seconds: float  # the step as the run record times it
    stage_images_per_second: float | None  # the stage's own figure (StepResult details)
    output: str


def score_archive(archive_uri: str, model_uri: str, *, workers: int, cpus_per_worker: float, batch_size: int,
                  maps: bool, name: str = "bench-score", echo: Callable[[str], None] | None = None,
                  on_start: Callable[[], None] | None = None) -> ScoreRun:
    """Run the real `score` stage (S3 Parquet in -> S3 Parquet out) on every row of an archive."""
    from pipelines.orchestrator import run_job
    from pipelines.runs import RunRecord
    from pipelines.spec import parse_spec

    spec = parse_spec({
        "kind": "score", "name": name, "storage": {"root": ROOT}, "inputs": {"dataset": archive_uri},
        "model": {"uri": model_uri}, "outputs": {"anomaly_maps": maps},
        "resources": {"workers": workers, "cpus_per_worker": cpus_per_worker, "batch_size": batch_size},
    })
    if on_start is not None:
        on_start()
    started = time.monotonic()
    outcome = run_job(spec, echo=echo or quiet)
    wall = time.monotonic() - started
    result = outcome.results[name]
    record = RunRecord.load(location(ROOT), outcome.run_id)
    step_seconds = float(record.step_state(name).get("seconds", wall))
    return ScoreRun(images=int(result.rows or 0), wall_seconds=wall, step_seconds=step_seconds,
                    stage_images_per_second=result.details.get("images_per_second"), output=result.output)


# ---- processes ----------------------------------------------------------------------------------

try:
    import psutil  # optional: /proc is read directly without it
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    title: str  # the command line (Ray workers retitle themselves "ray::<what they run>")
    rss: int  # bytes
    shmem: int  # bytes of RSS that are shared memory (Ray's object store pages count here)
    anon: int = 0  # bytes of RSS that are private anonymous memory (no library files, no shared memory)


def _proc_status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in fields:
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                title = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        table[pid] = (ppid, title)
    return table


def process_tree(root_pid: int | None = None, exclude: set[int] = frozenset()) -> list[ProcessInfo]:
    """The process `root_pid` (default: this one) and all its descendants, minus the subtrees of
    the pids in `exclude`; with resident and shared-memory sizes."""
    root_pid = root_pid or os.getpid()
    found: list[ProcessInfo] = []
    if psutil is not None:
        try:
            root = psutil.Process(root_pid)
            processes = [root] + root.children(recursive=True)
        except psutil.Error:
            return found
        skipped = set(exclude)
        for process in processes:
            try:
                if process.pid in skipped or process.ppid() in skipped:
                    skipped.add(process.pid)
                    continue
                title = " ".join(process.cmdline())
                rss = process.memory_info().rss
                sizes = _proc_status_kb(process.pid, ("RssShmem", "RssAnon"))
                found.append(ProcessInfo(process.pid, process.ppid(), title, rss, sizes.get("RssShmem", 0),
                                         sizes.get("RssAnon", 0)))
            except psutil.Error:
                continue
        return found
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        if pid in exclude or pid not in table:
            continue
        stack.extend(children.get(pid, []))
        sizes = _proc_status_kb(pid, ("VmRSS", "RssShmem", "RssAnon"))
        if "VmRSS" not in sizes:  # exited, or a zombie
            continue
        found.append(ProcessInfo(pid, table[pid][0], table[pid][1], sizes["VmRSS"], sizes.get("RssShmem", 0),
                                 sizes.get("RssAnon", 0)))
    return found


def classify(process: ProcessInfo, driver_pid: int) -> str:
    """driver | worker (Ray Python workers: tasks, actors, idle ones) | ray-system (raylet, GCS, agents)."""
    if process.pid == driver_pid:
        return "driver"
    title = process.title
    if title.startswith("ray::") and not title.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "worker"
    if "default_worker.py" in title:  # a worker that has not retitled itself yet
        return "worker"
    return "ray-system"


def find_processes(marker: str, exclude: set[int] = frozenset()) -> list[ProcessInfo]:
    return [p for p in process_tree(exclude=exclude) if marker in p.title]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process so far (seconds), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


class ProcessSampler:
    """Samples the driver's process tree every `interval` s in a background thread.

    Per sample: the sum of RSS of the driver and the Ray worker processes (and, apart, of Ray's
    system processes); keeps the peak since the last `reset()`. Per process: the CPU time used
    since `reset()` (or since it appeared) and the titles it had (a Ray worker shows what it runs).
    """

    def __init__(self, interval: float = 0.2, exclude: set[int] = frozenset()):
        import threading

        self.interval = interval
        self.exclude = set(exclude)
        self.driver = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.samples = 0
            self.peak_total = 0  # driver + workers
            self.peak_anon = 0  # the same, private anonymous memory only (its own peak)
            self.peak_at: dict[str, int] = {}
            self.peak_seconds = 0.0  # when the peak was seen, after reset
            self.peak_processes: list[ProcessInfo] = []
            self.first_total: int | None = None
            self.cpu_start: dict[int, float] = {}
            self.cpu_last: dict[int, float] = {}
            self.titles: dict[int, dict[str, int]] = {}
            self.first_seen: dict[tuple[int, str], float] = {}  # (pid, full title) -> first time seen
            self.last_seen: dict[tuple[int, str], float] = {}
            self.started = time.monotonic()
        self.sample()  # baseline CPU times now

    def start(self) -> ProcessSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.sample()

    def sample(self) -> None:
        processes = process_tree(self.driver, exclude=self.exclude)
        cpu = {p.pid: cpu_seconds(p.pid) for p in processes}
        by_class: dict[str, int] = {"driver": 0, "worker": 0, "ray-system": 0}
        for process in processes:
            by_class[classify(process, self.driver)] += process.rss
        total = by_class["driver"] + by_class["worker"]
        anon = sum(p.anon for p in processes if classify(p, self.driver) != "ray-system")
        now = time.monotonic()
        with self._lock:
            self.samples += 1
            if self.first_total is None:
                self.first_total = total
            self.peak_anon = max(self.peak_anon, anon)
            if total > self.peak_total:
                self.peak_total, self.peak_at = total, dict(by_class)
                self.peak_seconds = now - self.started
                self.peak_processes = processes
            for process in processes:
                seconds = cpu.get(process.pid)
                if seconds is None:
                    continue
                self.cpu_start.setdefault(process.pid, seconds if self.samples == 1 else 0.0)
                self.cpu_last[process.pid] = seconds
                self.first_seen.setdefault((process.pid, process.title), now)
                self.last_seen[(process.pid, process.title)] = now
                titles = self.titles.setdefault(process.pid, {})
                title = process.title
                if title.startswith("ray::") and ")" in title:  # drop the method: ray::MapWorker(...).submit
                    title = title[: title.rindex(")") + 1]
                elif not title.startswith("ray::"):
                    title = title.split(" ")[0]
                titles[title] = titles.get(title, 0) + 1

    def timeline(self, marker: str) -> list[tuple[float, float, int, str]]:
        """(first, last seen, in seconds since reset; pid; title) of every title containing `marker`
        that a process had (a Ray worker's title says what it runs: ray::<class>.<method>)."""
        with self._lock:
            return sorted((t - self.started, self.last_seen[key] - self.started, key[0], key[1])
                          for key, t in self.first_seen.items() if marker in key[1])

    def cpu_by_process(self) -> list[tuple[int, str, float]]:
        """(pid, main title, CPU seconds since reset) per process, busiest first."""
        rows = []
        with self._lock:
            for pid, last in self.cpu_last.items():
                used = last - self.cpu_start.get(pid, 0.0)
                titles = self.titles.get(pid, {})
                busy = {t: n for t, n in titles.items() if t != "ray::IDLE"} or titles
                title = max(busy, key=busy.get) if busy else "?"
                if pid == self.driver:
                    title = "driver (this script)"
                rows.append((pid, title, used))
        return sorted(rows, key=lambda r: -r[2])


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used so far (non-idle time in /proc/stat)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class ForeignLoad:
    """CPU seconds used on the machine by processes that are not ours, over an interval:
    everything /proc/stat counts minus what our process tree used (`ours()` at `stop`)."""

    def __init__(self):
        self.start_busy = machine_busy_seconds()
        self.started = time.monotonic()

    def stop(self, ours: float) -> tuple[float, float]:
        """(foreign CPU seconds, seconds elapsed)."""
        return max(0.0, machine_busy_seconds() - self.start_busy - ours), time.monotonic() - self.started


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def foreign_note(foreign: float, seconds: float) -> str:
    cores = os.cpu_count() or 1
    share = foreign / max(seconds * cores, 1e-9)
    flag = "  <-- OTHER WORK ON THE MACHINE: figure unreliable" if share > 0.1 else ""
    return f"other processes used {foreign:.1f} CPU s ({share:.0%} of the {cores} cores){flag}"


def wait_until_quiet(max_wait: float, busy_limit: float = 0.15, window: float = 3.0) -> None:
    """Wait (at most `max_wait` s) until the machine is nearly idle: less than `busy_limit` of
    its cores busy over `window` s. Other jobs on a small machine skew every figure here."""
    if max_wait <= 0:
        return
    deadline = time.monotonic() + max_wait
    cores = os.cpu_count() or 1
    waited = False
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - before) / (window * cores)
        if busy < busy_limit:
            if waited:
                log(f"machine quiet now ({busy:.0%} busy)")
            return
        if time.monotonic() > deadline:
            log(f"machine still {busy:.0%} busy after waiting {max_wait:.0f} s: measuring anyway")
            return
        if not waited:
            log(f"machine {busy:.0%} busy (other processes): waiting up to {max_wait:.0f} s for it to calm down")
            waited = True


def starvation_problem(workers: int, cpus_per_worker: float) -> str | None:
    """The score stage's own refusal (`check_room_for_decoding`), checked before the minutes of
    set-up: scorer actors holding every CPU would leave none for the decode tasks."""
    from pipelines.stages.image_batches import DECODE_CPUS

    cores = os.cpu_count() or 1
    if workers * cpus_per_worker + DECODE_CPUS > cores:
        return (f"{workers} scorer actor(s) x {cpus_per_worker:g} CPU leave less than the {DECODE_CPUS:g} CPU a "
                f"decode task needs on this {cores}-CPU Ray; the score stage would refuse it (exit 2)")
    return None
