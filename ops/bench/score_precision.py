"""Bare PaDiM model images/s at 256 x 256: float32 vs bf16 autocast vs channels_last (and both).

Issue #3 asks for these figures on the GPU machine; the script runs on any device (--device,
default cuda when present, else cpu), so it is exercised here on the CPU too.

Set-up (not timed): the demo's PaDiM (EfficientNet-Lite0 stages 1-3, 100 channels, 256 px) fitted
in float32 on --train normal mono cells of ELPV (the demo's split 0), and --images mono test
cells (normal and defective, spread evenly) decoded into memory with the pipeline's decoder.
Timed, per mode, in alternating rounds (--repeats; the median is printed): the model's whole
forward (backbone, embedding, Mahalanobis map, upsampling, blur, max) over all test images in
batches of --batch-size, inputs already on the device. Modes:
  fp32           float32, backbone weights and inputs in the default (NCHW) memory format;
  bf16           backbone under torch.autocast(bfloat16); PaDiM's distances stay float32 (the
                 model turns autocast off for them);
  channels_last  backbone weights and inputs in channels_last (NHWC): the scorer's default;
  bf16+cl        both.
Also printed per mode: the largest relative difference of image scores from fp32, and the image
AUROC of each mode's scores (whether the ranking moved).

    .venv/bin/python ops/bench/score_precision.py [--device cuda] [--images 256] [--train 64]
                     [--batch-size 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import PADIM  # noqa: E402  (also puts the repository on sys.path)

MODES = ("fp32", "bf16", "channels_last", "bf16+cl")


def main() -> int:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from pipelines.data.preprocess import decode_rgb
    from pipelines.data.sources import list_elpv
    from pipelines.models.inference import to_tensor
    from pipelines.models.padim import PadimConfig
    from pipelines.models.padim.model import Padim

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=256, help="mono test cells scored per mode (at most 548)")
    parser.add_argument("--train", type=int, default=64, help="normal mono cells the model is fitted on")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    items = [i for i in list_elpv(None, None, 0.6, 0) if i.label is not None]
    train = [i for i in items if i.split == "train" and i.category == "mono"][: args.train]
    mono_test = [i for i in items if i.split == "test" and i.category == "mono"]
    test = mono_test[:: max(1, len(mono_test) // args.images)][: args.images]  # spread over normals and defects

    def pixels(rows) -> np.ndarray:
        return np.stack([decode_rgb(Path(r.location.uri[len("file://"):]).read_bytes(), PADIM["image_size"])
                         for r in rows])

    config = PadimConfig(backbone=PADIM["backbone"], stages=tuple(PADIM["stages"]),
                         kept_channels=PADIM["kept_channels"], image_size=PADIM["image_size"], seed=PADIM["seed"])
    model = Padim(config).to(device)
    fit = model.new_statistics()
    train_pixels = pixels(train)
    for start in range(0, len(train), args.batch_size):
        fit.update(model.embed(to_tensor(train_pixels[start:start + args.batch_size], device)).cpu())
    model.set_gaussian(fit)
    model.to(device)
    test_pixels = pixels(test)
    batches = [to_tensor(test_pixels[start:start + args.batch_size], device)
               for start in range(0, len(test), args.batch_size)]
    labels = [r.label for r in test]
    print(f"PaDiM bare forward, {len(test)} ELPV test cells at {config.image_size} px, batch {args.batch_size}, "
          f"device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} threads'}), "
          f"torch {torch.__version__}", flush=True)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(mode: str) -> tuple[float, np.ndarray]:
        channels_last = mode in ("channels_last", "bf16+cl")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.extractor.set_memory_format(memory_format)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mode.startswith("bf16")
                    else contextlib.nullcontext())
        inputs = [b.contiguous(memory_format=memory_format) for b in batches]
        scores = []
        with torch.inference_mode(), autocast:
            model(inputs[0])  # warm-up (kernel selection, autocast caches)
            synchronize()
            started = time.perf_counter()
            for batch in inputs:
                scores.append(model(batch)[0])
            synchronize()
            seconds = time.perf_counter() - started
        return len(test) / seconds, torch.cat(scores).float().cpu().numpy()

    speeds: dict[str, list[float]] = {m: [] for m in MODES}
    scores: dict[str, np.ndarray] = {}
    for repeat in range(args.repeats):
        for mode in MODES:
            images_per_second, scores[mode] = run(mode)
            speeds[mode].append(images_per_second)
        print(f"  round {repeat + 1}: " + ", ".join(f"{m} {speeds[m][-1]:.1f}" for m in MODES) + " images/s",
              flush=True)

    base = statistics.median(speeds["fp32"])
    for mode in MODES:
        speed = statistics.median(speeds[mode])
        difference = float(np.max(np.abs(scores[mode] - scores["fp32"]) / np.abs(scores["fp32"])))
        print(f"{mode:>14}: {speed:8.1f} images/s ({speed / base:.2f}x fp32); scores differ from fp32 by at "
              f"most {difference:.1e} (relative); AUROC {roc_auc_score(labels, scores[mode]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
