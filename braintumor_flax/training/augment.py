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
    on [0, 255] grey values: brightness, contrast, gamma, a random monotone intensity curve, blur and noise; and,
    when switched on (`processing`), the processing changes below (SOURCE_AUGMENT has them all).
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
    # Differences of processing between sources (all off by default, so the recipes above keep their augmentation
    # bit for bit; SOURCE_AUGMENT turns them on). Applied after the changes above, in the order an export chain
    # would: a non-monotone intensity curve (another sequence's contrasts), denoising (3×3 median), Gaussian blur,
    # sharpening (unsharp mask), resampling (down- then up-scaling) and JPEG re-encoding.
    curve_free_p: float = 0.0
    curve_free_knots: int = 4  # interior control points, evenly spaced; black stays black
    denoise_p: float = 0.0
    gauss_blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # pixels
    sharpen_p: float = 0.0
    sharpen_amount: tuple[float, float] = (0.3, 1.5)
    resample_p: float = 0.0
    resample_scale: tuple[float, float] = (0.4, 0.9)  # the intermediate size, as a fraction of the side
    jpeg_p: float = 0.0
    jpeg_quality: tuple[float, float] = (30.0, 95.0)

    @property
    def processing(self) -> bool:
        """Whether any of the processing changes is on (off: the original augmentation, bit for bit)."""
        return any(p > 0 for p in (self.curve_free_p, self.denoise_p, self.gauss_blur_p, self.sharpen_p,
                                   self.resample_p, self.jpeg_p))


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
    x = jnp.clip(x, 0.0, 1.0)
    if aug.processing:  # its own key (k[7], unused before), so the draws above stay as they were
        x = _processing_one(k[7], x, aug)
    return x * 255.0


# The JPEG standard's luminance quantisation table (quality 50); grey slices have luminance only.
_JPEG_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                       14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
                       92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
                      np.float32).reshape(8, 8)


def _dct8() -> np.ndarray:
    """The orthonormal 8-point DCT-II matrix [frequency, sample] of JPEG's blocks."""
    k, n = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    c = np.cos(np.pi * (2 * n + 1) * k / 16) * np.sqrt(2 / 8)
    c[0] /= np.sqrt(2)
    return c.astype(np.float32)


def _separable(matrix: jax.Array, x: jax.Array) -> jax.Array:
    """The same [n, n] linear map along rows and columns of x [n, n, C]."""
    return jnp.einsum("ij,jkc,lk->ilc", matrix, x, matrix, precision=jax.lax.Precision.HIGHEST)


def _gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int = 3) -> jax.Array:
    """Separable Gaussian blur of x [H, W, C] with a traced σ, edges repeated."""
    taps = jnp.exp(-(jnp.arange(-radius, radius + 1, dtype=jnp.float32) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    padded = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    rows = sum(taps[i] * padded[i:i + h] for i in range(2 * radius + 1))
    return sum(taps[i] * rows[:, i:i + w] for i in range(2 * radius + 1))


def _median3(x: jax.Array) -> jax.Array:
    """3×3 median of x [H, W, C] (edges repeated): a denoiser that keeps edges."""
    h, w = x.shape[:2]
    padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return jnp.median(jnp.stack([padded[i:i + h, j:j + w] for i in range(3) for j in range(3)]), axis=0)


def _resample_matrix(n: int, s: jax.Array) -> jax.Array:
    """[n, n]: down-scaling to ceil(n·s) samples (triangle kernel widened to 1/s, antialiased) and linear
    up-scaling back to n, as one matrix for a traced factor s in (0, 1]."""
    j = jnp.arange(n, dtype=jnp.float32)  # low-resolution samples; those ≥ ceil(n·s) get no weight
    centres = (j + 0.5) / s - 0.5
    down = jnp.maximum(0.0, 1.0 - jnp.abs(centres[:, None] - j[None, :]) * s)
    down = down / jnp.maximum(down.sum(axis=1, keepdims=True), 1e-12)
    coarse = jnp.clip((j + 0.5) * s - 0.5, 0.0, jnp.ceil(n * s) - 1.0)  # each pixel on the low-resolution grid
    up = jnp.maximum(0.0, 1.0 - jnp.abs(coarse[:, None] - j[None, :]))
    return up @ down


def _jpeg(x: jax.Array, quality: jax.Array) -> jax.Array:
    """JPEG re-encoding of x [H, W, C] in [0, 1] at a traced quality (1-100): 8×8 DCT, the libjpeg-scaled
    luminance table, rounding, back (each channel alike; the slices are grey). Sides are padded to 8."""
    h, w, c = x.shape
    ph, pw = -h % 8, -w % 8
    y = jnp.pad(x * 255.0, ((0, ph), (0, pw), (0, 0)), mode="edge") - 128.0
    blocks = y.reshape((h + ph) // 8, 8, (w + pw) // 8, 8, c)
    scale = jnp.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality)
    table = jnp.clip(jnp.floor((_JPEG_LUMA * scale + 50.0) / 100.0), 1.0, 255.0)[None, :, None, :, None]
    dct = jnp.asarray(_dct8())
    hi = jax.lax.Precision.HIGHEST
    coef = jnp.einsum("uk,akblc,vl->aubvc", dct, blocks, dct, precision=hi)
    coef = jnp.round(coef / table) * table
    back = jnp.einsum("uk,aubvc,vl->akblc", dct, coef, dct, precision=hi).reshape(h + ph, w + pw, c)
    return jnp.round(jnp.clip(back[:h, :w] + 128.0, 0.0, 255.0)) / 255.0


def _processing_one(key: jax.Array, x: jax.Array, aug: PixelAugment) -> jax.Array:
    """The processing changes of one image x [H, W, C] in [0, 1], each with its own probability."""
    k = jax.random.split(key, 12)

    def maybe(i: int, p: float, changed: jax.Array, current: jax.Array) -> jax.Array:
        return jnp.where(jax.random.bernoulli(k[i], p), changed, current) if p > 0 else current

    if aug.curve_free_p > 0:  # not necessarily monotone: the tissue contrasts of another sequence
        xs = jnp.linspace(0.0, 1.0, aug.curve_free_knots + 2)
        ys = jnp.concatenate([jnp.zeros(1), jax.random.uniform(k[1], (aug.curve_free_knots + 1,), minval=0.05)])
        strength = jax.random.uniform(k[2], (), minval=0.3, maxval=1.0)  # blended with the identity
        x = maybe(0, aug.curve_free_p, jnp.interp(x, xs, (1 - strength) * xs + strength * ys), x)
    if aug.denoise_p > 0:
        x = maybe(3, aug.denoise_p, _median3(x), x)
    if aug.gauss_blur_p > 0 or aug.sharpen_p > 0:
        blurred = _gaussian_blur(x, jax.random.uniform(k[4], (), minval=aug.blur_sigma[0], maxval=aug.blur_sigma[1]))
        x = maybe(5, aug.gauss_blur_p, blurred, x)
        amount = jax.random.uniform(k[6], (), minval=aug.sharpen_amount[0], maxval=aug.sharpen_amount[1])
        x = maybe(7, aug.sharpen_p, jnp.clip(x + amount * (x - _gaussian_blur(x, jnp.float32(1.0))), 0.0, 1.0), x)
    if aug.resample_p > 0:
        s = jax.random.uniform(k[8], (), minval=aug.resample_scale[0], maxval=aug.resample_scale[1])
        x = maybe(9, aug.resample_p, jnp.clip(_separable(_resample_matrix(x.shape[0], s), x), 0.0, 1.0), x)
    if aug.jpeg_p > 0:
        quality = jax.random.uniform(k[10], (), minval=aug.jpeg_quality[0], maxval=aug.jpeg_quality[1])
        x = maybe(11, aug.jpeg_p, _jpeg(x, jnp.round(quality)), x)
    return x


# Every change on, aimed at differences of source and processing (the long CPU run's recipe, shared-long-128):
# geometry (crops through scale > 1 and shift, scale, rotation, flips) and intensity as PixelAugment's defaults,
# plus each processing change on about one image in five (JPEG one in three: exports are often JPEG).
SOURCE_AUGMENT = PixelAugment(curve_free_p=0.15, denoise_p=0.15, gauss_blur_p=0.2, sharpen_p=0.2, resample_p=0.25,
                              jpeg_p=0.3)
# TrainConfig.augment_profile -> the augmentation a pixel-augmented recipe trains with (its flips set by the recipe).
PIXEL_AUGMENTS: dict[str, PixelAugment] = {"basic": PixelAugment(), "source": SOURCE_AUGMENT}


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
    Measured with `shared-frozen3-style`: it did not help (docs/experiments/style-randomisation-not-adopted.md).
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
