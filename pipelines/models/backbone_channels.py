"""Channels per feature stage (timm feature indices 0..4, strides 2..32) of each backbone in
`pipelines.models.backbones.BACKBONES`, without importing torch or timm.

A job spec is validated before anything heavy is imported: `padim.kept_channels` is checked
against these. tests/test_spec.py compares the table with the real timm models.
"""

from __future__ import annotations

STAGE_CHANNELS: dict[str, tuple[int, ...]] = {
    "efficientnet_lite0": (16, 24, 40, 112, 320),
    "efficientnet_lite2": (16, 24, 48, 120, 352),
}
