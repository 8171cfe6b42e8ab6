"""DDPM training with Ray Train on real Ray and the real S3 store: 2 workers (DDP over gloo),
checkpoints, resume of an interrupted run, recovery of a killed worker, export, sampling.

Tiny U-Nets (16 px, about 0.1 M parameters) and few steps: Ray Train's start-up dominates.
"""

from __future__ import annotations

import io
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

from imagefiles import write
from pipelines import datasets
from pipelines.errors import InputError, SpecError
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
TINY = {"image_size": 16, "block_out_channels": [16, 32], "layers_per_block": 1}
# Optimizer steps of the resume test: after the first checkpoint (step 4) a worker is killed, after a
# later one the driver; 32 leaves room for both.
STEPS = 32


def quiet(*_args, **_kwargs) -> None:
    pass


def flat_images(folder: Path, count: int, categories: tuple[str, ...] = ("a",)) -> Path:
    """A trivially learnable dataset: nearly flat images, one shade per category (MVTec layout)."""
    rng = np.random.default_rng(0)
    for c, category in enumerate(categories):
        for i in range(count):
            shade = 60 + 120 * c
            pixels = np.clip(shade + rng.normal(0, 2, (24, 24, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            write(folder / category / "train" / "good" / f"{i:03d}.png", buffer.getvalue())
    return folder


def ddpm_pipeline(root: str, images: Path, steps: int, checkpoint_every: int, conditional: bool,
                  learned_variance: bool, samples: int = 4) -> dict:
    return {
        "kind": "pipeline", "name": "ddpm-test", "storage": {"root": root}, "ray": {"address": "local"},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "mvtec", "uri": str(images)},
             "outputs": {"dataset": "flat"}},
            {"name": "train", "kind": "train", "method": "ddpm", "inputs": {"dataset": "step:ingest"},
             "outputs": {"model": "ddpm-flat"},
             "ddpm": {"model": {**TINY, "learned_variance": learned_variance}, "class_conditional": conditional,
                      "optim": {"lr": 0.002, "warmup_steps": 2, "ema_decay": 0.9},
                      "training": {"steps": steps, "checkpoint_every": checkpoint_every, "log_every": 2,
                                   "max_failures": 2}},
             "resources": {"workers": 2, "cpus_per_worker": 0.5, "batch_size": 4}},
            {"name": "sample", "kind": "sample", "model": {"uri": "step:train"}, "count": samples, "steps": 5,
             "outputs": {"dataset": "flat-samples", "rows_per_part": 2}},
        ],
    }


def registered_step(train_folder: Location) -> int:
    """The checkpoint Ray Train has registered (and will restore): its manager's JSON snapshot."""
    snapshot = train_folder.join("run", "checkpoint_manager_snapshot.json")
    if not snapshot.exists():
        return 0
    latest = snapshot.read_json().get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def history(root: str, run_id: str) -> list[dict]:
    location = Location.parse(f"{root}/runs/{run_id}/steps/train/train_metrics.jsonl")
    return [json.loads(line) for line in location.read_bytes().decode().splitlines()]


def ray_train_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_run_survives_a_killed_worker_then_a_killed_driver_and_exports_a_model_that_samples(tmp_path, s3_root):
    """2 workers on local Ray, checkpoints in the local S3 store. A training worker is killed after
    the first checkpoint: Ray Train restarts the workers from it. Then the driver is killed (with
    its embedded Ray) and the run started again: it continues at its last checkpoint, and the
    exported model samples images. (One run for both failures: each costs a Ray Train start.)"""
    images = flat_images(tmp_path / "images", 8, categories=("a", "b"))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(ddpm_pipeline(s3_root, images, steps=STEPS, checkpoint_every=4,
                                                 conditional=True, learned_variance=True)))
    train_folder = Location.parse(f"{s3_root}/runs/ddpm-1/steps/train/ray-train")
    env = {**os.environ, "ADPIPE_RAY_LOG_TO_DRIVER": "0"}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(spec), "--run-id", "ddpm-1"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 400
    killed_worker = None
    while time.monotonic() < deadline and process.poll() is None:
        registered = registered_step(train_folder)
        if killed_worker is None and registered:
            workers = ray_train_worker_pids()
            if workers:  # a checkpoint to restart from: kill one training worker
                killed_worker, killed_at = workers[-1], registered
                os.kill(killed_worker, signal.SIGKILL)
        elif killed_worker is not None and registered > killed_at:
            break  # the restarted workers made progress: now the driver goes
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the driver, its embedded Ray and the training workers
    process.wait(timeout=30)
    saved = registered_step(train_folder)
    assert killed_worker is not None, "no training worker to kill"
    assert 0 < saved < STEPS, f"the run should have been killed part-way (registered checkpoint: step {saved})"
    assert not Location.parse(f"{s3_root}/models/ddpm-flat/ddpm-1/config.json").exists()

    rerun = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(spec), "--run-id", "ddpm-1"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    model = Location.parse(f"{s3_root}/models/ddpm-flat/ddpm-1")
    config = model.join("config.json").read_json()
    info = config["info"]
    assert info["steps"] == STEPS
    assert saved <= info["resumed_from"] < STEPS, "must continue from its checkpoint, not from zero"
    assert "resumed from the checkpoint" in rerun.stdout
    digests = info["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "DDP ranks must hold identical weights"
    assert config["config"]["num_classes"] == 2 and info["class_names"] == ["a", "b"]
    assert config["config"]["learned_variance"] is True

    events = history(s3_root, "ddpm-1")
    resumes = [h["step"] for h in events if h.get("event") == "resumed"]
    assert len(resumes) == 2 and resumes[0] >= 4 and resumes[1] >= saved, \
        f"a resume after the killed worker and one after the killed driver, got {resumes}"
    logged = [h for h in events if "loss" in h]
    assert [h["step"] for h in logged] == sorted({h["step"] for h in logged}), "no step logged twice"
    assert logged[-1]["step"] == STEPS
    assert np.mean([h["mse"] for h in logged[-3:]]) < 0.6 * np.mean([h["mse"] for h in logged[:2]]), \
        "the noise-prediction loss should fall on a trivially learnable dataset"

    samples = datasets.read_table(Location.parse(f"{s3_root}/datasets/flat-samples/ddpm-1"))
    assert samples.num_rows == 4
    assert sorted(samples.column("category").to_pylist()) == ["a", "a", "b", "b"]
    for png in samples.column("image").to_pylist():
        assert Image.open(io.BytesIO(png)).size == (16, 16)
    synthesis = samples.column("synthesis").to_pylist()[0]
    assert synthesis["method"] == "ddpm-sample" and synthesis["model_version"] == "ddpm-flat@ddpm-1"


def test_bad_ddpm_specs_exit_2_naming_the_field(tmp_path, file_root):
    base = ddpm_pipeline(file_root, tmp_path, steps=4, checkpoint_every=2, conditional=False, learned_variance=False)

    def broken(**changes) -> dict:
        spec = json.loads(json.dumps(base))
        for dotted, value in changes.items():
            target = spec["steps"][1]
            *parents, leaf = dotted.split("__")
            for key in parents:
                target = target[key]
            target[leaf] = value
        return spec

    with pytest.raises(SpecError, match=r"ddpm\.model\.image_size.*multiple of 2"):
        parse_spec(broken(ddpm__model__image_size=15))
    with pytest.raises(SpecError, match=r"resources\.workers"):
        parse_spec(broken(resources__workers=0))
    with pytest.raises(SpecError, match=r"ddpm\.model\.num_classes"):
        parse_spec(broken(ddpm__model__num_classes=3))
    with pytest.raises(SpecError, match=r"ddpm\.training\.steps"):
        parse_spec(broken(ddpm__training__steps=0))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(broken(ddpm__model__image_size=15)))
    cli = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(bad)], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert cli.returncode == 2 and "image_size" in cli.stderr, cli.stderr


def test_old_ddpm_layouts_and_other_methods_keys_are_refused_saying_where_they_go(tmp_path, file_root):
    """Since the method contract a method's parameters live in its own block only."""
    base = ddpm_pipeline(file_root, tmp_path, steps=4, checkpoint_every=2, conditional=False, learned_variance=False)
    train = base["steps"][1]
    old = {**train, "ddpm": TINY, "optim": {"lr": 0.01}}
    with pytest.raises(SpecError, match=r"steps\[1\]\.optim: is a parameter of method 'ddpm'.*ddpm\.optim"):
        parse_spec({**base, "steps": [base["steps"][0], old]})
    flat = {**train, "ddpm": TINY}
    with pytest.raises(SpecError, match=r"steps\[1\]\.ddpm\.image_size: .*write steps\[1\]\.ddpm\.model\.image_size"):
        parse_spec({**base, "steps": [base["steps"][0], flat]})
    moved = {**train, "ddpm": {"training": {"class_conditional": True}}}
    with pytest.raises(SpecError, match=r"ddpm\.training\.class_conditional: is written as .*ddpm\.class_conditional"):
        parse_spec({**base, "steps": [base["steps"][0], moved]})
    padim = {k: v for k, v in train.items() if k != "ddpm"} | {"method": "padim", "optim": {"lr": 0.01}}
    with pytest.raises(SpecError, match=r"steps\[1\]\.optim: unknown key 'optim': method 'padim' has no such "
                                        r"parameter \(it is one of [^)]*'ddpm'[^)]*\)"):
        parse_spec({**base, "steps": [base["steps"][0], padim]})
    threshold = {**train, "threshold": {"quantile": 0.9}}
    with pytest.raises(SpecError, match=r"steps\[1\]\.threshold: method 'ddpm' is a generator"):
        parse_spec({**base, "steps": [base["steps"][0], threshold]})


def test_training_on_a_missing_dataset_is_an_input_error(ray_session, file_root):
    spec = {"kind": "train", "name": "ddpm-missing", "storage": {"root": file_root}, "method": "ddpm",
            "inputs": {"dataset": f"{file_root}/datasets/nothing/1"}, "outputs": {"model": "m"},
            "ddpm": {"model": TINY}, "resources": {"workers": 1, "cpus_per_worker": 0.5, "batch_size": 2}}
    with pytest.raises(InputError, match="nothing"):
        run_job(parse_spec(spec), echo=quiet)


def test_the_small_cpu_job_spec_runs_end_to_end(ray_session, s3_root):
    """jobs/train-ddpm-small.yaml as users run it (ELPV -> DDPM on 2 workers -> samples), on the
    test's S3 prefix."""
    spec = yaml.safe_load((REPO / "jobs" / "train-ddpm-small.yaml").read_text())
    spec["storage"]["root"] = s3_root
    # Shorter than the shipped 150 steps and 50 sampling steps (the suite's time budget); every
    # stage and setting of the spec is otherwise as shipped.
    train, sample = spec["steps"][1], spec["steps"][2]
    train["ddpm"]["training"].update(steps=30, checkpoint_every=10, log_every=10)
    sample["steps"] = 10
    outcome = run_job(parse_spec(spec), run_id="small-1", echo=quiet)
    samples = datasets.read_table(Location.parse(outcome.results["sample"].output))
    assert samples.num_rows == 16
    assert {Image.open(io.BytesIO(png)).size for png in samples.column("image").to_pylist()} == {(32, 32)}
    info = Location.parse(outcome.results["train-ddpm"].output).join("config.json").read_json()["info"]
    assert info["steps"] == 30 and info["class_names"] == ["mono"]
