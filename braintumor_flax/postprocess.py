"""After training: calibration temperatures (and, when available, OOD statistics) stored in the checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from braintumor_flax.hub import BrainTumorPipeline


def finalize_pipeline(pipeline: BrainTumorPipeline, run_dir: Path) -> None:
    """Fit temperatures on the validation split's logits saved by training (never on a test set)."""
    outputs = Path(run_dir) / "val_outputs.npz"
    if not outputs.is_file():
        return
    try:
        from braintumor_flax.calibration import fit_temperature
    except ImportError:  # calibration module not available: keep raw probabilities
        return
    with np.load(outputs, allow_pickle=False) as v:
        pipeline.info["calibration"] = {
            "view_temperature": float(fit_temperature(v["view_logits"], v["view_labels"])),
            "tumor_temperature": float(fit_temperature(v["tumor_logits"], v["tumor_labels"])),
            "fitted_on": "validation split",
        }
