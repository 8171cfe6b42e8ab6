"""Seeded choices by row identity (pure): the same row gets the same draw on any worker, in any
order, on any rerun. Used for hold-out splits and subsampling."""

from __future__ import annotations

import hashlib


def unit_draw(purpose: str, seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (purpose, seed, key)."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_fraction(purpose: str, seed: int, key: str, fraction: float) -> bool:
    return unit_draw(purpose, seed, key) < fraction
