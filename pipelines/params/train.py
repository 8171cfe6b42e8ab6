"""Parameters of `train`: which method, on which rows, published where, calibrated how.

The method's own parameters live in one block named after it (`padim:`, `ddpm:`), parsed by the
dataclass its record names (`pipelines.models.methods`); a block or key of another method is an
error that says where it belongs. So a step's fingerprint holds its chosen method's parameters
and nothing of the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.data.limits import DEFAULT_MAX_PIXELS
from pipelines.errors import SpecError
from pipelines.models.methods import MethodRecord, find_method, method, method_names
from pipelines.spec_fields import (
    DatasetInputSpec,
    ResourcesSpec,
    check_name,
    check_names,
    check_positive,
    convert_value,
    parse_dataclass,
    short_repr,
    spec_to_data,
    unknown_key_error,
)


@dataclass(frozen=True)
class ModelOutputSpec:
    """A model a step publishes: `models/<model>/<version>/` under the storage root."""

    model: str
    version: str | None = None  # default: the run id

    def validate(self, path: str) -> ModelOutputSpec:
        check_name(self.model, f"{path}.model")
        if self.version is not None:
            check_name(self.version, f"{path}.version")
        return self


@dataclass(frozen=True)
class ThresholdSpec:
    method: Literal["normal_quantile", "f1_max"] = "normal_quantile"
    quantile: float = 0.99
    holdout_fraction: float = 0.1  # of the normal training images: calibrate on them (statistics fits add them after)
    # Labelled validation images (label 0/1; e.g. synthetic anomalies) for f1_max. Keep them apart
    # from the images you evaluate on.
    validation: DatasetInputSpec | None = None
    validation_split: Literal["train", "test"] | None = None

    def validate(self, path: str) -> ThresholdSpec:
        if not 0.0 < self.quantile < 1.0:
            raise SpecError(f"{path}.quantile", f"must be in (0, 1), got {self.quantile}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise SpecError(f"{path}.holdout_fraction", f"must be in (0, 1), got {self.holdout_fraction}")
        if self.method == "f1_max" and self.validation is None:
            raise SpecError(f"{path}.validation", "method f1_max needs labelled validation images: "
                                                  "set validation.dataset (or use method normal_quantile)")
        return self


@dataclass(frozen=True)
class TrainParams:
    method: str
    inputs: DatasetInputSpec
    outputs: ModelOutputSpec
    method_params: Any  # the `<method>:` block, the record's params dataclass
    categories: tuple[str, ...] | None = None  # default: every category with normal training images
    # Statistics-fitted detectors: one model per category (default), or one over all of them.
    per_category: bool | None = None
    threshold: ThresholdSpec | None = None  # detectors only; default ThresholdSpec()
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    resources: ResourcesSpec = ResourcesSpec()

    @property
    def record(self) -> MethodRecord:
        return method(self.method)

    @property
    def calibration(self) -> ThresholdSpec:
        return self.threshold or ThresholdSpec()

    @property
    def one_model_per_category(self) -> bool:
        return self.per_category is not False

    @property
    def image_size(self) -> int:
        return int(self.method_params.image_size)

    def validate(self, path: str) -> TrainParams:
        prefix = f"{path}." if path else ""
        record = self.record
        check_names(self.categories, f"{prefix}categories")
        check_positive(self.max_image_pixels, f"{prefix}max_image_pixels")
        if self.per_category is not None and record.fit != "statistics":
            raise SpecError(f"{prefix}per_category", f"method {record.name!r} trains one model over the selected "
                                                     "categories; remove per_category")
        if self.threshold is not None and record.role != "detector":
            raise SpecError(f"{prefix}threshold", f"method {record.name!r} is a {record.role}, it has no decision "
                                                  "threshold; remove threshold")
        return self

    @classmethod
    def from_spec_data(cls, data: typing.Mapping[str, Any], path: str) -> TrainParams:
        prefix = f"{path}." if path else ""
        if "method" not in data:
            raise SpecError(f"{prefix}method", f"missing required field; expected one of "
                                               f"{', '.join(map(repr, method_names()))}")
        name = convert_value(str, data["method"], f"{prefix}method")
        record = find_method(name)
        if record is None:
            guess = difflib.get_close_matches(name[:100], method_names(), n=1, cutoff=0.6)
            hint = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise SpecError(f"{prefix}method", f"{short_repr(name)} is not a method{hint}; expected one of "
                                               f"{', '.join(map(repr, method_names()))}")
        common = [f for f in dataclasses.fields(cls) if f.name != "method_params"]
        allowed = [f.name for f in common] + [record.name]
        for key in data:
            if key not in allowed:
                raise _misplaced(key, record, allowed, prefix)
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in common:
            if f.name in data:
                values[f.name] = convert_value(hints[f.name], data[f.name], f"{prefix}{f.name}")
            elif f.default is dataclasses.MISSING:
                raise SpecError(f"{prefix}{f.name}", "missing required field")
        values["method_params"] = parse_dataclass(record.params, data.get(record.name, {}), f"{prefix}{record.name}")
        return cls(**values).validate(path)

    def spec_key(self, name: str) -> str:
        """The key a field is written under: the method block under the method's name."""
        return self.method if name == "method_params" else name

    def to_spec_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "method_params":
                out[self.method] = spec_to_data(value)
            elif f.name != "method" and value is not None:
                out[f.name] = spec_to_data(value)
        return out


def _misplaced(key: Any, record: MethodRecord, allowed: list[str], prefix: str) -> SpecError:
    """The error for a key a train step does not take, saying where it belongs if it belongs somewhere."""
    where = f"{prefix}{key}"
    other = find_method(key) if isinstance(key, str) else None
    if other is not None:
        return SpecError(where, f"is the {other.name!r} method's block, but this step's method is {record.name!r}: "
                                f"remove it, or set method: {other.name}")
    if key in {f.name for f in dataclasses.fields(record.params)}:
        return SpecError(where, f"is a parameter of method {record.name!r}: it belongs in its block, "
                                f"write it as {prefix}{record.name}.{key}")
    owners = [name for name in method_names()
              if key in {f.name for f in dataclasses.fields(method(name).params)}]
    if owners:
        return SpecError(where, f"unknown key {short_repr(key)}: method {record.name!r} has no such parameter "
                                f"(it is one of {', '.join(map(repr, owners))}); allowed keys: {', '.join(allowed)}")
    return unknown_key_error(key, allowed, prefix.rstrip("."))
