"""Metric functions against scikit-learn and hand-computed cases; bootstrap CIs seeded and sane."""

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn import metrics as skm

from braintumor_flax.evaluation import metrics


def _probs(n: int, k: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities with some signal, so every metric is away from its trivial value."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + signal * np.eye(k)[y]
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def test_report_matches_sklearn():
    y, p = _probs(300, 4, seed=0)
    names = ["a", "b", "c", "d"]
    r = metrics.classification_report(y, p, names, n_resamples=0)
    pred = p.argmax(1)
    assert r["n"] == 300
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert r["macro_precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert r["macro_recall"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert r["macro_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert r["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    f1 = skm.f1_score(y, pred, average=None)
    for i, name in enumerate(names):
        assert r["per_class"][name]["f1"] == pytest.approx(f1[i])
        assert r["per_class"][name]["support"] == int((y == i).sum())
        assert r["per_class"][name]["auc"] == pytest.approx(skm.roc_auc_score(y == i, p[:, i]))


def test_hand_computed_case():
    # true:  0 0 0 1 1 2 ; predicted: 0 0 1 1 2 2
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[pred] * 0.7 + 0.1
    r = metrics.classification_report(y, p, ["x", "y", "z"], n_resamples=0)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # class y: precision 1/2, recall 1/2; class z: precision 1/2, recall 1; class x: 1 and 2/3
    assert r["per_class"]["x"]["precision"] == pytest.approx(1.0)
    assert r["per_class"]["x"]["recall"] == pytest.approx(2 / 3)
    assert r["per_class"]["y"]["f1"] == pytest.approx(0.5)
    assert r["per_class"]["z"]["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_class_never_predicted_has_zero_f1_like_sklearn():
    y = np.array([0, 1, 2, 2])
    p = np.eye(3)[[0, 1, 1, 1]]
    r = metrics.classification_report(y, p, ["a", "b", "c"], n_resamples=0)
    assert r["per_class"]["c"]["f1"] == 0.0
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro", zero_division=0))


def test_auc_undefined_without_positives_is_nan_and_ignored_in_macro():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    auc = metrics.one_vs_rest_auc(y, p)
    assert np.isnan(auc[2]) and auc[0] == pytest.approx(1.0)
    assert metrics.classification_report(y, p, "abc", n_resamples=0)["macro_auc"] == pytest.approx(1.0)


def test_weighted_auc_matches_sklearn_sample_weight_with_ties():
    rng = np.random.default_rng(1)
    y, p = _probs(120, 3, seed=1)
    p = np.round(p, 1)  # many tied scores
    weights = rng.integers(0, 4, size=(5, 120)).astype(float)
    got = metrics.weighted_ovr_auc(y, p, weights)
    for b in range(5):
        for k in range(3):
            want = skm.roc_auc_score(y == k, p[:, k], sample_weight=weights[b])
            assert got[b, k] == pytest.approx(want, abs=1e-12)


def test_bootstrap_resamples_agree_with_direct_computation():
    y, p = _probs(150, 4, seed=2)
    stats = metrics.bootstrap_statistics(y, p, n_resamples=20, seed=7)
    idx = metrics.bootstrap_indices(150, 20, 7)
    for b in (0, 5, 19):
        yy, pp = y[idx[b]], p[idx[b]]
        assert stats["accuracy"][b] == pytest.approx(skm.accuracy_score(yy, pp.argmax(1)))
        assert stats["macro_f1"][b] == pytest.approx(
            skm.f1_score(yy, pp.argmax(1), average="macro", labels=[0, 1, 2, 3], zero_division=0))
        assert stats["macro_auc"][b] == pytest.approx(skm.roc_auc_score(yy, pp, multi_class="ovr"))


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    y, p = _probs(400, 4, seed=3, signal=1.0)
    a = metrics.classification_report(y, p, "abcd", n_resamples=500, seed=0)
    b = metrics.classification_report(y, p, "abcd", n_resamples=500, seed=0)
    c = metrics.classification_report(y, p, "abcd", n_resamples=500, seed=1)
    for key, est in (("accuracy_ci95", "accuracy"), ("macro_f1_ci95", "macro_f1"), ("macro_auc_ci95", "macro_auc")):
        lo, hi = a[key]
        assert lo < a[est] < hi
        assert a[key] == b[key]  # same seed, same interval
        assert a[key] != c[key]  # another seed, another interval
    lo, hi = a["accuracy_ci95"]
    # Width close to the normal approximation 2·1.96·sqrt(p(1-p)/n).
    se = np.sqrt(a["accuracy"] * (1 - a["accuracy"]) / 400)
    assert 0.7 * 3.92 * se < hi - lo < 1.3 * 3.92 * se


def test_paired_difference_and_mcnemar():
    y = np.zeros(100, int)
    a = np.zeros(100, int)  # all correct
    b = np.zeros(100, int)
    b[:10] = 1  # B wrong on 10 images A gets right
    b[10:12] = 0
    out = metrics.paired_accuracy_difference(y, a, b, n_resamples=300, seed=0)
    assert out["difference"] == pytest.approx(0.10)
    assert (out["only_a_correct"], out["only_b_correct"]) == (10, 0)
    assert out["mcnemar_p"] == pytest.approx(binomtest(10, 10, 0.5).pvalue)
    lo, hi = out["difference_ci95"]
    assert 0 < lo <= 0.10 <= hi
    same = metrics.paired_accuracy_difference(y, a, a, n_resamples=50)
    assert same["difference"] == 0 and same["mcnemar_p"] == 1.0 and same["difference_ci95"] == [0.0, 0.0]


def test_paired_mean_difference_of_per_slice_scores():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.9, 300)
    a = b + rng.normal(0.02, 0.01, 300)  # A higher on most slices, by 0.02 on average
    out = metrics.paired_mean_difference(a, b, n_resamples=500, seed=0)
    assert out["difference"] == pytest.approx((a - b).mean()) and out["n"] == 300
    assert out["a_higher"] + out["b_higher"] == 300 and out["a_higher"] > 250
    lo, hi = out["difference_ci95"]
    assert 0.015 < lo < out["difference"] < hi < 0.025  # paired: far narrower than either mean's own spread
    assert out["wilcoxon_p"] < 1e-10
    same = metrics.paired_mean_difference(b, b, n_resamples=50)
    assert same["difference"] == 0 and same["wilcoxon_p"] == 1.0 and same["difference_ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="paired"):
        metrics.paired_mean_difference(a, b[:-1])


def test_roc_curves_shape_and_bad_input():
    y, p = _probs(50, 3, seed=4)
    curves = metrics.roc_curves(y, p)
    assert len(curves) == 3 and all(c is not None and c[0][0] == 0 and c[1][-1] == 1 for c in curves)
    with pytest.raises(ValueError):
        metrics.classification_report(y, p[:, :2], "abc", n_resamples=0)
    with pytest.raises(ValueError):
        metrics.classification_report(y + 5, p, "abc", n_resamples=0)
