"""The per-part runner of map-style stages (`score`, `synthesize`, `sample`, ...): Ray glue.

A map-style stage turns each input part into one output part with the same index, so names are
deterministic and a rerun redoes only what is missing. The stage declares, per part, the output
rows it expects and a fingerprint of everything the part depends on; this runner

1. reuses the output parts an earlier attempt finished with the same fingerprint, and writes an
   empty part at once for a part that expects no rows (the numbering stays whole);
2. streams the rest through a pool of worker actors, one model per actor (the actor's constructor
   loads it once; frozen backbones are shared inside the actor), with the queue in front of them
   bounded in bytes;
3. collects the actors' rows by input part (`_part`) on the driver and writes output part N as
   soon as its expected rows have all arrived (memory bounded by the parts in flight).

Publishing (the manifest, written last) stays with the stage: what it records differs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray.data

from pipelines import datasets
from pipelines.spec_fields import ResourcesSpec
from pipelines.stages.image_batches import cap_queued_rows
from pipelines.storage import Location


@dataclass(frozen=True)
class PartPlan:
    part: int  # input part index (`_part` in the stream) = output part index, unless `output` says
    fingerprint: str  # of everything the output part depends on
    rows: int  # output rows the part will hold
    # Several output datasets in one pass (the nightly job: one per day): this plan's folder and
    # part index there. Default: the run's folder, index `part`.
    output: tuple[Location, int] | None = None

    def target(self, folder: Location) -> tuple[Location, int]:
        return self.output or (folder, self.part)


@dataclass
class PartsOutcome:
    records: list[datasets.PartRecord]  # every part, in order: what the manifest lists
    reused: int  # parts with rows taken from an earlier attempt
    computed: list[int]  # parts computed now
    rows_computed: int


@dataclass(frozen=True)
class Workers:
    """The actor pool: `actor(**kwargs)` once per actor, then `actor(batch) -> rows` per batch."""

    actor: type
    kwargs: dict[str, Any]
    resources: ResourcesSpec
    batch_size: int | None  # rows per call; None: one input block per call
    queue_bytes: int  # bound on the rows waiting for the actors


def run_parts(folder: Location, plans: list[PartPlan], schema: pa.Schema,
              source: Callable[[list[PartPlan]], ray.data.Dataset], workers: Workers,
              build_table: Callable[[list[dict[str, Any]]], pa.Table]) -> PartsOutcome:
    """Produce every planned part in `folder` (see the module docstring); `source(todo)` is the
    input stream of the parts to compute, each row carrying its `_part`."""
    records: dict[int, datasets.PartRecord] = {}
    reused = 0
    for plan in plans:
        target, index = plan.target(folder)
        done = datasets.completed_part(target, index, plan.fingerprint)
        if done is not None:
            records[plan.part] = done
            reused += bool(plan.rows)
        elif not plan.rows:
            records[plan.part] = datasets.write_part(target, index, schema.empty_table(), plan.fingerprint)
    todo = [plan for plan in plans if plan.part not in records]
    rows_computed = 0
    if todo:
        resources = workers.resources
        stream = source(todo).map_batches(
            workers.actor, fn_constructor_kwargs=workers.kwargs, batch_size=workers.batch_size,
            num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker or None,
            compute=ray.data.ActorPoolStrategy(size=resources.workers))
        stream = cap_queued_rows(stream, workers.queue_bytes)
        written = write_parts_as_completed(stream, {p.part: p for p in todo}, build_table, folder)
        records.update(written)
        rows_computed = sum(r.rows for r in written.values())
    return PartsOutcome([records[plan.part] for plan in plans], reused, [p.part for p in todo], rows_computed)


def write_parts_as_completed(stream: ray.data.Dataset, plans: dict[int, PartPlan],
                             build_table: Callable[[list[dict[str, Any]]], pa.Table],
                             folder: Location) -> dict[int, datasets.PartRecord]:
    """Collect a stream's rows by their input part (`_part`) and write output part N as soon as
    all `plans[N].rows` rows of input part N have arrived: deterministic names, one part per input
    part, memory bounded by the parts in flight. Returns the records of the parts written."""
    records: dict[int, datasets.PartRecord] = {}
    pending: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["_part"])):
            part = int(batch["_part"][i])
            pending[part].append({k: v[i] for k, v in batch.items()})
            if len(pending[part]) == plans[part].rows:
                target, index = plans[part].target(folder)
                records[part] = datasets.write_part(target, index, build_table(pending.pop(part)),
                                                    plans[part].fingerprint)
    if pending:
        raise RuntimeError(f"the stream ended with incomplete parts {sorted(pending)}")
    return records
