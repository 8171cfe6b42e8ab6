"""`evaluate`: scores + ground truth -> metrics.json and a self-contained report.html.

Per category and as a mean over categories: image AUROC and F1-max from image scores and labels
(rows with an error or an unknown label are left out, and counted), and image AUROC per defect
type within each category (that type's anomalies against all the category's normals); pixel AUROC and AUPRO (FPR
limit 0.3 by default) where the images dataset has ground-truth masks and the scores carry
anomaly maps. The metric code is `pipelines.evaluation.metrics`; the report is
`pipelines.evaluation.report`. Scores tables are small (no pixels), so this runs on the driver.
With `explain:`, the report's most anomalous images also get gradient-denoising reconstructions
(`pipelines.stages.explanations`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import datasets
from pipelines.data.preprocess import decode_mask, decode_rgb
from pipelines.errors import InputError
from pipelines.evaluation import metrics
from pipelines.evaluation.report import CategoryReport, CurveData, ExampleImage, render_report
from pipelines.models.inference import decode_map
from pipelines.params.evaluate import EvaluateParams
from pipelines.spec import StepSpec
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.stages.explanations import Explained, check_models, explain
from pipelines.storage import Location

METRIC_NAMES = ("image_auroc", "image_f1_max", "pixel_auroc", "aupro")


def _read_images(images: Location, ids: set[str], columns: list[str]) -> dict[str, dict[str, Any]]:
    """Rows of the images dataset with these ids (only the columns asked for)."""
    if not ids:
        return {}
    manifest = datasets.read_manifest(images, table="images")
    found = {}
    for location in datasets.part_locations(images, manifest):
        table = pq.read_table(location.path, filesystem=location.fs, columns=["image_id", *columns],
                              filters=pc.field("image_id").isin(sorted(ids)))
        for row in table.to_pylist():
            found[row["image_id"]] = row
    return found


def _category_metrics(rows: pa.Table, images: Location, fpr_limit: float) -> tuple[dict, CategoryReport]:
    category = rows["category"][0].as_py() if rows.num_rows else None
    labels = np.asarray(rows["label"].to_pylist(), np.int64)
    scores = np.asarray(rows["score"].to_pylist(), np.float64)
    thresholds = [t for t in rows["threshold"].to_pylist() if t is not None]
    values: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    roc = pro = None
    if len(set(labels)) == 2:
        curve = metrics.roc_curve(labels, scores)
        values["image_auroc"] = metrics.auroc(labels, scores)
        values["image_f1_max"] = metrics.f1_max(labels, scores).f1
        roc = CurveData("ROC", curve.fpr, curve.tpr, "false positive rate", "true positive rate", values["image_auroc"])
        pixel = _pixel_data(rows, images)
        if pixel is not None:
            masks, maps = pixel
            values["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
            pro_curve = metrics.pro_curve(masks, maps, fpr_limit)
            values["aupro"] = metrics.aupro(masks, maps, fpr_limit)
            pro = CurveData(f"PRO (FPR <= {fpr_limit})", pro_curve.fpr, pro_curve.pro, "false positive rate",
                            "per-region overlap", values["aupro"])
    by_defect_type = _defect_type_aurocs(rows, labels, scores)
    report = CategoryReport(category=str(category), metrics=values, roc=roc, pro=pro,
                            scores_normal=scores[labels == 0], scores_anomalous=scores[labels == 1],
                            threshold=thresholds[0] if thresholds else None)
    return {**values, "images": int(len(labels)), "anomalous": int((labels == 1).sum()),
            "by_defect_type": by_defect_type}, report


def _defect_type_aurocs(rows: pa.Table, labels: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, Any]]:
    """Image AUROC of each defect type against all the category's normals: a detector that finds
    local defects but misses global ones shows it here, not in the pooled figure. Anomalies with
    no defect type count under "unknown"; a scores table from before the column existed has none."""
    if "defect_type" not in rows.column_names or not (labels == 1).any() or not (labels == 0).any():
        return {}
    types = np.asarray([t if t is not None else "unknown" for t in rows["defect_type"].to_pylist()], object)
    normal = labels == 0
    out = {}
    for defect in sorted(set(types[labels == 1])):
        chosen = normal | ((labels == 1) & (types == defect))
        out[str(defect)] = {"image_auroc": metrics.auroc(labels[chosen], scores[chosen]),
                            "anomalous": int(((labels == 1) & (types == defect)).sum())}
    return out


def _pixel_data(rows: pa.Table, images: Location) -> tuple[np.ndarray, np.ndarray] | None:
    """(masks, maps) for every row, when the maps are stored and the anomalous rows have masks."""
    if rows["anomaly_map"].null_count == rows.num_rows:
        return None
    ids = rows["image_id"].to_pylist()
    with_masks = _read_images(images, set(ids), ["mask"])
    labels = rows["label"].to_pylist()
    if not any(with_masks.get(i, {}).get("mask") for i, label in zip(ids, labels) if label == 1):
        return None
    maps, masks = [], []
    for image_id, label, data, low, high in zip(ids, labels, rows["anomaly_map"].to_pylist(),
                                                rows["anomaly_map_min"].to_pylist(),
                                                rows["anomaly_map_max"].to_pylist()):
        if data is None:
            return None
        anomaly_map = decode_map(data, low, high)
        mask = decode_mask(with_masks.get(image_id, {}).get("mask"), anomaly_map.shape[0])
        if mask is None:
            if label == 1:
                return None  # an anomalous image without a mask: pixel metrics would be wrong
            mask = np.zeros(anomaly_map.shape, bool)
        maps.append(anomaly_map)
        masks.append(mask)
    return np.stack(masks), np.stack(maps)


def _examples(rows: pa.Table, images: Location, anomalous: int, normal: int, seed: int
              ) -> tuple[list[ExampleImage], list[ExampleImage], dict[str, bytes]]:
    """(most anomalous, random normals, their encoded images by id: what `explain` reads)."""
    labels = np.asarray(rows["label"].to_pylist())
    scores = np.asarray(rows["score"].to_pylist(), np.float64)
    top = np.argsort(-scores[labels == 1], kind="stable")[:anomalous]
    anomalous_rows = np.flatnonzero(labels == 1)[top]
    normals = np.flatnonzero(labels == 0)
    normal_rows = np.random.default_rng(seed).permutation(normals)[:normal] if len(normals) else normals
    chosen = [int(i) for i in (*anomalous_rows, *normal_rows)]
    ids = rows["image_id"].to_pylist()
    found = _read_images(images, {ids[i] for i in chosen}, ["image"])
    sections: tuple[list[ExampleImage], list[ExampleImage]] = ([], [])
    encoded: dict[str, bytes] = {}
    for position, i in enumerate(chosen):
        row = {name: rows[name][i].as_py() for name in
               ("image_id", "category", "label", "score", "anomaly_map", "anomaly_map_min", "anomaly_map_max")}
        anomaly_map = decode_map(row["anomaly_map"], row["anomaly_map_min"], row["anomaly_map_max"]) \
            if row["anomaly_map"] else None
        size = anomaly_map.shape[0] if anomaly_map is not None else 256
        image = found.get(row["image_id"], {}).get("image")
        if image is None:
            continue
        encoded[row["image_id"]] = image
        # Each example stays in its section even when another's image is missing.
        sections[0 if position < len(anomalous_rows) else 1].append(
            ExampleImage(image_id=row["image_id"], image=decode_rgb(image, size), anomaly_map=anomaly_map,
                         score=row["score"], label=row["label"], category=row["category"]))
    return sections[0], sections[1], encoded


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: EvaluateParams = step.params
    scores_folder = context.input_dataset(params.inputs)
    manifest = datasets.read_manifest(scores_folder, table="scores")
    if params.images is not None:
        images = context.input_dataset(params.images)
    elif manifest.lineage.get("input"):
        images = Location.parse(manifest.lineage["input"], context.root.settings)
    else:
        raise InputError(f"{scores_folder.uri} does not say which images it scored; set images.dataset")
    datasets.read_manifest(images, table="images")  # fail fast: a missing or foreign images dataset
    table = datasets.read_table(scores_folder)
    usable = pc.and_(pc.and_(pc.is_null(table["error"]), pc.is_valid(table["label"])), pc.is_valid(table["score"]))
    skipped_errors = int(pc.sum(pc.is_valid(table["error"])).as_py() or 0)
    unlabelled = int(pc.sum(pc.and_(pc.is_null(table["error"]), pc.is_null(table["label"]))).as_py() or 0)
    table = table.filter(usable)
    if table.num_rows == 0:
        raise InputError(f"{scores_folder.uri} has no scored rows with a known label to evaluate")

    per_category, reports = {}, []
    for category in sorted(set(table["category"].to_pylist()), key=str):
        rows = table.filter(pc.equal(table["category"], category)) if category is not None \
            else table.filter(pc.is_null(table["category"]))
        per_category[str(category)], report = _category_metrics(rows, images, params.fpr_limit)
        reports.append(report)
    mean = {}
    for name in METRIC_NAMES:
        values = [m[name] for m in per_category.values() if m[name] is not None and not math.isnan(m[name])]
        mean[name] = float(np.mean(values)) if values else None

    explain_cards = check_models(params.explain, context) if params.explain is not None else None  # fail early
    anomalous_examples, normal_examples, encoded = _examples(table, images, params.anomalous_examples,
                                                             params.normal_examples, params.seed)
    out = context.record.folder.join("steps", step.name)
    explained: list[Explained] = []
    notes: list[str] = []
    if params.explain is not None and explain_cards is not None:
        shown = anomalous_examples[:params.explain.count]  # their images were read with the examples
        explained, notes = explain(params.explain, explain_cards,
                                   [(e.image_id, e.category, encoded[e.image_id]) for e in shown],
                                   out.join("explanations"))
        by_id = {e.image_id: e for e in explained}
        anomalous_examples = [
            replace(e, explanation=by_id[e.image_id].strip_png,
                    explanation_note=f"PaDiM mean distance {by_id[e.image_id].distances[0]:.1f} -> "
                                     f"{by_id[e.image_id].distances[-1]:.1f}")
            if e.image_id in by_id else e for e in anomalous_examples]
    result = {"scores": scores_folder.uri, "images": images.uri, "model": manifest.extra.get("model"),
              "per_category": per_category, "mean": mean, "fpr_limit": params.fpr_limit,
              "excluded": {"errors": skipped_errors, "unknown_label": unlabelled},
              "explanations": [{"image_id": e.image_id, "gif": e.gif_uri, "strip": e.strip_uri,
                                "steps": list(e.steps), "padim_distances": list(e.distances)} for e in explained],
              "explanation_notes": notes,
              "lineage": context.lineage(input=scores_folder.uri)}
    html = render_report(
        title=f"adpipe evaluation: {manifest.extra.get('model', '')} on {manifest.name}",
        categories=reports, mean_metrics=mean, examples_anomalous=anomalous_examples,
        examples_normal=normal_examples,
        facts={"run": context.run_id, "scores": scores_folder.uri, "images": images.uri,
               "model": str(manifest.extra.get("model")), "evaluated rows": str(table.num_rows),
               "excluded (error / unknown label)": f"{skipped_errors} / {unlabelled}"},
    )
    out.join("report.html").write_bytes(html.encode())
    out.join("metrics.json").write_json(result)

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"  {'category':<12} " + " ".join(f"{n:>13}" for n in METRIC_NAMES) + f" {'images':>7}"]
    for name, row in per_category.items():
        lines.append(f"  {name:<12} " + " ".join(f"{fmt(row[n]):>13}" for n in METRIC_NAMES)
                     + f" {row['images']:>7}")
        if len(row["by_defect_type"]) > 1:  # one type is the category's line already
            for defect, figures in row["by_defect_type"].items():
                lines.append(f"    {defect:<10} " + f"{fmt(figures['image_auroc']):>13}"
                             + " " * 42 + f" {figures['anomalous']:>7} anomalous")
    lines.append(f"  {'mean':<12} " + " ".join(f"{fmt(mean[n]):>13}" for n in METRIC_NAMES))
    lines.append(f"  left out: {skipped_errors} rows with errors, {unlabelled} with unknown labels")
    if params.explain is not None:
        lines.append(f"  explained {len(explained)} images by gradient denoising -> {out.join('explanations').uri}")
        lines.extend(f"    {note}" for note in notes)
    lines.append(f"  report: {out.join('report.html').uri}")
    lines.append(f"  metrics: {out.join('metrics.json').uri}")
    return StepResult(output=out.uri, rows=table.num_rows, details={"mean": mean, "per_category": per_category},
                      summary=tuple(lines))


def published_record(step: StepSpec, context: StepContext) -> Location:
    return context.record.folder.join("steps", step.name, "metrics.json")


KIND = StageKind(name="evaluate", params=EvaluateParams, run=run, published_record=published_record)
