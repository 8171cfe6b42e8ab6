"""`sample`: generate images with a trained DDPM artifact -> an images dataset (what the model learnt).

Each output part is one Ray task (GPU when asked for) that loads the EMA U-Net and runs the
respaced ancestral sampler of `pipelines.models.ddpm.sample` with a generator seeded by (seed,
part), so the same spec gives the same bytes and a rerun recomputes only missing parts. For a
class-conditional model the classes cycle over the requested categories (default: all of them).
Rows are images-table rows (split train, label 0) with the `synthesis` struct telling how they
were made.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

from pipelines import datasets
from pipelines.errors import InputError, SpecError
from pipelines.spec import DatasetOutputSpec, ModelInputSpec, ResourcesSpec, StepSpec, check_names, check_positive
from pipelines.stages.base import StageKind, StepContext, StepResult
from pipelines.storage import Location
from pipelines.tables import IMAGES_SCHEMA


@dataclass(frozen=True)
class SampleParams:
    model: ModelInputSpec
    outputs: DatasetOutputSpec
    count: int = 16
    steps: int = 20  # respaced reverse steps (DiffAD samples with 250; 20 is RealNet's SDAS)
    categories: tuple[str, ...] | None = None  # class-conditional models: which classes (default all)
    variance_scale: float = 0.0  # SDAS strength s: noise x sqrt(1 + s); 0 samples normal images
    seed: int = 0
    resources: ResourcesSpec = ResourcesSpec(workers=1, batch_size=16)

    def validate(self, path: str) -> SampleParams:
        prefix = f"{path}." if path else ""
        check_positive(self.count, f"{prefix}count")
        check_positive(self.steps, f"{prefix}steps")
        check_positive(self.variance_scale, f"{prefix}variance_scale", allow_zero=True)
        check_positive(self.seed, f"{prefix}seed", allow_zero=True)
        check_names(self.categories, f"{prefix}categories")
        return self


@ray.remote
def sample_part(model_folder: Location, index: int, class_indices: list[int] | None, count: int,
                steps: int, seed: int, variance_scale: float, batch_size: int, threads: int) -> list[bytes]:
    """PNG bytes of `count` samples; deterministic given (seed, index)."""
    import torch

    from pipelines.models.ddpm import sample
    from pipelines.models.registry import ALL_CATEGORIES, TrainedDetector

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    artifact = TrainedDetector.load(model_folder, device=device)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    labels = torch.tensor(class_indices, device=device) if class_indices is not None else None
    images = sample(artifact.models[ALL_CATEGORIES], artifact.config, count, steps, generator,
                    class_labels=labels, variance_scale=variance_scale, device=device, batch_size=batch_size)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def run(step: StepSpec, context: StepContext) -> StepResult:
    from pipelines.models.registry import ModelCard

    params: SampleParams = step.params
    started = time.monotonic()
    model_folder = context.input_dataset(params.model)
    card = ModelCard.read(model_folder)
    if card.method != "ddpm":
        raise InputError(f"{model_folder.uri} is a {card.method!r} model; sampling needs a ddpm model")
    class_names = list(card.info.get("class_names", []))
    conditional = card.config.num_classes > 0
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
    model_version = f"{model_folder.parent().name}@{model_folder.name}"
    records: dict[int, datasets.PartRecord] = {}
    pending: dict[ray.ObjectRef, tuple[int, list[int], str]] = {}
    for index in range(part_count):
        rows = list(range(index * per_part, min(params.count, (index + 1) * per_part)))
        part_fingerprint = datasets.fingerprint([model_folder.uri, card.info.get("steps"), rows, params.steps,
                                                 params.seed, params.variance_scale, wanted])
        done = datasets.completed_part(folder, index, part_fingerprint)
        if done is not None:
            records[index] = done
            continue
        classes = [class_names.index(category(i)) for i in rows] if conditional else None
        ref = sample_part.options(num_cpus=params.resources.cpus_per_worker,
                                  num_gpus=params.resources.gpus_per_worker or None).remote(
            model_folder, index, classes, len(rows), params.steps, params.seed, params.variance_scale,
            params.resources.batch_size, int(params.resources.cpus_per_worker))
        pending[ref] = (index, rows, part_fingerprint)
    context.log("sampling", images=params.count, parts=part_count, reused_parts=len(records), model=model_version)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        index, rows, part_fingerprint = pending.pop(ready[0])
        encoded = ray.get(ready[0])
        size = card.image_size
        table = pa.Table.from_pylist([{
            "image_id": f"{params.outputs.dataset}/sample-{i:06d}", "image": png, "category": category(i),
            "split": "train", "label": 0, "width": size, "height": size,
            "color_mode": "RGB" if card.config.in_channels == 3 else "L", "source_uri": model_folder.uri,
            "synthesis": {"method": "ddpm-sample", "strength": float(params.variance_scale), "opacity": None,
                          "seed": params.seed, "source_image_id": None, "prompt": None,
                          "model_version": model_version}}
            for i, png in zip(rows, encoded)], schema=IMAGES_SCHEMA)
        records[index] = datasets.write_part(folder, index, table, part_fingerprint)
    published = datasets.publish(folder, name=params.outputs.dataset, version=params.outputs.version or context.run_id,
                                 table="images", schema=IMAGES_SCHEMA, parts=[records[i] for i in range(part_count)],
                                 lineage=context.lineage(model=model_folder.uri))
    seconds = time.monotonic() - started
    return StepResult(output=folder.uri, rows=published.rows, details={"seconds": round(seconds, 2)},
                      summary=(f"sampled {published.rows} images ({params.steps} steps, s={params.variance_scale:g}) "
                               f"from {model_version} in {seconds:.1f} s -> {folder.uri}",))


def published_record(step: StepSpec, context: StepContext) -> Location:
    params: SampleParams = step.params
    return context.dataset_folder(params.outputs).join(datasets.MANIFEST_NAME)


KIND = StageKind(name="sample", params=SampleParams, run=run, published_record=published_record)
