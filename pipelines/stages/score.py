"""`score`: stream an images dataset (an archive) through a model -> a scores dataset.

Ray Data: one CPU decode task per input part -> a pool of scorer actors (`ActorPoolStrategy`,
GPUs when asked for) -> the driver, which collects each input part's rows and writes the matching
output part as soon as it is complete (same index, so names are deterministic; parts finished by
an earlier attempt with the same input are skipped). Rows that cannot be decoded or scored are kept
with `error` set; the job succeeds and counts them. The manifest is written last.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch

from pipelines import datasets
from pipelines.data.images import DEFAULT_MAX_PIXELS
from pipelines.models.inference import encode_map, score_in_slots
from pipelines.models.registry import ModelCard, TrainedDetector
from pipelines.errors import InputError
from pipelines.spec import (NAME_PATTERN, NAME_RULE, DatasetInputSpec, ModelInputSpec, ResourcesSpec, StepSpec,
                            check_name, check_positive)
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.stages.image_batches import (cap_queued_images, check_room_for_decoding, decoded_images,
                                             finished_parts, null_if_nan, select_rows, write_parts_as_completed)
from pipelines.storage import Location
from pipelines.tables import SCORES_SCHEMA


@dataclass(frozen=True)
class ScoreOutputSpec:
    archive: str | None = None  # folder name under scores/; default: the input dataset's name
    anomaly_maps: bool = False

    def validate(self, path: str) -> ScoreOutputSpec:
        if self.archive is not None:
            check_name(self.archive, f"{path}.archive")
        return self


@dataclass(frozen=True)
class ScoreParams:
    inputs: DatasetInputSpec
    model: ModelInputSpec
    split: Literal["train", "test"] | None = None  # score only this split; default: every row
    outputs: ScoreOutputSpec = ScoreOutputSpec()
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    resources: ResourcesSpec = ResourcesSpec(workers=1)

    def validate(self, path: str) -> ScoreParams:
        check_positive(self.max_image_pixels, f"{path}.max_image_pixels" if path else "max_image_pixels")
        return self


class ScoreBatch:
    """Scorer actor: loads the model once, then scores batches of decoded rows."""

    def __init__(self, model_folder: Location, batch_size: int, anomaly_maps: bool, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.detector = TrainedDetector.load(model_folder, device=self.device)
        self.batch_size = batch_size
        self.anomaly_maps = anomaly_maps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["image_id"])
        scores = np.full(count, np.nan, np.float32)
        thresholds = np.full(count, np.nan, np.float32)
        maps: list[bytes] = [b""] * count
        lows = np.full(count, np.nan, np.float32)
        highs = np.full(count, np.nan, np.float32)
        errors = np.array([str(e) for e in batch["error"]], object)
        keys = np.array([self.detector.key_for(c) for c in batch["category"]], object)
        for index in np.flatnonzero((errors == "") & (keys == None)):  # noqa: E711 - elementwise
            errors[index] = f"no model for category {batch['category'][index]!r}"
        for key in sorted({k for k in keys if k is not None}):
            members = np.flatnonzero((keys == key) & (errors == ""))
            if not len(members):
                continue
            # Slots come from the position in the input part: see pipelines.models.inference.
            member_scores, member_maps = score_in_slots(
                self.detector.models[key], batch["pixels"][members], batch["_seq"][members],
                self.batch_size, self.device, parts=batch["_part"][members])
            scores[members] = member_scores
            thresholds[members] = self.detector.thresholds.get(key, np.nan)
            if self.anomaly_maps:
                for position, index in enumerate(members):
                    maps[index], lows[index], highs[index] = encode_map(member_maps[position])
        return {"_part": batch["_part"], "_row": batch["_row"], "_seq": batch["_seq"], "image_id": batch["image_id"],
                "category": batch["category"], "split": batch["split"], "label": batch["label"],
                "score": scores, "threshold": thresholds, "anomaly_map": np.array(maps, object),
                "anomaly_map_min": lows, "anomaly_map_max": highs, "error": errors}


def _part_table(rows: list[dict[str, Any]], model_name: str, run_id: str, scored_at: datetime.datetime) -> pa.Table:
    rows = sorted(rows, key=lambda r: r["_row"])

    columns = {
        "image_id": [r["image_id"] for r in rows],
        "category": [r["category"] for r in rows],
        "split": [r["split"] for r in rows],
        "label": [None if r["label"] < 0 else int(r["label"]) for r in rows],
        "model": [model_name] * len(rows),
        "score": [null_if_nan(r["score"]) for r in rows],
        "label_pred": [None if r["error"] else bool(r["score"] >= r["threshold"]) for r in rows],
        "threshold": [null_if_nan(r["threshold"]) for r in rows],
        "anomaly_map": [r["anomaly_map"] or None for r in rows],
        "anomaly_map_min": [null_if_nan(r["anomaly_map_min"]) for r in rows],
        "anomaly_map_max": [null_if_nan(r["anomaly_map_max"]) for r in rows],
        "error": [r["error"] or None for r in rows],
        "run_id": [run_id] * len(rows),
        "scored_at": [scored_at] * len(rows),
    }
    return pa.Table.from_pydict(columns, schema=SCORES_SCHEMA)


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: ScoreParams = step.params
    started = time.monotonic()
    images = context.input_dataset(params.inputs)
    manifest = datasets.read_manifest(images, table="images")
    model_folder = context.input_dataset(params.model)
    card = ModelCard.read(model_folder)  # fail fast (exit 2) on a missing or foreign model; no tensors
    if not card.scores_images:
        raise InputError(f"{model_folder.uri} is a {card.method!r} model, which does not score images")
    check_room_for_decoding(params.resources.workers, params.resources.cpus_per_worker, "scorer worker")
    model_name = f"{model_folder.parent().name}@{model_folder.name}"
    archive = params.outputs.archive or manifest.name
    if params.outputs.archive is None and not NAME_PATTERN.match(archive):
        # The manifest comes from storage, not from the validated spec: its name is untrusted.
        raise InputError(f"{images.uri}: the dataset's manifest names it {archive!r}, which cannot name a "
                         f"scores folder ({NAME_RULE}); set outputs.archive in the spec")
    folder = context.root.join("scores", archive, model_name, context.run_id)
    scored_at = datetime.datetime.strptime(context.record.status["started_at"], "%Y-%m-%dT%H:%M:%SZ") \
        .replace(tzinfo=datetime.timezone.utc)

    def wanted(table: pa.Table) -> np.ndarray:
        if params.split is None:
            return np.ones(table.num_rows, bool)
        return pc.equal(table["split"], params.split).fill_null(False).to_numpy(zero_copy_only=False)

    selections, _ = select_rows(images, manifest, wanted)
    model_fingerprint = datasets.fingerprint([model_folder.uri, card.thresholds])
    fingerprints = {s.part: datasets.fingerprint([s.location.uri, s.rows, model_fingerprint,
                                                  params.outputs.anomaly_maps, params.max_image_pixels])
                    for s in selections}
    records = finished_parts(folder, selections, fingerprints, SCORES_SCHEMA)
    reused = sum(1 for s in selections if s.rows and s.part in records)
    todo = [s for s in selections if s.part not in records]
    expected = {s.part: len(s.rows) for s in todo}
    context.log("scoring", images=sum(expected.values()), parts=len(todo), reused_parts=reused, output=folder.uri)

    scored = 0
    if todo:
        resources = params.resources
        stream = decoded_images(todo, card.image_size, params.max_image_pixels).map_batches(
            ScoreBatch,
            fn_constructor_kwargs={"model_folder": model_folder, "batch_size": resources.batch_size,
                                   "anomaly_maps": params.outputs.anomaly_maps,
                                   "threads": int(resources.cpus_per_worker)},
            batch_size=resources.batch_size, num_cpus=resources.cpus_per_worker,
            num_gpus=resources.gpus_per_worker or None,
            compute=ray.data.ActorPoolStrategy(size=resources.workers))
        stream = cap_queued_images(stream, todo, card.image_size)
        written = write_parts_as_completed(
            stream, expected, lambda rows: _part_table(rows, model_name, context.run_id, scored_at), folder,
            fingerprints)
        records.update(written)
        scored = sum(r.rows for r in written.values())

    ordered = [records[s.part] for s in selections]
    error_rows, predicted = _count_outcomes(folder, ordered)
    seconds = time.monotonic() - started
    published = datasets.publish(
        folder, name=archive, version=context.run_id, table="scores", schema=SCORES_SCHEMA, parts=ordered,
        lineage=context.lineage(input=images.uri, model=model_folder.uri),
        extra={"errors": len(error_rows), "predicted_anomalous": predicted, "model": model_name},
    )
    lines = [f"scored {published.rows} images with {model_name} in {seconds:.1f} s "
             f"({scored / seconds:.1f} images/s) -> {folder.uri}"
             + (f" ({reused} parts from an earlier attempt)" if reused else ""),
             f"  {predicted} predicted anomalous at the model's thresholds"]
    if error_rows:
        lines.append(f"  {len(error_rows)} rows could not be scored (kept with their error):")
        lines += [f"    {image_id}: {error}" for image_id, error in error_rows[:10]]
    return StepResult(output=folder.uri, rows=published.rows, rejected=len(error_rows),
                      details={"errors": len(error_rows), "predicted_anomalous": predicted,
                               "images_per_second": round(scored / seconds, 2) if scored else None,
                               "reused_parts": reused},
                      summary=tuple(lines))


def _count_outcomes(folder: Location, records: list[datasets.PartRecord]) -> tuple[list[tuple[str, str]], int]:
    import pyarrow.parquet as pq

    error_rows, predicted = [], 0
    for record in records:
        location = folder.join(record.path)
        table = pq.read_table(location.path, filesystem=location.fs, columns=["image_id", "error", "label_pred"])
        for image_id, error, flagged in zip(*(table[c].to_pylist() for c in ("image_id", "error", "label_pred"))):
            if error:
                error_rows.append((image_id, error))
            predicted += bool(flagged)
    return error_rows, predicted


def published_record(step: StepSpec, context: StepContext) -> Location:
    """The manifest of this run's scores; found through the run's recorded output."""
    previous = context.record.step_state(step.name).get("output")
    base = Location.parse(previous, context.root.settings) if previous else context.root.join("scores", "_none_")
    return base.join(datasets.MANIFEST_NAME)


KIND = StageKind(name="score", params=ScoreParams, run=run, published_record=published_record)
