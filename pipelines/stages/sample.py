"""`sample`: draw images from a generative model artifact -> an images dataset (what the model learnt).

Output part N holds rows N * rows_per_part ...; each part is one call of a sampler actor (GPU when
asked for) that loaded the model once (`pipelines.stages.parts`). Every image has its own noise
generator seeded by (seed, row), and a part is sampled in chunks from its first row, so the same
spec gives the same bytes however the parts are spread over actors, and a rerun recomputes only
missing parts. For a class-conditional model the classes cycle over the requested categories
(default: all of them). Rows are images-table rows (split train, label 0) with the `synthesis`
struct telling how they were made.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from pipelines import datasets
from pipelines.data.preprocess import encode_png
from pipelines.errors import InputError, SpecError
from pipelines.models.artifacts import ModelCard
from pipelines.models.methods import MethodRecord
from pipelines.params.sample import SampleParams
from pipelines.spec import StepSpec
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.stages.parts import PartPlan, Workers, run_parts
from pipelines.storage import Location
from pipelines.synthesis.recipe import row_seed
from pipelines.tables import IMAGES_SCHEMA


class Sampler:
    """Sampler actor: loads the generator once; each call samples the rows of whole output parts."""

    def __init__(self, model_folder: Location, record: MethodRecord, params: SampleParams, classes: list[int] | None):
        import torch

        from pipelines.models.artifacts import ALL_CATEGORIES

        torch.set_num_threads(max(1, int(params.resources.cpus_per_worker)))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        card = ModelCard.read(model_folder, record).require("generator", "sampling", capability="sample")
        self.implementation = card.record.load()
        self.model = card.load(self.device).models[ALL_CATEGORIES]
        self.config = card.config
        self.params = params
        self.classes = classes  # class index per row (class-conditional models), else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        out: dict[str, list[Any]] = {"_part": [], "_row": [], "image": []}
        for part, first, count in zip(batch["part"], batch["first_row"], batch["count"]):
            rows = list(range(int(first), int(first) + int(count)))
            generators = [torch.Generator(device=self.device).manual_seed(row_seed(self.params.seed, "sample", row))
                          for row in rows]
            labels = (torch.tensor([self.classes[row] for row in rows], device=self.device)
                      if self.classes is not None else None)
            images = self.implementation.sample(
                self.model, self.config, len(rows), self.params.steps, generators, class_labels=labels,
                variance_scale=self.params.variance_scale, device=self.device,
                batch_size=self.params.resources.batch_size)
            for row, image in zip(rows, images):
                out["_part"].append(int(part))
                out["_row"].append(row)
                out["image"].append(encode_png(image))
        return {"_part": np.asarray(out["_part"], np.int64), "_row": np.asarray(out["_row"], np.int64),
                "image": np.asarray(out["image"], object)}



def run(step: StepSpec, context: StepContext) -> StepResult:
    params: SampleParams = step.params
    started = time.monotonic()
    model_folder = context.input_dataset(params.model)
    card = ModelCard.read(model_folder).require("generator", "sampling", capability="sample")
    class_names = list(card.info.get("class_names", []))
    conditional = getattr(card.config, "num_classes", 0) > 0
    if params.categories and not conditional:
        raise SpecError(f"steps.{step.name}.categories" if step.name else "categories",
                        "the model is not class-conditional: leave categories out")
    wanted = list(params.categories or class_names)
    unknown = sorted(set(wanted) - set(class_names))
    if unknown:
        raise InputError(f"categories {unknown} are not classes of {model_folder.uri} (classes: {class_names})")

    def category(i: int) -> str | None:
        if conditional:
            return wanted[i % len(wanted)]
        return class_names[0] if len(class_names) == 1 else None

    folder = context.dataset_folder(params.outputs)
    per_part = params.outputs.part_rows
    part_count = -(-params.count // per_part)
    first_row = {index: index * per_part for index in range(part_count)}
    plans = []
    for index in range(part_count):
        rows = list(range(first_row[index], min(params.count, (index + 1) * per_part)))
        plans.append(PartPlan(index, datasets.fingerprint([model_folder.uri, card.info.get("steps"), rows, params.steps,
                                                           params.seed, params.variance_scale, wanted]), len(rows)))
    context.log("sampling", images=params.count, parts=part_count, model=card.version)
    size = card.image_size
    color_mode = "RGB" if getattr(card.config, "in_channels", 3) == 3 else "L"

    def build(rows: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_pylist([{
            "image_id": f"{params.outputs.dataset}/sample-{int(r['_row']):06d}", "image": r["image"],
            "category": category(int(r["_row"])), "split": "train", "label": 0, "width": size, "height": size,
            "color_mode": color_mode, "source_uri": model_folder.uri,
            "synthesis": {"method": f"{card.method}-sample", "strength": float(params.variance_scale), "opacity": None,
                          "seed": params.seed, "source_image_id": None, "prompt": None,
                          "model_version": card.version}}
            for r in sorted(rows, key=lambda r: int(r["_row"]))], schema=IMAGES_SCHEMA)

    classes = [class_names.index(category(i)) for i in range(params.count)] if conditional else None
    outcome = run_parts(
        folder, plans, IMAGES_SCHEMA,
        source=lambda todo: ray.data.from_items(
            [{"part": p.part, "first_row": first_row[p.part], "count": p.rows} for p in todo],
            override_num_blocks=len(todo)),
        workers=Workers(Sampler, {"model_folder": model_folder, "record": card.record, "params": params,
                                           "classes": classes},
                        params.resources, batch_size=1, queue_bytes=256 * 2**20),
        build_table=build)
    published = datasets.publish(folder, name=params.outputs.dataset, version=params.outputs.version or context.run_id,
                                 table="images", schema=IMAGES_SCHEMA, parts=outcome.records,
                                 lineage=context.lineage(model=model_folder.uri))
    seconds = time.monotonic() - started
    return StepResult(output=folder.uri, rows=published.rows,
                      details={"seconds": round(seconds, 2), "reused_parts": outcome.reused},
                      summary=(f"sampled {published.rows} images ({params.steps} steps, s={params.variance_scale:g}) "
                               f"from {card.version} in {seconds:.1f} s -> {folder.uri}",))


def published_record(step: StepSpec, context: StepContext) -> Location:
    params: SampleParams = step.params
    return context.dataset_folder(params.outputs).join(datasets.MANIFEST_NAME)


KIND = StageKind(name="sample", params=SampleParams, run=run, published_record=published_record)
