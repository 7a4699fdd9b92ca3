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
