"""Ours vs the PyPI peer `detect-tumor` 0.1.1 on the same deduplicated test sets, in one run.

The peer: `from detect_tumor import TumorDetector` — a Keras VGG16 at 240×240 exported to ONNX, run by ONNX
Runtime on the CPU, labels glioma / meningioma / notumor / pituitary. Both models read the same image files
(the test splits of `data.prepare`, i.e. after deduplication against our training data).

Measured, per test set:
  - accuracy (95 % bootstrap CI), macro-F1, macro ROC-AUC of both, and a paired McNemar test on the same images;
  - per-image latency from a file path to class probabilities (decode + resize + forward, batch of one),
    timed interleaved image by image (alternating which goes first) on a seeded subset, so both see the
    same machine load. Absolute milliseconds drift with the load on this shared 2-core machine; the ratio
    measured in the same run is the number to compare.

    python benchmarks/bench_peer.py --checkpoint checkpoints --data-dir ../shared/data \
        --out results/peer_comparison.json [--limit 200] [--latency-images 100]

Our accuracy comes from the same batched forward as `python -m braintumor_flax.evaluation` (and shares its
prediction cache); the peer runs one image at a time because that is its API.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PEER_NAME = "detect-tumor 0.1.1"
NOTES = [
    "detect-tumor does not document its training data. It was most likely trained on the Kaggle Brain Tumor "
    "MRI Dataset, possibly including its Testing images, so its Kaggle-test accuracy may be inflated; our "
    "test sets are deduplicated against our training data only, not against the peer's.",
    "BRISC 2025 was assembled from the same public sources as the Kaggle set, so the peer may also have seen "
    "near-copies of some BRISC test images.",
    "Latency: one image at a time from its file (decode, resize, forward), interleaved ours/peer on the same "
    "images; the machine is shared, so compare the ratio measured in the same run.",
]


def _stats_ms(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {"n": int(len(a)), "median": float(np.median(a)), "mean": float(a.mean()),
            "p90": float(np.percentile(a, 90)), "min": float(a.min())}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

    from braintumor_flax.calibration import softmax
    from braintumor_flax.evaluation import evaluate
    from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, default_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT_DIR))
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--out", default="results/peer_comparison.json")
    ap.add_argument("--limit", type=int, default=None, help="at most N images per test set (stratified, seeded)")
    ap.add_argument("--latency-images", type=int, default=100, help="images per test set timed interleaved")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="recompute our logits instead of reading the cache")
    args = ap.parse_args(argv)

    from detect_tumor import TumorDetector

    from braintumor_flax.data.datasets import prepare
    from braintumor_flax.data.imageio import decode_image, to_model_input
    from braintumor_flax.evaluation import metrics
    from braintumor_flax.labels import TUMOR_CLASSES, normalize_tumor
    from braintumor_flax.paths import cache_dir
    from braintumor_flax.serve.predictor import Predictor

    ckpt = evaluate.load_checkpoint(args.checkpoint)
    size = ckpt.pipeline.view_model.config.image_size
    from braintumor_flax.training.config import TrainConfig

    data = prepare(args.data_dir, image_size=size, **TrainConfig.from_record(ckpt.pipeline.info.training).split_args())
    temperature = ckpt.pipeline.info.calibration.tumor_temperature
    recipe = ckpt.pipeline.info.recipe or "?"
    ours_name = f"braintumor-flax ({recipe}, {size} px, JAX)"

    predictor = Predictor(ckpt.pipeline)
    peer = TumorDetector()
    data_dir = Path(args.data_dir)
    warm = next(iter(data.splits["test_brisc2025"].paths))
    predictor.predict_arrays(to_model_input(decode_image(data_dir / warm), size)[None])  # compile batch-1 shape
    peer.predict(data_dir / warm)  # ORT session creation

    result: dict[str, Any] = {"test_sets": {}, "paired": {}, "latency_ratio_peer_over_ours": {}, "notes": NOTES}
    for test_name, split_name in evaluate.TEST_SETS.items():
        if split_name not in data.splits:
            continue
        split = data.splits[split_name].stratified_subset(args.limit, args.seed)
        split = split.subset(split.tumor >= 0)
        labels = split.tumor
        logits = evaluate.predict_splits([("ours", ckpt, False)], {split_name: split},
                                         cache=None if args.no_cache else cache_dir("predictions"))
        ours_probs = softmax(logits["ours"][split_name].tumor, temperature)

        timed = set(np.random.default_rng(args.seed).permutation(len(split))[:args.latency_images].tolist())
        peer_probs = np.zeros((len(split), len(TUMOR_CLASSES)))
        lat_peer: list[float] = []
        lat_ours: list[float] = []
        t_start = time.perf_counter()
        for i, rel in enumerate(split.paths):
            path = data_dir / rel

            def run_peer(path: Path = path) -> float:
                t = time.perf_counter()
                out = peer.predict(path)
                dt = time.perf_counter() - t
                for name, pct in out.probabilities.items():
                    peer_probs[i, TUMOR_CLASSES.index(normalize_tumor(name))] = pct / 100.0  # noqa: B023
                return dt

            def run_ours(path: Path = path) -> float:
                t = time.perf_counter()
                predictor.predict_arrays(to_model_input(decode_image(path), size)[None])
                return time.perf_counter() - t

            if i in timed:  # alternate the order so neither always runs on a warmer cache
                first, second = (run_peer, run_ours) if len(lat_peer) % 2 == 0 else (run_ours, run_peer)
                a, b = first(), second()
                lat_peer.append(a if first is run_peer else b)
                lat_ours.append(b if first is run_peer else a)
            else:
                run_peer()
            if (i + 1) % 100 == 0 or i + 1 == len(split):
                rate = (time.perf_counter() - t_start) / (i + 1)
                print(f"  {test_name}: {i + 1}/{len(split)} images, ETA {rate * (len(split) - i - 1):.0f} s",
                      file=sys.stderr, flush=True)
        # The peer's percentages are rounded to 0.01 %: renormalise so rows sum to one.
        peer_probs /= np.clip(peer_probs.sum(1, keepdims=True), 1e-12, None)

        entry = {}
        for name, probs, lat in ((ours_name, ours_probs, lat_ours), (PEER_NAME, peer_probs, lat_peer)):
            rep = metrics.classification_report(labels, probs, TUMOR_CLASSES, n_resamples=args.bootstrap,
                                                seed=args.seed)
            entry[name] = {k: rep[k] for k in ("n", "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95",
                                               "macro_auc", "confusion_matrix")}
            entry[name]["recall"] = {c: rep["per_class"][c]["recall"] for c in TUMOR_CLASSES}
            entry[name]["latency_ms"] = _stats_ms(lat) if lat else {}
        result["test_sets"][test_name] = entry
        paired = metrics.paired_accuracy_difference(labels, ours_probs.argmax(1), peer_probs.argmax(1),
                                                    n_resamples=args.bootstrap, seed=args.seed)
        result["paired"][test_name] = {**paired, "a": ours_name, "b": PEER_NAME}
        if lat_ours:
            result["latency_ratio_peer_over_ours"][test_name] = float(np.median(lat_peer) / np.median(lat_ours))

    import jax
    import onnxruntime

    result["meta"] = {
        "command": "python benchmarks/bench_peer.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "checkpoint_fingerprint": ckpt.fingerprint[:16],
        "tumor_temperature": temperature,
        "dataset_hash": data.dataset_hash,
        "limit": args.limit,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", jax {jax.__version__}, "
                   f"onnxruntime {onnxruntime.__version__}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(evaluate.json_safe(result), indent=2, allow_nan=False) + "\n")

    print(f"\n{'test set':<16}{'model':<46}{'n':>6}{'accuracy [95% CI]':>26}{'macro-F1':>10}{'median ms':>11}")
    for test_name, entry in result["test_sets"].items():
        for name, m in entry.items():
            ci = m["accuracy_ci95"]
            print(f"{test_name:<16}{name:<46}{m['n']:>6}{m['accuracy']:>10.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
                  f"{m['macro_f1']:>10.3f}{m['latency_ms'].get('median', float('nan')):>11.0f}")
        p = result["paired"][test_name]
        ratio = result["latency_ratio_peer_over_ours"].get(test_name, float("nan"))
        ci = p.get("difference_ci95") or [float("nan")] * 2
        print(f"{'':<16}ours - peer: {p['difference']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], "
              f"McNemar p={p['mcnemar_p']:.3g}; latency peer/ours = {ratio:.2f}")
    print("\n".join(f"note: {n}" for n in NOTES))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
