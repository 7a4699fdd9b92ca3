"""Batch augmentation: flips and zoom (pixels or cached feature maps) and pixel-space augmentation in pure JAX;
style randomisation (numpy, applied once per image before its lower-block features are cached)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from braintumor_flax.models.forward import pad_rows, padded_chunks


def _augment_one(key: jax.Array, image: jax.Array, hflip: bool, vflip: bool, zoom: float) -> jax.Array:
    k_h, k_v, k_z = jax.random.split(key, 3)
    if hflip:
        image = jnp.where(jax.random.bernoulli(k_h), image[:, ::-1, :], image)
    if vflip:
        image = jnp.where(jax.random.bernoulli(k_v), image[::-1, :, :], image)
    if zoom > 0:
        s = jax.random.uniform(k_z, (), minval=1.0 - zoom, maxval=1.0 + zoom)
        rows, cols = _zoom_matrix(image.shape[0], s), _zoom_matrix(image.shape[1], s)
        image = jnp.einsum("ij,jkc,lk->ilc", rows, image, cols, precision=jax.lax.Precision.HIGHEST)
    return image


def _zoom_matrix(n: int, s: jax.Array) -> jax.Array:
    """[n_out, n_in] linear-interpolation weights for a zoom by s about the centre.

    A separable matmul instead of jax.image.scale_and_translate: same bilinear (triangle,
    antialiased when shrinking) kernel, but it compiles in a fraction of the time.
    Output pixels whose source lies outside the image get weight 0 (zero fill).
    """
    centre = n / 2.0
    src = (jnp.arange(n) + 0.5 - centre) / s + centre - 0.5  # continuous source index (half-centred)
    f = jnp.minimum(s, 1.0)  # widen the kernel when shrinking (s < 1)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(src[:, None] - jnp.arange(n)[None, :]) * f)
    inside = (src >= -0.5) & (src <= n - 0.5)
    total = w.sum(axis=1, keepdims=True)
    return jnp.where(inside[:, None], w / jnp.maximum(total, 1e-12), 0.0)


@functools.partial(jax.jit, static_argnames=("hflip", "vflip", "zoom"))
def augment_batch(key: jax.Array, images: jax.Array, *, hflip: bool = True, vflip: bool = True,
                  zoom: float = 0.2) -> jax.Array:
    """Randomly flip (each axis with p=0.5) and zoom (scale in [1-zoom, 1+zoom]) each sample.

    images: float [B, H, W, C]. Jitted (flags and zoom are static Python values); the same
    key gives the same result. Zoomed-out borders are zero-filled; bilinear interpolation.
    """
    if images.ndim != 4:
        raise ValueError(f"expected [B, H, W, C], got shape {images.shape}")
    if not 0.0 <= zoom < 1.0:
        raise ValueError(f"zoom must be in [0, 1), got {zoom}")
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, x: _augment_one(k, x, hflip, vflip, zoom))(keys, images).astype(images.dtype)


@dataclasses.dataclass(frozen=True)
class PixelAugment:
    """Pixel-space augmentation aimed at differences between sources (scanners, exports, crops).

    Geometric: one random affine per image (scale, shift, rotation, flips), bilinear, zero fill. Photometric,
    on [0, 255] grey values: brightness, contrast, gamma, a random monotone intensity curve, blur and noise.
    """

    hflip: bool = True
    vflip: bool = False
    scale: tuple[float, float] = (0.8, 1.2)  # >1 zooms in (a random resized crop), <1 zooms out
    shift: float = 0.1  # fraction of the side
    rotate_deg: float = 15.0
    brightness: float = 0.1  # ± fraction of 255
    contrast: float = 0.2  # factor in [1 - c, 1 + c]
    gamma: float = 0.3  # exponent in [1 - g, 1 + g]
    curve: float = 0.1  # ± shift of the mid control points of a monotone intensity curve
    blur_p: float = 0.2
    noise_std: float = 4.0  # max Gaussian noise σ in grey levels


def _affine_one(key: jax.Array, image: jax.Array, aug: PixelAugment) -> jax.Array:
    h, w = image.shape[:2]
    k = jax.random.split(key, 6)
    scale = jax.random.uniform(k[0], (), minval=aug.scale[0], maxval=aug.scale[1])
    angle = jnp.deg2rad(jax.random.uniform(k[1], (), minval=-aug.rotate_deg, maxval=aug.rotate_deg))
    shift = jax.random.uniform(k[2], (2,), minval=-aug.shift, maxval=aug.shift) * jnp.array([h, w])
    flip_x = jnp.where(aug.hflip & jax.random.bernoulli(k[3]), -1.0, 1.0)
    flip_y = jnp.where(aug.vflip & jax.random.bernoulli(k[4]), -1.0, 1.0)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    y, x = (rows - cy - shift[0]) / scale, (cols - cx - shift[1]) / scale  # output -> source (inverse map)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_y = (cos * y - sin * x) * flip_y + cy
    src_x = (sin * y + cos * x) * flip_x + cx
    return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], [src_y, src_x], order=1, mode="constant")
                      for c in range(image.shape[-1])], axis=-1)


def _photometric_one(key: jax.Array, image: jax.Array, aug: PixelAugment) -> jax.Array:
    k = jax.random.split(key, 8)
    x = image / 255.0
    x = x + jax.random.uniform(k[0], (), minval=-aug.brightness, maxval=aug.brightness)
    mean = x.mean()
    x = (x - mean) * jax.random.uniform(k[1], (), minval=1 - aug.contrast, maxval=1 + aug.contrast) + mean
    x = jnp.clip(x, 0.0, 1.0) ** jax.random.uniform(k[2], (), minval=1 - aug.gamma, maxval=1 + aug.gamma)
    # A random monotone curve through (0, 0), (1/3, a), (2/3, b), (1, 1): intensity remapping between scanners.
    mids = jnp.sort(jnp.array([1 / 3, 2 / 3]) + jax.random.uniform(k[3], (2,), minval=-aug.curve, maxval=aug.curve))
    x = jnp.interp(x, jnp.array([0.0, 1 / 3, 2 / 3, 1.0]), jnp.concatenate([jnp.zeros(1), jnp.clip(mids, 0, 1),
                                                                            jnp.ones(1)]))
    blurred = (x + jnp.roll(x, 1, 0) + jnp.roll(x, -1, 0) + jnp.roll(x, 1, 1) + jnp.roll(x, -1, 1)) / 5.0
    x = jnp.where(jax.random.bernoulli(k[4], float(aug.blur_p)), blurred, x)
    sigma = jax.random.uniform(k[5], (), minval=0.0, maxval=aug.noise_std / 255.0)
    x = x + sigma * jax.random.normal(k[6], (*x.shape[:2], 1))  # the same noise in every channel
    # The slices are grey: apply one grey change to all three channels alike (they stay equal).
    return jnp.clip(x, 0.0, 1.0) * 255.0


def augment_pixels(key: jax.Array, images: jax.Array, aug: PixelAugment) -> jax.Array:
    """float [B, S, S, 3] in [0, 255] → augmented, per sample (traced inside the train step)."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, image: _augment_pixels_one(k, image, aug))(keys, images.astype(jnp.float32))


def augment_pixels_and_masks(key: jax.Array, images: jax.Array, masks: jax.Array, aug: PixelAugment
                             ) -> tuple[jax.Array, jax.Array]:
    """`augment_pixels` for segmentation: each mask (bool [B, S, S]) moves with its slice (the same affine,
    bilinear, then ≥ 0.5); the photometric changes touch only the slice. Same key, same slice: as
    `augment_pixels`."""
    keys = jax.random.split(key, images.shape[0])

    def one(k: jax.Array, image: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        moved = _augment_pixels_one(k, jnp.concatenate([image, mask[..., None]], axis=-1), aug)
        return moved[..., :-1], moved[..., -1] >= 0.5

    return jax.vmap(one)(keys, images.astype(jnp.float32), masks.astype(jnp.float32))


def augmented_copies(images: np.ndarray, copies: int, seed: int, aug: PixelAugment, masks: np.ndarray | None = None,
                     batch_size: int = 64) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """`copies` augmented versions of uint8 `images` [N, S, S, 3] (back to uint8), each image through one random
    `aug`, reproducible from `seed`, copy and batch; with `masks` (bool [N, S, S]), each mask moved with its
    image (`augment_pixels_and_masks`: the same images as without). [(images, masks or None)] per copy."""
    run_images = jax.jit(lambda key, x: augment_pixels(key, x, aug))
    run_both = jax.jit(lambda key, x, m: augment_pixels_and_masks(key, x, m, aug))
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for copy in range(copies):
        image_parts, mask_parts = [images[:0]], [] if masks is None else [masks[:0]]
        for start, rows, padded in padded_chunks(len(images), batch_size):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), copy), start)
            x = jnp.asarray(pad_rows(images, start, rows, padded))
            if masks is None:
                moved = run_images(key, x)
            else:
                moved, moved_masks = run_both(key, x, jnp.asarray(pad_rows(masks, start, rows, padded)))
                mask_parts.append(np.asarray(moved_masks[:rows]))
            image_parts.append(np.asarray(jnp.round(moved[:rows])).astype(np.uint8))
        out.append((np.concatenate(image_parts), None if masks is None else np.concatenate(mask_parts)))
    return out


def _augment_pixels_one(key: jax.Array, image: jax.Array, aug: PixelAugment) -> jax.Array:
    """One sample: the affine moves every channel; the photometric changes touch the first three (the slice),
    extra channels (a mask) pass through unchanged."""
    k1, k2 = jax.random.split(key)
    moved = _affine_one(k1, image, aug)
    return jnp.concatenate([_photometric_one(k2, moved[..., :3], aug), moved[..., 3:]], axis=-1)


@dataclasses.dataclass(frozen=True)
class StyleRandomize:
    """One random intensity curve per image, not necessarily monotone: the tissue contrasts of one MRI sequence
    (or a CT) turned into another's, so that contrast alone can tell neither a source nor "no tumour" apart.

    Why: the served CPU model calls bright axial meningiomas on FLAIR-, T2- or CT-looking slices "no tumour",
    the look most of the training set's no-tumour slices have. For recipes whose lower blocks are frozen, each
    training image gets `TrainConfig.style_variants` such copies, whose lower-block features are cached once.
    Measured with `shared-frozen3-style`: it did not help (README, "Style randomisation: not adopted").
    """

    knots: int = 4  # interior control points of the piecewise-linear curve, evenly spaced
    monotone_p: float = 0.5  # share of curves kept monotone (a milder remap than an arbitrary one)
    gamma: tuple[float, float] = (0.7, 1.5)  # applied before the curve

    def digest(self) -> str:
        return "k{}-m{}-g{}-{}".format(self.knots, self.monotone_p, *self.gamma)


def style_randomize(images: np.ndarray, seeds: Sequence[int | Sequence[int]], style: StyleRandomize) -> np.ndarray:
    """uint8 [N, S, S, 3] slices → grey copies, each through its own random curve (seeded per image, so a cached
    copy can be recomputed); black stays black (the background of every source)."""
    xs = np.linspace(0.0, 1.0, style.knots + 2)
    out = np.empty_like(images)
    for i, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        rng = np.random.default_rng(seed)
        ys = rng.uniform(0.05, 1.0, style.knots + 1)
        if rng.random() < style.monotone_p:
            ys = np.sort(ys)
        grey = (image.astype(np.float32).mean(axis=-1) / 255.0) ** rng.uniform(*style.gamma)
        mapped = np.interp(grey, xs, np.concatenate([[0.0], ys]))
        out[i] = (np.clip(mapped * 255.0 + 0.5, 0, 255).astype(np.uint8))[..., None]
    return out
