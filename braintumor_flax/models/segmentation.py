"""Where the tumour is: a light U-Net decoder over the served trunk's frozen VGG blocks 1-3.

    block2_conv2 (S/2) ─ conv1×1 ──────────────────────┐
    block3_conv3 (S/4) ─ conv1×1 ─────────┐            │
    block3_pool  (S/8) ─ conv1×1 → context (S/8 + S/16) → up ⊕ conv → up ⊕ conv → conv1×1 → logit (S/2),
                                                                              bilinear ×2 → mask logit (S × S)

It reads only blocks 1-3, which every CPU recipe keeps frozen at their ImageNet weights: the decoder trains on
its own (no classifier retraining, blocks 1-3 computed on the fly) and runs on the activations the classifier's
forward pass computes anyway (`models.forward`). `SegmentationConfig.trunk_digest` records the blocks it was
trained on; a trunk with other blocks 1-3 (a fully fine-tuned model) needs its own decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from braintumor_flax.models.params import weights_digest
from braintumor_flax.models.vgg16 import VGG16, VGG16_BLOCKS, caffe_preprocess, max_pool_2x2

ENCODER_BLOCKS = 3
SKIP_LAYERS = ("block2_conv2", "block3_conv3", "block3_pool")
# The last level predicts at S/2 and the logit is upsampled: a full-resolution level cost more CPU than the
# masks (nearest-neighbour resized, at most 2x the model grid here) could give back.


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
    image_size: int = 128
    # Decoder widths at S/8 (context), S/4 and S/2.
    widths: tuple[int, int, int] = (128, 64, 32)
    width_divisor: int = 1  # of the VGG it reads (tests use a narrowed VGG)
    threshold: float = 0.5  # on the mask probability
    trunk_digest: str = ""  # weights_digest of VGG blocks 1-3 the decoder was trained on

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentationConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        if "widths" in data:
            data["widths"] = tuple(data["widths"])
        return cls(**data)


def encode(vgg: VGG16, images: jax.Array, last_block: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """uint8 RGB → (output of blocks 1..last_block, the activations the decoder reads). One VGG pass: the
    classifier's lower stage and the decoder's skips come from the same call."""
    if last_block < ENCODER_BLOCKS:
        raise ValueError(f"the decoder reads VGG blocks 1-{ENCODER_BLOCKS}; the trunk stops at {last_block}")
    lower, inter = vgg(caffe_preprocess(images), last_block=last_block, return_intermediates=True)
    return lower, {name: inter[name] for name in SKIP_LAYERS}


def _up(x: jax.Array) -> jax.Array:
    """×2 nearest-neighbour (the 3×3 convolution after it smooths; bilinear resizing costs more on CPU)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _rms_normalised(x: jax.Array) -> jax.Array:
    """Each image's activations divided by their root mean square: VGG activations run to the hundreds and vary
    with contrast; per image (not per batch), so an answer never depends on its batch-mates."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=(1, 2, 3), keepdims=True) + 1e-6)


def _up_bilinear(x: jax.Array) -> jax.Array:
    """[B, H, W] → [B, 2H, 2W], bilinear with half-pixel centres and clamped edges (as jax.image.resize), written
    as shifted sums: its gradient is as cheap as the forward."""
    def along(a: jax.Array, axis: int) -> jax.Array:
        n = a.shape[axis]
        prev = jnp.concatenate([jax.lax.slice_in_dim(a, 0, 1, axis=axis), jax.lax.slice_in_dim(a, 0, n - 1, axis=axis)],
                               axis=axis)
        nxt = jnp.concatenate([jax.lax.slice_in_dim(a, 1, n, axis=axis), jax.lax.slice_in_dim(a, n - 1, n, axis=axis)],
                              axis=axis)
        even, odd = 0.75 * a + 0.25 * prev, 0.75 * a + 0.25 * nxt
        stacked = jnp.stack([even, odd], axis=axis + 1)
        shape = list(a.shape)
        shape[axis] = 2 * n
        return stacked.reshape(shape)

    return along(along(x, 1), 2)


class TumorSegmenter(nnx.Module):
    """Decoder: skips (from `encode`) → mask logits [B, S, S]."""

    def __init__(self, config: SegmentationConfig, *, rngs: nnx.Rngs):
        self.config = config
        w8, w4, w2 = config.widths
        c2, c3 = (VGG16_BLOCKS[b][0] // config.width_divisor for b in (1, 2))

        def conv(cin: int, cout: int, k: int = 3) -> nnx.Conv:
            return nnx.Conv(cin, cout, (k, k), padding="SAME", rngs=rngs)

        self.context_in = conv(c3, w8, 1)
        self.context_conv = conv(w8, w8)
        self.context_coarse1 = conv(w8, w8)  # at S/16: a wider view of the slice
        self.context_coarse2 = conv(w8, w8)
        self.context_out = conv(w8, w8)
        self.skip4, self.skip2 = conv(c3, w4, 1), conv(c2, w2, 1)
        self.fuse4, self.fuse2 = conv(w8 + w4, w4), conv(w4 + w2, w2)
        self.out = conv(w2, 1, 1)

    def __call__(self, skips: dict[str, jax.Array]) -> jax.Array:
        relu = jax.nn.relu
        skips = {k: _rms_normalised(v) for k, v in skips.items()}
        x = relu(self.context_conv(relu(self.context_in(skips["block3_pool"]))))
        coarse = relu(self.context_coarse2(relu(self.context_coarse1(max_pool_2x2(x)))))
        x = relu(self.context_out(x + _up(coarse)))
        for fuse, skip, name in ((self.fuse4, self.skip4, "block3_conv3"), (self.fuse2, self.skip2, "block2_conv2")):
            x = relu(fuse(jnp.concatenate([_up(x), relu(skip(skips[name]))], axis=-1)))
        return _up_bilinear(self.out(x)[..., 0])


def build_segmenter(config: SegmentationConfig, *, seed: int = 0) -> TumorSegmenter:
    return TumorSegmenter(config, rngs=nnx.Rngs(seed))


def trunk_digest(vgg: VGG16) -> str:
    """Identity of the VGG blocks the decoder reads (a classifier's `.vgg` or a bare VGG16): a decoder serves
    only on the blocks it was trained on. Taken at float16 precision: storing a checkpoint in float16 keeps it."""
    return weights_digest(vgg, blocks=ENCODER_BLOCKS, prefix="", rounded_to="float16")
