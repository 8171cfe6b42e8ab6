"""`ingest`: images from an MVTec tree, a folder/prefix, or ELPV -> an images dataset.

The driver lists the source (cheap: names only) and cuts the list into parts of `rows_per_part`;
Ray Data runs one task per part that reads and decodes the files and writes `part-NNNNN.parquet`.
Undecodable files come back as rejected rows, written to `rejected.parquet` beside the parts and
counted in the manifest and the run status. The manifest is written last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from pipelines import datasets
from pipelines.data.image_rows import build_image_rows
from pipelines.data.sources import SourceItem, list_elpv, list_folder, list_mvtec, list_skimage, refuse_links_outside
from pipelines.errors import InputError
from pipelines.params.ingest import ELPVSource, FolderSource, IngestParams, MVTecSource, SkimageSource
from pipelines.spec import StepSpec
from pipelines.spec_fields import ResourcesSpec
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.storage import Location, S3Settings, filesystem_for
from pipelines.tables import IMAGES_SCHEMA, REJECTED_SCHEMA

REJECTED_NAME = "rejected.parquet"


def list_source(source: MVTecSource | FolderSource | ELPVSource | SkimageSource,
                settings: S3Settings) -> list[SourceItem]:
    if isinstance(source, SkimageSource):
        return list_skimage(source.images)
    if isinstance(source, MVTecSource):
        root = Location.parse(source.uri, settings)
        return refuse_links_outside(root, list_mvtec(root, source.categories), source.follow_symlinks)
    if isinstance(source, FolderSource):
        root = Location.parse(source.uri, settings)
        return refuse_links_outside(root, list_folder(root, source.category, source.split), source.follow_symlinks)
    elpv_root = Location.parse(source.uri, settings) if source.uri else None
    return list_elpv(elpv_root, source.categories, source.normal_train_fraction, source.split_seed)


# ---- items travel to Ray tasks as JSON (no filesystem: each task uses its own) ----------------

def _item_to_json(item: SourceItem) -> dict[str, Any]:
    return {"image_id": item.image_id, "uri": item.location.uri, "category": item.category,
            "split": item.split, "label": item.label, "defect_type": item.defect_type,
            "mask": item.mask.uri if item.mask else None, "mask_expected": item.mask_expected,
            "partition": item.partition, "defect_probability": item.defect_probability, "refusal": item.refusal}


def _item_from_json(data: dict[str, Any], settings: S3Settings) -> SourceItem:
    # This process's own filesystem for the scheme: credentials never travel inside task arguments.
    fs = filesystem_for(data["uri"].split("://", 1)[0], settings)
    return SourceItem(
        image_id=data["image_id"], location=Location(data["uri"], fs, settings), category=data["category"],
        split=data["split"], label=data["label"], defect_type=data["defect_type"],
        mask=Location(data["mask"], fs, settings) if data["mask"] else None,
        mask_expected=data["mask_expected"], partition=data["partition"],
        defect_probability=data["defect_probability"], refusal=data["refusal"],
    )


def _ingest_part(task: dict[str, Any], *, folders: dict[int, Location], source_settings: S3Settings,
                 max_pixels: int) -> dict[str, Any]:
    folder, index, fingerprint = folders[int(task["dataset"])], int(task["index"]), task["fingerprint"]
    done = datasets.completed_part(folder, index, fingerprint)
    if done is not None:
        return {**task, "items": "", "record": json.dumps(done.__dict__), "skipped": True}
    items = [_item_from_json(d, source_settings) for d in json.loads(task["items"])]
    built = build_image_rows(items, max_pixels)
    rejected = built.rejected.to_pylist()
    record = datasets.write_part(folder, index, built.images, fingerprint,
                                 extra={"rejected": rejected, "missing_masks": built.missing_masks})
    return {**task, "items": "", "record": json.dumps(record.__dict__), "skipped": False}


@dataclass
class IngestedParts:
    records: list[datasets.PartRecord]  # in part order; extra["rejected"] holds the rejected rows
    skipped: int  # parts an earlier attempt had written from the same items


def write_image_parts(batches: list[tuple[Location, list[SourceItem]]], part_rows: int, max_pixels: int,
                      resources: ResourcesSpec) -> list[IngestedParts]:
    """Cut each (folder, items) into parts of `part_rows` and write them, one Ray task per part
    over all the folders at once; parts an earlier attempt wrote from the same items are kept."""
    tasks = []
    for dataset, (_, items) in enumerate(batches):
        for index, start in enumerate(range(0, len(items), part_rows)):
            chunk = [_item_to_json(item) for item in items[start:start + part_rows]]
            tasks.append({"dataset": dataset, "index": index, "items": json.dumps(chunk),
                          "fingerprint": datasets.fingerprint([chunk, max_pixels])})
    if not tasks:
        return [IngestedParts([], 0) for _ in batches]
    settings = next(items[0].location.settings for _, items in batches if items)
    results = (
        ray.data.from_items(tasks, override_num_blocks=len(tasks))
        .map(_ingest_part,  # type: ignore[arg-type]  # Ray types `fn` as fn(row), leaving out fn_kwargs
             fn_kwargs={"folders": {i: folder for i, (folder, _) in enumerate(batches)},
                        "source_settings": settings, "max_pixels": max_pixels},
             num_cpus=resources.cpus_per_worker,
             compute=ray.data.TaskPoolStrategy(size=resources.workers))
        .take_all()
    )
    if len(results) != len(tasks):
        raise RuntimeError(f"ingest wrote {len(results)} parts for {len(tasks)} inputs")
    out = []
    for dataset in range(len(batches)):
        mine = sorted((r for r in results if int(r["dataset"]) == dataset), key=lambda r: int(r["index"]))
        out.append(IngestedParts([datasets.PartRecord(**json.loads(r["record"])) for r in mine],
                                 sum(1 for r in mine if r["skipped"])))
    return out


@dataclass
class PublishedImages:
    manifest: datasets.Manifest
    rejected: list[dict[str, Any]]
    missing_masks: int


def publish_images(folder: Location, parts: IngestedParts, *, name: str, lineage: dict[str, Any],
                   extra: dict[str, Any]) -> PublishedImages:
    """Write rejected.parquet, then the manifest (last) of an images dataset."""
    rejected = [row for r in parts.records for row in r.extra["rejected"]]
    missing_masks = sum(r.extra["missing_masks"] for r in parts.records)
    with folder.join(REJECTED_NAME).open_atomic_output() as stream:
        pq.write_table(pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA), stream)
    # The manifest keeps per-part counts; the rejected rows themselves live in rejected.parquet.
    records = [replace(r, extra={**r.extra, "rejected": len(r.extra["rejected"])}) for r in parts.records]
    manifest = datasets.publish(
        folder, name=name, version=folder.name, table="images", schema=IMAGES_SCHEMA, parts=records,
        lineage=lineage,
        extra={"rejected": {"path": REJECTED_NAME, "rows": len(rejected)}, "missing_masks": missing_masks, **extra},
    )
    return PublishedImages(manifest, rejected, missing_masks)


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: IngestParams = step.params
    items = list_source(params.source, context.root.settings)
    if not items:
        raise InputError(f"the {params.source.type} source has no images")
    folder = context.dataset_folder(params.outputs)
    context.log("ingest listed source", files=len(items), output=folder.uri)
    [parts] = write_image_parts([(folder, items)], params.outputs.part_rows, params.max_image_pixels,
                                params.resources)
    published = publish_images(
        folder, parts, name=params.outputs.dataset,
        lineage=context.lineage(source={"type": params.source.type,
                                        "uri": getattr(params.source, "uri", None) or items[0].location.parent().uri}),
        extra={"source_files": len(items)})
    manifest, rejected, missing_masks = published.manifest, published.rejected, published.missing_masks
    skipped = parts.skipped
    records = parts.records
    summary = [f"ingested {manifest.rows} images from {len(items)} files into {folder.uri} "
               f"({len(records)} parts{f', {skipped} already done' if skipped else ''})"]
    if rejected:
        summary.append(f"rejected {len(rejected)} files (reasons in {folder.join(REJECTED_NAME).uri}):")
        summary.extend(f"  {row['source_uri']}: {row['reason']}" for row in rejected[:10])
        if len(rejected) > 10:
            summary.append(f"  ... and {len(rejected) - 10} more")
    if missing_masks:
        summary.append(f"{missing_masks} anomalous test images have no readable ground-truth mask")
    return StepResult(output=folder.uri, rows=manifest.rows, rejected=len(rejected),
                      details={"source_files": len(items), "parts": len(records), "parts_reused": skipped,
                               "missing_masks": missing_masks},
                      summary=tuple(summary))


def published_record(step: StepSpec, context: StepContext) -> Location:
    return context.dataset_folder(step.params.outputs).join(datasets.MANIFEST_NAME)


KIND = StageKind(name="ingest", params=IngestParams, run=run, published_record=published_record)
