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
    manifest = datasets.read_manifest(folder, table="images")

    def candidates(table: pa.Table) -> np.ndarray:
        mask = pc.and_(pc.equal(table["category"], spec.category), pc.equal(table["label"], 0)).fill_null(False)
        if spec.split is not None:
            mask = pc.and_(mask, pc.equal(table["split"], spec.split)).fill_null(False)
        return mask.to_numpy(zero_copy_only=False)

    selections, table = select_rows(folder, manifest, candidates)
    ids = table["image_id"].to_pylist() if table.num_rows else []
    where = f"category {spec.category!r}" + (f", split {spec.split!r}" if spec.split else "")
    if len(ids) < spec.count:
        raise InputError(f"{folder.uri} has {len(ids)} normal images of {where}; references.count asks for "
                         f"{spec.count}")
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    chosen = set(order[np.sort(np.random.default_rng(spec.seed).choice(len(ids), spec.count, replace=False))].tolist())
    parts, rows = table["_part"].to_numpy(), table["_row"].to_numpy()
    by_part: dict[int, list[int]] = {}
    for index in sorted(chosen):
        by_part.setdefault(int(parts[index]), []).append(int(rows[index]))
    picked = [type(s)(s.part, s.location, tuple(sorted(by_part.get(s.part, [])))) for s in selections]
    decoded = decode_to_driver(picked, card.image_size, max_pixels)
    bad = [str(i) for i, ok in zip(decoded["image_id"], decoded["ok"], strict=True) if not ok]
    if bad:
        raise InputError(f"reference image {bad[0]!r} of {folder.uri} cannot be decoded; choose another seed or "
                         "fix the image")
    order = np.argsort(decoded["image_id"].astype(str), kind="stable")
    pixels = np.ascontiguousarray(decoded["pixels"][order])  # a writable copy (Ray's arrays are read-only)
    threshold = spec.threshold if spec.threshold is not None else leave_one_out_threshold(card, pixels, spec.category)
    return ReferenceImages(category=spec.category, image_ids=tuple(str(i) for i in decoded["image_id"][order]),
                           pixels=pixels, threshold=threshold, source=folder.uri)


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
