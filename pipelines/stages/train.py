"""`train`: fit a model on the normal training images of a dataset -> a model artifact.

`method: ddpm` trains a diffusion U-Net with Ray Train (`pipelines.stages.train_ddpm`). PaDiM fits by streamed sufficient statistics, not gradient descent: Ray Data decodes the
selected images in CPU tasks, `streaming_split` hands one stream to each of `workers` fitter
actors, each keeps per-category running sums (memory independent of the number of images), and
the driver adds the partial sums and inverts the covariances. A seeded fraction of the normal
training images is first held out to calibrate the decision threshold, then added to the fit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from pipelines import datasets
from pipelines.data.images import DEFAULT_MAX_PIXELS
from pipelines.data.sampling import in_fraction
from pipelines.errors import InputError, SpecError
from pipelines.models.ddpm import DdpmConfig, OptimConfig
from pipelines.models.inference import score_in_slots, to_tensor
from pipelines.models.padim import Padim, PadimConfig, PadimStatistics
from pipelines.models.registry import ALL_CATEGORIES, TrainedDetector
from pipelines.models.thresholds import calibrate
from pipelines.spec import (DatasetInputSpec, ResourcesSpec, StepSpec, check_image_size, check_name, check_names,
                            check_positive)
from pipelines.stages import train_ddpm
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.stages.train_ddpm import DdpmTrainingSpec
from pipelines.stages.image_batches import decoded_images, select_rows
from pipelines.storage import Location


@dataclass(frozen=True)
class ModelOutputSpec:
    """A model a step publishes: `models/<model>/<version>/` under the storage root."""

    model: str
    version: str | None = None  # default: the run id

    def validate(self, path: str) -> ModelOutputSpec:
        check_name(self.model, f"{path}.model")
        if self.version is not None:
            check_name(self.version, f"{path}.version")
        return self


@dataclass(frozen=True)
class ThresholdSpec:
    method: Literal["normal_quantile", "f1_max"] = "normal_quantile"
    quantile: float = 0.99
    holdout_fraction: float = 0.1  # of the normal training images: calibrate first, then join the fit
    # Labelled validation images (label 0/1; e.g. synthetic anomalies) for f1_max. Keep them apart
    # from the images you evaluate on.
    validation: DatasetInputSpec | None = None
    validation_split: Literal["train", "test"] | None = None

    def validate(self, path: str) -> ThresholdSpec:
        if not 0.0 < self.quantile < 1.0:
            raise SpecError(f"{path}.quantile", f"must be in (0, 1), got {self.quantile}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise SpecError(f"{path}.holdout_fraction", f"must be in (0, 1), got {self.holdout_fraction}")
        if self.method == "f1_max" and self.validation is None:
            raise SpecError(f"{path}.validation", "method f1_max needs labelled validation images: "
                                                  "set validation.dataset (or use method normal_quantile)")
        return self


@dataclass(frozen=True)
class TrainParams:
    method: Literal["padim", "ddpm"]
    inputs: DatasetInputSpec
    outputs: ModelOutputSpec
    padim: PadimConfig = PadimConfig()  # method padim
    per_category: bool = True  # padim: one model per category, or one over all of them
    categories: tuple[str, ...] | None = None  # default: every category with normal training images
    threshold: ThresholdSpec = ThresholdSpec()  # padim
    ddpm: DdpmConfig = DdpmConfig()  # method ddpm: the U-Net and its noise schedule
    optim: OptimConfig = OptimConfig()  # ddpm
    training: DdpmTrainingSpec = DdpmTrainingSpec()  # ddpm: steps, checkpoints, augmentation
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    resources: ResourcesSpec = ResourcesSpec()

    def validate(self, path: str) -> TrainParams:
        # `padim` is checked by PadimConfig.validate and `ddpm` / `optim` / `training` by theirs,
        # whatever the method: a wrong value is an error also where this method ignores it.
        prefix = f"{path}." if path else ""
        check_names(self.categories, f"{prefix}categories")
        check_positive(self.max_image_pixels, f"{prefix}max_image_pixels")
        # DdpmConfig.validate checks that the U-Net can halve it; the bounds are every image size's.
        check_image_size(self.ddpm.image_size, f"{prefix}ddpm.image_size", minimum=8)
        if self.method == "ddpm":
            train_ddpm.validate_params(self, path)
        return self


def held_out(image_id: str, seed: int, fraction: float) -> bool:
    return in_fraction("holdout", seed, image_id, fraction)


@ray.remote
class PadimFitter:
    """Keeps running PaDiM statistics per category over one stream of decoded images."""

    def __init__(self, config: PadimConfig, channel_indices: torch.Tensor, threads: int):
        torch.set_num_threads(max(1, threads))
        self.model = Padim(config, channel_indices=channel_indices)

    def fit(self, stream, batch_size: int, per_category: bool) -> dict:
        statistics: dict[str, PadimStatistics] = {}
        skipped = []
        for batch in stream.iter_batches(batch_size=batch_size, batch_format="numpy"):
            ok = np.array([not e for e in batch["error"]], bool)
            skipped += [(i, e) for i, e in zip(batch["image_id"][~ok], batch["error"][~ok])]
            keys = batch["category"] if per_category else np.full(len(ok), ALL_CATEGORIES, object)
            for key in sorted(set(keys[ok])):
                chosen = ok & (keys == key)
                embedding = self.model.embed(to_tensor(batch["pixels"][chosen]))
                statistics.setdefault(key, self.model.new_statistics()).update(embedding)
        return {"statistics": {k: (s.count, s.sum, s.sum_outer) for k, s in statistics.items()}, "skipped": skipped}


def fit_statistics(selection, params: TrainParams, channel_indices: torch.Tensor) -> tuple[dict, list]:
    workers = params.resources.workers
    stream = decoded_images(selection, params.padim.image_size, params.max_image_pixels)
    splits = stream.streaming_split(workers, equal=False)
    # The fitters reserve no logical CPU: Ray Data's decode tasks feeding them need the CPUs, and
    # fitters holding them all would starve their own input (a deadlock on a small machine).
    # Their compute threads are set from cpus_per_worker instead; GPUs are reserved as usual.
    fitters = [PadimFitter.options(num_cpus=0, num_gpus=params.resources.gpus_per_worker)
               .remote(params.padim, channel_indices, int(params.resources.cpus_per_worker))
               for _ in range(workers)]
    results = ray.get([f.fit.remote(s, params.resources.batch_size, params.per_category)
                       for f, s in zip(fitters, splits)])
    for fitter in fitters:
        ray.kill(fitter)
    merged: dict[str, PadimStatistics] = {}
    skipped = []
    for result in results:
        skipped += result["skipped"]
        for key, (count, total, total_outer) in result["statistics"].items():
            partial = PadimStatistics(params.padim.kept_channels, total.shape[0])
            partial.count, partial.sum, partial.sum_outer = count, total, total_outer
            merged[key] = merged[key].merge(partial) if key in merged else partial
    return merged, skipped


def _decode_to_driver(selection, params: TrainParams) -> dict[str, np.ndarray]:
    """Decoded rows of a small selection, gathered on the driver."""
    size = params.padim.image_size
    empty = {"pixels": np.zeros((0, size, size, 3), np.uint8), "ok": np.zeros(0, bool),
             "category": np.zeros(0, object), "label": np.zeros(0, np.int8)}
    if not any(s.rows for s in selection):
        return empty
    stream = decoded_images(selection, size, params.max_image_pixels)
    batches = list(stream.iter_batches(batch_size=None, batch_format="numpy"))
    return {"pixels": np.concatenate([b["pixels"] for b in batches]),
            "ok": np.concatenate([[not e for e in b["error"]] for b in batches]).astype(bool),
            "category": np.concatenate([b["category"] for b in batches]),
            "label": np.concatenate([b["label"] for b in batches])}


def _synthesis_sources(params: TrainParams, context: StepContext) -> set[str]:
    """Image ids that the validation dataset's synthetic rows were made from."""
    folder = context.input_dataset(params.threshold.validation)
    datasets.read_manifest(folder, table="images")
    provenance = datasets.read_table(folder, columns=["synthesis"]).column("synthesis")
    return {s["source_image_id"] for s in provenance.to_pylist() if s and s.get("source_image_id")}


def _validation_images(params: TrainParams, context: StepContext) -> dict[str, np.ndarray]:
    folder = context.input_dataset(params.threshold.validation)
    manifest = datasets.read_manifest(folder, table="images")
    split = params.threshold.validation_split

    def labelled(table: pa.Table) -> np.ndarray:
        mask = pc.is_valid(table["label"])
        if split is not None:
            mask = pc.and_(mask, pc.equal(table["split"], split)).fill_null(False)
        return mask.to_numpy(zero_copy_only=False)

    selection, _ = select_rows(folder, manifest, labelled)
    return _decode_to_driver(selection, params)


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: TrainParams = step.params
    if params.method == "ddpm":
        return train_ddpm.run_ddpm(params, context)
    return run_padim(params, context)


def run_padim(params: TrainParams, context: StepContext) -> StepResult:
    started = time.monotonic()
    folder_in = context.input_dataset(params.inputs)
    manifest = datasets.read_manifest(folder_in, table="images")
    seed, fraction = params.padim.seed, params.threshold.holdout_fraction

    def normal_train(table: pa.Table) -> np.ndarray:
        mask = pc.and_(pc.equal(table["split"], "train"), pc.equal(table["label"], 0)).fill_null(False)
        if params.categories:
            mask = pc.and_(mask, pc.is_in(table["category"], pa.array(params.categories))).fill_null(False)
        return mask.to_numpy(zero_copy_only=False)

    # The normal images synthetic validation anomalies were made from are held out too: a model
    # that had fitted an anomaly's own source image would score it lower than an unseen normal, and
    # the calibration would compare unlike with unlike. Like all held-out images they join the fit
    # once the threshold is set.
    sources = _synthesis_sources(params, context) if params.threshold.validation else set()

    def ids_hold(table: pa.Table) -> np.ndarray:
        return np.array([held_out(i, seed, fraction) or i in sources for i in table["image_id"].to_pylist()], bool)

    fit_rows, fit_table = select_rows(folder_in, manifest, lambda t: normal_train(t) & ~ids_hold(t))
    hold_rows, hold_table = select_rows(folder_in, manifest, lambda t: normal_train(t) & ids_hold(t))
    categories = sorted(set(fit_table["category"].to_pylist())) if fit_table.num_rows else []
    if params.categories:
        missing = sorted(set(params.categories) - set(categories))
        if missing:
            raise InputError(f"no normal training images for categories {missing} in {folder_in.uri}")
    if fit_table.num_rows < 2:
        raise InputError(f"{folder_in.uri} has {fit_table.num_rows} normal training images to fit on; need >= 2")
    context.log("fitting", method="padim", images=fit_table.num_rows, holdout=hold_table.num_rows,
                categories=categories)

    reference = Padim(params.padim)  # draws the channel subset once, from the seed
    statistics, skipped = fit_statistics(fit_rows, params, reference.channel_indices)
    if not statistics:
        raise InputError(f"none of the {fit_table.num_rows} training images of {folder_in.uri} could be decoded: "
                         + "; ".join(f"{i}: {e}" for i, e in skipped[:3]))
    models = {}
    for key, stats in sorted(statistics.items()):
        model = Padim(params.padim, channel_indices=reference.channel_indices)
        model.set_gaussian(stats)
        models[key] = model.eval()
    fit_seconds = time.monotonic() - started

    # Calibrate on the held-out normals (+ labelled validation images for f1_max), scored on the
    # driver: small sets.
    held = _decode_to_driver(hold_rows, params)
    validation = _validation_images(params, context) if params.threshold.validation else None
    thresholds, calibration = {}, {}
    for key, model in models.items():
        chosen = held["ok"] & ((held["category"] == key) if key != ALL_CATEGORIES else True)
        if not chosen.any():
            raise InputError(f"no held-out normal images for {key!r} to calibrate a threshold "
                             f"(holdout_fraction {fraction}); raise threshold.holdout_fraction")
        scores, _ = score_in_slots(model, held["pixels"][chosen], np.arange(int(chosen.sum())),
                                   params.resources.batch_size)
        anomalous = None
        if validation is not None:
            mine = validation["ok"] & ((validation["category"] == key) if key != ALL_CATEGORIES else True)
            if not (mine & (validation["label"] == 1)).any():
                raise InputError(f"no labelled anomalous validation images for {key!r} in "
                                 f"{params.threshold.validation.dataset}")
            validation_scores, _ = score_in_slots(model, validation["pixels"][mine], np.arange(int(mine.sum())),
                                                  params.resources.batch_size)
            labels = validation["label"][mine]
            scores = np.concatenate([scores, validation_scores[labels == 0]])
            anomalous = validation_scores[labels == 1]
        result = calibrate(scores, anomalous, params.threshold.method, params.threshold.quantile)
        thresholds[key] = result.threshold
        calibration[key] = asdict(result)
        pixels = held["pixels"]
        # PaDiM's statistics add up: once the held-out normals have calibrated the threshold, they
        # join the fit, so the published model uses every normal training image (the reference
        # protocol) and the threshold comes from images the calibrating model had not seen.
        for start in range(0, int(chosen.sum()), params.resources.batch_size):
            chunk = pixels[chosen][start:start + params.resources.batch_size]
            statistics[key].update(model.embed(to_tensor(chunk)))
        model.set_gaussian(statistics[key])

    folder_out = context.root.join("models", params.outputs.model, params.outputs.version or context.run_id)
    counts = {key: s.count for key, s in statistics.items()}
    detector = TrainedDetector(
        method="padim", config=params.padim, models=models, thresholds=thresholds,
        info={"fitted_images": counts, "calibration": calibration, "skipped_undecodable": len(skipped),
              "fit_seconds": round(fit_seconds, 2), "dataset": folder_in.uri},
    )
    detector.save(folder_out, lineage=context.lineage(input=folder_in.uri))
    folder_out.join("metrics.json").write_json({"fitted_images": counts, "calibration": calibration,
                                                "fit_seconds": round(fit_seconds, 2),
                                                "total_seconds": round(time.monotonic() - started, 2)})
    lines = [f"fitted padim ({params.padim.backbone}, stages {list(params.padim.stages)}, "
             f"{params.padim.kept_channels} channels, {params.padim.image_size}px) on "
             f"{sum(counts.values())} normal images in {fit_seconds:.1f} s -> {folder_out.uri}"]
    lines += [f"  {key}: {counts[key]} images, threshold {thresholds[key]:.4f} "
              f"({calibration[key]['method']} over {calibration[key]['normal_images']} held-out normals)"
              for key in sorted(models)]
    if skipped:
        lines.append(f"  {len(skipped)} training images could not be decoded and were not fitted: "
                     + ", ".join(f"{i} ({e})" for i, e in skipped[:5]))
    return StepResult(output=folder_out.uri, rows=sum(counts.values()), rejected=len(skipped),
                      details={"fitted_images": counts, "thresholds": thresholds}, summary=tuple(lines))


def published_record(step: StepSpec, context: StepContext) -> Location:
    params: TrainParams = step.params
    return context.root.join("models", params.outputs.model, params.outputs.version or context.run_id, "config.json")


KIND = StageKind(name="train", params=TrainParams, run=run, published_record=published_record)
