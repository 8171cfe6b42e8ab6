"""Ray glue shared by the stages that feed images to models: pick rows, decode them in CPU tasks.

The driver reads only the small columns of an images dataset to choose rows (cheap), then Ray
Data runs one decode task per input part, which reads that part's image bytes and emits fixed-size
RGB arrays with the row's identity (`_part`, `_row`) and an `error` for undecodable rows ("" when
the row decoded: a None would come back as NaN from Ray Data's object columns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from pipelines import datasets
from pipelines.data.images import ImageDecodeError
from pipelines.data.preprocess import decode_mask, decode_rgb
from pipelines.storage import Location

# The small per-row columns that travel with the pixels (source_uri and partition: lineage of scores).
ROW_COLUMNS = ["image_id", "category", "split", "label", "defect_type", "source_uri", "partition"]
DECODE_CPUS = 0.5  # logical CPUs per decode task: decoding one part is light, two run per core


@dataclass(frozen=True)
class PartSelection:
    part: int
    location: Location
    rows: tuple[int, ...]  # row indices within the part file


def read_row_columns(folder: Location, manifest: datasets.Manifest) -> list[pa.Table]:
    """The small per-row columns of every part, in manifest order."""
    return [pq.read_table(loc.path, filesystem=loc.fs, columns=ROW_COLUMNS, schema=manifest.arrow_schema())
            for loc in datasets.part_locations(folder, manifest)]


def select_rows(folder: Location, manifest: datasets.Manifest,
                keep: Callable[[pa.Table], np.ndarray]) -> tuple[list[PartSelection], pa.Table]:
    """Rows for which `keep(row_columns)` is true, per part; plus those rows' small columns."""
    selections, kept = [], []
    for index, (location, table) in enumerate(zip(datasets.part_locations(folder, manifest),
                                                  read_row_columns(folder, manifest))):
        mask = np.asarray(keep(table), dtype=bool)
        rows = np.flatnonzero(mask)
        selections.append(PartSelection(index, location, tuple(int(r) for r in rows)))
        kept.append(table.filter(pa.array(mask)).append_column("_part", pa.array(np.full(len(rows), index)))
                    .append_column("_row", pa.array(rows)))
    return selections, (pa.concat_tables(kept) if kept else pa.table({}))


def check_room_for_decoding(workers: int, cpus_per_worker: float, what: str) -> None:
    """Refuse a pool of long-lived workers that leaves no CPU for the decode tasks feeding it.

    Actors (scorers, Ray Train workers) hold their CPUs for the whole step; if they hold every CPU
    of the cluster, the decode tasks are never scheduled and the step waits forever (seen: 2
    workers x 1 CPU on a 2-CPU machine). Checked against the cluster as it is now: an autoscaling
    cluster still at its minimum size is refused too, rather than risk the hang.
    """
    from pipelines.errors import InputError

    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    wanted = workers * cpus_per_worker
    if wanted + DECODE_CPUS > cluster_cpus:
        raise InputError(
            f"resources: {workers} {what}(s) x {cpus_per_worker:g} CPU = {wanted:g} CPUs leave less than the "
            f"{DECODE_CPUS:g} CPU a decode task needs on this Ray cluster ({cluster_cpus:g} CPUs); the step "
            "would wait forever. Lower resources.workers or resources.cpus_per_worker.")


def decode_parts(task: dict[str, np.ndarray], *, locations: dict[int, Location], image_size: int,
                 max_pixels: int, with_masks: bool = False,
                 per_part: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                 ) -> dict[str, np.ndarray]:
    """map_batches UDF: input parts (rows of the task dataset) -> their selected rows, decoded.
    `with_masks`: also each row's mask ((S, S) bool, all False where there is none) and the
    image it was synthesized from (`source_image_id`, "" for an original image)."""
    extra = ["mask", "synthesis"] if with_masks else []
    out: dict[str, list] = {k: [] for k in ("_part", "_row", "_seq", *ROW_COLUMNS, "pixels", "error", "mask",
                                            "source_image_id")}
    for part, rows in zip(task["part"], task["rows"]):
        location = locations[int(part)]
        table = pq.read_table(location.path, filesystem=location.fs, columns=["image", *ROW_COLUMNS, *extra])
        rows = [int(r) for r in rows]
        for sequence, (row, record) in enumerate(zip(rows, table.take(pa.array(rows, pa.int64())).to_pylist())):
            mask: np.ndarray | None = np.zeros((image_size, image_size), bool)
            try:
                pixels, error = decode_rgb(record["image"], image_size, max_pixels), ""
                if with_masks and record["mask"]:
                    try:
                        mask = decode_mask(record["mask"], image_size)  # not None: the bytes are there
                    except (OSError, ValueError) as failure:  # PIL's errors for a corrupt PNG
                        raise ImageDecodeError(f"undecodable mask: {failure}") from failure
            except ImageDecodeError as failure:
                pixels, error = np.zeros((image_size, image_size, 3), np.uint8), str(failure)
            if with_masks:
                out["mask"].append(mask)
                out["source_image_id"].append((record["synthesis"] or {}).get("source_image_id") or "")
            out["_part"].append(int(part))
            out["_row"].append(row)
            out["_seq"].append(sequence)
            for column in ROW_COLUMNS:
                out[column].append(record[column])
            out["pixels"].append(pixels)
            out["error"].append(error)
    size = image_size
    decoded = {
        "_part": np.asarray(out["_part"], np.int64), "_row": np.asarray(out["_row"], np.int64),
        "_seq": np.asarray(out["_seq"], np.int64),  # position among the part's selected rows
        "image_id": np.asarray(out["image_id"], object), "category": np.asarray(out["category"], object),
        "split": np.asarray(out["split"], object),
        "label": np.asarray([-1 if v is None else v for v in out["label"]], np.int8),  # -1: unknown
        "defect_type": np.asarray(out["defect_type"], object),
        "source_uri": np.asarray(out["source_uri"], object), "partition": np.asarray(out["partition"], object),
        "pixels": np.stack(out["pixels"]) if out["pixels"] else np.zeros((0, size, size, 3), np.uint8),
        "error": np.asarray(out["error"], object),
        **({"mask": np.stack(out["mask"]) if out["mask"] else np.zeros((0, size, size), bool),
            "source_image_id": np.asarray(out["source_image_id"], object)} if with_masks else {}),
    }
    return per_part(decoded) if per_part is not None else decoded


def decoded_images(selections: list[PartSelection], image_size: int, max_pixels: int,
                   with_masks: bool = False,
                   per_part: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                   ) -> ray.data.Dataset:
    """A Ray dataset of decoded rows (one decode task per part with selected rows).

    `with_masks`: see `decode_parts`. `per_part`: applied to each part's decoded rows inside its
    decode task, where the part is still whole (Ray Data may split a large output block later).

    The decode tasks ask for another CPU amount than the model actors downstream, so that Ray Data
    does not fuse them into the actors: decoding then runs in parallel CPU tasks, not in the
    actor's process between model calls. The parts' locations (with their filesystem and its
    credentials) travel in `fn_kwargs`, not as a column: Arrow has no type for them.
    """
    tasks = [{"part": s.part, "rows": list(s.rows)} for s in selections if s.rows]
    if not tasks:
        raise ValueError("no rows selected")
    locations = {s.part: s.location for s in selections if s.rows}
    return ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        decode_parts,  # type: ignore[arg-type]  # Ray types `fn` as fn(batch), leaving out fn_kwargs
        fn_kwargs={"locations": locations, "image_size": image_size, "max_pixels": max_pixels,
                   "with_masks": with_masks, "per_part": per_part},
        batch_size=1, num_cpus=DECODE_CPUS)


def decoded_queue_bytes(selections: list[PartSelection], image_size: int) -> int:
    """What to let wait in Ray's object store ahead of the model actors: a few input parts' worth
    of decoded pixels, at least 256 MiB (see `cap_queued_rows`)."""
    largest_part = max((len(s.rows) for s in selections), default=1)
    return max(256 * 2**20, 3 * largest_part * image_size * image_size * 3)


def cap_queued_rows(stream: ray.data.Dataset, cap_bytes: int) -> ray.data.Dataset:
    """Bound the rows waiting in Ray's object store for the model actors.

    Decoding is much faster than a model, so without a cap the decode tasks run ahead and the
    queue grows with the archive until the object store is full (peak memory then depends on the
    archive's size)."""
    options = stream.context.execution_options  # this dataset's own copy of the context
    options.resource_limits = options.resource_limits.copy(object_store_memory=cap_bytes)
    return stream


def null_if_nan(value: Any) -> float | None:
    """Ray Data turns a None in an object column into NaN (and scores may be NaN); tables want null."""
    return None if value is None or np.isnan(float(value)) else float(value)
