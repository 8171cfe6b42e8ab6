"""Every score belongs to its image, whatever the part sizes, batch size, actors and Ray's batching.

A scorer once keyed its fixed-geometry batches by a row's position in its own part only, so two
small parts in one Ray batch wrote the same slot and pairs of images came back with one score
between them. These tests score one archive of many part sizes (1, 3, 4, 7, 8, 256 rows, two
categories interleaved) under many geometries and compare every image's score with the score of
that image scored alone.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from imagefiles import encode, publish_archive
from pipelines import datasets
from pipelines.data.preprocess import decode_rgb
from pipelines.models.artifacts import TrainedModels
from pipelines.models.inference import score_in_slots
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

pytestmark = pytest.mark.integration
PART_SIZES = (1, 3, 4, 7, 8, 256, 1)
IMAGE_SIZE = 64
# Scores of one image computed in different slots / batches agree to float rounding only.
RTOL = 2e-5


def quiet(*_args, **_kwargs) -> None:
    pass


def cell(seed: int, category: str, defect: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    period = 8 if category == "a" else 6
    base = np.indices((72, 72)).sum(0) % period * (256 // period) + rng.normal(0, 6, (72, 72))
    if defect:
        top, left = rng.integers(8, 48, 2)
        base[top:top + 14, left:left + 14] = 250
    return encode(Image.fromarray(base.clip(0, 255).astype(np.uint8), "L"))


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    root = f"file://{tmp_path_factory.mktemp('geometry')}"
    train = [(f"train/{c}{i}.png", cell(i, c), c, "train", 0) for c in "ab" for i in range(16)]
    images = publish_archive(Location.parse(root).join("datasets", "train", "1"), [train])
    spec = parse_spec({"kind": "train", "name": "fit", "storage": {"root": root}, "method": "padim",
                       "inputs": {"dataset": images.uri}, "outputs": {"model": "padim-geo"},
                       "padim": {"backbone": "efficientnet_lite0", "stages": [1, 2], "kept_channels": 16,
                                 "image_size": IMAGE_SIZE, "seed": 0},
                       "resources": {"workers": 1, "batch_size": 8}})
    model = run_job(spec, echo=quiet).results["fit"].output
    parts, index = [], 0
    for size in PART_SIZES:
        part = []
        for _ in range(size):
            category = "ab"[index % 2]
            part.append((f"img/{index:04d}.png", cell(1000 + index, category, defect=index % 5 == 0), category,
                         "test", int(index % 5 == 0)))
            index += 1
        parts.append(part)
    archive = publish_archive(Location.parse(root).join("datasets", "archive", "1"), parts)
    table = datasets.read_table(archive)
    detector = TrainedModels.load(Location.parse(model))
    alone = {}
    for image_id, data, category in zip(*(table[c].to_pylist() for c in ("image_id", "image", "category"))):
        pixels = decode_rgb(data, IMAGE_SIZE)[None]
        alone[image_id] = float(score_in_slots(detector.models[detector.key_for(category)], pixels, [0], 1)[0][0])
    return root, model, archive, table, alone


def score(root: str, archive: Location, model: str, batch_size: int, workers: int, run_id: str) -> pa.Table:
    spec = parse_spec({"kind": "score", "name": "score-geo", "storage": {"root": root},
                       "inputs": {"dataset": archive.uri}, "model": {"uri": model},
                       "resources": {"workers": workers, "cpus_per_worker": 0.5, "batch_size": batch_size}})
    output = run_job(spec, run_id=run_id, echo=quiet).results["score-geo"].output
    return datasets.read_table(Location.parse(output), columns=["image_id", "category", "score", "error"])


def check_scores_belong_to_their_images(scores: dict[str, float], alone: dict[str, float]) -> None:
    assert set(scores) == set(alone)
    wrong = {i: (scores[i], alone[i]) for i in alone if not np.isclose(scores[i], alone[i], rtol=RTOL, atol=0)}
    assert not wrong, f"{len(wrong)} images carry another score than their own, e.g. {list(wrong.items())[:3]}"
    values = np.array(list(scores.values()))
    assert len(np.unique(values)) == len(values), "two different images share one score"


@pytest.mark.parametrize("batch_size", [1, 8])  # parts of 1-7 rows are smaller than 8, that of 256 larger
def test_scores_match_each_image_scored_alone_under_any_rebatching(setup, batch_size):
    """The scorer's compute, fed the rows the way Ray Data may group them: across part boundaries,
    in chunks of any size, in any order. Byte-identical whatever the chunking."""
    from pipelines.models.methods import find_method
    from pipelines.stages.image_batches import decode_parts, select_rows
    from pipelines.stages.score import Scorer

    root, model, archive, table, alone = setup
    manifest = datasets.read_manifest(archive)
    selections, _ = select_rows(archive, manifest, lambda t: np.ones(t.num_rows, bool))
    decoded = [decode_parts({"part": np.array([s.part]), "rows": [list(s.rows)]}, image_size=IMAGE_SIZE,
                            max_pixels=10**7, locations={s.part: s.location}) for s in selections]
    stream = {k: np.concatenate([d[k] for d in decoded]) for k in decoded[0]}
    scorer = Scorer(Location.parse(model), find_method("padim"), batch_size, anomaly_maps=False, threads=1)
    results = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        order = np.arange(len(stream["image_id"])) if seed == 0 else rng.permutation(len(stream["image_id"]))
        cuts = np.sort(rng.choice(np.arange(1, len(order)), size=rng.integers(5, 40), replace=False))
        by_image: dict[str, float] = {}
        for chunk in np.split(order, cuts):
            out = scorer({k: v[chunk] for k, v in stream.items()})
            by_image.update(zip(out["image_id"], out["score"].tolist()))
        check_scores_belong_to_their_images(by_image, alone)
        results.append(np.array([by_image[i] for i in sorted(by_image)], np.float32).tobytes())
    assert results[0] == results[1]


# B = 1 is the scorer's compute above; the job adds Ray's batching over two actors and a rerun.
@pytest.mark.parametrize("batch_size,workers", [(8, 2)])
def test_score_job_scores_belong_to_their_images_and_reruns_are_byte_identical(setup, batch_size, workers):
    root, model, archive, _, alone = setup
    table = score(root, archive, model, batch_size, workers, f"geo-{batch_size}-{workers}")
    assert table.num_rows == sum(PART_SIZES) and table["error"].null_count == table.num_rows
    check_scores_belong_to_their_images(dict(zip(table["image_id"].to_pylist(), table["score"].to_pylist())), alone)
    if workers > 1:  # two actors share the parts in whatever order Ray schedules them
        again = score(root, archive, model, batch_size, workers, f"geo-{batch_size}-{workers}-again")
        assert table["image_id"].equals(again["image_id"])
        assert table["score"].to_numpy().tobytes() == again["score"].to_numpy().tobytes()


def test_two_images_in_one_slot_are_refused():
    """The compute refuses what would make two images share a slot, instead of scoring one twice."""
    pixels = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="share a"):
        score_in_slots(lambda batch: None, pixels, [0, 0], 4, parts=[3, 3])
