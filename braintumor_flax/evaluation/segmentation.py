"""Segmentation on the deduplicated test sets, and how far Grad-CAM points at the tumour.

    python -m braintumor_flax.evaluation.segmentation --checkpoint checkpoints --data-dir ../shared/data --out results

* Dice and IoU per BRISC test slice with a mask, measured on the image's own pixels (the predicted mask mapped
  back from the model grid, `data.masks.grid_to_image`), overall, per tumour class and per plane, with
  bootstrap 95 % intervals of the mean;
* false-positive area on no-tumour slices (BRISC and Kaggle test);
* the app's disagreement warning: of the slices the classifier calls "no tumour", those the segmenter outlines a
  region on, and how many of them are tumours (every test slice, Kaggle's tumours without masks included);
* Grad-CAM of the served tumour model for the class it predicts (what the app shows): how often its peak lies
  inside the true mask (pointing game), and the share of its energy inside the mask, each next to what a
  uniformly random point / a uniform map would score (the mask's share of the image).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from braintumor_flax.data.masks import (
    NO_TUMOR,
    grid_to_image,
    mask_on_image,
    mask_path_for,
    outline_contradicts,
    read_mask,
    split_masks,
)
from braintumor_flax.data.splits import PreparedData, Split
from braintumor_flax.evaluation.metrics import bootstrap_indices, percentile_ci
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.labels import PLANES, TUMOR_CLASSES
from braintumor_flax.models.forward import Forward

TEST_SPLITS = ("test_brisc2025", "test_kaggle")


def mean_ci(values: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    """The mean of `values` with its percentile bootstrap 95 % interval (`n_resamples` draws from `seed`)."""
    values = np.asarray(values, np.float64)
    if not len(values):
        return {"n": 0, "mean": None, "ci95": [None, None]}
    means = values[bootstrap_indices(len(values), n_resamples, seed)].mean(axis=1)
    return {"n": int(len(values)), "mean": float(values.mean()), "ci95": percentile_ci(means)}


def cam_against_mask(cam: np.ndarray, grid_mask: np.ndarray) -> tuple[bool, float]:
    """A coarse explanation map [h, w] against the true mask on the model grid [S, S]: is its peak inside the
    mask (pointing game), and which share of its energy lies inside. The map is upsampled bilinearly onto the
    grid first; an all-zero map points nowhere and has no energy inside."""
    size = grid_mask.shape[0]
    fine = grid_to_image(cam, size, size)
    total = float(fine.sum())
    if total <= 0:
        return False, 0.0
    return bool(grid_mask.flat[int(np.argmax(fine))]), float(fine[grid_mask].sum() / total)


def slice_rows(split: Split, data_dir: Path, forward: Forward, threshold: float) -> list[dict[str, Any]]:
    """One row per slice: the classifier's answer and the predicted tumour area on the image's own pixels; where
    the true mask is known (BRISC tumour slices, every no-tumour slice) also Dice / IoU and the Grad-CAM checks."""
    grid_masks, known = split_masks(split, data_dir)
    out = forward(split.images, segment=True, explain=True)
    rows = []
    for i in range(len(split)):
        image_path = Path(data_dir) / split.paths[i]
        tumour = int(split.tumor[i]) != NO_TUMOR
        if tumour and known[i]:
            truth = read_mask(mask_path_for(image_path))
            shape = truth.shape
        else:
            with Image.open(image_path) as im:
                shape = im.size[::-1]
            truth = np.zeros(shape, bool) if known[i] else None
        pred = mask_on_image(out.mask_prob[i], *shape, threshold)
        row = {"path": split.paths[i], "tumor": TUMOR_CLASSES[split.tumor[i]],
               "plane": PLANES[split.plane[i]] if split.plane[i] >= 0 else "", "predicted_area_px": int(pred.sum()),
               "predicted_class": TUMOR_CLASSES[int(np.argmax(out.tumor_logits[i]))],  # temperatures keep argmax
               "true_area_px": "" if truth is None else int(truth.sum())}
        if tumour and truth is not None:
            inter, union = int((pred & truth).sum()), int((pred | truth).sum())
            row["dice"] = 2 * inter / (pred.sum() + truth.sum())
            row["iou"] = inter / union
            row["cam_peak_inside"], row["cam_energy_inside"] = cam_against_mask(out.cam[i], grid_masks[i])
            row["mask_fraction"] = float(grid_masks[i].mean())  # a random point's / a uniform map's score
        rows.append(row)
    return rows


def disagreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Slices the classifier calls "no tumour": how many the segmenter outlines a region on (the app's warning,
    `SliceResult.models_disagree`), and how many of those, and of the others, are tumours in truth."""
    answered_none = [r for r in rows if r["predicted_class"] == "no_tumor"]
    flagged: list[dict[str, Any]] = []
    quiet: list[dict[str, Any]] = []
    for r in answered_none:  # the app's rule, applied once per slice
        (flagged if outline_contradicts(r["predicted_class"], r["predicted_area_px"]) else quiet).append(r)
    tumours_flagged = sum(r["tumor"] != "no_tumor" for r in flagged)
    tumours_quiet = sum(r["tumor"] != "no_tumor" for r in quiet)
    missed = tumours_flagged + tumours_quiet
    return {"answered_no_tumour": len(answered_none), "flagged": len(flagged),
            "flagged_that_are_tumours": tumours_flagged,
            "share_of_flagged_that_are_tumours": tumours_flagged / len(flagged) if flagged else None,
            "unflagged_that_are_tumours": tumours_quiet,
            "missed_tumours_flagged": tumours_flagged / missed if missed else None}


def summarize(rows: list[dict[str, Any]], n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    tumour = [r for r in rows if "dice" in r]
    empty = [r for r in rows if r["tumor"] == "no_tumor"]
    summary: dict[str, Any] = {"slices": len(rows), "disagreement": disagreement(rows)}
    if tumour:
        dice = np.array([r["dice"] for r in tumour])
        summary["dice"] = mean_ci(dice, n_resamples, seed)
        summary["iou"] = mean_ci(np.array([r["iou"] for r in tumour]), n_resamples, seed)
        summary["dice_median"] = float(np.median(dice))
        summary["per_class"] = {c: mean_ci(np.array([r["dice"] for r in tumour if r["tumor"] == c]), n_resamples, seed)
                                for c in TUMOR_CLASSES if c != "no_tumor"}
        summary["per_plane"] = {p: mean_ci(np.array([r["dice"] for r in tumour if r["plane"] == p]), n_resamples, seed)
                                for p in PLANES if any(r["plane"] == p for r in tumour)}
        summary["gradcam"] = {
            "pointing_game": mean_ci(np.array([r["cam_peak_inside"] for r in tumour], float), n_resamples, seed),
            "energy_inside": mean_ci(np.array([r["cam_energy_inside"] for r in tumour]), n_resamples, seed),
            "random_baseline": float(np.mean([r["mask_fraction"] for r in tumour])),
        }
    if empty:
        area = np.array([r["predicted_area_px"] for r in empty])
        summary["no_tumour"] = {"n": len(empty), "median_false_positive_px": float(np.median(area)),
                                "mean_false_positive_px": float(area.mean()),
                                "share_with_any_false_positive": float((area > 0).mean())}
    return summary


def evaluate_segmentation(pipeline: BrainTumorPipeline, data: PreparedData, data_dir: str | Path, *,
                          batch_size: int = 32, n_resamples: int = 1000) -> tuple[dict[str, Any], dict[str, list]]:
    if pipeline.segmenter is None:
        raise ValueError("this checkpoint has no segmenter "
                         "(train one: python -m braintumor_flax.training.segmentation)")
    forward = Forward.from_pipeline(pipeline, batch_size=batch_size)
    threshold = pipeline.segmenter.config.threshold
    results: dict[str, Any] = {"threshold": threshold, "image_size": pipeline.segmenter.config.image_size,
                               "measured_on": "each image's own pixels (masks as stored in the data folder)",
                               "training": {k: v for k, v in pipeline.segmentation_record.items() if k != "history"},
                               "test_sets": {}}
    per_slice = {}
    for name in TEST_SPLITS:
        if name in data.splits:
            t = time.perf_counter()
            rows = slice_rows(data.splits[name], Path(data_dir), forward, threshold)
            per_slice[name] = rows
            results["test_sets"][name] = {**summarize(rows, n_resamples), "seconds": round(time.perf_counter() - t, 1)}
    return results, per_slice


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    from braintumor_flax.data.datasets import prepare
    from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, default_data_dir
    from braintumor_flax.training.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT_DIR)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    pipeline = BrainTumorPipeline.from_pretrained(args.checkpoint)
    trained = TrainConfig.from_record(pipeline.info.training)
    data_dir = args.data_dir or default_data_dir()
    data = prepare(data_dir, image_size=pipeline.view_model.config.image_size, **trained.split_args())
    results, per_slice = evaluate_segmentation(pipeline, data, data_dir)
    results["checkpoint"] = str(args.checkpoint)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "segmentation.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, rows in per_slice.items():
        write_csv(args.out / f"segmentation_{name}.csv", rows)
    print(json.dumps({k: {m: v.get(m) for m in ("dice", "no_tumour")} for k, v in results["test_sets"].items()},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
