"""`score`: stream an images dataset (an archive) through a model -> a scores dataset.

One CPU decode task per input part -> a pool of scorer actors (GPUs when asked for), each holding
the detector's per-category models -> output parts written as they complete, parts an earlier
attempt finished from the same input reused (`pipelines.stages.parts`). Rows that cannot be decoded or scored are kept
with `error` set; the job succeeds and counts them. The manifest is written last.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipelines import datasets
from pipelines.errors import InputError
from pipelines.models.artifacts import ModelCard
from pipelines.models.inference import autocast_dtype_of, encode_map, score_in_slots, scoring_precision, to_tensor
from pipelines.models.methods import MethodRecord
from pipelines.params.score import ScoreParams
from pipelines.spec import StepSpec
from pipelines.spec_fields import NAME_PATTERN, NAME_RULE
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.stages.image_batches import (
    check_room_for_decoding,
    decoded_images,
    decoded_queue_bytes,
    null_if_nan,
    select_rows,
)
from pipelines.stages.parts import PartPlan, Workers, run_parts
from pipelines.stages.references import ReferenceImages, reference_images, refuse_scored_references
from pipelines.storage import Location
from pipelines.tables import SCORES_SCHEMA


class Scorer:
    """Scorer actor: loads the detector's models once, then scores batches of decoded rows."""

    def __init__(self, model_folder: Location, record: MethodRecord, batch_size: int, anomaly_maps: bool,
                 threads: int, references: ReferenceImages | None = None, precision: str = "fp32"):
        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models = ModelCard.read(model_folder, record).require("detector", "scoring").load(self.device)
        # bf16 (`scoring_precision`, decided on the driver): the network calls under autocast, the
        # weights and batches channels_last, the layout cuDNN's fastest convolutions use.
        self.autocast_dtype = autocast_dtype_of(precision) if self.device == "cuda" else None
        self.channels_last = self.autocast_dtype is not None
        if self.channels_last:
            for model in self.models.models.values():
                model.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.anomaly_maps = anomaly_maps
        if references is not None:  # few-shot: the reference category gets a model of its own
            base = self.models.models[self.models.key_for(references.category) or sorted(self.models.models)[0]]
            with torch.inference_mode():
                self.models.models[references.category] = record.load().with_references(
                    base, to_tensor(references.pixels, self.device))
            self.models.thresholds[references.category] = references.threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["image_id"])
        scores = np.full(count, np.nan, np.float32)
        thresholds = np.full(count, np.nan, np.float32)
        maps: list[bytes] = [b""] * count
        lows = np.full(count, np.nan, np.float32)
        highs = np.full(count, np.nan, np.float32)
        errors = np.array([str(e) for e in batch["error"]], object)
        keys = np.array([self.models.key_for(c) for c in batch["category"]], object)
        for index in np.flatnonzero((errors == "") & (keys == None)):  # noqa: E711 - elementwise
            errors[index] = f"no model for category {batch['category'][index]!r}"
        for key in sorted({k for k in keys if k is not None}):
            members = np.flatnonzero((keys == key) & (errors == ""))
            if not len(members):
                continue
            # Slots come from the position in the input part: see pipelines.models.inference.
            member_scores, member_maps = score_in_slots(
                self.models.models[key], batch["pixels"][members], batch["_seq"][members],
                self.batch_size, self.device, parts=batch["_part"][members], row_ids=batch["image_id"][members],
                autocast_dtype=self.autocast_dtype, channels_last=self.channels_last)
            scores[members] = member_scores
            thresholds[members] = self.models.thresholds.get(key, np.nan)
            if self.anomaly_maps:
                for position, index in enumerate(members):
                    maps[index], lows[index], highs[index] = encode_map(member_maps[position])
        return {"_part": batch["_part"], "_row": batch["_row"], "_seq": batch["_seq"], "image_id": batch["image_id"],
                "category": batch["category"], "split": batch["split"], "label": batch["label"],
                "defect_type": batch["defect_type"], "source_uri": batch["source_uri"],
                "partition": batch["partition"], "score": scores, "threshold": thresholds,
                "anomaly_map": np.array(maps, object), "anomaly_map_min": lows, "anomaly_map_max": highs,
                "error": errors}


def checked_precision(requested: str, card: ModelCard, gpu: bool) -> str:
    """`scoring_precision` for this model, its refusal an input error naming the model (exit 2)."""
    try:
        return scoring_precision(requested, card.record.capabilities, gpu)
    except ValueError as error:
        raise InputError(f"precision: bf16: {card.folder.uri} is a {card.method!r} model, which {error}") from None


def precision_fingerprint(precision: str) -> list[str]:
    """What the precision adds to a part's fingerprint: nothing for fp32, what every earlier
    version computed, so that their finished parts and nights stay reusable."""
    return [] if precision == "fp32" else [precision]


def _text_or_null(value: Any) -> str | None:
    # A column of only nulls comes back from Ray's batches as float NaN: text or null.
    return value if isinstance(value, str) and value else None


def scores_part_table(rows: list[dict[str, Any]], model_name: str, run_id: str, scored_at: datetime.datetime,
                      spec_fingerprint: str) -> pa.Table:
    """One scores part from a scorer's output rows (any order) for one input part."""
    rows = sorted(rows, key=lambda r: r["_row"])

    columns = {
        "image_id": [r["image_id"] for r in rows],
        "category": [r["category"] for r in rows],
        "split": [r["split"] for r in rows],
        "label": [None if r["label"] < 0 else int(r["label"]) for r in rows],
        "defect_type": [_text_or_null(r["defect_type"]) for r in rows],
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
        "source_uri": [_text_or_null(r["source_uri"]) for r in rows],
        "partition": [_text_or_null(r["partition"]) for r in rows],
        "spec_fingerprint": [spec_fingerprint] * len(rows),
    }
    return pa.Table.from_pydict(columns, schema=SCORES_SCHEMA)


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: ScoreParams = step.params
    started = time.monotonic()
    images = context.input_dataset(params.inputs)
    manifest = datasets.read_manifest(images, table="images")
    model_folder = context.input_dataset(params.model)
    # Fail fast (exit 2) on a missing, foreign or non-detector model, from config.json alone.
    card = ModelCard.read(model_folder).require("detector", "scoring")
    check_room_for_decoding(params.resources.workers, params.resources.cpus_per_worker, "scorer worker")
    model_name = card.version
    archive = params.outputs.archive or manifest.name
    if params.outputs.archive is None and not NAME_PATTERN.match(archive):
        # The manifest comes from storage, not from the validated spec: its name is untrusted.
        raise InputError(f"{images.uri}: the dataset's manifest names it {archive!r}, which cannot name a "
                         f"scores folder ({NAME_RULE}); set outputs.archive in the spec")
    folder = context.root.join("scores", archive, model_name, context.run_id)
    scored_at = datetime.datetime.strptime(context.record.status["started_at"], "%Y-%m-%dT%H:%M:%SZ") \
        .replace(tzinfo=datetime.UTC)

    def wanted(table: pa.Table) -> np.ndarray:
        if params.split is None:
            return np.ones(table.num_rows, bool)
        return pc.equal(table["split"], params.split).fill_null(False).to_numpy(zero_copy_only=False)

    selections, scored_rows = select_rows(images, manifest, wanted)
    references = None
    if params.references is not None:
        references = reference_images(params.references, card, context, params.max_image_pixels)
        refuse_scored_references(references, scored_rows, images.uri)
        context.log("references", **references.provenance())
    precision = checked_precision(params.precision, card, params.resources.gpus_per_worker > 0)
    model_fingerprint = datasets.fingerprint([model_folder.uri, card.thresholds,
                                              references.provenance() if references else None]
                                             + precision_fingerprint(precision))
    plans = [PartPlan(s.part, datasets.fingerprint([s.location.uri, s.rows, model_fingerprint,
                                                    params.outputs.anomaly_maps, params.max_image_pixels]),
                      len(s.rows)) for s in selections]
    by_part = {s.part: s for s in selections}
    resources = params.resources
    context.log("scoring", images=sum(len(s.rows) for s in selections), parts=len(selections), output=folder.uri,
                precision=precision)
    outcome = run_parts(
        folder, plans, SCORES_SCHEMA,
        source=lambda todo: decoded_images([by_part[p.part] for p in todo], card.image_size, params.max_image_pixels),
        workers=Workers(Scorer, {"model_folder": model_folder, "record": card.record,
                                 "batch_size": resources.batch_size, "anomaly_maps": params.outputs.anomaly_maps,
                                 "threads": int(resources.cpus_per_worker), "references": references,
                                 "precision": precision},
                        resources, resources.batch_size, decoded_queue_bytes(selections, card.image_size)),
        build_table=lambda rows: scores_part_table(rows, model_name, context.run_id, scored_at,
                                                   context.record.status["spec_fingerprint"]))

    error_rows, predicted = count_outcomes(folder, outcome.records)
    seconds = time.monotonic() - started
    scored = outcome.rows_computed
    published = datasets.publish(
        folder, name=archive, version=context.run_id, table="scores", schema=SCORES_SCHEMA, parts=outcome.records,
        lineage=context.lineage(input=images.uri, model=model_folder.uri),
        extra={"errors": len(error_rows), "predicted_anomalous": predicted, "model": model_name,
               **({"references": references.provenance()} if references else {})},
    )
    lines = [f"scored {published.rows} images with {model_name} in {seconds:.1f} s "
             f"({scored / seconds:.1f} images/s) -> {folder.uri}"
             + (f" ({outcome.reused} parts from an earlier attempt)" if outcome.reused else ""),
             f"  {predicted} predicted anomalous at the model's thresholds"]
    if references is not None:
        lines.append(f"  {references.category}: scored against {len(references.image_ids)} reference images "
                     f"({', '.join(references.image_ids)}), threshold {references.threshold:.4f}"
                     + ("" if params.references and params.references.threshold is not None
                        else " (leave-one-out over the references)"))
    if error_rows:
        lines.append(f"  {len(error_rows)} rows could not be scored (kept with their error):")
        lines += [f"    {image_id}: {error}" for image_id, error in error_rows[:10]]
    return StepResult(output=folder.uri, rows=published.rows, rejected=len(error_rows),
                      details={"errors": len(error_rows), "predicted_anomalous": predicted,
                               "references": references.provenance() if references else None,
                               "images_per_second": round(scored / seconds, 2) if scored else None,
                               "reused_parts": outcome.reused},
                      summary=tuple(lines))


def count_outcomes(folder: Location, records: list[datasets.PartRecord]) -> tuple[list[tuple[str, str]], int]:
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
