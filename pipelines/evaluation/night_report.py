"""One night's drift and health report: JSON for machines, HTML for people, Prometheus text for a
scraper (prometheus-client's text format, written next to the run record)."""

from __future__ import annotations

import html
from typing import Any

from pipelines.evaluation.drift import CategoryHealth
from pipelines.evaluation.report import STYLE, facts_table_html

METRIC_PREFIX = "adpipe_nightly"


def report_json(facts: dict[str, Any], categories: list[CategoryHealth], alerts: list[str]) -> dict[str, Any]:
    return {**facts, "alerts": alerts, "categories": [c.to_json() for c in categories]}


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_html(facts: dict[str, Any], categories: list[CategoryHealth], alerts: list[str]) -> str:
    header = ("category", "images", "errors", "error rate", "anomalous", "mean score", "p95",
              "reference mean", "reference nights", "PSI", "PSI p", "KS", "KS p", "alerts")
    rows = []
    for c in categories:
        cells = [c.category, str(c.images), str(c.errors), f"{c.error_rate:.2%}", f"{c.anomalous_share:.2%}",
                 _number(c.score_mean), _number(c.score_p95), _number(c.reference_mean),
                 str(len(c.reference_nights)), _number(c.psi, 3),
                 "n/a" if c.psi_pvalue is None else f"{c.psi_pvalue:.2g}", _number(c.ks_statistic, 3),
                 "n/a" if c.ks_pvalue is None else f"{c.ks_pvalue:.2g}",
                 "; ".join(c.alerts) or ("ok" if c.judged else "not judged (too few images)")]
        css = ' class="alert"' if c.alerts else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
    alert_list = ("<ul class=\"alerts\">" + "".join(f"<li>{html.escape(a)}</li>" for a in alerts) + "</ul>"
                  if alerts else "<p>No alerts.</p>")
    title = f"Nightly scoring: {facts.get('archive')} {facts.get('night')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE} tr.alert {{ background: #fde2e2; }}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>"
            + facts_table_html({k: v for k, v in facts.items() if not isinstance(v, (list, dict))})
            + "<section class=\"drift\"><h2>Drift and health per category</h2>" + alert_list
            + "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section></body></html>\n")


def report_prometheus(facts: dict[str, Any], categories: list[CategoryHealth], alerts: list[str]) -> bytes:
    """The night's figures as Prometheus text-format metrics (for node_exporter's textfile
    collector or a push): one gauge family per figure, labelled by archive, model and category."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    labels = ["archive", "model", "category"]
    base = {"archive": str(facts["archive"]), "model": str(facts["model"])}

    def gauge(name: str, text: str, label_names: list[str] = labels) -> Gauge:
        return Gauge(f"{METRIC_PREFIX}_{name}", text, label_names, registry=registry)

    families = {
        "images": gauge("images", "rows scored tonight in the night's partition"),
        "error_rate": gauge("error_rate", "share of tonight's rows that could not be scored"),
        "anomalous_share": gauge("anomalous_share", "share of scored rows predicted anomalous"),
        "psi": gauge("score_psi", "population stability index of scores vs the reference nights"),
        "ks": gauge("score_ks_statistic", "two-sample KS distance of scores vs the reference nights"),
        "alerts": gauge("alerts", "alerts raised for the category tonight"),
    }
    for c in categories:
        key = {**base, "category": c.category}
        families["images"].labels(**key).set(c.images)
        families["error_rate"].labels(**key).set(c.error_rate)
        families["anomalous_share"].labels(**key).set(c.anomalous_share)
        if c.psi is not None:
            families["psi"].labels(**key).set(c.psi)
        if c.ks_statistic is not None:
            families["ks"].labels(**key).set(c.ks_statistic)
        families["alerts"].labels(**key).set(len(c.alerts))
    night = gauge("images_per_second", "scoring throughput of the night (rows computed / s)", ["archive", "model"])
    night.labels(**base).set(float(facts.get("images_per_second") or 0.0))
    scored = gauge("partitions_scored", "day partitions scored tonight", ["archive", "model"])
    scored.labels(**base).set(len(facts.get("partitions_scored", [])))
    total = gauge("alerts_total", "alerts raised tonight", ["archive", "model"])
    total.labels(**base).set(len(alerts))
    return generate_latest(registry)
