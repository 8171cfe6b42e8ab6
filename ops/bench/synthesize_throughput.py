"""Synthetic images per second of the whole `synthesize` job on local Ray (Perlin + texture).

(a) the recipe alone, in this process: `synthesize_one` (Perlin mask, texture crop, blend) + the
    two PNG encodings a row needs, on the ELPV cells already decoded in memory, 1 thread;
(b) the real stage through `run_job` on an embedded Ray: ELPV normal training cells in the local S3
    store -> decode tasks -> synthesizer actor(s) -> Parquet parts + manifest + quality summary.
Printed: images/s of both and their ratio (how much of the recipe's speed the job keeps).

    .venv/bin/python ops/bench/synthesize_throughput.py [--image-size 256] [--workers 1]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlib as bench  # noqa: E402


def recipe_rate(cells, textures, count: int) -> float:
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.synthesis.perlin import PerlinConfig
    from pipelines.synthesis.recipe import SourcePlan, synthesize_one

    torch.set_num_threads(1)
    plan = SourcePlan("texture", 1.0, (0.2, 1.0))
    started = time.perf_counter()
    for i in range(count):
        result = synthesize_one(cells[i % len(cells)], plan, i, perlin=PerlinConfig(), textures=textures)
        for picture in (result.image, result.mask.astype(np.uint8) * 255):
            Image.fromarray(picture).save(io.BytesIO(), format="PNG")
    return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--recipe-images", type=int, default=200)
    args = parser.parse_args(argv)
    from pipelines import datasets
    from pipelines.data.preprocess import decode_rgb
    from pipelines.orchestrator import run_job
    from pipelines.spec import parse_spec

    with bench.bench_stack():
        setup = run_job(parse_spec({
            "kind": "pipeline", "name": "bench-synth-setup", "storage": {"root": bench.ROOT},
            "steps": [
                {"name": "elpv", "kind": "ingest", "source": {"type": "elpv"}, "outputs": {"dataset": "elpv"}},
                {"name": "textures", "kind": "ingest", "source": {"type": "skimage"},
                 "outputs": {"dataset": "textures"}}]}), echo=bench.quiet).results
        elpv, textures = setup["elpv"].output, setup["textures"].output
        table = datasets.read_table(bench.location(elpv), columns=["image", "split", "label"])
        cells = [decode_rgb(r["image"], args.image_size) for r in table.to_pylist()[:64]
                 if r["split"] == "train" and r["label"] == 0]
        texture_images = [decode_rgb(b, args.image_size) for b in
                          datasets.read_table(bench.location(textures), columns=["image"]).column("image").to_pylist()]
        bench.log(f"(a) recipe alone on {len(cells)} decoded cells, 1 thread")
        bare = recipe_rate(cells, texture_images, args.recipe_images)
        bench.log(f"    {bare:.1f} images/s")
        bench.log(f"(b) synthesize stage, {args.workers} actor(s), Perlin + texture, every normal training cell")
        started = time.monotonic()
        result = run_job(parse_spec({
            "kind": "synthesize", "name": "bench-synth", "storage": {"root": bench.ROOT},
            "inputs": {"dataset": elpv}, "outputs": {"dataset": "elpv-synthetic"}, "image_size": args.image_size,
            "sources": [{"type": "texture", "textures": {"dataset": textures}}],
            "resources": {"workers": args.workers, "batch_size": 16}}), echo=bench.prefixed("synth")).results
        wall = time.monotonic() - started
        step = next(iter(result.values()))
    made = step.details["synthetic"]
    print()
    print(f"synthesize throughput: ELPV normal training cells, {args.image_size} px, Perlin + texture, "
          f"{args.workers} actor(s), 2 cores")
    print(f"  recipe alone (mask + texture + blend + 2 PNG encodings): {bare:.1f} images/s")
    print(f"  whole job: {made} images, stage figure {step.details['images_per_second']} images/s "
          f"({made / wall:.1f} images/s over the {wall:.1f} s wall, start-up, manifest and quality summary included)")
    print(f"  ratio job / recipe: {step.details['images_per_second'] / bare:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
