"""Few-shot references of a `score` job (`references:`): which normal images stand for a category
the model never trained on, decoded once on the driver and handed to every scorer actor.

The draw is reproducible (a seed over the candidates sorted by image id) and recorded (the chosen
image ids go into the scores' manifest). A reference that cannot be decoded is an input error
naming it, not a silently smaller shot set; a reference that would also be scored is refused (a
shot scores as perfectly normal against itself and would flatter the evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import datasets
from pipelines.errors import InputError
from pipelines.models.artifacts import ModelCard
from pipelines.params.score import ReferencesSpec
from pipelines.stages.base import StepContext
from pipelines.stages.calibration import decode_to_driver
from pipelines.stages.image_batches import select_rows
from pipelines.storage import Location


@dataclass(frozen=True)
class ReferenceImages:
    category: str
    image_ids: tuple[str, ...]
    pixels: np.ndarray  # (count, S, S, 3) uint8
    threshold: float
    source: str  # the dataset's URI

    def provenance(self) -> dict:
        return {"category": self.category, "dataset": self.source, "image_ids": list(self.image_ids),
                "threshold": self.threshold}


def reference_images(spec: ReferencesSpec, card: ModelCard, context: StepContext, max_pixels: int) -> ReferenceImages:
    if "references" not in card.record.capabilities:
        raise InputError(f"{card.folder.uri} is a {card.method!r} model, which scores only the categories it was "
                         "trained on; `references:` needs a method that scores a category from a few of its normal "
                         "images (resad)")
    folder = context.input_dataset(spec)
    image_ids, pixels = draw_normal_images(folder, spec.category, spec.count, spec.seed, card.image_size, max_pixels,
                                           split=spec.split, what="reference image", count_field="references.count")
    threshold = spec.threshold if spec.threshold is not None else leave_one_out_threshold(card, pixels, spec.category)
    return ReferenceImages(category=spec.category, image_ids=image_ids, pixels=pixels, threshold=threshold,
                           source=folder.uri)


def draw_normal_images(folder: Location, category: str, count: int | None, seed: int, image_size: int,
                       max_pixels: int, split: str | None = None, what: str = "image",
                       count_field: str = "count") -> tuple[tuple[str, ...], np.ndarray]:
    """`count` normal images (label 0) of a category (and split), or all of them with count None,
    decoded on the driver: (image ids, (count, S, S, 3) uint8), sorted by image id. The draw is a
    seeded choice over the candidates sorted by image id, so it does not depend on the part layout.
    An image that cannot be decoded is an InputError naming it, never a smaller set."""
    manifest = datasets.read_manifest(folder, table="images")

    def candidates(table: pa.Table) -> np.ndarray:
        mask = pc.and_(pc.equal(table["category"], category), pc.equal(table["label"], 0)).fill_null(False)
        if split is not None:
            mask = pc.and_(mask, pc.equal(table["split"], split)).fill_null(False)
        return mask.to_numpy(zero_copy_only=False)

    selections, table = select_rows(folder, manifest, candidates)
    ids = table["image_id"].to_pylist() if table.num_rows else []
    where = f"category {category!r}" + (f", split {split!r}" if split else "")
    if not ids or (count is not None and len(ids) < count):
        raise InputError(f"{folder.uri} has {len(ids)} normal images of {where}; {count_field} asks for "
                         f"{count if count is not None else 'at least one'}")
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    picked_order = (order if count is None else
                    order[np.sort(np.random.default_rng(seed).choice(len(ids), count, replace=False))])
    parts, rows = table["_part"].to_numpy(), table["_row"].to_numpy()
    by_part: dict[int, list[int]] = {}
    for index in sorted(set(picked_order.tolist())):
        by_part.setdefault(int(parts[index]), []).append(int(rows[index]))
    picked = [type(s)(s.part, s.location, tuple(sorted(by_part.get(s.part, [])))) for s in selections]
    decoded = decode_to_driver(picked, image_size, max_pixels)
    bad = [str(i) for i, ok in zip(decoded["image_id"], decoded["ok"], strict=True) if not ok]
    if bad:
        raise InputError(f"{what} {bad[0]!r} of {folder.uri} cannot be decoded; choose another seed or "
                         "fix the image")
    order = np.argsort(decoded["image_id"].astype(str), kind="stable")
    pixels = np.ascontiguousarray(decoded["pixels"][order])  # a writable copy (Ray's arrays are read-only)
    return tuple(str(i) for i in decoded["image_id"][order]), pixels


def leave_one_out_threshold(card: ModelCard, pixels: np.ndarray, category: str) -> float:
    """The default decision threshold of a reference category: the highest score a reference gets
    against the others (leave-one-out). The training categories' thresholds say nothing about a new
    one (their scores differ by category), and a shot scored against a set holding itself is 0."""
    import torch

    from pipelines.models.inference import to_tensor

    if len(pixels) < 2:
        raise InputError("references.count is 1: no other reference to score it against for a threshold; "
                         "set references.threshold")
    models = card.load("cpu")
    base = models.models[models.key_for(category) or sorted(models.models)[0]]
    implementation = card.record.load()
    images = to_tensor(pixels)
    scores = []
    with torch.inference_mode():
        for index in range(len(images)):
            others = torch.cat([images[:index], images[index + 1:]])
            scores.append(float(implementation.with_references(base, others).score(images[index:index + 1],
                                                                                    [""]).scores[0]))
    return max(scores)


def refuse_scored_references(references: ReferenceImages, scored: pa.Table, images_uri: str) -> None:
    """A reference image among the rows to score (same dataset, overlapping split) is refused."""
    if references.source != images_uri or not scored.num_rows:
        return
    overlap = sorted(set(references.image_ids) & set(scored["image_id"].to_pylist()))
    if overlap:
        raise InputError(f"reference image {overlap[0]!r} would be scored too ({len(overlap)} of the references are "
                         f"among the rows to score): set `split` to score the other split, or draw the references "
                         "from another split or dataset")
