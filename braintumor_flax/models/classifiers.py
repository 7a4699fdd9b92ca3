"""The two models of the original system, in Flax NNX.

Model 1 (view): VGG16 → Flatten → Dense(128, ReLU) [the 128-d view feature] → Dropout(0.3) → Dense(3).
Model 2 (tumour): image branch VGG16 → Flatten → Dense(128, ReLU) → Dropout(0.3); view branch
Dense(64, ReLU) on the view feature; concatenate → Dense(128, ReLU) → Dropout(0.2) → Dense(4).

Each model exposes its forward pass in stages so that the frozen lower VGG blocks can run once per
image for both models, and Grad-CAM can read the last convolution's activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from braintumor_flax.labels import PLANES, TUMOR_CLASSES
from braintumor_flax.models.vgg16 import VGG16, VGG16_BLOCKS, caffe_preprocess, max_pool_2x2

Task = Literal["view", "tumor"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and preprocessing: everything needed to rebuild a model before loading weights."""

    task: Task
    image_size: int = 128
    feature_dim: int = 128
    view_projection_dim: int = 64  # tumour model only; 0 = no view branch (ablation)
    hidden_dim: int = 128  # tumour model's fused layer
    dropout: float = 0.3
    fusion_dropout: float = 0.2
    preprocessing: str = "caffe"  # BGR, ImageNet mean subtracted, no /255
    # The split point of the trunk: blocks 1..lower_blocks form the lower stage (`lower`), frozen in the
    # faithful recipe and then identical in both models, so they run once per image and can be cached.
    lower_blocks: int = 4
    width_divisor: int = 1  # > 1: a narrowed VGG (tests only); 1 = VGG16 with its ImageNet weights

    @property
    def class_names(self) -> tuple[str, ...]:
        return PLANES if self.task == "view" else TUMOR_CLASSES

    @property
    def use_view_feature(self) -> bool:
        return self.task == "tumor" and self.view_projection_dim > 0

    @property
    def flat_dim(self) -> int:
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        return (self.image_size // 32) ** 2 * self.trunk_channels

    @property
    def trunk_channels(self) -> int:
        """Channels of blocks 4 and 5 (512 in VGG16): the width of the lower output and of the last conv."""
        return 512 // self.width_divisor

    @property
    def lower_shape(self) -> tuple[int, int, int]:
        """[h, w, c] of the lower blocks' output: each block halves the side; widths 64, 128, 256, 512, 512."""
        if not 1 <= self.lower_blocks <= 4:
            raise ValueError(f"lower_blocks must be in 1..4, got {self.lower_blocks}")
        side = self.image_size // 2**self.lower_blocks
        return side, side, min(64 * 2 ** (self.lower_blocks - 1), 512) // self.width_divisor

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {"lower_blocks": data["shared_blocks"], **data} if "shared_blocks" in data else data  # format 1
        return cls(**{k: v for k, v in data.items() if k in names})


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def pooled_features(last_conv: jax.Array) -> jax.Array:
    """Last conv activations [B, s, s, C] → what both heads read: the last pooling, flattened [B, flat_dim]."""
    return _flatten(max_pool_2x2(last_conv))


class _VGGClassifier(nnx.Module):
    """What both models share: the VGG16 trunk, run in two stages (shared lower blocks, then the rest)."""

    config: ModelConfig
    vgg: VGG16

    def lower(self, images: jax.Array) -> jax.Array:
        """uint8 RGB images → output of the shared (frozen) lower blocks."""
        return self.vgg(caffe_preprocess(images), last_block=self.config.lower_blocks)

    def upper_convs(self, lower: jax.Array, *, intermediates: dict[str, jax.Array] | None = None) -> jax.Array:
        """Remaining conv blocks, stopping before the last pooling (Grad-CAM's target layer). `intermediates`,
        if given, receives each block's last conv output and the pooled output of the blocks before the last
        (`blockN_convM`, `blockN_pool`, as `VGG16` names them)."""
        x = lower
        for block in range(self.config.lower_blocks + 1, 6):
            x = self.vgg.block_convs(x, block)
            if intermediates is not None:
                intermediates[f"block{block}_conv{len(VGG16_BLOCKS[block - 1])}"] = x
            if block < 5:
                x = max_pool_2x2(x)
                if intermediates is not None:
                    intermediates[f"block{block}_pool"] = x
        return x


class ViewClassifier(_VGGClassifier):
    """Model 1: which plane a slice was cut in; its penultimate layer is the 128-d view feature."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vgg = VGG16(width_divisor=config.width_divisor, rngs=rngs)
        self.feature = nnx.Linear(config.flat_dim, config.feature_dim, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)
        self.classifier = nnx.Linear(config.feature_dim, len(config.class_names), rngs=rngs)

    def head(
        self, last_conv: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Last conv activations → (logits, 128-d view feature)."""
        feature = jax.nn.relu(self.feature(pooled_features(last_conv)))
        x = self.dropout(feature, deterministic=not train, rngs=key)
        return self.classifier(x), feature

    def from_lower(self, lower: jax.Array, *, train: bool = False, key: jax.Array | None = None):
        return self.head(self.upper_convs(lower), train=train, key=key)

    def __call__(self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None):
        """uint8 RGB [B, S, S, 3] → (logits [B, 3], view feature [B, 128])."""
        return self.from_lower(self.lower(images), train=train, key=key)


class TumorClassifier(_VGGClassifier):
    """Model 2: tumour class from the image and (optionally) the view model's 128-d feature."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vgg = VGG16(width_divisor=config.width_divisor, rngs=rngs)
        self.image_feature = nnx.Linear(config.flat_dim, config.feature_dim, rngs=rngs)
        self.image_dropout = nnx.Dropout(config.dropout)
        fused_in = config.feature_dim
        if config.use_view_feature:
            self.view_projection = nnx.Linear(config.feature_dim, config.view_projection_dim, rngs=rngs)
            fused_in += config.view_projection_dim
        self.fused = nnx.Linear(fused_in, config.hidden_dim, rngs=rngs)
        self.fused_dropout = nnx.Dropout(config.fusion_dropout)
        self.classifier = nnx.Linear(config.hidden_dim, len(config.class_names), rngs=rngs)

    def head(
        self,
        last_conv: jax.Array,
        view_feature: jax.Array | None,
        *,
        train: bool = False,
        key: jax.Array | None = None,
    ) -> jax.Array:
        return self.head_from_pooled(pooled_features(last_conv), view_feature, train=train, key=key)

    def head_from_pooled(
        self,
        pooled: jax.Array,
        view_feature: jax.Array | None,
        *,
        train: bool = False,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """`pooled_features` of the last conv (+ the view feature) → logits [B, 4]: the head alone, which a
        head refit (training/head_refit.py) trains over the frozen trunk's cached output."""
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x = jax.nn.relu(self.image_feature(pooled))
        x = self.image_dropout(x, deterministic=not train, rngs=k1)
        if self.config.use_view_feature:
            if view_feature is None:
                raise ValueError("this tumour model was built with the view branch: pass the view feature")
            x = jnp.concatenate([x, jax.nn.relu(self.view_projection(view_feature))], axis=-1)
        x = jax.nn.relu(self.fused(x))
        x = self.fused_dropout(x, deterministic=not train, rngs=k2)
        return self.classifier(x)

    def from_lower(
        self,
        lower: jax.Array,
        view_feature: jax.Array | None,
        *,
        train: bool = False,
        key: jax.Array | None = None,
    ) -> jax.Array:
        return self.head(self.upper_convs(lower), view_feature, train=train, key=key)

    def __call__(
        self,
        images: jax.Array,
        view_feature: jax.Array | None = None,
        *,
        train: bool = False,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """uint8 RGB [B, S, S, 3] (+ view feature [B, 128]) → logits [B, 4]."""
        return self.from_lower(self.lower(images), view_feature, train=train, key=key)


def build_model(config: ModelConfig, *, seed: int = 0) -> ViewClassifier | TumorClassifier:
    cls = ViewClassifier if config.task == "view" else TumorClassifier
    return cls(config, rngs=nnx.Rngs(seed))
