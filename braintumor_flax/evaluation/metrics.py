"""Classification metrics and seeded bootstrap confidence intervals (pure numpy / scikit-learn).

Everything takes integer labels `y_true` [N] and class probabilities `probs` [N, K] (rows sum to 1);
predictions are the arg-max. Nothing here knows about models or files, so every number in
`results/metrics.json` can be recomputed from `results/predictions.csv` with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score, roc_curve

CI_LEVEL = 0.95


def _check(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"expected probs [N, K] matching {len(y)} labels, got {p.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]}); got range [{y.min()}, {y.max()}]")
    return y, p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [K, K]: rows are true classes, columns predicted classes."""
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def f1_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F1) per class from [..., K, K] confusion counts; 0 where undefined (sklearn's default)."""
    cm = np.asarray(cm, np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    pred = cm.sum(axis=-2)
    true = cm.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pred > 0, tp / pred, 0.0)
        recall = np.where(true > 0, tp / true, 0.0)
        f1 = np.where(pred + true > 0, 2 * tp / (pred + true), 0.0)  # = 2PR/(P+R), and 0 when tp = 0
    return precision, recall, f1


def one_vs_rest_auc(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC-AUC of each class against the rest; NaN for a class without positives or without negatives."""
    y, p = _check(y_true, probs)
    out = np.full(p.shape[1], np.nan)
    for k in range(p.shape[1]):
        pos = y == k
        if 0 < pos.sum() < len(y):
            out[k] = roc_auc_score(pos, p[:, k])
    return out


def weighted_ovr_auc(y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC for many weightings of the same samples at once: weights [B, N] → AUC [B, K].

    A bootstrap resample is the original sample with integer multiplicities, so ranking once and
    reweighting gives every resample's AUC without re-sorting (ties count one half, as in sklearn).
    """
    y, p = _check(y_true, probs)
    w = np.asarray(weights, np.float64)
    out = np.full((w.shape[0], p.shape[1]), np.nan)
    for k in range(p.shape[1]):
        scores = p[:, k]
        order = np.argsort(scores, kind="stable")
        # Tied scores form one group: a positive beats the negatives of lower groups, ties half.
        _, group = np.unique(scores[order], return_inverse=True)
        n_groups = group.max() + 1 if len(group) else 0
        pos = (y[order] == k).astype(np.float64)
        w_sorted = w[:, order]
        g_pos = np.zeros((w.shape[0], n_groups))
        g_neg = np.zeros((w.shape[0], n_groups))
        # Sum weights per tie group (columns of the same group are adjacent after sorting).
        np.add.at(g_pos.T, group, (w_sorted * pos).T)
        np.add.at(g_neg.T, group, (w_sorted * (1 - pos)).T)
        neg_below = np.cumsum(g_neg, axis=1) - g_neg
        numerator = (g_pos * (neg_below + 0.5 * g_neg)).sum(axis=1)
        denominator = g_pos.sum(axis=1) * g_neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, k] = np.where(denominator > 0, numerator / denominator, np.nan)
    return out


def roc_curves(y_true: np.ndarray, probs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """(false-positive rate, true-positive rate) per class, one-vs-rest; None where undefined."""
    y, p = _check(y_true, probs)
    curves: list[tuple[np.ndarray, np.ndarray] | None] = []
    for k in range(p.shape[1]):
        pos = y == k
        if 0 < pos.sum() < len(y):
            fpr, tpr, _ = roc_curve(pos, p[:, k])
            curves.append((fpr, tpr))
        else:
            curves.append(None)
    return curves


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where the whole row is NaN (no warning)."""
    valid = ~np.isnan(a)
    counts = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.where(valid, a, 0.0).sum(axis=-1) / counts, np.nan)


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """[B, N] resample indices, reproducible from the seed."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def percentile_ci(values: np.ndarray, level: float = CI_LEVEL) -> list[float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def bootstrap_statistics(
    y_true: np.ndarray, probs: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, with_auc: bool = True
) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1, per-class F1 and macro AUC on `n_resamples` seeded bootstrap resamples.

    Returns arrays with one value per resample (per-class arrays [B, K]); all resamples of one call
    share the same indices, so differences between statistics stay paired.
    """
    y, p = _check(y_true, probs)
    n, k = p.shape
    idx = bootstrap_indices(n, n_resamples, seed)
    pred = p.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    # Confusion counts of every resample at once: offset each row's cell ids into its own block.
    cells = (y * k + pred)[idx] + (np.arange(n_resamples) * k * k)[:, None]
    cms = np.bincount(cells.ravel(), minlength=n_resamples * k * k).reshape(n_resamples, k, k)
    _, _, f1 = f1_from_confusion(cms)
    stats: dict[str, np.ndarray] = {
        "accuracy": correct[idx].mean(axis=1),
        # Over all K classes, F1 = 0 where undefined: the same convention as the point estimate.
        "macro_f1": f1.mean(axis=1),
        "per_class_f1": f1,
    }
    if with_auc:
        weights = np.zeros((n_resamples, n))
        np.add.at(weights, (np.repeat(np.arange(n_resamples), n), idx.ravel()), 1.0)
        stats["macro_auc"] = _nanmean_rows(weighted_ovr_auc(y, p, weights))
    return stats


def classification_report(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the results table needs for one model on one test set, JSON-serialisable."""
    y, p = _check(y_true, probs)
    k = len(class_names)
    if p.shape[1] != k:
        raise ValueError(f"{p.shape[1]} probability columns for {k} class names")
    pred = p.argmax(axis=1)
    labels = list(range(k))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0
    )
    auc = one_vs_rest_auc(y, p) if len(y) else np.full(k, np.nan)
    report: dict[str, Any] = {
        "n": int(len(y)),
        "class_names": list(class_names),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),  # = balanced accuracy
        "macro_f1": float(f1.mean()),
        "macro_auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i]), "auc": float(auc[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y, pred, k).tolist(),
    }
    if len(y) and n_resamples > 0:
        boot = bootstrap_statistics(y, p, n_resamples=n_resamples, seed=seed)
        report["accuracy_ci95"] = percentile_ci(boot["accuracy"])
        report["macro_f1_ci95"] = percentile_ci(boot["macro_f1"])
        report["macro_auc_ci95"] = percentile_ci(boot["macro_auc"])
        for i, name in enumerate(class_names):
            report["per_class"][name]["f1_ci95"] = percentile_ci(boot["per_class_f1"][:, i])
        report["bootstrap"] = {"resamples": int(n_resamples), "seed": int(seed), "method": "percentile"}
    return report


def paired_accuracy_difference(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy of A minus accuracy of B on the same images: paired bootstrap CI and exact McNemar test.

    Pairing matters: two models tested on the same images share most of their sampling noise, so the CI
    of the difference is much narrower than the two separate CIs suggest.
    """
    from scipy.stats import binomtest

    y = np.asarray(y_true, np.int64)
    a = np.asarray(pred_a, np.int64) == y
    b = np.asarray(pred_b, np.int64) == y
    n = len(y)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    out: dict[str, Any] = {
        "n": n,
        "accuracy_a": float(a.mean()) if n else float("nan"),
        "accuracy_b": float(b.mean()) if n else float("nan"),
        "difference": float(a.mean() - b.mean()) if n else float("nan"),
        "only_a_correct": only_a,
        "only_b_correct": only_b,
        # Exact McNemar: under "no difference" each discordant image is a fair coin.
        "mcnemar_p": float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0,
    }
    if n and n_resamples > 0:
        idx = bootstrap_indices(n, n_resamples, seed)
        diff = a[idx].mean(axis=1) - b[idx].mean(axis=1)
        out["difference_ci95"] = percentile_ci(diff)
    return out


def paired_mean_difference(values_a: np.ndarray, values_b: np.ndarray, *, n_resamples: int = 1000, seed: int = 0
                           ) -> dict[str, Any]:
    """Mean of A minus mean of B over the same items (a per-slice Dice, say): paired bootstrap CI, how many items
    each side scores higher on, and the Wilcoxon signed-rank p-value of the per-item differences."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    diff = a - b
    n = len(diff)
    out: dict[str, Any] = {
        "n": n, "mean_a": float(a.mean()) if n else float("nan"), "mean_b": float(b.mean()) if n else float("nan"),
        "difference": float(diff.mean()) if n else float("nan"),
        "a_higher": int((diff > 0).sum()), "b_higher": int((diff < 0).sum()),
        "wilcoxon_p": float(wilcoxon(diff).pvalue) if (diff != 0).any() else 1.0,
    }
    if n and n_resamples > 0:
        out["difference_ci95"] = percentile_ci(diff[bootstrap_indices(n, n_resamples, seed)].mean(axis=1))
    return out
