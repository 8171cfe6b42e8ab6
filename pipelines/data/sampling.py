"""Seeded choices by row identity (pure): the same row gets the same draw on any worker, in any
order, on any rerun. Used for hold-out splits, subsampling and
per-image noise."""

from __future__ import annotations

import hashlib


def _draw(purpose: str, seed: int, key: str) -> int:
    """64 bits fixed by (purpose, seed, key)."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}:{key}".encode()).digest()[:8], "big")


def unit_draw(purpose: str, seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (purpose, seed, key)."""
    return _draw(purpose, seed, key) / 2**64


def draw_seed(purpose: str, seed: int, key: str) -> int:
    """A generator seed (63 bits: a non-negative int64 for torch's manual_seed) fixed by (purpose, seed, key)."""
    return _draw(purpose, seed, key) >> 1


def in_fraction(purpose: str, seed: int, key: str, fraction: float) -> bool:
    return unit_draw(purpose, seed, key) < fraction
