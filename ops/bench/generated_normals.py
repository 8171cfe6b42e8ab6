"""Does text-guided generation help a few-shot detector? k-shot PaDiM on ELPV with and without
generated normal cells.

For each cell type (mono, poly), each --seeds seed and each k in --shots: k normal training cells of
the demo's split (split seed 0: `padim_quality.elpv_split`) are drawn with the seed; a VQGAN
(`pipelines.models.vqgan`, defaults, --size px) is trained on those k cells only (--vq-steps steps
of batch 8 drawn with replacement, seeded); the knowledge integrator (`pipelines.generation.
integrator`, `selection: features`: no trained CLIP exists offline) makes --per-image normals per
shot. PaDiM (Lite0 stages 1-3, 100 channels, --size px) is fitted three ways and scores the demo's
test cells: on the k cells alone ("plain"; not at k = 1, PaDiM's covariance needs 2 images), on the
k cells + as many copies of them under the VQGAN's own training jitter ("jittered": the control
that tells generation apart from plain augmentation), and on the k cells + the generated ones.
Prints image AUROC per run, then per (type, k) the mean and sample std of each and of the paired
differences; a difference within its spread is no lift. Also images/s of generation on this
machine.

    .venv/bin/python ops/bench/generated_normals.py [--shots 1,2,4,8] [--seeds 0,1,2,3,4] [--vq-steps 300]

Training dominates: --vq-steps x 0.39 s per run on 2 CPU cores at 64 px.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from padim_quality import CATEGORIES, elpv_split  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", default="1,2,4,8")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vq-steps", type=int, default=300)
    parser.add_argument("--per-image", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contact-sheet", type=Path, default=None,
                        help="write a PNG: per cell type, the first seed's 4-shot run, each real shot "
                             "over 3 of the cells generated from it")
    args = parser.parse_args()

    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb, encode_png
    from pipelines.evaluation.metrics import auroc
    from pipelines.generation.embedders import FeatureEmbedder
    from pipelines.generation.integrator import IntegratorSettings, features_set_score, integrate
    from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext
    from pipelines.models.padim import PadimConfig
    from pipelines.models.padim.model import Padim
    from pipelines.models.vqgan import VqganConfig, VqganParams
    from pipelines.models.vqgan.model import IMPLEMENTATION as VQGAN
    from pipelines.models.vqgan.model import jitter_images

    torch.set_num_threads(args.threads)
    size = args.size
    items = elpv_split(0)
    embedder = FeatureEmbedder()

    def pixels(rows: list[dict]) -> np.ndarray:
        return np.stack([decode_rgb(Path(r["file"]).read_bytes(), size) for r in rows])

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(255)

    def padim_auroc(train: torch.Tensor, test: torch.Tensor, labels: np.ndarray) -> float:
        model = Padim(PadimConfig(image_size=size, seed=0))
        stats = model.new_statistics()
        with torch.no_grad():
            for start in range(0, len(train), 32):
                stats.update(model.embed(train[start:start + 32]))
            model.set_gaussian(stats)
            scores = np.concatenate([model(test[s:s + 32])[0].numpy() for s in range(0, len(test), 32)])
        return auroc(labels, scores)

    # (type, k) -> per seed: (plain or nan, jittered, generated)
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    sheet_blocks: list[np.ndarray] = []
    generated_count, generated_seconds = 0, 0.0
    for category in args.categories.split(","):
        train_rows = sorted((r for r in items if r["category"] == category and r["split"] == "train"
                             and r["label"] == 0), key=lambda r: r["image_id"])
        test_rows = [r for r in items if r["category"] == category and r["split"] == "test"]
        test = tensor(pixels(test_rows))
        labels = np.array([r["label"] for r in test_rows])
        for seed in [int(s) for s in args.seeds.split(",")]:
            order = np.random.default_rng(seed).permutation(len(train_rows))
            for k in [int(s) for s in args.shots.split(",")]:
                shots = [train_rows[i] for i in order[:k]]
                shot_pixels = pixels(shots)
                params = VqganParams(model=VqganConfig(image_size=size),
                                     training=GradientTrainingSpec(steps=args.vq_steps, seed=seed))
                context = TrainingContext(class_names=(category,), device="cpu", seed=seed)
                state = VQGAN.training_state(params, context)
                rng = np.random.default_rng(seed)
                for step in range(args.vq_steps):
                    batch = shot_pixels[rng.integers(0, k, 8)]
                    state.train_batch(TrainingBatch(batch, np.array([category] * 8)),
                                      torch.Generator().manual_seed(seed * 100_003 + step), None)
                published = VQGAN.published(params, context, *state.state_tensors())
                model = VQGAN.build(published.config, published.tensors["*"])
                sources = tensor(shot_pixels)
                real = embedder.embed_images(sources)
                started = time.perf_counter()
                made = integrate(VQGAN, model, sources, [r["image_id"] for r in shots],
                                 IntegratorSettings(args.per_image, args.copies, args.rounds, 10, 1e-4, 0.1),
                                 embedder.embed_images, partial(features_set_score, real_embeddings=real,
                                                                diversity_weight=0.1), seed, key=category)
                generated_seconds += time.perf_counter() - started
                generated_count += len(made.images) * args.rounds
                plain = padim_auroc(sources, test, labels) if k >= 2 else float("nan")
                copies = sources.repeat_interleave(args.per_image, 0)
                jittered = jitter_images(copies, params.model.jitter, torch.Generator().manual_seed(seed))
                augmented = padim_auroc(torch.cat([sources, jittered]), test, labels)
                lifted = padim_auroc(torch.cat([sources, made.images]), test, labels)
                results.setdefault((category, k), []).append((plain, augmented, lifted))
                if args.contact_sheet and k == 4 and seed == int(args.seeds.split(",")[0]):
                    sheet_blocks.append(contact_block(shot_pixels, made.images, made.source_index))
                print(f"{category} seed {seed} {k}-shot: PaDiM {plain:.4f}, + {len(jittered)} jittered "
                      f"{augmented:.4f}, + {len(made.images)} generated {lifted:.4f} (vs plain "
                      f"{lifted - plain:+.4f}, vs jittered {lifted - augmented:+.4f})", flush=True)
    print(f"\nimage AUROC at {size} px, VQGAN {args.vq_steps} steps on the shots alone, {args.per_image} generated "
          f"per shot (mean +- sample std over seeds {args.seeds}):")
    def fmt(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.4f} +- {spread:.4f}"

    print("  | type | k | PaDiM on the k cells | + jittered copies | + generated | generated - plain "
          "| generated - jittered |\n  |---|---|---|---|---|---|---|")
    for (category, k), runs in results.items():
        plain, augmented, lifted = ([run[i] for run in runs] for i in range(3))
        plain_text = fmt(plain) if k >= 2 else "n/a"
        lift_text = fmt([g - p for p, g in zip(plain, lifted)]) if k >= 2 else "n/a"
        print(f"  | {category} | {k} | {plain_text} | {fmt(augmented)} | {fmt(lifted)} | {lift_text} | "
              f"{fmt([g - a for a, g in zip(augmented, lifted)])} |")
    if sheet_blocks:
        gap = np.full((8, max(b.shape[1] for b in sheet_blocks), 3), 255, np.uint8)
        rows = [sheet_blocks[0]] + [part for block in sheet_blocks[1:] for part in (gap, block)]
        args.contact_sheet.parent.mkdir(parents=True, exist_ok=True)
        args.contact_sheet.write_bytes(encode_png(np.concatenate(rows, axis=0), optimize=True))
        print(f"contact sheet: {args.contact_sheet} (per cell type: real shots on top, 3 generated from each below)")
    print(f"generation: {generated_count / generated_seconds:.1f} images/s (integrator incl. adaptation, "
          f"{args.threads} threads)")
    return 0


def contact_block(shots, generated, source_index, per_shot: int = 3, scale: int = 2):
    """One column per real shot (uint8 HWC), the shot on top and `per_shot` of its generated cells
    below, upscaled `scale`x (nearest) so 64 px cells stay legible."""
    import numpy as np

    made = (generated.permute(0, 2, 3, 1).clamp(0, 1).mul(255).round().byte().numpy())
    columns = []
    for index, shot in enumerate(shots):
        children = [made[n] for n, source in enumerate(source_index) if source == index][:per_shot]
        column = np.concatenate([shot, np.full((4, shot.shape[1], 3), 255, np.uint8), *children], axis=0)
        columns.append(column.repeat(scale, 0).repeat(scale, 1))
    gap = np.full((columns[0].shape[0], 6, 3), 255, np.uint8)
    return np.concatenate([part for column in columns for part in (column, gap)][:-1], axis=1)


if __name__ == "__main__":
    raise SystemExit(main())
