"""VGG16 convolutional trunk (Keras `include_top=False`) as one compact Flax NNX module.

Layer names match the published Keras weights (`block1_conv1` ... `block5_conv3`), so converting
them is a rename plus an OIHW→HWIO transpose (see `braintumor_flax.models.pretrained`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Output channels of each conv, per block.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)
VGG16_LAYERS: tuple[str, ...] = tuple(
    f"block{b}_conv{i}" for b, convs in enumerate(VGG16_BLOCKS, start=1) for i in range(1, len(convs) + 1)
)
# ImageNet means of the Keras "caffe" preprocessing, in BGR order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def caffe_preprocess(images: jax.Array) -> jax.Array:
    """uint8/float RGB in [0, 255] → BGR minus the ImageNet mean: what the Keras weights were trained on.

    (The original project divided by 255 before VGG16, which these weights never saw.)
    """
    x = images.astype(jnp.float32)[..., ::-1]
    return x - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


class VGG16(nnx.Module):
    """The 13 convolutions of VGG16; NHWC input already preprocessed (see `caffe_preprocess`)."""

    def __init__(self, *, width_divisor: int = 1, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        # width_divisor > 1 narrows every layer (a tiny VGG for tests that train in seconds); 1 = VGG16.
        in_ch = 3
        for block, convs in enumerate(VGG16_BLOCKS, start=1):
            for i, out_ch in enumerate(convs, start=1):
                out_ch = max(1, out_ch // width_divisor)
                conv = nnx.Conv(in_ch, out_ch, (3, 3), padding="SAME", dtype=dtype, rngs=rngs)
                setattr(self, f"block{block}_conv{i}", conv)
                in_ch = out_ch

    def block_convs(self, x: jax.Array, block: int) -> jax.Array:
        """The convolutions (+ ReLU) of one block, without its pooling: Grad-CAM reads block 5 here."""
        for i in range(1, len(VGG16_BLOCKS[block - 1]) + 1):
            x = jax.nn.relu(getattr(self, f"block{block}_conv{i}")(x))
        return x

    def __call__(
        self, x: jax.Array, *, first_block: int = 1, last_block: int = 5, return_intermediates: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Run blocks `first_block..last_block` (each conv stack + 2×2 max-pool).

        `first_block > 1` continues from a cached earlier output, which is how the frozen lower blocks
        are shared between the two models and computed once per image.
        """
        intermediates: dict[str, jax.Array] = {}
        for block in range(first_block, last_block + 1):
            x = self.block_convs(x, block)
            if return_intermediates:
                intermediates[f"block{block}_conv{len(VGG16_BLOCKS[block - 1])}"] = x
            x = max_pool_2x2(x)
            if return_intermediates:
                intermediates[f"block{block}_pool"] = x
        return (x, intermediates) if return_intermediates else x
