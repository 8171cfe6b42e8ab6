"""The self-contained HTML report of an evaluate run.

One HTML document with everything inlined: a metrics table, ROC/PRO curves and score histograms
per category, heatmap overlays of the most anomalous images and of a sample of normals, and a
table of run facts. Every image is a ``data:image/png;base64`` URI; there is no script, no external
stylesheet and no external URL, so the file can be mailed, archived or opened offline as is.

Pure numpy + matplotlib (drawn on ``Figure`` objects, rendered by Agg, no pyplot global state) + PIL.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

FIGURE_SIZE_IN = (4.0, 3.0)
FIGURE_DPI = 80
THUMBNAIL_MAX_SIDE = 224   # overlays are downscaled to this, keeping the report small
OVERLAY_ALPHA = 0.5        # weight of the heatmap over the image
HEATMAP_COLORMAP = "jet"
NOT_AVAILABLE = "n/a"
MEAN_ROW = "mean"


def _frozen_array(values, name: str, dtype=None, ndim: int | None = None) -> np.ndarray:
    """A read-only copy, so a frozen record really cannot change under the report."""
    array = np.array(values, dtype=dtype, copy=True)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    array.setflags(write=False)
    return array


# eq=False: the records hold arrays, whose == is elementwise and has no single truth value.
@dataclass(frozen=True, eq=False)
class CurveData:
    """One curve (e.g. ROC: FPR vs TPR; PRO: FPR vs per-region overlap) with its area if known."""

    name: str
    x: np.ndarray
    y: np.ndarray
    x_label: str
    y_label: str
    area: float | None

    def __post_init__(self) -> None:
        x = _frozen_array(self.x, f"curve {self.name!r} x", dtype=np.float64, ndim=1)
        y = _frozen_array(self.y, f"curve {self.name!r} y", dtype=np.float64, ndim=1)
        if x.shape != y.shape:
            raise ValueError(f"curve {self.name!r}: x has {x.size} points but y has {y.size}")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)


@dataclass(frozen=True, eq=False)
class ExampleImage:
    """One image shown in the report, with its anomaly map (any range; normalised per image)."""

    image_id: str
    image: np.ndarray                # HxWx3 uint8 RGB
    anomaly_map: np.ndarray | None   # HxW float, any range; resized to the image if smaller/larger
    score: float
    label: int | None                # 0 normal, 1 anomalous, None unknown
    category: str | None
    explanation: bytes | None = None  # PNG strip of a gradient-denoising reconstruction, shown beside
    explanation_note: str = ""  # e.g. PaDiM's distance from the first frame to the last

    def __post_init__(self) -> None:
        image = _frozen_array(self.image, f"image {self.image_id!r}", ndim=3)
        if image.dtype != np.uint8 or image.shape[2] != 3:
            raise ValueError(f"image {self.image_id!r} must be HxWx3 uint8 RGB, "
                             f"got shape {image.shape} dtype {image.dtype}")
        object.__setattr__(self, "image", image)
        if self.anomaly_map is not None:
            anomaly_map = _frozen_array(self.anomaly_map, f"anomaly map of {self.image_id!r}",
                                        dtype=np.float32, ndim=2)
            object.__setattr__(self, "anomaly_map", anomaly_map)


@dataclass(frozen=True, eq=False)
class CategoryReport:
    """What the report shows for one category: its metrics, curves and score distributions."""

    category: str
    metrics: dict[str, float | None]
    roc: CurveData | None
    pro: CurveData | None
    scores_normal: np.ndarray
    scores_anomalous: np.ndarray
    threshold: float | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", dict(self.metrics))
        for field in ("scores_normal", "scores_anomalous"):
            scores = _frozen_array(getattr(self, field), f"{self.category!r} {field}",
                                   dtype=np.float64, ndim=1)
            object.__setattr__(self, field, scores)


# ---------------------------------------------------------------------------------------------
# Images: figures and arrays to PNG data URIs
# ---------------------------------------------------------------------------------------------

def new_figure() -> Figure:
    # A bare Figure renders through Agg on savefig and never touches pyplot's global figure list.
    return Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout="tight")


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" metadata: the same inputs give the same bytes.
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return buffer.getvalue()


def array_png(image: np.ndarray) -> bytes:
    """The report's own PNG encoder (optimized for page size): evaluation sits beside
    pipelines.data in the layers, so it does not use `data.preprocess.encode_png`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail(image: np.ndarray, max_side: int = THUMBNAIL_MAX_SIDE) -> np.ndarray:
    """Downscale (never upscale) so the longer side is at most ``max_side``."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


# ---------------------------------------------------------------------------------------------
# Heatmap overlays
# ---------------------------------------------------------------------------------------------

def normalise_map(anomaly_map: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by this map's own min/max; a flat map (nothing stands out) becomes zeros."""
    values = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    if anomaly_map.shape == (height, width):
        return anomaly_map
    resized = Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def overlay_heatmap(image: np.ndarray, anomaly_map: np.ndarray,
                    alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a jet-coloured, per-image-normalised anomaly map over an HxWx3 uint8 RGB image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly map must be HxW, got shape {anomaly_map.shape}")
    height, width = image.shape[:2]
    heat = np.clip(resize_map(normalise_map(anomaly_map), height, width), 0.0, 1.0)
    colours = matplotlib.colormaps[HEATMAP_COLORMAP](heat)[..., :3]
    blended = (1.0 - alpha) * (image.astype(np.float32) / 255.0) + alpha * colours
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------------

def curve_png(curve: CurveData, chance_line: bool = False) -> bytes:
    fig = new_figure()
    ax = fig.add_subplot()
    label = curve.name if curve.area is None else f"{curve.name} (area {curve.area:.4f})"
    ax.plot(curve.x, curve.y, linewidth=1.5, label=label)
    if chance_line:
        ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", linewidth=0.8, color="grey")
    ax.set_xlabel(curve.x_label)
    ax.set_ylabel(curve.y_label)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return figure_png(fig)


def score_histogram_png(scores_normal: np.ndarray, scores_anomalous: np.ndarray,
                        threshold: float | None) -> bytes:
    """Normal and anomalous score distributions on shared bins, with the decision threshold."""
    fig = new_figure()
    ax = fig.add_subplot()
    finite = [s[np.isfinite(s)] for s in (scores_normal, scores_anomalous)]
    both = np.concatenate(finite)
    if both.size == 0:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
    else:
        low, high = float(both.min()), float(both.max())
        if threshold is not None and math.isfinite(threshold):
            low, high = min(low, threshold), max(high, threshold)
        if high <= low:
            low, high = low - 0.5, high + 0.5
        bins = np.linspace(low, high, 31).tolist()
        for scores, name, colour in ((finite[0], "normal", "tab:blue"),
                                     (finite[1], "anomalous", "tab:red")):
            if scores.size:
                ax.hist(scores, bins=bins, alpha=0.55, color=colour, label=f"{name} ({scores.size})")
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.0,
                   label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.mean { font-weight: bold; background: #f3f3f3; }
.charts, .grid { display: flex; flex-wrap: wrap; gap: 0.75em; }
figure { margin: 0; }
figcaption { font-size: 0.8em; max-width: 224px; overflow-wrap: anywhere; }
.grid img { display: block; }
"""


def format_metric(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return NOT_AVAILABLE
    return f"{value:.4f}"


def format_label(label: int | None) -> str:
    return "unlabelled" if label is None else {0: "normal", 1: "anomalous"}.get(label, "unlabelled")


def img_tag(png: bytes, alt: str) -> str:
    return f'<img src="{png_data_uri(png)}" alt="{html.escape(alt)}">'


def metric_names(categories: list[CategoryReport], mean_metrics: dict[str, float | None]) -> list[str]:
    """Union of metric names, in order of first appearance."""
    names: dict[str, None] = {}
    for metrics in [c.metrics for c in categories] + [mean_metrics]:
        names.update(dict.fromkeys(metrics))
    return list(names)


def metrics_table_html(categories: list[CategoryReport], mean_metrics: dict[str, float | None]) -> str:
    names = metric_names(categories, mean_metrics)
    header = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for row_name, metrics, css in [(c.category, c.metrics, "") for c in categories] + [
            (MEAN_ROW, mean_metrics, ' class="mean"')]:
        cells = "".join(f'<td class="number">{format_metric(metrics.get(n))}</td>' for n in names)
        rows.append(f"<tr{css}><th>{html.escape(row_name)}</th>{cells}</tr>")
    return (f'<table class="metrics"><thead><tr><th>category</th>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def facts_table_html(facts: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in facts.items())
    return f'<table class="facts"><tbody>{rows}</tbody></table>'


def category_section_html(report: CategoryReport) -> str:
    name = report.category
    charts = []
    if report.roc is not None:
        charts.append(img_tag(curve_png(report.roc, chance_line=True), f"{name}: {report.roc.name} curve"))
    if report.pro is not None:
        charts.append(img_tag(curve_png(report.pro), f"{name}: {report.pro.name} curve"))
    charts.append(img_tag(
        score_histogram_png(report.scores_normal, report.scores_anomalous, report.threshold),
        f"{name}: score histogram per label"))
    return (f'<section class="category"><h3>{html.escape(name)}</h3>'
            f'<div class="charts">{"".join(charts)}</div></section>')


def example_figure_html(example: ExampleImage) -> str:
    if example.anomaly_map is None:
        shown, note = example.image, " (no anomaly map)"
    else:
        shown, note = overlay_heatmap(example.image, example.anomaly_map), ""
    caption = [html.escape(example.image_id),
               f"score {format_metric(example.score)} · {format_label(example.label)}{note}"]
    if example.category is not None:
        caption.append(html.escape(example.category))
    pictures = img_tag(array_png(thumbnail(shown)), example.image_id)
    if example.explanation is not None:
        caption.append(f"gradient denoising, input to last step: {html.escape(example.explanation_note)}")
        pictures += img_tag(example.explanation, f"gradient denoising of {example.image_id}")
    return f"<figure>{pictures}<figcaption>{'<br>'.join(caption)}</figcaption></figure>"


def examples_grid_html(examples: list[ExampleImage]) -> str:
    if not examples:
        return "<p>none</p>"
    return f'<div class="grid">{"".join(example_figure_html(e) for e in examples)}</div>'


def render_report(title: str, categories: list[CategoryReport], mean_metrics: dict[str, float | None],
                  examples_anomalous: list[ExampleImage], examples_normal: list[ExampleImage],
                  facts: dict[str, str]) -> str:
    """One self-contained HTML document (images inlined as PNG data URIs, no script, no URLs)."""
    escaped_title = html.escape(title)
    body = [
        f"<h1>{escaped_title}</h1>",
        "<h2>Run</h2>", facts_table_html(facts),
        "<h2>Metrics</h2>", metrics_table_html(categories, mean_metrics),
        "<h2>Curves and score distributions</h2>",
        *(category_section_html(c) for c in categories),
        "<h2>Most anomalous images</h2>", examples_grid_html(examples_anomalous),
        "<h2>Sample of normal images</h2>", examples_grid_html(examples_normal),
    ]
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escaped_title}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{chr(10).join(body)}\n</body></html>\n")
