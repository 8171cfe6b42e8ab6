"""Speed of diffusion_kl and cgddm scoring against the bare U-Net calls each needs (issue: ratio
goal >= 0.8).

For one U-Net configuration, times in one process, interleaved (these machines are noisy):
- diffusion_kl: `bare`, one U-Net forward on a (K * B)-image batch (K = the scoring timesteps, B
  = the batch); `method`, `DiffusionKl.score` on B images (noise per image id, q-sample, the U-Net
  call, the two Gaussians, the KL, normalisation, blur, the top-pixel mean);
- cgddm: `bare`, as many U-Net forwards on B images as its reconstruction makes (default
  settings: 11 DDIM steps + 6 blur-guided ones = 17); `method`, `Cgddm.score` on B images (the
  reconstruction, the feature backbone on input and reconstruction, the maps);
and prints images/s of each and their ratio, with the fraction of the method's time outside the
U-Net. Weights are untrained (speed does not depend on them).

    .venv/bin/python ops/bench/diffusion_scoring.py                   # 64 px on the CPU
    .venv/bin/python ops/bench/diffusion_scoring.py --size 256 --device cuda --batch 16 --bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pipelines.models.cgddm import CgddmConfig, CgddmScoring  # noqa: E402
from pipelines.models.cgddm.model import IMPLEMENTATION as CGDDM  # noqa: E402
from pipelines.models.diffusion.config import DdpmConfig  # noqa: E402
from pipelines.models.diffusion_kl import DiffusionKlConfig, DiffusionKlScoring  # noqa: E402
from pipelines.models.diffusion_kl.model import IMPLEMENTATION as DIFFUSION_KL  # noqa: E402

CHANNELS = {64: (64, 128, 128, 256), 128: (64, 128, 128, 256, 256), 256: (128, 128, 256, 256, 512, 512)}
ATTENTION = {64: (2,), 128: (3,), 256: (4,)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, choices=sorted(CHANNELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast for the U-Net and channels_last, the score stage's precision bf16 (GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_config = DdpmConfig(image_size=args.size, block_out_channels=CHANNELS[args.size],
                              attention_blocks=ATTENTION[args.size], layers_per_block=2, learned_variance=True)
    images = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    ids = [f"image-{i}" for i in range(args.batch)]
    print(f"{args.size} px, U-Net channels {list(CHANNELS[args.size])} (2 layers per level, learned variance), "
          f"batch {args.batch}, {args.device}{' bf16' if args.bf16 else ''}, torch threads {torch.get_num_threads()}; "
          f"median of {args.repeats}, interleaved")

    kl = DIFFUSION_KL.build(DiffusionKlConfig(model=model_config, scoring=DiffusionKlScoring()), None)
    count = len(kl.config.scoring.timesteps)
    report("diffusion_kl", kl, images, ids, args, unet_calls=1, unet_batch=args.batch * count,
           note=f"{count} timesteps per image in one U-Net call")
    cg = CGDDM.build(CgddmConfig(model=model_config, scoring=CgddmScoring()), None)
    _, calls = cg.to(args.device).reconstructions(images, ids)
    report("cgddm", cg, images, ids, args, unet_calls=calls, unet_batch=args.batch,
           note=f"{calls} U-Net calls per batch (DDIM from index {cg.config.scoring.start_step}, blur-guided steps)")


def report(name: str, detector, images: torch.Tensor, ids: list[str], args, *, unet_calls: int, unet_batch: int,
           note: str) -> None:
    detector = detector.to(args.device).eval()
    if args.bf16:  # what the score stage's Scorer does with precision bf16 (auto on GPU workers)
        detector.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    unet_input = torch.randn(unet_batch, 3, args.size, args.size, device=args.device)
    if args.bf16:
        unet_input = unet_input.contiguous(memory_format=torch.channels_last)
    unet_t = torch.randint(0, 1000, (unet_batch,), device=args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare() -> None:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            for _ in range(unet_calls):
                detector.unet(unet_input, unet_t)

    def method() -> None:  # the network calls under autocast, the rest float32, as the stage runs it
        detector.score(images, ids, autocast_dtype=torch.bfloat16 if args.bf16 else None)

    timings: dict[str, list[float]] = {"bare": [], "method": []}
    bare()  # warm-up
    method()
    for _ in range(args.repeats):
        for key, call in (("bare", bare), ("method", method)):
            sync()
            start = time.perf_counter()
            call()
            sync()
            timings[key].append(time.perf_counter() - start)
    bare_s, method_s = statistics.median(timings["bare"]), statistics.median(timings["method"])
    batch = images.shape[0]
    print(f"{name}: {note}")
    print(f"  bare U-Net calls: {batch / bare_s:8.2f} images/s ({bare_s * 1000:.0f} ms per batch)")
    print(f"  {name + ':':17} {batch / method_s:8.2f} images/s ({method_s * 1000:.0f} ms per batch)")
    print(f"  ratio {bare_s / method_s:.2f} (goal >= 0.8); outside the U-Net: "
          f"{max(0.0, 1 - bare_s / method_s) * 100:.0f}% of the method's time")


if __name__ == "__main__":
    main()
