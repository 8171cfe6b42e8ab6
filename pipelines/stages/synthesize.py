"""`synthesize`: normal images -> synthetic anomalous images with masks and provenance.

Ray Data: one CPU decode task per input part (the normal training rows, resized to `image_size`)
-> a pool of synthesizer actors (each holds the texture images, and the DDPM for SDAS sources, GPU
when asked for) that make `per_image` anomalies per image with `pipelines.synthesis.recipe` ->
the driver writes output part N when input part N is complete (deterministic names; parts an
earlier attempt finished from the same input are kept). Rows are images-table rows (label 1, a PNG
mask, `defect_type` = the method, the `synthesis` struct); optionally the untouched normals too,
for a ready training mix. The step also writes a quality summary: counts per source, a histogram
of mask coverage and a contact sheet (image / mask / overlay) under `runs/<run>/steps/<step>/`.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipelines import datasets
from pipelines.data.preprocess import encode_png
from pipelines.data.sampling import in_fraction
from pipelines.errors import InputError
from pipelines.params.synthesize import SynthesizeParams
from pipelines.spec import StepSpec
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.stages.image_batches import (
    check_room_for_decoding,
    decoded_images,
    decoded_queue_bytes,
    null_if_nan,
    select_rows,
)
from pipelines.stages.parts import PartPlan, Workers, run_parts
from pipelines.storage import Location
from pipelines.tables import IMAGES_SCHEMA

MAX_TEXTURES = 256  # texture images an actor keeps in memory
MAX_DONORS = 64  # normal images an actor keeps as Poisson donors


class SynthesizeBatch:
    """Synthesizer actor: holds the textures and the SDAS model; makes anomalies for a batch."""

    def __init__(self, params: SynthesizeParams, textures: Location | None, sdas_model: Location | None,
                 sdas_record: Any, donors: list[tuple[Location, list[int]]] | None):
        from pipelines.synthesis.recipe import SourcePlan

        self.params = params
        self.plans = tuple(SourcePlan(s.type, s.weight, (s.opacity[0], s.opacity[1])) for s in params.sources)
        self.textures = _load_textures(textures, params.image_size) if textures is not None else None
        # Poisson donors: a fixed pool of normal images (the same on every actor), so that which
        # donor a row gets does not depend on how Ray Data happened to batch the rows.
        self.donors = _load_donors(donors, params.image_size) if donors else None
        self.sdas: tuple[Any, Any, Any, list[str]] | None = None
        if sdas_model is not None:
            import torch

            from pipelines.models.artifacts import ALL_CATEGORIES, ModelCard

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            card = ModelCard.read(sdas_model, sdas_record).require("generator", "the sdas source", capability="sdas")
            models = card.load(self.device)
            self.sdas = (card.record.load(), models.models[ALL_CATEGORIES], card.config,
                         card.info.get("class_names", []))

    def _sdas_samples(self, categories: np.ndarray, seeds: list[int]) -> tuple[np.ndarray, list[float]]:
        """One SDAS sample per row, with its own noise and strength drawn from the row's seed, so
        that a row's anomaly source does not depend on which rows Ray Data batched with it
        (RealNet draws one s per training batch; here a "batch" is an accident of scheduling)."""
        import torch

        spec = next(s for s in self.params.sources if s.type == "sdas")
        assert self.sdas is not None  # an sdas source comes with its model (the driver loads it)
        implementation, model, config, class_names = self.sdas
        low, high = spec.strength
        strengths = [float(np.random.default_rng([seed, 1]).uniform(low, high)) for seed in seeds]
        labels = None
        if config.num_classes:
            missing = sorted({c for c in categories if c not in class_names})
            if missing:
                raise InputError(f"the SDAS model has no classes {missing} (its classes: {class_names})")
            labels = torch.tensor([class_names.index(c) for c in categories], device=self.device)
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        images = implementation.sample(model, config, len(seeds), spec.steps, generators, class_labels=labels,
                                       variance_scale=strengths, device=self.device)
        return images, strengths

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.synthesis.recipe import choose_source, row_seed, synthesize_one

        params = self.params
        out: dict[str, list] = {k: [] for k in ("_part", "_row", "image_id", "category", "label", "image", "mask",
                                                "method", "opacity", "strength", "seed", "source_image_id",
                                                "coverage", "error")}
        jobs = []  # (index in batch, copy, plan, seed)
        for index, image_id in enumerate(batch["image_id"]):
            if batch["error"][index]:
                continue
            for copy in range(params.per_image):
                seed = row_seed(params.seed, str(image_id), copy)
                jobs.append((index, copy, choose_source(self.plans, np.random.default_rng(seed)), seed))
        sdas_jobs = [j for j in jobs if j[2].method == "sdas"]
        sdas_images: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
        if sdas_jobs:
            samples, strengths = self._sdas_samples(batch["category"][[j[0] for j in sdas_jobs]],
                                                    [j[3] for j in sdas_jobs])
            sdas_images = {(j[0], j[1]): (s, k) for j, s, k in zip(sdas_jobs, samples, strengths)}
        wanted = params.foreground
        for index, copy, plan, seed in jobs:
            foreground = None
            if wanted is not None and (wanted.categories is None or batch["category"][index] in wanted.categories):
                foreground = {"method": wanted.method, "invert": wanted.invert}
            donor = None
            if plan.method == "poisson":  # another normal image of the pool (chosen by the row's seed)
                assert self.donors is not None  # a poisson source comes with its donor pool
                ids, images = self.donors
                others = [i for i, donor_id in enumerate(ids) if donor_id != batch["image_id"][index]] or [0]
                donor = images[others[seed % len(others)]]
            sdas_sample, strength = sdas_images.get((index, copy), (None, None))
            result = synthesize_one(batch["pixels"][index], plan, seed, perlin=params.perlin,
                                    foreground=foreground, textures=self.textures,
                                    sdas_sample=sdas_sample, sdas_strength=strength, donor=donor)
            self._emit(out, batch, index, f"{batch['image_id'][index]}#synth-{copy}", 1, result.image,
                       result.mask, result.method, result.opacity, result.strength, seed, result.coverage)
        if params.include_normals:
            for index in range(len(batch["image_id"])):
                if not batch["error"][index]:
                    self._emit(out, batch, index, str(batch["image_id"][index]), 0, batch["pixels"][index],
                               None, None, None, None, None, 0.0)
        per_row = params.per_image + int(params.include_normals)
        for bad in np.flatnonzero([bool(e) for e in batch["error"]]):
            # As many rows as a good image gives (the driver counts rows per part), each with the reason.
            for _ in range(per_row):
                self._emit(out, batch, int(bad), str(batch["image_id"][bad]), None, None, None, None, None,
                           None, None, 0.0, error=str(batch["error"][index]))
        return {k: np.array(v, dtype=object) if k not in ("_part", "_row") else np.array(v, np.int64)
                for k, v in out.items()}

    @staticmethod
    def _emit(out, batch, index, image_id, label, pixels, mask, method, opacity, strength, seed, coverage,
              error: str = "") -> None:
        out["_part"].append(int(batch["_part"][index]))
        out["_row"].append(int(batch["_row"][index]))
        out["image_id"].append(image_id)
        out["category"].append(batch["category"][index])
        out["label"].append(label)
        out["image"].append(encode_png(pixels) if pixels is not None else b"")
        out["mask"].append(encode_png(mask.astype(np.uint8) * 255) if mask is not None else b"")
        out["method"].append(method or "")
        out["opacity"].append(opacity)
        out["strength"].append(strength)
        out["seed"].append(seed)
        out["source_image_id"].append(str(batch["image_id"][index]))
        out["coverage"].append(coverage)
        out["error"].append(error)



def _load_donors(parts: list[tuple[Location, list[int]]], size: int) -> tuple[list[str], list[np.ndarray]]:
    """The donor pool's image ids and decoded pixels."""
    import pyarrow.parquet as pq

    from pipelines.data.images import ImageDecodeError
    from pipelines.data.preprocess import decode_rgb

    ids, images = [], []
    for location, rows in parts:
        table = pq.read_table(location.path, filesystem=location.fs, columns=["image_id", "image"])
        for record in table.take(pa.array(rows, pa.int64())).to_pylist():
            try:
                images.append(decode_rgb(record["image"], size))
                ids.append(record["image_id"])
            except ImageDecodeError:
                continue
    if not images:
        raise InputError("no decodable normal images for the poisson source's donor pool")
    return ids, images


def _donor_pool(selections, count: int = MAX_DONORS) -> list[tuple[Location, list[int]]]:
    """The first `count` selected rows, in dataset order: the poisson source's donors."""
    pool, left = [], count
    for selection in selections:
        if left <= 0:
            break
        rows = list(selection.rows[:left])
        if rows:
            pool.append((selection.location, rows))
            left -= len(rows)
    return pool


def _load_textures(folder: Location, size: int) -> list[np.ndarray]:
    """Up to MAX_TEXTURES decodable images of a dataset, as RGB arrays (about the target size)."""
    from pipelines.data.images import ImageDecodeError
    from pipelines.data.preprocess import decode_rgb

    textures = []
    table = datasets.read_table(folder, columns=["image"])
    for data in table.column("image").to_pylist()[:MAX_TEXTURES]:
        try:
            textures.append(decode_rgb(data, size))
        except ImageDecodeError:
            continue
    if not textures:
        raise InputError(f"no decodable texture images in {folder.uri}")
    return textures


def _part_table(rows: list[dict[str, Any]], params: SynthesizeParams, model_version: str | None) -> pa.Table:
    rows = sorted(rows, key=lambda r: (r["_row"], r["label"] if r["label"] is not None else -1, r["image_id"]))
    size = params.image_size
    records = []
    for r in rows:
        if r["error"]:
            continue  # counted by the driver (the input row's error), not written as an image
        synthetic = r["label"] == 1
        records.append({
            "image_id": r["image_id"], "image": r["image"], "category": r["category"], "split": params.split,
            "label": int(r["label"]), "defect_type": r["method"] if synthetic else None,
            "mask": r["mask"] if synthetic else None, "width": size, "height": size, "color_mode": "RGB",
            "source_uri": None,
            "synthesis": {"method": r["method"], "strength": null_if_nan(r["strength"]),
                          "opacity": null_if_nan(r["opacity"]), "seed": r["seed"],
                          "source_image_id": r["source_image_id"], "prompt": None,
                          "model_version": model_version if r["method"] == "sdas" else None} if synthetic else None,
        })
    return pa.Table.from_pylist(records, schema=IMAGES_SCHEMA)


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: SynthesizeParams = step.params
    started = time.monotonic()
    folder_in = context.input_dataset(params.inputs)
    manifest = datasets.read_manifest(folder_in, table="images")
    texture_spec = next((s for s in params.sources if s.type == "texture"), None)
    sdas_spec = next((s for s in params.sources if s.type == "sdas"), None)
    textures = context.input_dataset(texture_spec.textures) if texture_spec else None
    if textures is not None:
        datasets.read_manifest(textures, table="images")  # fail fast on a missing texture dataset
    sdas_model, sdas_record, model_version = None, None, None
    if sdas_spec is not None:
        from pipelines.models.artifacts import ModelCard

        sdas_model = context.input_dataset(sdas_spec.model)
        card = ModelCard.read(sdas_model).require("generator", "the sdas source", capability="sdas")
        sdas_record, model_version = card.record, card.version
    check_room_for_decoding(params.resources.workers, params.resources.cpus_per_worker, "synthesizer worker")

    def normal_train(table: pa.Table) -> np.ndarray:
        mask = pc.and_(pc.equal(table["split"], "train"), pc.equal(table["label"], 0)).fill_null(False)
        if params.categories:
            mask = pc.and_(mask, pc.is_in(table["category"], pa.array(params.categories))).fill_null(False)
        chosen = mask.to_numpy(zero_copy_only=False)
        if params.sample_fraction < 1.0:
            chosen &= np.array([in_fraction("synthesize", params.seed, i, params.sample_fraction)
                                for i in table["image_id"].to_pylist()], bool)
        return chosen

    selections, chosen = select_rows(folder_in, manifest, normal_train)
    if not chosen.num_rows:
        raise InputError(f"{folder_in.uri} has no normal training images to synthesize from")
    folder = context.dataset_folder(params.outputs)
    spec_fingerprint = datasets.fingerprint([str(params), textures.uri if textures else None,
                                            sdas_model.uri if sdas_model else None])
    per_row = params.per_image + int(params.include_normals)
    plans = [PartPlan(s.part, datasets.fingerprint([s.location.uri, s.rows, spec_fingerprint]), len(s.rows) * per_row)
             for s in selections]
    by_part = {s.part: s for s in selections}
    context.log("synthesizing", images=chosen.num_rows, per_image=params.per_image,
                sources=[s.type for s in params.sources], parts=len(selections))
    failures: list[dict[str, Any]] = []

    def build(rows: list[dict[str, Any]]) -> pa.Table:
        failures.extend({"error": r["error"], "image_id": r["image_id"]} for r in rows if r["error"])
        return _part_table(rows, params, model_version)

    resources = params.resources
    outcome = run_parts(
        folder, plans, IMAGES_SCHEMA,
        source=lambda todo: decoded_images([by_part[p.part] for p in todo], params.image_size,
                                           params.max_image_pixels),
        workers=Workers(SynthesizeBatch, {
            "params": params, "textures": textures, "sdas_model": sdas_model, "sdas_record": sdas_record,
            "donors": _donor_pool(selections) if any(s.type == "poisson" for s in params.sources) else None},
            resources, resources.batch_size, decoded_queue_bytes(selections, params.image_size)),
        build_table=build)
    published = datasets.publish(folder, name=params.outputs.dataset, version=params.outputs.version or context.run_id,
                                 table="images", schema=IMAGES_SCHEMA, parts=outcome.records,
                                 lineage=context.lineage(input=folder_in.uri,
                                                         textures=textures.uri if textures else None,
                                                         sdas_model=sdas_model.uri if sdas_model else None))
    report_folder = context.root.join("runs", context.run_id, "steps", context.step.name)
    summary = _write_quality_summary(folder, report_folder)
    seconds = time.monotonic() - started
    failed = list({s["image_id"]: s for s in failures}.values())  # one per undecodable input image
    lines = [f"synthesized {summary['synthetic']} anomalies"
             + (f" + {summary['normal']} normals" if params.include_normals else "")
             + f" from {chosen.num_rows} normal images in {seconds:.1f} s -> {folder.uri}",
             "  per source: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["per_source"].items())),
             f"  mask coverage: median {summary['coverage_median']:.1%}, "
             f"5-95% {summary['coverage_p05']:.1%}-{summary['coverage_p95']:.1%}",
             f"  quality summary: {report_folder.join('synthesis_summary.json').uri} "
             "(+ contact_sheet.png, coverage.png)"]
    if failed:
        lines.append(f"  {len(failed)} input images could not be decoded (no anomaly made from them): "
                     + ", ".join(f"{s['image_id']} ({s['error']})" for s in failed[:5]))
    return StepResult(output=folder.uri, rows=published.rows, rejected=len(failed),
                      details={"synthetic": summary["synthetic"], "per_source": summary["per_source"],
                               "reused_parts": outcome.reused,
                               "images_per_second": round(summary["synthetic"] / seconds, 2)},
                      summary=tuple(lines))


def _write_quality_summary(folder: Location, report_folder: Location) -> dict[str, Any]:
    """Counts per source, mask coverage (histogram PNG) and a contact sheet of the first anomalies."""
    from pipelines.synthesis.summary import contact_sheet_png, coverage_histogram_png

    table = datasets.read_table(folder, columns=["mask", "label", "defect_type"])  # masks are small PNGs
    labels = np.array([v if v is not None else -1 for v in table.column("label").to_pylist()])
    synthetic = np.flatnonzero(labels == 1)
    masks = table.column("mask").to_pylist()
    methods = table.column("defect_type").to_pylist()
    coverages = [float((np.asarray(Image.open(io.BytesIO(masks[i]))) > 0).mean()) for i in synthetic]
    per_source: dict[str, int] = {}
    for i in synthetic:
        per_source[methods[i]] = per_source.get(methods[i], 0) + 1
    quantile = (lambda q: float(np.percentile(coverages, q))) if coverages else (lambda q: 0.0)
    summary = {"synthetic": int(len(synthetic)), "normal": int((labels == 0).sum()), "per_source": per_source,
               "coverage_median": quantile(50), "coverage_p05": quantile(5), "coverage_p95": quantile(95),
               "coverage_histogram": np.histogram(coverages, bins=10, range=(0, 1))[0].tolist()}
    report_folder.join("synthesis_summary.json").write_json({**summary, "dataset": folder.uri})
    shown = [int(i) for i in synthetic[:12]]
    if shown:  # images only of the first parts, as far as the rows shown reach
        import pyarrow.parquet as pq

        parts, gathered = [], 0
        for location in datasets.part_locations(folder, datasets.read_manifest(folder)):
            parts.append(pq.read_table(location.path, filesystem=location.fs, columns=["image"]))
            gathered += parts[-1].num_rows
            if gathered > shown[-1]:
                break
        images = pa.concat_tables(parts).column("image").take(pa.array(shown)).to_pylist()
        report_folder.join("contact_sheet.png").write_bytes(contact_sheet_png(
            [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images],
            [np.asarray(Image.open(io.BytesIO(masks[i]))) > 0 for i in shown], [methods[i] for i in shown]))
    report_folder.join("coverage.png").write_bytes(coverage_histogram_png(coverages, per_source))
    return summary


def published_record(step: StepSpec, context: StepContext) -> Location:
    params: SynthesizeParams = step.params
    return context.dataset_folder(params.outputs).join(datasets.MANIFEST_NAME)


KIND = StageKind(name="synthesize", params=SynthesizeParams, run=run, published_record=published_record)
