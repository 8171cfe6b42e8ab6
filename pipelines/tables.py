"""Arrow schemas of the tables adpipe publishes (DESIGN.md "Tables"). Extend, don't rename."""

from __future__ import annotations

import pyarrow as pa

SYNTHESIS_TYPE = pa.struct([
    ("method", pa.string()),
    ("strength", pa.float32()),
    ("opacity", pa.float32()),
    ("seed", pa.int64()),
    ("source_image_id", pa.string()),
    ("prompt", pa.string()),
    ("model_version", pa.string()),
])

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),          # stable: the path relative to the source root
    ("image", pa.binary()),             # the original encoded bytes (PNG/JPEG/...), never re-encoded
    ("category", pa.string()),
    ("split", pa.string()),             # train | test
    ("label", pa.int8()),               # 0 normal, 1 anomalous, null unknown
    ("defect_type", pa.string()),
    ("mask", pa.binary()),              # PNG bytes of the ground-truth mask, or null
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("color_mode", pa.string()),        # PIL mode of the stored image: L, RGB, RGBA, I;16, ...
    ("source_uri", pa.string()),
    ("partition", pa.string()),         # hive-style partition of the source, e.g. date=2026-11-21
    ("defect_probability", pa.float32()),  # ELPV's annotator probability (0, 1/3, 2/3, 1)
    ("synthesis", SYNTHESIS_TYPE),
])

# Inputs that could not be ingested: kept with the reason, never dropped silently.
REJECTED_SCHEMA = pa.schema([
    ("source_uri", pa.string()),
    ("image_id", pa.string()),
    ("reason", pa.string()),
])
