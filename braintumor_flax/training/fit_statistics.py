"""After training: the post-training statistics a checkpoint serves with, fitted in one place.

* calibration temperatures on the validation split's logits (`calibration.fit_model_temperatures`);
* the OOD check's feature statistics on the training split's pooled lower-block outputs, its limit on the
  validation split's (`ood.fit_ood`).

Both use data the test sets never contribute to. `train.py` calls `finalize_pipeline`; for an existing
checkpoint:

    python -m braintumor_flax.training.fit_statistics --checkpoint checkpoints --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from braintumor_flax.calibration import fit_model_temperatures
from braintumor_flax.checkpoint_info import Calibration, CheckpointInfo
from braintumor_flax.data.splits import PreparedData
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.models.forward import Forward
from braintumor_flax.ood import fit_ood, pool_lower
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR
from braintumor_flax.training.config import TrainConfig
from braintumor_flax.training.pipeline import lower_features


def fit_calibration(pipeline: BrainTumorPipeline, data: PreparedData, *, batch_size: int = 64,
                    val_lower: np.ndarray | None = None) -> Calibration:
    """Temperatures of both models on the validation split (`val_lower`: its lower-block outputs, if at hand)."""
    val = data.splits["val"]
    forward = Forward.from_pipeline(pipeline, batch_size=batch_size)
    if pipeline.shares_lower_blocks:  # the lower blocks' outputs are cached by training: only the heads run
        if val_lower is None:
            val_lower = lower_features(pipeline.view_model, val, batch_size=batch_size)
        out = forward(lower=val_lower)
    else:
        out = forward(val.images)
    fitted = fit_model_temperatures(out.view_logits, val.plane, out.tumor_logits, val.tumor)
    return Calibration.from_dict(fitted)


def fit_ood_statistics(pipeline: BrainTumorPipeline, data: PreparedData, *, batch_size: int = 64,
                       val_lower: np.ndarray | None = None) -> dict:
    """OOD statistics on the pooled lower-block output (as the app measures it), limit on validation.

    That feature separated non-MRI images far better than the 128-d view feature (benchmarks/eval_ood.py).
    """
    train, val = data.splits["train"], data.splits["val"]
    train_lower = lower_features(pipeline.view_model, train, batch_size=batch_size)
    if val_lower is None:
        val_lower = lower_features(pipeline.view_model, val, batch_size=batch_size)
    # Named, not inferred from the width: block 3's output (a blocks 1-3 split) is 256 wide, not 512.
    return fit_ood(pool_lower(train_lower), None, calibration_features=pool_lower(val_lower), images=train.images,
                   feature="lower_gap")


def finalize_pipeline(pipeline: BrainTumorPipeline, data: PreparedData, *, batch_size: int = 64) -> CheckpointInfo:
    """Fit temperatures and OOD statistics into `pipeline.info` (what `save_pretrained` then writes); the
    validation split's lower-block outputs, which both fits read, are loaded once."""
    val_lower = lower_features(pipeline.view_model, data.splits["val"], batch_size=batch_size)
    pipeline.info.calibration = fit_calibration(pipeline, data, batch_size=batch_size, val_lower=val_lower)
    pipeline.info.ood = fit_ood_statistics(pipeline, data, batch_size=batch_size, val_lower=val_lower)
    return pipeline.info


def prepare_training_data(pipeline: BrainTumorPipeline, data_dir: str | Path | None) -> PreparedData:
    """The data split exactly as the checkpoint's training split it (its validation fraction, seed and grouping)."""
    from braintumor_flax.data.datasets import prepare  # needs the dedup libraries; training.gpu does not import it

    config = TrainConfig.from_record(pipeline.info.training)
    data = prepare(data_dir, image_size=pipeline.view_model.config.image_size, **config.split_args())
    trained_on = pipeline.info.dataset_hash
    if trained_on and trained_on != data.dataset_hash:
        raise SystemExit("this data is not the data the checkpoint was trained on (dataset hash differs)")
    return data.training_from(config.train_datasets)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fit calibration temperatures and OOD statistics into a checkpoint.")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT_DIR)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write here instead of in place")
    args = p.parse_args(argv)
    pipeline = BrainTumorPipeline.from_pretrained(args.checkpoint)
    info = finalize_pipeline(pipeline, prepare_training_data(pipeline, args.data_dir))
    pipeline.save_pretrained(args.out or args.checkpoint)
    print(info.calibration.to_dict(), "OOD limit", info.ood["distance_limit"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
