"""The anomalous test cells that no detector finds: where ELPV's image AUROC stops for all of them.

Reads the per-image test scores that `detector_quality.py --scores-out DIR` writes (one JSON per
split) and, per cell type, lists the anomalous cells that *every* given detector scores below the
median of that type's normal test cells: misses they share. Prints each detector's image AUROC
with and without those cells. Without them is not a result: it is the room left above the
detectors if those cells carry a defect no image at this resolution shows (ELPV's labels are
experts' calls on full-module electroluminescence images). With --sheet PNG, a contact sheet of the
shared misses (contrast-stretched, full resolution) above as many normal test cells, to look at.

    .venv/bin/python ops/bench/shared_misses.py padim=/tmp/l1l2/split-0.json#padim \\
        pfm=/tmp/l1l2/split-0.json#"pfm (max)" [--sheet /tmp/misses.png --split 0]

Each argument: LABEL=PATH#DETECTOR (DETECTOR: a key of the file's "scores").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from padim_quality import CATEGORIES  # noqa: E402


def load(argument: str) -> tuple[str, list[dict], dict[str, float]]:
    label, _, rest = argument.partition("=")
    path, _, detector = rest.partition("#")
    if not label or not path or not detector:
        raise SystemExit(f"expected LABEL=PATH#DETECTOR, got {argument!r}")
    data = json.loads(Path(path).read_text())
    if detector not in data["scores"]:
        raise SystemExit(f"{path} has no detector {detector!r}; it has {sorted(data['scores'])}")
    return label, data["test"], data["scores"][detector]


def shared_misses(test: list[dict], scores: dict[str, dict[str, float]], category: str, label: int) -> list[str]:
    """Cells of `category` with `label` that every detector puts on the other class's side of that
    class's median: anomalous cells below the normals' median (label 1), normal cells above the
    anomalous cells' median (label 0, false alarms)."""
    cells = [t for t in test if t["category"] == category]
    sign = 1 if label == 1 else -1  # compare with `<` for misses, `>` for false alarms
    shared = None
    for by_image in scores.values():
        median = float(np.median([by_image[t["image_id"]] for t in cells if t["label"] != label]))
        wrong = {t["image_id"] for t in cells if t["label"] == label and sign * by_image[t["image_id"]] < sign * median}
        shared = wrong if shared is None else shared & wrong
    return sorted(shared or ())


def auroc(test: list[dict], by_image: dict[str, float], category: str, leave_out: set[str]) -> float:
    cells = [t for t in test if t["category"] == category and t["image_id"] not in leave_out]
    return float(roc_auc_score([t["label"] for t in cells], [by_image[t["image_id"]] for t in cells]))


def contact_sheet(paths: list[Path], normals: list[Path], out: Path) -> None:
    from PIL import Image, ImageOps

    def row(files: list[Path]) -> np.ndarray:
        tiles = [np.asarray(ImageOps.autocontrast(Image.open(f).convert("L").resize((300, 300)), cutoff=1))
                 for f in files]
        return np.concatenate(tiles, axis=1)

    Image.fromarray(np.concatenate([row(paths), row(normals)], axis=0)).save(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scores", nargs="+", help="LABEL=PATH#DETECTOR, one per detector")
    parser.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG of the shared misses")
    parser.add_argument("--sheet-count", type=int, default=8)
    parser.add_argument("--split", type=int, default=0, help="the split seed of the score files (for --sheet)")
    args = parser.parse_args()
    loaded = [load(a) for a in args.scores]
    test = loaded[0][1]
    ids = sorted(t["image_id"] for t in test)
    for label, other, _ in loaded[1:]:
        if sorted(t["image_id"] for t in other) != ids:
            raise SystemExit(f"{label}: not the same test cells as {loaded[0][0]} (another split?)")
    scores = {label: by_image for label, _, by_image in loaded}
    sheet_misses: list[str] = []
    for category in CATEGORIES:
        missed = shared_misses(test, scores, category, label=1)
        alarms = shared_misses(test, scores, category, label=0)
        counts = [sum(t["label"] == c for t in test if t["category"] == category) for c in (0, 1)]
        print(f"{category}: for all of {', '.join(scores)},")
        print(f"  {len(missed)} of {counts[1]} anomalous test cells score below the normal cells' median: "
              f"{' '.join(m.rsplit('/', 1)[-1] for m in missed)}")
        print(f"  {len(alarms)} of {counts[0]} normal test cells score above the anomalous cells' median: "
              f"{' '.join(m.rsplit('/', 1)[-1] for m in alarms)}")
        for label, by_image in scores.items():
            print(f"  {label:<12} AUROC {auroc(test, by_image, category, set()):.4f}, without the shared misses "
                  f"{auroc(test, by_image, category, set(missed)):.4f}, without misses and false alarms "
                  f"{auroc(test, by_image, category, set(missed) | set(alarms)):.4f}")
        sheet_misses += missed[: args.sheet_count - len(sheet_misses)]
    if args.sheet and sheet_misses:
        from padim_quality import elpv_split

        files = {r["image_id"]: Path(r["file"]) for r in elpv_split(args.split)}
        category_of = {t["image_id"]: t["category"] for t in test}
        normals_by_category = {c: [t["image_id"] for t in test if t["label"] == 0 and t["category"] == c]
                               for c in CATEGORIES}
        # under each miss a normal cell of its type
        normals = [files[normals_by_category[category_of[m]].pop(0)] for m in sheet_misses]
        contact_sheet([files[m] for m in sheet_misses], normals, args.sheet)
        print(f"contact sheet: {args.sheet} (top: shared misses; bottom: normal test cells)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
