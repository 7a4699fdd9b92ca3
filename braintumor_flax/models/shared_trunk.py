"""The shared-trunk, multi-task model: one VGG16 trunk answers both questions in one pass.

    trunk (VGG16) ─┬─ view head:   Flatten → Dense(128) [the 128-d view feature] → Dropout → Dense(3)
                   └─ tumour head: Dense(128) of the trunk features ⊕ Dense(64) of the view feature
                                   → Dense(128) → Dropout → Dense(4)        (the original's dual input)

It is the two classifiers of `classifiers` holding *one* `VGG16` object (an NNX shared reference): trained
together, with the view loss masked where a dataset has no plane labels (Kaggle). Saved, it is an ordinary
two-model checkpoint whose trunk tensors are all shared (stored once); `models.forward` then runs the trunk
once for both heads, so full fine-tuning does not double the app's compute.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from braintumor_flax.models.classifiers import ModelConfig, TumorClassifier, ViewClassifier


class SharedTrunkClassifier(nnx.Module):
    def __init__(self, view_config: ModelConfig, tumor_config: ModelConfig, *, rngs: nnx.Rngs):
        if dataclasses.replace(view_config, task="tumor", view_projection_dim=tumor_config.view_projection_dim) \
                != tumor_config:
            raise ValueError("the two heads must sit on the same trunk configuration")
        self.view = ViewClassifier(view_config, rngs=rngs)
        self.tumor = TumorClassifier(tumor_config, rngs=rngs)
        self.tumor.vgg = self.view.vgg  # one trunk: the same parameters, updated once per step

    @property
    def config(self) -> ModelConfig:
        return self.view.config

    def lower(self, images: jax.Array) -> jax.Array:
        return self.view.lower(images)

    def from_lower(self, lower: jax.Array, *, train: bool = False, key: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
        """Lower-block output → (view logits [B, 3], tumour logits [B, 4]); the trunk's upper part runs once."""
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        last_conv = self.view.upper_convs(lower)
        view_logits, feature = self.view.head(last_conv, train=train, key=k1)
        tumor_feature = feature if self.tumor.config.use_view_feature else None
        return view_logits, self.tumor.head(last_conv, tumor_feature, train=train, key=k2)

    def __call__(self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        return self.from_lower(self.lower(images), train=train, key=key)


def build_shared_trunk(view_config: ModelConfig, *, use_view_feature: bool = True, seed: int = 0
                       ) -> SharedTrunkClassifier:
    tumor_config = dataclasses.replace(view_config, task="tumor",
                                       view_projection_dim=view_config.view_projection_dim if use_view_feature else 0)
    return SharedTrunkClassifier(view_config, tumor_config, rngs=nnx.Rngs(seed))
