"""`train` with `method: ddpm`: a DDPM U-Net on a dataset's normal training images, with Ray Train.

Ray glue only; the model, losses, optimizer step and checkpoint contents are pure torch in
`pipelines.models.ddpm`. The driver selects the rows and builds one Ray Data stream for the whole
run: per epoch, CPU tasks decode + resize the images and augment them (rotation, flips, seeded per
image and epoch); `TorchTrainer` splits it equally over the workers (DDP: gloo on CPU, NCCL on
GPU). Rank 0 reports a checkpoint every `checkpoint_every` steps (safetensors + JSON, through
Ray Train to `runs/<run>/steps/<step>/ray-train/` in storage). Ray Train restores the latest one
both when a worker dies (`FailureConfig`) and when the same run is started again. At the end the
EMA weights are published as the model artifact `models/<model>/<version>/`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch

from pipelines import datasets
from pipelines.data.augment import augment_batch
from pipelines.errors import InputError, SpecError
from pipelines.models.ddpm import DdpmConfig, OptimConfig, TrainingState, build_scheduler
from pipelines.models.registry import ALL_CATEGORIES, save_artifact
from pipelines.spec import check_positive
from pipelines.stages.base import StepContext, StepResult
from pipelines.stages.image_batches import DECODE_CPUS, check_room_for_decoding, decoded_images, select_rows
from pipelines.storage import Location

if TYPE_CHECKING:
    from pipelines.stages.train import TrainParams

STATE_TENSORS = "training_state.safetensors"
STATE_META = "training_state.json"  # written after the tensors: a checkpoint without it is incomplete


@dataclass(frozen=True)
class DdpmTrainingSpec:
    steps: int = 1000  # optimizer steps (each: batch_size images on every worker)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    class_conditional: bool = False  # one model over all categories, the category embedded as a class
    max_rotation: float = 5.0  # degrees, as DiffAD
    hflip: bool = False
    vflip: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    max_failures: int = 2  # worker failures Ray Train recovers from, each time from the last checkpoint
    keep_checkpoints: int = 2

    def validate(self, path: str) -> DdpmTrainingSpec:
        for name in ("steps", "checkpoint_every", "log_every", "keep_checkpoints"):
            check_positive(getattr(self, name), f"{path}.{name}")
        check_positive(self.max_failures, f"{path}.max_failures", allow_zero=True)
        check_positive(self.seed, f"{path}.seed", allow_zero=True)
        if not 0 <= self.max_rotation <= 180:
            raise SpecError(f"{path}.max_rotation", f"must be in [0, 180] degrees, got {self.max_rotation}")
        return self


def validate_params(params: TrainParams, path: str) -> None:
    prefix = f"{path}." if path else ""
    params.ddpm.validate(f"{prefix}ddpm")
    params.optim.validate(f"{prefix}optim")
    params.training.validate(f"{prefix}training")
    if params.ddpm.num_classes:
        raise SpecError(f"{prefix}ddpm.num_classes", "is set from the dataset's categories: "
                                                     "use training.class_conditional: true instead")


# ---- the worker side ----------------------------------------------------------------------------

def _to_model_input(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float in [-1, 1], the DDPM's data range."""
    return torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _weights_digest(module: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save_checkpoint(state: TrainingState, metrics: dict[str, Any]) -> None:
    """Rank 0 writes the state into a local folder; Ray Train uploads it to the run's storage."""
    import ray.train
    from safetensors.torch import save_file

    tensors, meta = state.state_tensors()
    with tempfile.TemporaryDirectory(prefix="adpipe-ckpt-") as folder:
        save_file(tensors, str(Path(folder) / STATE_TENSORS))
        (Path(folder) / STATE_META).write_text(json.dumps(meta, sort_keys=True))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step-{state.step:08d}")


def _restore(state: TrainingState) -> int:
    """Load Ray Train's latest checkpoint into `state`, if there is one; the step it holds."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        meta = json.loads((Path(folder) / STATE_META).read_text())
        state.load_state_tensors(load_file(str(Path(folder) / STATE_TENSORS)), meta)
    return state.step


def _history_until(location: Location, step: int) -> list[dict[str, Any]]:
    """The metrics an earlier attempt logged up to `step` (later ones are redone)."""
    if not step or not location.exists():
        return []
    lines = [json.loads(line) for line in location.read_bytes().decode().splitlines() if line.strip()]
    return [entry for entry in lines if entry.get("step", 0) <= step]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function (every rank runs it)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    training: DdpmTrainingSpec = config["training"]
    state = TrainingState(config["model"], config["optim"], training.steps, device=str(device), seed=training.seed)
    resumed_from = _restore(state)
    if world > 1:
        # Every rank built identical weights from the seed (or loaded the same checkpoint); DDP
        # averages the gradients so they stay identical.
        state.forward_model = ray.train.torch.prepare_model(state.module, move_to_device=False)
    autocast = torch.bfloat16 if config["bf16"] else None
    classes = {name: index for index, name in enumerate(config["class_names"])}
    conditional = config["model"].num_classes > 0
    log_location: Location | None = config["metrics_location"] if rank == 0 else None
    history = _history_until(log_location, resumed_from) if log_location is not None else []
    if resumed_from:
        history.append({"event": "resumed", "step": resumed_from})

    shard = ray.train.get_dataset_shard("train")
    skipped, window_images, window_steps, window_started = 0, 0, 0, time.monotonic()
    sums: dict[str, float] = {}
    # Where a window's time goes: computing steps, or waiting for the next batch (data-bound).
    compute_seconds = wait_seconds = 0.0
    previous = None
    while state.step < training.steps:
        batches = 0
        waiting_since = time.monotonic()
        for batch in shard.iter_batches(batch_size=config["batch_size"], batch_format="numpy", drop_last=True,
                                        prefetch_batches=2):
            wait_seconds += time.monotonic() - waiting_since
            if state.step >= training.steps:
                break
            batches += 1
            ok = np.array([not error for error in batch["error"]], bool)
            skipped += int((~ok).sum())
            if not ok.any():  # every row undecodable: keep the ranks in step with the last good batch
                if previous is None:
                    continue
                batch, ok = previous, np.ones(len(previous["pixels"]), bool)
            previous = {k: v[ok] for k, v in batch.items()}
            images = _to_model_input(previous["pixels"], device)
            labels = (torch.tensor([classes[c] for c in previous["category"]], device=device)
                      if conditional else None)
            generator = torch.Generator(device=device).manual_seed(
                training.seed * 1_000_003 + state.step * 1009 + rank)
            computing_since = time.monotonic()
            step_metrics = state.train_step(images, labels, generator, autocast_dtype=autocast)
            compute_seconds += time.monotonic() - computing_since
            window_images += len(images) * world  # every rank trains on as many rows
            window_steps += 1
            for key, value in step_metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            last_step = state.step == training.steps
            checkpoint_now = state.step % training.checkpoint_every == 0 or last_step
            if state.step % training.log_every == 0 or checkpoint_now:
                # Means over the steps since the last report; images/s of the whole job (all ranks).
                seconds = time.monotonic() - window_started
                metrics = {"step": state.step, **{k: round(v / window_steps, 6) for k, v in sums.items()},
                           "lr": step_metrics["lr"], "images_per_second": round(window_images / max(seconds, 1e-9), 3),
                           "compute_fraction": round(compute_seconds / max(seconds, 1e-9), 3),
                           "data_wait_fraction": round(wait_seconds / max(seconds, 1e-9), 3)}
                sums, window_images, window_steps, window_started = {}, 0, 0, time.monotonic()
                compute_seconds = wait_seconds = 0.0
                if last_step:  # collective: every rank gets here at the same step
                    metrics.update(_final_check(state, world, skipped, resumed_from))
                if checkpoint_now:
                    if rank == 0:
                        _save_checkpoint(state, metrics)
                    else:
                        ray.train.report(metrics)
                else:
                    ray.train.report(metrics)
                if log_location is not None:
                    history.append(metrics)
                    log_location.write_bytes("".join(json.dumps(h) + "\n" for h in history).encode())
            waiting_since = time.monotonic()
        if batches == 0:
            raise RuntimeError("the training data stream is empty")


def _final_check(state: TrainingState, world: int, skipped: int, resumed_from: int) -> dict[str, Any]:
    """What the last checkpoint records about the run: the ranks' weight digests (DDP must keep them
    identical: a difference is an error, not a warning), undecodable rows skipped over all ranks,
    and the step this attempt resumed from. Ray Train's result carries the last checkpoint's
    metrics, so these go there."""
    import torch.distributed as dist

    digests = [_weights_digest(state.module)]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (digests[0], skipped))
        digests, skipped = [d for d, _ in gathered], sum(s for _, s in gathered)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    return {"rank_weight_digests": digests, "skipped_undecodable": skipped, "resumed_from": resumed_from}


# ---- the driver side ----------------------------------------------------------------------------

def _epoch_stream(selection, params: TrainParams, epochs: range) -> ray.data.Dataset:
    """Decoded and augmented images for `epochs`, one after the other, as one Ray dataset."""
    streams = [decoded_images(selection, params.ddpm.image_size, params.max_image_pixels).map_batches(
        augment_batch, fn_kwargs={"seed": params.training.seed, "epoch": epoch,
                                  "max_rotation": params.training.max_rotation,
                                  "hflip": params.training.hflip, "vflip": params.training.vflip},
        batch_size=None, num_cpus=DECODE_CPUS) for epoch in epochs]
    return streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]


def _latest_checkpoint_step(train_folder: Location) -> int:
    """The step of the checkpoint Ray Train will restore for this run (0: none).

    Ray Train restores what its checkpoint-manager snapshot (JSON, written after a checkpoint is
    registered) names as latest, not the newest folder: a run killed between the upload and the
    snapshot restarts from the checkpoint before. Used only to start the data at the right epoch.
    """
    snapshot = train_folder.join("run", "checkpoint_manager_snapshot.json")
    if not snapshot.exists():
        return 0
    latest = snapshot.read_json().get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def _read_final_state(checkpoint) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    with checkpoint.as_directory() as folder:
        return load_file(str(Path(folder) / STATE_TENSORS)), json.loads((Path(folder) / STATE_META).read_text())


def run_ddpm(params: TrainParams, context: StepContext) -> StepResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.monotonic()
    folder_in = context.input_dataset(params.inputs)
    manifest = datasets.read_manifest(folder_in, table="images")
    resources, training = params.resources, params.training
    check_room_for_decoding(resources.workers, resources.cpus_per_worker, "training worker")

    def normal_train(table: pa.Table) -> np.ndarray:
        mask = pc.and_(pc.equal(table["split"], "train"), pc.equal(table["label"], 0)).fill_null(False)
        if params.categories:
            mask = pc.and_(mask, pc.is_in(table["category"], pa.array(params.categories))).fill_null(False)
        return mask.to_numpy(zero_copy_only=False)

    selection, table = select_rows(folder_in, manifest, normal_train)
    class_names = sorted(set(table["category"].to_pylist())) if table.num_rows else []
    if params.categories:
        missing = sorted(set(params.categories) - set(class_names))
        if missing:
            raise InputError(f"no normal training images for categories {missing} in {folder_in.uri}")
    per_step = resources.batch_size * resources.workers
    if table.num_rows < per_step:
        raise InputError(f"{folder_in.uri} has {table.num_rows} normal training images; one step needs "
                         f"batch_size x workers = {per_step}")
    model_config = replace(params.ddpm, num_classes=len(class_names) if training.class_conditional else 0)

    train_folder = context.root.join("runs", context.run_id, "steps", context.step.name, "ray-train")
    resume_step = _latest_checkpoint_step(train_folder)
    steps_per_epoch = table.num_rows // resources.workers // resources.batch_size
    first_epoch = resume_step // steps_per_epoch
    epochs = range(first_epoch, first_epoch + math.ceil((training.steps - resume_step) / steps_per_epoch) + 1)
    gpu = resources.gpus_per_worker > 0
    bf16 = training.precision == "bf16" or (training.precision == "auto" and gpu)
    if bf16 and not gpu:
        raise SpecError("training.precision", "bf16 autocast is for GPU workers; set resources.gpus_per_worker")
    context.log("training", method="ddpm", images=table.num_rows, classes=class_names, steps=training.steps,
                resume_from_step=resume_step, workers=resources.workers, epochs=len(epochs))
    metrics_location = context.root.join("runs", context.run_id, "steps", context.step.name, "train_metrics.jsonl")

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"model": model_config, "optim": params.optim, "training": training,
                           "batch_size": resources.batch_size, "class_names": class_names,
                           "threads": max(1, int(resources.cpus_per_worker)), "bf16": bf16,
                           "metrics_location": metrics_location},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if gpu else {})}),
        run_config=ray.train.RunConfig(
            name="run", storage_path=train_folder.path, storage_filesystem=train_folder.fs,
            failure_config=ray.train.FailureConfig(max_failures=training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=training.keep_checkpoints)),
        datasets={"train": _epoch_stream(selection, params, epochs)},
    )
    try:
        result = trainer.fit()
    except Exception as error:  # noqa: BLE001 - Ray Train wraps the worker's exception
        raise RuntimeError(f"DDPM training failed: {error}") from error
    if result.checkpoint is None:
        raise RuntimeError("DDPM training ended without a checkpoint")
    tensors, meta = _read_final_state(result.checkpoint)
    ema = {name[len("ema/"):]: tensor for name, tensor in tensors.items() if name.startswith("ema/")}
    final = result.metrics or {}
    train_seconds = time.monotonic() - started

    folder_out = context.root.join("models", params.outputs.model, params.outputs.version or context.run_id)
    info = {"class_names": class_names, "steps": meta["step"], "optim": meta.get("optim"),
            "scheduler": dict(build_scheduler(model_config).config), "dataset": folder_in.uri,
            "trained_images": table.num_rows, "resumed_from": final.get("resumed_from", 0),
            "rank_weight_digests": final.get("rank_weight_digests"), "weights": "ema"}
    save_artifact(folder_out, method="ddpm", config=model_config, tensors={ALL_CATEGORIES: ema},
                  info=info, lineage=context.lineage(input=folder_in.uri, checkpoints=train_folder.uri))
    folder_out.join("metrics.json").write_json({
        "steps": meta["step"], "train_seconds": round(train_seconds, 2), "final": final,
        "history": metrics_location.uri})
    lines = [f"trained ddpm ({model_config.image_size}px, channels {list(model_config.block_out_channels)}, "
             f"{'class-conditional over ' + str(len(class_names)) + ' classes' if model_config.num_classes else 'unconditional'}"
             f"{', learned variance' if model_config.learned_variance else ''}) for {meta['step']} steps on "
             f"{table.num_rows} images with {resources.workers} worker(s) in {train_seconds:.1f} s -> {folder_out.uri}"]
    if final.get("resumed_from"):
        lines.append(f"  resumed from the checkpoint at step {final['resumed_from']}")
    if final.get("skipped_undecodable"):
        lines.append(f"  {final['skipped_undecodable']} undecodable rows were skipped in training")
    return StepResult(output=folder_out.uri, rows=table.num_rows, rejected=int(final.get("skipped_undecodable") or 0),
                      details={"steps": meta["step"], "resumed_from": final.get("resumed_from", 0),
                               "metrics": metrics_location.uri}, summary=tuple(lines))
