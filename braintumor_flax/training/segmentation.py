"""Training the tumour segmenter (models/segmentation.py) on BRISC masks, with the classification split.

The VGG blocks it reads are frozen here (blocks 1-3: the ImageNet weights every CPU recipe keeps; with
`deep`, also the classifier's trained blocks 4-5), so only the decoder gets gradients, and their activations
are computed once per image (float16, in memory, or mapped from disk when larger: about 2 MB per slice at
128 px, 4.6 MB at 192 px); augmentation then flips
those activations and the mask together. Loss: pixel-wise binary
cross-entropy plus a soft Dice term per image; no-tumour slices (empty masks) are trained on too, so the
decoder learns to stay silent. The epoch with the
best validation Dice is kept, then the mask threshold with the best validation Dice (model selection on
validation only).
"""

from __future__ import annotations

import dataclasses
import os
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

from braintumor_flax.data.masks import split_masks
from braintumor_flax.data.splits import PreparedData, Split, stratified_rows
from braintumor_flax.models.forward import pad_rows, padded_chunks
from braintumor_flax.models.segmentation import (
    SegmentationConfig,
    TumorSegmenter,
    build_segmenter,
    encode,
    trunk_digest,
)
from braintumor_flax.models.vgg16 import VGG16
from braintumor_flax.paths import cache_dir
from braintumor_flax.training.augment import PixelAugment, augmented_copies
from braintumor_flax.training.steps import warmup_cosine
from braintumor_flax.xla import cpu_jit


@dataclasses.dataclass(frozen=True)
class SegTrainConfig:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    hflip: bool = True
    dice_weight: float = 1.0
    deep: bool = False  # also read the classifier's VGG blocks 4-5 (SegmentationConfig.deep)
    full_res: bool = False  # a last decoder level at full resolution (SegmentationConfig.full_res)
    pixel_widths: tuple[int, ...] = ()  # a trainable encoder of the slice itself (SegmentationConfig.pixel_widths)
    # Pixel-space augmented copies of each training slice (affine + photometric, the mask moved with it),
    # encoded once beside the original: each epoch takes one of the 1 + augment_copies versions per slice.
    augment_copies: int = 0
    seed: int = 0
    datasets: tuple[str, ...] = ("brisc2025",)  # the masks are BRISC's
    max_images: int | None = None  # cap per split (smoke tests)

    def to_dict(self) -> dict[str, Any]:
        record = {**dataclasses.asdict(self), "datasets": list(self.datasets), "pixel_widths": list(self.pixel_widths)}
        if self.augment_copies:
            record["pixel_augment"] = dataclasses.asdict(SEGMENT_AUGMENT)
        return record


# The classifier's source-difference augmentation, without its flip: the activations are flipped per step anyway.
SEGMENT_AUGMENT = PixelAugment(hflip=False)

Skips = dict[str, np.ndarray]
# Where the masks of a split come from: the data folder (BRISC's mask files), or a function of the split (a GPU
# pack carries its masks: `training.gpu.read_pack_masks`). Either gives (bool [N, S, S] masks, bool [N] known).
MaskSource = str | Path | Callable[[Split], tuple[np.ndarray, np.ndarray]]


def masks_for(split: Split, source: MaskSource) -> tuple[np.ndarray, np.ndarray]:
    return source(split) if callable(source) else split_masks(split, source)


@struct.dataclass
class SegState:
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    config: SegTrainConfig = struct.field(pytree_node=False)
    params: nnx.State
    opt_state: optax.OptState


def encode_images(vgg: VGG16, images: np.ndarray, config: SegmentationConfig, batch_size: int = 32,
                  spill: bool | None = None) -> Skips:
    """float16 activations of the frozen VGG blocks the decoder reads (`config.inputs`), for every image.

    They are held in memory, or (`spill`; None = when they would take over 40 % of the memory available) in
    unlinked files of the cache folder, mapped into memory: at 192 px they are about 4.6 MB a slice, 21 GB for
    BRISC's training and validation slices."""
    graphdef, state = nnx.split(vgg)
    run = cpu_jit(lambda st, x: encode(nnx.merge(graphdef, st), x, config.encoder_blocks)[1])
    out: Skips = {}
    for start, rows, padded in tqdm(list(padded_chunks(len(images), batch_size)),
                                    desc=f"VGG blocks 1-{config.encoder_blocks}", unit="batch", dynamic_ncols=True,
                                    mininterval=5.0):
        batch = run(state, jnp.asarray(pad_rows(images, start, rows, padded, np.uint8)))
        if not out:
            shapes = {k: (len(images), *batch[k].shape[1:]) for k in config.inputs}
            out = _allocate(shapes, spill)
        for k in config.inputs:
            out[k][start:start + rows] = np.asarray(batch[k][:rows], np.float16)
    return out


def _allocate(shapes: dict[str, tuple[int, ...]], spill: bool | None) -> Skips:
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    if spill is None:
        spill = total > 0.4 * available_memory_bytes()
    if not spill:
        return {k: np.empty(s, np.float16) for k, s in shapes.items()}
    folder = cache_dir("segmenter-activations")
    arrays = {}
    for k, s in shapes.items():
        path = folder / f"{os.getpid()}-{time.monotonic_ns()}-{k}.npy"
        arrays[k] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=s)
        path.unlink()  # the mapping keeps the data until it is dropped; nothing is left behind, even on a crash
    return arrays


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def soft_dice(prob: jax.Array, target: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Per-image soft Dice [B] (an empty target and an empty prediction score 1)."""
    inter = (prob * target).sum(axis=(1, 2))
    return (2 * inter + smooth) / (prob.sum(axis=(1, 2)) + target.sum(axis=(1, 2)) + smooth)


def _loss(params: nnx.State, state: SegState, skips: dict[str, jax.Array], masks: jax.Array, key: jax.Array
          ) -> jax.Array:
    cfg = state.config
    target = masks.astype(jnp.float32)
    if cfg.hflip:  # the activations and the mask flipped together (VGG features are close to flip-equivariant)
        flip = jax.random.bernoulli(key, 0.5, (target.shape[0],))
        skips = {k: jnp.where(flip[:, None, None, None], v[:, :, ::-1], v) for k, v in skips.items()}
        target = jnp.where(flip[:, None, None], target[:, :, ::-1], target)
    return mask_loss(nnx.merge(state.graphdef, params)(skips), target, cfg.dice_weight)


def mask_loss(logits: jax.Array, target: jax.Array, dice_weight: float = 1.0, known: jax.Array | None = None
              ) -> jax.Array:
    """The decoder's loss: pixel-wise binary cross-entropy plus `dice_weight` × (1 − soft Dice per image).

    `known` (bool [B]): only those rows count, averaged over them (a slice without a mask contributes nothing; a
    batch without any, 0); an empty mask that is known (a no-tumour slice) counts, as an empty target."""
    if known is None:
        bce = optax.sigmoid_binary_cross_entropy(logits, target).mean()
        return bce + dice_weight * (1.0 - soft_dice(jax.nn.sigmoid(logits), target)).mean()
    per_row = optax.sigmoid_binary_cross_entropy(logits, target).mean(axis=(1, 2)) + dice_weight * (
        1.0 - soft_dice(jax.nn.sigmoid(logits), target))
    return jnp.where(known, per_row, 0.0).sum() / jnp.maximum(known.sum(), 1)


@cpu_jit
def seg_train_step(state: SegState, skips: dict[str, jax.Array], masks: jax.Array, key: jax.Array
                   ) -> tuple[SegState, jax.Array]:
    loss, grads = jax.value_and_grad(_loss)(state.params, state, skips, masks, key)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), loss


@cpu_jit
def seg_probs(state: SegState, skips: dict[str, jax.Array]) -> jax.Array:
    return jax.nn.sigmoid(nnx.merge(state.graphdef, state.params)(skips))


def predict_masks(state: SegState, skips: Skips, batch_size: int = 32) -> np.ndarray:
    """float32 [N, S, S] mask probabilities from cached activations, in fixed-shape (padded) batches."""
    n = len(next(iter(skips.values())))
    parts = [np.asarray(seg_probs(state, {k: jnp.asarray(pad_rows(v, start, rows, padded)) for k, v in skips.items()})
                        )[:rows] for start, rows, padded in padded_chunks(n, batch_size)]
    return np.concatenate(parts)


def grid_dice(probs: np.ndarray, masks: np.ndarray, threshold: float) -> np.ndarray:
    """Hard Dice per image on the model grid (validation; the evaluation measures on the image's own pixels)."""
    pred = probs >= threshold
    inter = (pred & masks).sum(axis=(1, 2))
    total = pred.sum(axis=(1, 2)) + masks.sum(axis=(1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


@dataclasses.dataclass
class SegData:
    images: np.ndarray
    masks: np.ndarray
    rows: np.ndarray  # which rows of the split these are

    @classmethod
    def of(cls, split: Split, masks_from: MaskSource, config: SegTrainConfig) -> SegData:
        masks, known = masks_for(split, masks_from)
        rows = np.flatnonzero(known & np.isin(split.dataset, config.datasets))
        # A capped run (a pilot) still sees every class, no-tumour slices (empty masks) included.
        rows = rows[stratified_rows(split.tumor[rows], config.max_images, config.seed)]
        return cls(split.images[rows], masks[rows], rows)

    def __len__(self) -> int:
        return len(self.images)

    def with_augmented_copies(self, copies: int, seed: int, batch_size: int = 64) -> SegData:
        """The slices followed by `copies` augmented versions of all of them (copy c of slice i at row
        c × N + i), each mask moved with its slice (`SEGMENT_AUGMENT`)."""
        versions = augmented_copies(self.images, copies, seed, SEGMENT_AUGMENT, self.masks, batch_size)
        return SegData(np.concatenate([self.images, *(images for images, _ in versions)]),
                       np.concatenate([self.masks, *(masks for _, masks in versions)]),
                       np.tile(self.rows, copies + 1))


def train_segmenter(vgg: VGG16, data: PreparedData, masks_from: MaskSource, config: SegTrainConfig = SegTrainConfig(),
                    *, log: Callable[[str], None] = print) -> tuple[TumorSegmenter, dict[str, Any]]:
    """Train a decoder over `vgg`'s frozen blocks 1-3 on the train split; keep the best epoch on validation.
    `masks_from`: the data folder, or a function of a split giving its masks (`MaskSource`)."""
    t0 = time.perf_counter()
    train = SegData.of(data.splits["train"], masks_from, config)
    val = SegData.of(data.splits["val"], masks_from, config)
    if len(train) < config.batch_size:
        raise ValueError(f"{len(train)} images with masks are fewer than one batch of {config.batch_size}")
    size = train.images.shape[1]
    width_divisor = 64 // vgg.block1_conv1.kernel.get_value().shape[-1]
    seg_config = SegmentationConfig(image_size=size, width_divisor=width_divisor, deep=config.deep,
                                    full_res=config.full_res, pixel_widths=config.pixel_widths)
    seg_config = dataclasses.replace(seg_config, trunk_digest=trunk_digest(vgg, seg_config.encoder_blocks))
    segmenter = build_segmenter(seg_config, seed=config.seed)
    steps = len(train) // config.batch_size
    schedule = warmup_cosine(config.learning_rate, warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                             steps_per_epoch=steps)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    graphdef, params = nnx.split(segmenter)
    state = SegState(graphdef, tx, config, params, tx.init(params))
    versions = 1 + config.augment_copies
    if config.augment_copies:
        train_all = train.with_augmented_copies(config.augment_copies, config.seed)
        log(f"segmenter: {config.augment_copies} augmented copies of each training slice")
    else:
        train_all = train
    train_skips = encode_images(vgg, train_all.images, seg_config)
    val_skips = encode_images(vgg, val.images, seg_config)
    if jax.default_backend() != "cpu":
        # On an accelerator the activations stay in its memory: batches are gathered there, not copied over each
        # step (on the CPU they are host memory either way, and a second copy would double it).
        train_skips = {k: jax.device_put(v) for k, v in train_skips.items()}
    log(f"segmenter: {len(train)} train / {len(val)} val slices with masks "
        f"({int(train.masks.any(axis=(1, 2)).sum())} / {int(val.masks.any(axis=(1, 2)).sum())} with tumour)")
    history: list[dict[str, Any]] = []
    best: tuple[float, int, nnx.State] | None = None
    tumour_val = val.masks.any(axis=(1, 2))
    for epoch in range(config.epochs):
        t = time.perf_counter()
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(train))
        # Which version of each slice this epoch reads (always the original without augmented copies).
        version = rng.integers(0, versions, len(train)) if versions > 1 else np.zeros(len(train), int)
        losses = []
        for step in tqdm(range(steps), desc=f"segmenter epoch {epoch + 1}/{config.epochs}", unit="batch",
                         dynamic_ncols=True, mininterval=5.0):
            picked = order[step * config.batch_size:(step + 1) * config.batch_size]
            idx = np.sort(version[picked] * len(train) + picked)  # sorted: mapped files read in order
            key = jax.random.fold_in(jax.random.key(config.seed), epoch * steps + step)
            batch = {k: jnp.asarray(v[idx]) for k, v in train_skips.items()}
            state, loss = seg_train_step(state, batch, jnp.asarray(train_all.masks[idx]), key)
            losses.append(loss)
        dice = grid_dice(predict_masks(state, val_skips), val.masks, seg_config.threshold)
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                 "val_dice_tumour": float(dice[tumour_val].mean()) if tumour_val.any() else float("nan"),
                 "val_empty_correct": float(dice[~tumour_val].mean()) if (~tumour_val).any() else float("nan"),
                 "seconds": round(time.perf_counter() - t, 1)}
        history.append(entry)
        log("segmenter epoch {epoch}: ".format(**entry) + ", ".join(
            f"{k}={v:.4f}" for k, v in entry.items() if isinstance(v, float)))
        score = entry["val_dice_tumour"]
        if score == score and (best is None or score > best[0]):
            best = (score, epoch + 1, state.params)
    if best is not None:
        state = state.replace(params=best[2])
        log(f"segmenter: kept epoch {best[1]} (validation Dice {best[0]:.4f})")
    threshold, threshold_dice = choose_threshold(predict_masks(state, val_skips), val.masks)
    log(f"segmenter: mask threshold {threshold} (validation Dice on tumour slices {threshold_dice:.4f})")
    record = {"config": config.to_dict(), "history": history, "kept_epoch": best[1] if best else config.epochs,
              "threshold": threshold, "val_dice_at_threshold": threshold_dice,
              "train_images": len(train), "val_images": len(val), "dataset_hash": data.dataset_hash,
              "seconds": round(time.perf_counter() - t0, 1)}
    segmenter = nnx.merge(state.graphdef, state.params)
    segmenter.config = dataclasses.replace(seg_config, threshold=threshold)
    return segmenter, record


THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def choose_threshold(probs: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """The mask threshold with the best mean validation Dice over all slices (an empty slice scores 1 when
    nothing is predicted, so a low threshold pays for false alarms), and its Dice on the tumour slices."""
    tumour = masks.any(axis=(1, 2))
    scores = [(float(grid_dice(probs, masks, t).mean()), t) for t in THRESHOLDS]
    best = max(scores)[1]
    dice = grid_dice(probs, masks, best)
    return best, float(dice[tumour].mean()) if tumour.any() else float("nan")



def main(argv: list[str] | None = None) -> int:
    """Train a segmenter for an existing checkpoint's trunk and save the checkpoint with it."""
    import argparse
    import json

    from braintumor_flax.hub import BrainTumorPipeline
    from braintumor_flax.paths import DEFAULT_CHECKPOINT_DIR, default_data_dir
    from braintumor_flax.training.fit_statistics import prepare_training_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT_DIR, help="classifier checkpoint to extend")
    p.add_argument("--data-dir", type=Path, default=None, help="dataset folder (default ../shared/data)")
    p.add_argument("--out", type=Path, default=None, help="where to save (default: over --checkpoint)")
    p.add_argument("--segmenter-from", type=Path, default=None,
                   help="take the decoder of this checkpoint instead of training one (it must have been trained on "
                        "the same VGG blocks 1-3)")
    p.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="storage precision of the saved checkpoint (default: float32)")
    for name, typ in (("epochs", int), ("batch-size", int), ("learning-rate", float), ("max-images", int),
                      ("augment-copies", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="override the default")
    p.add_argument("--deep", action="store_true", help="also read the classifier's VGG blocks 4-5 (a shared trunk)")
    p.add_argument("--full-res", action="store_true", help="a last decoder level at full resolution")
    p.add_argument("--pixel-encoder", default=None, metavar="P1,P2,P4",
                   help="widths of a trainable encoder of the slice itself at S, S/2, S/4 (e.g. 16,32,64; needs "
                        "--full-res)")
    args = p.parse_args(argv)
    tunable = ("epochs", "batch_size", "learning_rate", "max_images", "augment_copies")
    overrides = {k: v for k, v in vars(args).items() if k in tunable and v is not None}
    overrides.update(deep=args.deep, full_res=args.full_res)
    if args.pixel_encoder:
        overrides["pixel_widths"] = tuple(int(w) for w in args.pixel_encoder.split(","))
    config = dataclasses.replace(SegTrainConfig(), **overrides)
    pipeline = BrainTumorPipeline.from_pretrained(args.checkpoint)
    if args.dtype:
        pipeline.storage_dtype = args.dtype
    if args.segmenter_from is not None:
        donor = BrainTumorPipeline.from_pretrained(args.segmenter_from)
        if donor.segmenter is None:
            raise SystemExit(f"{args.segmenter_from} has no segmenter")
        pipeline.attach_segmenter(donor.segmenter, donor.segmentation_record)
        pipeline.save_pretrained(args.out or args.checkpoint)
        return 0
    # The classifier's own split (same validation fraction and seed), so no test image or duplicate trains it.
    data_dir = args.data_dir or default_data_dir()
    data = prepare_training_data(pipeline, data_dir)
    segmenter, record = train_segmenter(pipeline.view_model.vgg, data, data_dir, config)
    pipeline.attach_segmenter(segmenter, record)
    pipeline.save_pretrained(args.out or args.checkpoint)
    print(json.dumps({k: v for k, v in record.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
