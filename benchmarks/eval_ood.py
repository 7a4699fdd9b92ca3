"""How well the OOD check works: false alarms on the MRI test sets, detection on images that are not brain MRI.

Fits the statistics as training does (`training.fit_statistics.fit_ood_statistics`: pooled lower-block outputs of
the checkpoint's training split, limit on its validation split), unless `--use-checkpoint-stats`;
then scores BRISC 2025 test and Kaggle Testing (deduplicated, as prepared for evaluation), generated
non-MRI images (noise, gradients, text pages, synthetic photo and radiograph look-alikes, ...) and the real
photographs that installed packages ship. Writes results/ood_eval.json. To store refitted statistics in a
checkpoint, run `python -m braintumor_flax.training.fit_statistics`.

    python benchmarks/eval_ood.py [--model checkpoints] [--use-checkpoint-stats]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


import numpy as np  # noqa: E402

from braintumor_flax.data import ood_samples  # noqa: E402
from braintumor_flax.data.imageio import to_model_input  # noqa: E402
from braintumor_flax.ood import OODDetector  # noqa: E402
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, PROJECT_ROOT  # noqa: E402
from braintumor_flax.serve.predictor import Predictor  # noqa: E402
from braintumor_flax.training.fit_statistics import fit_ood_statistics, prepare_training_data  # noqa: E402


def _subsample(n_total: int, n: int, seed: int) -> np.ndarray:
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def _predict(predictor: Predictor, images: np.ndarray, label: str, feature: str = "lower_gap"):
    """(prediction, OOD features of the kind the statistics were fitted on), as the app computes them."""
    t = time.perf_counter()
    prediction = predictor.explain_arrays(images)
    print(f"  {label}: {len(images)} images in {time.perf_counter() - t:.0f} s", flush=True)
    outputs = prediction.outputs
    return prediction, (outputs.lower_pooled if feature == "lower_gap" else outputs.view_feature)


def _which(result) -> str:
    kinds = []
    if result.image_stats["colour"] > 0 and any("colour" in r for r in result.reasons):
        kinds.append("colour")
    if any("near-white" in r for r in result.reasons):
        kinds.append("white_background")
    if result.feature_score is not None and result.feature_score > 1:
        kinds.append("feature_distance")
    return "+".join(kinds) or "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_CHECKPOINT_DIR))
    ap.add_argument("--n-test", type=int, default=0, help="subsample each test set (0 = all)")
    ap.add_argument("--n-per-kind", type=int, default=20, help="generated images per kind")
    ap.add_argument("--use-checkpoint-stats", action="store_true",
                    help="score with the checkpoint's statistics instead of refitting them")
    ap.add_argument("--stats-out", default=None, help="also save the fitted statistics to this JSON file")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "results" / "ood_eval.json"))
    args = ap.parse_args(argv)

    started = time.perf_counter()
    predictor = Predictor.from_pretrained(args.model, batch_size=16)
    data = prepare_training_data(predictor.pipeline, None)
    stats = predictor.pipeline.info.ood if args.use_checkpoint_stats else None
    if stats is None:  # the same fit training runs (training.fit_statistics), on the checkpoint's own split
        print("fitting OOD statistics", flush=True)
        stats = fit_ood_statistics(predictor.pipeline, data)
    detector = OODDetector(stats)

    report: dict = {"model": args.model, "feature": detector.feature,
                    "false_alarm_target": stats.get("false_alarm_rate"),
                    "distance_limit": stats.get("distance_limit"), "image_limits": stats.get("image_limits"),
                    "fit_subsample": stats.get("fit_subsample") or {"train": stats.get("n_fit"),
                                                                     "val": stats.get("n_calibration")},
                    "statistics": "stored in the checkpoint" if args.use_checkpoint_stats else "refitted",
                    "mri": {}, "non_mri": {}}
    for name in ("test_brisc2025", "test_kaggle"):
        split = data.splits[name]
        split = split.subset(_subsample(len(split), args.n_test, 2))
        results = detector(_predict(predictor, split.images, name, detector.feature)[1], split.images)
        flags = np.array([r.flag for r in results])
        by_check = defaultdict(int)
        for r in results:
            if r.flag:
                by_check[_which(r)] += 1
        report["mri"][name] = {"n": len(split), "false_alarms": int(flags.sum()),
                               "false_alarm_rate": round(float(flags.mean()), 4), "by_check": dict(by_check),
                               "flagged_examples": [split.paths[i] for i in np.flatnonzero(flags)[:10]]}

    samples = list(ood_samples.synthetic(args.n_per_kind, seed=7)) + list(ood_samples.packaged_photos())
    kinds = [k.split(":")[0] for k, _ in samples]
    images = np.stack([to_model_input(im, predictor.image_size) for _, im in samples])
    prediction, feats = _predict(predictor, images, "non-MRI", detector.feature)
    tumor_probs = prediction.tumor_probs
    results = detector(feats, images)
    per_kind: dict[str, dict] = {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        flags = [results[i].flag for i in idx]
        by_check = defaultdict(int)
        for i in idx:
            by_check[_which(results[i])] += 1
        per_kind[kind] = {"n": len(idx), "detected": int(sum(flags)), "detection_rate": round(float(np.mean(flags)), 3),
                          "by_check": dict(by_check),
                          "mean_top_tumour_prob_without_check": round(float(tumor_probs[idx].max(1).mean()), 3)}
    all_flags = np.array([r.flag for r in results])
    report["non_mri"] = {"n": len(results), "detection_rate": round(float(all_flags.mean()), 4), "per_kind": per_kind}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "non_mri"}, indent=1))
    for kind, row in per_kind.items():
        print(f"{kind:22s} detected {row['detected']:3d}/{row['n']:3d}  {row['by_check']}")
    if args.stats_out:
        Path(args.stats_out).write_text(json.dumps(stats) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
