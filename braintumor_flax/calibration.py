"""Temperature scaling (Guo et al., 2017) and calibration measures: ECE, NLL, Brier, reliability diagrams.

A temperature T divides the logits before the softmax: it changes confidence, never the arg-max, so
accuracy and the confusion matrix are the same before and after. T is fitted on the validation split
only (minimum negative log-likelihood); the test sets measure how well it transfers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_BINS = 15  # equal-width confidence bins, as in Guo et al.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _as_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} rows")
    return y


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax (the same operations as scipy.special.log_softmax, without importing
    scipy into the server)."""
    z = np.asarray(z)
    z_max = np.max(z, axis=axis, keepdims=True)
    z_max[~np.isfinite(z_max)] = 0
    shifted = z - z_max
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 softmax(logits / T): the one softmax of the project (serving, evaluation, reports)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    return np.exp(log_softmax(z, axis=-1))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
    z = np.asarray(logits, np.float64)
    y = _as_labels(labels, len(z))
    if not len(y):
        return float("nan")
    return float(-log_softmax(z / float(temperature), axis=-1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
                    ) -> float:
    """The temperature minimising validation NLL; 1.0 when there is nothing to fit on.

    The NLL is convex in β = 1/T (a log-sum-exp of functions linear in β minus a linear term), so a
    bounded 1-D search finds the global minimum. The bounds stop a perfectly separated validation set
    from driving T to 0 (infinite confidence).
    """
    z = np.asarray(logits, np.float64)
    y = _as_labels(labels, len(z))
    if not len(y):
        return 1.0
    from scipy.optimize import minimize_scalar  # training/evaluation only: keeps scipy out of the server

    lo, hi = bounds
    result = minimize_scalar(lambda beta: nll(z, y, 1.0 / beta), bounds=(1.0 / hi, 1.0 / lo), method="bounded",
                             options={"xatol": 1e-7})
    return float(1.0 / result.x)


def reliability_diagram(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Top-label confidence vs accuracy in equal-width bins, plus the ECE they imply.

    ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b|; empty bins have NaN accuracy/confidence and weigh 0.
    """
    p = np.asarray(probs, np.float64)
    y = _as_labels(labels, len(p))
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == y).astype(np.float64) if len(p) else np.zeros(0)
    # Bin b holds confidences in (edges[b], edges[b+1]]; a confidence of exactly 0 cannot occur with K ≥ 1.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bins, weights=correct, minlength=n_bins) / count
        conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
    gap = np.where(count > 0, np.abs(acc - conf), 0.0)
    ece = float((count * gap).sum() / count.sum()) if count.sum() else float("nan")
    return {
        "bin_edges": edges.tolist(),
        "count": count.tolist(),
        "accuracy": [None if np.isnan(v) else float(v) for v in acc],
        "confidence": [None if np.isnan(v) else float(v) for v in conf],
        "ece": ece,
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    return reliability_diagram(probs, labels, n_bins)["ece"]


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of Σ_k (p_k − 1[y = k])²."""
    p = np.asarray(probs, np.float64)
    y = _as_labels(labels, len(p))
    if not len(y):
        return float("nan")
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float,
                       n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """ECE / NLL / Brier before (T = 1) and after temperature scaling, with both reliability diagrams."""
    raw, cal = softmax(logits, 1.0), softmax(logits, temperature)
    raw_diagram, cal_diagram = reliability_diagram(raw, labels, n_bins), reliability_diagram(cal, labels, n_bins)
    return {
        "temperature": float(temperature),
        "ece_raw": raw_diagram["ece"],
        "ece_calibrated": cal_diagram["ece"],
        "nll_raw": nll(logits, labels, 1.0),
        "nll_calibrated": nll(logits, labels, temperature),
        "brier_raw": brier_score(raw, labels),
        "brier_calibrated": brier_score(cal, labels),
        "ece_bins": n_bins,
        "reliability": {"raw": raw_diagram, "calibrated": cal_diagram},
    }


def fit_model_temperatures(view_logits: np.ndarray | None, planes: np.ndarray, tumor_logits: np.ndarray,
                           tumors: np.ndarray) -> dict[str, Any]:
    """Both models' temperatures on a validation split's labelled rows (label < 0 = unknown, e.g. Kaggle planes).

    The one place temperatures are fitted: training's post-fit and evaluation both call it. Returns the
    temperatures with what they were fitted on and the validation NLL before → after.
    """
    out: dict[str, Any] = {"method": "temperature scaling (min NLL)", "view_temperature": 1.0}
    has_tumor = np.asarray(tumors) >= 0
    out["tumor_temperature"] = fit_temperature(tumor_logits[has_tumor], tumors[has_tumor])
    out["n_val_tumor"] = int(has_tumor.sum())
    out["val_nll_tumor"] = [nll(tumor_logits[has_tumor], tumors[has_tumor], t) for t in (1.0, out["tumor_temperature"])]
    n_planes = 0
    if view_logits is not None:
        has_plane = np.asarray(planes) >= 0
        n_planes = int(has_plane.sum())
        out["view_temperature"] = fit_temperature(view_logits[has_plane], planes[has_plane])
        out["n_val_view"] = n_planes
        out["val_nll_view"] = [nll(view_logits[has_plane], planes[has_plane], t)
                               for t in (1.0, out["view_temperature"])]
    out["fitted_on"] = f"validation split ({n_planes} plane / {out['n_val_tumor']} tumour labels)"
    return out
