"""Grad-CAM display: a coarse map (computed by `models.forward`, explain=True) mapped back onto the slice, and
the segmenter's outline drawn over it.

The map is upsampled to the model input, mapped back through the pad-to-square step onto the original
slice and overlaid as a colour heat map.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from braintumor_flax.data.resize import resize_rgb


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


OUTLINE_RGB = (0, 255, 0)


def draw_outline(rgb: np.ndarray, mask: np.ndarray, *, colour: tuple[int, int, int] = OUTLINE_RGB,
                 width: int = 2) -> np.ndarray:
    """The boundary of a bool mask (same H, W), `width` px wide, drawn over an image (a copy)."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {rgb.shape[:2]}")
    inner = mask.copy()
    for _ in range(width):  # erode by one pixel (4-neighbourhood) per step; what it removes is the outline
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    out = np.array(rgb, np.uint8, copy=True)
    out[mask & ~inner] = colour
    return out
