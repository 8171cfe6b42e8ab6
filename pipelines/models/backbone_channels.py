"""Channels per feature stage (timm feature indices 0..4, strides 2..32) of each backbone in
`pipelines.models.backbones.BACKBONES`, without importing torch or timm.

A job spec is validated before anything heavy is imported: `padim.kept_channels` is checked
against these. tests/test_spec.py compares the table with the real timm models.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.errors import SpecError
from pipelines.spec_fields import short_repr

STAGE_CHANNELS: dict[str, tuple[int, ...]] = {
    "efficientnet_lite0": (16, 24, 40, 112, 320),
    "efficientnet_lite1": (16, 24, 40, 112, 320),  # Lite0's widths, deeper stages
    "efficientnet_lite2": (16, 24, 48, 120, 352),
}


def check_backbone(name: str, path: str) -> None:
    """A spec's backbone name: one of the table's (`path` names the field in errors)."""
    if name not in STAGE_CHANNELS:
        raise SpecError(path, f"{short_repr(name)}; expected one of {', '.join(STAGE_CHANNELS)}")


def check_stages(stages: Sequence[int], path: str) -> list[int]:
    """A spec's feature stages: increasing, distinct timm feature indices 0..4; returned as a list."""
    stages = list(stages)
    if not stages or stages != sorted(set(stages)) or any(s not in range(5) for s in stages):
        raise SpecError(path, f"must be increasing indices in 0..4, got {short_repr(stages)}")
    return stages
