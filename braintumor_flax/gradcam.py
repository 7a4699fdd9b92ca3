"""Grad-CAM for the tumour model, computed in the same compiled call as both models' forward pass.

Target layer: the tumour model's last convolution (block5_conv3, before its pooling): [B, S/16, S/16, 512],
4x4 at 128 px. The class score is the tumour logit of the predicted class (or a requested one); its
gradient is taken w.r.t. that activation only, with the view model's 128-d feature held fixed (it enters
the tumour head as a constant), so the map explains the tumour branch's own evidence.

    weights_k = mean_{i,j} d logit_c / d A_ijk        cam_ij = ReLU(sum_k weights_k * A_ijk)

The map is then upsampled to the model input, mapped back through the pad-to-square step onto the
original slice and overlaid as a colour heat map.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from braintumor_flax.hub import BrainTumorPipeline
from braintumor_flax.resize import resize_rgb


@dataclasses.dataclass
class Explained:
    """Raw outputs of one explained batch (numpy): logits, view feature and one coarse map per image."""

    view_logits: np.ndarray  # [N, 3]
    tumor_logits: np.ndarray  # [N, 4]
    view_feature: np.ndarray  # [N, 128]
    cam: np.ndarray  # [N, h, w], >= 0, not normalised
    target: np.ndarray  # [N] class index the map explains
    lower_pooled: np.ndarray  # [N, 512] spatial mean of the shared lower blocks' output (the OOD feature)


class GradCAM:
    """Compiled two-stage forward + Grad-CAM (shared lower blocks run once, as in `Predictor`)."""

    def __init__(self, pipeline: BrainTumorPipeline):
        self.image_size = pipeline.view_model.config.image_size
        view_graph, view_state = nnx.split(pipeline.view_model)
        tumor_graph, tumor_state = nnx.split(pipeline.tumor_model)
        share = pipeline.shares_lower_blocks
        use_view = pipeline.tumor_model.config.use_view_feature

        @jax.jit
        def explain(view_state, tumor_state, images, target):
            view = nnx.merge(view_graph, view_state)
            tumor = nnx.merge(tumor_graph, tumor_state)
            lower = view.lower(images)
            view_logits, feature = view.head(view.upper_convs(lower))
            last_conv = tumor.upper_convs(lower if share else tumor.lower(images))
            fixed_feature = jax.lax.stop_gradient(feature) if use_view else None

            def class_scores(activation):
                return tumor.head(activation, fixed_feature)

            tumor_logits, pullback = jax.vjp(class_scores, last_conv)
            # target < 0 means "the predicted class"; samples are independent, so one vjp serves the batch.
            chosen = jnp.where(target < 0, jnp.argmax(tumor_logits, axis=-1), target)
            (grads,) = pullback(jax.nn.one_hot(chosen, tumor_logits.shape[-1], dtype=tumor_logits.dtype))
            channel_weights = grads.mean(axis=(1, 2), keepdims=True)
            cam = jax.nn.relu((channel_weights * last_conv).sum(axis=-1))
            return view_logits, tumor_logits, feature, cam, chosen, lower.mean(axis=(1, 2))

        self._states = (view_state, tumor_state)
        self._explain = explain

    def __call__(self, images: np.ndarray, target: np.ndarray | None = None) -> Explained:
        """uint8 [N, S, S, 3] model inputs → logits, view feature, Grad-CAM for `target` (default: argmax)."""
        images = np.asarray(images, np.uint8)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected [N, {self.image_size}, {self.image_size}, 3] images, got {images.shape}")
        if target is None:
            target = np.full((len(images),), -1, np.int32)
        outs = self._explain(*self._states, jnp.asarray(images), jnp.asarray(target, jnp.int32))
        view_logits, tumor_logits, feature, cam, chosen, pooled = (np.asarray(o) for o in outs)
        return Explained(view_logits, tumor_logits, feature.astype(np.float32), cam.astype(np.float32), chosen,
                         pooled.astype(np.float32))

    def warm_up(self) -> None:
        self(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))


def _jet_lut() -> np.ndarray:
    """256x3 uint8 'jet'-like colour table (blue → cyan → yellow → red), no matplotlib import at serve time."""
    x = np.linspace(0.0, 1.0, 256)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.rint(np.stack([r, g, b], axis=1) * 255).astype(np.uint8)


_LUT = _jet_lut()


def heatmap_on_original(cam: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
    """Coarse map [h, w] in model-input coordinates → float [H, W] in [0, 1] on the original slice.

    `to_model_input` centred the slice in a black square before resizing; invert that: upsample to the
    square's side, then crop the padding away.
    """
    height, width = original_hw
    side = max(height, width)
    peak = float(cam.max())
    norm = cam / peak if peak > 0 else np.zeros_like(cam)
    square = Image.fromarray(norm.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BICUBIC)
    top, left = (side - height) // 2, (side - width) // 2
    return np.clip(np.asarray(square)[top:top + height, left:left + width], 0.0, 1.0)


def _fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return rgb
    # Strip by strip (same bytes as one PIL call): a full-size PIL copy of a large upload would cost 4 B/px.
    return resize_rgb(rgb, max(1, round(w * scale)), max(1, round(h * scale)))


def overlay(rgb: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heat map (same H, W) over the slice as a colour map."""
    rgb = np.asarray(rgb, np.uint8)
    if rgb.shape[:2] != heat.shape:
        raise ValueError(f"heat map {heat.shape} does not match image {rgb.shape[:2]}")
    colour = _LUT[np.rint(heat * 255).astype(np.uint8)].astype(np.float32)
    # Weight the colour by the heat itself so cold regions keep the original slice visible.
    a = alpha * np.sqrt(heat)[..., None]
    return np.rint(rgb.astype(np.float32) * (1 - a) + colour * a).astype(np.uint8)


def gradcam_overlay(rgb: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45, max_side: int = 512) -> np.ndarray:
    """Original slice (uint8 HxWx3) + its coarse Grad-CAM → overlay image (uint8), at most `max_side` px.

    The slice is shrunk for display first (a huge upload stays cheap); the pad-to-square geometry is
    scale-invariant, so mapping the map onto the shrunk slice is the same as onto the original.
    """
    shown = _fit(np.asarray(rgb, np.uint8), max_side)
    return overlay(shown, heatmap_on_original(cam, shown.shape[:2]), alpha=alpha)
