"""Speed of diffusion_kl scoring against the bare U-Net calls it needs (issue: ratio goal >= 0.8).

For one U-Net configuration, times in one process, interleaved (these machines are noisy):
- `bare`: the U-Net forward on a (K * B)-image batch, K = the scoring timesteps, B = the batch;
- `method`: `DiffusionKl.score` on B images (noise drawn per image id, q-sample, the U-Net call,
  the posterior and the model's Gaussians, the KL, normalisation, blur, the top-pixel mean);
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

from pipelines.models.diffusion.config import DdpmConfig  # noqa: E402
from pipelines.models.diffusion_kl import DiffusionKlConfig, DiffusionKlScoring  # noqa: E402
from pipelines.models.diffusion_kl.model import IMPLEMENTATION  # noqa: E402

CHANNELS = {64: (64, 128, 128, 256), 128: (64, 128, 128, 256, 256), 256: (128, 128, 256, 256, 512, 512)}
ATTENTION = {64: (2,), 128: (3,), 256: (4,)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, choices=sorted(CHANNELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the U-Net (GPU)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_config = DdpmConfig(image_size=args.size, block_out_channels=CHANNELS[args.size],
                              attention_blocks=ATTENTION[args.size], layers_per_block=2, learned_variance=True)
    config = DiffusionKlConfig(model=model_config, scoring=DiffusionKlScoring())
    detector = IMPLEMENTATION.build(config, None).to(args.device).eval()
    if args.device.startswith("cuda"):
        detector.unet.to(memory_format=torch.channels_last)
    count = len(config.scoring.timesteps)
    images = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    ids = [f"image-{i}" for i in range(args.batch)]
    unet_input = torch.randn(args.batch * count, 3, args.size, args.size, device=args.device)
    unet_t = torch.randint(0, 1000, (args.batch * count,), device=args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def bare() -> None:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            detector.unet(unet_input, unet_t)

    def method() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            detector.score(images, ids)

    timings: dict[str, list[float]] = {"bare": [], "method": []}
    for _ in range(2):  # warm-up
        bare()
        method()
    for _ in range(args.repeats):
        for name, call in (("bare", bare), ("method", method)):
            sync()
            start = time.perf_counter()
            call()
            sync()
            timings[name].append(time.perf_counter() - start)
    bare_s, method_s = statistics.median(timings["bare"]), statistics.median(timings["method"])
    print(f"diffusion_kl scoring, {args.size} px, U-Net channels {list(CHANNELS[args.size])}, "
          f"{count} timesteps per image, batch {args.batch}, {args.device}{' bf16' if args.bf16 else ''}, "
          f"torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print(f"  bare U-Net calls: {args.batch / bare_s:8.1f} images/s ({bare_s * 1000:.1f} ms per batch)")
    print(f"  diffusion_kl:     {args.batch / method_s:8.1f} images/s ({method_s * 1000:.1f} ms per batch)")
    print(f"  ratio method / bare images/s: {bare_s / method_s:.2f} (goal >= 0.8); "
          f"outside the U-Net: {max(0.0, 1 - bare_s / method_s) * 100:.0f}% of the method's time")


if __name__ == "__main__":
    main()
