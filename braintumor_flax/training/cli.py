"""Command-line entry points (thin wrappers kept out of train.py so they can be tested)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from braintumor_flax.data.datasets import prepare
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, default_data_dir
from braintumor_flax.training.config import RECIPES, TrainConfig, get_recipe
from braintumor_flax.training.fit_statistics import finalize_pipeline, fit_calibration, prepare_training_data
from braintumor_flax.training.head_refit import check_refit_recipe, refit_tumor_head
from braintumor_flax.training.pipeline import train_pipeline


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the view and tumour models (two stages) and save a checkpoint.")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="dataset folder as published (BRISC 2025, Kaggle, or a folder holding both); "
                        "default $BRAINTUMOR_FLAX_DATA or ../shared/data")
    p.add_argument("--recipe", default="faithful", choices=sorted(RECIPES), help="named training config")
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint folder to write (default: the served checkpoint's folder; for a long-run recipe "
                        "RUN_DIR/checkpoint)")
    p.add_argument("--run-dir", type=Path, default=None, help="resumable train state and logs (default runs/RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue from the train state in --run-dir")
    p.add_argument("--weights", type=Path, default=None, help="ImageNet VGG16 weights (.h5, .onnx, .npz, .safetensors)")
    for name, typ in (("epochs", int), ("batch-size", int), ("learning-rate", float), ("image-size", int),
                      ("seed", int), ("label-smoothing", float), ("frozen-blocks", int), ("max-images", int),
                      ("style-variants", int), ("head-refit-epochs", int), ("head-refit-views", int),
                      ("head-refit-pastes", int), ("val-grouping", str), ("init-from", str)):
        p.add_argument(f"--{name}", type=typ, default=None, help="override the recipe's value")
    p.add_argument("--train-datasets", nargs="+", default=None, metavar="DATASET",
                   help="train and validate on these datasets only (e.g. brisc2025); the test sets stay the same")
    p.add_argument("--view-from", type=Path, default=None,
                   help="reuse the view model of this checkpoint and train only the tumour model")
    p.add_argument("--refit-head", type=Path, default=None, metavar="CHECKPOINT",
                   help="only the recipe's last stage: refit this checkpoint's tumour head over its frozen trunk "
                        "(--recipe: the checkpoint's recipe plus the refit, e.g. shared-frozen3-refit)")
    p.add_argument("--save-every-min", type=float, default=10.0,
                   help="long-run recipes: save the resumable state at least this often (minutes)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload the checkpoint to the Hub")
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    config = get_recipe(args.recipe, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                        image_size=args.image_size, seed=args.seed, label_smoothing=args.label_smoothing,
                        frozen_blocks=args.frozen_blocks, max_images=args.max_images,
                        style_variants=args.style_variants, head_refit_epochs=args.head_refit_epochs,
                        head_refit_views=args.head_refit_views, head_refit_pastes=args.head_refit_pastes,
                        val_grouping=args.val_grouping, init_from=args.init_from,
                        train_datasets=tuple(args.train_datasets) if args.train_datasets else None)
    run_dir = args.run_dir or Path("runs") / config.recipe
    data_dir = args.data_dir or default_data_dir()
    print(f"recipe {config.recipe}: {json.dumps(config.to_dict())}")
    t0 = time.perf_counter()
    if args.refit_head is not None:
        pipeline = BrainTumorPipeline.from_pretrained(args.refit_head)
        check_refit_recipe(TrainConfig.from_record(pipeline.info.training), config)
        data = prepare_training_data(pipeline, data_dir)
        refit_tumor_head(pipeline, data, config, run_dir, resume=args.resume, masks_from=data_dir)
        # Only the tumour head changed: its temperature is refitted; the OOD check reads the lower blocks, unchanged.
        pipeline.info.calibration = fit_calibration(pipeline, data)
        return _save(pipeline, args, t0)
    data = prepare(data_dir, image_size=config.image_size, **config.split_args()).training_from(config.train_datasets)
    if config.long_run:  # resumable at any step; saves its own checkpoint after the usual finalisation
        from braintumor_flax.training.long_loop import train_and_save

        args.out = args.out or run_dir / "checkpoint"
        pipeline = train_and_save(config, data, data_dir, run_dir, args.out, weights_source=args.weights,
                                  save_every_s=60 * args.save_every_min)
        return _push(pipeline, args)
    pipeline = train_pipeline(config, data_dir, run_dir, resume=args.resume, weights_source=args.weights,
                              view_from=args.view_from, data=data)
    finalize_pipeline(pipeline, data)
    return _save(pipeline, args, t0)


def _save(pipeline: BrainTumorPipeline, args: argparse.Namespace, t0: float) -> int:
    args.out = args.out or DEFAULT_CHECKPOINT_DIR
    pipeline.save_pretrained(args.out)
    print(f"saved checkpoint to {args.out} after {time.perf_counter() - t0:.0f} s")
    return _push(pipeline, args)


def _push(pipeline: BrainTumorPipeline, args: argparse.Namespace) -> int:
    if args.push_to_hub:
        url = pipeline.push_to_hub(args.push_to_hub)
        print(f"pushed to {url}")
    return 0
