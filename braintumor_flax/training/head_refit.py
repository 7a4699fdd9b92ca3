"""Refitting the tumour head over the frozen trunk: a recipe's last, cheap stage (`TrainConfig.head_refit_epochs`).

Why: after the trunk's 6 epochs (about 9 minutes each on a 2-core CPU), the served shared-frozen3 model still
underfitted: 0.971 accuracy on its own training images (no dropout, no augmentation). Over the trunk's output,
computed once per image, an epoch of the tumour head alone takes seconds, so it can train ten times longer.

What it trains on: the tumour head's image input (the last convolution pooled and flattened, `Forward`'s
`head_inputs`) and the view feature, for each training image and, as a second example, for its mirror image
(the flip the trunk stages apply to cached lower-block maps), and, with `head_refit_views`, for that many
pixel-augmented copies of it (`augment.PixelAugment`, seeded per copy, each run through the trunk once), and,
with `head_refit_pastes`, for no-tumour slices with a BRISC tumour pasted in (`lesion_paste`). The
trunk, the view head and so the view feature stay as they are; a segmenter reading that trunk still fits. The
epoch with the best validation accuracy is kept; `finalize_pipeline` then refits the temperatures on
validation. Both models of the two-stage recipes work the same way (the tumour model's own trunk gives its
input).

An existing checkpoint gets this stage with
`python train.py --refit-head CHECKPOINT --recipe RECIPE --out DIR`, where RECIPE is the checkpoint's recipe
plus the refit (e.g. shared-frozen3 → shared-frozen3-refit).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from braintumor_flax.data.splits import PreparedData, Split
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.models.forward import Forward, Outputs
from braintumor_flax.training.augment import PixelAugment, augmented_copies
from braintumor_flax.training.config import TrainConfig
from braintumor_flax.training.lesion_paste import paste_tumours
from braintumor_flax.training.pipeline import (
    StageData,
    StageTrainer,
    _cap,
    _resume_key,
    digest,
    fit_stage,
    lower_features,
    machine_description,
)
from braintumor_flax.training.segmentation import MaskSource, masks_for

# TrainConfig fields that only the refit reads: a checkpoint trained without it differs from its "-refit"
# recipe in these (and the name) alone.
REFIT_FIELDS = ("head_refit_epochs", "head_refit_learning_rate", "head_refit_views", "head_refit_pastes")


def refit_config(config: TrainConfig) -> TrainConfig:
    """The settings the refit stage trains with: the recipe's loss, batch and weight decay; its own epochs and
    rate; warm-up over the first tenth, cosine after; every VGG block frozen; the best validation epoch."""
    return config.replace(epochs=config.head_refit_epochs, learning_rate=config.head_refit_learning_rate,
                          schedule="warmup_cosine", warmup_epochs=config.head_refit_epochs / 10, frozen_blocks=5,
                          keep_best=True, style_variants=0, pixel_augment=False)


def trunk_outputs(pipeline: BrainTumorPipeline, split: Split, *, with_mirrors: bool = False, views: int = 0,
                  seed: int = 0, batch_size: int = 64, forward: Forward | None = None) -> list[Outputs]:
    """`Forward`'s outputs with the tumour head's inputs (`head_inputs=True`) for every image of `split`, from its
    (cached) lower-block outputs, read once; `with_mirrors`: then also for the mirror images (a second entry);
    `views`: then for that many pixel-augmented copies (`augmented_views`, through the whole trunk), one entry
    each. `forward`: the pipeline's `Forward` with that batch size, if the caller has one compiled already."""
    if not pipeline.shares_lower_blocks:
        raise ValueError("a head refit reads one cached lower-block output per image: the two models must share "
                         "their lower blocks")
    lower = lower_features(pipeline.view_model, split, batch_size=batch_size)
    # [N, h, w, c]: mirror the width, as training's flip of a cached map does
    variants = [lower, np.ascontiguousarray(lower[:, :, ::-1])] if with_mirrors else [lower]
    forward = forward or Forward.from_pipeline(pipeline, batch_size=batch_size)  # compiled once for every variant
    outs = [forward(lower=v, want_view=False, head_inputs=True) for v in variants]
    return outs + [forward(copy, want_view=False, head_inputs=True)
                   for copy in augmented_views(split.images, views, seed, batch_size)]


def augmented_views(images: np.ndarray, views: int, seed: int, batch_size: int = 64) -> list[np.ndarray]:
    """`views` copies of uint8 `images` [N, S, S, 3], each image through one random `PixelAugment` (reproducible
    from `seed`, copy and batch), back to uint8."""
    return [copy for copy, _ in augmented_copies(images, views, seed, PixelAugment(), batch_size=batch_size)]


def _stage_data(pipeline: BrainTumorPipeline, split: Split, *, with_mirrors: bool, batch_size: int,
                views: int = 0, seed: int = 0, pastes: int = 0, masks_from: MaskSource | None = None) -> StageData:
    """The head's inputs (float16) and labels for the images of `split` with a tumour label, each mirror image
    (`with_mirrors`), each augmented copy (`views`) and each slice with a pasted tumour (`pastes` per no-tumour
    slice, `lesion_paste`; their masks from `masks_from`) its own example."""
    split = split.subset(split.tumor >= 0)
    forward = Forward.from_pipeline(pipeline, batch_size=batch_size)
    outs = trunk_outputs(pipeline, split, with_mirrors=with_mirrors, views=views, seed=seed, batch_size=batch_size,
                         forward=forward)
    labels = [split.tumor] * len(outs)
    if pastes:
        if masks_from is None:
            raise ValueError("pasting tumours needs their masks: pass masks_from (the data folder)")
        masks, known = masks_for(split, masks_from)
        # A slice without a plane label (Kaggle) is taken to be in the plane the view model answers.
        planes = np.where(split.plane >= 0, split.plane, outs[0].view_logits.argmax(axis=1))
        images, pasted_labels = paste_tumours(split.images, split.tumor, split.plane, masks, known, planes,
                                              copies=pastes, seed=seed)
        outs.append(forward(images, want_view=False, head_inputs=True))
        labels.append(pasted_labels)
    view_feature = (np.concatenate([o.view_feature for o in outs])
                    if pipeline.tumor_model.config.use_view_feature else None)
    return StageData(np.concatenate([o.tumor_pooled for o in outs]).astype(np.float16),
                     np.concatenate(labels), view_feature)


def refit_tumor_head(pipeline: BrainTumorPipeline, data: PreparedData, config: TrainConfig, run_dir: str | Path, *,
                     resume: bool = False, masks_from: MaskSource | None = None,
                     log: Callable[[str], None] = print) -> BrainTumorPipeline:
    """Train `pipeline`'s tumour head for `config.head_refit_epochs` over its frozen trunk; the pipeline gets the
    refitted tumour model and its training record this stage's history and time (`tumor_head`). `masks_from`
    (the data folder): where `config.head_refit_pastes` finds the tumour masks."""
    if config.head_refit_epochs < 1:
        raise ValueError("head_refit_epochs must be at least 1 for a refit")
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = refit_config(config)
    train = _cap(data.splits["train"], config.max_images)
    val = _cap(data.splits["val"], config.max_images)
    train_data = _stage_data(pipeline, train, with_mirrors=True, batch_size=config.eval_batch_size,
                             views=config.head_refit_views, seed=config.seed, pastes=config.head_refit_pastes,
                             masks_from=masks_from)
    val_data = _stage_data(pipeline, val, with_mirrors=False, batch_size=config.eval_batch_size)
    log(f"tumour head refit: {len(train_data)} train examples (images, their mirrors, "
        f"{config.head_refit_views} augmented copies, {config.head_refit_pastes} pasted tumours per no-tumour slice) "
        f"/ {len(val_data)} val, "
        f"{settings.epochs} epochs at peak rate {settings.learning_rate:g}")
    trainer = StageTrainer(pipeline.tumor_model, settings, from_lower=False, from_pooled=True, name="tumor_head",
                           steps_per_epoch=max(1, len(train_data) // settings.batch_size))
    history = fit_stage(trainer, train_data, val_data, run_dir / "tumor_head_state", resume, log,
                        depends_on=digest(_resume_key(settings), data.dataset_hash, "tumor_head",
                                          pipeline.tumor_model))
    pipeline.tumor_model = trainer.model()
    record = pipeline.info.training
    if record is not None:
        timings = dict(record.timings_s)
        timings["head_refit_s"] = round(time.perf_counter() - t0, 1)
        if "total_s" in timings:
            timings["total_s"] = round(timings["total_s"] + timings["head_refit_s"], 1)
        here = machine_description()
        machine = here if record.machine in ("", here) else f"{record.machine}; head refit: {here}"
        pipeline.info.training = dataclasses.replace(
            record, recipe=config.recipe, config=config.to_dict(), history={**record.history, "tumor_head": history},
            timings_s=timings, machine=machine)
    return pipeline


def check_refit_recipe(checkpoint_config: TrainConfig, recipe: TrainConfig) -> None:
    """A refit of an existing checkpoint is recorded as `recipe` only if that is what trained the checkpoint,
    plus the refit: every other field must agree."""
    if recipe.head_refit_epochs < 1:
        raise SystemExit(f"recipe {recipe.recipe} has no head refit (head_refit_epochs = 0)")
    if checkpoint_config.head_refit_epochs > 0:  # a second refit would start from the refitted head, unrecorded
        raise SystemExit(f"this checkpoint's tumour head was already refitted ({checkpoint_config.head_refit_epochs} "
                         "epochs): refit the checkpoint it came from")
    ignored = {"recipe", *REFIT_FIELDS}
    trained, asked = checkpoint_config.to_dict(), recipe.to_dict()
    differ = sorted(k for k in asked if k not in ignored and trained.get(k) != asked[k])
    if differ:
        raise SystemExit(f"the checkpoint was not trained with recipe {recipe.recipe} (before its refit): "
                         + ", ".join(f"{k} = {trained.get(k)!r}, not {asked[k]!r}" for k in differ))
