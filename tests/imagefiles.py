"""Image files for tests: real encoders (PIL), plus deliberately broken bytes."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def gradient(size: tuple[int, int] = (40, 32), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    return np.clip(base + rng.normal(0, 10, (height, width)), 0, 255).astype(np.uint8)


def png(mode: str = "RGB", size: tuple[int, int] = (40, 32), seed: int = 0) -> bytes:
    gray = gradient(size, seed)
    if mode == "L":
        return encode(Image.fromarray(gray, "L"))
    if mode == "RGB":
        return encode(Image.fromarray(np.stack([gray, gray[::-1], 255 - gray], -1), "RGB"))
    if mode == "RGBA":
        return encode(Image.fromarray(np.stack([gray, gray, gray, np.full_like(gray, 200)], -1), "RGBA"))
    if mode == "I;16":
        return encode(Image.fromarray(gray.astype(np.uint16) * 257))
    raise ValueError(mode)


def jpeg(size: tuple[int, int] = (40, 32), seed: int = 0) -> bytes:
    return encode(Image.fromarray(gradient(size, seed), "L").convert("RGB"), "JPEG")


def mask_png(size: tuple[int, int] = (40, 32)) -> bytes:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[5:15, 5:20] = 255
    return encode(Image.fromarray(mask, "L"))


def truncated_png() -> bytes:
    data = png("RGB", (64, 64), seed=3)
    return data[: len(data) // 2]


def corrupt_png() -> bytes:
    data = bytearray(png("RGB", (64, 64), seed=4))
    data[60:200] = bytes(140)  # zero the compressed pixel stream: header valid, data broken
    return bytes(data)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def archive_table(entries: list[tuple[str, bytes, str, str, int | None]]):
    """Images-table rows from (image_id, bytes, category, split, label), as another system would
    write them: the schema only, no ingest-time checks (width/height unknown: 0)."""
    import pyarrow as pa

    from pipelines.tables import IMAGES_SCHEMA

    return pa.Table.from_pylist([{"image_id": i, "image": d, "category": c, "split": s, "label": label,
                                  "width": 0, "height": 0, "source_uri": f"test://{i}"}
                                 for i, d, c, s, label in entries], schema=IMAGES_SCHEMA)


def publish_archive(folder, parts: list[list[tuple[str, bytes, str, str, int | None]]]):
    """An images dataset of these parts at `folder` (a Location), published through a manifest."""
    from pipelines import datasets
    from pipelines.tables import IMAGES_SCHEMA

    records = [datasets.write_part(folder, i, archive_table(part)) for i, part in enumerate(parts)]
    datasets.publish(folder, name=folder.parent().name, version=folder.name, table="images",
                     schema=IMAGES_SCHEMA, parts=records, lineage={})
    return folder


def small_elpv(folder: Path, normals: int = 40, defects: int = 10) -> str:
    """An ELPV-layout folder of real cells (from the elpv-dataset package): the first `normals`
    normal and `defects` defective monocrystalline ones."""
    from pipelines.data.sources import elpv_labels, elpv_package_root

    root = elpv_package_root()
    labels = [row for row in elpv_labels(root) if row[2] == "mono"]
    chosen = [r for r in labels if r[1] == 0.0][:normals] + [r for r in labels if r[1] == 1.0][:defects]
    (folder / "images").mkdir(parents=True)
    for path, _, _ in chosen:
        shutil.copyfile(root.join(path).path, folder / path)
    (folder / "labels.csv").write_text("".join(f"{p} {q} {t}\n" for p, q, t in chosen))
    return str(folder)
