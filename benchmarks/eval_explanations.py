"""Does the tumour classifier look at the tumour? Explanation maps and occlusions against BRISC's expert masks.

The README's Grad-CAM check found the served model's map points at the tumour no more often than chance. Is
that the map's fault or the model's? On the BRISC slices with a tumour mask (validation, and BRISC test), for
the class the model predicts:

* **maps** (`models.forward`, `explain=True`): Grad-CAM (mean gradient per channel, what the app shows) and
  HiResCAM (gradient × activation per position: for a Flatten head each position's first-order share of the
  logit, the faithful choice) — pointing game and share of energy inside the mask, next to a random point's;
* **occlusions** (the slice edited, then answered again; a region is filled with the mean of a 4-px ring of
  tissue around it, the frame is blacked out):
  - the tumour itself (the mask grown by 2 px);
  - the same shape mirrored onto the other side of the head (a control of equal area, on slices where the
    mirror lies mostly outside the tumour and inside the head);
  - the 32 × 32 px patch under the Grad-CAM peak, and one at a random point inside the head (same seed);
  - a 16 px frame along the slice's borders;
  for each, how often the answer changes, how often it is "no tumour" before and after, and the accuracy, with
  bootstrap 95 % intervals. The frame is 44 % of a 128 px slice; the tumour (grown) a few per cent. If
  erasing the tumour changes few answers, the model answers from elsewhere and no map of its evidence can
  point at the tumour.

    python benchmarks/eval_explanations.py [--model checkpoints-shared-trunk] [--out results/explanations.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_common import cpu_ticks, finish  # noqa: E402
from scipy import ndimage  # noqa: E402

from braintumor_flax.evaluation.segmentation import cam_against_mask, mean_ci  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.labels import TUMOR_CLASSES  # noqa: E402
from braintumor_flax.models.forward import CAM_METHODS, Forward  # noqa: E402
from braintumor_flax.paths import default_data_dir  # noqa: E402
from braintumor_flax.training.fit_statistics import prepare_training_data  # noqa: E402
from braintumor_flax.training.segmentation import SegData, SegTrainConfig  # noqa: E402

NO_TUMOUR = TUMOR_CLASSES.index("no_tumor")
HEAD_LEVEL = 15  # grey level above which a pixel counts as inside the head (the background is black)
PATCH, FRAME, GROW, RING = 32, 16, 2, 4  # px on the model grid


def rate(values: np.ndarray) -> dict:
    """The mean with its bootstrap 95 % interval (the segmentation evaluation's), rounded for the report."""
    ci = mean_ci(np.asarray(values, np.float64), n_resamples=1000, seed=0)
    return {"n": ci["n"], "mean": round(ci["mean"], 4), "ci95": [round(v, 4) for v in ci["ci95"]]}


def filled(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """`region` replaced by the mean colour of a ring of pixels around it."""
    ring = ndimage.binary_dilation(region, iterations=RING) & ~region
    out = image.copy()
    out[region] = (image[ring] if ring.any() else image.reshape(-1, 3)).mean(axis=0).astype(np.uint8)
    return out


def patch_at(shape: tuple[int, int], y: int, x: int) -> np.ndarray:
    region = np.zeros(shape, bool)
    y0, x0 = np.clip([y - PATCH // 2, x - PATCH // 2], 0, [shape[0] - PATCH, shape[1] - PATCH])
    region[y0:y0 + PATCH, x0:x0 + PATCH] = True
    return region


def occlusions(image: np.ndarray, mask: np.ndarray, cam: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray | None]:
    """Every edited copy of one slice (None where a control does not apply to it)."""
    size = mask.shape[0]
    tumour = ndimage.binary_dilation(mask, iterations=GROW)
    head = image.mean(axis=-1) > HEAD_LEVEL
    mirror = tumour[:, ::-1] & ~tumour
    mirror_ok = mirror.sum() >= 0.5 * tumour.sum() and (mirror & head).sum() >= 0.5 * mirror.sum()
    cy, cx = np.unravel_index(int(np.argmax(cam)), cam.shape)
    cell = size // cam.shape[0]
    inside = np.argwhere(head)
    ry, rx = inside[rng.integers(len(inside))] if len(inside) else (size // 2, size // 2)
    frame = np.ones((size, size), bool)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    return {"tumour": filled(image, tumour),
            "tumour_mirrored_control": filled(image, mirror) if mirror_ok else None,
            "gradcam_peak_patch": filled(image, patch_at((size, size), cy * cell + cell // 2, cx * cell + cell // 2)),
            "random_patch_in_head": filled(image, patch_at((size, size), ry, rx)),
            "border_frame_black": np.where(frame[..., None], 0, image).astype(np.uint8)}


def evaluate_split(forward: Forward, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    maps = {m: forward(images, explain=True, cam_method=m) for m in CAM_METHODS}
    base = maps["gradcam"].tumor_logits.argmax(axis=1)
    entry: dict = {"slices": int(len(images)), "accuracy": rate(base == labels),
                   "random_point_score": round(float(masks.mean(axis=(1, 2)).mean()), 4), "maps": {}}
    for method, out in maps.items():
        scores = [cam_against_mask(out.cam[i], masks[i]) for i in range(len(images))]
        entry["maps"][method] = {"pointing_game": rate([s[0] for s in scores]),
                                 "energy_inside": rate([s[1] for s in scores])}
    rng = np.random.default_rng(seed)
    edits = [occlusions(images[i], masks[i], maps["gradcam"].cam[i], rng) for i in range(len(images))]
    entry["occlusions"] = {}
    for name in edits[0]:
        rows = np.array([e[name] is not None for e in edits])
        edited = np.stack([e[name] for e in edits if e[name] is not None])
        answer = forward(edited, want_view=False).tumor_logits.argmax(axis=1)
        before, truth = base[rows], labels[rows]
        entry["occlusions"][name] = {"slices": int(rows.sum()), "answer_changed": rate(answer != before),
                                     "no_tumour_before": rate(before == NO_TUMOUR),
                                     "now_no_tumour": rate(answer == NO_TUMOUR),
                                     "accuracy_before": rate(before == truth), "accuracy_after": rate(answer == truth)}
    return entry


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "checkpoints-shared-trunk"))
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--splits", nargs="+", default=["val", "test_brisc2025"])
    ap.add_argument("--max-images", type=int, default=None, help="per split (a quick run)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "explanations.json")
    args = ap.parse_args(argv)
    ticks, t0 = cpu_ticks(), time.perf_counter()
    pipeline = BrainTumorPipeline.from_pretrained(args.model)
    data_dir = args.data_dir or default_data_dir()
    data = prepare_training_data(pipeline, data_dir)
    forward = Forward.from_pipeline(pipeline, batch_size=32)
    result: dict = {"model": str(args.model), "splits": {},
                    "note": "BRISC slices with a tumour mask; maps and occlusions for the predicted class"}
    for name in args.splits:
        split = data.splits[name]
        seg = SegData.of(split, data_dir, SegTrainConfig(max_images=args.max_images))
        tumour = seg.masks.any(axis=(1, 2))
        result["splits"][name] = evaluate_split(forward, seg.images[tumour], seg.masks[tumour],
                                                split.tumor[seg.rows[tumour]], seed=0)
        log(f"{name}: {result['splits'][name]}")
    return finish(args.out, result, started=t0, ticks=ticks)


if __name__ == "__main__":
    raise SystemExit(main())
