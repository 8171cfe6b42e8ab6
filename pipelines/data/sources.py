"""Where images come from: listings of the three source layouts, as rows-to-be (no pixels read).

Each lister walks a `Location` (local or S3) and returns `SourceItem`s in a deterministic order,
so that ingest can cut them into parts whose names depend only on the input.

- MVTec AD layout: `<cat>/train/good/*`, `<cat>/test/<defect>/*`, `<cat>/ground_truth/<defect>/<stem>_mask.png`.
- A flat folder or prefix of images, optionally hive-partitioned (`date=2026-11-21/...`): unlabelled.
- ELPV (PyPI `elpv-dataset`): `labels.csv` + `images/`; defect probability 0 is normal, 1.0 is
  defective; 1/3 and 2/3 are kept with an unknown label (never rounded into a class).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipelines.errors import InputError
from pipelines.storage import Location

HIVE_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^/]*$")


@dataclass(frozen=True)
class SourceItem:
    image_id: str
    location: Location
    category: str | None
    split: str
    label: int | None
    defect_type: str | None = None
    mask: Location | None = None
    mask_expected: bool = False
    partition: str | None = None
    defect_probability: float | None = None
    refusal: str | None = None  # why the file is not read (it becomes a rejected row, with this reason)


def refuse_links_outside(root: Location, items: list[SourceItem], follow_symlinks: bool) -> list[SourceItem]:
    """Mark local files that resolve outside `root` (through a symlink) as refused, unless the spec
    allows following symlinks. Listing follows links, so without this a link in an ingested folder
    would pull in any file the job can read. Object stores have no links."""
    if root.scheme != "file" or follow_symlinks:
        return items
    base = os.path.realpath(root.path)

    def outside(location: Location) -> str | None:
        target = os.path.realpath(location.path)
        return target if os.path.commonpath([base, target]) != base else None

    out = []
    for item in items:
        target = outside(item.location)
        if target is not None:
            item = dataclasses.replace(item, refusal=f"a symlink to {target}, outside the source folder "
                                                     "(set source.follow_symlinks: true to ingest it)")
        elif item.mask is not None and outside(item.mask) is not None:
            item = dataclasses.replace(item, mask=None)  # counted as a missing mask
        out.append(item)
    return out


def _relative(base: Location, item: Location) -> str:
    return posixpath.relpath(item.uri, base.uri)


def list_mvtec(root: Location, categories: tuple[str, ...] | None = None) -> list[SourceItem]:
    files = root.list_files(recursive=True)
    if not files:
        raise InputError(f"no files under {root.describe()}: expected an MVTec-style tree <category>/train/good/...")
    by_relative = {_relative(root, f): f for f in files}
    found_categories = sorted({rel.split("/")[0] for rel in by_relative
                               if rel.count("/") >= 3 and rel.split("/")[1] in ("train", "test")})
    if not found_categories:
        raise InputError(f"{root.describe()} has no <category>/train/<class>/ or <category>/test/<class>/ folders")
    if categories:
        missing = sorted(set(categories) - set(found_categories))
        if missing:
            raise InputError(f"categories {missing} not found under {root.describe()}; found {found_categories}")
        found_categories = [c for c in found_categories if c in categories]
    items = []
    for rel, location in sorted(by_relative.items()):
        parts = rel.split("/")
        if len(parts) != 4 or parts[0] not in found_categories or parts[1] not in ("train", "test"):
            continue  # ground_truth/, licence and readme files are not image inputs
        category, split, image_class, filename = parts
        normal = image_class == "good"
        mask = None
        if not normal:
            stem = posixpath.splitext(filename)[0]
            mask = by_relative.get(f"{category}/ground_truth/{image_class}/{stem}_mask.png")
        items.append(SourceItem(
            image_id=rel, location=location, category=category, split=split,
            label=0 if normal else 1, defect_type=None if normal else image_class,
            mask=mask, mask_expected=not normal and split == "test",
        ))
    return items


def list_folder(root: Location, category: str | None, split: str) -> list[SourceItem]:
    files = root.list_files(recursive=True)
    if not files:
        raise InputError(f"no files under {root.describe()}")
    items = []
    for location in files:
        rel = _relative(root, location)
        partition = "/".join(seg for seg in rel.split("/")[:-1] if HIVE_SEGMENT.match(seg)) or None
        items.append(SourceItem(image_id=rel, location=location, category=category, split=split,
                                label=None, partition=partition))
    return items


def list_day_partition(archive: Location, day: str, category: str | None) -> tuple[list[SourceItem], str]:
    """The files of one day partition, `archive/date=<day>/...` (any depth below it), as unlabelled
    test items whose image_id is relative to the archive root (unique across days), and a
    fingerprint of the listing (names and sizes): a partition whose files changed is ingested again.
    No files (or no such prefix): no items."""
    partition = f"date={day}"
    listed = archive.join(partition).list_file_sizes(recursive=True)
    items = []
    for location, _ in listed:
        rel = _relative(archive, location)
        hive = "/".join(seg for seg in rel.split("/")[:-1] if HIVE_SEGMENT.match(seg))
        items.append(SourceItem(image_id=rel, location=location, category=category, split="test", label=None,
                                partition=hive or partition))
    digest = hashlib.sha256("\n".join(f"{_relative(archive, loc)}\t{size}" for loc, size in listed).encode())
    return items, digest.hexdigest()[:16]


def elpv_package_root() -> Location:
    try:
        folder = resources.files("elpv_dataset") / "data"
    except ModuleNotFoundError:
        raise InputError("the ELPV dataset is not installed: pip install elpv-dataset") from None
    return Location.parse(str(folder))


def elpv_labels(root: Location) -> list[tuple[str, float, str]]:
    """(relative image path, defect probability, cell type) per line of ELPV's labels.csv."""
    text = root.join("labels.csv").read_bytes().decode()
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise InputError(f"{root.join('labels.csv').uri} line {number}: expected 'path probability type'")
        path, probability, cell_type = fields
        rows.append((path, float(probability), cell_type))
    return rows


def _seeded_order(image_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def list_elpv(root: Location | None, categories: tuple[str, ...] | None,
              normal_train_fraction: float, split_seed: int) -> list[SourceItem]:
    """ELPV cells; the normal cells of each type are split train/test by a seeded, stable order."""
    root = root or elpv_package_root()
    labels = elpv_labels(root)
    known = sorted({cell_type for _, _, cell_type in labels})
    if categories:
        missing = sorted(set(categories) - set(known))
        if missing:
            raise InputError(f"ELPV has no cell type {missing}; it has {known}")
        labels = [row for row in labels if row[2] in categories]
    train_ids: set[str] = set()
    for cell_type in known:
        normals = sorted((path for path, p, t in labels if t == cell_type and p == 0.0),
                         key=lambda path: _seeded_order(path, split_seed))
        train_ids.update(normals[: round(normal_train_fraction * len(normals))])
    items = []
    for path, probability, cell_type in labels:
        if probability == 0.0:
            label, defect_type = 0, None
        elif probability == 1.0:
            label, defect_type = 1, "defective"
        else:
            label, defect_type = None, None  # 1/3, 2/3: uncertain annotation, kept as unknown
        items.append(SourceItem(
            image_id=path, location=root.join(path), category=cell_type,
            split="train" if path in train_ids else "test", label=label, defect_type=defect_type,
            defect_probability=probability,
        ))
    return items


# Texture-like images that scikit-image ships inside its wheel (no download): a small, real texture
# set for synthesizing anomalies offline. Others of its bundled images can be named too.
SKIMAGE_TEXTURES = ("brick", "grass", "gravel", "moon", "coffee", "hubble_deep_field", "rocket")


def list_skimage(names: tuple[str, ...] | None) -> list[SourceItem]:
    """Images bundled with scikit-image, by name (unlabelled: label null, split train)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    available = {p.stem: p for p in folder.iterdir() if p.suffix in (".png", ".jpg")}
    names = names or SKIMAGE_TEXTURES
    missing = sorted(set(names) - set(available))
    if missing:
        raise InputError(f"scikit-image does not bundle {missing}; it has {sorted(available)}")
    return [SourceItem(image_id=f"skimage/{available[name].name}",
                       location=Location.parse(f"file://{available[name]}"), category="texture",
                       split="train", label=None) for name in names]
