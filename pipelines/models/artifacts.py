"""Model artifacts: what a train step publishes and the score, sample and synthesize stages load.

An artifact (`models/<name>/<version>/`) holds `model.safetensors` (the tensors of every category's
model, keys `<category>/<tensor>`) and `config.json` (method, the method's config, categories,
thresholds, info, lineage). Nothing is ever unpickled: tensors come from safetensors, the rest
from JSON. How a model is built from them is its method's business (`pipelines.models.methods`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.errors import InputError
from pipelines.models.methods import MethodRecord, Role, method
from pipelines.storage import Location

if TYPE_CHECKING:
    import torch

ARTIFACT_FORMAT = "adpipe.model/1"
ALL_CATEGORIES = "*"  # key of a model fitted on every category at once


@dataclass(frozen=True)
class ModelCard:
    """What `config.json` says about a model artifact: enough to plan a job without its tensors
    (a PaDiM artifact's tensors are hundreds of MiB; a driver that only checks image size and
    thresholds should not download them). Reading it needs no torch."""

    folder: Location
    record: MethodRecord  # the method's record, resolved once (on the driver, for Ray workers)
    config: Any
    categories: tuple[str, ...]
    thresholds: dict[str, float]
    info: dict[str, Any]

    @property
    def method(self) -> str:
        return self.record.name

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def version(self) -> str:
        """`<model>@<version>`, as score tables and provenance name a model."""
        return f"{self.folder.parent().name}@{self.folder.name}"

    def require(self, role: Role, what: str, capability: str | None = None) -> ModelCard:
        """Refuse a model whose method has another role (a DDPM given to score, a PaDiM to SDAS)
        or lacks the capability asked for (see `MethodRecord.capabilities`)."""
        if self.record.role != role:
            raise InputError(f"{self.folder.uri} is a {self.method!r} model, which is a {self.record.role}; "
                             f"{what} needs a {role} model")
        if capability is not None and capability not in self.record.capabilities:
            raise InputError(f"{self.folder.uri} is a {self.method!r} model, which cannot {capability!r}; {what} "
                             "needs a model that can")
        return self

    @classmethod
    def read(cls, folder: Location, record: MethodRecord | None = None) -> ModelCard:
        """The card of the model at `folder`. Ray workers get the `record` the driver resolved:
        a method registered at run time (a plugin, a test) is known to the driver's registry, not
        to a fresh worker's; the record travels with the task instead of being looked up by name."""
        config_location = folder.join("config.json")
        if not config_location.exists():
            raise InputError(f"no model at {folder.describe()}: config.json is missing")
        meta = config_location.read_json()
        if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise InputError(f"{config_location.uri} is not an adpipe model (format {found!r})")
        if record is None:
            record = method(str(meta.get("method")))
        elif record.name != meta.get("method"):
            raise InputError(f"{config_location.uri} holds a {meta.get('method')!r} model, not {record.name!r}")
        return cls(folder=folder, record=record, config=record.config_from_json(meta["config"]),
                   categories=tuple(meta["categories"]),
                   thresholds={k: float(v) for k, v in meta["thresholds"].items()}, info=meta.get("info", {}))

    def load(self, device: str = "cpu") -> TrainedModels:
        """Download the tensors and build every category's model, on `device`, in eval mode."""
        from safetensors.torch import load as load_safetensors

        tensors = load_safetensors(self.folder.join("model.safetensors").read_bytes())
        by_key = {key: renamed(tensors, f"{key}/") for key in self.categories}
        implementation = self.record.load()
        stored = saved_models(implementation, self.config, by_key, device)
        return TrainedModels(method=self.method, config=self.config,
                             models=category_models(implementation, self.config, stored),
                             thresholds=dict(self.thresholds), info=self.info, stored=stored)


@dataclass
class TrainedModels:
    """Per-category models of one method (a detector's come with their decision thresholds)."""

    method: str
    config: Any
    models: dict[str, Any]  # torch modules built by the method; a detector's answer `methods.Detector`
    thresholds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # calibration details, lineage
    # The models under the keys they are saved with, where the method serves categories through
    # views of one saved model (`category_models`); None: `models` are those.
    stored: dict[str, Any] | None = None

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def key_for(self, category: str | None) -> str | None:
        """Which model serves this category: its own, else the all-categories one, else None."""
        if category is not None and category in self.models:
            return category
        return ALL_CATEGORIES if ALL_CATEGORIES in self.models else None

    def save(self, folder: Location, lineage: dict[str, Any] | None = None) -> None:
        stored = self.models if self.stored is None else self.stored
        save_artifact(folder, self.method, self.config, {key: model.tensors() for key, model in stored.items()},
                      thresholds=self.thresholds, info=self.info, lineage=lineage)

    @classmethod
    def load(cls, folder: Location, device: str = "cpu") -> TrainedModels:
        return ModelCard.read(folder).load(device)


def build_models(implementation: Any, config: Any, tensors: dict[str, dict[str, torch.Tensor]],
                 device: str = "cpu") -> dict[str, Any]:
    """Every saved key's model, on `device`, in eval mode, then the implementation's optional
    `category_models(config, models)`: how one saved model serves several categories as models of
    their own (a class-conditional network, one view per class). What is calibrated, looked up by
    category and given a threshold is what this returns."""
    return category_models(implementation, config, saved_models(implementation, config, tensors, device))


def saved_models(implementation: Any, config: Any, tensors: dict[str, dict[str, torch.Tensor]],
                 device: str = "cpu") -> dict[str, Any]:
    """Every saved key's model, on `device`, in eval mode (before `category_models`)."""
    return {key: implementation.build(config, named).to(device).eval() for key, named in tensors.items()}


def category_models(implementation: Any, config: Any, models: dict[str, Any]) -> dict[str, Any]:
    """The saved `models` as the categories' models, through the implementation's optional
    `category_models(config, models)` (see `build_models`)."""
    split = getattr(implementation, "category_models", None)
    return split(config, models) if split is not None else models


def renamed(tensors: dict[str, torch.Tensor], prefix: str, new_prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, that prefix replaced by `new_prefix`: how a
    checkpoint's `model/...` becomes an artifact's `network/...` and a state dict again."""
    return {new_prefix + name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def save_artifact(folder: Location, method_name: str, config: Any, tensors: dict[str, dict[str, torch.Tensor]],
                  thresholds: dict[str, float] | None = None, info: dict[str, Any] | None = None,
                  lineage: dict[str, Any] | None = None) -> None:
    """Write a model artifact: `tensors` maps a category key to that model's named tensors.
    Tensors first, config.json last: a model exists once its config does."""
    from safetensors.torch import save as save_safetensors

    method(method_name)  # only a registered method's artifact can be loaded again
    # clone: category models may share tensors (one channel subset), which safetensors refuses
    flat = {f"{key}/{name}": tensor.detach().cpu().clone().contiguous()
            for key, named in tensors.items() for name, tensor in named.items()}
    folder.join("model.safetensors").write_bytes(save_safetensors(flat))
    folder.join("config.json").write_json({
        "format": ARTIFACT_FORMAT, "method": method_name, "config": dataclasses.asdict(config),
        "categories": sorted(tensors), "thresholds": thresholds or {}, "info": info or {},
        "lineage": lineage or {},
    })
