"""Does a validation split drawn by groups of look-alike images resemble the test sets, and choose like them?

The random validation split (`prepare(..., val_grouping="")`, every checkpoint so far) keeps most images' close
look-alikes (a patient's neighbouring slices) in training, so it scores far above the test sets and cannot see
their kind of error. A grouping spec (data/grouping.py) links look-alike images (pHash within T bits, or ImageNet
VGG16 features at cosine ≥ C), follows the links to groups and holds out whole groups. For each spec this
measures, with nothing trained on any of our labels:

* **Nearness to training**, for validation and each test set: the pHash distance to the nearest training image
  (on the 128 px model input), and how often the nearest training image by ImageNet VGG16 features (blocks 1-5
  at 128 px, cosine) has the same tumour label (1-NN accuracy).
* **Linear probes** over those frozen features (softmax regression, a grid of L2 penalties and lengths),
  trained on the split's training part: validation against the test sets (the gap), which probe validation
  would choose and its test accuracy, and the rank correlation of validation with the test sets over the grid.
  The trunk saw no label, so every split is honest for it; the served trunk was trained on the random split's
  training part and cannot be used this way.

    python benchmarks/eval_val_grouping.py [--specs ,phash:4,phash:6,imagenet:0.9,imagenet:0.85]
        [--out results/val_grouping.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from bench_common import cpu_ticks, finish  # noqa: E402

from braintumor_flax.data.datasets import prepare  # noqa: E402
from braintumor_flax.data.dedup import perceptual_hash  # noqa: E402
from braintumor_flax.evaluation.evaluate import TEST_SETS  # noqa: E402
from braintumor_flax.models.pretrained import imagenet_features  # noqa: E402
from braintumor_flax.paths import default_data_dir  # noqa: E402
from braintumor_flax.xla import cpu_jit  # noqa: E402

TEST_SPLITS = tuple(TEST_SETS.values())  # test_brisc2025, test_kaggle
L2_PENALTIES = (0.0, 1e-3, 1e-2, 1e-1)
STEPS = (50, 200)


def nearness(query: tuple[np.ndarray, np.ndarray, np.ndarray], train: tuple[np.ndarray, np.ndarray, np.ndarray]
             ) -> dict[str, float]:
    """(unit features, pHashes, labels) of a query set against the training set's."""
    q_feat, q_hash, q_label = query
    t_feat, t_hash, t_label = train
    bits = np.bitwise_count(q_hash[:, None] ^ t_hash[None, :]).min(axis=1)
    nearest = np.concatenate([(q_feat[i:i + 512] @ t_feat.T).argmax(axis=1) for i in range(0, len(q_feat), 512)])
    return {"n": len(q_label), "phash_bits_to_nearest_train_mean": round(float(bits.mean()), 2),
            "phash_bits_to_nearest_train_median": float(np.median(bits)),
            "nearest_train_same_label": round(float((t_label[nearest] == q_label).mean()), 4)}


def _fit_probe(x: jax.Array, y: jax.Array, l2: float, steps: int) -> jax.Array:
    """Softmax regression [D + 1, 4]: full batch, Adam at 1e-3, `l2` × the squared weights added to the loss."""
    w = jnp.zeros((x.shape[1] + 1, 4))
    tx = optax.adam(1e-3)

    def loss(w):
        logits = x @ w[:-1] + w[-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(w[:-1] ** 2)

    def step(carry, _):
        w, opt = carry
        updates, opt = tx.update(jax.grad(loss)(w), opt, w)
        return (optax.apply_updates(w, updates), opt), None

    (w, _), _ = jax.lax.scan(step, (w, tx.init(w)), None, length=steps)
    return w


fit_probe = cpu_jit(_fit_probe, static_argnames=("steps",))


def probes(train: tuple[np.ndarray, np.ndarray], sets: dict[str, tuple[np.ndarray, np.ndarray]]
           ) -> list[dict[str, float]]:
    """Every probe of the grid: its accuracy on each set (features standardised on the training part)."""
    mean, std = train[0].mean(axis=0), train[0].std(axis=0) + 1e-6
    x = jnp.asarray((train[0] - mean) / std)
    y = jnp.asarray(train[1])
    rows = []
    for l2, steps in itertools.product(L2_PENALTIES, STEPS):
        w = np.asarray(fit_probe(x, y, l2, steps=steps))
        row: dict[str, float] = {"l2": l2, "steps": steps}
        for name, (feat, label) in sets.items():
            pred = (((feat - mean) / std) @ w[:-1] + w[-1]).argmax(axis=1)
            row[name] = round(float((pred == label).mean()), 4)
        rows.append(row)
    return rows


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def selection(rows: list[dict[str, float]], tests: list[str]) -> dict:
    test_mean = [float(np.mean([r[t] for t in tests])) for r in rows]
    val = [r["val"] for r in rows]
    chosen = int(np.argmax(val))
    return {"chosen_by_validation": rows[chosen], "its_test_mean": round(test_mean[chosen], 4),
            "validation_minus_test_mean_over_grid": round(float(np.mean(val) - np.mean(test_mean)), 4),
            "best_test_mean": round(max(test_mean), 4),
            "validation_minus_test_mean_of_chosen": round(val[chosen] - test_mean[chosen], 4),
            "spearman_validation_vs_test_mean": round(spearman(val, test_mean), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--specs", default=",phash:4,phash:6,imagenet:0.9,imagenet:0.85",
                    help="comma-separated val_grouping specs ('' first: the random draw)")
    ap.add_argument("--out", default=str(ROOT / "results" / "val_grouping.json"))
    args = ap.parse_args()
    ticks, started = cpu_ticks(), time.perf_counter()
    data_dir = args.data_dir or default_data_dir()
    specs = args.specs.split(",")
    prepared = {spec: prepare(data_dir, val_grouping=spec) for spec in specs}
    # The same images in every variant (only train and validation trade places): features once, by content hash.
    first = prepared[specs[0]].splits
    everything = [first[n] for n in ("train", "val", *TEST_SPLITS)]
    row_of = {h: i for i, h in enumerate(h for s in everything for h in s.content_hash)}
    features = imagenet_features(np.concatenate([s.images for s in everything])).astype(np.float32)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-6)
    hashes = np.array([perceptual_hash(im) for s in everything for im in s.images], np.uint64)

    result: dict = {"specs": {}, "probe_grid": {"l2": list(L2_PENALTIES), "steps": list(STEPS)},
                    "features": "ImageNet VGG16 blocks 1-5 at 128 px, flattened (8192)"}
    for spec in specs:
        splits = prepared[spec].splits
        rows = {n: np.array([row_of[h] for h in splits[n].content_hash]) for n in ("train", "val", *TEST_SPLITS)}
        labels = {n: splits[n].tumor for n in rows}
        train = (unit[rows["train"]], hashes[rows["train"]], labels["train"])
        entry: dict = {"sizes": {n: len(r) for n, r in rows.items()}, "dataset_hash": prepared[spec].dataset_hash}
        entry["nearness"] = {n: nearness((unit[rows[n]], hashes[rows[n]], labels[n]), train)
                             for n in ("val", *TEST_SPLITS)}
        grid = probes((features[rows["train"]], labels["train"]),
                      {n: (features[rows[n]], labels[n]) for n in ("val", *TEST_SPLITS)})
        entry["probes"] = grid
        entry["selection"] = selection(grid, list(TEST_SPLITS))
        result["specs"][spec or "random"] = entry
        print(spec or "random", entry["nearness"], entry["selection"], flush=True)
    return finish(args.out, result, started=started, ticks=ticks)


if __name__ == "__main__":
    raise SystemExit(main())
