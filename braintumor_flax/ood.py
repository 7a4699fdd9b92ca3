"""Out-of-distribution check: "does this look like the brain MRI slices the models were trained on?"

Two cheap, explainable tests; an image is flagged when either fails:

1. **Image statistics** of the model input (S x S x 3 uint8): every training slice is grey (R = G = B up to
   JPEG noise) and has almost no near-white pixels. A colour picture (mean chroma above the limit) or a
   page with a white background (share of near-white pixels above the limit) is flagged. Limits are the
   training set's extremes plus a margin, stored with the checkpoint.
2. **Feature distance**: the 512-d spatial mean of the shared lower VGG blocks' output (blocks 1-4, frozen
   ImageNet filters: generic texture/shape detectors, computed anyway) is compared with the training
   slices' by the Mahalanobis distance to the nearest class mean (one mean unless labels are given), with
   one shared covariance shrunk towards a scaled identity (Lee et al., 2018). The limit is a high quantile
   (default 99 %) of the same distance on held-out MRI slices, so by construction about 1 % of
   in-distribution slices exceed it; the reported score is distance / limit (> 1 = flagged). The view
   model's 128-d feature can be used instead (`feature="view_feature"`), but it was trained only to tell
   planes apart and misses grey non-MRI images (measured in benchmarks/eval_ood.py).

`fit_ood(...)` computes the statistics once (`training.fit_statistics` calls it at the end of training; they
are stored in the checkpoint as `CheckpointInfo.ood`: limits in config.json, matrices in ood.safetensors, see
`hub.write_config`);
`OODDetector` applies them. `python -m braintumor_flax.training.fit_statistics --checkpoint DIR` refits them
(with the temperatures) for an existing checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

OOD_FORMAT = 1
IMAGE_STAT_NAMES = ("colour", "white_fraction")
# Fallback limits when a checkpoint carries no fitted statistics (measured on the training split of
# BRISC 2025 + Kaggle at 128 px: max chroma 0.0, white fraction 99.9th percentile 0.10, max 0.14).
DEFAULT_IMAGE_LIMITS = {"colour": 0.04, "white_fraction": 0.25}
LOWER_DIM = 512  # channels of VGG16 block 4: the width of the lower-block OOD feature
WHITE_LEVEL = 230  # min(R, G, B) at or above this counts as near-white (paper, screenshots)


def image_statistics(images: np.ndarray, *, chunk: int = 512) -> np.ndarray:
    """uint8 [N, S, S, 3] → float32 [N, 2]: (mean chroma in [0, 1], share of near-white pixels)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    out = np.empty((len(images), len(IMAGE_STAT_NAMES)), np.float32)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk]
        hi, lo = x.max(axis=-1), x.min(axis=-1)
        out[start:start + chunk, 0] = (hi.astype(np.float32) - lo).mean(axis=(1, 2)) / 255.0
        out[start:start + chunk, 1] = (lo >= WHITE_LEVEL).mean(axis=(1, 2))
    return out


def pool_lower(lower_outputs: np.ndarray) -> np.ndarray:
    """[N, h, w, 512] output of the shared lower blocks → [N, 512] OOD features (spatial mean)."""
    return np.asarray(lower_outputs, np.float32).mean(axis=(1, 2))


def _round(a: np.ndarray, digits: int = 7) -> Any:
    """Nested lists with float32-level precision (plain Python, so fitted statistics print and compare easily)."""
    return np.vectorize(lambda v: float(f"{v:.{digits}g}"), otypes=[float])(np.asarray(a, np.float64)).tolist()


def _mahalanobis_min(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance from each row to the nearest class mean under one shared precision matrix."""
    diffs = features[:, None, :] - means[None, :, :]  # [N, C, D]
    d2 = np.einsum("ncd,de,nce->nc", diffs, precision, diffs)
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def fit_ood(
    features: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    calibration_features: np.ndarray | None = None,
    images: np.ndarray | None = None,
    image_stats: np.ndarray | None = None,
    false_alarm_rate: float = 0.01,
    shrinkage: float = 0.1,
    feature: str | None = None,
) -> dict[str, Any]:
    """Statistics for `CheckpointInfo.ood` from training-set view features (and images).

    features: float [N, D] of the training slices: `lower_gap` = the [N, 8, 8, 512] output of the shared
    lower blocks averaged over space (`pool_lower`; training caches that output anyway), or the view
    features (then say `feature="view_feature"`). labels: int [N] class index (-1 = unknown) for
    class-conditional means; None = one global mean. calibration_features: features of
    held-out slices (the validation split) to set the limit on; without them the training features are
    used, which sets a tighter limit (more false alarms). images / image_stats: training model inputs (or
    `image_statistics` of them) to fit the image limits; else the defaults are kept.
    feature: which features these are, "lower_gap" or "view_feature"; None = from their width (512 = the
    lower blocks' channels, anything else = view features), so older callers keep working.
    shrinkage: weight of the scaled identity blended into the covariance (ReLU features have dead units,
    so the raw covariance is singular).
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features [N >= 2, D], got {x.shape}")
    if feature is None:
        feature = "lower_gap" if x.shape[1] == LOWER_DIM else "view_feature"
    labels = np.zeros(len(x), np.int64) if labels is None else np.asarray(labels, np.int64)
    if not np.any(labels >= 0):
        labels = np.zeros(len(x), np.int64)
    # Rows of unknown class (-1) do not shape the class means or the covariance.
    classes = sorted(int(c) for c in np.unique(labels[labels >= 0]))
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = np.concatenate([x[labels == c] - means[i] for i, c in enumerate(classes)])
    cov = centred.T @ centred / max(len(centred) - len(classes), 1)
    scale = np.trace(cov) / cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * scale * np.eye(cov.shape[0])
    precision = np.linalg.inv(cov)
    calib = np.asarray(calibration_features if calibration_features is not None else x, np.float64)
    dist = _mahalanobis_min(calib, means, precision)
    limit = float(np.quantile(dist, 1 - false_alarm_rate))

    limits = dict(DEFAULT_IMAGE_LIMITS)
    if image_stats is None and images is not None:
        image_stats = image_statistics(images)
    if image_stats is not None:
        stats = np.asarray(image_stats, np.float64)
        # Training extremes plus a margin: these checks should almost never fire on a real MRI slice.
        limits = {"colour": max(0.04, float(stats[:, 0].max()) * 1.5 + 0.02),
                  "white_fraction": max(0.25, float(stats[:, 1].max()) * 1.5)}
    return {
        "format": OOD_FORMAT,
        "method": "mahalanobis_min_class_tied_cov+image_stats",
        "feature": feature,
        "feature_dim": int(x.shape[1]),
        "n_fit": int(len(x)),
        "n_calibration": int(len(calib)),
        "calibrated_on": "held_out" if calibration_features is not None else "training",
        "false_alarm_rate": float(false_alarm_rate),
        "shrinkage": float(shrinkage),
        "class_ids": classes,
        "means": _round(means),
        "precision": _round(precision),
        "distance_limit": limit,
        "distance_quantiles": {str(q): float(np.quantile(dist, q)) for q in (0.5, 0.9, 0.99, 0.999)},
        "image_limits": limits,
    }


@dataclasses.dataclass
class OODResult:
    flag: bool
    score: float  # max over the checks of value / limit; > 1 means flagged
    feature_score: float | None  # Mahalanobis distance / limit (None: checkpoint has no feature statistics)
    image_stats: dict[str, float]
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"flag": self.flag, "score": round(self.score, 4),
                "feature_score": None if self.feature_score is None else round(self.feature_score, 4),
                "image_stats": {k: round(v, 4) for k, v in self.image_stats.items()}, "reasons": self.reasons}


class OODDetector:
    """`CheckpointInfo.ood` (or nothing: image checks with default limits only) ready for scoring."""

    def __init__(self, stats: dict[str, Any] | None = None):
        stats = stats or {}
        self.stats = stats
        self.limits = {**DEFAULT_IMAGE_LIMITS, **stats.get("image_limits", {})}
        self.has_features = "precision" in stats
        self.feature = stats.get("feature", "lower_gap")
        if self.has_features:
            self.means = np.asarray(stats["means"], np.float64)
            expected = int(stats.get("feature_dim", LOWER_DIM))
            if self.means.shape[-1] != expected:
                raise ValueError(f"OOD statistics: the means are {self.means.shape[-1]}-d, not {expected}-d")
            self.precision = np.asarray(stats["precision"], np.float64)
            self.distance_limit = float(stats["distance_limit"])

    @property
    def checks(self) -> list[str]:
        return ["image_statistics"] + (["feature_distance"] if self.has_features else [])

    def feature_scores(self, features: np.ndarray) -> np.ndarray:
        feats = np.asarray(features, np.float64).reshape(len(features), -1)
        return _mahalanobis_min(feats, self.means, self.precision) / self.distance_limit

    def __call__(self, features: np.ndarray | None, images: np.ndarray) -> list[OODResult]:
        """features: [N, D] of the kind `self.feature` names (ignored without fitted statistics);
        images: uint8 [N, S, S, 3] model inputs."""
        stats = image_statistics(images)
        fscores = self.feature_scores(features) if self.has_features and features is not None else None
        results = []
        for i, (colour, white) in enumerate(stats):
            reasons = []
            colour_score = colour / self.limits["colour"]
            white_score = white / self.limits["white_fraction"]
            if colour_score > 1:
                reasons.append(f"it is a colour image (mean colour saturation {colour:.2f}; "
                               f"MRI slices are grey, limit {self.limits['colour']:.2f})")
            if white_score > 1:
                reasons.append(f"{white:.0%} of it is near-white background, like a page or screenshot "
                               f"(MRI slices: at most {self.limits['white_fraction']:.0%})")
            fscore = None if fscores is None else float(fscores[i])
            if fscore is not None and fscore > 1:
                reasons.append(f"its image features are unlike the training MRI slices (distance "
                               f"{fscore:.1f}x the limit that {1 - self.stats.get('false_alarm_rate', 0.01):.0%} "
                               "of held-out MRI slices stay under)")
            score = max(colour_score, white_score, fscore if fscore is not None else 0.0)
            results.append(OODResult(bool(reasons), float(score), fscore,
                                     {"colour": float(colour), "white_fraction": float(white)}, reasons))
        return results
