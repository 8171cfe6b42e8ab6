"""Manifests: a dataset exists only once its manifest is written; reruns never duplicate rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import datasets
from pipelines.errors import InputError
from pipelines.storage import Location

SCHEMA = pa.schema([("image_id", pa.string()), ("value", pa.int32())])


def part_table(index: int, rows: int = 5) -> pa.Table:
    return pa.table({"image_id": [f"p{index}-{i}" for i in range(rows)], "value": list(range(rows))}, schema=SCHEMA)


def write_dataset(folder: Location, parts: int, fail_after: int | None = None) -> datasets.Manifest:
    records = []
    for index in range(parts):
        if fail_after is not None and index == fail_after:
            raise RuntimeError("worker died")
        records.append(datasets.write_part(folder, index, part_table(index), input_fingerprint=f"in-{index}"))
    return datasets.publish(folder, name="toy", version="1", table="toy", schema=SCHEMA, parts=records,
                            lineage={"step_fingerprint": "abc"})


def test_publish_and_read_back(any_root):
    folder = Location.parse(any_root).join("datasets", "toy", "1")
    manifest = write_dataset(folder, 3)
    assert manifest.rows == 15 and [p.path for p in manifest.parts] == [datasets.part_name(i) for i in range(3)]
    loaded = datasets.read_manifest(folder)
    assert loaded == manifest
    assert loaded.arrow_schema() == SCHEMA
    table = datasets.read_table(folder)
    assert table.num_rows == 15 and table.schema == SCHEMA
    # plain pyarrow reads the listed parts too
    first = folder.join(manifest.parts[0].path)
    assert pq.read_table(first.path, filesystem=first.fs).num_rows == 5


def test_interrupted_write_publishes_nothing_and_rerun_is_exact(any_root):
    folder = Location.parse(any_root).join("datasets", "toy", "1")
    with pytest.raises(RuntimeError, match="worker died"):
        write_dataset(folder, 4, fail_after=2)
    assert folder.join(datasets.part_name(0)).exists()  # parts were written...
    with pytest.raises(InputError, match="no published dataset"):
        datasets.read_manifest(folder)  # ...but the dataset does not exist
    # a stray part from some earlier, different attempt must never be read
    datasets.write_part(folder, 7, part_table(7))
    write_dataset(folder, 4)
    table = datasets.read_table(folder)
    assert table.num_rows == 20
    assert len(set(table.column("image_id").to_pylist())) == 20


def test_completed_part_is_keyed_by_input(any_root):
    folder = Location.parse(any_root).join("d")
    datasets.write_part(folder, 0, part_table(0), input_fingerprint="same")
    assert datasets.completed_part(folder, 0, "same").rows == 5
    assert datasets.completed_part(folder, 0, "other") is None
    assert datasets.completed_part(folder, 1, "same") is None


def test_empty_dataset_reads_as_empty_table(file_root):
    folder = Location.parse(file_root).join("empty")
    datasets.publish(folder, name="e", version="1", table="toy", schema=SCHEMA, parts=[], lineage={})
    assert datasets.read_table(folder).num_rows == 0


def test_foreign_json_is_not_a_manifest(file_root):
    folder = Location.parse(file_root).join("x")
    folder.join(datasets.MANIFEST_NAME).write_json({"hello": 1})
    with pytest.raises(InputError, match="not an adpipe dataset manifest"):
        datasets.read_manifest(folder)


def test_fingerprint_is_stable_and_order_insensitive_for_keys():
    assert datasets.fingerprint({"a": 1, "b": [1, 2]}) == datasets.fingerprint({"b": [1, 2], "a": 1})
    assert datasets.fingerprint({"a": 1}) != datasets.fingerprint({"a": 2})


def test_reading_the_wrong_kind_of_table_is_refused(file_root):
    folder = Location.parse(file_root).join("datasets", "toy", "1")
    write_dataset(folder, 1)
    assert datasets.read_manifest(folder, table="toy").rows == 5
    with pytest.raises(InputError, match="holds a 'toy' table; a 'images' dataset is needed"):
        datasets.read_manifest(folder, table="images")
