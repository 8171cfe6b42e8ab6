"""Parameters of `score`: an images dataset streamed through a model -> a scores dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.data.limits import DEFAULT_MAX_PIXELS
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
