"""Grad-CAM: the compiled map equals the textbook formula, and it lands on the right part of the slice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from braintumor_flax.serve.overlay import gradcam_overlay, heatmap_on_original
from braintumor_flax.serve.predictor import Predictor

SIZE = 32


@pytest.fixture(scope="module")
def predictor(tiny_pipeline_factory) -> Predictor:
    return Predictor(tiny_pipeline_factory(image_size=SIZE, seed=3), batch_size=2)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)


def _reference_cam(predictor: Predictor, image: np.ndarray, target: int, *, per_position: bool = False
                   ) -> np.ndarray:
    """Grad-CAM written out with jax.grad on the unfused models: d logit_c / d A, view feature held fixed;
    `per_position`: HiResCAM (the gradient itself as weights, not its mean over positions)."""
    view, tumor = predictor.pipeline.view_model, predictor.pipeline.tumor_model
    x = jnp.asarray(image[None])
    _, feature = view(x)
    activation = tumor.upper_convs(tumor.lower(x))
    grads = jax.grad(lambda a: tumor.head(a, feature)[0, target])(activation)
    weights = np.asarray(grads) if per_position else np.asarray(grads).mean(axis=(1, 2), keepdims=True)
    return np.maximum((weights * np.asarray(activation)).sum(-1), 0)[0]


def test_explain_matches_predict_and_reference(predictor, images):
    plain = predictor.predict_arrays(images)
    explained = predictor.explain_arrays(images)
    cams, pooled = explained.outputs.cam, explained.outputs.lower_pooled
    np.testing.assert_allclose(explained.tumor_probs, plain.tumor_probs, atol=1e-5)
    np.testing.assert_allclose(explained.view_probs, plain.view_probs, atol=1e-5)
    np.testing.assert_allclose(explained.tumor_probs.sum(1), 1, atol=1e-5)
    assert pooled.shape == (2, 512)
    assert cams.shape == (2, SIZE // 16, SIZE // 16) and (cams >= 0).all()
    for i in range(len(images)):
        target = int(explained.tumor_probs[i].argmax())
        ref = _reference_cam(predictor, images[i], target)
        np.testing.assert_allclose(cams[i], ref, rtol=1e-4, atol=1e-6 * max(1.0, ref.max()))


def test_explicit_target_class(predictor, images):
    cams = predictor.explain_arrays(images[:1], target=np.array([2])).outputs.cam
    np.testing.assert_allclose(cams[0], _reference_cam(predictor, images[0], 2), rtol=1e-4, atol=1e-7)


def test_hirescam_is_the_gradient_times_activation_per_position(predictor, images):
    forward = predictor.forward
    grad_cam = forward(images, explain=True).cam
    hires = forward(images, explain=True, cam_method="hirescam")
    for i in range(len(images)):
        ref = _reference_cam(predictor, images[i], int(hires.target[i]), per_position=True)
        np.testing.assert_allclose(hires.cam[i], ref, rtol=1e-4, atol=1e-6 * max(1.0, ref.max()))
    assert not np.allclose(hires.cam, grad_cam)  # a different map, not the same one under another name
    with pytest.raises(ValueError, match="cam_method"):
        forward(images, explain=True, cam_method="gradcam++")


def test_single_image_and_empty_batch(predictor, images):
    prediction = predictor.explain_arrays(images[:1])
    assert prediction.view_probs.shape == (1, 3) and prediction.outputs.cam.shape == (1, 2, 2)
    prediction = predictor.explain_arrays(images[:0])
    assert prediction.tumor_probs.shape == (0, 4) and prediction.outputs.cam.shape[0] == 0


def test_heatmap_follows_the_pad_to_square_geometry():
    # A wide slice (50 x 100) sits in rows 25..75 of its 100 x 100 square: a hot top row is padding.
    cam = np.zeros((4, 4), np.float32)
    cam[0, :] = 1.0
    heat = heatmap_on_original(cam, (50, 100))
    assert heat.shape == (50, 100)
    # The hot row was cropped away with the padding: only its interpolated fringe reaches the slice.
    assert heat.max() < 0.6 and heat[-1].max() < 0.05
    cam = np.zeros((4, 4), np.float32)
    cam[2, 3] = 1.0  # square rows 50-75, cols 75-100 = the slice's lower-right quarter (rows 25-50)
    heat = heatmap_on_original(cam, (50, 100))
    rows, cols = np.mgrid[0:50, 0:100]
    row, col = (rows * heat).sum() / heat.sum(), (cols * heat).sum() / heat.sum()
    assert 28 < row < 47 and col > 75


def test_overlay_shape_and_limits():
    rgb = np.full((1000, 600, 3), 100, np.uint8)
    out = gradcam_overlay(rgb, np.eye(4, dtype=np.float32), max_side=256)
    assert out.dtype == np.uint8 and out.shape == (256, 154, 3)
    flat = gradcam_overlay(rgb[:50, :50], np.zeros((4, 4), np.float32))
    np.testing.assert_array_equal(flat, rgb[:50, :50])  # no evidence: the slice is shown unchanged


def test_fast_checkpoint_load_gives_the_same_model(predictor, images, tmp_path):
    """The app's loader skips random initialisation; the loaded pipeline must predict identically."""
    predictor.pipeline.save_pretrained(tmp_path / "ckpt")
    fast = Predictor.from_pretrained(tmp_path / "ckpt", batch_size=2).predict_arrays(images)
    plain = predictor.predict_arrays(images)
    np.testing.assert_array_equal(fast.tumor_logits, plain.tumor_logits)
    np.testing.assert_array_equal(fast.view_feature, plain.view_feature)
