"""Published datasets: Parquet parts with deterministic names, and a `_manifest.json` written last.

Readers trust the manifest, never a listing: a dataset without one does not exist (a run that died
half-way left it unpublished), and parts not named in it (left by an earlier, interrupted attempt)
are ignored. Part names depend only on the input part index, so a rerun overwrites, never
duplicates. Each written part also leaves a small completion record in `_parts/`, keyed by the
fingerprint of its input, so a rerun can skip parts that are already done.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import InputError
from pipelines.storage import Location

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "adpipe.dataset/1"
PART_RECORDS_DIR = "_parts"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def fingerprint(value: Any) -> str:
    """A stable short hash of JSON-able data (inputs of a part, a step's resolved spec)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PartRecord:
    path: str  # relative to the dataset folder
    rows: int
    bytes: int
    input_fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # per-part counts a stage wants to keep


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    table: str  # which schema: images, scores, ...
    rows: int
    parts: tuple[PartRecord, ...]
    schema: str  # base64 of the Arrow IPC schema: exact types survive the round trip
    lineage: dict[str, Any]
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["parts"] = [asdict(p) for p in self.parts]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise InputError(f"{where} is not an adpipe dataset manifest (format {data.get('format')!r})")
        try:
            parts = tuple(PartRecord(**p) for p in data.pop("parts"))
            return cls(parts=parts, **data)
        except TypeError as error:
            raise InputError(f"{where} is a malformed manifest: {error}") from None

    def arrow_schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.schema)))


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def write_part(folder: Location, index: int, table: pa.Table, input_fingerprint: str = "",
               extra: dict[str, Any] | None = None) -> PartRecord:
    """Write one part atomically, then its completion record; return what the manifest lists."""
    location = folder.join(part_name(index))
    with location.open_atomic_output() as stream:
        pq.write_table(table, stream, compression="zstd")
    record = PartRecord(path=part_name(index), rows=table.num_rows,
                        bytes=location.fs.get_file_info(location.path).size,
                        input_fingerprint=input_fingerprint, extra=extra or {})
    folder.join(PART_RECORDS_DIR, f"{index:05d}.json").write_json(asdict(record))
    return record


def completed_part(folder: Location, index: int, input_fingerprint: str) -> PartRecord | None:
    """The part's record if an earlier attempt finished it from the same input, else None."""
    record_location = folder.join(PART_RECORDS_DIR, f"{index:05d}.json")
    if not record_location.exists():
        return None
    record = PartRecord(**record_location.read_json())
    if record.input_fingerprint != input_fingerprint or not folder.join(record.path).exists():
        return None
    return record


def publish(folder: Location, *, name: str, version: str, table: str, schema: pa.Schema,
            parts: list[PartRecord], lineage: dict[str, Any], extra: dict[str, Any] | None = None) -> Manifest:
    """Write the manifest (last): from now on the dataset exists, with exactly these parts."""
    manifest = Manifest(
        name=name, version=version, table=table, rows=sum(p.rows for p in parts),
        parts=tuple(sorted(parts, key=lambda p: p.path)), schema=encode_schema(schema),
        lineage=lineage, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), extra=extra or {},
    )
    folder.join(MANIFEST_NAME).write_json(manifest.to_json())
    return manifest


def read_manifest(folder: Location, table: str | None = None) -> Manifest:
    """The dataset's manifest; with `table`, also check that it holds that kind of table."""
    location = folder.join(MANIFEST_NAME)
    if not location.exists():
        raise InputError(f"no published dataset at {folder.describe()}: {MANIFEST_NAME} is missing "
                         "(the job that writes it has not finished, or the URI is wrong)")
    manifest = Manifest.from_json(location.read_json(), location.uri)
    if table is not None and manifest.table != table:
        raise InputError(f"{folder.uri} holds a {manifest.table!r} table; a {table!r} dataset is needed here")
    return manifest


def part_locations(folder: Location, manifest: Manifest) -> list[Location]:
    return [folder.join(p.path) for p in manifest.parts]


def read_table(folder: Location, columns: list[str] | None = None) -> pa.Table:
    """The whole dataset as one Arrow table, through its manifest (for small datasets and tests)."""
    manifest = read_manifest(folder)
    schema = manifest.arrow_schema()
    if not manifest.parts:
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    tables = [pq.read_table(loc.path, filesystem=loc.fs, columns=columns, schema=schema)
              for loc in part_locations(folder, manifest)]
    return pa.concat_tables(tables)
