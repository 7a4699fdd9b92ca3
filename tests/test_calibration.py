"""Temperature scaling and calibration measures on synthetic sets whose true temperature is known."""

import numpy as np
import pytest

from braintumor_flax import calibration


def _sampled(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated by construction at T = 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, k))
    p = calibration.softmax(logits)
    labels = (rng.random(n)[:, None] > p.cumsum(1)).sum(1)
    return logits, labels


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_fit_recovers_mis_scaling_and_reduces_nll_and_ece(scale):
    logits, labels = _sampled(4000, 4, seed=0)
    mis = logits * scale  # over- (3) or under-confident (0.4)
    t = calibration.fit_temperature(mis, labels)
    assert t == pytest.approx(scale, rel=0.1)
    assert calibration.nll(mis, labels, t) < calibration.nll(mis, labels, 1.0) - 0.01
    ece_raw = calibration.expected_calibration_error(calibration.softmax(mis), labels)
    ece_cal = calibration.expected_calibration_error(calibration.softmax(mis, t), labels)
    assert ece_cal < ece_raw / 2


def test_fit_is_the_minimum_on_a_grid():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 3)) * 4
    # Labels agree with the arg-max 60 % of the time: overconfident logits, optimum well inside the bounds.
    labels = np.where(rng.random(300) < 0.6, logits.argmax(1), rng.integers(0, 3, 300))
    t = calibration.fit_temperature(logits, labels)
    grid = np.geomspace(0.05, 20, 2000)
    best = min(calibration.nll(logits, labels, g) for g in grid)
    assert calibration.nll(logits, labels, t) <= best + 1e-9
    assert 1.5 < t < 15


def test_fit_edge_cases():
    assert calibration.fit_temperature(np.zeros((0, 4)), np.zeros(0, int)) == 1.0
    separable = np.array([[5.0, -5.0], [-5.0, 5.0]] * 10)
    t = calibration.fit_temperature(separable, np.array([0, 1] * 10))
    assert t == pytest.approx(calibration.TEMPERATURE_BOUNDS[0], rel=0.01)  # bounded, not 0


def test_ece_and_reliability_hand_computed():
    # Two bins used (of 10): conf 0.95 ×2 (one right) and conf 0.55 ×2 (both right).
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    d = calibration.reliability_diagram(probs, labels, n_bins=10)
    assert sum(d["count"]) == 4 and d["count"][9] == 2 and d["count"][5] == 2
    assert d["accuracy"][9] == pytest.approx(0.5) and d["confidence"][9] == pytest.approx(0.95)
    assert d["accuracy"][0] is None  # empty bin
    want = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55)
    assert d["ece"] == pytest.approx(want)
    assert calibration.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(want)


def test_ece_small_when_calibrated_and_brier_hand_case():
    logits, labels = _sampled(20000, 3, seed=2)
    assert calibration.expected_calibration_error(calibration.softmax(logits), labels) < 0.02
    assert calibration.brier_score(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([0, 0])) == pytest.approx(0.25)


def test_calibration_report_keys_and_argmax_unchanged():
    logits, labels = _sampled(500, 4, seed=3)
    r = calibration.calibration_report(logits * 2, labels, temperature=2.0)
    assert r["nll_calibrated"] < r["nll_raw"] and r["ece_calibrated"] < r["ece_raw"]
    assert r["brier_calibrated"] < r["brier_raw"]
    np.testing.assert_array_equal(calibration.softmax(logits, 2.0).argmax(1), logits.argmax(1))
