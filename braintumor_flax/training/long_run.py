"""The long CPU run (issue 37): the shared trunk, both heads and the tumour-mask decoder trained together on
augmented pixels for hours, resumable at any step (`TrainConfig.long_run`; recipe `shared-long-128`).

What a step computes: the source-difference augmentation of the batch (`augment.PixelAugment`, each mask moved
with its slice), the trunk's one pass (VGG blocks 1-3 give the decoder's skips and block3_pool, the upper blocks
the rest: `joint_segmentation.JointModel`), the view and tumour cross-entropies (label smoothing, the view loss
masked where the plane is unknown) plus `seg_weight` × the decoder's mask loss over the rows with a known mask
(BRISC slices with a mask file, no-tumour slices as empty masks; the others contribute none), AdamW with warm-up
and cosine (the decoder at its own rate), then the weight EMA. The EMA weights are validated after every epoch
(tumour / view accuracy, Dice on the tumour slices) and the best epoch by tumour accuracy + Dice (as the joint
stage) is kept; the mask threshold is chosen on validation; `fit_statistics.finalize_pipeline` fits the
temperatures and OOD statistics; the checkpoint is saved as any other.

Interruptions: the state (weights, optimizer state, EMA, best epoch's EMA, the epoch's data order, the step, the
running epoch figures) is saved atomically (`run_files`) at least every `save_every_s` seconds, after every
epoch's validation and on SIGTERM. Every random draw is a function of (seed, global step) and the data order of
(seed, epoch), so a resumed run repeats exactly what the lost steps did: killed at any moment, it loses at most
`save_every_s` and ends with the weights of an uninterrupted run (bit for bit on one machine, tests/test_long_run.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from braintumor_flax.checkpoint_info import CheckpointInfo
from braintumor_flax.data.splits import PreparedData, Split
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.models import ModelConfig
from braintumor_flax.models.forward import pad_rows, padded_chunks
from braintumor_flax.models.pretrained import assign_vgg16, load_imagenet_vgg16
from braintumor_flax.models.segmentation import SegmentationConfig, build_segmenter, encode, trunk_digest
from braintumor_flax.models.shared_trunk import build_shared_trunk
from braintumor_flax.training.augment import PixelAugment, augment_pixels_and_masks
from braintumor_flax.training.config import TrainConfig
from braintumor_flax.training.joint_segmentation import SERVED_LOWER_BLOCKS, JointModel
from braintumor_flax.training.pipeline import _cap, _resume_key, _training_record, digest
from braintumor_flax.training.run_files import RunLock, load_state, save_state
from braintumor_flax.training.segmentation import MaskSource, choose_threshold, grid_dice, mask_loss, masks_for
from braintumor_flax.training.steps import (
    masked_loss,
    pixel_augment_of,
    trainable_filter,
    two_rate_adamw,
    warmup_cosine,
)
from braintumor_flax.xla import cpu_jit

SAVE_EVERY_S = 600.0  # the bound on lost work
STATE_FILE, PROGRESS_FILE, LOCK_FILE = "state.npz", "progress.json", "run.lock"
# Fault injection for tests: the process SIGKILLs itself right after this global step, before saving it.
KILL_ENV = "BRAINTUMOR_FLAX_KILL_AFTER_STEP"


@dataclasses.dataclass(frozen=True)
class LongSettings:
    augment: PixelAugment
    label_smoothing: float
    seg_weight: float
    ema_decay: float


@struct.dataclass
class LongState:
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    settings: LongSettings = struct.field(pytree_node=False)
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    ema: nnx.State
    step: jax.Array

    def model(self, params: nnx.State | None = None) -> JointModel:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def build_joint_model(config: TrainConfig, weights_source: str | Path | None = None) -> JointModel:
    """The shared trunk (split after block 3, as served) with both heads and a deep, full-resolution decoder."""
    view_config = ModelConfig("view", image_size=config.image_size, width_divisor=config.width_divisor,
                              lower_blocks=SERVED_LOWER_BLOCKS)
    trunk = build_shared_trunk(view_config, use_view_feature=config.use_view_feature, seed=config.seed)
    if config.pretrained:
        assign_vgg16(trunk.view.vgg, load_imagenet_vgg16(weights_source))
    seg_config = SegmentationConfig(image_size=config.image_size, width_divisor=config.width_divisor, deep=True,
                                    full_res=True)
    return JointModel(trunk.view, trunk.tumor, build_segmenter(seg_config, seed=config.seed))


def _outputs(model: JointModel, images: jax.Array, *, train: bool, key: jax.Array | None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pixels → (view logits, tumour logits, mask logits): one trunk pass for the three."""
    lower, skips = encode(model.view.vgg, images, SERVED_LOWER_BLOCKS)
    return model(lower, skips, train=train, key=key)


def _loss(params: nnx.State, state: LongState, images: jax.Array, labels: jax.Array, masks: jax.Array,
          known: jax.Array, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    s = state.settings
    view_logits, tumor_logits, mask_logits = _outputs(state.model(params), images, train=True, key=key)
    view_loss, _ = masked_loss(view_logits, labels[:, 0], s.label_smoothing)
    tumor_loss, tumor_acc = masked_loss(tumor_logits, labels[:, 1], s.label_smoothing)
    seg_loss = mask_loss(mask_logits, masks.astype(jnp.float32), known=known)
    return view_loss + tumor_loss + s.seg_weight * seg_loss, {"tumor_accuracy": tumor_acc, "seg_loss": seg_loss}


@cpu_jit
def long_train_step(state: LongState, images: jax.Array, labels: jax.Array, masks: jax.Array, known: jax.Array,
                    key: jax.Array) -> tuple[LongState, jax.Array, dict[str, jax.Array]]:
    """One optimizer step and the EMA update: (new state, loss, {tumour accuracy, mask loss})."""
    aug_key, drop_key = jax.random.split(key)
    images, masks = augment_pixels_and_masks(aug_key, images, masks, state.settings.augment)
    (loss, aux), grads = jax.value_and_grad(_loss, has_aux=True)(state.params, state, images, labels, masks, known,
                                                                  drop_key)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The EMA's decay ramps up (TensorFlow's num_updates rule), so the early average is not the random start.
    step = state.step.astype(jnp.float32)
    decay = jnp.minimum(state.settings.ema_decay, (1.0 + step) / (10.0 + step))
    ema = optax.incremental_update(params, state.ema, 1.0 - decay)
    return state.replace(params=params, opt_state=opt_state, ema=ema, step=state.step + 1), loss, aux


@cpu_jit
def long_eval_step(state: LongState, params: nnx.State, images: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    view_logits, tumor_logits, mask_logits = _outputs(state.model(params), images, train=False, key=None)
    return view_logits, tumor_logits, jax.nn.sigmoid(mask_logits)


@dataclasses.dataclass
class LongData:
    """One split's pixels, labels [N, 2] (plane, tumour; -1 unknown) and masks (zeros where not `known`)."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    known: np.ndarray

    @classmethod
    def of(cls, split: Split, masks_from: MaskSource, limit: int | None) -> LongData:
        split = _cap(split, limit)
        masks, known = masks_for(split, masks_from)
        return cls(split.images, np.stack([split.plane, split.tumor], axis=1), masks, known)

    def __len__(self) -> int:
        return len(self.labels)


def evaluate(state: LongState, params: nnx.State, val: LongData, batch_size: int, threshold: float = 0.5
             ) -> tuple[dict[str, float], np.ndarray]:
    """Validation view / tumour accuracy, Dice on the tumour slices and on the empty ones (of the rows with a
    known mask), and those rows' mask probabilities."""
    view, tumor, probs = [], [], []
    for start, rows, padded in padded_chunks(len(val), batch_size):
        v, t, p = long_eval_step(state, params, jnp.asarray(pad_rows(val.images, start, rows, padded)))
        view.append(np.asarray(v)[:rows])
        tumor.append(np.asarray(t)[:rows])
        probs.append(np.asarray(p)[:rows][val.known[start:start + rows]])
    scores: dict[str, float] = {}
    for name, logits, column in (("view", view, 0), ("tumor", tumor, 1)):
        labels = val.labels[:, column]
        ok = labels >= 0
        scores[f"val_{name}_accuracy"] = float((np.concatenate(logits).argmax(1)[ok] == labels[ok]).mean()) \
            if ok.any() else float("nan")
    masks = val.masks[val.known]
    probs_known = np.concatenate(probs)
    dice = grid_dice(probs_known, masks, threshold)
    tumour = masks.any(axis=(1, 2))
    scores["val_dice_tumour"] = float(dice[tumour].mean()) if tumour.any() else float("nan")
    scores["val_empty_correct"] = float(dice[~tumour].mean()) if (~tumour).any() else float("nan")
    return scores, probs_known


def _score(entry: dict[str, Any]) -> float:
    """What the kept epoch is chosen by (validation only): tumour accuracy + tumour-slice Dice, as the joint stage."""
    dice = entry["val_dice_tumour"]
    return entry["val_tumor_accuracy"] + (dice if dice == dice else 0.0)


def _new_state(config: TrainConfig, steps_per_epoch: int, weights_source: str | Path | None) -> LongState:
    model = build_joint_model(config, weights_source)
    graphdef, params, rest = nnx.split(model, trainable_filter(config.frozen_blocks), ...)

    def schedule(peak: float) -> optax.Schedule:
        return warmup_cosine(peak, warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                             steps_per_epoch=steps_per_epoch)

    tx = two_rate_adamw(schedule(config.learning_rate), schedule(config.decoder_learning_rate or config.learning_rate),
                        config.weight_decay)
    settings = LongSettings(pixel_augment_of(config), config.label_smoothing, config.seg_weight, config.ema_decay)
    return LongState(graphdef, tx, settings, params, rest, tx.init(params), params, jnp.zeros((), jnp.int32))


class _StopFlag:
    """SIGTERM asks the loop to save and stop after the current step (the `stop` command sends it)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def _set(self, *_: Any) -> None:
        self.requested = True

    def __exit__(self, *_: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_long(config: TrainConfig, data: PreparedData, masks_from: MaskSource, run_dir: str | Path, *,
               weights_source: str | Path | None = None, save_every_s: float = SAVE_EVERY_S,
               log: Callable[[str], None] = print) -> BrainTumorPipeline:
    """Train (or resume) the run in `run_dir`; return the pipeline of the kept EMA weights, its decoder attached
    with the threshold chosen on validation (temperatures and OOD statistics are `finalize_pipeline`'s)."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir / LOCK_FILE)
    if not lock.acquire():
        raise SystemExit(f"{run_dir}: another process (pid {lock.holder()}) is training this run")
    try:
        from braintumor_flax.training.long_loop import run_epochs  # the loop, kept in its own module

        return run_epochs(config, data, masks_from, run_dir, weights_source=weights_source,
                          save_every_s=save_every_s, log=log)
    finally:
        lock.release()


def save_run_state(run_dir: Path, state: LongState, best: nnx.State, order: np.ndarray, meta: dict[str, Any]
                   ) -> None:
    save_state(run_dir / STATE_FILE, {"state": (state.params, state.opt_state, state.ema, state.step),
                                      "best": best, "order": order}, meta)


def load_run_state(run_dir: Path, state: LongState, n_train: int) -> tuple[LongState, nnx.State, np.ndarray,
                                                                            dict[str, Any]]:
    like = {"state": (state.params, state.opt_state, state.ema, state.step), "best": state.ema,
            "order": np.zeros(n_train, np.int64)}
    tree, meta = load_state(run_dir / STATE_FILE, like)
    params, opt_state, ema, step = jax.tree.map(jnp.asarray, tree["state"])
    best = jax.tree.map(jnp.asarray, tree["best"])
    return state.replace(params=params, opt_state=opt_state, ema=ema, step=step), best, tree["order"], meta


def depends_on(config: TrainConfig, data: PreparedData) -> str:
    """What a saved state was computed from: the recipe (its epochs included: they shape the schedule) and data."""
    return digest(_resume_key(config), data.dataset_hash, "long")


def pipeline_of(config: TrainConfig, data: PreparedData, state: LongState, params: nnx.State, val: LongData,
                history: dict[str, Any], timings: dict[str, float], *, train_mask_slices: int) -> BrainTumorPipeline:
    """The servable pipeline of `params` (the kept EMA weights), its mask threshold chosen on validation."""
    _, probs = evaluate(state, params, val, config.eval_batch_size)
    threshold, threshold_dice = choose_threshold(probs, val.masks[val.known])
    model = state.model(params)
    model.segmenter.config = dataclasses.replace(model.segmenter.config, threshold=threshold,
                                                 trunk_digest=trunk_digest(model.view.vgg, 5))
    record = _training_record(config, data, history, timings)
    pipeline = BrainTumorPipeline(model.view, model.tumor,
                                  info=CheckpointInfo(training=record, shared_lower_blocks=True, shared_trunk=True))
    seg_record = {"config": {"trained_with": config.recipe, "seg_weight": config.seg_weight,
                             "decoder_learning_rate": config.decoder_learning_rate or config.learning_rate},
                  "threshold": threshold, "val_dice_at_threshold": threshold_dice, "dataset_hash": data.dataset_hash,
                  "train_images": train_mask_slices, "val_images": int(len(probs))}
    pipeline.attach_segmenter(model.segmenter, seg_record)
    return pipeline


def kill_if_asked(global_step: int) -> None:
    """Tests' fault injection (KILL_ENV): a real SIGKILL, no cleanup, no flush."""
    if os.environ.get(KILL_ENV) == str(global_step):
        os.kill(os.getpid(), signal.SIGKILL)
