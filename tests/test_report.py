"""The evaluate report is one self-contained HTML file: embedded PNGs, escaped text, no URLs."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.evaluation.report import (
    FIGURE_DPI,
    FIGURE_SIZE_IN,
    THUMBNAIL_MAX_SIDE,
    CategoryReport,
    CurveData,
    ExampleImage,
    normalise_map,
    overlay_heatmap,
    render_report,
)

PNG_PREFIX = "data:image/png;base64,"
CHROMIUM = Path("/usr/bin/chromium")
HOSTILE_ID = 'bottle/<script>alert("x")</script>.png'
FIGURE_PX = (round(FIGURE_SIZE_IN[0] * FIGURE_DPI), round(FIGURE_SIZE_IN[1] * FIGURE_DPI))


class ReportParser(HTMLParser):
    """Collects every attribute, every <img>, and the cells of the metrics table."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.imgs: list[dict[str, str | None]] = []
        self.metrics_rows: list[list[str]] = []
        self._in_metrics = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend((tag, name, value) for name, value in attrs)
        attributes = dict(attrs)
        if tag == "img":
            self.imgs.append(attributes)
        if tag == "table" and attributes.get("class") == "metrics":
            self._in_metrics = True
        if self._in_metrics and tag == "tr":
            self.metrics_rows.append([])
        if self._in_metrics and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if self._in_metrics and tag in ("td", "th") and self._cell is not None:
            self.metrics_rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._in_metrics = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def synthetic_image(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    base = np.linspace(40, 200, size, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 10, (size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def synthetic_map(rng: np.random.Generator, size: int, centre: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 6.0 ** 2))
    return (3.0 * blob + rng.normal(0, 0.05, (size, size))).astype(np.float32) + 10.0


def roc_curve(n: int = 50) -> CurveData:
    fpr = np.linspace(0, 1, n)
    return CurveData("ROC", fpr, np.sqrt(fpr), "false positive rate", "true positive rate", 0.6667)


def pro_curve(n: int = 50) -> CurveData:
    fpr = np.linspace(0, 0.3, n)
    return CurveData("PRO", fpr, np.minimum(1.0, 3 * fpr), "false positive rate", "per-region overlap", 0.5)


@pytest.fixture(scope="module")
def report_html() -> str:
    rng = np.random.default_rng(7)
    categories = [
        CategoryReport(
            category="bottle",
            metrics={"image_auroc": 0.98765, "pixel_auroc": 0.912344, "aupro": 0.81, "f1_max": 0.9},
            roc=roc_curve(), pro=pro_curve(),
            scores_normal=rng.normal(1.0, 0.2, 40), scores_anomalous=rng.normal(2.0, 0.4, 30),
            threshold=1.5,
        ),
        CategoryReport(  # ELPV-like: image labels only, so no pixel metrics and no PRO curve
            category="elpv",
            metrics={"image_auroc": 0.7, "pixel_auroc": None, "aupro": None, "f1_max": 0.654321},
            roc=roc_curve(), pro=None,
            scores_normal=rng.normal(0.5, 0.1, 25), scores_anomalous=rng.normal(0.8, 0.1, 5),
            threshold=None,
        ),
    ]
    mean_metrics = {"image_auroc": 0.843825, "pixel_auroc": 0.912344, "aupro": 0.81, "f1_max": 0.777161}
    anomalous = [
        ExampleImage(HOSTILE_ID, synthetic_image(rng), synthetic_map(rng, 96, (30, 60)), 2.75, 1, "bottle"),
        # a map at a lower resolution than the image, as detectors produce
        ExampleImage("bottle/broken_large/001.png", synthetic_image(rng, 300),
                     synthetic_map(rng, 64, (10, 50)), 2.5, 1, "bottle"),
        ExampleImage("elpv/cell0042.png", synthetic_image(rng), None, 0.95, None, None),
    ]
    normals = [ExampleImage(f"bottle/good/{i:03d}.png", synthetic_image(rng),
                            np.zeros((96, 96), np.float32), 1.0 + i / 10, 0, "bottle") for i in range(2)]
    facts = {"model": "padim@3", "dataset": "mvtec-ad/1", "run id": "run-<&>-1", "scoring time": "12.3 s"}
    return render_report("Evaluation <of> padim", categories, mean_metrics, anomalous, normals, facts)


@pytest.fixture(scope="module")
def parsed(report_html) -> ReportParser:
    parser = ReportParser()
    parser.feed(report_html)
    parser.close()
    return parser


def decode_png(src: str) -> Image.Image:
    assert src.startswith(PNG_PREFIX), src[:60]
    data = base64.b64decode(src[len(PNG_PREFIX):], validate=True)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def test_every_image_is_an_embedded_png_of_the_expected_size(parsed):
    # 2 ROC + 1 PRO + 2 histograms, 3 anomalous + 2 normal examples
    assert len(parsed.imgs) == 10
    alts = [img["alt"] for img in parsed.imgs]
    assert alts[:5] == ["bottle: ROC curve", "bottle: PRO curve", "bottle: score histogram per label",
                        "elpv: ROC curve", "elpv: score histogram per label"]
    sizes = [decode_png(img["src"]).size for img in parsed.imgs]
    for size in sizes[:5]:
        assert abs(size[0] - FIGURE_PX[0]) <= 4 and abs(size[1] - FIGURE_PX[1]) <= 4, size
    assert sizes[5] == (96, 96)
    assert sizes[6] == (THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE)  # 300 px image downscaled
    assert sizes[7:] == [(96, 96)] * 3


def test_report_references_nothing_outside_itself(report_html, parsed):
    assert not re.search(r"https?://", report_html, re.IGNORECASE)
    assert not re.search(r"(?:src|href)\s*=\s*(?![\"']?data:image/png;base64,)", report_html, re.IGNORECASE)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    for tag, name, value in parsed.attrs:
        if name in ("src", "href", "srcset", "action", "background"):
            assert tag == "img" and name == "src" and value.startswith(PNG_PREFIX), (tag, name)
    assert "@import" not in report_html and "url(" not in report_html


def test_metrics_table_formats_numbers_and_missing_values(parsed):
    header, *rows = parsed.metrics_rows
    assert header == ["category", "image_auroc", "pixel_auroc", "aupro", "f1_max"]
    assert rows == [
        ["bottle", "0.9877", "0.9123", "0.8100", "0.9000"],
        ["elpv", "0.7000", "n/a", "n/a", "0.6543"],
        ["mean", "0.8438", "0.9123", "0.8100", "0.7772"],
    ]


def test_text_is_escaped(report_html, parsed):
    assert "<script>" not in report_html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in report_html
    assert "<title>Evaluation &lt;of&gt; padim</title>" in report_html
    assert "run-&lt;&amp;&gt;-1" in report_html
    assert HOSTILE_ID in [img["alt"] for img in parsed.imgs]  # unescaped by the parser, intact


def test_overlay_highlights_the_hot_region_and_keeps_the_image_shape():
    image = np.full((40, 60, 3), 128, np.uint8)
    anomaly_map = np.zeros((20, 30), np.float32)
    anomaly_map[5:10, 20:25] = 7.0
    overlay = overlay_heatmap(image, anomaly_map)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    hot, cold = overlay[15, 45], overlay[30, 5]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: red where anomalous, blue elsewhere


def test_normalise_map_is_per_image_and_flat_maps_stay_cold():
    assert np.allclose(normalise_map(np.array([[2.0, 4.0], [6.0, 10.0]])), [[0, 0.25], [0.5, 1.0]])
    assert not normalise_map(np.full((4, 4), 3.0)).any()
    assert np.isfinite(normalise_map(np.array([[np.nan, 1.0], [2.0, np.inf]]))).all()


def test_records_are_immutable_and_validated():
    curve = roc_curve()
    with pytest.raises(ValueError):
        curve.x[0] = 1.0
    with pytest.raises(ValueError, match="x has 3 points but y has 2"):
        CurveData("ROC", np.zeros(3), np.zeros(2), "x", "y", None)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        ExampleImage("gray", np.zeros((8, 8, 1), np.uint8), None, 0.0, None, None)


# In CI (ops/test.sh installs it there) a missing Chromium is a failure, not a skip.
@pytest.mark.skipif(not CHROMIUM.exists() and os.environ.get("CI") != "true",
                    reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_html, tmp_path):
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing in CI: ops/test.sh should have installed it"
    report = tmp_path / "report.html"
    report.write_text(report_html, encoding="utf-8")
    shot = tmp_path / "shot.png"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
        report.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert shot.exists(), f"no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(shot) as screenshot:
        pixels = np.asarray(screenshot.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"screenshot looks blank: {len(colours)} colours"
    # the figures and heatmap overlays drew: plenty of coloured (not grey/white text) pixels
    saturation = pixels.max(axis=2).astype(int) - pixels.min(axis=2)
    assert (saturation > 80).sum() > 20_000
