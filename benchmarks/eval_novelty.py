"""Why validation overstates the test sets: how far each image lies from the training images, and accuracy by it.

For every image of the validation split and of both deduplicated test sets: the cosine similarity between
what the tumour head reads (the trunk's pooled last convolution, `training.head_refit.trunk_outputs`) and the
same for its nearest training image, and whether that training image has the same label (a 1-nearest-neighbour
classifier in the trunk's feature space). Then each model's tumour accuracy in bins of that similarity. The
validation split is a random part of the training pool, so its images often have a near neighbour of their
own label in training (e.g. an adjacent slice of the same patient); the test sets have more images unlike any
training image. Nothing here chooses a model.

    python benchmarks/eval_novelty.py [--model checkpoints-shared-trunk [OTHER ...]] [--out results/novelty.json]

Models after the first must share its trunk (e.g. the same checkpoint before a head refit): the similarities
are computed once, from the first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_common import machine, write_json  # noqa: E402

from braintumor_flax.evaluation.evaluate import TEST_SETS, VAL_SPLIT  # noqa: E402
from braintumor_flax.hub import BrainTumorPipeline  # noqa: E402
from braintumor_flax.models.segmentation import trunk_digest  # noqa: E402
from braintumor_flax.paths import default_data_dir  # noqa: E402
from braintumor_flax.training.fit_statistics import prepare_training_data  # noqa: E402
from braintumor_flax.training.head_refit import trunk_outputs  # noqa: E402

BINS = (0.0, 0.90, 0.95, 1.0001)  # cosine similarity to the nearest training image


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest(train: np.ndarray, queries: np.ndarray, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarity to the nearest row of `train`, its index) for each query row (both unit rows)."""
    sims, index = np.empty(len(queries), np.float32), np.empty(len(queries), np.int64)
    for start in range(0, len(queries), block):
        s = queries[start:start + block] @ train.T
        index[start:start + block] = s.argmax(1)
        sims[start:start + block] = s.max(1)
    return sims, index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=[str(ROOT / "checkpoints-shared-trunk")])
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "novelty.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    pipelines = [BrainTumorPipeline.from_pretrained(m) for m in args.model]
    first = pipelines[0]
    blocks = 5
    for other, name in zip(pipelines[1:], args.model[1:], strict=True):
        if trunk_digest(other.tumor_model.vgg, blocks) != trunk_digest(first.tumor_model.vgg, blocks):
            raise SystemExit(f"{name} has another trunk than {args.model[0]}: run it on its own")
    data = prepare_training_data(first, args.data_dir or default_data_dir())
    train = data.splits["train"]
    train_features = unit_rows(trunk_outputs(first, train)[0].tumor_pooled)
    report: dict = {"models": args.model, "bins": list(BINS), "splits": {}}
    for split_name in (VAL_SPLIT, *TEST_SETS.values()):
        split = data.splits[split_name]
        known = split.tumor >= 0
        split = split.subset(known)
        outs = [trunk_outputs(p, split)[0] for p in pipelines]
        sims, index = nearest(train_features, unit_rows(outs[0].tumor_pooled))
        entry = {"n": len(split),
                 "similarity_quantiles": {q: round(float(np.quantile(sims, q / 100)), 4) for q in (10, 25, 50, 75, 90)},
                 "nearest_neighbour_accuracy": round(float((train.tumor[index] == split.tumor).mean()), 4),
                 "bins": []}
        correct = [o.tumor_logits.argmax(1) == split.tumor for o in outs]
        for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
            rows = (sims >= lo) & (sims < hi)
            entry["bins"].append({"from": lo, "to": min(hi, 1.0), "n": int(rows.sum()),
                                  "accuracy": [round(float(c[rows].mean()), 4) if rows.any() else None
                                               for c in correct],
                                  "errors": [int((~c[rows]).sum()) for c in correct]})
        report["splits"][split_name] = entry

    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["machine"] = machine()
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
