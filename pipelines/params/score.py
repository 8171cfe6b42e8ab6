"""Parameters of `score`: an images dataset streamed through a model -> a scores dataset."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from pipelines.data.limits import DEFAULT_MAX_PIXELS
from pipelines.errors import SpecError
from pipelines.spec_fields import DatasetInputSpec, ModelInputSpec, ResourcesSpec, check_name, check_positive


@dataclass(frozen=True)
class ScoreOutputSpec:
    archive: str | None = None  # folder name under scores/; default: the input dataset's name
    anomaly_maps: bool = False

    def validate(self, path: str) -> ScoreOutputSpec:
        if self.archive is not None:
            check_name(self.archive, f"{path}.archive")
        return self


@dataclass(frozen=True)
class ReferencesSpec(DatasetInputSpec):
    """`references:` — score `category` against `count` of its normal images (label 0) from
    `dataset`, drawn with `seed` among those of `split`: a detector that can (ResAD) applies to a
    category it was never trained on, with no retraining. The chosen image ids go into the scores'
    manifest. `threshold`: the decision threshold for that category (default: the highest score of
    a reference against the others, leave-one-out; the trained categories' thresholds do not
    carry over, their score levels differ by category)."""

    category: str = ""
    count: int = 4
    split: Literal["train", "test"] | None = "train"
    seed: int = 0
    threshold: float | None = None

    def validate(self, path: str) -> ReferencesSpec:
        dataset = DatasetInputSpec(self.dataset).validate(path).dataset
        if not self.category:
            raise SpecError(f"{path}.category", "names the category to score from the reference images; it is missing")
        check_positive(self.count, f"{path}.count")
        check_positive(self.seed, f"{path}.seed", allow_zero=True)
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise SpecError(f"{path}.threshold", f"must be a finite number, got {self.threshold}")
        return dataclasses.replace(self, dataset=dataset)


@dataclass(frozen=True)
class ScoreParams:
    inputs: DatasetInputSpec
    model: ModelInputSpec
    split: Literal["train", "test"] | None = None  # score only this split; default: every row
    outputs: ScoreOutputSpec = ScoreOutputSpec()
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    resources: ResourcesSpec = ResourcesSpec(workers=1)
    references: ReferencesSpec | None = None  # few-shot: a detector with the "references" capability
    # What the network calls run in: auto = bf16 autocast for a diffusion detector on GPU workers,
    # fp32 otherwise (`pipelines.models.inference.scoring_precision`); bf16 asks for it.
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def validate(self, path: str) -> ScoreParams:
        prefix = f"{path}." if path else ""
        check_positive(self.max_image_pixels, f"{prefix}max_image_pixels")
        if self.precision == "bf16" and self.resources.gpus_per_worker <= 0:
            raise SpecError(f"{prefix}precision", "bf16 autocast is for GPU workers; set resources.gpus_per_worker "
                                                  "(or precision: auto)")
        return self
