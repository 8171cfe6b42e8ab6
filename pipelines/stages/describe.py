"""`describe`: what a published dataset holds (rows per category/split/label), and where it is.

Reads only the small columns, through the manifest, with Ray Data; counts per block and sums on
the driver. Writes `summary.json` into the run record.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import ray.data

from pipelines import datasets
from pipelines.params.describe import DescribeParams
from pipelines.spec import StepSpec
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.storage import Location

GROUP_COLUMNS = ["category", "split", "label"]


def count_groups(batch: pa.Table) -> pa.Table:
    """Rows per (category, split, label) in one block; nulls are kept as their own group."""
    counts = Counter(zip(*(batch.column(c).to_pylist() for c in GROUP_COLUMNS)))
    return pa.table({"key": [json.dumps(k) for k in counts], "rows": list(counts.values())})


def _group_order(item: tuple[tuple, int]) -> tuple:
    (category, split, label), _ = item
    return (category or "", split or "", 9 if label is None else label)


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: DescribeParams = step.params
    folder = context.input_dataset(params.inputs)
    manifest = datasets.read_manifest(folder)
    totals: Counter = Counter()
    if manifest.parts:
        locations = datasets.part_locations(folder, manifest)
        blocks = (
            ray.data.read_parquet([loc.path for loc in locations], filesystem=folder.fs, columns=GROUP_COLUMNS)
            .map_batches(count_groups, batch_format="pyarrow")
            .take_all()
        )
        for row in blocks:
            totals[tuple(json.loads(row["key"]))] += row["rows"]
    if sum(totals.values()) != manifest.rows:
        raise RuntimeError(f"{folder.uri}: counted {sum(totals.values())} rows, the manifest says {manifest.rows}")
    groups = [{"category": c, "split": s, "label": lab, "rows": n} for (c, s, lab), n in
              sorted(totals.items(), key=_group_order)]
    rejected = manifest.extra.get("rejected", {}).get("rows", 0)
    summary_data: dict[str, Any] = {
        "dataset": folder.uri, "endpoint": folder.settings.resolved_endpoint() if folder.scheme == "s3" else None,
        "rows": manifest.rows, "parts": len(manifest.parts), "rejected": rejected, "groups": groups,
        "lineage": context.lineage(input=folder.uri),
    }
    context.record.folder.join("steps", step.name, "summary.json").write_json(summary_data)

    label_names = {0: "normal", 1: "anomalous", None: "unknown"}
    lines = [f"dataset {manifest.name}@{manifest.version}: {manifest.rows} rows in {len(manifest.parts)} parts"
             + (f", {rejected} rejected inputs" if rejected else ""),
             f"  {'category':<12} {'split':<6} {'label':<10} {'rows':>6}"]
    lines += [f"  {str(g['category']):<12} {g['split']:<6} {label_names.get(g['label'], g['label']):<10} {g['rows']:>6}"
              for g in groups]
    lines.append(f"  location: {folder.uri}/ (read through {datasets.MANIFEST_NAME})")
    if folder.scheme == "s3":
        lines.append(f"  endpoint: {summary_data['endpoint']}")
    return StepResult(output=folder.uri, rows=manifest.rows, rejected=rejected,
                      details={"groups": groups}, summary=tuple(lines))


def published_record(step: StepSpec, context: StepContext) -> Location:
    return context.record.folder.join("steps", step.name, "summary.json")


KIND = StageKind(name="describe", params=DescribeParams, run=run, published_record=published_record)
