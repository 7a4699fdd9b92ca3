"""After training: calibration temperatures and OOD statistics, stored in the checkpoint's config.

Both are fitted on data the test sets never contribute to: temperatures on the validation split's logits,
the OOD feature statistics on the training split (limit set on the validation split).

    python -m braintumor_flax.postprocess --checkpoint checkpoints --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from braintumor_flax.calibration import fit_temperature
from braintumor_flax.data import PreparedData, prepare
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.ood import fit_ood, pool_lower


def tumor_logits(pipeline: BrainTumorPipeline, lower: np.ndarray, view_feature: np.ndarray,
                 *, batch_size: int = 64) -> np.ndarray:
    from braintumor_flax.training import predict_in_batches

    graphdef, state = nnx.split(pipeline.tumor_model)
    use_view = pipeline.tumor_model.config.use_view_feature
    fn = jax.jit(lambda s, x, e: nnx.merge(graphdef, s).from_lower(x.astype(np.float32), e if use_view else None))
    return predict_in_batches(lambda x, e: fn(state, x, e), lower, view_feature, batch_size, desc="tumour outputs")


def finalize_pipeline(pipeline: BrainTumorPipeline, data: PreparedData) -> dict:
    """Fit temperatures (validation) and OOD statistics (training, limit on validation) into pipeline.info."""
    from braintumor_flax.training import lower_features, view_outputs

    train, val = data.splits["train"], data.splits["val"]
    shared = pipeline.shares_lower_blocks or pipeline.view_model.config.shared_blocks == 4
    train_lower = lower_features(pipeline.view_model, train) if shared else None
    val_lower = lower_features(pipeline.view_model, val) if shared else None
    val_view_logits, val_feature = view_outputs(
        pipeline.view_model, val.images if val_lower is None else val_lower, from_lower=val_lower is not None)
    if val_lower is None:  # lower blocks differ between the models: run the tumour model on pixels
        from braintumor_flax.inference import Predictor

        val_tumor_logits = Predictor(pipeline).predict_arrays(val.images).tumor_logits
    else:
        tumor_lower = val_lower if pipeline.shares_lower_blocks else lower_features(pipeline.tumor_model, val)
        val_tumor_logits = tumor_logits(pipeline, tumor_lower, val_feature)
    has_plane, has_tumor = val.plane >= 0, val.tumor >= 0
    pipeline.info["calibration"] = {
        "view_temperature": fit_temperature(val_view_logits[has_plane], val.plane[has_plane]),
        "tumor_temperature": fit_temperature(val_tumor_logits[has_tumor], val.tumor[has_tumor]),
        "fitted_on": f"validation split ({int(has_plane.sum())} plane / {int(has_tumor.sum())} tumour labels)",
    }
    # OOD on the pooled frozen ImageNet blocks 1-4 output: it separated non-MRI images far better than the
    # 128-d view feature (benchmarks/eval_ood.py); the view feature is kept only when the blocks differ.
    if train_lower is not None and val_lower is not None:
        pipeline.info["ood"] = fit_ood(pool_lower(train_lower), None, calibration_features=pool_lower(val_lower),
                                       images=train.images)
    else:  # only this fallback needs the training split's view outputs
        train_view_logits, train_feature = view_outputs(pipeline.view_model, train.images, from_lower=False)
        pipeline.info["ood"] = fit_ood(train_feature, train_view_logits.argmax(-1), calibration_features=val_feature,
                                       images=train.images)
    return pipeline.info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fit calibration temperatures and OOD statistics into a checkpoint.")
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints"))
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write here instead of in place")
    args = p.parse_args(argv)
    pipeline = BrainTumorPipeline.from_pretrained(args.checkpoint)
    config = pipeline.view_model.config
    val_fraction = pipeline.info.get("training", {}).get("config", {}).get("val_fraction", 0.2)
    seed = pipeline.info.get("training", {}).get("config", {}).get("seed", 0)
    data = prepare(args.data_dir, image_size=config.image_size, val_fraction=val_fraction, seed=seed)
    trained_on = pipeline.info.get("training", {}).get("dataset_hash")
    if trained_on and trained_on != data.dataset_hash:
        raise SystemExit("this data is not the data the checkpoint was trained on (dataset hash differs)")
    info = finalize_pipeline(pipeline, data)
    pipeline.save_pretrained(args.out or args.checkpoint)
    print({k: v for k, v in info["calibration"].items()}, "OOD limit", info["ood"]["distance_limit"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
