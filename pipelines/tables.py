"""Arrow schemas of the tables adpipe publishes (docs/architecture.md#tables). Extend, don't rename."""

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

# One row per input image, always: a row that could not be decoded or scored keeps its image_id
# and carries `error` (null = ok), with null score.
SCORES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("category", pa.string()),
    ("split", pa.string()),
    ("label", pa.int8()),               # ground truth copied from the images table (null = unknown)
    ("defect_type", pa.string()),       # copied from the images table: per-defect-type metrics
    ("model", pa.string()),             # <name>@<version>
    ("score", pa.float32()),
    ("label_pred", pa.bool_()),         # score >= threshold
    ("threshold", pa.float32()),
    ("anomaly_map", pa.binary()),       # 8-bit PNG scaled to [anomaly_map_min, anomaly_map_max], or null
    ("anomaly_map_min", pa.float32()),
    ("anomaly_map_max", pa.float32()),
    ("error", pa.string()),
    ("run_id", pa.string()),
    ("scored_at", pa.timestamp("s", tz="UTC")),
    # Lineage: the image (copied from the images table) and the spec that made the row
    # (runs/<run_id>/spec.yaml holds it; the fingerprint tells specs apart without reading them).
    ("source_uri", pa.string()),
    ("partition", pa.string()),
    ("spec_fingerprint", pa.string()),
])
