"""What embeds a category's images (and, for CLIP, its prompts) for prompt selection and for the
integrator: pure torch, no Ray.

- `ClipEmbedder`: an open_clip model from a local checkpoint (file:// or s3://): safetensors, or
  open_clip's own `.pt`/`.bin` format read with `torch.load(weights_only=True)` (tensors and plain
  containers only; nothing in the file can run code). Our machines have no trained CLIP weights and
  the package index has none; a missing checkpoint is an InputError that says so and names
  `selection: features`.
- `FeatureEmbedder`: global-average-pooled features of the frozen, ImageNet-pretrained
  EfficientNet-Lite0 (stages 3 and 4, strides 16 and 32: object- and texture-level statistics).
  It embeds images only; with it the prompts label provenance and do not steer anything.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.errors import InputError
from pipelines.storage import Location

NO_CLIP_WEIGHTS = ("adpipe cannot download CLIP weights (no network, and none on the package index): give a "
                   "local open_clip checkpoint (safetensors or open_clip's .pt) as clip.checkpoint, or use "
                   "`selection: features` (EfficientNet-Lite features select and integrate; prompts then only "
                   "label provenance)")


class ClipEmbedder:
    kind = "clip"
    embeds_text = True

    def __init__(self, model: Any, tokenizer: Any, mean: tuple[float, ...], std: tuple[float, ...],
                 image_size: int, device: str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.image_size = image_size
        self.device = device

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) in [0, 1] -> (B, D) raw image embeddings (resized to the model's input)."""
        pixels = F.interpolate(images.to(self.device).float(), size=(self.image_size, self.image_size),
                               mode="bicubic", align_corners=False).clamp(0, 1)
        return self.model.encode_image((pixels - self.mean) / self.std).float().cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu().numpy()


def _state_dict(checkpoint: Location) -> dict[str, torch.Tensor]:
    if not checkpoint.exists():
        raise InputError(f"the CLIP checkpoint {checkpoint.describe()} does not exist. {NO_CLIP_WEIGHTS}")
    data = checkpoint.read_bytes()
    if checkpoint.name.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as error:  # safetensors raises its own error types
            raise InputError(f"{checkpoint.describe()} is not a readable safetensors file: {error}") from None
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # the restricted unpickler refuses anything but tensors and containers
        raise InputError(f"{checkpoint.describe()} is not an open_clip checkpoint of tensors only: {error}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(f"{checkpoint.describe()} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def load_clip(model_name: str, checkpoint: Location, model_config: Location | None = None,
              device: str = "cpu") -> ClipEmbedder:
    """An open_clip model named `model_name` (one of open_clip's architectures, or the architecture
    in `model_config`: a JSON of open_clip's model-config format) with the checkpoint's weights."""
    import open_clip

    state = _state_dict(checkpoint)  # first: a missing checkpoint is the common mistake
    if model_config is not None:
        if not model_config.exists():
            raise InputError(f"the CLIP model config {model_config.describe()} does not exist")
        config = model_config.read_json()
        with tempfile.TemporaryDirectory(prefix="adpipe-clip-") as folder:
            # open_clip builds architectures from its registry of config files: register this one.
            Path(folder, f"{model_name}.json").write_text(json.dumps(config))
            open_clip.add_model_config(folder)
    if model_name not in open_clip.list_models():
        raise InputError(f"unknown open_clip model {model_name!r}: give one of open_clip.list_models() "
                         "or its architecture as clip.model_config")
    model = open_clip.create_model(model_name, pretrained=None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or misshapen:
        raise InputError(f"{checkpoint.describe()} does not fit open_clip {model_name!r}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {misshapen[:3]}")
    model.load_state_dict(state, strict=True)
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else int(visual.image_size)
    preprocess = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD))
    return ClipEmbedder(model, open_clip.get_tokenizer(model_name), mean, std, size, device)


class FeatureEmbedder:
    kind = "features"
    embeds_text = False

    def __init__(self, device: str = "cpu", stages: tuple[int, ...] = (3, 4)):
        from pipelines.models.backbones import shared_feature_extractor

        self.extractor = shared_feature_extractor("efficientnet_lite0", stages).to(device)
        self.device = device

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> np.ndarray:
        features = self.extractor(images.to(self.device).float())
        return torch.cat([f.float().mean(dim=(2, 3)) for f in features], dim=1).cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        raise InputError("selection: features embeds images only; prompts cannot be scored without CLIP")
