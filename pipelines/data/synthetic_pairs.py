"""Training pairs from a `synthesize` output written with `include_normals` (pure numpy, no Ray).

RealNet-style detectors learn from a 50/50 mix of normal images and synthetic anomalies, and for
each anomaly they need the clean image it was made from (the reconstruction's target) and its mask
(the segmentation's). The synthesize stage writes every normal image and the anomalies made from
it into the same output part, so one decoded part holds whole families. Per epoch each normal
image is paired with one of its anomalies (chosen by a generator seeded by the epoch and the
image), so that every epoch is 50/50 whatever `per_image` was, and the rows are shuffled within
the part so that a batch mixes both kinds.
"""

from __future__ import annotations

import hashlib

import numpy as np

PAIR_COLUMNS = ("image_id", "category", "label", "pixels", "clean", "mask", "error")


def _rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"pairs:{seed}:{epoch}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def pair_rows(block: dict[str, np.ndarray], *, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """map_batches UDF over one part's decoded rows (`decoded_images(..., with_masks=True)`) ->
    rows with `pixels` (what the model sees), `clean` (the anomaly-free image) and `mask`.

    Undecodable rows pass with their `error` set (the trainer counts and skips them); so does an
    anomaly whose clean source image did not decode. A normal image without an anomaly in the
    part gives no row: the driver checks beforehand that every normal has one.
    """
    ids = [str(i) for i in block["image_id"]]
    errors = [str(e) for e in block["error"]]
    normals = {ids[i]: i for i in range(len(ids)) if block["label"][i] == 0 and not errors[i]}
    anomalies: dict[str, list[int]] = {}
    out: dict[str, list] = {k: [] for k in PAIR_COLUMNS}

    def emit(index: int, clean: int, error: str = "") -> None:
        out["image_id"].append(ids[index])
        out["category"].append(block["category"][index])
        out["label"].append(int(block["label"][index]))
        out["pixels"].append(block["pixels"][index])
        out["clean"].append(block["pixels"][clean])
        out["mask"].append(block["mask"][index])
        out["error"].append(error)

    for index, source in enumerate(str(s) for s in block["source_image_id"]):
        if errors[index]:
            emit(index, index, errors[index])
        elif block["label"][index] == 1:
            if source in normals:
                anomalies.setdefault(source, []).append(index)
            else:
                emit(index, index, f"the clean image it was made from ({source!r}) is missing or undecodable")
    for normal_id in sorted(set(normals) & set(anomalies)):
        index = normals[normal_id]
        choices = sorted(anomalies[normal_id], key=lambda i: ids[i])
        emit(index, index)
        emit(choices[int(_rng(seed, epoch, normal_id).integers(len(choices)))], index)
    order = _rng(seed, epoch, ",".join(sorted(ids))).permutation(len(out["image_id"]))
    size = block["pixels"].shape[1:3]
    return {
        "image_id": np.asarray(out["image_id"], object)[order],
        "category": np.asarray(out["category"], object)[order],
        "label": np.asarray(out["label"], np.int8)[order],
        "pixels": (np.stack(out["pixels"]) if out["pixels"] else np.zeros((0, *size, 3), np.uint8))[order],
        "clean": (np.stack(out["clean"]) if out["clean"] else np.zeros((0, *size, 3), np.uint8))[order],
        "mask": (np.stack(out["mask"]) if out["mask"] else np.zeros((0, *size), bool))[order],
        "error": np.asarray(out["error"], object)[order],
    }
