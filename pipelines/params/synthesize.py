"""Parameters of `synthesize`: which normal images, which anomaly sources (texture, SDAS, CutPaste,
Poisson) by weight, the Perlin masks and the optional foreground restriction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.data.limits import DEFAULT_MAX_PIXELS
from pipelines.errors import SpecError
from pipelines.spec_fields import (
    DatasetInputSpec,
    DatasetOutputSpec,
    ModelInputSpec,
    ResourcesSpec,
    check_image_size,
    check_names,
    check_positive,
)
from pipelines.synthesis.config import PerlinConfig


def _check_range(value: tuple[float, ...], path: str, low: float = 0.0, high: float = 1.0) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise SpecError(path, f"must be [min, max] with {low} <= min <= max <= {high}, got {list(value)}")


@dataclass(frozen=True)
class TextureSourceSpec:
    type: Literal["texture"]
    textures: DatasetInputSpec  # any images dataset (e.g. DTD-like textures)
    weight: float = 1.0
    opacity: tuple[float, ...] = (0.2, 1.0)  # delta range, RealNet's default for textures

    def validate(self, path: str) -> TextureSourceSpec:
        check_positive(self.weight, f"{path}.weight")
        _check_range(self.opacity, f"{path}.opacity")
        return self


@dataclass(frozen=True)
class SdasSourceSpec:
    type: Literal["sdas"]
    model: ModelInputSpec  # a ddpm model artifact (train method ddpm)
    weight: float = 1.0
    opacity: tuple[float, ...] = (0.5, 1.0)  # RealNet's default for SDAS sources
    strength: tuple[float, ...] = (0.1, 0.2)  # s, drawn per batch: noise x sqrt(1 + s)
    steps: int = 20  # respaced reverse steps

    def validate(self, path: str) -> SdasSourceSpec:
        check_positive(self.weight, f"{path}.weight")
        _check_range(self.opacity, f"{path}.opacity")
        _check_range(self.strength, f"{path}.strength", high=10.0)
        check_positive(self.steps, f"{path}.steps")
        return self


@dataclass(frozen=True)
class CutPasteSourceSpec:
    type: Literal["cutpaste"]
    weight: float = 1.0
    opacity: tuple[float, ...] = (1.0, 1.0)  # the patch pasted as is

    def validate(self, path: str) -> CutPasteSourceSpec:
        check_positive(self.weight, f"{path}.weight")
        _check_range(self.opacity, f"{path}.opacity")
        return self


@dataclass(frozen=True)
class PoissonSourceSpec:
    type: Literal["poisson"]  # NSA-style: a patch of another normal image, seamlessly cloned
    weight: float = 1.0
    opacity: tuple[float, ...] = (1.0, 1.0)

    def validate(self, path: str) -> PoissonSourceSpec:
        check_positive(self.weight, f"{path}.weight")
        _check_range(self.opacity, f"{path}.opacity")
        return self


SourceSpec = TextureSourceSpec | SdasSourceSpec | CutPasteSourceSpec | PoissonSourceSpec


@dataclass(frozen=True)
class ForegroundSpec:
    method: Literal["otsu", "triangle"] = "otsu"
    invert: bool = False  # the object is darker than the background
    categories: tuple[str, ...] | None = None  # only these categories (objects); default every one

    def validate(self, path: str) -> ForegroundSpec:
        check_names(self.categories, f"{path}.categories")
        return self


@dataclass(frozen=True)
class SynthesizeParams:
    inputs: DatasetInputSpec  # its normal training rows (split train, label 0) are the images used
    outputs: DatasetOutputSpec
    sources: tuple[SourceSpec, ...]
    per_image: int = 1  # synthetic anomalies per input image
    include_normals: bool = False  # also write the untouched normals (label 0): a ready 50/50 mix
    image_size: int = 256
    perlin: PerlinConfig = PerlinConfig()
    foreground: ForegroundSpec | None = None
    categories: tuple[str, ...] | None = None
    sample_fraction: float = 1.0  # of the normal training images, a seeded choice by image id
    split: Literal["train", "test"] = "train"  # the split written on the output rows
    seed: int = 0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    resources: ResourcesSpec = ResourcesSpec(workers=1, batch_size=8)

    def validate(self, path: str) -> SynthesizeParams:
        prefix = f"{path}." if path else ""
        if not self.sources:
            raise SpecError(f"{prefix}sources", "give at least one anomaly source (texture, sdas, cutpaste, poisson)")
        check_positive(self.per_image, f"{prefix}per_image")
        if not 0.0 < self.sample_fraction <= 1.0:
            raise SpecError(f"{prefix}sample_fraction", f"must be in (0, 1], got {self.sample_fraction}")
        check_image_size(self.image_size, f"{prefix}image_size", minimum=16)
        check_positive(self.seed, f"{prefix}seed", allow_zero=True)
        check_positive(self.max_image_pixels, f"{prefix}max_image_pixels")
        check_names(self.categories, f"{prefix}categories")
        if self.outputs.rows_per_part is not None:
            raise SpecError(f"{prefix}outputs.rows_per_part", "does not apply to synthesize: each output part holds "
                            "the anomalies of one input part (so a rerun redoes only the missing parts); remove it")
        self.perlin.validate(f"{prefix}perlin", image_size=self.image_size)  # no more lattice cells than pixels
        return self
