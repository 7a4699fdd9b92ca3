"""Evaluation figures (PNG): confusion matrices, ROC curves, reliability diagrams, per-plane and ablation bars.

Only matplotlib's non-interactive Agg backend is used, so this runs headless (CI, servers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from braintumor_flax.evaluation.metrics import roc_curves  # noqa: E402

DPI = 120


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray | list, class_names: Sequence[str], title: str, path: Path) -> Path:
    """Counts, shaded by the row-normalised rate (recall per true class) so small classes stay readable."""
    cm = np.asarray(cm, np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.3 * k + 2.2, 1.1 * k + 1.8))
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{rate[i, j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if rate[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return _save(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], title: str, path: Path,
             aucs: Sequence[float] | None = None) -> Path:
    """One-vs-rest ROC curve per class."""
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for k, curve in enumerate(roc_curves(y_true, probs)):
        if curve is None:
            continue
        label = class_names[k] + (f" (AUC {aucs[k]:.3f})" if aucs is not None else "")
        ax.plot(curve[0], curve[1], lw=1.6, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(diagrams: dict[str, dict[str, Any]], title: str, path: Path) -> Path:
    """Accuracy vs confidence per bin for each diagram (e.g. raw and calibrated), with bin counts below."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.2, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
    width = None
    for offset, (name, d) in enumerate(diagrams.items()):
        edges = np.asarray(d["bin_edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        width = (edges[1] - edges[0]) / (len(diagrams) + 0.5)
        conf = np.array([np.nan if v is None else v for v in d["confidence"]], np.float64)
        acc = np.array([np.nan if v is None else v for v in d["accuracy"]], np.float64)
        ok = ~np.isnan(acc)
        ax.plot(conf[ok], acc[ok], marker="o", ms=4, lw=1.4, label=f"{name} (ECE {d['ece']:.3f})")
        shift = (offset - (len(diagrams) - 1) / 2) * width
        ax_n.bar(centres + shift, d["count"], width=width, alpha=0.7, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax_n.set_xlabel("confidence (top-class probability)")
    ax_n.set_ylabel("images")
    ax_n.set_yscale("log")
    return _save(fig, path)


def plot_grouped_accuracy(groups: dict[str, dict[str, dict[str, Any]]], title: str, path: Path,
                          ylabel: str = "accuracy") -> Path:
    """Bars with 95 % CI whiskers: {series name: {group label: {"accuracy", "accuracy_ci95"}}}.

    Used for tumour accuracy per plane and for the ablation (with vs without the view feature).
    """
    series = list(groups)
    labels = list(dict.fromkeys(label for s in series for label in groups[s]))
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2.5, 4.2))
    for i, name in enumerate(series):
        vals, lo, hi = [], [], []
        for label in labels:
            m = groups[name].get(label, {})
            acc = m.get("accuracy", np.nan)
            ci = m.get("accuracy_ci95") or [acc, acc]
            vals.append(acc)
            lo.append(acc - ci[0])
            hi.append(ci[1] - acc)
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3, label=name)
        for bar, v, top in zip(bars, vals, hi, strict=True):
            if np.isfinite(v):  # value just above the whisker, where it never hides behind another bar
                ax.text(bar.get_x() + bar.get_width() / 2, v + top + 0.01, f"{v:.3f}", ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.18)  # head-room for the labels and the legend above accuracies near 1
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper center", ncol=len(series), frameon=False)
    return _save(fig, path)
