"""Shared fixtures. Keep small: only what several test modules need."""

from __future__ import annotations

from pathlib import Path

import pytest

from braintumor_flax.paths import DEFAULT_DATA_DIR

REAL_DATA = DEFAULT_DATA_DIR


@pytest.fixture
def real_data_dir() -> Path:
    """The shared read-only data folder; skips the test when it is absent."""
    if not (REAL_DATA / "brisc2025").is_dir() or not (REAL_DATA / "kaggle-brain-tumor-mri").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (see ../shared/data/README.md)")
    return REAL_DATA


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """Point the project cache at an empty temporary folder for this test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("BRAINTUMOR_FLAX_CACHE", str(path))
    return path


def _quick_model(config, seed: int):
    """A randomly initialised model without JAX's eager initialisers (seconds instead of ~20 s on 2 CPUs)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from braintumor_flax.models import build_model

    model = nnx.eval_shape(lambda: build_model(config))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        var.set_value(jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), shape) if len(shape) > 1
                                  else rng.normal(0, 0.01, shape), jnp.float32))
    return model


def make_tiny_pipeline(*, image_size: int = 32, seed: int = 0, use_view_feature: bool = True,
                       width_divisor: int = 1, recipe: str = "stand-in", lower_blocks: int = 4):
    """Both models with random weights, the lower blocks identical in both (as after frozen-trunk training)."""
    import dataclasses

    from flax import nnx

    from braintumor_flax.checkpoint_info import CheckpointInfo, TrainingRecord
    from braintumor_flax.hub import BrainTumorPipeline
    from braintumor_flax.models import ModelConfig

    view_config = ModelConfig("view", image_size=image_size, width_divisor=width_divisor, lower_blocks=lower_blocks)
    tumor_config = dataclasses.replace(view_config, task="tumor",
                                       view_projection_dim=64 if use_view_feature else 0)
    view, tumor = _quick_model(view_config, seed), _quick_model(tumor_config, seed + 1)
    nnx.update(tumor.vgg, nnx.state(view.vgg))  # trunk identical; blocks 5 differ only through the heads
    return BrainTumorPipeline(view, tumor, info=CheckpointInfo(training=TrainingRecord(recipe=recipe),
                                                               shared_lower_blocks=True))


@pytest.fixture(scope="session")
def tiny_pipeline_factory():
    """`make_tiny_pipeline`: the one stand-in checkpoint every fast test builds on."""
    return make_tiny_pipeline
