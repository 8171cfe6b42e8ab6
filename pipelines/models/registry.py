"""Detectors by name, and the model artifact they are saved as.

A model artifact (`models/<name>/<version>/`) holds `model.safetensors` (tensors of every
category's model, keys `<category>/<tensor>`) and `config.json` (method, method config, categories,
thresholds, lineage). Nothing is ever unpickled: tensors come from safetensors, the rest from JSON.

One registry entry per method; each says how to build a model from its config and tensors.
Methods that train by gradient descent (DDPM, ...) will register here too; the train stage asks
the entry how the method fits rather than assuming a training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipelines.errors import InputError
from pipelines.models.padim import Padim, PadimConfig, config_from_json
from pipelines.storage import Location

ARTIFACT_FORMAT = "adpipe.model/1"
ALL_CATEGORIES = "*"  # key of a model fitted on every category at once


@dataclass(frozen=True)
class DetectorType:
    name: str
    config_class: type
    config_from_json: Callable[[dict], Any]
    build: Callable[[Any, dict[str, torch.Tensor] | None], torch.nn.Module]
    fit: str  # "statistics": streamed sufficient statistics, no gradient descent


def _build_padim(config: PadimConfig, tensors: dict[str, torch.Tensor] | None) -> Padim:
    return Padim.from_tensors(config, tensors) if tensors is not None else Padim(config)


DETECTORS: dict[str, DetectorType] = {}


def register(detector: DetectorType) -> None:
    if detector.name in DETECTORS:
        raise RuntimeError(f"detector {detector.name!r} registered twice")
    DETECTORS[detector.name] = detector


register(DetectorType("padim", PadimConfig, config_from_json, _build_padim, fit="statistics"))


def detector_type(name: str) -> DetectorType:
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; available: {', '.join(DETECTORS)}")
    return DETECTORS[name]


@dataclass(frozen=True)
class ModelCard:
    """What `config.json` says about a model artifact: enough to plan a job without its tensors
    (a PaDiM artifact's tensors are hundreds of MiB; a driver that only checks image size and
    thresholds should not download them)."""

    method: str
    config: Any
    categories: tuple[str, ...]
    thresholds: dict[str, float]
    info: dict[str, Any]

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @classmethod
    def read(cls, folder: Location) -> ModelCard:
        config_location = folder.join("config.json")
        if not config_location.exists():
            raise InputError(f"no model at {folder.describe()}: config.json is missing")
        meta = config_location.read_json()
        if meta.get("format") != ARTIFACT_FORMAT:
            raise InputError(f"{config_location.uri} is not an adpipe model (format {meta.get('format')!r})")
        kind = detector_type(meta["method"])
        return cls(method=meta["method"], config=kind.config_from_json(meta["config"]),
                   categories=tuple(meta["categories"]),
                   thresholds={k: float(v) for k, v in meta["thresholds"].items()}, info=meta.get("info", {}))


@dataclass
class TrainedDetector:
    """Per-category models of one method, with their decision thresholds."""

    method: str
    config: Any
    models: dict[str, torch.nn.Module]
    thresholds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # calibration details, lineage

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def key_for(self, category: str | None) -> str | None:
        """Which model scores this category: its own, else the all-categories one, else None."""
        if category is not None and category in self.models:
            return category
        return ALL_CATEGORIES if ALL_CATEGORIES in self.models else None

    def save(self, folder: Location, lineage: dict[str, Any] | None = None) -> None:
        """Tensors first, config.json last: a model exists once its config does."""
        # clone: category models may share tensors (one channel subset), which safetensors refuses
        tensors = {f"{key}/{name}": tensor.clone() for key, model in self.models.items()
                   for name, tensor in model.tensors().items()}
        folder.join("model.safetensors").write_bytes(save_safetensors(tensors))
        folder.join("config.json").write_json({
            "format": ARTIFACT_FORMAT, "method": self.method, "config": dataclasses.asdict(self.config),
            "categories": sorted(self.models), "thresholds": self.thresholds, "info": self.info,
            "lineage": lineage or {},
        })

    @classmethod
    def load(cls, folder: Location, device: str = "cpu") -> TrainedDetector:
        card = ModelCard.read(folder)
        kind = detector_type(card.method)
        tensors = load_safetensors(folder.join("model.safetensors").read_bytes())
        models = {}
        for key in card.categories:
            prefix = f"{key}/"
            own = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
            models[key] = kind.build(card.config, own).to(device).eval()
        return cls(method=card.method, config=card.config, models=models, thresholds=dict(card.thresholds),
                   info=card.info)
