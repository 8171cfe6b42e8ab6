"""Parameters of `ingest`: which source is listed (MVTec tree, folder/prefix, ELPV, scikit-image's
bundled images) and where the images dataset is published."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pipelines.data.limits import DEFAULT_MAX_PIXELS
from pipelines.errors import SpecError
from pipelines.spec_fields import (
    DatasetOutputSpec,
    ResourcesSpec,
    check_name,
    check_names,
    check_positive,
    normalize_uri,
)


@dataclass(frozen=True)
class MVTecSource:
    type: Literal["mvtec"]
    uri: str
    categories: tuple[str, ...] | None = None
    follow_symlinks: bool = False  # local sources: ingest files that symlinks lead to outside `uri`

    def validate(self, path: str) -> MVTecSource:
        check_names(self.categories, f"{path}.categories")  # folder names under the uri
        return replace(self, uri=normalize_uri(self.uri, f"{path}.uri"))


@dataclass(frozen=True)
class FolderSource:
    type: Literal["folder"]
    uri: str
    category: str | None = None
    split: Literal["train", "test"] = "test"
    follow_symlinks: bool = False  # local sources: ingest files that symlinks lead to outside `uri`

    def validate(self, path: str) -> FolderSource:
        if self.category is not None:  # a category names per-category models and report sections
            check_name(self.category, f"{path}.category")
        return replace(self, uri=normalize_uri(self.uri, f"{path}.uri"))


@dataclass(frozen=True)
class ELPVSource:
    type: Literal["elpv"]
    uri: str | None = None  # a folder with labels.csv + images/; default: the elpv-dataset package
    categories: tuple[Literal["mono", "poly"], ...] | None = None
    normal_train_fraction: float = 0.6  # of each cell type's normal cells; the rest are test
    split_seed: int = 0

    def validate(self, path: str) -> ELPVSource:
        if not 0.0 <= self.normal_train_fraction <= 1.0:
            raise SpecError(f"{path}.normal_train_fraction", f"must be in [0, 1], got {self.normal_train_fraction}")
        check_names(self.categories, f"{path}.categories")
        check_positive(self.split_seed, f"{path}.split_seed", allow_zero=True)
        uri = normalize_uri(self.uri, f"{path}.uri") if self.uri else None
        return ELPVSource(self.type, uri, self.categories, self.normal_train_fraction, self.split_seed)


@dataclass(frozen=True)
class SkimageSource:
    """Images bundled with scikit-image (default: its textures), e.g. as anomaly texture sources."""

    type: Literal["skimage"]
    images: tuple[str, ...] | None = None

    def validate(self, path: str) -> SkimageSource:
        if self.images is not None and not self.images:
            raise SpecError(f"{path}.images", "is an empty list: name at least one image, or leave the key out "
                                              "for the bundled textures")
        return self


@dataclass(frozen=True)
class IngestParams:
    source: MVTecSource | FolderSource | ELPVSource | SkimageSource
    outputs: DatasetOutputSpec
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    resources: ResourcesSpec = ResourcesSpec()

    def validate(self, path: str) -> IngestParams:
        check_positive(self.max_image_pixels, f"{path}.max_image_pixels" if path else "max_image_pixels")
        return self
