"""Honest figures for checkpoints trained before the twin groups (PIPELINE_VERSION 1): the test images none of
whose twins (exact, mirrored, re-encoded or re-processed copies: `data.twins`) that checkpoint could have trained
on, re-scored from the per-image predictions the evaluation already wrote, beside the old figures.

The training pool of every such checkpoint is described by data, not by a training config:
`results/splits/<dataset hash>.json` lists the train and validation files of the split they were drawn from
(validation counts too: it chose their epochs and fitted their temperatures). The leave-one-dataset-out and
grouped-validation checkpoints trained on a subset of that pool, so the same clean set is conservative for them.
The twin groups come from a data report of the current pipeline (`python -m braintumor_flax.data --json`).

    python -m braintumor_flax.evaluation.honest --report results/data_report.json --out results/honest.json

Also the union of the two test sets with every picture counted once: BRISC 2025 test and Kaggle Testing share
many slices, so they are not two independent samples.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from braintumor_flax.evaluation.metrics import bootstrap_indices, percentile_ci

TEST_FILES = {"brisc2025_test": "predictions_tumor_{}brisc2025_test.csv",
              "kaggle_test": "predictions_tumor_{}kaggle_test.csv"}  # {}: "ablation_" for the ablation's
VIEW_FILE = "predictions_view_brisc2025_test.csv"
SEGMENTATION_FILES = {"brisc2025_test": "segmentation_test_brisc2025.csv"}
# The evaluated runs of the v1 split, and where each one's per-image predictions are.
LEGACY_RUNS = {
    "shared-frozen3-refit (served)": "results/shared-frozen3-refit",
    "shared-frozen3": "results/shared-frozen3",
    "faithful": "results",
    "shared-frozen3-refit, validation by groups": "results/shared-frozen3-refit-grouped",
    "shared-frozen3-refit-joint": "results/shared-frozen3-refit-joint",
    "shared-frozen4-192-refit": "results/shared-frozen4-192-refit",
    "shared-frozen3-style": "results/shared-frozen3-style",
    "faithful-no-view (ablation)": "results#ablation",
}
SERVED_SEGMENTATION = "results"  # results/segmentation_test_*.csv: the served decoder


def twin_groups(report: dict[str, Any]) -> dict[str, int]:
    """Path → group number for every file with a copy; a file absent has none (data report `twin_groups`)."""
    return {path: k for k, paths in enumerate(report["twin_groups"]) for path in paths}


def training_pool(record: dict[str, Any]) -> set[str]:
    """The files a checkpoint of this split saw in training or validation."""
    return set(record["splits"]["train"]) | set(record["splits"]["val"])


def clean_mask(paths: list[str], groups: dict[str, int], pool: set[str]) -> np.ndarray:
    """True for the test files with no copy in `pool` (nor in it themselves)."""
    seen = {groups[p] for p in pool if p in groups}
    return np.array([p not in pool and groups.get(p, -1) not in seen for p in paths], bool)


def first_of_each_picture(paths: list[str], groups: dict[str, int]) -> np.ndarray:
    """True for one file of each picture among `paths` (the first in path order: BRISC before Kaggle)."""
    keep = np.zeros(len(paths), bool)
    taken: set[object] = set()
    for k in sorted(range(len(paths)), key=lambda k: paths[k]):
        key = groups.get(paths[k], paths[k])
        if key not in taken:
            taken.add(key)
            keep[k] = True
    return keep


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def accuracy_figures(rows: list[dict[str, str]], *, recall_of: str | None = "meningioma", seed: int = 0,
                     n_resamples: int = 1000) -> dict[str, Any]:
    """Accuracy with a seeded bootstrap 95 % interval, and one class's recall."""
    correct = np.array([r["true"] == r["predicted"] for r in rows], float)
    out: dict[str, Any] = {"n": len(rows)}
    if not len(rows):
        return out
    resampled = correct[bootstrap_indices(len(rows), n_resamples, seed)].mean(axis=1)
    out |= {"accuracy": float(correct.mean()), "accuracy_ci95": percentile_ci(resampled)}
    if recall_of is not None:
        of = [r for r in rows if r["true"] == recall_of]
        out[f"{recall_of}_recall"] = float(np.mean([r["predicted"] == recall_of for r in of])) if of else None
    return out


def dice_figures(rows: list[dict[str, str]], *, seed: int = 0, n_resamples: int = 1000) -> dict[str, Any]:
    """Mean Dice over the tumour slices (rows with a true mask) with a bootstrap 95 % interval."""
    dice = np.array([float(r["dice"]) for r in rows if r.get("dice") not in (None, "") and
                     float(r.get("true_area_px") or 0) > 0])
    if not len(dice):
        return {"n": 0}
    resampled = dice[bootstrap_indices(len(dice), n_resamples, seed)].mean(axis=1)
    return {"n": len(dice), "mean": float(dice.mean()), "ci95": percentile_ci(resampled)}


def run_figures(folder: Path, groups: dict[str, int], pool: set[str]) -> dict[str, Any] | None:
    """All and clean figures of one evaluated run (None when its predictions are missing); `folder#ablation`: the
    ablation checkpoint evaluated beside that folder's main one."""
    folder_name, _, which = str(folder).partition("#")
    folder, prefix = Path(folder_name), f"{which}_" if which else ""
    tables = {name: read_rows(folder / file.format(prefix)) for name, file in TEST_FILES.items()
              if (folder / file.format(prefix)).is_file()}
    if not tables:
        return None
    meta = (json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}).get(
        "meta", {})
    if which:  # the ablation's own record sits in the main run's metrics
        meta = {"checkpoint": meta.get("ablation_checkpoint"), "recipe": "faithful-no-view"}
    out: dict[str, Any] = {"folder": str(folder), "checkpoint": meta.get("checkpoint"),
                           "checkpoint_fingerprint": meta.get("checkpoint_fingerprint"), "recipe": meta.get("recipe"),
                           "tumor": {}}
    clean_rows: list[dict[str, str]] = []
    for name, rows in tables.items():
        mask = clean_mask([r["path"] for r in rows], groups, pool)
        kept = [r for r, m in zip(rows, mask, strict=True) if m]
        clean_rows += kept
        out["tumor"][name] = {"all": accuracy_figures(rows), "clean": accuracy_figures(kept)}
    once = first_of_each_picture([r["path"] for r in clean_rows], groups)
    out["tumor"]["union_clean"] = accuracy_figures([r for r, m in zip(clean_rows, once, strict=True) if m])
    if not which and (folder / VIEW_FILE).is_file():
        rows = read_rows(folder / VIEW_FILE)
        mask = clean_mask([r["path"] for r in rows], groups, pool)
        out["view"] = {"all": accuracy_figures(rows, recall_of=None),
                       "clean": accuracy_figures([r for r, m in zip(rows, mask, strict=True) if m], recall_of=None)}
    return out


def segmentation_figures(folder: Path, groups: dict[str, int], pool: set[str]) -> dict[str, Any] | None:
    path = folder / SEGMENTATION_FILES["brisc2025_test"]
    if not path.is_file():
        return None
    rows = read_rows(path)
    mask = clean_mask([r["path"] for r in rows], groups, pool)
    return {"brisc2025_test": {"all": dice_figures(rows),
                               "clean": dice_figures([r for r, m in zip(rows, mask, strict=True) if m])}}


def honest_figures(report: dict[str, Any], record: dict[str, Any], runs: dict[str, str] | None = None,
                   root: Path = Path(".")) -> dict[str, Any]:
    groups, pool = twin_groups(report), training_pool(record)
    out: dict[str, Any] = {"dataset_hash": record["dataset_hash"], "pool": len(pool), "runs": {}}
    for name, folder in (runs or LEGACY_RUNS).items():
        figures = run_figures(Path(f"{root / folder}"), groups, pool)
        if figures is not None:
            out["runs"][name] = figures | {"folder": folder}
    seg = segmentation_figures(root / SERVED_SEGMENTATION, groups, pool)
    if seg is not None:
        out["segmentation_served"] = seg
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m braintumor_flax.evaluation.honest",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default="results/data_report.json", help="a data report of the current pipeline")
    ap.add_argument("--split-record", default="results/splits/a93346f63416810f.json",
                    help="the train / validation files of the split the checkpoints were trained on")
    ap.add_argument("--out", default="results/honest.json")
    args = ap.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    if "twin_groups" not in report:
        print(f"{args.report} has no twin groups: write it with `python -m braintumor_flax.data --json`",
              file=sys.stderr)
        return 1
    figures = honest_figures(report, json.loads(Path(args.split_record).read_text()))
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    for name, run in figures["runs"].items():
        t = run["tumor"]
        print(f"{name:<44} " + "  ".join(
            f"{k}: {v['all']['accuracy']:.3f} -> {v['clean']['accuracy']:.3f} (n={v['clean']['n']})"
            for k, v in t.items() if k != "union_clean") + f"  union {t['union_clean']['accuracy']:.3f} "
            f"(n={t['union_clean']['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
