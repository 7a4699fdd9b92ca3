"""Out-of-distribution check: the statistics behave as documented, MRI slices pass, non-MRI images are flagged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from braintumor_flax.data import ood_samples
from braintumor_flax.data.imageio import decode_image, to_model_input
from braintumor_flax.ood import DEFAULT_IMAGE_LIMITS, OODDetector, fit_ood, image_statistics
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, DEFAULT_DATA_DIR

BRISC_TEST = DEFAULT_DATA_DIR / "brisc2025" / "classification_task" / "test"
KAGGLE_TEST = DEFAULT_DATA_DIR / "kaggle-brain-tumor-mri" / "Testing"


def _mri_inputs(n_per_dataset: int) -> np.ndarray:
    if not BRISC_TEST.is_dir() or not KAGGLE_TEST.is_dir():
        pytest.skip(f"test images not found under {DEFAULT_DATA_DIR}")
    files = []
    for root in (BRISC_TEST, KAGGLE_TEST):
        all_files = sorted(root.rglob("*.jpg"))
        files += [all_files[i] for i in np.linspace(0, len(all_files) - 1, n_per_dataset).astype(int)]
    return np.stack([to_model_input(decode_image(f), 128) for f in files])


def _non_mri_inputs() -> tuple[list[str], np.ndarray]:
    kinds, images = zip(*ood_samples.synthetic(n_per_kind=2, seed=1), strict=True)
    return list(kinds), np.stack([to_model_input(im, 128) for im in images])


def test_fit_ood_false_alarm_rate_and_distance():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 3, (3, 16))
    labels = rng.integers(0, 3, 6000)
    train = means[labels] + rng.normal(0, 1, (6000, 16)) * rng.uniform(0.5, 2, 16)
    held_labels = rng.integers(0, 3, 4000)
    held = means[held_labels] + rng.normal(0, 1, (4000, 16)) * rng.uniform(0.5, 2, 16)
    stats = fit_ood(train, labels, calibration_features=held[:2000], false_alarm_rate=0.02)
    json.dumps(stats)  # stored in config.json: must be plain JSON
    assert stats["calibrated_on"] == "held_out" and stats["class_ids"] == [0, 1, 2]
    detector = OODDetector(stats)
    fresh = detector.feature_scores(held[2000:])
    assert 0.005 < (fresh > 1).mean() < 0.05  # ~2 % by construction, on data the limit never saw
    far = means[0] + 15.0
    assert detector.feature_scores(far[None])[0] > 2
    grey = np.full((2, 8, 8, 3), 90, np.uint8)
    results = detector(np.stack([means[1], far]), grey)
    assert [r.flag for r in results] == [False, True]
    assert "unlike the training MRI slices" in results[1].reasons[0]


def test_unknown_labels_do_not_shape_the_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (500, 4))
    labels = np.where(np.arange(500) < 250, 0, -1)
    stats = fit_ood(x, labels)
    assert stats["class_ids"] == [0] and stats["calibrated_on"] == "training"
    np.testing.assert_allclose(stats["means"][0], x[:250].mean(0), atol=1e-6)


def test_image_statistics_flag_colour_and_pages_not_grey_slices():
    kinds, images = _non_mri_inputs()
    stats = image_statistics(images)
    assert stats.shape == (len(kinds), 2)
    results = OODDetector(None)(None, images)  # no fitted statistics: image checks with default limits
    flagged = {k for k, r in zip(kinds, results, strict=True) if r.flag}
    assert {"noise_rgb", "gradient_colour", "photo_like", "document"} <= flagged
    doc = results[kinds.index("document")]
    assert any("near-white" in reason for reason in doc.reasons) and doc.feature_score is None


def test_real_mri_slices_pass_the_image_checks():
    images = _mri_inputs(40)
    stats = image_statistics(images)
    assert (stats[:, 0] < DEFAULT_IMAGE_LIMITS["colour"]).all()
    assert (stats[:, 1] < DEFAULT_IMAGE_LIMITS["white_fraction"]).all()


def _features(predictor, detector: OODDetector, images: np.ndarray) -> np.ndarray:
    outputs = predictor.explain_arrays(images).outputs
    return outputs.lower_pooled if detector.feature == "lower_gap" else outputs.view_feature


@pytest.fixture(scope="module")
def checkpoint_predictor():
    env = os.environ.get("BRAINTUMOR_FLAX_MODEL")
    folder = Path(env) if env and Path(env).is_dir() else DEFAULT_CHECKPOINT_DIR
    if not (folder / "config.json").is_file():
        pytest.skip(f"no trained checkpoint in {folder} (train.py writes it)")
    from braintumor_flax.serve.predictor import Predictor

    predictor = Predictor.from_pretrained(folder)
    if predictor.pipeline.info.ood is None:
        pytest.skip("checkpoint has no OOD statistics (python -m braintumor_flax.training.fit_statistics)")
    return predictor


def test_checkpoint_statistics_on_real_and_generated_images(checkpoint_predictor):
    detector = OODDetector(checkpoint_predictor.pipeline.info.ood)
    mri = _mri_inputs(30)
    mri_results = detector(_features(checkpoint_predictor, detector, mri), mri)
    assert np.mean([r.flag for r in mri_results]) <= 0.07  # ~1-2 % expected; a small sample is noisy
    kinds, images = _non_mri_inputs()
    results = detector(_features(checkpoint_predictor, detector, images), images)
    assert np.mean([r.flag for r in results]) >= 0.8
