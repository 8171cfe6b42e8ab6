"""`train` for gradient-trained methods (DDPM, ...), with Ray Train: Ray glue only.

The method's implementation owns the model, the loss and the optimizer step (its
`training_state`, pure torch); this module owns the rest, the same for every such method. The
driver selects the rows and builds one Ray Data stream for the whole run: per epoch, CPU tasks
decode + resize the images and augment them (rotation, flips, seeded per image and epoch);
`TorchTrainer` splits it equally over the workers (DDP: gloo on CPU, NCCL on GPU). Rank 0 reports
a checkpoint every `training.checkpoint_every` steps (safetensors + JSON, through Ray Train to
`runs/<run>/steps/<step>/ray-train/` in storage). Ray Train restores the latest one both when a
worker dies (`FailureConfig`) and when the same run is started again. At the end the method says
what of the last checkpoint is published as the model artifact `models/<model>/<version>/`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from pipelines.data.augment import augment_batch
from pipelines.data.synthetic_pairs import pair_rows
from pipelines.errors import InputError, SpecError
from pipelines.models.artifacts import build_models
from pipelines.models.methods import GradientTrainingSpec, MethodRecord, TrainingBatch, TrainingContext
from pipelines.params.train import TrainParams
from pipelines.stages import calibration
from pipelines.stages.base import StepContext, StepResult
from pipelines.stages.image_batches import DECODE_CPUS, check_room_for_decoding, decoded_images
from pipelines.storage import Location

STATE_TENSORS = "training_state.safetensors"
STATE_META = "training_state.json"  # written after the tensors: a checkpoint without it is incomplete


# ---- the worker side ----------------------------------------------------------------------------

def _weights_digest(module: torch.nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save_checkpoint(state: Any, metrics: dict[str, Any]) -> None:
    """Rank 0 writes the state into a local folder; Ray Train uploads it to the run's storage."""
    import ray.train
    from safetensors.torch import save_file

    tensors, meta = state.state_tensors()
    with tempfile.TemporaryDirectory(prefix="adpipe-ckpt-") as folder:
        save_file(tensors, str(Path(folder) / STATE_TENSORS))
        (Path(folder) / STATE_META).write_text(json.dumps(meta, sort_keys=True))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step-{state.step:08d}")


def _restore(state: Any) -> int:
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
    record: MethodRecord = config["record"]
    training: GradientTrainingSpec = config["params"].training
    state = record.load().training_state(config["params"], TrainingContext(
        class_names=tuple(config["class_names"]), device=str(device), seed=training.seed))
    resumed_from = _restore(state)
    if world > 1:
        # Every rank built identical weights from the seed (or loaded the same checkpoint); DDP
        # averages the gradients so they stay identical.
        state.forward_model = ray.train.torch.prepare_model(state.module, move_to_device=False)
    autocast = torch.bfloat16 if config["bf16"] else None
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
            generator = torch.Generator(device=device).manual_seed(
                training.seed * 1_000_003 + state.step * 1009 + rank)
            computing_since = time.monotonic()
            step_metrics = state.train_batch(TrainingBatch(
                pixels=previous["pixels"], categories=previous["category"], clean=previous.get("clean"),
                masks=previous.get("mask")), generator, autocast)
            compute_seconds += time.monotonic() - computing_since
            window_images += len(previous["pixels"]) * world  # every rank trains on as many rows
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


def _final_check(state: Any, world: int, skipped: int, resumed_from: int) -> dict[str, Any]:
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
    """Decoded and augmented images for `epochs`, one after the other, as one Ray dataset (for
    training_data "synthetic_pairs": each epoch's normal/anomaly pairs with clean images and masks)."""
    training: GradientTrainingSpec = params.method_params.training
    pairs = params.record.training_data == "synthetic_pairs"

    def decoded(epoch: int) -> ray.data.Dataset:
        return decoded_images(selection, params.image_size, params.max_image_pixels, with_masks=pairs,
                              per_part=partial(pair_rows, seed=training.seed, epoch=epoch) if pairs else None)

    streams = [decoded(epoch).map_batches(
        augment_batch,  # type: ignore[arg-type]  # Ray types `fn` as fn(batch), leaving out fn_kwargs
        fn_kwargs={"seed": training.seed, "epoch": epoch, "max_rotation": training.max_rotation,
                                  "hflip": training.hflip, "vflip": training.vflip},
        batch_size=None, num_cpus=DECODE_CPUS) for epoch in epochs]
    return streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]


def _ordered_ingest():
    """Ray Train's ingest options with `preserve_order`: by default Ray Data hands the workers
    blocks in the order the decode tasks finish, so two runs of one spec and seed trained on
    differently ordered batches and ended with different models (a detector's AUROC moved by 0.1
    between machines). In order, a one-worker run is reproducible; with several workers which rank
    gets which batch still depends on which asks first."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


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


def fit(params: TrainParams, context: StepContext) -> StepResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.monotonic()
    record, resources = params.record, params.resources
    training: GradientTrainingSpec = params.method_params.training
    check_room_for_decoding(resources.workers, resources.cpus_per_worker, "training worker")
    detector = record.role == "detector"
    rows = calibration.training_rows(params, context, hold_out=detector)
    trained = rows.fit_table.num_rows
    class_names = tuple(rows.categories)
    per_step = resources.batch_size * resources.workers
    fit_selection, epoch_rows = rows.fit, trained
    if record.training_data == "synthetic_pairs":  # each normal image and one anomaly made from it
        fit_selection, epoch_rows = calibration.with_synthetic_anomalies(rows, record.name), 2 * trained
    if epoch_rows < per_step:
        raise InputError(f"{rows.folder.uri} has {trained} normal training images; one step needs "
                         f"batch_size x workers = {per_step} rows")

    step_folder = context.root.join("runs", context.run_id, "steps", context.step.name)
    train_folder = step_folder.join("ray-train")
    resume_step = _latest_checkpoint_step(train_folder)
    steps_per_epoch = epoch_rows // resources.workers // resources.batch_size
    first_epoch = resume_step // steps_per_epoch
    epochs = range(first_epoch, first_epoch + math.ceil((training.steps - resume_step) / steps_per_epoch) + 1)
    gpu = resources.gpus_per_worker > 0
    bf16 = training.precision == "bf16" or (training.precision == "auto" and gpu)
    if bf16 and not gpu:
        raise SpecError(f"{record.name}.training.precision",
                        "bf16 autocast is for GPU workers; set resources.gpus_per_worker")
    context.log("training", method=record.name, images=trained, classes=list(class_names), steps=training.steps,
                resume_from_step=resume_step, workers=resources.workers, epochs=len(epochs))
    metrics_location = step_folder.join("train_metrics.jsonl")

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"record": record, "params": params.method_params, "batch_size": resources.batch_size,
                           "class_names": list(class_names), "threads": max(1, int(resources.cpus_per_worker)),
                           "bf16": bf16, "metrics_location": metrics_location},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker,
                                  **({"GPU": resources.gpus_per_worker} if gpu else {})}),
        run_config=ray.train.RunConfig(
            name="run", storage_path=train_folder.path, storage_filesystem=train_folder.fs,
            failure_config=ray.train.FailureConfig(max_failures=training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=training.keep_checkpoints)),
        datasets={"train": _epoch_stream(fit_selection, params, epochs)},
        dataset_config=_ordered_ingest(),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # noqa: BLE001 - Ray Train wraps the worker's exception
        raise RuntimeError(f"{record.name} training failed: {error}") from error
    if result.checkpoint is None:
        raise RuntimeError(f"{record.name} training ended without a checkpoint")
    tensors, meta = _read_final_state(result.checkpoint)
    final = result.metrics or {}
    train_seconds = time.monotonic() - started
    published = record.load().published(
        params.method_params, TrainingContext(class_names=class_names, device="cpu", seed=training.seed), tensors, meta)

    thresholds: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    if detector:  # calibrated on the held-out normals the training never saw
        models = build_models(record.load(), published.config, published.tensors)
        held = calibration.decode_to_driver(rows.holdout, params.image_size, params.max_image_pixels)
        thresholds, details = calibration.calibrate_thresholds(
            models, held, calibration.validation_images(params, context), params)
    info = {**published.info, "trained_images": trained, "resumed_from": final.get("resumed_from", 0),
            "rank_weight_digests": final.get("rank_weight_digests"), "calibration": details}
    folder = calibration.publish_model(
        params, context, rows, published.config, published.tensors, thresholds=thresholds, info=info,
        metrics={"steps": meta["step"], "train_seconds": round(train_seconds, 2), "final": final,
                 "history": metrics_location.uri},
        started=started, checkpoints=train_folder.uri)
    lines = [f"trained {published.summary} for {meta['step']} steps on {trained} images with "
             f"{resources.workers} worker(s) in {train_seconds:.1f} s -> {folder.uri}"]
    # One network learnt from all `trained` images (the line above): no per-key image count.
    lines += calibration.threshold_lines(thresholds, None, thresholds, details)
    if final.get("resumed_from"):
        lines.append(f"  resumed from the checkpoint at step {final['resumed_from']}")
    if final.get("skipped_undecodable"):
        lines.append(f"  {final['skipped_undecodable']} undecodable rows were skipped in training")
    return StepResult(output=folder.uri, rows=trained, rejected=int(final.get("skipped_undecodable") or 0),
                      details={"steps": meta["step"], "resumed_from": final.get("resumed_from", 0),
                               "metrics": metrics_location.uri, "thresholds": thresholds}, summary=tuple(lines))
