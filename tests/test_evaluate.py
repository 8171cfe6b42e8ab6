"""The `evaluate` stage end to end on small hand-built datasets, checked against independent references.

An images dataset (with ground-truth masks for some anomalous rows) and a scores dataset (the
SCORES_SCHEMA rows a `score` step writes, maps through `encode_map`) are written directly with the
dataset helpers; the job runs through the orchestrator (`run_job`) or the CLI (`cli.main`) on
`file://` storage under tmp_path. Image metrics are compared with scikit-learn, pixel AUROC with
scikit-learn over the decoded maps, AUPRO with a small implementation below (and known values).

`evaluate` runs on the driver and never touches Ray, but `run_job` always enters `ray_runtime`;
starting a real Ray (and the S3 server the session fixture needs first) costs ~25 s on 2 cores,
so here `ray_runtime` is replaced by a context that only records it was entered and checks that
Ray stayed down.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import signal
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import skimage.measure
import yaml
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_auc_score

from imagefiles import encode, png
from pipelines import cli, datasets, orchestrator
from pipelines.errors import InputError
from pipelines.models.inference import decode_map, encode_map
from pipelines.spec import parse_spec
from pipelines.storage import Location
from pipelines.tables import IMAGES_SCHEMA, SCORES_SCHEMA

SIZE = 32  # anomaly maps, masks and images are SIZE x SIZE
FPR_LIMIT = 0.25  # not the default 0.3: the spec's value must be the one used
MODEL = "toy@1"
SCORED_AT = datetime.datetime(2026, 11, 22, 2, 0, tzinfo=datetime.UTC)


def quiet(*_args, **_kwargs) -> None:
    pass


@contextlib.contextmanager
def no_ray(*_args, **_kwargs):
    """Stands in for `orchestrator.ray_runtime`: evaluate must not need Ray. (When an earlier test
    module left the session's Ray up, whether evaluate started it cannot be told: the check needs
    Ray down on entry, as when this module runs alone.)"""
    no_ray.entered += 1
    was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    if not was_up and "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), "the evaluate stage started Ray"


no_ray.entered = 0


@pytest.fixture(scope="module", autouse=True)
def without_ray():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(orchestrator, "ray_runtime", no_ray)
        yield


# ---------------------------------------------------------------------------------------------
# Hand-built inputs
# ---------------------------------------------------------------------------------------------

def mask_bytes(mask: np.ndarray) -> bytes:
    return encode(Image.fromarray(mask.astype(np.uint8) * 255, "L"))


def box(*slices: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    for top, bottom, left, right in slices:
        mask[top:bottom, left:right] = True
    return mask


class Case:
    """Rows of one images dataset and one scores dataset, plus the truth the test keeps."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.scores: list[dict] = []
        self.maps: dict[str, np.ndarray] = {}  # image_id -> the float map before encoding
        self.masks: dict[str, np.ndarray] = {}  # image_id -> the ground-truth mask given

    def add(self, image_id: str, category: str, label: int | None, score: float | None,
            anomaly_map: np.ndarray | None, mask: np.ndarray | None = None, error: str | None = None,
            in_images: bool = True, defect_type: str | None = None) -> None:
        if in_images:
            self.images.append({"image_id": image_id, "image": png("RGB", (SIZE, SIZE), seed=len(self.images)),
                                "category": category, "split": "test", "label": label,
                                "defect_type": defect_type, "mask": None if mask is None else mask_bytes(mask),
                                "width": SIZE, "height": SIZE, "color_mode": "RGB",
                                "source_uri": f"test://{image_id}"})
        data = low = high = None
        if anomaly_map is not None:
            data, low, high = encode_map(anomaly_map.astype(np.float32))
            self.maps[image_id] = anomaly_map
        if mask is not None:
            self.masks[image_id] = mask
        self.scores.append({"image_id": image_id, "category": category, "split": "test", "label": label,
                            "defect_type": defect_type, "model": MODEL, "score": score,
                            "label_pred": None if score is None else score >= 1.0,
                            "threshold": 1.0, "anomaly_map": data, "anomaly_map_min": low,
                            "anomaly_map_max": high, "error": error, "run_id": "score-run",
                            "scored_at": SCORED_AT})


def build_case() -> Case:
    rng = np.random.default_rng(7)
    case = Case()

    # "alpha": masks on every anomalous row -> all four metrics. Image scores tie within and
    # across classes (0.5 and 0.9 appear in both); regions of very different sizes and
    # detectabilities (PRO weighs regions, not pixels), one of them two squares touching only at
    # a corner (one region with 8-connectivity, two with 4), one at the image border, and two
    # regions in one image.
    normal_scores = [0.1, 0.2, 0.2, 0.3, 0.5, 0.5, 0.7, 0.9]
    for i, score in enumerate(normal_scores):
        anomaly_map = rng.normal(0.0, 1.0, (SIZE, SIZE))
        if i in (2, 6):
            anomaly_map[4:9, 20:25] += 2.5  # a false positive blob on a normal image
        case.add(f"alpha/good/{i}.png", "alpha", 0, score, anomaly_map, mask=None)
    anomalous = [
        (0.5, box((8, 22, 8, 22)), 0.8),                  # large, weakly visible
        (0.5, box((3, 6, 3, 6), (24, 28, 20, 30)), 3.0),  # two regions, strongly visible
        (0.8, box((10, 14, 10, 14), (14, 18, 14, 18)), 1.5),  # corner-touching squares
        (0.9, box((0, 5, 26, 32)), 2.0),                  # at the border
        (0.9, box((16, 18, 5, 7)), 4.0),                  # tiny, very visible
        (1.2, box((12, 20, 2, 12)), 1.0),
    ]
    for i, (score, mask, strength) in enumerate(anomalous):
        anomaly_map = rng.normal(0.0, 1.0, (SIZE, SIZE)) + strength * mask
        case.add(f"alpha/bad/{i}.png", "alpha", 1, score, anomaly_map, mask=mask,
                 defect_type=("scratch", "stain", None)[i % 3])  # None: reported as "unknown"
    # Left out, and counted: two rows the scorer could not read (one also unlabelled), and one
    # unlabelled row whose top score and hot map would change every metric if it were counted.
    case.add("alpha/bad/unreadable.png", "alpha", 1, None, None, error="cannot identify image file")
    case.add("alpha/unknown/broken.png", "alpha", None, None, None, error="truncated file")
    case.add("alpha/unknown/maybe.png", "alpha", None, 9.0, np.full((SIZE, SIZE), 50.0)
             + rng.normal(0, 1, (SIZE, SIZE)))

    # "beta": image metrics only: one anomalous row has no mask, so pixel metrics would be wrong.
    beta_scores = [(0, 0.3), (0, 0.3), (0, 0.6), (0, 0.1), (1, 0.3), (1, 0.8), (1, 0.6)]
    for i, (label, score) in enumerate(beta_scores):
        mask = box((2, 8, 2, 8)) if (label == 1 and i != 6) else None
        case.add(f"beta/{i}.png", "beta", label, score, rng.normal(0, 1, (SIZE, SIZE)), mask=mask)

    # "gamma": normals only -> no metric can be computed.
    for i in range(3):
        case.add(f"gamma/{i}.png", "gamma", 0, 0.2 * i, rng.normal(0, 1, (SIZE, SIZE)))

    # "perfect": every anomalous pixel above every normal pixel, every anomalous image above every
    # normal one -> 1.0 everywhere.
    for i in range(3):
        case.add(f"perfect/good/{i}.png", "perfect", 0, 0.1 * i, rng.uniform(0.0, 0.4, (SIZE, SIZE)))
    for i, mask in enumerate([box((4, 10, 4, 10)), box((20, 30, 1, 3), (0, 2, 0, 2))]):
        anomaly_map = np.where(mask, rng.uniform(0.6, 1.0, (SIZE, SIZE)), rng.uniform(0.0, 0.4, (SIZE, SIZE)))
        case.add(f"perfect/bad/{i}.png", "perfect", 1, 1.0 + i, anomaly_map, mask=mask)

    # "flat": the same constant map everywhere: every pixel ties, so the PRO curve is the
    # diagonal: pixel AUROC 0.5, AUPRO = (limit^2 / 2) / limit = limit / 2.
    for i, (label, score) in enumerate([(0, 0.0), (0, 1.0), (1, 1.0), (1, 1.0)]):
        case.add(f"flat/{i}.png", "flat", label, score, np.full((SIZE, SIZE), 3.0),
                 mask=box((5, 15, 5, 15)) if label else None)
    return case


def publish(folder: Location, table: str, schema: pa.Schema, rows: list[dict], parts: int = 2,
            lineage: dict | None = None, extra: dict | None = None) -> Location:
    """A dataset in `parts` Parquet parts (rows split in order), published through its manifest."""
    chunks = np.array_split(np.arange(len(rows)), parts)
    records = [datasets.write_part(folder, i, pa.Table.from_pylist([rows[j] for j in chunk], schema=schema))
               for i, chunk in enumerate(chunks)]
    datasets.publish(folder, name=folder.parent().name, version=folder.name, table=table, schema=schema,
                     parts=records, lineage=lineage or {}, extra=extra or {})
    return folder


def publish_case(root: str, case: Case, scores_lineage: bool = True) -> tuple[Location, Location]:
    base = Location.parse(root)
    images = publish(base.join("datasets", "toy", "1"), "images", IMAGES_SCHEMA, case.images)
    scores = publish(base.join("scores", "toy", "1"), "scores", SCORES_SCHEMA, case.scores, parts=3,
                     lineage={"input": images.uri} if scores_lineage else {},
                     extra={"model": MODEL, "errors": 2})
    return images, scores


def evaluate_spec(root: str, scores: str, **params) -> dict:
    return {"kind": "evaluate", "name": "evaluate-toy", "storage": {"root": root},
            "inputs": {"dataset": scores}, "fpr_limit": FPR_LIMIT, "anomalous_examples": 8,
            "normal_examples": 4, **params}


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------

def f1_max_reference(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1.max())


def aupro_reference(masks: np.ndarray, maps: np.ndarray, limit: float, pixel_weighted: bool = False) -> float:
    """Per-region overlap over FPR, at every distinct map value (threshold: `map >= t`), from
    (0, 0); integrated by trapezoids up to `limit` (the last segment cut there), over `limit`.
    `pixel_weighted`: all anomalous pixels as one region (a partial ROC area, for contrast)."""
    regions = []
    for mask, anomaly_map in zip(masks, maps):
        labelled = skimage.measure.label(mask, connectivity=2)  # 8-connected components
        regions += [np.sort(anomaly_map[labelled == r]) for r in range(1, labelled.max() + 1)]
    if pixel_weighted:
        regions = [np.sort(maps[masks])]
    normal = np.sort(maps[~masks])
    thresholds = np.unique(maps)[::-1]

    def at_or_above(sorted_values: np.ndarray) -> np.ndarray:
        return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="left")

    fpr = np.r_[0.0, at_or_above(normal) / normal.size]
    pro = np.r_[0.0, np.mean([at_or_above(r) / r.size for r in regions], axis=0)]
    area = 0.0
    for x0, y0, x1, y1 in zip(fpr[:-1], pro[:-1], fpr[1:], pro[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (limit - x0) / (x1 - x0) * (y1 - y0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def decoded_maps(case: Case, rows: list[dict]) -> np.ndarray:
    """The maps as the stage sees them: decoded from the 8-bit PNGs in the scores rows."""
    out = []
    for row in rows:
        decoded = decode_map(row["anomaly_map"], row["anomaly_map_min"], row["anomaly_map_max"])
        original = case.maps[row["image_id"]]
        step = max(float(original.max() - original.min()), 1e-12) / 255
        assert np.abs(decoded - original).max() <= step * 0.51 + 1e-5  # quantised, not garbled
        out.append(decoded)
    return np.stack(out)


def evaluated_rows(case: Case, category: str) -> list[dict]:
    return [r for r in case.scores if r["category"] == category and r["error"] is None
            and r["label"] is not None and r["score"] is not None]


# ---------------------------------------------------------------------------------------------
# The evaluated case (run once for the module)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, without_ray):
    root = f"file://{tmp_path_factory.mktemp('evaluate-root')}"
    case = build_case()
    images, scores = publish_case(root, case)
    lines: list[str] = []
    before = no_ray.entered
    outcome = orchestrator.run_job(parse_spec(evaluate_spec(root, scores.uri)), run_id="eval-1",
                                   echo=lines.append)
    assert no_ray.entered == before + 1
    result = outcome.results["evaluate-toy"]
    out = Location.parse(result.output)
    metrics = json.loads(Path(out.join("metrics.json").path).read_text())
    html = Path(out.join("report.html").path).read_text()
    return {"case": case, "images": images, "scores": scores, "result": result, "metrics": metrics,
            "html": html, "lines": lines, "out": out, "root": root}


@pytest.mark.parametrize("category", ["alpha", "beta", "perfect", "flat"])
def test_image_auroc_and_f1_max_match_sklearn_with_ties(evaluated, category):
    rows = evaluated_rows(evaluated["case"], category)
    labels = np.array([r["label"] for r in rows])
    scores = np.array([r["score"] for r in rows], np.float32).astype(np.float64)  # as stored
    assert len(np.unique(scores)) < len(scores) or category == "perfect"  # ties are exercised
    got = evaluated["metrics"]["per_category"][category]
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["image_f1_max"] == pytest.approx(f1_max_reference(labels, scores), abs=1e-12)
    assert got["images"] == len(rows) and got["anomalous"] == int(labels.sum())


def test_image_auroc_per_defect_type_matches_sklearn_on_each_type_against_all_normals(evaluated):
    rows = evaluated_rows(evaluated["case"], "alpha")
    got = evaluated["metrics"]["per_category"]["alpha"]["by_defect_type"]
    assert sorted(got) == ["scratch", "stain", "unknown"]
    for defect in got:
        chosen = [r for r in rows if r["label"] == 0 or (r["defect_type"] or "unknown") == defect]
        labels = [r["label"] for r in chosen]
        scores = np.array([r["score"] for r in chosen], np.float32).astype(np.float64)
        assert got[defect]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert got[defect]["anomalous"] == sum(labels) == 2
    assert any(line.strip().startswith("scratch") for line in evaluated["lines"])
    # A category whose anomalies carry no type at all: one "unknown" entry, not an error.
    assert list(evaluated["metrics"]["per_category"]["beta"]["by_defect_type"]) == ["unknown"]


def test_known_image_values():
    """Guards the references themselves on the hand-made "perfect" and "alpha" scores."""
    assert roc_auc_score([0, 0, 0, 1, 1], [0.0, 0.1, 0.2, 1.0, 2.0]) == 1.0
    # alpha: 8 normals, 6 anomalous; pairs (anomalous > normal) + half the ties, over 48
    normal = [0.1, 0.2, 0.2, 0.3, 0.5, 0.5, 0.7, 0.9]
    anomalous = [0.5, 0.5, 0.8, 0.9, 0.9, 1.2]
    pairs = sum((a > n) + 0.5 * (a == n) for a in anomalous for n in normal)
    assert roc_auc_score([0] * 8 + [1] * 6, normal + anomalous) == pytest.approx(pairs / 48)


def test_mean_is_over_the_categories_that_have_the_metric(evaluated):
    per_category, mean = evaluated["metrics"]["per_category"], evaluated["metrics"]["mean"]
    assert set(per_category) == {"alpha", "beta", "gamma", "perfect", "flat"}
    for name in ("image_auroc", "image_f1_max"):
        assert mean[name] == pytest.approx(np.mean([per_category[c][name] for c in
                                                    ("alpha", "beta", "perfect", "flat")]), abs=1e-12)
    for name in ("pixel_auroc", "aupro"):
        assert mean[name] == pytest.approx(np.mean([per_category[c][name] for c in
                                                    ("alpha", "perfect", "flat")]), abs=1e-12)


@pytest.mark.parametrize("category", ["alpha", "perfect", "flat"])
def test_pixel_auroc_matches_sklearn_on_the_decoded_maps(evaluated, category):
    case = evaluated["case"]
    rows = evaluated_rows(case, category)
    maps = decoded_maps(case, rows)
    masks = np.stack([case.masks.get(r["image_id"], np.zeros((SIZE, SIZE), bool)) for r in rows])
    got = evaluated["metrics"]["per_category"][category]["pixel_auroc"]
    assert got == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel().astype(np.float64)), abs=1e-12)


def test_aupro_matches_an_independent_implementation(evaluated):
    case = evaluated["case"]
    rows = evaluated_rows(case, "alpha")
    maps = decoded_maps(case, rows).astype(np.float64)
    masks = np.stack([case.masks.get(r["image_id"], np.zeros((SIZE, SIZE), bool)) for r in rows])
    expected = aupro_reference(masks, maps, FPR_LIMIT)
    assert 0.2 < expected < 0.95  # an informative case, neither trivial nor hopeless
    got = evaluated["metrics"]["per_category"]["alpha"]["aupro"]
    assert got == pytest.approx(expected, abs=1e-9)
    # The region weighting matters here: the pixel-weighted overlap would give another number.
    assert abs(aupro_reference(masks, maps, FPR_LIMIT, pixel_weighted=True) - expected) > 0.02


def test_aupro_known_values(evaluated):
    per_category = evaluated["metrics"]["per_category"]
    assert per_category["perfect"]["pixel_auroc"] == pytest.approx(1.0, abs=1e-12)
    assert per_category["perfect"]["aupro"] == pytest.approx(1.0, abs=1e-12)
    assert per_category["perfect"]["image_auroc"] == 1.0 and per_category["perfect"]["image_f1_max"] == 1.0
    assert per_category["flat"]["pixel_auroc"] == pytest.approx(0.5, abs=1e-12)
    assert per_category["flat"]["aupro"] == pytest.approx(FPR_LIMIT / 2, abs=1e-12)
    assert evaluated["metrics"]["fpr_limit"] == FPR_LIMIT
    # the reference agrees on the same hand-made cases
    flat = np.full((2, 8, 8), 3.0)
    flat_masks = np.zeros((2, 8, 8), bool)
    flat_masks[1, 2:5, 2:5] = True
    assert aupro_reference(flat_masks, flat, FPR_LIMIT) == pytest.approx(FPR_LIMIT / 2)
    assert aupro_reference(flat_masks, flat + flat_masks, FPR_LIMIT) == pytest.approx(1.0)


def test_a_category_without_masks_on_every_anomalous_row_has_no_pixel_metrics(evaluated):
    beta = evaluated["metrics"]["per_category"]["beta"]
    assert beta["pixel_auroc"] is None and beta["aupro"] is None
    assert beta["image_auroc"] is not None


def test_rows_with_errors_or_unknown_labels_are_left_out_and_counted(evaluated):
    metrics, case = evaluated["metrics"], evaluated["case"]
    assert metrics["excluded"] == {"errors": 2, "unknown_label": 1}
    alpha = metrics["per_category"]["alpha"]
    assert alpha["images"] == 14 and alpha["anomalous"] == 6  # not 17 / 7
    evaluated_count = sum(m["images"] for m in metrics["per_category"].values())
    assert evaluated_count == evaluated["result"].rows
    assert evaluated_count + 2 + 1 == len(case.scores)  # every row is evaluated or counted as left out
    assert "  left out: 2 rows with errors, 1 with unknown labels" in evaluated["result"].summary
    assert any(line.strip() == "left out: 2 rows with errors, 1 with unknown labels" for line in evaluated["lines"])
    html = evaluated["html"]
    assert "2 / 1" in html  # the report's "excluded (error / unknown label)" fact
    for image_id in ("alpha/unknown/maybe.png", "alpha/bad/unreadable.png", "alpha/unknown/broken.png"):
        assert image_id not in html  # not shown as an example either


def test_a_one_class_category_gets_null_metrics_and_says_so(evaluated):
    gamma = evaluated["metrics"]["per_category"]["gamma"]
    assert {name: gamma[name] for name in ("image_auroc", "image_f1_max", "pixel_auroc", "aupro")} == \
        dict.fromkeys(("image_auroc", "image_f1_max", "pixel_auroc", "aupro"))
    assert gamma["images"] == 3 and gamma["anomalous"] == 0  # why: no anomalous image
    line = next(line for line in evaluated["lines"] if line.strip().startswith("gamma "))
    assert line.split()[1:] == ["n/a"] * 4 + ["3"]
    assert re.search(r"<th>gamma</th>(<td class=\"number\">n/a</td>){4}</tr>", evaluated["html"])


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.references: list[str] = []
        self.imgs = 0

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.imgs += tag == "img"
        self.references += [value or "" for name, value in attrs if name in ("src", "href", "srcset", "data")]


def test_report_is_written_self_contained_and_the_summary_names_the_outputs(evaluated):
    html, out, lines = evaluated["html"], evaluated["out"], evaluated["lines"]
    assert evaluated["result"].output == out.uri
    assert out.uri == f"{evaluated['root']}/runs/eval-1/steps/evaluate-toy"
    parser = Links()
    parser.feed(html)
    assert not re.search(r"https?://", html, re.IGNORECASE)
    assert not {"script", "link", "iframe", "object"} & parser.tags
    assert parser.references and all(r.startswith("data:image/png;base64,") for r in parser.references)
    assert "url(" not in html and "@import" not in html
    # a histogram for each of the 5 categories, ROC for the 4 with both classes, PRO for the 3
    # with masks; 8 + 4 example overlays
    assert parser.imgs == 5 + 4 + 3 + 8 + 4
    assert "perfect/bad/1.png" in html  # the most anomalous image is among the examples
    summary = evaluated["result"].summary
    assert f"  report: {out.join('report.html').uri}" in summary
    assert f"  metrics: {out.join('metrics.json').uri}" in summary
    assert set(summary) <= {line[2:] for line in lines}  # and the run printed them
    assert Path(out.join("report.html").path).stat().st_size > 1000
    metrics = evaluated["metrics"]
    assert metrics["scores"] == evaluated["scores"].uri and metrics["images"] == evaluated["images"].uri
    assert metrics["model"] == MODEL and metrics["lineage"]["input"] == evaluated["scores"].uri


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def small_case(file_root):
    root = file_root
    case = Case()
    rng = np.random.default_rng(1)
    for i, label in enumerate([0, 0, 1, 1]):
        case.add(f"c/{i}.png", "c", label, float(i), rng.normal(0, 1, (SIZE, SIZE)),
                 mask=box((1, 4, 1, 4)) if label else None)
    images, scores = publish_case(root, case)
    return root, images, scores


def run_cli(tmp_path: Path, spec: dict) -> int:
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(spec))
    sigterm = signal.getsignal(signal.SIGTERM)  # `adpipe run` installs its own
    try:
        return cli.main(["run", str(path)])
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def test_a_missing_scores_dataset_exits_2_naming_it(tmp_path, small_case, capsys):
    root, _, _ = small_case
    missing = f"{root}/scores/toy/does-not-exist"
    assert run_cli(tmp_path, evaluate_spec(root, missing)) == 2
    err = capsys.readouterr().err
    assert missing in err and "_manifest.json is missing" in err and "Traceback" not in err
    with pytest.raises(InputError, match=re.escape(missing)):
        orchestrator.run_job(parse_spec(evaluate_spec(root, missing)), echo=quiet)


def test_an_images_dataset_given_as_scores_is_refused_clearly(tmp_path, small_case, capsys):
    root, images, _ = small_case
    with pytest.raises(InputError, match=re.escape(f"{images.uri} holds a 'images' table; a 'scores' dataset")):
        orchestrator.run_job(parse_spec(evaluate_spec(root, images.uri)), echo=quiet)
    assert run_cli(tmp_path, evaluate_spec(root, images.uri)) == 2
    assert "'scores' dataset is needed" in capsys.readouterr().err


def test_scores_that_do_not_name_their_images_need_images_dataset(file_root):
    root = file_root
    case = Case()
    for i, label in enumerate([0, 1]):
        case.add(f"c/{i}.png", "c", label, float(i), None)
    images, scores = publish_case(root, case, scores_lineage=False)
    with pytest.raises(InputError, match="does not say which images it scored; set images.dataset"):
        orchestrator.run_job(parse_spec(evaluate_spec(root, scores.uri)), echo=quiet)
    done = orchestrator.run_job(parse_spec(evaluate_spec(root, scores.uri, images={"dataset": images.uri})),
                                echo=quiet).results["evaluate-toy"]
    assert done.details["per_category"]["c"]["image_auroc"] == 1.0
    assert done.details["per_category"]["c"]["pixel_auroc"] is None  # no maps


def test_a_scores_dataset_given_as_images_is_refused_clearly(small_case):
    """`images:` pointing at a non-images dataset (here the scores themselves)."""
    root, _, scores = small_case
    spec = evaluate_spec(root, scores.uri, images={"dataset": scores.uri})
    with pytest.raises(InputError, match=re.escape(scores.uri)):
        orchestrator.run_job(parse_spec(spec), echo=quiet)


def test_examples_stay_in_their_section_when_an_image_is_missing(file_root):
    """An anomalous example whose image is not in the images dataset (e.g. `images:` names another
    version) must not let a normal image slide into "Most anomalous images"."""
    root = file_root
    case = Case()
    rng = np.random.default_rng(2)
    case.add("c/normal-0.png", "c", 0, 0.0, rng.normal(0, 1, (SIZE, SIZE)))
    case.add("c/normal-1.png", "c", 0, 0.1, rng.normal(0, 1, (SIZE, SIZE)))
    case.add("c/anomalous-gone.png", "c", 1, 0.9, rng.normal(0, 1, (SIZE, SIZE)), in_images=False)
    case.add("c/anomalous-1.png", "c", 1, 0.8, rng.normal(0, 1, (SIZE, SIZE)))
    _, scores = publish_case(root, case)
    spec = evaluate_spec(root, scores.uri, anomalous_examples=2, normal_examples=2)
    result = orchestrator.run_job(parse_spec(spec), echo=quiet).results["evaluate-toy"]
    html = Path(Location.parse(result.output).join("report.html").path).read_text()
    anomalous_part, normal_part = html.split("<h2>Sample of normal images</h2>")
    anomalous_part = anomalous_part.split("<h2>Most anomalous images</h2>")[1]
    assert re.findall(r"<figcaption>([^<]*)<br>", anomalous_part) == ["c/anomalous-1.png"]
    assert sorted(re.findall(r"<figcaption>([^<]*)<br>", normal_part)) == ["c/normal-0.png", "c/normal-1.png"]
