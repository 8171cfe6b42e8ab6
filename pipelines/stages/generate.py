"""`generate`: a few normal images per category -> more normal images, text-guided (CVPR 2024
"Text-Guided Variational Image Generation for Industrial Anomaly Detection and Segmentation").

The driver checks what can fail cheaply before any work: WordNet is installed, each object word
is a WordNet noun, the CLIP checkpoint exists (selection: clip), the generator model has the
"generate" capability; it draws each category's starting images (`shots`, a seeded choice) and
builds the candidate prompts. Then one Ray task per category (GPU when asked for) runs the
prompt selection and the knowledge integrator (`pipelines.generation`), and the driver writes
output part N for the Nth category of `objects` (deterministic names; a part an earlier attempt
finished from the same inputs is kept). Rows are images-table rows (split train, label 0) with the
`synthesis` struct: method, prompt, seed, source image id, model version. Every candidate prompt
with its scores goes to `runs/<run>/steps/<step>/prompts.parquet`, with a contact sheet of real
and generated images beside it.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines import datasets
from pipelines.data.limits import DEFAULT_MAX_PIXELS
from pipelines.data.preprocess import encode_png
from pipelines.errors import InputError
from pipelines.generation import prompts as prompt_search
from pipelines.generation.wordnet import candidate_words, load_wordnet
from pipelines.models.artifacts import ModelCard
from pipelines.models.methods import MethodRecord
from pipelines.params.generate import GenerateParams
from pipelines.spec import StepSpec
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.stages.references import draw_normal_images
from pipelines.storage import Location
from pipelines.tables import IMAGES_SCHEMA

METHOD_NAME = "text-guided-vqgan"  # the synthesis struct's method on generated rows

PROMPTS_SCHEMA = pa.schema([
    ("category", pa.string()), ("object", pa.string()), ("prompt", pa.string()), ("word", pa.string()),
    ("relation", pa.string()), ("depth", pa.int32()), ("synset", pa.string()), ("template", pa.string()),
    ("l2_distance", pa.float32()), ("cosine", pa.float32()), ("outlier", pa.bool_()), ("selected", pa.bool_()),
    ("selection", pa.string()),
])


def generate_category(model_folder: Location, record: MethodRecord, params: GenerateParams, category: str,
                      pixels: np.ndarray, image_ids: tuple[str, ...], prompt_texts: list[str]) -> dict[str, Any]:
    """One category, in a Ray task: prompt selection, then the integrator. Pure compute calls."""
    import torch

    from pipelines.generation.embedders import FeatureEmbedder, load_clip
    from pipelines.generation.integrator import (
        IntegratorSettings,
        clip_set_score,
        features_set_score,
        integrate,
    )
    from pipelines.models.artifacts import ALL_CATEGORIES
    from pipelines.models.inference import to_tensor

    torch.set_num_threads(max(1, int(params.resources.cpus_per_worker)))
    device = "cuda" if torch.cuda.is_available() and params.resources.gpus_per_worker > 0 else "cpu"
    card = ModelCard.read(model_folder, record).require("generator", "generation", capability="generate")
    implementation = card.record.load()
    model = card.load(device).models[ALL_CATEGORIES]
    sources = to_tensor(pixels).to(device)
    embedder: Any
    set_score: Any
    if params.selection == "clip":
        assert params.clip is not None  # validated
        settings = model_folder.settings
        embedder = load_clip(params.clip.model, Location.parse(params.clip.checkpoint, settings),
                             Location.parse(params.clip.model_config, settings) if params.clip.model_config else None,
                             device=device)
    else:
        embedder = FeatureEmbedder(device)
    real = embedder.embed_images(sources)
    scores: prompt_search.PromptScores | None = None
    if embedder.embeds_text:
        text = embedder.embed_texts(prompt_texts)
        scores = prompt_search.select_prompt(text, real, params.prompts.outlier_mads)
        set_score = partial(clip_set_score, text_embedding=text[scores.best])
    else:
        set_score = partial(features_set_score, real_embeddings=real,
                            diversity_weight=params.generator.diversity_weight)
    g = params.generator
    result = integrate(implementation, model, sources, image_ids,
                       IntegratorSettings(params.per_image, g.copies, g.rounds, g.adapt_steps, g.adapt_lr,
                                          g.diversity_weight),
                       embedder.embed_images, set_score, params.seed, key=category)
    images = (result.images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return {"images": images, "source_index": result.source_index, "copy_index": result.copy_index,
            "seeds": result.seeds, "best_round": result.best_round, "round_scores": result.round_scores,
            "prompt_best": scores.best if scores else 0,
            "l2_distance": scores.l2_distance.tolist() if scores else None,
            "cosine": scores.cosine.tolist() if scores else None,
            "outlier": scores.outlier.tolist() if scores else None}



def run(step: StepSpec, context: StepContext) -> StepResult:
    params: GenerateParams = step.params
    started = time.monotonic()
    model_folder = context.input_dataset(params.model)
    card = ModelCard.read(model_folder).require("generator", "generation", capability="generate")
    images_folder = context.input_dataset(params.inputs)
    if params.selection == "clip":
        from pipelines.generation.embedders import NO_CLIP_WEIGHTS

        assert params.clip is not None  # validated
        checkpoint = Location.parse(params.clip.checkpoint, context.root.settings)
        if not checkpoint.exists():
            raise InputError(f"the CLIP checkpoint {checkpoint.describe()} does not exist. {NO_CLIP_WEIGHTS}")
    reader = load_wordnet()
    search = params.prompts
    plans = []
    for obj in params.objects:
        words = candidate_words(reader, obj.word, tuple(search.relations), search.depth, search.max_words)
        candidates = prompt_search.prompts_from_words(obj.word, words, search.templates)
        ids, pixels = draw_normal_images(images_folder, obj.category, params.shots, params.seed, card.image_size,
                                         DEFAULT_MAX_PIXELS, split="train", what="starting image",
                                         count_field="shots")
        plans.append((obj, candidates, ids, pixels))
    folder = context.dataset_folder(params.outputs)
    context.log("generating", categories=[o.category for o in params.objects], model=card.version,
                selection=params.selection)

    fingerprints = [datasets.fingerprint([context.fingerprint, model_folder.uri, card.info.get("steps"), list(ids),
                                          [c.text for c in candidates]])
                    for _, candidates, ids, _ in plans]
    records: dict[int, datasets.PartRecord] = {}
    pending = {}
    remote = ray.remote(generate_category).options(num_cpus=params.resources.cpus_per_worker,
                                                   num_gpus=params.resources.gpus_per_worker)
    for index, (obj, candidates, ids, pixels) in enumerate(plans):
        done = datasets.completed_part(folder, index, fingerprints[index])
        if done is not None:
            records[index] = done
            continue
        pending[index] = remote.remote(model_folder, card.record, params, obj.category, pixels, ids,
                                       [c.text for c in candidates])
    sheet: list[tuple[np.ndarray, np.ndarray]] = []
    for index, (obj, candidates, ids, pixels) in enumerate(plans):
        if index not in pending:
            continue
        result = ray.get(pending[index])
        rows = []
        for n, image in enumerate(result["images"]):
            source = ids[result["source_index"][n]]
            prompt = candidates[result["prompt_best"]].text
            rows.append({
                "image_id": f"{params.outputs.dataset}/{obj.category}/gen-{result['source_index'][n]:04d}-"
                            f"{result['copy_index'][n]:03d}",
                "image": encode_png(image), "category": obj.category, "split": "train", "label": 0,
                "width": int(image.shape[1]), "height": int(image.shape[0]), "color_mode": "RGB",
                "source_uri": images_folder.uri,
                "synthesis": {"method": METHOD_NAME, "strength": None, "opacity": None,
                              "seed": int(result["seeds"][n]), "source_image_id": source, "prompt": prompt,
                              "model_version": card.version}})
        table = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)
        scored = [{
            "category": obj.category, "object": obj.word, "prompt": candidate.text, "word": candidate.word,
            "relation": candidate.relation, "depth": candidate.depth, "synset": candidate.synset,
            "template": candidate.template,
            "l2_distance": result["l2_distance"][p] if result["l2_distance"] else None,
            "cosine": result["cosine"][p] if result["cosine"] else None,
            "outlier": result["outlier"][p] if result["outlier"] else None,
            "selected": p == result["prompt_best"], "selection": params.selection}
            for p, candidate in enumerate(candidates)]
        # The category's prompt rows travel with its part record, so that prompts.parquet also lists
        # the categories of parts a resumed run kept rather than recomputed.
        records[index] = datasets.write_part(folder, index, table, fingerprints[index],
                                             extra={"category": obj.category, "best_round": result["best_round"],
                                                    "round_scores": result["round_scores"], "prompts": scored})
        sheet.extend((pixels[result["source_index"][n]], result["images"][n])
                     for n in range(min(4, len(result["images"]))))
    prompt_rows = [row for index in sorted(records) for row in records[index].extra.get("prompts", [])]
    report_folder = context.root.join("runs", context.run_id, "steps", context.step.name)
    if prompt_rows:
        with report_folder.join("prompts.parquet").open_atomic_output() as stream:
            pq.write_table(pa.Table.from_pylist(prompt_rows, schema=PROMPTS_SCHEMA), stream)
        report_folder.join("contact_sheet.png").write_bytes(_contact_sheet(sheet))
    published = datasets.publish(folder, name=params.outputs.dataset, version=params.outputs.version or context.run_id,
                                 table="images", schema=IMAGES_SCHEMA, parts=[records[i] for i in sorted(records)],
                                 lineage=context.lineage(model=model_folder.uri, images=images_folder.uri),
                                 extra={"prompts": report_folder.join("prompts.parquet").uri})
    seconds = time.monotonic() - started
    chosen = [r["prompt"] for r in prompt_rows if r["selected"]]
    lines = [f"generated {published.rows} normal images for {len(plans)} categories from "
             f"{sum(len(p[2]) for p in plans)} real ones in {seconds:.1f} s ({params.selection} selection) "
             f"-> {folder.uri}",
             f"  prompts: {report_folder.join('prompts.parquet').uri} (+ contact_sheet.png)"]
    if chosen:
        lines.append("  chosen: " + "; ".join(chosen[:4]))
    return StepResult(output=folder.uri, rows=published.rows,
                      details={"seconds": round(seconds, 2), "reused_parts": len(plans) - len(pending),
                               "images_per_second": round(published.rows / seconds, 3)},
                      summary=tuple(lines))


def _contact_sheet(pairs: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Real (top) over generated (bottom), one column per pair."""
    if not pairs:
        return encode_png(np.zeros((8, 8, 3), np.uint8))
    columns = [np.concatenate([real, generated], axis=0) for real, generated in pairs]
    gap = np.full((columns[0].shape[0], 4, 3), 255, np.uint8)
    row = [columns[0]]
    for column in columns[1:]:
        row += [gap, column]
    return encode_png(np.concatenate(row, axis=1))


def published_record(step: StepSpec, context: StepContext) -> Location:
    params: GenerateParams = step.params
    return context.dataset_folder(params.outputs).join(datasets.MANIFEST_NAME)


KIND = StageKind(name="generate", params=GenerateParams, run=run, published_record=published_record)
