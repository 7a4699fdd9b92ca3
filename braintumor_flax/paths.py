"""Where the project reads data and writes caches (never inside the read-only data folder)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
# The served model (app, API, evaluation default): the shared-trunk model, chosen on validation over the faithful
# two-network model, which stays in checkpoints/ (with its ablation in checkpoints-no-view/).
SERVED_CHECKPOINT_NAME = "checkpoints-shared-trunk"
DEFAULT_CHECKPOINT_DIR = PROJECT_ROOT / SERVED_CHECKPOINT_NAME
FAITHFUL_CHECKPOINT_DIR = PROJECT_ROOT / "checkpoints"


def cache_dir(*parts: str) -> Path:
    """A per-user cache folder: $BRAINTUMOR_FLAX_CACHE, else $XDG_CACHE_HOME/braintumor_flax."""
    root = os.environ.get("BRAINTUMOR_FLAX_CACHE")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "braintumor_flax")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_data_dir() -> Path:
    """$BRAINTUMOR_FLAX_DATA if set, else ../shared/data beside the project."""
    return Path(os.environ.get("BRAINTUMOR_FLAX_DATA", DEFAULT_DATA_DIR))
