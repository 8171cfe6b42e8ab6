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
from pipelines.models.padim import Padim, PadimConfig
from pipelines.storage import Location

ARTIFACT_FORMAT = "adpipe.model/1"
ALL_CATEGORIES = "*"  # key of a model fitted on every category at once


@dataclass(frozen=True)
class DetectorType:
    name: str
    config_from_json: Callable[[dict], Any]
    build: Callable[[Any, dict[str, torch.Tensor] | None], torch.nn.Module]
    fit: str  # "statistics": streamed sufficient statistics; "gradient": a Ray Train job
    scores_images: bool = True  # False: a generative model other methods use (ddpm), not a detector


def _build_padim(config: PadimConfig, tensors: dict[str, torch.Tensor] | None) -> Padim:
    return Padim.from_tensors(config, tensors) if tensors is not None else Padim(config)


DETECTORS: dict[str, DetectorType] = {}


def register(detector: DetectorType) -> None:
    if detector.name in DETECTORS:
        raise RuntimeError(f"detector {detector.name!r} registered twice")
    DETECTORS[detector.name] = detector


def _build_ddpm(config, tensors: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    from pipelines.models.ddpm import build_unet

    model = build_unet(config)
    if tensors is not None:
        model.load_state_dict(tensors, strict=True)
    return model


def _ddpm_config_from_json(data: dict):
    from pipelines.models.ddpm import DdpmConfig

    return _dataclass_from_json(DdpmConfig, data)


def _dataclass_from_json(cls: type, data: dict) -> Any:
    """A frozen config dataclass from its `asdict` JSON (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{cls.__name__}: unknown fields {unknown} in a model's config.json")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


register(DetectorType("padim", lambda data: _dataclass_from_json(PadimConfig, data), _build_padim, fit="statistics"))
# The DDPM's module (diffusers) is imported only when a DDPM is used: scorers of other models skip it.
register(DetectorType("ddpm", _ddpm_config_from_json, _build_ddpm, fit="gradient", scores_images=False))


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

    @property
    def scores_images(self) -> bool:
        return detector_type(self.method).scores_images

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
        save_artifact(folder, self.method, self.config, {key: model.tensors() for key, model in self.models.items()},
                      thresholds=self.thresholds, info=self.info, lineage=lineage)

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


def save_artifact(folder: Location, method: str, config: Any, tensors: dict[str, dict[str, torch.Tensor]],
                  thresholds: dict[str, float] | None = None, info: dict[str, Any] | None = None,
                  lineage: dict[str, Any] | None = None) -> None:
    """Write a model artifact: `tensors` maps a category key to that model's named tensors.
    Tensors first, config.json last: a model exists once its config does."""
    # clone: category models may share tensors (one channel subset), which safetensors refuses
    flat = {f"{key}/{name}": tensor.detach().cpu().clone().contiguous()
            for key, named in tensors.items() for name, tensor in named.items()}
    folder.join("model.safetensors").write_bytes(save_safetensors(flat))
    folder.join("config.json").write_json({
        "format": ARTIFACT_FORMAT, "method": method, "config": dataclasses.asdict(config),
        "categories": sorted(tensors), "thresholds": thresholds or {}, "info": info or {},
        "lineage": lineage or {},
    })
