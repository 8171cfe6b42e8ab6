"""`train` for methods fitted by streamed statistics (PaDiM, ...): Ray glue only.

Ray Data decodes the selected images in CPU tasks; `streaming_split` hands one stream to each of
`workers` fitter actors; each keeps running statistics per category (memory independent of the
number of images) through the method's fitter; the driver merges the partial statistics and turns
them into models. A seeded fraction of the normal training images is first held out to calibrate
the decision threshold, then added to the statistics, so the published model has fitted every
normal training image (the reference protocol) and its threshold comes from images the
calibrating model had not seen.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from pipelines.errors import InputError
from pipelines.models.artifacts import ALL_CATEGORIES
from pipelines.models.inference import to_tensor
from pipelines.models.methods import MethodRecord
from pipelines.params.train import TrainParams
from pipelines.stages import calibration
from pipelines.stages.base import StepContext, StepResult
from pipelines.stages.image_batches import decoded_images


@ray.remote
class StatisticsFitActor:
    """Keeps one method's running statistics per category over one stream of decoded images."""

    def __init__(self, record: MethodRecord, config: Any, plan: Any, threads: int):
        torch.set_num_threads(max(1, threads))
        self.fitter = record.load().fitter(config, plan)

    def fit(self, stream, batch_size: int, per_category: bool) -> dict:
        statistics: dict[str, Any] = {}
        skipped = []
        for batch in stream.iter_batches(batch_size=batch_size, batch_format="numpy"):
            ok = np.array([not e for e in batch["error"]], bool)
            skipped += [(i, e) for i, e in zip(batch["image_id"][~ok], batch["error"][~ok])]
            keys = batch["category"] if per_category else np.full(len(ok), ALL_CATEGORIES, object)
            for key in sorted(set(keys[ok])):
                chosen = ok & (keys == key)
                if key not in statistics:
                    statistics[key] = self.fitter.new_statistics()
                self.fitter.update(statistics[key], to_tensor(batch["pixels"][chosen]))
        return {"statistics": statistics, "skipped": skipped}


def fit(params: TrainParams, context: StepContext) -> StepResult:
    started = time.monotonic()
    record, config, resources = params.record, params.method_params, params.resources
    detector = record.role == "detector"
    rows = calibration.training_rows(params, context, hold_out=detector)
    if rows.fit_table.num_rows < 2:
        raise InputError(f"{rows.folder.uri} has {rows.fit_table.num_rows} normal training images to fit on; need >= 2")
    context.log("fitting", method=record.name, images=rows.fit_table.num_rows, holdout=rows.holdout_count,
                categories=rows.categories)

    implementation = record.load()
    plan = implementation.plan(config)  # drawn once: every worker and the driver share it
    fitter = implementation.fitter(config, plan)
    stream = decoded_images(rows.fit, params.image_size, params.max_image_pixels)
    splits = stream.streaming_split(resources.workers, equal=False)
    # The fitters reserve no logical CPU: Ray Data's decode tasks feeding them need the CPUs, and
    # fitters holding them all would starve their own input (a deadlock on a small machine).
    # Their compute threads are set from cpus_per_worker instead; GPUs are reserved as usual.
    # attr-defined: mypy keeps a decorated class's own type, not ray.remote's (python/mypy#3135).
    actors = [StatisticsFitActor.options(num_cpus=0, num_gpus=resources.gpus_per_worker)  # type: ignore[attr-defined]
              .remote(record, config, plan, int(resources.cpus_per_worker)) for _ in range(resources.workers)]
    try:
        results = ray.get([a.fit.remote(s, resources.batch_size, params.one_model_per_category)
                           for a, s in zip(actors, splits)])
    finally:
        for actor in actors:
            ray.kill(actor)
    statistics: dict[str, Any] = {}
    skipped = []
    for result in results:
        skipped += result["skipped"]
        for key, partial in result["statistics"].items():
            statistics[key] = fitter.merge(statistics[key], partial) if key in statistics else partial
    if not statistics:
        raise InputError(f"none of the {rows.fit_table.num_rows} training images of {rows.folder.uri} could be "
                         "decoded: " + "; ".join(f"{i}: {e}" for i, e in skipped[:3]))
    models = {key: fitter.model(s) for key, s in sorted(statistics.items())}
    fit_seconds = time.monotonic() - started

    thresholds: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    if detector:
        held = calibration.decode_to_driver(rows.holdout, params.image_size, params.max_image_pixels)
        thresholds, details = calibration.calibrate_thresholds(
            models, held, calibration.validation_images(params, context), params)
        # Statistics add up: once the held-out normals have calibrated the threshold, they join the fit.
        for key in models:
            chosen = held["ok"] & ((held["category"] == key) if key != ALL_CATEGORIES else True)
            pixels = held["pixels"][chosen]
            for start in range(0, len(pixels), resources.batch_size):
                fitter.update(statistics[key], to_tensor(pixels[start:start + resources.batch_size]))
            models[key] = fitter.model(statistics[key])

    counts = {key: int(getattr(s, "count", 0)) for key, s in statistics.items()}
    info = {"fitted_images": counts, "calibration": details, "skipped_undecodable": len(skipped),
            "fit_seconds": round(fit_seconds, 2)}
    folder = calibration.publish_model(
        params, context, rows, config, {key: model.tensors() for key, model in models.items()},
        thresholds=thresholds, info=info,
        metrics={"fitted_images": counts, "calibration": details, "fit_seconds": round(fit_seconds, 2)},
        started=started)
    described = getattr(implementation, "describe", lambda _: record.name)(config)
    lines = [f"fitted {described} on {sum(counts.values())} normal images in {fit_seconds:.1f} s -> {folder.uri}"]
    lines += calibration.threshold_lines(models, counts, thresholds, details)
    if skipped:
        lines.append(f"  {len(skipped)} training images could not be decoded and were not fitted: "
                     + ", ".join(f"{i} ({e})" for i, e in skipped[:5]))
    return StepResult(output=folder.uri, rows=sum(counts.values()), rejected=len(skipped),
                      details={"fitted_images": counts, "thresholds": thresholds}, summary=tuple(lines))
