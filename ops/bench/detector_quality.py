"""ELPV image AUROC of every detector on the same splits: PaDiM (the baseline), PFM, RealNet,
ResAD few-shot, and the diffusion detectors diffusion_kl and cgddm.

For each --splits seed the ELPV cells are split exactly as the demo's ingest step splits them
(`padim_quality.elpv_split`: 60% of the normal cells of each type train, the other normals and
every probability-1.0 cell test). Per cell type (mono, poly) one model of each detector is fitted
on that type's normal training cells, with the pipeline's decoder (`decode_rgb`, 256 px):

- padim: the demo's model (`padim_quality.adpipe_scores`), channel subset seed 0;
- pfm: `pipelines.models.pfm` with its defaults (Lite1 <-> Lite2 or --pfm-backbones, stages 1-3, the authors' mapping
  shape with bottlenecks 19/38/96, Adam 3e-3/3e-4/3e-4), --pfm-steps steps of batch 8 drawn with
  a seeded generator from the training cells' features, computed once (no rotation augmentation
  here; the train stage adds it), the error variance over the last 50 steps; image score max
  (the paper's) and mean (the whole map).

- realnet: `pipelines.models.realnet` with its defaults (Lite0 stages 1-3, AFS 16/24/64, RRS 2x32),
  trained on what a `synthesize` step with include_normals writes: --realnet-per-image anomalies
  per normal training cell from the recipe's Perlin-masked textures (scikit-image's gravel,
  rocket, coffee, chelsea: no DTD offline) and CutPaste, the same seeds as the stage; per epoch each
  normal paired with one of its anomalies (`pipelines.data.synthetic_pairs`), features cached
  once; --realnet-steps steps of batch 8. ELPV's real defects (cracks, dark cells) are a generator
  it never saw.
- resad: `pipelines.models.resad` with its defaults (Lite0 stages 1-3, 8 couplings per level),
  trained for --resad-steps steps on the *other* cell type's synthetic pairs (made as RealNet's),
  then scoring this type from --resad-shots of its normal training cells, no retraining: the
  class-generalisation ResAD is for. Compare it with PaDiM fitted on all of this type's normals.
  --resad-extra-textures brick,grass adds scikit-image textures as more training classes.
- nearest_shots (`nearest_shot_scores`, not in the default): ResAD's residuals with nothing
  trained, the squared residual against the same --resad-shots cells as the map: what ResAD's
  training adds to its first step.
- diffusion (`diffusion_scores`): a DDPM (U-Net channels 32-128, learned variance) per cell type,
  --diffusion-steps steps at --diffusion-size px (the CPU budget: far below the papers' 10k steps
  at 256 px on GPUs), scored by diffusion_kl and cgddm with their defaults. With
  --diffusion-feature-head the U-Net also learns diffusion_kl's feature head, and diffusion_kl is
  scored at alpha 0.5 (the paper's mix), 1 (the KL alone) and 0 (the feature error alone).
- diffusion_kl_conditional (`class_conditional_kl_scores`): the same, as one class-conditional
  U-Net over both cell types trained 2 x --diffusion-steps steps (the same budget per type),
  each type scored with its class and its own statistics.

Prints one line per split and detector and the mean and spread (sample std) over splits; a
difference within the spread is not a win. Also the test images/s of each detector's forward
pass (decode excluded) on this machine, measured in the same run. With --scores-out DIR every
detector's per-image test scores go to DIR/split-<seed>.json too (fusions, paired tests).

    .venv/bin/python ops/bench/detector_quality.py [--splits 0,1,2,3,4] [--pfm-steps 1000] [--threads 2]

About 10 minutes per split on 2 CPU cores at 1000 steps.
Not tuned on ELPV: PFM's settings are the paper's; only the step count is set by the CPU budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from padim_quality import CATEGORIES, adpipe_scores, auroc_per_category, elpv_split  # noqa: E402


def pfm_scores(items: list[dict], steps: int, batch_size: int, **model: object
               ) -> tuple[dict[str, dict[str, float]], float, int]:
    """({"max" | "mean": {image_id: score}}, seconds scoring, test images scored). `model`:
    PfmConfig fields instead of its defaults (source_backbone, image_size, ...)."""
    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb
    from pipelines.models.methods import GradientTrainingSpec, TrainingContext
    from pipelines.models.pfm import PfmParams
    from pipelines.models.pfm.model import IMPLEMENTATION as PFM

    params = PfmParams(training=GradientTrainingSpec(steps=steps), variance_steps=min(50, steps))
    if model:
        params = dataclasses.replace(params, model=dataclasses.replace(params.model, **model).validate("pfm.model"))
    size = params.image_size
    scores: dict[str, dict[str, float]] = {"max": {}, "mean": {}}
    seconds, count = 0.0, 0
    for category in CATEGORIES:
        train = [r for r in items if r["category"] == category and r["split"] == "train"]
        test = [r for r in items if r["category"] == category and r["split"] == "test"]
        context = TrainingContext(class_names=(category,), device="cpu", seed=0)
        state = PFM.training_state(params, context)
        started = time.perf_counter()
        # Both backbones once per training cell (they are frozen), then every step on a seeded
        # batch of the cached features: the same steps as the train stage without its rotation
        # augmentation, at a fraction of the cost (the backbones are ~95% of a step on this CPU).
        cached: list[tuple[list, list]] = []
        for start in range(0, len(train), batch_size):
            rows = train[start:start + batch_size]
            batch = torch.from_numpy(np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in rows]))
            cached.append(state.features(batch.permute(0, 3, 1, 2).float().div_(255.0)))
        source = [torch.cat([c[0][level] for c in cached]) for level in range(len(params.model.stages))]
        target = [torch.cat([c[1][level] for c in cached]) for level in range(len(params.model.stages))]
        del cached
        rng = np.random.default_rng(0)
        for _ in range(steps):
            chosen = torch.from_numpy(rng.choice(len(train), batch_size, replace=False))
            state.train_features([f[chosen] for f in source], [f[chosen] for f in target])
        tensors, meta = state.state_tensors()
        published = PFM.published(params, context, tensors, meta)
        model = PFM.build(published.config, published.tensors["*"]).eval()
        print(f"  pfm {category}: trained {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
        for start in range(0, len(test), batch_size):
            rows = test[start:start + batch_size]
            batch = torch.from_numpy(np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in rows]))
            began = time.perf_counter()
            _, maps = model(batch.permute(0, 3, 1, 2).float().div_(255.0))
            seconds += time.perf_counter() - began
            count += len(rows)
            for row, high, mean in zip(rows, maps.amax((1, 2)).tolist(), maps.mean((1, 2)).tolist(), strict=True):
                scores["max"][row["image_id"]] = high
                scores["mean"][row["image_id"]] = mean
    return scores, seconds, count


def diffusion_scores(items: list[dict], steps: int, batch_size: int, size: int, feature_head: bool = False
                     ) -> tuple[dict[str, dict[str, float]], dict[str, float], int]:
    """({"diffusion_kl" | "cgddm" | ...: {image_id: score}}, {method: seconds scoring}, test images scored).

    One DDPM per cell type trained `steps` steps (batch `batch_size`, seeded draws, no rotation)
    at `size` px, scored by both methods: their training is the same DDPM step (`method: ddpm`'s),
    so one network serves both here; in a job each method trains its own. diffusion_kl's KL
    statistics come from the last 50 steps, as its train step gathers them. With `feature_head` the
    U-Net also learns diffusion_kl's feature head (Lite0 stage 2) and diffusion_kl is scored three
    ways from that one network: alpha 0.5 (the paper's mix), 1 (KL only) and 0 (feature error only).
    """
    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb
    from pipelines.models.cgddm import CgddmConfig
    from pipelines.models.cgddm.model import IMPLEMENTATION as CGDDM
    from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
    from pipelines.models.diffusion_kl import DiffusionKlConfig, DiffusionKlParams, DiffusionKlScoring, FeatureHead
    from pipelines.models.diffusion_kl.model import IMPLEMENTATION as DIFFUSION_KL
    from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext

    network = DdpmConfig(image_size=size, block_out_channels=(32, 64, 64, 128), attention_blocks=(3,),
                         layers_per_block=1, learned_variance=True)
    params = DiffusionKlParams(model=network, optim=OptimConfig(lr=2e-4, warmup_steps=100, ema_decay=0.995),
                               training=GradientTrainingSpec(steps=steps), statistics_steps=min(50, steps),
                               feature_head=FeatureHead(enabled=feature_head)).validate("diffusion_kl")
    alphas = {"diffusion_kl+head": 0.5, "diffusion_kl (KL only)": 1.0, "diffusion_kl (feature only)": 0.0}
    names = [*(alphas if feature_head else ["diffusion_kl"]), "cgddm"]
    scores: dict[str, dict[str, float]] = {name: {} for name in names}
    seconds = dict.fromkeys(names, 0.0)
    count = 0
    for category in CATEGORIES:
        train = [r for r in items if r["category"] == category and r["split"] == "train"]
        test = [r for r in items if r["category"] == category and r["split"] == "test"]
        pixels = np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in train])
        context = TrainingContext(class_names=(category,), device="cpu", seed=0)
        state = DIFFUSION_KL.training_state(params, context)
        generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        started = time.perf_counter()
        for _ in range(steps):
            chosen = rng.choice(len(train), batch_size, replace=False)
            state.train_batch(TrainingBatch(pixels=pixels[chosen], categories=np.array([category] * batch_size)),
                              generator, None)
        published = DIFFUSION_KL.published(params, context, *state.state_tensors())
        [tensors] = published.tensors.values()
        models = {"diffusion_kl": DIFFUSION_KL.build(published.config, tensors).eval()}
        if feature_head:
            models = {name: DIFFUSION_KL.build(DiffusionKlConfig(
                model=network, feature_head=params.feature_head,
                scoring=DiffusionKlScoring(alpha=alpha)), tensors).eval() for name, alpha in alphas.items()}
        models["cgddm"] = CGDDM.build(CgddmConfig(model=network), tensors).eval()
        print(f"  ddpm {category}: trained {steps} steps at {size} px in {time.perf_counter() - started:.0f} s",
              flush=True)
        for start in range(0, len(test), batch_size):
            rows = test[start:start + batch_size]
            batch = torch.from_numpy(np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in rows]))
            images = batch.permute(0, 3, 1, 2).float().div_(255.0)
            for name, model in models.items():
                began = time.perf_counter()
                result = model.score(images, [r["image_id"] for r in rows])
                seconds[name] += time.perf_counter() - began
                for row, value in zip(rows, result.scores.tolist(), strict=True):
                    scores[name][row["image_id"]] = value
            count += len(rows)
    return scores, seconds, count


def class_conditional_kl_scores(items: list[dict], steps: int, batch_size: int, size: int, feature_head: bool
                                ) -> tuple[dict[str, float], float, int]:
    """({image_id: score}, seconds scoring, test images scored) of one class-conditional
    diffusion_kl model over both cell types (`class_conditional: true`): the U-Net and settings of
    `diffusion_scores`, trained `steps` x 2 steps (the same budget per cell type as two models of
    `steps`) on batches drawn from both types' training cells, each type then scored with its class
    and its own map statistics (the per-category models its artifact loads as)."""
    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb
    from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
    from pipelines.models.diffusion_kl import DiffusionKlParams, FeatureHead
    from pipelines.models.diffusion_kl.model import IMPLEMENTATION as DIFFUSION_KL
    from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext

    total = steps * len(CATEGORIES)
    network = DdpmConfig(image_size=size, block_out_channels=(32, 64, 64, 128), attention_blocks=(3,),
                         layers_per_block=1, learned_variance=True)
    params = DiffusionKlParams(model=network, optim=OptimConfig(lr=2e-4, warmup_steps=100, ema_decay=0.995),
                               training=GradientTrainingSpec(steps=total), statistics_steps=min(50, total),
                               feature_head=FeatureHead(enabled=feature_head),
                               class_conditional=True).validate("diffusion_kl")
    train = [r for r in items if r["split"] == "train"]
    pixels = np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in train])
    categories = np.array([r["category"] for r in train])
    context = TrainingContext(class_names=tuple(sorted(CATEGORIES)), device="cpu", seed=0)
    state = DIFFUSION_KL.training_state(params, context)
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(total):
        chosen = rng.choice(len(train), batch_size, replace=False)
        state.train_batch(TrainingBatch(pixels=pixels[chosen], categories=categories[chosen]), generator, None)
    published = DIFFUSION_KL.published(params, context, *state.state_tensors())
    whole = DIFFUSION_KL.build(published.config, published.tensors["*"]).eval()
    models = DIFFUSION_KL.category_models(published.config, {"*": whole})
    print(f"  diffusion_kl class-conditional: trained {total} steps at {size} px in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    scores: dict[str, float] = {}
    seconds, count = 0.0, 0
    for category in CATEGORIES:
        test = [r for r in items if r["category"] == category and r["split"] == "test"]
        for start in range(0, len(test), batch_size):
            rows = test[start:start + batch_size]
            batch = torch.from_numpy(np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in rows]))
            began = time.perf_counter()
            result = models[category].score(batch.permute(0, 3, 1, 2).float().div_(255.0),
                                            [r["image_id"] for r in rows])
            seconds += time.perf_counter() - began
            scores.update(zip([r["image_id"] for r in rows], result.scores.tolist(), strict=True))
            count += len(rows)
    return scores, seconds, count


def cached_features(state, pixels, batch_size: int) -> list:
    """The frozen backbone's features of every row of `pixels` ((N, S, S, 3) uint8), computed once,
    per level: the bench's training steps then run on these (`state.features` is the training
    state's own backbone call)."""
    import torch

    features = []
    for start in range(0, len(pixels), batch_size):
        chunk = torch.from_numpy(pixels[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255
        features.append(state.features(chunk))
    return [torch.cat([f[level] for f in features]) for level in range(len(features[0]))]


def synthetic_block(train: list[dict], category: str, size: int, per_image: int) -> dict:
    """What a `synthesize` step with include_normals writes for these normal cells, as one block:
    each normal, then its `per_image` anomalies (the stage's seeds and recipe: Perlin-masked
    textures from scikit-image's gravel, rocket, coffee, chelsea, and CutPaste)."""
    from pipelines.data.preprocess import decode_rgb

    return synthetic_block_of([(row["image_id"], decode_rgb(Path(row["file"]).read_bytes(), size)) for row in train],
                              category, size, per_image)


def texture_normals(texture: str, count: int, size: int) -> list[tuple[str, object]]:
    """`count` normal images of a scikit-image texture (brick, grass): seeded random crops of 128-384
    px, randomly flipped, resized to `size` px, grey as RGB. A class ResAD can train on besides
    ELPV's other cell type (the anomaly recipe's textures are other ones)."""
    import numpy as np
    import skimage.data

    from pipelines.data.preprocess import decode_rgb

    image = np.stack([getattr(skimage.data, texture)()] * 3, -1)
    rng = np.random.default_rng(0)
    made = []
    for index in range(count):
        side = int(rng.integers(128, 385))
        y, x = (int(v) for v in rng.integers(0, image.shape[0] - side + 1, 2))
        crop = image[y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        made.append((f"{texture}/{index:03d}", decode_rgb(_png(np.ascontiguousarray(crop)), size)))
    return made


def synthetic_block_of(normals: list[tuple[str, object]], category: str, size: int, per_image: int) -> dict:
    """`synthetic_block` for (image id, (S, S, 3) uint8 pixels) normals."""
    import numpy as np
    import skimage.data

    from pipelines.data.preprocess import decode_rgb
    from pipelines.synthesis.config import PerlinConfig
    from pipelines.synthesis.recipe import SourcePlan, row_seed, synthesize_one

    textures = [decode_rgb(_png(getattr(skimage.data, name)()), size) for name in ("gravel", "rocket", "coffee",
                                                                                   "chelsea")]
    plans = (SourcePlan("texture", 1.0, (0.2, 1.0)), SourcePlan("cutpaste", 1.0, (1.0, 1.0)))
    ids, sources, labels, pixels, masks = [], [], [], [], []
    for image_id, image in normals:
        ids.append(image_id), sources.append(""), labels.append(0)
        pixels.append(image), masks.append(np.zeros((size, size), bool))
        for copy in range(per_image):
            seed = row_seed(0, image_id, copy)
            plan = plans[int(np.random.default_rng(seed).integers(len(plans)))]
            made = synthesize_one(image, plan, seed, perlin=PerlinConfig(), textures=textures)
            ids.append(f"{image_id}#synth-{copy}"), sources.append(image_id), labels.append(1)
            pixels.append(made.image), masks.append(made.mask)
    return {"image_id": np.array(ids, object), "category": np.array([category] * len(ids), object),
            "label": np.array(labels, np.int8), "source_image_id": np.array(sources, object),
            "pixels": np.stack(pixels), "mask": np.stack(masks), "error": np.array([""] * len(ids), object)}


def realnet_scores(items: list[dict], steps: int, batch_size: int,
                   per_image: int) -> tuple[dict[str, float], float, int]:
    """({image_id: score}, seconds scoring, test images scored)."""
    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb
    from pipelines.data.synthetic_pairs import pair_rows
    from pipelines.models.methods import GradientTrainingSpec, TrainingContext
    from pipelines.models.realnet import RealnetParams
    from pipelines.models.realnet.model import IMPLEMENTATION as REALNET

    params = RealnetParams(training=GradientTrainingSpec(steps=steps))
    size = params.image_size
    scores: dict[str, float] = {}
    seconds, count = 0.0, 0
    for category in CATEGORIES:
        train = [r for r in items if r["category"] == category and r["split"] == "train"]
        test = [r for r in items if r["category"] == category and r["split"] == "test"]
        context = TrainingContext(class_names=(category,), device="cpu", seed=0)
        state = REALNET.training_state(params, context)
        started = time.perf_counter()
        block = synthetic_block(train, category, size, per_image)
        ids = [str(i) for i in block["image_id"]]
        sources = [str(i) for i in block["source_image_id"]]
        cached = cached_features(state, block["pixels"], batch_size)
        where = {image_id: index for index, image_id in enumerate(ids)}
        clean_of = {image_id: where[source or image_id] for image_id, source in zip(ids, sources, strict=True)}
        step, epoch = 0, 0
        while step < steps:
            pairs = pair_rows(block, seed=0, epoch=epoch)  # the stage's epoch: which rows, in which order
            epoch += 1
            rows = torch.tensor([where[str(i)] for i in pairs["image_id"]])
            clean_rows = torch.tensor([clean_of[str(i)] for i in pairs["image_id"]])
            for start in range(0, len(rows) - batch_size + 1, batch_size):
                if step >= steps:
                    break
                chosen, clean = rows[start:start + batch_size], clean_rows[start:start + batch_size]
                state.train_features([c[chosen] for c in cached], [c[clean] for c in cached],
                                     torch.from_numpy(block["mask"][chosen.numpy()]))
                step += 1
        tensors, meta = state.state_tensors()
        published = REALNET.published(params, context, tensors, meta)
        model = REALNET.build(published.config, published.tensors["*"]).eval()
        print(f"  realnet {category}: {len(train)} normals + {len(train) * per_image} anomalies, trained {steps} "
              f"steps in {time.perf_counter() - started:.0f} s", flush=True)
        for start in range(0, len(test), batch_size):
            rows_ = test[start:start + batch_size]
            batch = torch.from_numpy(np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in rows_]))
            began = time.perf_counter()
            image_scores, _ = model(batch.permute(0, 3, 1, 2).float().div_(255.0))
            seconds += time.perf_counter() - began
            count += len(rows_)
            for row, value in zip(rows_, image_scores.tolist(), strict=True):
                scores[row["image_id"]] = value
    return scores, seconds, count


def resad_scores(items: list[dict], steps: int, batch_size: int, per_image: int, shots: int,
                 extra_textures: Sequence[str] = (), texture_count: int = 64) -> tuple[dict[str, float], float, int]:
    """ResAD few-shot on a cell type it never saw: trained on the *other* type's synthetic pairs
    (as RealNet's), then applied to this type from `shots` of its normal training cells (drawn
    with seed 0 as a `references:` score job draws them), no retraining. With `extra_textures`
    ResAD also trains on those scikit-image textures as classes of their own (`texture_count`
    normal crops each, `texture_normals`, and their synthetic anomalies). ({image_id: score},
    seconds scoring, test images scored)."""
    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb
    from pipelines.data.synthetic_pairs import pair_rows
    from pipelines.models.methods import GradientTrainingSpec, TrainingContext
    from pipelines.models.resad import ResadConfig, ResadParams
    from pipelines.models.resad.model import IMPLEMENTATION as RESAD

    params = ResadParams(model=ResadConfig(shots=shots), training=GradientTrainingSpec(steps=steps))
    size = params.image_size
    scores: dict[str, float] = {}
    seconds, count = 0.0, 0
    for trained, unseen in zip(CATEGORIES, CATEGORIES[::-1], strict=True):
        train = [r for r in items if r["category"] == trained and r["split"] == "train"]
        context = TrainingContext(class_names=(trained, *extra_textures), device="cpu", seed=0)
        state = RESAD.training_state(params, context)
        started = time.perf_counter()
        blocks = [synthetic_block(train, trained, size, per_image)] + [
            synthetic_block_of(texture_normals(texture, texture_count, size), texture, size, per_image)
            for texture in extra_textures]
        block = {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}
        ids = [str(i) for i in block["image_id"]]
        cached = cached_features(state, block["pixels"], batch_size)
        where = {image_id: index for index, image_id in enumerate(ids)}
        step, epoch = 0, 0
        while step < steps:
            pairs = pair_rows(block, seed=0, epoch=epoch)
            epoch += 1
            rows = torch.tensor([where[str(i)] for i in pairs["image_id"]])
            for start in range(0, len(rows) - batch_size + 1, batch_size):
                if step >= steps:
                    break
                chosen = rows[start:start + batch_size]
                generator = torch.Generator().manual_seed(step * 1009)  # the train stage's seeding, rank 0
                state.train_features([c[chosen] for c in cached], [str(c) for c in block["category"][chosen.numpy()]],
                                     torch.from_numpy(block["mask"][chosen.numpy()]), generator)
                step += 1
        tensors, meta = state.state_tensors()
        published = RESAD.published(params, context, tensors, meta)
        model = RESAD.build(published.config, published.tensors[trained]).eval()
        model = RESAD.with_references(model, shot_images(items, unseen, shots, size))
        print(f"  resad {trained}{''.join(f'+{t}' for t in extra_textures)} -> {unseen}: "
              f"{int((block['label'] == 0).sum())} normals + {int(block['label'].sum())} anomalies, trained "
              f"{steps} steps in {time.perf_counter() - started:.0f} s; {shots} shots of {unseen}", flush=True)
        test = [r for r in items if r["category"] == unseen and r["split"] == "test"]
        for start in range(0, len(test), batch_size):
            rows_ = test[start:start + batch_size]
            batch = torch.from_numpy(np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in rows_]))
            began = time.perf_counter()
            image_scores, _ = model(batch.permute(0, 3, 1, 2).float().div_(255.0))
            seconds += time.perf_counter() - began
            count += len(rows_)
            for row, value in zip(rows_, image_scores.tolist(), strict=True):
                scores[row["image_id"]] = value
    return scores, seconds, count


def shot_images(items: list[dict], category: str, shots: int, size: int):
    """`shots` normal training cells of `category`, drawn with seed 0 as a `references:` score job
    draws them: (shots, 3, size, size) float in [0, 1]."""
    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb

    candidates = sorted((r for r in items if r["category"] == category and r["split"] == "train"),
                        key=lambda r: r["image_id"])
    picked = np.sort(np.random.default_rng(0).choice(len(candidates), shots, replace=False))
    pixels = np.stack([decode_rgb(Path(candidates[i]["file"]).read_bytes(), size) for i in picked])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def nearest_shot_scores(items: list[dict], shots: int, batch_size: int) -> tuple[dict[str, float], float, int]:
    """ResAD's first step alone, untrained: the same `shots` cells of each type as references, the
    same backbone, levels, unit-RMS features and map smoothing; a position's score is its squared
    residual against the nearest reference position (by cosine), per channel, divided by the
    level's mean over the shots themselves (each against the others: fixed before any test
    cell is seen); the levels' maps upsampled and averaged, image score the max.
    ({image_id: score}, seconds scoring, test images scored)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipelines.data.preprocess import decode_rgb
    from pipelines.models.anomaly_maps import gaussian_blur
    from pipelines.models.resad import ResadConfig
    from pipelines.models.resad.model import IMPLEMENTATION as RESAD
    from pipelines.models.resad.model import flatten_references, nearest_residuals

    config = ResadConfig(shots=shots)
    size = config.image_size
    features = RESAD.build(config, None).features  # ResAD's own frozen backbone and unit-RMS features

    scores: dict[str, float] = {}
    seconds, count = 0.0, 0
    for category in CATEGORIES:
        shot_features = features(shot_images(items, category, shots, size))
        references = flatten_references(shot_features)
        scales = []  # per level: the mean squared residual of each shot against the other shots
        for stored in shot_features:
            others = [flatten_references([torch.cat([stored[:k], stored[k + 1:]])])[0] for k in range(shots)]
            scales.append(torch.stack([nearest_residuals(stored[k:k + 1], others[k]).pow(2).mean()
                                       for k in range(shots)]).mean())
        test = [r for r in items if r["category"] == category and r["split"] == "test"]
        for start in range(0, len(test), batch_size):
            rows_ = test[start:start + batch_size]
            batch = torch.from_numpy(np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in rows_]))
            began = time.perf_counter()
            maps = torch.zeros(len(rows_), 1, size, size)
            for level_features, level_references, scale in zip(features(batch.permute(0, 3, 1, 2).float() / 255),
                                                               references, scales, strict=True):
                squared = nearest_residuals(level_features, level_references).pow(2).mean(1, keepdim=True) / scale
                maps += F.interpolate(squared, size=(size, size), mode="bilinear", align_corners=False)
            image_scores = gaussian_blur(maps[:, 0] / len(references), config.map_sigma).amax((1, 2))
            seconds += time.perf_counter() - began
            count += len(rows_)
            for row, value in zip(rows_, image_scores.tolist(), strict=True):
                scores[row["image_id"]] = value
    return scores, seconds, count


def _png(array) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_scores(path: Path, items: list[dict], scores_by_detector: dict[str, dict[str, float]]) -> None:
    """The split's test cells (id, cell type, label) and every detector's score for each."""
    import json

    test = [{"image_id": r["image_id"], "category": r["category"], "label": r["label"]}
            for r in items if r["split"] == "test"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"test": test, "scores": scores_by_detector}, sort_keys=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", default="0,1,2,3,4", help="comma-separated ELPV split seeds (0 is the demo's)")
    parser.add_argument("--pfm-steps", type=int, default=1000)
    parser.add_argument("--pfm-backbones", default=None, metavar="SOURCE,TARGET",
                        help="PFM's two networks (default: PfmConfig's)")
    parser.add_argument("--pfm-image-size", type=int, default=None, help="PFM's input size (default: PfmConfig's)")
    parser.add_argument("--realnet-steps", type=int, default=1000)
    parser.add_argument("--realnet-per-image", type=int, default=2)
    parser.add_argument("--resad-steps", type=int, default=600)
    parser.add_argument("--resad-shots", type=int, default=4)
    parser.add_argument("--resad-extra-textures", default="", metavar="NAMES",
                        help="comma-separated scikit-image textures (e.g. brick,grass) ResAD also trains on, "
                             "each as a class of its own")
    parser.add_argument("--diffusion-steps", type=int, default=1500)
    parser.add_argument("--diffusion-size", type=int, default=64)
    parser.add_argument("--diffusion-feature-head", action="store_true",
                        help="train diffusion_kl's feature head too and score it at alpha 0.5, 1 and 0")
    parser.add_argument("--detectors", default="padim,pfm,realnet,resad,diffusion",
                        help="comma-separated; also diffusion_kl_conditional and nearest_shots (not in the "
                             "default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scores-out", type=Path, default=None,
                        help="also write each split's per-image scores and labels to "
                             "DIR/split-<seed>.json, for analyses that need no retraining")
    args = parser.parse_args()
    pfm_model: dict[str, object] = {}
    if args.pfm_backbones:
        source, _, target = args.pfm_backbones.partition(",")
        pfm_model.update(source_backbone=source, target_backbone=target)
    if args.pfm_image_size:
        pfm_model["image_size"] = args.pfm_image_size
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, float]]] = {}
    speed: dict[str, list[float]] = {}
    for split in [int(s) for s in args.splits.split(",")]:
        items = elpv_split(split)
        test_count = sum(r["split"] == "test" for r in items)
        detectors = args.detectors.split(",")
        rows = {}
        scores_by_detector: dict[str, dict[str, float]] = {}
        if "padim" in detectors:
            padim, padim_seconds = adpipe_scores(items, channel_seed=0, batch_size=args.batch_size)
            rows["padim"] = auroc_per_category(items, padim)
            scores_by_detector["padim"] = padim
            speed.setdefault("padim", []).append(test_count / padim_seconds)
        if "pfm" in detectors:
            pfm, pfm_seconds, pfm_count = pfm_scores(items, args.pfm_steps, args.batch_size, **pfm_model)
            rows["pfm (max)"] = auroc_per_category(items, pfm["max"])
            rows["pfm (mean)"] = auroc_per_category(items, pfm["mean"])
            scores_by_detector.update({"pfm (max)": pfm["max"], "pfm (mean)": pfm["mean"]})
            speed.setdefault("pfm", []).append(pfm_count / pfm_seconds)
        if "realnet" in detectors:
            realnet, realnet_seconds, realnet_count = realnet_scores(items, args.realnet_steps, args.batch_size,
                                                                     args.realnet_per_image)
            rows["realnet"] = auroc_per_category(items, realnet)
            scores_by_detector["realnet"] = realnet
            speed.setdefault("realnet", []).append(realnet_count / realnet_seconds)
        if "resad" in detectors:
            resad, resad_seconds, resad_count = resad_scores(items, args.resad_steps, args.batch_size,
                                                             args.realnet_per_image, args.resad_shots,
                                                             [t for t in args.resad_extra_textures.split(",") if t])
            rows[f"resad {args.resad_shots}-shot"] = auroc_per_category(items, resad)
            scores_by_detector[f"resad {args.resad_shots}-shot"] = resad
            speed.setdefault("resad", []).append(resad_count / resad_seconds)
        if "nearest_shots" in detectors:
            nearest, nearest_seconds, nearest_count = nearest_shot_scores(items, args.resad_shots, args.batch_size)
            rows[f"nearest {args.resad_shots} shots"] = auroc_per_category(items, nearest)
            scores_by_detector[f"nearest {args.resad_shots} shots"] = nearest
            speed.setdefault("nearest_shots", []).append(nearest_count / nearest_seconds)
        if "diffusion" in detectors:
            diffusion, diffusion_seconds, diffusion_count = diffusion_scores(
                items, args.diffusion_steps, args.batch_size, args.diffusion_size, args.diffusion_feature_head)
            for name, values in diffusion.items():
                rows[f"{name} {args.diffusion_size}px"] = auroc_per_category(items, values)
                scores_by_detector[f"{name} {args.diffusion_size}px"] = values
                speed.setdefault(name, []).append(diffusion_count / diffusion_seconds[name])
        if "diffusion_kl_conditional" in detectors:
            conditional, conditional_seconds, conditional_count = class_conditional_kl_scores(
                items, args.diffusion_steps, args.batch_size, args.diffusion_size, args.diffusion_feature_head)
            name = f"diffusion_kl{'+head' if args.diffusion_feature_head else ''} class-conditional"
            rows[f"{name} {args.diffusion_size}px"] = auroc_per_category(items, conditional)
            scores_by_detector[f"{name} {args.diffusion_size}px"] = conditional
            speed.setdefault(name, []).append(conditional_count / conditional_seconds)
        if args.scores_out is not None:
            write_scores(args.scores_out / f"split-{split}.json", items, scores_by_detector)
        for name, values in rows.items():
            results.setdefault(name, []).append(values)
            print(f"split {split} {name:18s} " + "  ".join(f"{c} {values[c]:.4f}" for c in CATEGORIES), flush=True)
    print(f"\nimage AUROC over splits {args.splits} (mean +- sample std), PFM {args.pfm_steps} steps"
          f"{''.join(f' {k}={v}' for k, v in pfm_model.items())}, RealNet "
          f"{args.realnet_steps} steps, ResAD {args.resad_steps} steps (trained on the other cell type), DDPM "
          f"{args.diffusion_steps} steps at {args.diffusion_size} px:")
    for name, values in results.items():
        cells = []
        for category in CATEGORIES:
            numbers = [v[category] for v in values]
            spread = statistics.stdev(numbers) if len(numbers) > 1 else float("nan")
            cells.append(f"{category} {statistics.mean(numbers):.4f} +- {spread:.4f}")
        print(f"  {name:18s} " + "  ".join(cells))
    print(f"forward images/s (decode excluded, batch {args.batch_size}, {args.threads} threads): "
          + ", ".join(f"{k} {statistics.mean(v):.1f}" for k, v in speed.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
