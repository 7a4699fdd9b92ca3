"""Evaluate the checkpoints on the deduplicated test sets: metrics with bootstrap CIs, calibration, plots.

    python -m braintumor_flax.evaluation --checkpoint checkpoints --data-dir ../shared/data --out results \
        [--ablation-checkpoint PATH]

What it does, in order:
  1. `data.prepare` with the validation fraction and seed the checkpoint was trained with, so the
     validation split is the one training held out, and the test sets hold no duplicate of a training image.
  2. Raw logits of both models on `val`, BRISC test and Kaggle Testing (cached on disk, keyed by the
     checkpoint's weights and the exact pixels, so a rerun or the peer benchmark recomputes nothing).
     The frozen lower VGG blocks run once per image for every model that shares them (main + ablation).
  3. Temperatures fitted on `val` (view: BRISC rows, the only ones with planes; tumour: all rows).
  4. Per model × test set: accuracy, per-class precision / recall / F1 / AUC, macro averages, 95 %
     bootstrap CIs, confusion matrix, ECE / NLL / Brier before and after temperature scaling; tumour
     accuracy per plane on BRISC; the ablation side by side with a paired test.
  5. `results/metrics.json`, per-image CSVs and PNG figures; temperatures and metrics written into the
     checkpoint (`config.json`, `metrics.json`, model card; weights untouched); the README table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from braintumor_flax import calibration
from braintumor_flax.checkpoint_info import TrainingRecord
from braintumor_flax.data.datasets import PreparedData, Split, prepare, twin_group_ids
from braintumor_flax.evaluation import metrics
from braintumor_flax.evaluation.honest import first_of_each_picture
from braintumor_flax.evaluation.predictions import Checkpoint, Logits, load_checkpoint, log, predict_splits
from braintumor_flax.evaluation.report import (
    git_commit,
    json_safe,
    make_plots,
    summary_lines,
    write_predictions_csv,
    write_to_checkpoint,
)
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.labels import PLANES, TUMOR_CLASSES
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, cache_dir, default_data_dir
from braintumor_flax.reports.readme import load_json, update_readme
from braintumor_flax.training.config import TrainConfig

# Our name of each test set → the split name in `data.prepare`.
TEST_SETS: dict[str, str] = {"brisc2025_test": "test_brisc2025", "kaggle_test": "test_kaggle"}
VIEW_TEST_SETS = ("brisc2025_test",)  # the Kaggle set has no plane labels
VAL_SPLIT = "val"


# ---------------------------------------------------------------------------------------------
# metrics


def evaluate_task(
    logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], temperature: float, *,
    n_resamples: int, seed: int,
) -> dict[str, Any]:
    """Classification metrics on calibrated probabilities plus calibration before/after."""
    probs = calibration.softmax(logits, temperature)
    report = metrics.classification_report(labels, probs, class_names, n_resamples=n_resamples, seed=seed)
    report.update(calibration.calibration_report(logits, labels, temperature))
    # Temperature scaling keeps every arg-max but can reorder one class's scores across images, so AUC may move.
    raw_auc = metrics.one_vs_rest_auc(labels, calibration.softmax(logits, 1.0)) if len(labels) else np.array([])
    report["macro_auc_raw"] = float(np.nanmean(raw_auc)) if np.isfinite(raw_auc).any() else float("nan")
    return report


def per_group_accuracy(
    labels: np.ndarray, pred: np.ndarray, groups: np.ndarray, names: Sequence[str], *, n_resamples: int, seed: int,
) -> dict[str, dict[str, Any]]:
    """Accuracy with bootstrap CI for each group (e.g. tumour accuracy per true plane)."""
    out: dict[str, dict[str, Any]] = {}
    for g, name in enumerate(names):
        mask = groups == g
        if not mask.any():
            continue
        correct = (pred[mask] == labels[mask]).astype(np.float64)
        idx = metrics.bootstrap_indices(int(mask.sum()), n_resamples, seed) if n_resamples else None
        ci = metrics.percentile_ci(correct[idx].mean(axis=1)) if idx is not None else None
        out[name] = {"n": int(mask.sum()), "accuracy": float(correct.mean()), "accuracy_ci95": ci}
    return out


def stored_temperatures(pipeline: BrainTumorPipeline, mode: str, dataset_hash_ok: bool) -> dict[str, Any] | None:
    """Temperatures to use without fitting, or None when they must be fitted on the validation split now.

    auto: reuse the checkpoint's own when they were fitted on the validation split of this same data
    (training does that with `fit_temperature`), which saves running both models on ~1,800 images.
    """
    cal = pipeline.info.calibration
    if mode == "none":
        return {"view_temperature": 1.0, "tumor_temperature": 1.0, "fitted_on": "none",
                "method": "none (raw softmax)"}
    if mode == "checkpoint" or (mode == "auto" and dataset_hash_ok and cal.fitted_on_validation):
        return {**cal.to_dict(), "source": "checkpoint"}
    return None


def fit_temperatures(logits: dict[str, Logits], val: Split | None, view: bool) -> dict[str, Any]:
    """Temperatures from the validation split (never a test set)."""
    if val is None or VAL_SPLIT not in logits:
        return {"method": "temperature scaling (min NLL)", "view_temperature": 1.0, "tumor_temperature": 1.0,
                "fitted_on": "none (no validation split)", "source": "fitted by evaluate"}
    v = logits[VAL_SPLIT]
    fitted = calibration.fit_model_temperatures(v.view if view else None, val.plane, v.tumor, val.tumor)
    return {**fitted, "source": "fitted by evaluate"}


def evaluate_pipeline(
    logits: dict[str, Logits], splits: dict[str, Split], temps: dict[str, Any], *, view: bool, n_resamples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """{"view": {test set: report}, "tumor": {test set: report}} for one checkpoint."""
    result: dict[str, dict[str, Any]] = {"view": {}, "tumor": {}}
    for test_name, split_name in TEST_SETS.items():
        if split_name not in logits:
            continue
        split, lg = splits[split_name], logits[split_name]
        has_tumor = split.tumor >= 0
        rep = evaluate_task(lg.tumor[has_tumor], split.tumor[has_tumor], TUMOR_CLASSES, temps["tumor_temperature"],
                            n_resamples=n_resamples, seed=seed)
        planes = split.plane[has_tumor]
        if (planes >= 0).any():
            pred = lg.tumor[has_tumor].argmax(axis=1)
            rep["per_plane"] = per_group_accuracy(split.tumor[has_tumor], pred, planes, PLANES,
                                                  n_resamples=n_resamples, seed=seed)
        result["tumor"][test_name] = rep
        has_plane = split.plane >= 0
        if view and lg.view is not None and test_name in VIEW_TEST_SETS and has_plane.any():
            result["view"][test_name] = evaluate_task(lg.view[has_plane], split.plane[has_plane], PLANES,
                                                      temps["view_temperature"], n_resamples=n_resamples, seed=seed)
    return result


def union_of_test_sets(logits: dict[str, Logits], splits: dict[str, Split], temps: dict[str, Any],
                       groups: dict[str, int], *, n_resamples: int, seed: int) -> dict[str, Any] | None:
    """Tumour figures over the union of the test sets with each picture once: BRISC 2025 test and Kaggle Testing
    share many slices (docs/duplicates.md), so this is the one figure over independent pictures."""
    names = [n for n in TEST_SETS.values() if n in logits and n in splits]
    if len(names) < 2:
        return None
    paths = [p for n in names for p in splits[n].paths]
    lg = np.concatenate([logits[n].tumor for n in names])
    labels = np.concatenate([splits[n].tumor for n in names])
    keep = first_of_each_picture(paths, groups) & (labels >= 0)
    report = evaluate_task(lg[keep], labels[keep], TUMOR_CLASSES, temps["tumor_temperature"],
                           n_resamples=n_resamples, seed=seed)
    return {"tumor": report, "test_sets": names, "images": len(paths), "distinct_pictures": int(keep.sum())}


# ---------------------------------------------------------------------------------------------
# driver


def _training_split_params(pipeline: BrainTumorPipeline) -> tuple[dict[str, Any], str | None]:
    """How the checkpoint's training split its data (validation fraction, seed, grouping; train.py's config),
    and its data hash."""
    return TrainConfig.from_record(pipeline.info.training).split_args(), pipeline.info.dataset_hash


def _data_warnings(main: Checkpoint, ablation: Checkpoint | None, prepared: PreparedData) -> list[str]:
    warnings = []
    train_hash = main.pipeline.info.dataset_hash
    if train_hash and train_hash != prepared.dataset_hash:
        warnings.append("dataset hash differs from the one the checkpoint was trained on: the validation split "
                        "may not be the one training held out (temperatures could be fitted on training images)")
    if ablation is not None:
        abl_hash = ablation.pipeline.info.dataset_hash
        if abl_hash and abl_hash != prepared.dataset_hash:
            warnings.append("the ablation checkpoint was trained on a different dataset hash than evaluated here")
    return warnings


def compare_ablation(args: argparse.Namespace, ablation: Checkpoint, logits: dict[str, dict[str, Logits]],
                     splits: dict[str, Split], stored: dict[str, Any] | None) -> dict[str, Any]:
    """The tumour model without the view feature, side by side with the main one (paired test per test set)."""
    temps = stored or fit_temperatures(logits["ablation"], splits.get(VAL_SPLIT), view=False)
    abl = evaluate_pipeline(logits["ablation"], splits, {**temps, "view_temperature": 1.0}, view=False,
                            n_resamples=args.bootstrap, seed=args.seed)
    comparison = {}
    for test_name, split_name in TEST_SETS.items():
        if split_name not in splits:
            continue
        split = splits[split_name]
        has = split.tumor >= 0
        comparison[test_name] = metrics.paired_accuracy_difference(
            split.tumor[has], logits["main"][split_name].tumor[has].argmax(1),
            logits["ablation"][split_name].tumor[has].argmax(1), n_resamples=args.bootstrap, seed=args.seed)
        comparison[test_name]["a"], comparison[test_name]["b"] = "with view feature", "without view feature"
    return {
        "description": "tumour model without the view feature (same data and recipe otherwise)",
        "checkpoint": str(args.ablation_checkpoint),
        "checkpoint_fingerprint": ablation.fingerprint[:16],
        "recipe": ablation.pipeline.info.recipe,
        "use_view_feature": bool(ablation.pipeline.tumor_model.config.use_view_feature),
        "tumor_temperature": temps["tumor_temperature"],
        "tumor": abl["tumor"],
        "comparison": comparison,
    }


def write_outputs(out: Path, results: dict[str, Any], logits: dict[str, dict[str, Logits]],
                  splits: dict[str, Split], temps: dict[str, Any], *, plots: bool) -> list[str]:
    """Per-image CSVs (main and ablation) and the figures; returns the figure file names."""
    ablation = results.get("ablation")
    plot_data: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for task, by_set in (("view", results["view"]), ("tumor", results["tumor"])):
        for test_name in by_set:
            split = splits[TEST_SETS[test_name]]
            labels_all = split.plane if task == "view" else split.tumor
            has = labels_all >= 0
            lg = getattr(logits["main"][TEST_SETS[test_name]], task)[has]
            temp = temps[f"{task}_temperature"]
            names = PLANES if task == "view" else TUMOR_CLASSES
            plot_data[(task, test_name)] = (labels_all[has], calibration.softmax(lg, temp))
            write_predictions_csv(out / f"predictions_{task}_{test_name}.csv", split.subset(has), lg,
                                  labels_all[has], names, temp)
            if ablation and task == "tumor":
                write_predictions_csv(out / f"predictions_tumor_ablation_{test_name}.csv", split.subset(has),
                                      logits["ablation"][TEST_SETS[test_name]].tumor[has], labels_all[has], names,
                                      ablation["tumor_temperature"])
    return make_plots(out, results, plot_data, ablation) if plots else []


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    log(f"loading checkpoint {args.checkpoint}")
    main_ckpt = load_checkpoint(args.checkpoint)
    ablation_ckpt = load_checkpoint(args.ablation_checkpoint) if args.ablation_checkpoint else None
    image_size = main_ckpt.pipeline.view_model.config.image_size
    split_args, train_hash = _training_split_params(main_ckpt.pipeline)
    timings["load_checkpoints_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    log(f"preparing data from {args.data_dir} (image size {image_size}, val fraction {split_args['val_fraction']}, "
        f"seed {split_args['seed']}, grouping {split_args['val_grouping'] or 'none'})")
    prepared = prepare(args.data_dir, image_size=image_size, **split_args)
    warnings = _data_warnings(main_ckpt, ablation_ckpt, prepared)
    hash_ok = not train_hash or train_hash == prepared.dataset_hash
    stored = {"main": stored_temperatures(main_ckpt.pipeline, args.calibration, hash_ok)}
    if ablation_ckpt is not None:
        stored["ablation"] = stored_temperatures(ablation_ckpt.pipeline, args.calibration, hash_ok)
    need_val = [name for name, temps in stored.items() if temps is None]
    wanted = [VAL_SPLIT, *TEST_SETS.values()] if need_val else list(TEST_SETS.values())
    splits = {name: prepared.splits[name].stratified_subset(args.limit, args.seed)
              for name in wanted if name in prepared.splits and len(prepared.splits[name])}
    warnings += [f"no {name} split under {args.data_dir}: skipped" for name in TEST_SETS.values() if name not in splits]
    timings["prepare_data_s"] = time.perf_counter() - t
    for w in warnings:
        log(f"WARNING: {w}")

    t = time.perf_counter()
    entries = [("main", main_ckpt, True)] + ([("ablation", ablation_ckpt, False)] if ablation_ckpt else [])
    log("computing logits")
    cache = None if args.no_cache else cache_dir("predictions")
    # Only the checkpoints whose temperatures are (re)fitted need validation logits.
    jobs = [(split_name, [e for e in entries if split_name != VAL_SPLIT or e[0] in need_val])
            for split_name in splits]
    logits = predict_splits(entries, splits, jobs=jobs, batch_size=args.batch_size, cache=cache)
    timings["inference_s"] = time.perf_counter() - t

    t = time.perf_counter()
    temps = stored["main"] or fit_temperatures(logits["main"], splits.get(VAL_SPLIT), view=True)
    results: dict[str, Any] = evaluate_pipeline(logits["main"], splits, temps, view=True,
                                                n_resamples=args.bootstrap, seed=args.seed)
    union = union_of_test_sets(logits["main"], splits, temps, twin_group_ids(prepared.report),
                               n_resamples=args.bootstrap, seed=args.seed)
    if union is not None:
        results["union"] = union
    results["calibration"] = {**temps, "previous_in_checkpoint": main_ckpt.pipeline.info.calibration.to_dict()}
    if ablation_ckpt is not None:
        results["ablation"] = compare_ablation(args, ablation_ckpt, logits, splits, stored["ablation"])
    timings["metrics_s"] = time.perf_counter() - t

    t = time.perf_counter()
    figures = write_outputs(out, results, logits, splits, temps, plots=not args.no_plots)
    timings["plots_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    results["meta"] = {
        "command": "python -m braintumor_flax.evaluation " + " ".join(shlex.quote(a) for a in args.argv),
        "checkpoint": str(args.checkpoint),
        "checkpoint_fingerprint": main_ckpt.fingerprint[:16],
        "recipe": main_ckpt.pipeline.info.recipe,
        # Which datasets trained it (all by default): a test set of another source measures generalisation.
        "train_datasets": list(TrainConfig.from_record(main_ckpt.pipeline.info.training).train_datasets) or "all",
        # How it was trained (history with the kept epoch, time, machine): the README's recipe table reads it here
        # when the checkpoint itself is not in the repository (an evaluated run kept under runs/).
        "training": _training_summary(main_ckpt.pipeline.info.training),
        "dataset_hash": prepared.dataset_hash,
        "dataset_hash_matches_training": (train_hash == prepared.dataset_hash) if train_hash else None,
        "splits": {name: len(s) for name, s in splits.items()},
        "subset_limit": args.limit,
        "deduplication": "every twin group (exact, re-encoded, mirrored or re-processed copies) with a test "
                         "member was removed from training and validation (never from the test set); see "
                         "docs/duplicates.md and the data report",
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "ci": "95 % percentile"},
        "ece_bins": calibration.DEFAULT_BINS,
        "figures": figures,
        "warnings": warnings,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", jax {jax.__version__} "
                   f"{jax.devices()[0].platform}",
        "git_commit": git_commit(),
    }
    results = json_safe(results)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")

    if args.write_checkpoint and Path(args.checkpoint).is_dir():  # never a Hub snapshot
        write_to_checkpoint(main_ckpt.folder, main_ckpt.pipeline, temps, results)
        log(f"temperatures and metrics written into {args.checkpoint}")
    if args.readme and not args.limit:  # a subset's numbers never reach the README
        readme = Path(args.readme)
        if readme.is_file():
            if update_readme(readme, results, load_json(out / "peer_comparison.json")):
                log(f"README results table updated: {readme}")
            else:
                log(f"WARNING: {readme} has no results markers; table not written")
    return results


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m braintumor_flax.evaluation", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT_DIR), help="checkpoint folder (or Hub repo id)")
    ap.add_argument("--data-dir", default=str(default_data_dir()), help="BRISC and/or Kaggle folders")
    ap.add_argument("--out", default="results", help="folder for metrics.json, CSVs and figures")
    ap.add_argument("--ablation-checkpoint", default=None,
                    help="a second checkpoint (tumour model without the view feature) evaluated side by side")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (and of --limit's subsample)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per compiled forward call")
    ap.add_argument("--calibration", choices=("auto", "fit", "checkpoint", "none"), default="auto",
                    help="fit: fit temperatures on the validation split now; checkpoint: use the checkpoint's; "
                         "auto: the checkpoint's if they were fitted on this data's validation split, else fit; "
                         "none: raw probabilities")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per split (quick runs, tests)")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write the prediction cache")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-write-checkpoint", dest="write_checkpoint", action="store_false",
                    help="leave the checkpoint's config.json / metrics.json / model card untouched")
    ap.add_argument("--readme", default="README.md", help="README whose results table to regenerate ('' = none)")
    return ap


def _training_summary(record: TrainingRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    # How validation was drawn: a grouped split's validation figure is of a harder split than the random draw's.
    return {"history": record.history, "timings_s": record.timings_s, "machine": record.machine,
            "val_grouping": TrainConfig.from_record(record).val_grouping}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.limit and args.write_checkpoint:
        log("note: --limit given, so the checkpoint is not modified (metrics on a subset)")
        args.write_checkpoint = False
    results = run(args)
    print("\n".join(summary_lines(results)))
    print(f"wrote {Path(args.out) / 'metrics.json'} in {results['meta']['timings_s']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
