"""Fine-tuning a shared trunk for its two answers and the tumour mask together (issue 15's end-to-end route).

The served decoder (training/segmentation.py) learns over a frozen trunk whose blocks 4-5 were trained to
classify: its validation Dice stops at about 0.80, and the classifier itself ignores the expert's outline (erasing
the tumour changes 1 answer in 10, README). Here the trunk's trainable blocks 4-5, both heads and the decoder of
an existing checkpoint take gradients from one loss: view and tumour cross-entropy (as the trunk was trained) plus
the decoder's binary cross-entropy + soft Dice, so the mask's supervision reaches the features both heads read.

Blocks 1-3 stay frozen, as in every CPU recipe: their output (block3_pool, the trunk's cached lower features) and
the decoder's frozen skips (block2_conv2, block3_conv3 and the slice itself) are computed once per image. With
`frozen_blocks=2` (`--train-block3`) block 3 trains too: the cached lower output is then block2_pool, and the
decoder's S/4 and S/8 skips (block3_conv3, block3_pool) come from the trainable block 3 (the frozen ImageNet
features there being what limits the served decoder, README); the OOD statistics, which read blocks 1-3, are
refitted with the temperatures. Serving splits the trunk after block 3 as before: no extra compute. Each
step takes `seg_rows` slices with a known mask (BRISC, no-tumour slices as empty masks) and fills the batch with
other training images (Kaggle, BRISC without a mask file): about the pool's own mix. Each row is mirrored at
random, its activations and mask together. Epoch 0 is the checkpoint as given; the epoch with the best validation
tumour accuracy + validation Dice (tumour slices) is kept, so the result is never worse on validation than the
start by that measure. Then the mask threshold with the best validation Dice is chosen and the temperatures are
refitted on validation (the OOD check reads blocks 1-3, unchanged).

    python -m braintumor_flax.training.joint_segmentation --checkpoint checkpoints-shared-trunk \\
        --data-dir ../shared/data --out runs/ckpt-joint
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from tqdm.auto import tqdm

from braintumor_flax.data.splits import PreparedData, Split
from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.models.classifiers import TumorClassifier, ViewClassifier
from braintumor_flax.models.forward import pad_rows, padded_chunks
from braintumor_flax.models.segmentation import (
    DEEP_LAYERS,
    IMAGE,
    SKIP_LAYERS,
    SegmentationConfig,
    TumorSegmenter,
    trunk_digest,
)
from braintumor_flax.training.pipeline import _cap, lower_features, machine_description
from braintumor_flax.training.segmentation import (
    MaskSource,
    choose_threshold,
    encode_images,
    grid_dice,
    mask_loss,
    masks_for,
)
from braintumor_flax.training.steps import masked_loss, trainable_filter, two_rate_adamw, warmup_cosine
from braintumor_flax.xla import cpu_jit

SERVED_LOWER_BLOCKS = 3  # where the checkpoint's trunk splits (the decoder's frozen skips are blocks 1-3)


def frozen_skips(frozen_blocks: int) -> tuple[str, ...]:
    """The decoder's inputs that stay fixed, cached per slice: the skips of the frozen VGG blocks and the slice.
    The trunk's lower output (block3_pool, or block2_pool with block 3 trained) is cached for every image."""
    return ("block2_conv2",) + (("block3_conv3",) if frozen_blocks >= 3 else ()) + (IMAGE,)


@dataclasses.dataclass(frozen=True)
class JointConfig:
    epochs: int = 3
    batch_size: int = 32  # rows per step, of which `seg_rows` have a known mask
    seg_rows: int = 16
    learning_rate: float = 1e-4  # blocks 4-5 and both heads (peak; warm-up, then cosine)
    decoder_learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.3
    seg_weight: float = 1.0
    label_smoothing: float = 0.1  # as the shared-frozen3 recipes
    seed: int = 0
    max_images: int | None = None  # cap per split (smoke tests)
    # VGG blocks 1..frozen_blocks keep their weights: 3 as the served recipe; 2 also trains block 3, whose
    # activations are the decoder's S/4 and S/8 skips.
    frozen_blocks: int = SERVED_LOWER_BLOCKS

    def __post_init__(self) -> None:
        if self.frozen_blocks not in (2, 3):
            raise ValueError(f"frozen_blocks must be 2 or 3 (the decoder's skips come from blocks 2-3), "
                             f"got {self.frozen_blocks}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class JointModel(nnx.Module):
    """The shared trunk's two classifiers (one VGG object) and the decoder that reads it, as one module."""

    def __init__(self, view: ViewClassifier, tumor: TumorClassifier, segmenter: TumorSegmenter):
        self.view, self.tumor, self.segmenter = view, tumor, segmenter
        self.tumor.vgg = self.view.vgg  # one trunk, updated once per step

    def __call__(self, lower: jax.Array, frozen_skips: dict[str, jax.Array], *, train: bool = False,
                 key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Lower output [B, ...] and the frozen skips of its first n rows → (view logits [B, 3], tumour logits
        [B, 4], mask logits [n, S, S]): the trunk's upper blocks run once for the three."""
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        upper: dict[str, jax.Array] = {}
        last_conv = self.view.upper_convs(lower, intermediates=upper)
        view_logits, feature = self.view.head(last_conv, train=train, key=k1)
        tumor_logits = self.tumor.head(last_conv, feature if self.tumor.config.use_view_feature else None,
                                       train=train, key=k2)
        n = len(next(iter(frozen_skips.values())))
        from_trunk = {f"block{self.view.config.lower_blocks}_pool": lower, **upper}  # block3_pool either way
        skips = {**frozen_skips, **{k: from_trunk[k][:n] for k in SKIP_LAYERS + DEEP_LAYERS if k not in frozen_skips}}
        return view_logits, tumor_logits, self.segmenter(skips)


@struct.dataclass
class JointState:
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    config: JointConfig = struct.field(pytree_node=False)
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState

    def model(self) -> JointModel:
        return nnx.merge(self.graphdef, self.params, self.rest)


def _mirror(flip: jax.Array, x: jax.Array) -> jax.Array:
    """Rows where `flip` is set, mirrored left-right (axis 2: [B, H, W, ...])."""
    return jnp.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[:, :, ::-1], x)


def _joint_loss(params: nnx.State, state: JointState, lower: jax.Array, skips: dict[str, jax.Array],
                labels: jax.Array, masks: jax.Array, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = state.config
    flip_key, drop_key = jax.random.split(key)
    flip = jax.random.bernoulli(flip_key, 0.5, (lower.shape[0],))
    n = masks.shape[0]
    lower = _mirror(flip, lower.astype(jnp.float32))
    skips = {k: _mirror(flip[:n], v.astype(jnp.float32)) for k, v in skips.items()}
    target = _mirror(flip[:n], masks.astype(jnp.float32))
    model = nnx.merge(state.graphdef, params, state.rest)
    view_logits, tumor_logits, mask_logits = model(lower, skips, train=True, key=drop_key)
    view_loss, _ = masked_loss(view_logits, labels[:, 0], cfg.label_smoothing)
    tumor_loss, tumor_acc = masked_loss(tumor_logits, labels[:, 1], cfg.label_smoothing)
    seg_loss = mask_loss(mask_logits, target)
    return view_loss + tumor_loss + cfg.seg_weight * seg_loss, {"tumor_accuracy": tumor_acc, "seg_loss": seg_loss}


@cpu_jit
def joint_train_step(state: JointState, lower: jax.Array, skips: dict[str, jax.Array], labels: jax.Array,
                     masks: jax.Array, key: jax.Array) -> tuple[JointState, jax.Array, dict[str, jax.Array]]:
    (loss, aux), grads = jax.value_and_grad(_joint_loss, has_aux=True)(state.params, state, lower, skips, labels,
                                                                        masks, key)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), loss, aux


@cpu_jit
def _classify(state: JointState, lower: jax.Array) -> tuple[jax.Array, jax.Array]:
    model = state.model()
    last_conv = model.view.upper_convs(lower.astype(jnp.float32))
    view_logits, feature = model.view.head(last_conv)
    return view_logits, model.tumor.head(last_conv, feature if model.tumor.config.use_view_feature else None)


@cpu_jit
def _mask_probs(state: JointState, lower: jax.Array, skips: dict[str, jax.Array]) -> jax.Array:
    skips = {k: v.astype(jnp.float32) for k, v in skips.items()}
    return jax.nn.sigmoid(state.model()(lower.astype(jnp.float32), skips)[2])


@dataclasses.dataclass
class JointData:
    """One split's cached inputs: lower features and labels of every image, frozen skips and masks of the rows
    with a known mask (`mask_rows`)."""

    lower: np.ndarray
    labels: np.ndarray  # [N, 2] plane, tumour (-1 unknown)
    mask_rows: np.ndarray
    skips: dict[str, np.ndarray]
    masks: np.ndarray

    @classmethod
    def of(cls, model: JointModel, split: Split, masks_from: MaskSource, config: JointConfig) -> JointData:
        split = _cap(split, config.max_images)
        masks, known = masks_for(split, masks_from)
        rows = np.flatnonzero(known)
        skip_config = dataclasses.replace(model.segmenter.config, deep=False)
        skips = encode_images(model.view.vgg, split.images[rows], skip_config) if len(rows) else {}
        return cls(lower_features(model.view, split), np.stack([split.plane, split.tumor], axis=1), rows,
                   {k: skips[k] for k in frozen_skips(config.frozen_blocks) if k in skips}, masks[rows])


def _evaluate(state: JointState, val: JointData, threshold: float, batch_size: int = 32
              ) -> tuple[dict[str, float], np.ndarray]:
    """Validation view / tumour accuracy and Dice on the tumour slices, and the mask probabilities."""
    view, tumor = [], []
    for start, rows, padded in padded_chunks(len(val.lower), batch_size):
        v, t = _classify(state, jnp.asarray(pad_rows(val.lower, start, rows, padded)))
        view.append(np.asarray(v)[:rows])
        tumor.append(np.asarray(t)[:rows])
    probs = []
    for start, rows, padded in padded_chunks(len(val.mask_rows), batch_size):
        lower = pad_rows(val.lower[val.mask_rows], start, rows, padded)
        skips = {k: jnp.asarray(pad_rows(v, start, rows, padded)) for k, v in val.skips.items()}
        probs.append(np.asarray(_mask_probs(state, jnp.asarray(lower), skips))[:rows])
    probs_all = np.concatenate(probs) if probs else np.zeros((0, *val.masks.shape[1:]), np.float32)
    scores: dict[str, float] = {}
    for name, logits, column in (("view", view, 0), ("tumor", tumor, 1)):
        labels = val.labels[:, column]
        known = labels >= 0
        scores[f"val_{name}_accuracy"] = float((np.concatenate(logits).argmax(1)[known] == labels[known]).mean())
    tumour = val.masks.any(axis=(1, 2))
    dice = grid_dice(probs_all, val.masks, threshold)
    scores["val_dice_tumour"] = float(dice[tumour].mean()) if tumour.any() else float("nan")
    scores["val_empty_correct"] = float(dice[~tumour].mean()) if (~tumour).any() else float("nan")
    return scores, probs_all


def _optimizer(config: JointConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW with its own peak rate for the decoder (young, and trained at a higher rate before) and for the rest."""
    def schedule(peak: float) -> optax.Schedule:
        return warmup_cosine(peak, warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                             steps_per_epoch=steps_per_epoch)

    return two_rate_adamw(schedule(config.learning_rate), schedule(config.decoder_learning_rate), config.weight_decay)


def train_joint(pipeline: BrainTumorPipeline, data: PreparedData, masks_from: MaskSource,
                config: JointConfig = JointConfig(), *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune `pipeline` (a shared trunk with a deep segmenter) in place; returns the training record."""
    if not pipeline.shares_trunk or pipeline.segmenter is None or not pipeline.segmenter.config.deep:
        raise ValueError("joint fine-tuning needs a shared-trunk checkpoint with a deep segmenter (blocks 1-5)")
    if pipeline.view_model.config.lower_blocks != SERVED_LOWER_BLOCKS:
        raise ValueError(f"the decoder's frozen skips are blocks 1-{SERVED_LOWER_BLOCKS}; this trunk's lower part is "
                         f"blocks 1-{pipeline.view_model.config.lower_blocks}")
    frozen_blocks = config.frozen_blocks
    t0 = time.perf_counter()
    _split_trunk_after(pipeline, frozen_blocks)  # the cached lower output: the frozen blocks' (restored below)
    model = JointModel(pipeline.view_model, pipeline.tumor_model, pipeline.segmenter)
    train = JointData.of(model, data.splits["train"], masks_from, config)
    val = JointData.of(model, data.splits["val"], masks_from, config)
    others = np.setdiff1d(np.arange(len(train.lower)), train.mask_rows)
    fill = config.batch_size - config.seg_rows
    steps = len(train.mask_rows) // config.seg_rows
    if steps < 1 or len(others) < fill:
        raise ValueError(f"{len(train.mask_rows)} slices with a mask and {len(others)} other images are too few for "
                         f"one step of {config.seg_rows} + {fill}")
    log(f"joint fine-tuning: {len(train.mask_rows)} train slices with a mask + {len(others)} other images, "
        f"{len(val.mask_rows)} / {len(val.lower)} val, {steps} steps an epoch")
    graphdef, params, rest = nnx.split(model, trainable_filter(frozen_blocks), ...)
    tx = _optimizer(config, steps)
    state = JointState(graphdef, tx, config, params, rest, tx.init(params))
    threshold = pipeline.segmenter.config.threshold
    start_scores, _ = _evaluate(state, val, threshold)
    history: list[dict[str, Any]] = [{"epoch": 0, **start_scores}]
    log("joint epoch 0 (the checkpoint as given): " + ", ".join(f"{k}={v:.4f}" for k, v in start_scores.items()))

    def score(entry: dict[str, Any]) -> float:
        return entry["val_tumor_accuracy"] + entry["val_dice_tumour"]

    best = (score(history[0]), 0, state.params)
    for epoch in range(config.epochs):
        t = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])
        with_mask, other = rng.permutation(train.mask_rows.size), rng.permutation(others)
        losses, seg_losses = [], []
        for step in tqdm(range(steps), desc=f"joint epoch {epoch + 1}/{config.epochs}", unit="batch",
                         dynamic_ncols=True, mininterval=5.0):
            pick = with_mask[step * config.seg_rows:(step + 1) * config.seg_rows]  # positions in mask_rows
            fill_rows = other[np.arange(step * fill, (step + 1) * fill) % len(other)]
            rows = np.concatenate([train.mask_rows[pick], fill_rows])  # the masked rows first
            key = jax.random.fold_in(jax.random.key(config.seed), epoch * steps + step)
            state, loss, aux = joint_train_step(
                state, jnp.asarray(train.lower[rows]), {k: jnp.asarray(v[pick]) for k, v in train.skips.items()},
                jnp.asarray(train.labels[rows]), jnp.asarray(train.masks[pick]), key)
            losses.append(loss)
            seg_losses.append(aux["seg_loss"])
        scores, _ = _evaluate(state, val, threshold)
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_seg_loss": float(np.mean(seg_losses)),
                 **scores, "seconds": round(time.perf_counter() - t, 1)}
        history.append(entry)
        log(f"joint epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in entry.items()
                                                     if isinstance(v, float)))
        if score(entry) > best[0]:
            best = (score(entry), epoch + 1, state.params)
    state = state.replace(params=best[2])
    log(f"joint fine-tuning: kept epoch {best[1]}")
    _, probs = _evaluate(state, val, threshold)
    threshold, threshold_dice = choose_threshold(probs, val.masks)
    log(f"joint fine-tuning: mask threshold {threshold} (validation Dice on tumour slices {threshold_dice:.4f})")
    model = state.model()
    vgg = model.view.vgg
    pipeline.view_model, pipeline.tumor_model = model.view, model.tumor
    _split_trunk_after(pipeline, SERVED_LOWER_BLOCKS)
    seg_config: SegmentationConfig = dataclasses.replace(model.segmenter.config, threshold=threshold,
                                                         trunk_digest=trunk_digest(vgg, 5))
    model.segmenter.config = seg_config
    record = {**pipeline.segmentation_record,
              "joint": {"config": config.to_dict(), "history": history, "kept_epoch": best[1],
                        "threshold": threshold, "val_dice_at_threshold": threshold_dice,
                        "train_images": int(len(train.lower)), "train_mask_slices": int(train.mask_rows.size),
                        "seconds": round(time.perf_counter() - t0, 1), "machine": machine_description()}}
    if best[1] > 0:  # kept as given at epoch 0: the checkpoint's own decoder record stays the whole record
        record.update(threshold=threshold, val_dice_at_threshold=threshold_dice)
    pipeline.attach_segmenter(model.segmenter, record)
    training = pipeline.info.training
    if training is not None:
        timings = {**training.timings_s, "joint_s": record["joint"]["seconds"]}
        if "total_s" in timings:
            timings["total_s"] = round(timings["total_s"] + timings["joint_s"], 1)
        kept = history[best[1]]
        here = machine_description()
        machine = here if training.machine in ("", here) else f"{training.machine}; joint: {here}"
        # Ends as every stage's history does: the kept epoch and its validation (tumour) accuracy.
        joint = history + [{"kept_epoch": best[1], "val_accuracy": kept["val_tumor_accuracy"],
                            "val_dice_tumour": kept["val_dice_tumour"]}]
        pipeline.info.training = dataclasses.replace(
            training, recipe=f"{training.recipe}-joint", history={**training.history, "joint": joint},
            timings_s=timings, machine=machine)
    return record


def _split_trunk_after(pipeline: BrainTumorPipeline, lower_blocks: int) -> None:
    """Both classifiers' lower stage ends after block `lower_blocks`: the same computation, split elsewhere."""
    for model in (pipeline.view_model, pipeline.tumor_model):
        model.config = dataclasses.replace(model.config, lower_blocks=lower_blocks)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from braintumor_flax.paths import default_data_dir
    from braintumor_flax.training.fit_statistics import finalize_pipeline, prepare_training_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a shared-trunk checkpoint with a deep segmenter (e.g. checkpoints-shared-trunk)")
    p.add_argument("--data-dir", type=Path, default=None, help="dataset folder (default ../shared/data)")
    p.add_argument("--out", type=Path, required=True, help="where to save the fine-tuned checkpoint")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float16", help="storage precision")
    for name, typ in (("epochs", int), ("learning-rate", float), ("decoder-learning-rate", float),
                      ("seg-weight", float), ("max-images", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="override the default")
    p.add_argument("--train-block3", action="store_true",
                   help="train VGG block 3 too (the decoder's S/4 and S/8 skips); blocks 1-2 stay frozen")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k in {f.name for f in dataclasses.fields(JointConfig)} and v is not None}
    if args.train_block3:
        overrides["frozen_blocks"] = 2
    config = dataclasses.replace(JointConfig(), **overrides)
    pipeline = BrainTumorPipeline.from_pretrained(args.checkpoint)
    pipeline.storage_dtype = args.dtype
    data_dir = args.data_dir or default_data_dir()
    data = prepare_training_data(pipeline, data_dir)  # the checkpoint's own split: no test image trains it
    record = train_joint(pipeline, data, data_dir, config)
    finalize_pipeline(pipeline, data)  # temperatures, and the OOD statistics (blocks 1-3: block 3 may have trained)
    pipeline.save_pretrained(args.out)
    print(json.dumps({k: v for k, v in record["joint"].items() if k != "history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
