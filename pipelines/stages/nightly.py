"""`nightly`: one night of incremental re-scoring of a day-partitioned archive (Ray glue).

For the days of the retention window that ends at the night (`params.window`):

1. list each `date=YYYY-MM-DD/` partition; ingest those whose listing (names and sizes) differs
   from the one their published images dataset `datasets/<archive>/<day>` records;
2. score every partition without published scores from this model version and these images,
   `scores/<archive>/<model>/<day>`, all in one pass through one scorer pool (parts that an earlier,
   interrupted night finished from the same input are reused: keyed by the part's fingerprint,
   not by a run);
3. load the (day, model) partitions whose published scores the Iceberg table does not hold yet,
   in one commit (`pipelines.stages.scores_table`);
4. report drift and health of the night's partition per category against the previous nights'
   (`pipelines.evaluation.drift`): report.json / report.html / metrics.prom in the run record;
   limits exceeded become `alerts` (the CLI exits 3 on them; `adpipe status` shows them).

Whatever is done is read from what is published, so a night that died is finished by the next
run, and rerunning a finished night changes nothing. One night at a time per archive: a lease on
`nightly/<archive>/` (a second run refuses, exit 75).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipelines import datasets
from pipelines.data.sources import SourceItem, list_day_partition, refuse_links_outside
from pipelines.evaluation.drift import CategoryHealth, DriftLimits, category_health
from pipelines.evaluation.night_report import report_html, report_json, report_prometheus
from pipelines.models.artifacts import ModelCard
from pipelines.params.nightly import NightlyParams
from pipelines.runs import Lease
from pipelines.spec import StepSpec
from pipelines.spec_fields import ResourcesSpec
from pipelines.stages import scores_table
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.stages.image_batches import (
    PartSelection,
    check_room_for_decoding,
    decoded_images,
    decoded_queue_bytes,
    select_rows,
)
from pipelines.stages.ingest import publish_images, write_image_parts
from pipelines.stages.parts import PartPlan, Workers, run_parts
from pipelines.stages.score import Scorer, checked_precision, count_outcomes, precision_fingerprint, scores_part_table
from pipelines.storage import Location
from pipelines.tables import SCORES_SCHEMA

REPORT_JSON, REPORT_HTML, METRICS = "nightly-report.json", "nightly-report.html", "metrics.prom"


@dataclass
class DayPartition:
    day: datetime.date
    items: list[SourceItem]
    listing: str  # fingerprint of the listing
    images: Location
    scores: Location
    manifest: datasets.Manifest | None = None  # the published images
    scoring: str = ""  # fingerprint of everything the day's scores depend on

    @property
    def name(self) -> str:
        return f"date={self.day.isoformat()}"


def _published(folder: Location, table: str) -> datasets.Manifest | None:
    return datasets.read_manifest(folder, table=table) if folder.join(datasets.MANIFEST_NAME).exists() else None


def archive_lease(root: Location, params: NightlyParams) -> tuple[Location, str]:
    """Where a night holds its archive, and what a refusal calls it."""
    return root.join("nightly", params.archive.name), f"archive {params.archive.name!r} (one night at a time)"


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: NightlyParams = step.params
    folder, what = archive_lease(context.root, params)
    lock = Lease(folder)
    lock.acquire(context.run_id, what=what)
    try:
        return _night(params, context)
    finally:
        lock.release()


@dataclass
class Night:
    """What the phases of one night share."""

    params: NightlyParams
    context: StepContext
    night: datetime.date
    window: list[datetime.date]
    archive: Location
    model_folder: Location
    card: ModelCard

    @property
    def name(self) -> str:
        return self.params.archive.name

    @property
    def model(self) -> str:
        return self.card.version


def _night(params: NightlyParams, context: StepContext) -> StepResult:
    night = params.night_date()
    model_folder = context.input_dataset(params.model)
    card = ModelCard.read(model_folder).require("detector", "scoring")
    it = Night(params, context, night, params.window(night),
               Location.parse(params.archive.uri, context.root.settings), model_folder, card)
    seconds: dict[str, float] = {}

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        seconds[name] = round(time.monotonic() - started, 3)

    with phase("plan"):
        days = _list_days(it)
    with phase("ingest"):
        ingested = _ingest_new(it, days)
    with phase("score"):
        scored, outcome = _score_missing(it, days)
    with phase("load"):
        loads, loaded_rows = _load_missing(it, days)
    computed = outcome.rows_computed if outcome else 0
    facts: dict[str, Any] = {
        "archive": it.name, "night": night.isoformat(), "model": it.model, "run_id": context.run_id,
        "window": [it.window[0].isoformat(), it.window[-1].isoformat()],
        "partitions": [p.name for p in days], "partitions_ingested": [p.name for p in ingested],
        "partitions_scored": [p.name for p in scored], "partitions_loaded": [f"date={x.day}" for x in loads],
        "rows_scored": computed, "rows_loaded": loaded_rows, "reused_parts": outcome.reused if outcome else 0,
        # Of the scoring phase (decode, the scorer pool, writing parts, publishing), actor start included.
        "images_per_second": round(computed / seconds["score"], 2) if computed else None,
        "table": params.table.identifier, "seconds": seconds,
    }
    if not any(p.day == night for p in days):
        facts["note"] = f"no partition date={night.isoformat()} in the archive"
    with phase("report"):
        health = _health(params, night, days)
        alerts = [alert for c in health for alert in c.alerts]
        record = context.record.folder
        record.join(REPORT_JSON).write_json(report_json(facts, health, alerts))
        record.join(REPORT_HTML).write_bytes(report_html(facts, health, alerts).encode())
        record.join(METRICS).write_bytes(report_prometheus(facts, health, alerts))
    context.log("nightly done", **{k: v for k, v in facts.items() if k.startswith(("partitions_", "rows_"))},
                seconds=seconds, alerts=alerts)
    return StepResult(output=context.root.join("scores", it.name, it.model).uri,
                      rows=sum(p.manifest.rows for p in days if p.manifest is not None),
                      details={**{k: v for k, v in facts.items() if k != "partitions"}, "alerts": alerts},
                      summary=tuple(_summary(it, facts, days, health, alerts)))


def _list_days(it: Night) -> list[DayPartition]:
    """The window's day partitions that have files; each with its published images if they are
    of the current listing."""
    root, archive = it.context.root, it.archive
    days = []
    for day in it.window:
        items, listing = list_day_partition(archive, day.isoformat(), it.params.archive.category)
        if not items:
            continue
        items = refuse_links_outside(archive, items, it.params.archive.follow_symlinks)
        partition = DayPartition(day, items, listing, root.join("datasets", it.name, day.isoformat()),
                                 root.join("scores", it.name, it.model, day.isoformat()))
        published = _published(partition.images, "images")
        if published is not None and published.extra.get("listing") == listing:
            partition.manifest = published
        days.append(partition)
    it.context.log("nightly planned", night=it.night.isoformat(), window=[it.window[0].isoformat(),
                                                                          it.window[-1].isoformat()],
                   partitions=len(days), to_ingest=[p.name for p in days if p.manifest is None], model=it.model)
    return days


def _ingest_new(it: Night, days: list[DayPartition]) -> list[DayPartition]:
    """Ingest (in one Ray pass) and publish the days without images of their current listing."""
    todo = [p for p in days if p.manifest is None]
    if not todo:
        return todo
    params = it.params
    written = write_image_parts([(p.images, p.items) for p in todo], params.archive.rows_per_part,
                                params.max_image_pixels, ResourcesSpec(workers=max(2, params.resources.workers)))
    for partition, parts in zip(todo, written):
        partition.manifest = publish_images(
            partition.images, parts, name=it.name,
            lineage=it.context.lineage(source={"type": "archive", "uri": it.archive.uri, "partition": partition.name}),
            extra={"source_files": len(partition.items), "listing": partition.listing,
                   "partition": partition.name}).manifest
    return todo


def _score_missing(it: Night, days: list[DayPartition]) -> tuple[list[DayPartition], Any]:
    """Score the days without published scores of these images from this model version."""
    params = it.params
    # The nightly job always takes the default, auto: bf16 for a diffusion detector on GPU workers.
    precision = checked_precision("auto", it.card, params.resources.gpus_per_worker > 0)
    model_fingerprint = datasets.fingerprint([it.model_folder.uri, it.card.thresholds]
                                             + precision_fingerprint(precision))
    for partition in days:
        assert partition.manifest is not None
        partition.scoring = datasets.fingerprint([[p.input_fingerprint for p in partition.manifest.parts],
                                                  model_fingerprint, params.anomaly_maps, params.max_image_pixels])
    todo = [p for p in days if _scoring_of(p.scores) != p.scoring]
    if not todo:
        return todo, None
    check_room_for_decoding(params.resources.workers, params.resources.cpus_per_worker, "scorer worker")
    return todo, _score(todo, params, it.context, it.card, it.model_folder, model_fingerprint, it.model, precision)


def _load_missing(it: Night, days: list[DayPartition]) -> tuple[list[scores_table.PartitionLoad], int]:
    """Load into the Iceberg table, in one commit, the days whose published scores it does not hold."""
    params = it.params
    properties = scores_table.catalog_properties(params.table.catalog, it.context.root)
    loaded = scores_table.loaded_partitions(scores_table.open_table(params.table, properties))
    loads = []
    for partition in days:
        manifest = datasets.read_manifest(partition.scores, table="scores")
        fingerprint = datasets.fingerprint([manifest.extra.get("scoring"), manifest.rows,
                                            [p.input_fingerprint for p in manifest.parts]])
        if loaded.get(scores_table.partition_key(partition.day, it.model)) != fingerprint:
            loads.append(scores_table.PartitionLoad(partition.day, it.model, fingerprint,
                                                    tuple(datasets.part_locations(partition.scores, manifest)),
                                                    manifest.rows))
    if not loads:
        return loads, 0
    rows = scores_table.load_partitions(
        params.table, properties, it.name, loads, loaded, it.window,
        {"adpipe.run_id": it.context.run_id, "adpipe.night": it.night.isoformat(), "adpipe.archive": it.name})
    return loads, rows


def _summary(it: Night, facts: dict[str, Any], days: list[DayPartition], health: list[CategoryHealth],
             alerts: list[str]) -> list[str]:
    lines = [f"night {it.night} of {it.name} with {it.model}: window {it.window[0]} .. {it.window[-1]}, "
             f"{len(days)} partitions; ingested {len(facts['partitions_ingested'])}, scored "
             f"{len(facts['partitions_scored'])}, loaded {len(facts['partitions_loaded'])} into "
             f"{facts['table']} ({facts['rows_loaded']} rows)"]
    if facts["rows_scored"]:
        lines.append(f"  scored {facts['rows_scored']} images at {facts['images_per_second']} images/s"
                     + (f" ({facts['reused_parts']} parts from an earlier attempt)" if facts["reused_parts"] else ""))
    for c in health:
        lines.append(f"  {c.category}: {c.images} images, {c.errors} errors, {c.anomalous_share:.1%} anomalous"
                     + (f", PSI {c.psi:.3f}, KS {c.ks_statistic:.3f} vs {len(c.reference_nights)} nights"
                        if c.judged else ", drift not judged (too few images or no earlier nights)"))
    lines += [f"  ALERT {alert}" for alert in alerts]
    lines.append(f"  report: {it.context.record.folder.join(REPORT_HTML).uri}")
    return lines


def _scoring_of(folder: Location) -> str | None:
    """What the published scores in `folder` were computed from (None: none published)."""
    manifest = _published(folder, "scores")
    return None if manifest is None else manifest.extra.get("scoring")


def _score(to_score: list[DayPartition], params: NightlyParams, context: StepContext, card: ModelCard,
           model_folder: Location, model_fingerprint: str, model: str, precision: str) -> Any:
    """Score the days' images in one pass (global part numbers over the days), then publish each day."""
    plans: list[PartPlan] = []
    selections: dict[int, PartSelection] = {}
    for partition in to_score:
        assert partition.manifest is not None
        for selection in select_rows(partition.images, partition.manifest, lambda t: np.ones(t.num_rows, bool))[0]:
            number = len(plans)
            selections[number] = PartSelection(number, selection.location, selection.rows)
            plans.append(PartPlan(number, datasets.fingerprint([selection.location.uri, selection.rows,
                                                                model_fingerprint, params.anomaly_maps,
                                                                params.max_image_pixels]),
                                  len(selection.rows), output=(partition.scores, selection.part)))
    resources = params.resources
    scored_at = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    spec_fingerprint = context.record.status["spec_fingerprint"]
    context.log("nightly scoring", partitions=[p.name for p in to_score], parts=len(plans),
                images=sum(p.rows for p in plans))
    outcome = run_parts(
        to_score[0].scores, plans, SCORES_SCHEMA,
        source=lambda todo: decoded_images([selections[p.part] for p in todo], card.image_size,
                                           params.max_image_pixels),
        workers=Workers(Scorer, {"model_folder": model_folder, "record": card.record,
                                 "batch_size": resources.batch_size, "anomaly_maps": params.anomaly_maps,
                                 "threads": int(resources.cpus_per_worker), "precision": precision},
                        resources, resources.batch_size, decoded_queue_bytes(list(selections.values()),
                                                                              card.image_size)),
        build_table=lambda rows: scores_part_table(rows, model, context.run_id, scored_at, spec_fingerprint))
    records = dict(zip([p.part for p in plans], outcome.records))
    for partition in to_score:
        mine = [records[p.part] for p in plans if p.output is not None and p.output[0] is partition.scores]
        error_rows, predicted = count_outcomes(partition.scores, mine)
        datasets.publish(partition.scores, name=params.archive.name, version=partition.day.isoformat(),
                         table="scores", schema=SCORES_SCHEMA, parts=mine,
                         lineage=context.lineage(input=partition.images.uri, model=model_folder.uri),
                         extra={"scoring": partition.scoring, "model": model, "partition": partition.name,
                                "errors": len(error_rows), "predicted_anomalous": predicted})
    return outcome


def _health(params: NightlyParams, night: datetime.date, days: list[DayPartition]) -> list[CategoryHealth]:
    """Per category: the night's partition against the previous `reference_nights` partitions."""
    by_day = {p.day: p for p in days}
    if night not in by_day:
        return []
    columns = ["category", "score", "error", "label_pred"]
    tonight = datasets.read_table(by_day[night].scores, columns)
    earlier = [by_day[d] for d in sorted(by_day) if d < night][-params.drift.reference_nights:]
    reference = [(p.name, datasets.read_table(p.scores, ["category", "score", "error"])) for p in earlier]
    # The spec's drift block holds the limits (and more): compute code takes its own, Ray- and spec-free type.
    limits = DriftLimits(**{f.name: getattr(params.drift, f.name) for f in dataclasses.fields(DriftLimits)})
    out = []
    for category in sorted({c or "" for c in tonight["category"].to_pylist()}):
        mine = tonight.filter(pc.equal(pc.fill_null(tonight["category"], ""), category))
        scores = mine["score"].to_numpy(zero_copy_only=False).astype(np.float64)
        errors = int(pc.sum(pc.is_valid(mine["error"])).as_py() or 0)
        anomalous = int(pc.sum(pc.fill_null(mine["label_pred"], False).cast("int64")).as_py() or 0)
        ref_scores, ref_nights = [], []
        for night_name, table in reference:
            theirs = table.filter(pc.and_(pc.equal(pc.fill_null(table["category"], ""), category),
                                          pc.is_null(table["error"])))
            if theirs.num_rows:
                ref_scores.append(theirs["score"].to_numpy(zero_copy_only=False).astype(np.float64))
                ref_nights.append(night_name)
        out.append(category_health(category or "(none)", scores, errors, anomalous,
                                   np.concatenate(ref_scores) if ref_scores else np.zeros(0), ref_nights, limits))
    return out


def published_record(step: StepSpec, context: StepContext) -> Location | None:
    """None: a night is never skipped as a whole; it finds out itself what is left to do."""
    return None


KIND = StageKind(name="nightly", params=NightlyParams, run=run, published_record=published_record)
