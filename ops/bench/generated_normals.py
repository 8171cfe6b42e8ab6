"""Does text-guided generation help a few-shot detector? k-shot PaDiM on ELPV with and without
generated normal cells.

For each cell type (mono, poly), each --seeds seed and each k in --shots: k normal training cells of
the demo's split (split seed 0: `padim_quality.elpv_split`) are drawn with the seed; a VQGAN
(`pipelines.models.vqgan`, defaults, --size px) is trained on those k cells only (--vq-steps steps
of batch 8 drawn with replacement, seeded); the knowledge integrator (`pipelines.generation.
integrator`, `selection: features`: no trained CLIP exists offline) makes --per-image normals per
shot. PaDiM (Lite0 stages 1-3, 100 channels, --size px) is fitted on the k cells alone and on the k
cells + the generated ones, and scores the demo's test cells. Prints image AUROC per run, then per
(type, k) the mean and sample std of both and of their paired difference; a difference within its
spread is no lift. Also images/s of generation on this machine.

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
    args = parser.parse_args()

    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb
    from pipelines.evaluation.metrics import auroc
    from pipelines.generation.embedders import FeatureEmbedder
    from pipelines.generation.integrator import IntegratorSettings, features_set_score, integrate
    from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext
    from pipelines.models.padim import PadimConfig
    from pipelines.models.padim.model import Padim
    from pipelines.models.vqgan import VqganConfig, VqganParams
    from pipelines.models.vqgan.model import IMPLEMENTATION as VQGAN

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

    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
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
                plain = padim_auroc(sources, test, labels)
                lifted = padim_auroc(torch.cat([sources, made.images]), test, labels)
                results.setdefault((category, k), []).append((plain, lifted))
                print(f"{category} seed {seed} {k}-shot: PaDiM {plain:.4f}, + {len(made.images)} generated "
                      f"{lifted:.4f} ({lifted - plain:+.4f})", flush=True)
    print(f"\nimage AUROC at {size} px, VQGAN {args.vq_steps} steps on the shots alone, {args.per_image} generated "
          f"per shot (mean +- sample std over seeds {args.seeds}):")
    for (category, k), pairs in results.items():
        def fmt(values: list[float]) -> str:
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            return f"{statistics.mean(values):.4f} +- {spread:.4f}"
        plain, lifted = [p for p, _ in pairs], [g for _, g in pairs]
        print(f"  {category} {k}-shot: PaDiM {fmt(plain)}   with generated {fmt(lifted)}   "
              f"difference {fmt([g - p for p, g in pairs])}")
    print(f"generation: {generated_count / generated_seconds:.1f} images/s (integrator incl. adaptation, "
          f"{args.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
