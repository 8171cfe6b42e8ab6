"""ELPV image AUROC of every detector on the same splits: PaDiM (the baseline) and PFM.

For each --splits seed the ELPV cells are split exactly as the demo's ingest step splits them
(`padim_quality.elpv_split`: 60% of the normal cells of each type train, the other normals and
every probability-1.0 cell test). Per cell type (mono, poly) one model of each detector is fitted
on that type's normal training cells, with the pipeline's decoder (`decode_rgb`, 256 px):

- padim: the demo's model (`padim_quality.adpipe_scores`), channel subset seed 0;
- pfm: `pipelines.models.pfm` with its defaults (Lite0 <-> Lite2, stages 1-3, latent 200, Adam
  3e-3/3e-4/3e-4), --pfm-steps steps of batch 8 drawn with a seeded generator from the training
  cells' features, computed once (no rotation augmentation here; the train stage adds it), the
  error variance over the last 50 steps; image score max (the paper's) and mean (the whole map).

Prints one line per split and detector and the mean and spread (sample std) over splits; a
difference within the spread is not a win. Also the test images/s of each detector's forward
pass (decode excluded) on this machine, measured in the same run.

    .venv/bin/python ops/bench/detector_quality.py [--splits 0,1,2,3,4] [--pfm-steps 1000] [--threads 2]

About 10 minutes per split on 2 CPU cores at 1000 steps.
Not tuned on ELPV: PFM's settings are the paper's; only the step count is set by the CPU budget.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from padim_quality import CATEGORIES, adpipe_scores, auroc_per_category, elpv_split  # noqa: E402


def pfm_scores(items: list[dict], steps: int, batch_size: int) -> tuple[dict[str, dict[str, float]], float, int]:
    """({"max" | "mean": {image_id: score}}, seconds scoring, test images scored)."""
    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb
    from pipelines.models.methods import GradientTrainingSpec, TrainingContext
    from pipelines.models.pfm import PfmParams
    from pipelines.models.pfm.model import IMPLEMENTATION as PFM

    params = PfmParams(training=GradientTrainingSpec(steps=steps), variance_steps=min(50, steps))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", default="0,1,2,3,4", help="comma-separated ELPV split seeds (0 is the demo's)")
    parser.add_argument("--pfm-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, float]]] = {}
    speed: dict[str, list[float]] = {}
    for split in [int(s) for s in args.splits.split(",")]:
        items = elpv_split(split)
        test_count = sum(r["split"] == "test" for r in items)
        padim, padim_seconds = adpipe_scores(items, channel_seed=0, batch_size=args.batch_size)
        pfm, pfm_seconds, pfm_count = pfm_scores(items, args.pfm_steps, args.batch_size)
        rows = {"padim": auroc_per_category(items, padim), "pfm (max)": auroc_per_category(items, pfm["max"]),
                "pfm (mean)": auroc_per_category(items, pfm["mean"])}
        speed.setdefault("padim", []).append(test_count / padim_seconds)
        speed.setdefault("pfm", []).append(pfm_count / pfm_seconds)
        for name, values in rows.items():
            results.setdefault(name, []).append(values)
            print(f"split {split} {name:11s} " + "  ".join(f"{c} {values[c]:.4f}" for c in CATEGORIES), flush=True)
    print(f"\nimage AUROC over splits {args.splits} (mean +- sample std), PFM {args.pfm_steps} steps:")
    for name, values in results.items():
        cells = []
        for category in CATEGORIES:
            numbers = [v[category] for v in values]
            spread = statistics.stdev(numbers) if len(numbers) > 1 else float("nan")
            cells.append(f"{category} {statistics.mean(numbers):.4f} +- {spread:.4f}")
        print(f"  {name:11s} " + "  ".join(cells))
    print(f"forward images/s (decode excluded, batch {args.batch_size}, {args.threads} threads): "
          + ", ".join(f"{k} {statistics.mean(v):.1f}" for k, v in speed.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
