"""What every train path shares: which rows train, which are held out, the decision thresholds
and publishing the model artifact.

- Training rows: the normal training images (split train, label 0) of the chosen categories.
  Detectors hold a seeded fraction of them out (by image id, so the same images on every rerun),
  plus the normal images that labelled validation anomalies were synthesized from.
- Thresholds: each detector model scores its held-out normals (and labelled validation images
  for f1_max) on the driver, in the fixed batch geometry of `pipelines.models.inference`;
  `pipelines.models.thresholds.calibrate` turns the scores into a threshold.
- Publishing: tensors, then config.json (the artifact exists once its config does), then
  metrics.json beside it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import datasets
from pipelines.data.sampling import in_fraction
from pipelines.errors import InputError
from pipelines.models.artifacts import ALL_CATEGORIES, save_artifact
from pipelines.models.inference import score_in_slots
from pipelines.models.thresholds import calibrate
from pipelines.params.train import TrainParams
from pipelines.stages.base import StepContext
from pipelines.stages.image_batches import PartSelection, decoded_images, select_rows
from pipelines.storage import Location


@dataclass
class TrainingRows:
    folder: Location  # the input dataset
    fit: list[PartSelection]
    fit_table: pa.Table  # the small columns of the fitted rows
    holdout: list[PartSelection]
    holdout_count: int
    categories: list[str]  # with fitted rows, sorted


def held_out(image_id: str, seed: int, fraction: float) -> bool:
    return in_fraction("holdout", seed, image_id, fraction)


def holdout_seed(params: TrainParams) -> int:
    """The hold-out draw's seed: the method's own seed where it has one, so that changing it redraws."""
    own = getattr(params.method_params, "seed", None)
    return int(own if own is not None else getattr(getattr(params.method_params, "training", None), "seed", 0))


def training_rows(params: TrainParams, context: StepContext, *, hold_out: bool) -> TrainingRows:
    """The normal training rows of the selected categories, split into fit and hold-out."""
    folder = context.input_dataset(params.inputs)
    manifest = datasets.read_manifest(folder, table="images")
    seed, fraction = holdout_seed(params), params.calibration.holdout_fraction

    def normal_train(table: pa.Table) -> np.ndarray:
        mask = pc.and_(pc.equal(table["split"], "train"), pc.equal(table["label"], 0)).fill_null(False)
        if params.categories:
            mask = pc.and_(mask, pc.is_in(table["category"], pa.array(params.categories))).fill_null(False)
        return mask.to_numpy(zero_copy_only=False)

    # The normal images synthetic validation anomalies were made from are held out too: a model
    # that had fitted an anomaly's own source image would score it lower than an unseen normal, and
    # the calibration would compare unlike with unlike.
    sources = _synthesis_sources(params, context) if hold_out and params.calibration.validation else set()

    def held(table: pa.Table) -> np.ndarray:
        if not hold_out:
            return np.zeros(table.num_rows, bool)
        return np.array([held_out(i, seed, fraction) or i in sources for i in table["image_id"].to_pylist()], bool)

    fit, fit_table = select_rows(folder, manifest, lambda t: normal_train(t) & ~held(t))
    holdout, holdout_table = select_rows(folder, manifest, lambda t: normal_train(t) & held(t))
    categories = sorted(set(fit_table["category"].to_pylist())) if fit_table.num_rows else []
    if params.categories:
        missing = sorted(set(params.categories) - set(categories))
        if missing:
            raise InputError(f"no normal training images for categories {missing} in {folder.uri}")
    return TrainingRows(folder, fit, fit_table, holdout, holdout_table.num_rows, categories)


def with_synthetic_anomalies(rows: TrainingRows, method: str) -> list[PartSelection]:
    """The fit selection plus the synthetic anomalies (split train, label 1) made from its normals,
    for a method that trains on synthetic pairs: the input must be a `synthesize` output written
    with include_normals, where every fitted normal has at least one anomaly made from it."""
    import pyarrow.parquet as pq

    manifest = datasets.read_manifest(rows.folder, table="images")
    fit_ids = set(rows.fit_table["image_id"].to_pylist()) if rows.fit_table.num_rows else set()
    paired: set[str] = set()
    selections = []
    for selection, location in zip(rows.fit, datasets.part_locations(rows.folder, manifest), strict=True):
        table = pq.read_table(location.path, filesystem=location.fs, columns=["label", "split", "synthesis"],
                              schema=manifest.arrow_schema())
        labels, splits = table["label"].to_pylist(), table["split"].to_pylist()
        sources = [(s or {}).get("source_image_id") for s in table["synthesis"].to_pylist()]
        extra = [i for i, (label, split, source) in enumerate(zip(labels, splits, sources))
                 if label == 1 and split == "train" and source in fit_ids]
        paired.update(str(sources[i]) for i in extra)
        selections.append(PartSelection(selection.part, selection.location, tuple(sorted([*selection.rows, *extra]))))
    unpaired = sorted(fit_ids - paired)
    if unpaired:
        raise InputError(
            f"{rows.folder.uri}: {len(unpaired)} of {len(fit_ids)} normal training images have no synthetic anomaly "
            f"made from them (e.g. {unpaired[0]!r}); method {method!r} trains on pairs of a normal image and an "
            "anomaly made from it: give it the output of a `synthesize` step written with include_normals: true")
    return selections


def _synthesis_sources(params: TrainParams, context: StepContext) -> set[str]:
    """Image ids that the validation dataset's synthetic rows were made from."""
    assert params.calibration.validation is not None  # the caller asks only when it is set
    folder = context.input_dataset(params.calibration.validation)
    datasets.read_manifest(folder, table="images")
    provenance = datasets.read_table(folder, columns=["synthesis"]).column("synthesis")
    return {s["source_image_id"] for s in provenance.to_pylist() if s and s.get("source_image_id")}


def decode_to_driver(selection: list[PartSelection], image_size: int, max_pixels: int) -> dict[str, np.ndarray]:
    """Decoded rows of a small selection, gathered on the driver (with their image ids)."""
    empty = {"pixels": np.zeros((0, image_size, image_size, 3), np.uint8), "ok": np.zeros(0, bool),
             "category": np.zeros(0, object), "label": np.zeros(0, np.int8), "image_id": np.zeros(0, object)}
    if not any(s.rows for s in selection):
        return empty
    stream = decoded_images(selection, image_size, max_pixels)
    batches = list(stream.iter_batches(batch_size=None, batch_format="numpy"))
    return {"pixels": np.concatenate([b["pixels"] for b in batches]),
            "ok": np.concatenate([[not e for e in b["error"]] for b in batches]).astype(bool),
            "category": np.concatenate([b["category"] for b in batches]),
            "label": np.concatenate([b["label"] for b in batches]),
            "image_id": np.concatenate([b["image_id"] for b in batches])}


def validation_images(params: TrainParams, context: StepContext) -> dict[str, np.ndarray] | None:
    """The labelled validation images for f1_max calibration, decoded on the driver; None if unset."""
    spec = params.calibration
    if spec.validation is None:
        return None
    folder = context.input_dataset(spec.validation)
    manifest = datasets.read_manifest(folder, table="images")

    def labelled(table: pa.Table) -> np.ndarray:
        mask = pc.is_valid(table["label"])
        if spec.validation_split is not None:
            mask = pc.and_(mask, pc.equal(table["split"], spec.validation_split)).fill_null(False)
        return mask.to_numpy(zero_copy_only=False)

    selection, _ = select_rows(folder, manifest, labelled)
    return decode_to_driver(selection, params.image_size, params.max_image_pixels)


def _members(images: dict[str, np.ndarray], key: str) -> np.ndarray:
    return images["ok"] & ((images["category"] == key) if key != ALL_CATEGORIES else True)


def _score(model: Any, images: dict[str, np.ndarray], chosen: np.ndarray, batch_size: int) -> np.ndarray:
    scores, _ = score_in_slots(model, images["pixels"][chosen], np.arange(int(chosen.sum())), batch_size,
                               row_ids=images["image_id"][chosen])
    return scores


def calibrate_thresholds(models: dict[str, Any], held: dict[str, np.ndarray],
                         validation: dict[str, np.ndarray] | None, params: TrainParams
                         ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """A threshold per model key from its held-out normals (and labelled validation images)."""
    spec, batch = params.calibration, params.resources.batch_size
    thresholds, details = {}, {}
    for key, model in sorted(models.items()):
        chosen = _members(held, key)
        if not chosen.any():
            raise InputError(f"no held-out normal images for {key!r} to calibrate a threshold "
                             f"(holdout_fraction {spec.holdout_fraction}); raise threshold.holdout_fraction")
        scores = _score(model, held, chosen, batch)
        anomalous = None
        if validation is not None:
            assert spec.validation is not None  # the validation images come from it
            mine = _members(validation, key)
            if not (mine & (validation["label"] == 1)).any():
                raise InputError(f"no labelled anomalous validation images for {key!r} in {spec.validation.dataset}")
            validation_scores = _score(model, validation, mine, batch)
            labels = validation["label"][mine]
            scores = np.concatenate([scores, validation_scores[labels == 0]])
            anomalous = validation_scores[labels == 1]
        result = calibrate(scores, anomalous, spec.method, spec.quantile)
        thresholds[key] = result.threshold
        details[key] = asdict(result)
    return thresholds, details


def model_folder(params: TrainParams, context: StepContext) -> Location:
    return context.root.join("models", params.outputs.model, params.outputs.version or context.run_id)


def publish_model(params: TrainParams, context: StepContext, rows: TrainingRows, config: Any,
                  tensors: dict[str, dict[str, Any]], *, thresholds: dict[str, float], info: dict[str, Any],
                  metrics: dict[str, Any], started: float, **lineage: Any) -> Location:
    folder = model_folder(params, context)
    save_artifact(folder, params.method, config, tensors, thresholds=thresholds,
                  info={**info, "dataset": rows.folder.uri},
                  lineage=context.lineage(input=rows.folder.uri, **lineage))
    folder.join("metrics.json").write_json({**metrics, "total_seconds": round(time.monotonic() - started, 2)})
    return folder


def threshold_lines(models: dict[str, Any], counts: dict[str, int] | None, thresholds: dict[str, float],
                    calibration: dict[str, dict[str, Any]]) -> list[str]:
    """One line per model key: its threshold and what calibrated it, and (`counts`, where each key
    is fitted on its own images) how many images it was fitted on."""
    return [f"  {key}: " + (f"{counts.get(key, 0)} images, " if counts is not None else "")
            + f"threshold {thresholds[key]:.4f} "
            f"({calibration[key]['method']} over {calibration[key]['normal_images']} held-out normals)"
            for key in sorted(models) if key in thresholds]


def published_record(step: Any, context: StepContext) -> Location:
    params: TrainParams = step.params
    return model_folder(params, context).join("config.json")


__all__ = ["TrainingRows", "calibrate_thresholds", "decode_to_driver", "held_out", "model_folder",
           "publish_model", "published_record", "threshold_lines", "training_rows", "validation_images"]
