"""Turn listed source items into rows of the images table (pure: no Ray).

Every item ends as either an image row or a rejected row with its reason: nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipelines.data.images import ImageDecodeError, inspect_image
from pipelines.data.sources import SourceItem
from pipelines.errors import AdpipeError
from pipelines.tables import IMAGES_SCHEMA, REJECTED_SCHEMA


@dataclass(frozen=True)
class ImageRows:
    images: pa.Table
    rejected: pa.Table
    missing_masks: int  # anomalous test images whose ground-truth mask was absent or unreadable


def build_image_rows(items: list[SourceItem], max_pixels: int) -> ImageRows:
    rows: dict[str, list] = {name: [] for name in IMAGES_SCHEMA.names}
    rejected: dict[str, list] = {name: [] for name in REJECTED_SCHEMA.names}
    missing_masks = 0
    for item in items:
        try:
            if item.refusal:
                raise ImageDecodeError(item.refusal)
            data = item.location.read_bytes()
            info = inspect_image(data, max_pixels)
        except (ImageDecodeError, AdpipeError) as error:
            rejected["source_uri"].append(item.location.uri)
            rejected["image_id"].append(item.image_id)
            rejected["reason"].append(str(error))
            continue
        mask = None
        if item.mask is not None:
            try:
                mask = item.mask.read_bytes()
                inspect_image(mask, max_pixels)
            except (ImageDecodeError, AdpipeError):
                mask = None
        if item.mask_expected and mask is None:
            missing_masks += 1
        for name, value in (
            ("image_id", item.image_id), ("image", data), ("category", item.category),
            ("split", item.split), ("label", item.label), ("defect_type", item.defect_type),
            ("mask", mask), ("width", info.width), ("height", info.height),
            ("color_mode", info.color_mode), ("source_uri", item.location.uri),
            ("partition", item.partition), ("defect_probability", item.defect_probability),
            ("synthesis", None),
        ):
            rows[name].append(value)
    return ImageRows(
        images=pa.Table.from_pydict(rows, schema=IMAGES_SCHEMA),
        rejected=pa.Table.from_pydict(rejected, schema=REJECTED_SCHEMA),
        missing_masks=missing_masks,
    )
