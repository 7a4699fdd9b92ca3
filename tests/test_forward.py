"""The one forward path against an independent reference: each model called on its own, unfused, unbatched."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from braintumor_flax.models.forward import Forward, padded_chunks

SIZE = 32


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline_factory):
    return tiny_pipeline_factory(image_size=SIZE, seed=11)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)


def _reference(pipeline, images):
    """Model 1 then model 2, image by image, through the models' own __call__ (no shared lower pass)."""
    view_logits, features, tumor_logits = [], [], []
    for image in images:
        x = jnp.asarray(image[None])
        logits, feature = pipeline.view_model(x)
        view_logits.append(np.asarray(logits)[0])
        features.append(np.asarray(feature)[0])
        tumor_logits.append(np.asarray(pipeline.tumor_model(x, feature))[0])
    return np.stack(view_logits), np.stack(features), np.stack(tumor_logits)


def test_forward_equals_the_models_called_one_by_one(pipeline, images):
    view_logits, features, tumor_logits = _reference(pipeline, images)
    for batch_size, lone in ((2, False), (4, True), (8, False)):  # padding, a lone last chunk, one padded batch
        out = Forward.from_pipeline(pipeline, batch_size=batch_size, lone_chunk_own_shape=lone)(images)
        np.testing.assert_allclose(out.view_logits, view_logits, rtol=2e-4, atol=1e-3)
        np.testing.assert_allclose(out.view_feature, features, rtol=2e-4, atol=1e-3)
        np.testing.assert_allclose(out.tumor_logits, tumor_logits, rtol=2e-4, atol=1e-3)


def test_from_cached_lower_outputs_gives_the_same_logits(pipeline, images):
    forward = Forward.from_pipeline(pipeline, batch_size=4)
    direct = forward(images, pooled=True, keep_lower=True)
    lower = forward.lower(images)
    np.testing.assert_allclose(direct.lower, lower, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(direct.lower_pooled, lower.mean(axis=(1, 2)), rtol=2e-4, atol=1e-3)
    cached = forward(lower=lower)
    np.testing.assert_allclose(cached.tumor_logits, direct.tumor_logits, rtol=2e-4, atol=1e-3)
    np.testing.assert_allclose(cached.view_logits, direct.view_logits, rtol=2e-4, atol=1e-3)


def test_explain_returns_the_same_logits_and_view_only_skips_nothing_needed(pipeline, images):
    forward = Forward.from_pipeline(pipeline, batch_size=4)
    plain, explained = forward(images), forward(images, explain=True)
    np.testing.assert_allclose(explained.tumor_logits, plain.tumor_logits, rtol=2e-4, atol=1e-3)
    assert explained.cam.shape == (5, SIZE // 16, SIZE // 16) and explained.target.tolist() == list(
        plain.tumor_logits.argmax(1))
    # A tumour model with the view branch needs the view feature even when view logits are not asked for.
    assert forward(images, want_view=False).view_feature is not None
    view_only = Forward(pipeline.view_model, batch_size=4)(images)
    assert view_only.tumor_logits is None
    np.testing.assert_allclose(view_only.view_logits, plain.view_logits, rtol=2e-4, atol=1e-3)


def test_bad_inputs_are_refused(pipeline, images):
    forward = Forward.from_pipeline(pipeline, batch_size=4)
    with pytest.raises(ValueError, match="expected"):
        forward(images[:, :16])
    with pytest.raises(ValueError, match="either images or"):
        forward()
    with pytest.raises(ValueError, match="Grad-CAM"):
        Forward(pipeline.view_model)(images, explain=True)


def test_padded_chunks():
    assert list(padded_chunks(5, 2)) == [(0, 2, 2), (2, 2, 2), (4, 1, 2)]
    assert list(padded_chunks(5, 2, lone_chunk_own_shape=True))[-1] == (4, 1, 1)
    assert list(padded_chunks(0, 4)) == []


def test_head_inputs_are_what_the_tumour_head_reads(pipeline, images):
    """The refit's training input (`head_inputs`) through the head alone gives the full model's tumour logits."""
    out = Forward.from_pipeline(pipeline, batch_size=4)(images, head_inputs=True)
    assert out.tumor_pooled.shape == (len(images), pipeline.tumor_model.config.flat_dim)
    again = pipeline.tumor_model.head_from_pooled(jnp.asarray(out.tumor_pooled), jnp.asarray(out.view_feature))
    np.testing.assert_allclose(np.asarray(again), out.tumor_logits, rtol=2e-4, atol=1e-4)
    lower = Forward.from_pipeline(pipeline, batch_size=4).lower(images)
    from_lower = Forward.from_pipeline(pipeline, batch_size=4)(lower=lower, want_view=False, head_inputs=True)
    np.testing.assert_allclose(from_lower.tumor_pooled, out.tumor_pooled, rtol=2e-4, atol=1e-4)
