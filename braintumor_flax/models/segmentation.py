"""Where the tumour is: a light U-Net decoder over the served trunk's VGG activations.

    block5_conv3 (S/16) ─ conv1×1 ───────────────┐          (deep=True)
    block4_conv3 (S/8)  ─ conv1×1 ─────────┐     │          (deep=True)
    block3_pool  (S/8)  ─ conv1×1 → context (S/8 + S/16) → up ⊕ conv (S/4) → up ⊕ conv (S/2) → …
    block3_conv3 (S/4)  ─ conv1×1 ─────────────────────────┘              │
    block2_conv2 (S/2)  ─ conv1×1 ─────────────────────────────────────────┘
    … full_res=False: conv1×1 → logit (S/2), bilinear ×2 → mask logit (S × S)
      full_res=True:  up ⊕ conv3×3 of the slice itself (S) → conv → conv1×1 → mask logit (S × S)
    pixel_widths=(p1, p2, p4) (needs full_res): a small trainable encoder of the slice itself,
      conv×2 (S, p1) → pool → conv×2 (S/2, p2) → pool → conv (S/4, p4), joined at the S, S/2 and S/4 levels:
      edges and textures learnt from the masks beside the frozen ImageNet skips.

Every input is an activation the classifier's forward pass computes anyway (`models.forward`), so segmenting
adds only the decoder. Blocks 1-3 are frozen ImageNet weights in every CPU recipe; `deep=True` also reads the
trained blocks 4-5 of a shared-trunk model, whose features know whether and what kind of tumour there is: that
ties the decoder to that one trunk. `SegmentationConfig.trunk_digest` records the blocks it was trained on, and a
checkpoint refuses a decoder trained on other blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from braintumor_flax.models.params import weights_digest
from braintumor_flax.models.vgg16 import VGG16, VGG16_BLOCKS, caffe_preprocess, max_pool_2x2

ENCODER_BLOCKS = 3  # the blocks every decoder reads (frozen in the CPU recipes)
SKIP_LAYERS = ("block2_conv2", "block3_conv3", "block3_pool")
DEEP_LAYERS = ("block4_conv3", "block5_conv3")  # of the trained upper blocks (deep=True)
IMAGE = "image"  # the slice itself, as the full-resolution skip (full_res=True)
# Without `full_res` the last level predicts at S/2 and the logit is upsampled bilinearly (cheaper); the served
# decoder has the full-resolution level.


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
    image_size: int = 128
    # Decoder widths at S/8 (context), S/4 and S/2.
    widths: tuple[int, int, int] = (128, 64, 32)
    width_divisor: int = 1  # of the VGG it reads (tests use a narrowed VGG)
    threshold: float = 0.5  # on the mask probability
    trunk_digest: str = ""  # weights_digest of the VGG blocks the decoder was trained on
    deep: bool = False  # also read blocks 4-5 (DEEP_LAYERS)
    full_res: bool = False  # a last level at S × S with the slice as its skip
    full_res_width: int = 16
    # Widths of the trainable pixel encoder at S, S/2, S/4; () = none (the served decoder has none).
    pixel_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.pixel_widths and (len(self.pixel_widths) != 3 or not self.full_res):
            raise ValueError("pixel_widths takes 3 widths (S, S/2, S/4) and needs full_res (it reads the slice)")

    @property
    def encoder_blocks(self) -> int:
        """The VGG blocks whose activations the decoder reads: its trunk digest covers those."""
        return 5 if self.deep else ENCODER_BLOCKS

    @property
    def inputs(self) -> tuple[str, ...]:
        """What it reads: VGG activations (`encode` gives SKIP_LAYERS; deep ones come from the upper blocks) and,
        with `full_res`, the slice itself."""
        return SKIP_LAYERS + (DEEP_LAYERS if self.deep else ()) + ((IMAGE,) if self.full_res else ())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "widths": list(self.widths), "pixel_widths": list(self.pixel_widths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentationConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        for key in ("widths", "pixel_widths"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def encode(vgg: VGG16, images: jax.Array, last_block: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """uint8 RGB → (output of blocks 1..last_block, the activations the decoder reads). One VGG pass: the
    classifier's lower stage and the decoder's skips come from the same call."""
    if last_block < ENCODER_BLOCKS:
        raise ValueError(f"the decoder reads VGG blocks 1-{ENCODER_BLOCKS}; the trunk stops at {last_block}")
    lower, inter = vgg(caffe_preprocess(images), last_block=last_block, return_intermediates=True)
    # The deep layers are here only when the lower stage reaches them; otherwise the upper blocks give them.
    skips = {name: inter[name] for name in SKIP_LAYERS + DEEP_LAYERS if name in inter}
    skips[IMAGE] = image_skip(images)
    return lower, skips


def image_skip(images: jax.Array) -> jax.Array:
    """uint8 RGB [B, S, S, 3] → the grey slice [B, S, S, 1] as float (the full-resolution level's skip)."""
    return images.astype(jnp.float32).mean(axis=-1, keepdims=True)


def _up(x: jax.Array) -> jax.Array:
    """×2 nearest-neighbour (the 3×3 convolution after it smooths; bilinear resizing costs more on CPU)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _rms_normalised(x: jax.Array) -> jax.Array:
    """Each image's activations divided by their root mean square: VGG activations run to the hundreds and vary
    with contrast; per image (not per batch), so an answer never depends on its batch-mates."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=(1, 2, 3), keepdims=True) + 1e-6)


def _up_bilinear(x: jax.Array) -> jax.Array:
    """[B, H, W, ...] → [B, 2H, 2W, ...], bilinear with half-pixel centres and clamped edges (as
    jax.image.resize), written as shifted sums: its gradient is as cheap as the forward."""
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
        c2, c3, c4, c5 = (VGG16_BLOCKS[b][0] // config.width_divisor for b in (1, 2, 3, 4))

        def conv(cin: int, cout: int, k: int = 3) -> nnx.Conv:
            return nnx.Conv(cin, cout, (k, k), padding="SAME", rngs=rngs)

        self.context_in = conv(c3, w8, 1)
        self.context_conv = conv(w8, w8)
        self.context_coarse1 = conv(w8, w8)  # at S/16: a wider view of the slice
        self.context_coarse2 = conv(w8, w8)
        self.context_out = conv(w8, w8)
        self.skip4, self.skip2 = conv(c3, w4, 1), conv(c2, w2, 1)
        p1, p2, p4 = config.pixel_widths or (0, 0, 0)
        if config.pixel_widths:
            self.pixel1a, self.pixel1b = conv(1, p1), conv(p1, p1)
            self.pixel2a, self.pixel2b = conv(p1, p2), conv(p2, p2)
            self.pixel4 = conv(p2, p4)
        self.fuse4, self.fuse2 = conv(w8 + w4 + p4, w4), conv(w4 + w2 + p2, w2)
        if config.deep:
            self.deep4, self.deep5 = conv(c4, w8, 1), conv(c5, w8, 1)
        if config.full_res:
            w1 = config.full_res_width
            self.skip1 = conv(1, w1)
            self.fuse1 = conv(w2 + w1 + p1, w1)
            self.refine1 = conv(w1, w1)
            self.out = conv(w1, 1, 1)
        else:
            self.out = conv(w2, 1, 1)

    def __call__(self, skips: dict[str, jax.Array]) -> jax.Array:
        relu = jax.nn.relu
        cfg = self.config
        skips = {k: _rms_normalised(skips[k]) for k in cfg.inputs}
        x = relu(self.context_in(skips["block3_pool"]))
        if cfg.deep:
            x = x + relu(self.deep4(skips["block4_conv3"]))
        x = relu(self.context_conv(x))
        coarse = max_pool_2x2(x)
        if cfg.deep:
            coarse = coarse + relu(self.deep5(skips["block5_conv3"]))
        coarse = relu(self.context_coarse2(relu(self.context_coarse1(coarse))))
        x = relu(self.context_out(x + _up(coarse)))
        pixels = self._pixel_features(skips[IMAGE]) if cfg.pixel_widths else ([], [], [])
        for fuse, skip, name, own in ((self.fuse4, self.skip4, "block3_conv3", pixels[2]),
                                      (self.fuse2, self.skip2, "block2_conv2", pixels[1])):
            x = relu(fuse(jnp.concatenate([_up(x), relu(skip(skips[name])), *own], axis=-1)))
        if not cfg.full_res:
            return _up_bilinear(self.out(x)[..., 0])
        x = relu(self.fuse1(jnp.concatenate([_up_bilinear(x), relu(self.skip1(skips[IMAGE])), *pixels[0]], axis=-1)))
        return self.out(relu(self.refine1(x)))[..., 0]

    def _pixel_features(self, image: jax.Array) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
        """The trainable pixel encoder's features at S, S/2 and S/4 (each a one-element list, to concatenate)."""
        relu = jax.nn.relu
        at1 = relu(self.pixel1b(relu(self.pixel1a(image))))
        at2 = relu(self.pixel2b(relu(self.pixel2a(max_pool_2x2(at1)))))
        return [at1], [at2], [relu(self.pixel4(max_pool_2x2(at2)))]


def build_segmenter(config: SegmentationConfig, *, seed: int = 0) -> TumorSegmenter:
    return TumorSegmenter(config, rngs=nnx.Rngs(seed))


def trunk_digest(vgg: VGG16, blocks: int = ENCODER_BLOCKS) -> str:
    """Identity of the VGG blocks 1..`blocks` a decoder reads (a classifier's `.vgg` or a bare VGG16): a decoder
    serves only on the blocks it was trained on. Taken at float16 precision: storing a checkpoint in float16
    keeps it."""
    return weights_digest(vgg, blocks=blocks, prefix="", rounded_to="float16")
