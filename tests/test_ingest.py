"""Ingest on real Ray: MVTec tree, flat/partitioned folder on S3, and the real ELPV dataset."""

from __future__ import annotations

import collections

import pyarrow.parquet as pq
import pytest

from imagefiles import corrupt_png, jpeg, mask_png, png, truncated_png, write
from pipelines import datasets
from pipelines.data.sources import list_elpv, list_folder, list_mvtec
from pipelines.errors import InputError
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

pytestmark = pytest.mark.integration


def ingest_spec(root: str, source: dict, rows_per_part: int = 4, dataset: str = "images") -> dict:
    return {"kind": "ingest", "name": "ingest-test", "storage": {"root": root}, "source": source,
            "outputs": {"dataset": dataset, "rows_per_part": rows_per_part}, "resources": {"workers": 2}}


def quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture
def mvtec_tree(tmp_path):
    root = tmp_path / "mvtec"
    for category, mode in (("bottle", "RGB"), ("tile", "L")):
        for i in range(3):
            write(root / category / "train" / "good" / f"{i:03d}.png", png(mode, seed=i))
        write(root / category / "test" / "good" / "000.png", png(mode, seed=10))
        for i in range(2):
            write(root / category / "test" / "crack" / f"{i:03d}.png", png(mode, seed=20 + i))
        write(root / category / "ground_truth" / "crack" / "000_mask.png", mask_png())
        # crack/001 has no mask: kept, counted as missing
    # the odd ones, each in an image folder:
    write(root / "bottle" / "train" / "good" / "100_rgba.png", png("RGBA", seed=5))
    write(root / "bottle" / "train" / "good" / "101_16bit.png", png("I;16", seed=6))
    write(root / "bottle" / "train" / "good" / "102.jpg", jpeg())
    write(root / "bottle" / "test" / "crack" / "900_truncated.png", truncated_png())
    write(root / "bottle" / "test" / "crack" / "901_corrupt.png", corrupt_png())
    write(root / "tile" / "train" / "good" / "902_empty.png", b"")
    write(root / "tile" / "train" / "good" / "903_notes.txt", b"not an image")
    write(root / "license.txt", b"CC BY-NC-SA")  # outside the image folders: not an input
    return root


def test_mvtec_listing_is_deterministic_and_labelled(mvtec_tree):
    items = list_mvtec(Location.parse(str(mvtec_tree)))
    assert items == list_mvtec(Location.parse(str(mvtec_tree)))
    by_id = {i.image_id: i for i in items}
    assert len(items) == 2 * 6 + 7
    crack = by_id["bottle/test/crack/000.png"]
    assert (crack.label, crack.defect_type, crack.split) == (1, "crack", "test")
    assert crack.mask.uri.endswith("bottle/ground_truth/crack/000_mask.png")
    assert by_id["bottle/test/crack/001.png"].mask is None
    assert by_id["tile/train/good/000.png"].label == 0
    with pytest.raises(InputError, match="not found"):
        list_mvtec(Location.parse(str(mvtec_tree)), ("carpet",))


def test_ingest_mvtec_reports_bad_files_and_keeps_every_good_one(ray_session, mvtec_tree, file_root):
    spec = parse_spec(ingest_spec(file_root, {"type": "mvtec", "uri": f"file://{mvtec_tree}"}))
    outcome = run_job(spec, echo=quiet)
    result = outcome.results["ingest-test"]
    folder = Location.parse(result.output)
    table = datasets.read_table(folder)
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 15  # 12 regular + RGBA + 16-bit + JPEG
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert rows["bottle/train/good/100_rgba.png"]["color_mode"] == "RGBA"
    assert rows["bottle/train/good/101_16bit.png"]["color_mode"] in ("I;16", "I")
    assert rows["tile/train/good/000.png"]["color_mode"] == "L"
    assert rows["bottle/train/good/102.jpg"]["image"] == (mvtec_tree / "bottle/train/good/102.jpg").read_bytes()
    assert rows["bottle/test/crack/000.png"]["mask"] == mask_png()
    assert rows["bottle/test/crack/001.png"]["mask"] is None
    assert (rows["bottle/test/crack/000.png"]["width"], rows["bottle/test/crack/000.png"]["height"]) == (40, 32)

    rejected = pq.read_table(folder.join("rejected.parquet").path).to_pylist()
    reasons = {r["image_id"]: r["reason"] for r in rejected}
    assert set(reasons) == {"bottle/test/crack/900_truncated.png", "bottle/test/crack/901_corrupt.png",
                            "tile/train/good/902_empty.png", "tile/train/good/903_notes.txt"}
    assert "truncated" in reasons["bottle/test/crack/900_truncated.png"]
    assert reasons["tile/train/good/902_empty.png"] == "empty file"
    assert "not an image" in reasons["tile/train/good/903_notes.txt"]
    assert all(r["source_uri"].startswith("file://") for r in rejected)

    manifest = datasets.read_manifest(folder)
    assert manifest.extra["rejected"]["rows"] == 4 and manifest.extra["missing_masks"] == 2
    assert manifest.extra["source_files"] == 19
    status = Location.parse(outcome.record_uri).join("status.json").read_json()
    step = status["steps"]["ingest-test"]
    assert status["state"] == "succeeded" and step["rows"] == 15 and step["rejected"] == 4
    assert step["details"]["missing_masks"] == 2


def test_ingest_partitioned_folder_from_s3_to_s3(ray_session, s3_root):
    source = Location.parse(f"{s3_root}/archive")
    originals = {}
    for day in ("2026-11-20", "2026-11-21"):
        for i in range(3):
            data = png("RGB", seed=hash((day, i)) % 1000)
            source.join(f"date={day}", f"cam{i}.png").write_bytes(data)
            originals[f"date={day}/cam{i}.png"] = data
    source.join("date=2026-11-21", "broken.png").write_bytes(truncated_png())
    spec = parse_spec(ingest_spec(s3_root, {"type": "folder", "uri": source.uri, "category": "line-7"},
                                  rows_per_part=2))
    result = run_job(spec, echo=quiet).results["ingest-test"]
    assert result.rows == 6 and result.rejected == 1
    table = datasets.read_table(Location.parse(result.output))
    for row in table.to_pylist():
        assert row["image"] == originals[row["image_id"]]
        assert row["partition"] == row["image_id"].split("/")[0]
        assert (row["category"], row["split"], row["label"]) == ("line-7", "test", None)


def test_folder_listing_without_partitions(tmp_path):
    write(tmp_path / "a.png", png())
    write(tmp_path / "sub" / "b.png", png())
    items = list_folder(Location.parse(str(tmp_path)), None, "test")
    assert [(i.image_id, i.partition) for i in items] == [("a.png", None), ("sub/b.png", None)]
    with pytest.raises(InputError, match="no files"):
        list_folder(Location.parse(str(tmp_path / "empty")), None, "test")


def test_elpv_split_is_exact_seeded_and_keeps_uncertain_cells():
    items = list_elpv(None, None, 0.6, split_seed=0)
    assert len(items) == 2624
    counts = collections.Counter((i.category, i.defect_probability) for i in items)
    assert counts[("mono", 0.0)] == 588 and counts[("poly", 0.0)] == 920
    assert counts[("mono", 1.0)] == 313 and counts[("poly", 1.0)] == 402
    for cell_type, normals in (("mono", 588), ("poly", 920)):
        train = [i for i in items if i.category == cell_type and i.split == "train"]
        assert len(train) == round(0.6 * normals) and all(i.label == 0 for i in train)
    uncertain = [i for i in items if i.defect_probability not in (0.0, 1.0)]
    assert uncertain and all(i.label is None and i.split == "test" for i in uncertain)
    assert {round(i.defect_probability, 2) for i in uncertain} == {0.33, 0.67}
    other_seed = {i.image_id for i in list_elpv(None, None, 0.6, split_seed=1) if i.split == "train"}
    assert other_seed != {i.image_id for i in items if i.split == "train"}


def test_ingest_elpv_to_s3_readable_with_plain_pyarrow(ray_session, s3_root):
    spec = parse_spec(ingest_spec(s3_root, {"type": "elpv"}, rows_per_part=512, dataset="elpv"))
    result = run_job(spec, echo=quiet).results["ingest-test"]
    assert result.rows == 2624 and result.rejected == 0
    folder = Location.parse(result.output)
    manifest = folder.join("_manifest.json").read_json()
    paths = [f"{folder.path}/{p['path']}" for p in manifest["parts"]]
    table = pq.read_table(paths, filesystem=folder.fs, columns=["image_id", "label", "category", "width"])
    assert table.num_rows == 2624 and set(table.column("width").to_pylist()) == {300}
    labels = collections.Counter(table.column("label").to_pylist())
    assert labels == {0: 1508, 1: 715, None: 401}


def test_symlinks_out_of_the_source_folder_are_rejected_unless_allowed(ray_session, tmp_path, file_root):
    source, outside = tmp_path / "line", tmp_path / "elsewhere"
    write(source / "a.png", png(seed=1))
    write(outside / "private.png", png(seed=2))
    write(source / "inside-target.png", png(seed=3))
    (source / "leak.png").symlink_to(outside / "private.png")
    (source / "sub").symlink_to(outside)  # a linked folder: listing walks into it
    (source / "alias.png").symlink_to(source / "inside-target.png")  # stays inside: fine
    spec = ingest_spec(file_root, {"type": "folder", "uri": str(source)})
    result = run_job(parse_spec(spec), echo=quiet).results["ingest-test"]
    folder = Location.parse(result.output)
    ids = set(datasets.read_table(folder, columns=["image_id"])["image_id"].to_pylist())
    assert ids == {"a.png", "inside-target.png", "alias.png"}
    rejected = pq.read_table(folder.join("rejected.parquet").path).to_pylist()
    assert {r["image_id"] for r in rejected} == {"leak.png", "sub/private.png"}
    assert all("outside the source folder" in r["reason"] and "follow_symlinks" in r["reason"] for r in rejected)

    spec["source"]["follow_symlinks"] = True
    spec["outputs"]["dataset"] = "followed"
    followed = run_job(parse_spec(spec), echo=quiet).results["ingest-test"]
    assert followed.rows == 5 and followed.rejected == 0
