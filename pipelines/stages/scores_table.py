"""The queryable scores table: nightly scores in Apache Iceberg (pyiceberg catalog, Ray Data writes).

Rows are the scores table's (`SCORES_SCHEMA`) without the anomaly-map bytes (they stay in the
Parquet parts, which `scores_uri` names), plus `archive` and `day`. The table is partitioned by
`day` and `model` (name@version). A night's load is ONE catalog commit: an overwrite whose filter
is exactly the (day, model) partitions it loads, so a reader sees a night whole or not at all, and
loading a (day, model) again replaces it (two nights never duplicate a row).

What is loaded is recorded in the commit itself: the snapshot's summary property `adpipe.loaded`
maps "day model" to the fingerprint of the published scores it was loaded from (carried forward
by each commit, for a year of days). A night loads exactly the partitions whose published scores
differ from that map; a commit by another writer without the property just means a reload.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.errors import InputError
from pipelines.params.nightly import URI_WITH_CREDENTIALS, CatalogSpec, TableSpec
from pipelines.storage import Location
from pipelines.tables import SCORES_SCHEMA

LOADED_PROPERTY = "adpipe.loaded"
RECORD_DAYS = 366

TABLE_SCHEMA = pa.schema(
    [("archive", pa.string()), ("day", pa.date32())]
    + [f for f in SCORES_SCHEMA if f.name != "anomaly_map"]
    + [("scores_uri", pa.string())]  # the Parquet part holding the row (and its anomaly map)
)


def catalog_properties(spec: CatalogSpec, root: Location) -> dict[str, Any]:
    """pyiceberg `load_catalog` keyword arguments. No secrets: credentials come from the
    environment (AWS_* for the warehouse, PYICEBERG_CATALOG__<NAME>__* for the catalog)."""
    properties: dict[str, Any] = {"name": spec.name, "type": spec.type}
    env_uri = f"PYICEBERG_CATALOG__{spec.name.upper()}__URI"
    if URI_WITH_CREDENTIALS.match(os.environ.get(env_uri, "")):
        # pyiceberg copies the catalog's properties into the table's FileIO, which Ray Data ships
        # to its write tasks: a password in the URI would travel in task arguments.
        raise InputError(f"${env_uri} holds a password: give the catalog URI without it and the password in "
                         "PGPASSWORD (or ~/.pgpass), where PostgreSQL's client library reads it")
    if spec.uri is not None:
        properties["uri"] = spec.uri
    elif not os.environ.get(env_uri):
        if spec.type != "sql" or root.scheme != "file":
            raise InputError(f"table.catalog.uri is needed (or ${env_uri}): the default SQLite catalog lives in a "
                             f"file:// storage root, and this one is {root.uri}")
        folder = root.join("catalog")
        os.makedirs(folder.path, exist_ok=True)
        properties["uri"] = f"sqlite:///{folder.path}/iceberg.db"
    warehouse = Location.parse(spec.warehouse, root.settings) if spec.warehouse else root.join("warehouse")
    properties["warehouse"] = warehouse.uri
    if warehouse.scheme == "s3":
        endpoint = warehouse.settings.resolved_endpoint()
        if endpoint:
            properties["s3.endpoint"] = endpoint
        if warehouse.settings.region or os.environ.get("AWS_REGION"):
            properties["s3.region"] = warehouse.settings.region or os.environ["AWS_REGION"]
    return properties


def open_table(spec: TableSpec, properties: dict[str, Any]) -> Any:
    """The scores table, created (with its partition spec) on first use."""
    from pyiceberg.catalog import load_catalog

    kwargs = {k: v for k, v in properties.items() if k != "name"}
    catalog = load_catalog(properties["name"], **kwargs)
    namespace = spec.identifier.split(".")[0]
    catalog.create_namespace_if_not_exists(namespace)
    if not catalog.table_exists(spec.identifier):
        catalog.create_table(spec.identifier, schema=TABLE_SCHEMA)
    table = catalog.load_table(spec.identifier)
    if not table.spec().fields:  # new, or created by a run that died before this commit
        with table.update_spec() as update:
            update.add_identity("day")
            update.add_identity("model")
        table = catalog.load_table(spec.identifier)
    if any(f.name not in table.schema().column_names for f in TABLE_SCHEMA):
        with table.update_schema() as update:  # the table grows with the schema: extend, don't rename
            update.union_by_name(TABLE_SCHEMA)
        table = catalog.load_table(spec.identifier)
    return table


def loaded_partitions(table: Any) -> dict[str, str]:
    """"<day> <model>" -> fingerprint of the scores loaded for it, from the current snapshot."""
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return {}
    text = snapshot.summary.additional_properties.get(LOADED_PROPERTY)
    try:
        loaded = json.loads(text) if text else {}
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def partition_key(day: datetime.date, model: str) -> str:
    return f"{day.isoformat()} {model}"


@dataclass(frozen=True)
class PartitionLoad:
    day: datetime.date
    model: str
    fingerprint: str  # of the published scores it comes from
    parts: tuple[Location, ...]  # the scores parts (Parquet)
    rows: int


def _table_rows(task: dict[str, Any], archive: str, parts: list[tuple[Location, str]]) -> pa.Table:
    """map_batches UDF: scores parts (indices into `parts`: location, day) -> the table's rows.
    Read with pyarrow here, in the task, through the Location's own filesystem."""
    import pyarrow.parquet as pq

    stored = [f.name for f in TABLE_SCHEMA if f.name in SCORES_SCHEMA.names]
    tables = []
    for index in task["part"]:
        if int(index) < 0:  # the placeholder task of a load without parts
            continue
        location, day = parts[int(index)]
        rows = pq.read_table(location.path, filesystem=location.fs, columns=stored, schema=SCORES_SCHEMA)
        count = rows.num_rows
        rows = rows.append_column("archive", pa.array([archive] * count, pa.string())) \
            .append_column("day", pa.array([datetime.date.fromisoformat(day)] * count, pa.date32())) \
            .append_column("scores_uri", pa.array([location.uri] * count, pa.string()))
        tables.append(rows.select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA))
    return pa.concat_tables(tables) if tables else TABLE_SCHEMA.empty_table()


def load_partitions(spec: TableSpec, properties: dict[str, Any], archive: str, loads: list[PartitionLoad],
                    loaded: dict[str, str], window: list[datetime.date], summary: dict[str, str]) -> int:
    """Replace the (day, model) partitions of `loads` in ONE commit; returns the rows written.
    `loaded` (carried forward, pruned to `window`) plus these loads becomes the commit's record;
    `summary`: more snapshot properties (the run id, the night)."""
    import ray.data
    from ray.data import SaveMode
    from ray.data.expressions import col

    # The record keeps a year of (day, model) entries, whatever the retention: a rerun of an older
    # night (or one with an older model) finds its partitions loaded. Older entries are dropped to
    # keep the snapshot summary small; a rerun of a night that old reloads its window (idempotent).
    oldest = (window[-1] - datetime.timedelta(days=RECORD_DAYS)).isoformat()
    record = {k: v for k, v in loaded.items() if k.split(" ", 1)[0] >= oldest}
    record.update({partition_key(load.day, load.model): load.fingerprint for load in loads})
    parts = [(part, load.day.isoformat()) for load in loads for part in load.parts]
    # One task per part; at least one (empty) batch, so that an overwrite with nothing to write
    # (every file of the days rejected at ingest) still empties the partitions.
    tasks = ray.data.from_items([{"part": i} for i in range(len(parts))] or [{"part": -1}],
                                override_num_blocks=max(1, len(parts)))
    rows = tasks.map_batches(_table_rows,  # type: ignore[arg-type]  # Ray types `fn` as fn(batch), without fn_kwargs
                             batch_size=1, batch_format="numpy", fn_kwargs={"archive": archive, "parts": parts})
    overwrite = None
    for model in sorted({load.model for load in loads}):
        days = sorted({load.day for load in loads if load.model == model})
        clause = col("day").is_in(days) & (col("model") == model)
        overwrite = clause if overwrite is None else overwrite | clause
    with warnings.catch_warnings():
        # A first load deletes nothing: pyiceberg warns "Delete operation did not match any records".
        warnings.filterwarnings("ignore", message="Delete operation did not match any records")
        rows.write_iceberg(spec.identifier, catalog_kwargs=properties, mode=SaveMode.OVERWRITE,
                           overwrite_filter=overwrite,
                           snapshot_properties={LOADED_PROPERTY: json.dumps(record, sort_keys=True), **summary})
    return sum(load.rows for load in loads)


def query(spec: TableSpec, properties: dict[str, Any], sql: str) -> pa.Table:
    """Run DuckDB SQL over the table, visible as the view `scores`. The table is streamed to DuckDB
    (pyiceberg's batch reader, partition-pruned by nothing: DuckDB filters), never loaded whole."""
    import duckdb

    table = open_table(spec, properties)
    reader = table.scan().to_arrow_batch_reader()
    connection = duckdb.connect()
    connection.register("scores", reader)
    try:
        relation = connection.sql(sql)
    except duckdb.Error as error:
        raise InputError(f"query failed: {error}") from None
    if relation is None:
        raise InputError("the query returns no rows: give a SELECT over `scores`")
    return relation.to_arrow_table()
