"""Training as a library, on generated data and a tiny VGG: the jitted steps and a whole two-stage run in seconds.

(The real-data runs of `train.py` are in test_training.py.)
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from braintumor_flax.data.datasets import PreparedData, Split
from braintumor_flax.models import ModelConfig, build_model
from braintumor_flax.serve.predictor import Predictor
from braintumor_flax.training.config import TrainConfig
from braintumor_flax.training.fit_statistics import finalize_pipeline
from braintumor_flax.training.pipeline import train_pipeline
from braintumor_flax.training.steps import StepSettings, TrainState, eval_step, train_step

SIZE = 32
CONFIG = TrainConfig(recipe="generated", image_size=SIZE, epochs=3, batch_size=8, eval_batch_size=8,
                     learning_rate=3e-3, pretrained=False, width_divisor=16, hflip=False, vflip=False, zoom=0.0)


def _split(name: str, n: int, seed: int) -> Split:
    """Learnable images: the tumour class is the quadrant of a bright square, the plane its size."""
    rng = np.random.default_rng(seed)
    tumor = rng.integers(0, 4, n).astype(np.int32)
    plane = rng.integers(0, 3, n).astype(np.int32)
    images = rng.integers(0, 40, (n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        side = 4 + 3 * plane[i]
        top, left = (tumor[i] // 2) * 16 + 2, (tumor[i] % 2) * 16 + 2
        images[i, top:top + side, left:left + side] = 230
    hashes = [hashlib.sha1(f"{name}{i}{seed}".encode()).hexdigest() for i in range(n)]
    return Split(name, images, tumor, plane, np.array(["generated"] * n), [f"{name}/{i}.png" for i in range(n)],
                 hashes)


@pytest.fixture
def data() -> PreparedData:
    splits = {"train": _split("train", 64, 0), "val": _split("val", 24, 1)}
    return PreparedData(splits, report={}, dataset_hash="generated-0", image_size=SIZE)


def test_train_step_fits_a_batch_and_freezes_by_name():
    model = build_model(ModelConfig("view", image_size=SIZE, width_divisor=16), seed=0)
    tx = optax.adam(3e-3)
    state = TrainState.create(model, tx, StepSettings(from_lower=False), frozen_blocks=2)
    split = _split("b", 16, 3)
    x, y = jnp.asarray(split.images), jnp.asarray(split.plane)
    frozen_before = np.asarray(state.rest["vgg"]["block2_conv2"]["kernel"].get_value())
    trainable_before = np.asarray(state.params["vgg"]["block3_conv1"]["kernel"].get_value())
    first = None
    for step in range(25):
        state, loss, _ = train_step(state, x, None, y, jax.random.key(step))
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first
    np.testing.assert_array_equal(np.asarray(state.rest["vgg"]["block2_conv2"]["kernel"].get_value()), frozen_before)
    assert not np.array_equal(np.asarray(state.params["vgg"]["block3_conv1"]["kernel"].get_value()), trainable_before)
    assert eval_step(state, x, None).shape == (16, 3)


def test_two_stage_run_then_fit_statistics_then_serve(data, tmp_path, tmp_cache):
    pipeline = train_pipeline(CONFIG, None, tmp_path / "run", data=data, log=lambda _: None)
    history = pipeline.info.training.history
    assert [h["epoch"] for h in history["view"]] == [1, 2, 3] and len(history["tumor"]) == 3
    assert history["tumor"][-1]["train_loss"] < history["tumor"][0]["train_loss"]
    assert pipeline.info.shared_lower_blocks  # frozen blocks 1-4 are bit-identical in both models
    info = finalize_pipeline(pipeline, data)
    assert 0.05 <= info.calibration.tumor_temperature <= 20 and info.ood["feature_dim"] == 32
    pipeline.save_pretrained(tmp_path / "ckpt")
    predictor = Predictor.from_pretrained(tmp_path / "ckpt", batch_size=8)
    assert predictor.pipeline.info.training.recipe == "generated"
    val = data.splits["val"]
    served = predictor.predict_arrays(val.images)
    np.testing.assert_allclose(served.tumor_probs.sum(1), 1, atol=1e-5)
    saved = np.load(tmp_path / "run" / "val_outputs.npz")
    # Training validated on float16-cached lower outputs, the app runs from pixels: equal up to that rounding.
    np.testing.assert_allclose(served.tumor_logits, saved["tumor_logits"], rtol=1e-2, atol=5e-3)


# Cached block-4 or block-3 outputs (block 4 then trains on them), and full fine-tuning on pixels.
@pytest.mark.parametrize("frozen_blocks", [4, 3, 0])
def test_shared_trunk_run_serves_one_trunk(data, tmp_path, tmp_cache, frozen_blocks):
    config = CONFIG.replace(recipe="generated-shared", model="shared_trunk", frozen_blocks=frozen_blocks,
                            cache_lower_features=frozen_blocks > 0, pixel_augment=frozen_blocks == 0,
                            keep_best=True, epochs=2)
    pipeline = train_pipeline(config, None, tmp_path / "run", data=data, log=lambda _: None)
    assert pipeline.view_model.vgg is pipeline.tumor_model.vgg  # one trunk object while training
    assert pipeline.view_model.config.lower_blocks == (frozen_blocks or 4)
    history = pipeline.info.training.history["shared"]
    assert "val_view_accuracy" in history[0] and history[-1]["kept_epoch"] in (1, 2)
    finalize_pipeline(pipeline, data)
    pipeline.save_pretrained(tmp_path / "ckpt")
    predictor = Predictor.from_pretrained(tmp_path / "ckpt", batch_size=8)
    assert predictor.pipeline.shares_trunk and predictor.forward.share_trunk
    assert predictor.pipeline.view_model.config.lower_blocks == (frozen_blocks or 4)  # saved in config.json
    # The OOD check reads the pooled lower output, whatever its width (block 3: 256 / 16 here).
    assert predictor.pipeline.info.ood["feature"] == "lower_gap"
    assert predictor.pipeline.info.ood["feature_dim"] == predictor.pipeline.view_model.config.lower_shape[-1]
    assert predictor.pipeline.view_model.vgg is not predictor.pipeline.tumor_model.vgg  # loaded: equal copies
    val = data.splits["val"]
    served = predictor.explain_arrays(val.images)
    saved = np.load(tmp_path / "run" / "val_outputs.npz")
    tol = {"rtol": 1e-2, "atol": 5e-3} if frozen_blocks else {"rtol": 1e-4, "atol": 1e-4}  # float16 cache
    np.testing.assert_allclose(served.tumor_logits, saved["tumor_logits"], **tol)
    np.testing.assert_allclose(served.view_logits, saved["view_logits"], **tol)
    assert served.outputs.cam.shape == (len(val), SIZE // 16, SIZE // 16)


def test_augmented_views_are_reproducible_distinct_copies():
    from braintumor_flax.training.head_refit import augmented_views

    images = np.random.default_rng(0).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    images[..., 1] = images[..., 2] = images[..., 0]  # grey slices, as MRI is
    first, second = augmented_views(images, 2, seed=3, batch_size=2)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert not np.array_equal(first, images) and not np.array_equal(first, second)
    assert (first[..., 0] == first[..., 2]).all()  # a grey slice stays grey
    again, _ = augmented_views(images, 2, seed=3, batch_size=2)
    np.testing.assert_array_equal(again, first)  # same seed, same copies
    assert not np.array_equal(augmented_views(images, 1, seed=4, batch_size=2)[0], first)


def test_init_from_continues_a_checkpoint(data, tmp_path, tmp_cache):
    """`init_from` starts from a saved shared-trunk checkpoint: at learning rate 0 the continued model answers
    as the checkpoint does, also with other blocks frozen than it was trained with."""
    config = CONFIG.replace(recipe="generated-shared", model="shared_trunk", frozen_blocks=3, keep_best=True,
                            epochs=2)
    first = train_pipeline(config, None, tmp_path / "run", data=data, log=lambda _: None)
    finalize_pipeline(first, data)
    first.save_pretrained(tmp_path / "ckpt")
    continued = config.replace(frozen_blocks=2, cache_lower_features=False, pixel_augment=True, epochs=1,
                               learning_rate=0.0, init_from=str(tmp_path / "ckpt"))
    second = train_pipeline(continued, None, tmp_path / "run2", data=data, log=lambda _: None)
    finalize_pipeline(second, data)
    second.save_pretrained(tmp_path / "ckpt2")
    val = data.splits["val"]
    before = Predictor.from_pretrained(tmp_path / "ckpt", batch_size=8).predict_arrays(val.images)
    after = Predictor.from_pretrained(tmp_path / "ckpt2", batch_size=8).predict_arrays(val.images)
    np.testing.assert_allclose(after.tumor_logits, before.tumor_logits, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(after.view_logits, before.view_logits, rtol=1e-3, atol=1e-3)
    assert second.info.training.config["init_from"] == str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="the recipe wants"):
        train_pipeline(continued.replace(image_size=2 * SIZE), None, tmp_path / "run3", data=data,
                       log=lambda _: None)
