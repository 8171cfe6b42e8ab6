"""A tiny, randomly initialised open_clip model saved as a checkpoint by a test.

It is NOT a trained CLIP (none can be had offline here): it stands in for one wherever a test
needs the loading, tokenising and embedding machinery to run for real. Its similarities mean
nothing, so tests that use it check structure and determinism, never which prompt wins.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP_NAME = "adpipe-tiny-random-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def save_tiny_clip(folder: Path, fmt: str = "safetensors", seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint, model config JSON) of a random tiny open_clip model."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{TINY_CLIP_NAME}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        checkpoint = folder / "tiny-clip.safetensors"
        save_file(state, str(checkpoint))
    else:  # open_clip's own format: a torch file holding {"state_dict": ...}
        checkpoint = folder / "tiny-clip.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)
    return checkpoint, config_path
