"""The method contract: how a detector or a generative model plugs into the stages.

A method is one record (`MethodRecord`), registered by the module that defines the method. The
record is torch-free — its name, its role, how it fits and its parameter dataclass, which the spec
layer validates — and names its implementation ("module:attribute"), imported on first use. So
`adpipe validate` reads every method's parameters without importing torch, and a scorer of one
method never imports another's dependencies.

Roles. A **detector** scores images: its models answer `score(images, row_ids) -> ScoreBatch`.
A **generator** (the DDPM, later VQGAN) makes images that other stages use (SDAS anomalies,
samples); the score stage refuses it because its record says so, not by its name.

How a method fits (`fit`), and what its implementation provides for it:

- ``"statistics"``: streamed sufficient statistics (PaDiM). `fitter(config, plan)` returns an
  object with `new_statistics()`, `update(statistics, images)` (images: (B, 3, S, S) float in
  [0, 1]), `merge(a, b)` and `model(statistics) -> Detector`; `plan(config)` draws what every
  worker must share (e.g. PaDiM's random channel subset) once, on the driver. Statistics add up,
  so the stage fits on the non-held-out images, calibrates, then adds the held-out images in.
- ``"gradient"``: trained with Ray Train by `pipelines.stages.train_gradient`. The parameters
  carry a `training: GradientTrainingSpec` block; `training_state(params, context)` returns the
  state one train step changes and a checkpoint holds (see `TrainingState` below).

Every implementation provides `build(config, tensors) -> nn.Module` (tensors None: untrained),
optionally `describe(config) -> str` (the step summary's name for the model) and
`category_models(config, models) -> models` (one saved model serving several categories as models
of their own, e.g. a class-conditional network viewed once per class: `artifacts.build_models`), and its record
says which dataclass is saved as the artifact's config (`artifact_config`; by default the
parameters). Adding a method: docs/adding-a-method.md.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pipelines.errors import InputError, SpecError
from pipelines.spec_fields import check_positive

if TYPE_CHECKING:
    import numpy as np
    import torch

Role = Literal["detector", "generator"]
Fit = Literal["statistics", "gradient"]
# What a gradient-trained method's batches hold (`TrainingBatch`): "normals", the normal training
# images; "synthetic_pairs", a `synthesize` output written with include_normals: each normal image
# and one anomaly made from it (per epoch), with the anomaly's mask and its clean source image.
TrainingData = Literal["normals", "synthetic_pairs"]

# Built-in methods: the torch-free module that registers each, imported when the name is first
# asked for (or when every name is listed, e.g. for an error message).
BUILTIN_METHODS: dict[str, str] = {
    "padim": "pipelines.models.padim",
    "ddpm": "pipelines.models.diffusion",
    "pfm": "pipelines.models.pfm",
    "realnet": "pipelines.models.realnet",
    "resad": "pipelines.models.resad",
    "diffusion_kl": "pipelines.models.diffusion_kl",
    "cgddm": "pipelines.models.cgddm",
    "vqgan": "pipelines.models.vqgan",
}


@dataclass(frozen=True)
class MethodRecord:
    name: str
    role: Role
    fit: Fit
    # frozen dataclass with validate(path) and an `image_size` (field or property): the train step's
    # `<name>:` block
    params: type
    implementation: str | Callable[[], Any]  # "module:attribute", or a factory (tests)
    artifact_config: type | None = None  # what the artifact's config.json holds; default `params`
    # What a generator's implementation can do for other stages: "sample" (draw images: the sample
    # stage) and "sdas" (sample with RealNet's variance strength s: synthesize's sdas source).
    # "generate": vary given images (`adapt(model, images, steps, lr, seed)`, `vary(model, images, copies, generator)`).
    # A detector's: "references" (score a category from a few of its normal images, given by the
    # score job's `references:`; the implementation has `with_references(model, images)`);
    # "bf16" (its models' `score(images, row_ids, autocast_dtype=None)` runs the network calls under
    # that autocast and the map arithmetic in float32: the score stage's `precision` uses it on GPUs).
    capabilities: frozenset[str] = frozenset()
    training_data: TrainingData = "normals"  # gradient methods: what a batch holds
    summary: str = ""  # one line for error messages and docs
    paper: str = ""

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.params) or not hasattr(self.params, "validate"):
            raise TypeError(f"method {self.name!r}: params must be a dataclass with validate(path)")
        if self.fit == "gradient" and "training" not in {f.name for f in dataclasses.fields(self.params)}:
            raise TypeError(f"method {self.name!r}: a gradient-trained method's params need a "
                            "`training: GradientTrainingSpec` field")

    @property
    def config_class(self) -> type:
        return self.artifact_config or self.params

    def load(self) -> Any:
        """The implementation object (imports torch and whatever the method needs)."""
        if callable(self.implementation):
            return self.implementation()
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def config_from_json(self, data: dict) -> Any:
        return dataclass_from_json(self.config_class, data)



# How a detector's anomaly map becomes its image score (`pipelines.models.anomaly_maps.image_scores`):
# "max", the most anomalous spot (the papers'); "mean", the whole map's average, which also sees a
# small change everywhere (a global defect: a rescaled or recoloured weave) that no spot shows.
IMAGE_SCORES: tuple[str, ...] = ("max", "mean")


def check_image_score(value: str, path: str) -> None:
    if value not in IMAGE_SCORES:
        raise SpecError(path, f"{value!r}; expected one of {', '.join(IMAGE_SCORES)}")


@dataclass(frozen=True)
class GradientTrainingSpec:
    """The `training:` block of every gradient-trained method: how long, how often to checkpoint
    and log, the data augmentation, precision and fault tolerance (`pipelines.stages.train_gradient`)."""

    steps: int = 1000  # optimizer steps (each: batch_size images on every worker)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    max_rotation: float = 5.0  # degrees, as DiffAD
    hflip: bool = False
    vflip: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    max_failures: int = 2  # worker failures Ray Train recovers from, each time from the last checkpoint
    keep_checkpoints: int = 2

    def validate(self, path: str) -> GradientTrainingSpec:
        for name in ("steps", "checkpoint_every", "log_every", "keep_checkpoints"):
            check_positive(getattr(self, name), f"{path}.{name}")
        check_positive(self.max_failures, f"{path}.max_failures", allow_zero=True)
        check_positive(self.seed, f"{path}.seed", allow_zero=True)
        if not 0 <= self.max_rotation <= 180:
            raise SpecError(f"{path}.max_rotation", f"must be in [0, 180] degrees, got {self.max_rotation}")
        return self


@dataclass(frozen=True)
class AdamSpec:
    """The `optim:` block of a gradient-trained detector with one learning rate (RealNet, ResAD)."""

    lr: float = 1e-3
    weight_decay: float = 0.0

    def validate(self, path: str) -> AdamSpec:
        if not (self.lr > 0) or self.lr == float("inf"):
            raise SpecError(f"{path}.lr", f"must be a finite learning rate > 0, got {self.lr}")
        check_positive(self.weight_decay, f"{path}.weight_decay", allow_zero=True)
        return self


_REGISTRY: dict[str, MethodRecord] = {}


def register(record: MethodRecord) -> MethodRecord:
    """Add a method; called at import time by the module that defines it (or by a test)."""
    existing = _REGISTRY.get(record.name)
    if existing is not None and existing != record:
        raise RuntimeError(f"method {record.name!r} registered twice")
    _REGISTRY[record.name] = record
    return record


def unregister(name: str) -> None:
    """Remove a method registered at run time (tests clean up after themselves)."""
    if name in BUILTIN_METHODS:
        raise RuntimeError(f"{name!r} is a built-in method")
    _REGISTRY.pop(name, None)


def method_names() -> list[str]:
    for module in BUILTIN_METHODS.values():
        importlib.import_module(module)
    return sorted(_REGISTRY)


def method(name: str) -> MethodRecord:
    """The record of a method by name; InputError (naming the known ones) if there is none."""
    if name not in _REGISTRY and name in BUILTIN_METHODS:
        importlib.import_module(BUILTIN_METHODS[name])
    if name not in _REGISTRY:
        raise InputError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _REGISTRY[name]


def find_method(name: str) -> MethodRecord | None:
    try:
        return method(name)
    except InputError:
        return None


def dataclass_from_json(cls: type, data: dict) -> Any:
    """A frozen config dataclass from its `asdict` JSON (lists back to tuples, nested dataclasses too)."""
    import typing

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{cls.__name__}: unknown fields {unknown} in a model's config.json")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = dataclass_from_json(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


# ---- what implementations give back (torch types only for the type checker) ------------------


@dataclass(frozen=True)
class ScoreBatch:
    """A detector's answer for a batch of B images: image scores (B,) and anomaly maps (B, S, S),
    float32, higher is more anomalous."""

    scores: torch.Tensor
    maps: torch.Tensor


@dataclass(frozen=True)
class Published:
    """What a finished gradient training run publishes as the model artifact."""

    config: Any  # the artifact's config (the record's `config_class`)
    tensors: dict[str, dict[str, torch.Tensor]]  # category key -> that model's tensors
    info: dict[str, Any]
    summary: str  # how the step's summary line describes the model


class Detector(Protocol):
    """A fitted model of a detector method (a torch module)."""

    def score(self, images: torch.Tensor, row_ids: Sequence[str]) -> ScoreBatch:
        """images (B, 3, S, S) float in [0, 1]; `row_ids` name the rows, so that a method that
        draws noise seeds it per image and scores the same image the same way in any batch.
        Padding slots of a fixed-geometry batch have the row id ""."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the artifact saves (with the config): `build(config, tensors)` rebuilds the model."""


class StatisticsFitter(Protocol):
    def new_statistics(self) -> Any:
        """Empty statistics; they count the images they have seen in `count`."""

    def update(self, statistics: Any, images: torch.Tensor) -> None: ...

    def merge(self, a: Any, b: Any) -> Any: ...

    def model(self, statistics: Any) -> Detector: ...


@dataclass(frozen=True)
class TrainingContext:
    """What the train stage tells a gradient-trained method about its data."""

    class_names: tuple[str, ...]  # the categories trained on, sorted
    device: str
    seed: int


@dataclass(frozen=True)
class TrainingBatch:
    """One worker's share of a training step, decoded and augmented (numpy, from the Ray glue)."""

    pixels: np.ndarray  # (B, S, S, 3) uint8: the images the model is trained on
    categories: np.ndarray  # (B,) category names
    # training_data "synthetic_pairs" only: the anomaly-free image each row was made from (a normal
    # row's own pixels) and where the row differs from it ((B, S, S) bool; all False for normals).
    clean: np.ndarray | None = None
    masks: np.ndarray | None = None


class TrainingState(Protocol):
    """Model, optimizer and step counter of a gradient-trained method on one Ray Train worker."""

    step: int
    module: torch.nn.Module  # what DDP wraps
    forward_model: torch.nn.Module  # the glue swaps in the DDP wrapper

    def train_batch(self, batch: TrainingBatch, generator: torch.Generator,
                    autocast_dtype: torch.dtype | None) -> dict[str, float]:
        """One optimizer step; the metrics to log (with "lr")."""

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON meta) of a checkpoint."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


class GradientMethod(Protocol):
    """What the implementation of a `fit: "gradient"` method provides, besides `build`."""

    def training_state(self, params: Any, context: TrainingContext) -> TrainingState: ...

    def published(self, params: Any, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The artifact from the last checkpoint's tensors and meta."""


class StatisticsMethod(Protocol):
    """What the implementation of a `fit: "statistics"` method provides, besides `build`."""

    def plan(self, config: Any) -> Any:
        """What every fitting worker must share, drawn once on the driver (picklable)."""

    def fitter(self, config: Any, plan: Any) -> StatisticsFitter: ...


__all__ = ["BUILTIN_METHODS", "IMAGE_SCORES", "Detector", "GradientMethod", "GradientTrainingSpec",
           "Published",
           "StatisticsMethod", "MethodRecord", "ScoreBatch", "StatisticsFitter", "TrainingBatch",
           "TrainingContext", "TrainingData", "TrainingState", "dataclass_from_json", "find_method", "method",
           "check_image_score", "method_names", "register", "unregister"]
