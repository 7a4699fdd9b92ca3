"""The train state and the jitted train / eval steps, at module level so tests and scripts can import them.

The train state is a pytree (trainable parameters, the rest of the model's state, optimizer state) with the
model's graph, the optimizer and the step settings as static fields. Frozen parameters are split off by
name before differentiation (big_vision style), so they get neither gradients nor optimizer slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from braintumor_flax.models import TumorClassifier, ViewClassifier
from braintumor_flax.models.shared_trunk import SharedTrunkClassifier
from braintumor_flax.models.vgg16 import VGG16_BLOCKS
from braintumor_flax.training.augment import PIXEL_AUGMENTS, PixelAugment, augment_batch, augment_pixels
from braintumor_flax.training.config import TrainConfig
from braintumor_flax.xla import cpu_jit

Model = ViewClassifier | TumorClassifier | SharedTrunkClassifier


def frozen_layer_names(frozen_blocks: int) -> set[str]:
    return {f"block{b}_conv{i}" for b in range(1, frozen_blocks + 1) for i in range(1, len(VGG16_BLOCKS[b - 1]) + 1)}


def trainable_filter(frozen_blocks: int) -> Callable[[tuple, Any], bool]:
    """NNX filter: parameters not inside a frozen VGG layer (matched by name, as in big_vision)."""
    frozen = frozen_layer_names(frozen_blocks)

    def is_trainable(path: tuple, value: Any) -> bool:
        return isinstance(value, nnx.Param) and not any(str(part) in frozen for part in path)

    return is_trainable


def warmup_cosine(peak: float, *, warmup_epochs: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up from 0 to `peak`, then cosine decay to 0 at the end of the last epoch."""
    total = max(1, epochs * steps_per_epoch)
    # At least one step of each phase, also when a short run has fewer steps than the warm-up asks for.
    warmup = min(max(int(warmup_epochs * steps_per_epoch), 1), max(total - 1, 1))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1))


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    if config.schedule == "warmup_cosine":
        lr = warmup_cosine(config.learning_rate, warmup_epochs=config.warmup_epochs, epochs=config.epochs,
                           steps_per_epoch=steps_per_epoch)
    else:
        lr = config.learning_rate
    if config.weight_decay > 0:
        return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.adam(lr)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What a step computes besides the model: its input kind, augmentation and loss (hashable: static)."""

    from_lower: bool  # inputs are cached lower-block outputs, not pixels
    hflip: bool = False
    vflip: bool = False
    zoom: float = 0.0
    label_smoothing: float = 0.0
    pixel_augment: PixelAugment | None = None  # pixel inputs only: the source-robustness augmentation
    # The shared-trunk model: labels are [B, 2] (plane, tumour), -1 = unknown, masked out of its loss.
    multitask: bool = False
    # The tumour head alone, on the frozen trunk's pooled output and the view feature (training.head_refit):
    # vectors, so no augmentation here (the refit adds each image's mirror as its own example).
    from_pooled: bool = False

    @classmethod
    def of(cls, config: TrainConfig, *, from_lower: bool, from_pooled: bool = False) -> StepSettings:
        if from_pooled:
            return cls(False, label_smoothing=config.label_smoothing, from_pooled=True)
        pixel = pixel_augment_of(config) if config.pixel_augment and not from_lower else None
        return cls(from_lower, config.hflip, config.vflip, config.zoom, config.label_smoothing, pixel,
                   config.model == "shared_trunk")


def pixel_augment_of(config: TrainConfig) -> PixelAugment:
    """The pixel augmentation a recipe trains with: its profile, with the recipe's flips."""
    return dataclasses.replace(PIXEL_AUGMENTS[config.augment_profile], hflip=config.hflip, vflip=config.vflip)


def two_rate_adamw(trunk: optax.Schedule, decoder: optax.Schedule, weight_decay: float
                   ) -> optax.GradientTransformation:
    """AdamW with its own rate for the segmentation decoder (parameters under a top-level "segmenter")."""
    def labels(params: nnx.State) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "decoder" if str(getattr(path[0], "key", path[0])) == "segmenter" else "trunk", params)

    return optax.multi_transform({"trunk": optax.adamw(trunk, weight_decay=weight_decay),
                                  "decoder": optax.adamw(decoder, weight_decay=weight_decay)}, labels)


@struct.dataclass
class TrainState:
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    settings: StepSettings = struct.field(pytree_node=False)
    params: nnx.State  # trainable parameters
    rest: nnx.State  # frozen parameters and every other variable
    opt_state: optax.OptState

    @classmethod
    def create(cls, model: Model, tx: optax.GradientTransformation, settings: StepSettings, *,
               frozen_blocks: int) -> TrainState:
        graphdef, params, rest = nnx.split(model, trainable_filter(frozen_blocks), ...)
        return cls(graphdef, tx, settings, params, rest, tx.init(params))

    def model(self) -> Model:
        return nnx.merge(self.graphdef, self.params, self.rest)


def logits_of(model: Model, x: jax.Array, extra: jax.Array | None, *, from_lower: bool, train: bool,
              key: jax.Array | None, from_pooled: bool = False) -> jax.Array:
    """Logits of one model from pixels, from cached lower-block features, or (the tumour model, `from_pooled`)
    from its head's cached image input (`extra`: the view feature).
    The shared-trunk model returns (view logits, tumour logits)."""
    if from_pooled:
        if not isinstance(model, TumorClassifier):
            raise TypeError("from_pooled trains the tumour head alone: pass the TumorClassifier")
        return model.head_from_pooled(x, extra if model.config.use_view_feature else None, train=train, key=key)
    if isinstance(model, SharedTrunkClassifier):
        return (model.from_lower if from_lower else model)(x, train=train, key=key)
    if isinstance(model, ViewClassifier):
        fn = model.from_lower if from_lower else model
        return fn(x, train=train, key=key)[0]
    view_feature = extra if model.config.use_view_feature else None
    fn = model.from_lower if from_lower else model
    return fn(x, view_feature, train=train, key=key)


def _loss(params: nnx.State, state: TrainState, x: jax.Array, extra: jax.Array | None, labels: jax.Array,
          key: jax.Array) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(state.graphdef, params, state.rest)
    s = state.settings
    aug_key, drop_key = jax.random.split(key)
    x = x.astype(jnp.float32)
    if s.pixel_augment is not None:
        x = augment_pixels(aug_key, x, s.pixel_augment)
    elif s.hflip or s.vflip or s.zoom > 0:
        x = augment_batch(aug_key, x, hflip=s.hflip, vflip=s.vflip, zoom=s.zoom)
    logits = logits_of(model, x, extra, from_lower=s.from_lower, train=True, key=drop_key, from_pooled=s.from_pooled)
    if s.multitask:
        (view_loss, _), (tumor_loss, tumor_acc) = (masked_loss(lg, labels[:, i], s.label_smoothing)
                                                   for i, lg in enumerate(logits))
        return view_loss + tumor_loss, tumor_acc
    return masked_loss(logits, labels, s.label_smoothing)


def masked_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Mean (smoothed) cross-entropy and accuracy over the rows whose label is known (>= 0)."""
    known = labels >= 0
    safe = jnp.where(known, labels, 0)
    targets = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1]), label_smoothing)
    n = jnp.maximum(known.sum(), 1)
    loss = jnp.where(known, optax.softmax_cross_entropy(logits, targets), 0.0).sum() / n
    return loss, jnp.where(known, logits.argmax(-1) == safe, False).sum() / n


@cpu_jit
def train_step(state: TrainState, x: jax.Array, extra: jax.Array | None, labels: jax.Array, key: jax.Array
               ) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimizer step on a batch: (new state, loss, accuracy)."""
    (loss, acc), grads = jax.value_and_grad(_loss, has_aux=True)(state.params, state, x, extra, labels, key)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), loss, acc


@cpu_jit
def eval_step(state: TrainState, x: jax.Array, extra: jax.Array | None) -> jax.Array:
    """Deterministic logits (no augmentation, no dropout)."""
    model = nnx.merge(state.graphdef, state.params, state.rest)
    return logits_of(model, x.astype(jnp.float32), extra, from_lower=state.settings.from_lower, train=False,
                     key=None, from_pooled=state.settings.from_pooled)
