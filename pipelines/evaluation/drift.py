"""Drift and health of one night's scores against earlier nights' (numpy + scipy; no Ray).

PSI (population stability index) over `bins` bins whose edges are quantiles of the reference
scores: sum over bins of (p_cur - p_ref) * ln(p_cur / p_ref), each share smoothed as
(count + 1/2) / (n + bins/2) so that an empty bin counts as a large, finite shift (a fixed floor
such as 1e-4 instead makes one empty bin of a small night look like major drift). Usual reading:
< 0.1 stable, 0.1-0.25 moderate, > 0.25 major. KS: scipy's two-sample Kolmogorov-Smirnov
statistic and p-value. With thousands of
images even a harmless shift has a tiny p-value, so the limits are on PSI and the KS distance.

PSI is noisy on small nights: two samples of one distribution give PSI of about
(bins - 1) * (1/n_ref + 1/n_cur) (0.9 for 10 bins and 20 images each). Under no drift,
PSI / (1/n_ref + 1/n_cur) is asymptotically chi-square with bins - 1 degrees of freedom
(Yurdakul, "Statistical properties of the population stability index", 2018), which gives a
p-value: a PSI alarm needs PSI above its limit AND that p-value below `max_psi_pvalue`, so that a
small night's sampling noise is not reported as drift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PSI_SMOOTHING = 0.5  # added to every bin's count (Jeffreys / Krichevsky-Trofimov)


def psi_pvalue(psi: float, reference_count: int, current_count: int, bins: int) -> float:
    """P(PSI >= psi) under no drift, from the chi-square approximation (see the module docstring)."""
    from scipy import stats

    return float(stats.chi2.sf(psi / (1.0 / reference_count + 1.0 / current_count), bins - 1))


def population_stability_index(reference: np.ndarray, current: np.ndarray, bins: int) -> float:
    reference = np.asarray(reference, np.float64)
    current = np.asarray(current, np.float64)
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    # Bin i holds values in (edges[i-1], edges[i]]; below the first and above the last edge are
    # the open-ended outer bins, so values outside the reference's range still count.
    count = len(edges) + 1
    ref_counts = np.bincount(np.searchsorted(edges, reference, side="left"), minlength=count)
    cur_counts = np.bincount(np.searchsorted(edges, current, side="left"), minlength=count)
    ref_share = (ref_counts + PSI_SMOOTHING) / (len(reference) + PSI_SMOOTHING * count)
    cur_share = (cur_counts + PSI_SMOOTHING) / (len(current) + PSI_SMOOTHING * count)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


@dataclass(frozen=True)
class DriftLimits:
    max_psi: float | None
    max_psi_pvalue: float
    max_ks_statistic: float | None
    max_error_rate: float | None
    max_anomalous_share: float | None
    min_images: int
    bins: int


@dataclass
class CategoryHealth:
    category: str
    images: int  # tonight's rows
    errors: int
    anomalous: int  # predicted anomalous at the model's threshold
    reference_images: int  # scored rows of the reference nights
    reference_nights: list[str]
    score_mean: float | None = None
    score_p50: float | None = None
    score_p95: float | None = None
    reference_mean: float | None = None
    psi: float | None = None
    psi_pvalue: float | None = None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    judged: bool = False  # enough images tonight and in the reference to compare
    alerts: list[str] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.images if self.images else 0.0

    @property
    def anomalous_share(self) -> float:
        scored = self.images - self.errors
        return self.anomalous / scored if scored else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": round(self.error_rate, 6),
                "anomalous_share": round(self.anomalous_share, 6)}


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return values[np.isfinite(values)]


def category_health(category: str, scores: np.ndarray, errors: int, anomalous: int, reference: np.ndarray,
                    reference_nights: list[str], limits: DriftLimits) -> CategoryHealth:
    """`scores`: tonight's scores (NaN for error rows); `reference`: the reference nights' scores."""
    from scipy import stats

    current, reference = _finite(scores), _finite(reference)
    health = CategoryHealth(category, images=len(scores), errors=errors, anomalous=anomalous,
                            reference_images=len(reference), reference_nights=reference_nights)
    if len(current):
        health.score_mean = float(current.mean())
        health.score_p50 = float(np.quantile(current, 0.5))
        health.score_p95 = float(np.quantile(current, 0.95))
    if len(reference):
        health.reference_mean = float(reference.mean())
    if health.images >= limits.min_images and limits.max_error_rate is not None \
            and health.error_rate > limits.max_error_rate:
        health.alerts.append(f"{category}: {health.errors} of {health.images} rows could not be scored "
                             f"({health.error_rate:.1%} > {limits.max_error_rate:.1%})")
    health.judged = len(current) >= limits.min_images and len(reference) >= limits.min_images
    if not health.judged:
        return health
    health.psi = population_stability_index(reference, current, limits.bins)
    health.psi_pvalue = psi_pvalue(health.psi, len(reference), len(current), limits.bins)
    result = stats.ks_2samp(reference, current)
    health.ks_statistic, health.ks_pvalue = float(result.statistic), float(result.pvalue)
    if limits.max_psi is not None and health.psi > limits.max_psi and health.psi_pvalue < limits.max_psi_pvalue:
        health.alerts.append(f"{category}: score distribution drifted from the last {len(reference_nights)} "
                             f"night(s): PSI {health.psi:.3f} > {limits.max_psi:g}, p = {health.psi_pvalue:.2g} "
                             f"(mean {health.score_mean:.4g} vs {health.reference_mean:.4g})")
    if limits.max_ks_statistic is not None and health.ks_statistic > limits.max_ks_statistic:
        health.alerts.append(f"{category}: KS distance {health.ks_statistic:.3f} > {limits.max_ks_statistic:g} "
                             f"(p = {health.ks_pvalue:.2g})")
    if limits.max_anomalous_share is not None and health.anomalous_share > limits.max_anomalous_share:
        health.alerts.append(f"{category}: {health.anomalous_share:.1%} predicted anomalous "
                             f"> {limits.max_anomalous_share:.1%}")
    return health
