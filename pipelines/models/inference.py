"""Running a detector over decoded images, reproducibly (pure torch/numpy, no Ray).

CPU kernels give slightly different floats for the same image in batches of different size or
content layout, so "same input, same bytes out" needs a fixed batch geometry: an image with row
index r of its input part is always scored in slot r % B of a zero-padded batch of exactly B
images, with the rows r // B of the same part. However a pipeline regroups rows, every image is
computed by the same instructions, and a rerun reproduces its score bit for bit. (Callers pass
the position among the part's selected rows, so that consecutive rows fill whole batches.)

A batch is keyed by (part, position // B), never by position alone: one Ray batch often holds the
rows of several small parts, whose positions start at 0 in each, and two images must never share
a slot (that put one image's score on another).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipelines.models.methods import Detector


def to_tensor(pixels: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def score_in_slots(model: Detector, pixels: np.ndarray, positions: np.ndarray, batch_size: int,
                   device: torch.device | str = "cpu", parts: np.ndarray | None = None,
                   row_ids: Sequence[str] | np.ndarray | None = None, autocast_dtype: torch.dtype | None = None,
                   channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and maps (N, S, S) of images at `positions` among their part's selected rows,
    from the detector's `score(images, row_ids)` (the method contract).

    `parts` (N,) names each image's input part (default: all from one part); `row_ids` (N,) the
    images (default ""), passed on so that a method drawing noise seeds it per image.
    `autocast_dtype` goes to `score` (a detector with the "bf16" capability; `scoring_precision`);
    `channels_last` lays the batch out NHWC, as a model moved to that format wants it. Raises
    ValueError if two images claim the same (part, position): their slots would collide.
    """
    positions = np.asarray(positions, dtype=np.int64)
    parts = np.zeros(len(positions), np.int64) if parts is None else np.asarray(parts, dtype=np.int64)
    if len(parts) != len(positions) or len(pixels) != len(positions):
        raise ValueError(f"{len(pixels)} images, {len(positions)} positions and {len(parts)} parts do not match")
    identities = np.stack([parts, positions], axis=1) if len(positions) else np.zeros((0, 2), np.int64)
    if len(np.unique(identities, axis=0)) != len(identities):
        raise ValueError("two images share a (part, position): each needs a slot of its own")
    count, size = len(positions), pixels.shape[1]
    scores = np.zeros(count, np.float32)
    maps = np.zeros((count, size, size), np.float32)
    ids = np.asarray([""] * count if row_ids is None else [str(i) for i in row_ids], dtype=object)
    for members, slots in fixed_batches(parts, positions, batch_size):
        batch = np.zeros((batch_size, *pixels.shape[1:]), np.uint8)
        batch[slots] = pixels[members]
        batch_ids = [""] * batch_size  # padding slots
        for slot, row_id in zip(slots, ids[members]):
            batch_ids[slot] = row_id
        images = to_tensor(batch, device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        extra = {"autocast_dtype": autocast_dtype} if autocast_dtype is not None else {}
        with torch.inference_mode():
            result = model.score(images, batch_ids, **extra)
        scores[members] = result.scores[torch.as_tensor(slots)].float().cpu().numpy()
        maps[members] = result.maps[torch.as_tensor(slots)].float().cpu().numpy()
    return scores, maps


def fixed_batches(parts: np.ndarray, positions: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(members, slots) per batch of the fixed geometry: the rows of one part whose positions
    share `position // batch_size`, each at slot `position % batch_size`."""
    groups = np.stack([parts, positions // batch_size], axis=1) if len(positions) else np.zeros((0, 2), np.int64)
    for group in np.unique(groups, axis=0):
        members = np.flatnonzero((groups == group).all(axis=1))
        yield members, positions[members] % batch_size


def encode_map(anomaly_map: np.ndarray) -> tuple[bytes, float, float]:
    """An anomaly map as an 8-bit PNG scaled by its own min/max (kept beside it)."""
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    span = high - low if high > low else 1.0
    quantized = np.clip((anomaly_map - low) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(quantized, "L").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue(), low, high


def decode_map(data: bytes, low: float, high: float) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        quantized = np.asarray(image, dtype=np.float32)
    span = high - low if high > low else 1.0
    return low + quantized / 255.0 * span


def scoring_precision(requested: str, capabilities: frozenset[str], gpu: bool) -> str:
    """What a scorer computes in, "bf16" or "fp32", from the spec's `precision` ("auto", "fp32",
    "bf16"): auto is bf16 for a detector with the "bf16" capability on GPU workers (the U-Net
    calls of the diffusion detectors: tensor cores, half the memory traffic), fp32 otherwise (a
    PaDiM's Mahalanobis distance, and any CPU: CPUs rarely have fast bf16 kernels). Decided on the
    driver, so that it can enter the output's fingerprint; ValueError for bf16 asked of a detector
    that cannot."""
    if requested == "bf16" and "bf16" not in capabilities:
        raise ValueError("scores in float32 only (its method has no 'bf16' capability)")
    if requested == "auto":
        return "bf16" if gpu and "bf16" in capabilities else "fp32"
    return requested


def autocast_dtype_of(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None
