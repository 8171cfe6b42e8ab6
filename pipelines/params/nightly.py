"""Parameters of `nightly`: one night of incremental re-scoring of a day-partitioned archive.

The archive is a prefix of images in hive-style day partitions (`date=YYYY-MM-DD/...`). A night
ingests the partitions of its retention window that are new or changed, scores every partition of
the window that has no scores from the current model version, loads what it scored into the
Iceberg scores table in one commit, and reports drift and health. What is done is read back from
what is published (per partition and model version), never from a run's own memory.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, replace
from typing import Literal

from pipelines.data.limits import DEFAULT_MAX_PIXELS
from pipelines.errors import SpecError
from pipelines.spec_fields import (
    ModelInputSpec,
    ResourcesSpec,
    check_name,
    check_positive,
    normalize_uri,
    short_repr,
)

DATE_FORMAT = "%Y-%m-%d"
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,63}\.[a-z_][a-z0-9_]{0,63}$")
# A URI with user:password@ would put a secret in the spec (and in every run record).
URI_WITH_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", re.IGNORECASE)


def parse_date(value: str, field_path: str) -> datetime.date:
    try:
        return datetime.datetime.strptime(value, DATE_FORMAT).date()
    except ValueError:
        raise SpecError(field_path, f"{short_repr(value)} is not a date: expected YYYY-MM-DD") from None


@dataclass(frozen=True)
class ArchiveSpec:
    """The production archive: `uri/date=YYYY-MM-DD/...` image files, unlabelled."""

    uri: str
    name: str  # names datasets/<name>/<day>, scores/<name>/<model>/<day> and the table's `archive` column
    category: str | None = None  # every image's category (which of the model's per-category models scores it)
    follow_symlinks: bool = False
    rows_per_part: int = 256

    def validate(self, path: str) -> ArchiveSpec:
        check_name(self.name, f"{path}.name")
        if self.category is not None:
            check_name(self.category, f"{path}.category")
        check_positive(self.rows_per_part, f"{path}.rows_per_part")
        return replace(self, uri=normalize_uri(self.uri, f"{path}.uri"))


@dataclass(frozen=True)
class CatalogSpec:
    """The Iceberg catalog (pyiceberg). `sql`: SQLAlchemy URI, SQLite (the embedded default:
    `<storage root>/catalog/iceberg.db`, for a file:// root) or PostgreSQL
    (`postgresql+psycopg2://user@host:5432/db`); `rest`: a REST catalog. pyiceberg also reads
    PYICEBERG_CATALOG__<NAME>__URI (and any other property) from the environment. A password is
    never in the URI, here or there (refused): PostgreSQL's client reads it from PGPASSWORD or
    ~/.pgpass, e.g. from a Kubernetes Secret."""

    name: str = "adpipe"
    type: Literal["sql", "rest"] = "sql"
    uri: str | None = None
    warehouse: str | None = None  # default: <storage root>/warehouse

    def validate(self, path: str) -> CatalogSpec:
        check_name(self.name, f"{path}.name")
        if self.uri is not None and URI_WITH_CREDENTIALS.match(self.uri):
            raise SpecError(f"{path}.uri", "credentials are not allowed in a job spec; give the password in "
                                           "PGPASSWORD (or ~/.pgpass), where PostgreSQL's client library reads it")
        warehouse = normalize_uri(self.warehouse, f"{path}.warehouse") if self.warehouse else None
        return replace(self, warehouse=warehouse)


@dataclass(frozen=True)
class TableSpec:
    catalog: CatalogSpec = CatalogSpec()
    identifier: str = "adpipe.nightly_scores"  # namespace.table

    def validate(self, path: str) -> TableSpec:
        if not IDENTIFIER.match(self.identifier):
            raise SpecError(f"{path}.identifier", f"{short_repr(self.identifier)}: expected namespace.table "
                                                  "(lower-case letters, digits, '_')")
        return self


@dataclass(frozen=True)
class DriftSpec:
    """Per category, tonight's scores against those of the previous `reference_nights` nights of
    the same model version. A limit set to null is reported but never alarms."""

    reference_nights: int = 7
    bins: int = 10  # PSI bins: quantiles of the reference scores
    max_psi: float | None = 0.25  # population stability index; > 0.25 is the usual "major shift"
    # ... and only when sampling noise cannot explain it (p-value of PSI under no drift; see
    # pipelines.evaluation.drift): a night of 40 images shows PSI 0.5 with no drift at all.
    max_psi_pvalue: float = 0.01
    max_ks_statistic: float | None = None  # two-sample Kolmogorov-Smirnov distance
    max_error_rate: float | None = 0.05  # share of tonight's rows that could not be scored
    max_anomalous_share: float | None = None  # share predicted anomalous at the model's threshold
    min_images: int = 20  # a category with fewer images tonight (or in its reference) is not judged

    def validate(self, path: str) -> DriftSpec:
        check_positive(self.reference_nights, f"{path}.reference_nights")
        if self.bins < 2:
            raise SpecError(f"{path}.bins", f"must be >= 2, got {self.bins}")
        for name in ("max_psi", "max_ks_statistic", "max_error_rate", "max_anomalous_share"):
            value = getattr(self, name)
            if value is not None:
                check_positive(value, f"{path}.{name}", allow_zero=True)
        check_positive(self.min_images, f"{path}.min_images")
        if not 0.0 < self.max_psi_pvalue <= 1.0:
            raise SpecError(f"{path}.max_psi_pvalue", f"must be in (0, 1], got {self.max_psi_pvalue}")
        return self


@dataclass(frozen=True)
class NightlyParams:
    archive: ArchiveSpec
    model: ModelInputSpec
    schedule: str = "0 2 * * *"  # cron expression, UTC (croniter): when the platform starts a night
    # Which day a night scores: the schedule's latest fire time before now, minus this many days
    # (1: the night of Dec 3 at 02:00 scores date=Dec 2, the day that has just ended).
    delay_days: int = 1
    night: str | None = None  # YYYY-MM-DD; `adpipe nightly --date` sets it; default: from the schedule
    retention_days: int = 30  # the window of days (ending at the night) kept scored by the current model
    table: TableSpec = TableSpec()
    drift: DriftSpec = DriftSpec()
    anomaly_maps: bool = False
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    resources: ResourcesSpec = ResourcesSpec(workers=1)

    def validate(self, path: str) -> NightlyParams:
        from croniter import croniter

        def at(name: str) -> str:
            return f"{path}.{name}" if path else name

        if not croniter.is_valid(self.schedule):
            raise SpecError(at("schedule"), f"{short_repr(self.schedule)} is not a cron expression "
                                            "(five fields: minute hour day-of-month month day-of-week)")
        check_positive(self.delay_days, at("delay_days"), allow_zero=True)
        check_positive(self.retention_days, at("retention_days"))
        if self.night is not None:
            parse_date(self.night, at("night"))
        check_positive(self.max_image_pixels, at("max_image_pixels"))
        return self

    def night_date(self, now: datetime.datetime | None = None) -> datetime.date:
        """The day this night scores: `night` if set, else from the schedule (see `delay_days`)."""
        if self.night is not None:
            return parse_date(self.night, "night")
        from croniter import croniter

        now = now or datetime.datetime.now(datetime.UTC)
        fired = croniter(self.schedule, now).get_prev(datetime.datetime)
        return fired.date() - datetime.timedelta(days=self.delay_days)

    def window(self, night: datetime.date) -> list[datetime.date]:
        """The days kept scored, oldest first, ending at `night`."""
        return [night - datetime.timedelta(days=back) for back in range(self.retention_days - 1, -1, -1)]
