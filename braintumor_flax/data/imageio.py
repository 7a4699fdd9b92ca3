"""Robust image decoding shared by training and the web app.

Every input (file path, raw bytes or a PIL image) becomes uint8 RGB HxWx3, or an
ImageDecodeError whose message can be shown to a user as-is.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
ImageSource = str | Path | bytes | bytearray | Image.Image


class ImageDecodeError(ValueError):
    """An input that cannot be turned into a single 2-D RGB image; the message says why."""


def decode_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `source` to a contiguous uint8 RGB array of shape (H, W, 3)."""
    name = _describe(source)
    # DecompressionBombWarning (PIL's soft limit) must not slip through as a mere warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = _open(source, name)
            _check_header(im, name, max_pixels)
            try:
                im.load()  # truncated or corrupt pixel data fails here
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise ImageDecodeError(f"{name}: corrupt or truncated image data ({exc})") from exc
            with contextlib.suppress(Exception):  # a broken EXIF block should not lose the image
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im, name)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"{name}: image too large ({exc})") from exc


def to_model_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """Pad to a centred black square, then resize (PIL bilinear, antialiased) to size x size x 3."""
    arr = np.asarray(rgb)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 HxWx3 (or HxW) array, got {arr.dtype} {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("empty image")
    side = max(h, w)
    if h != w:
        square = np.zeros((side, side, 3), np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = arr
        arr = square
    if side == size:
        return np.ascontiguousarray(arr)
    out = Image.fromarray(arr, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def _describe(source: ImageSource) -> str:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    return "<PIL image>"


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError(f"file not found: {path}")
        data = path.read_bytes()
    elif isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        raise TypeError(f"unsupported image source type {type(source).__name__}")
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        # Image.open reads only the header; pixel data is decoded by load().
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{name}: cannot read image header ({exc})") from exc


def _check_header(im: Image.Image, name: str, max_pixels: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{name}: image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageDecodeError(f"{name}: image too large ({w}x{h} = {w * h:,} pixels; limit {max_pixels:,})")
    n_frames = getattr(im, "n_frames", 1)
    if n_frames > 1:
        raise ImageDecodeError(f"{name}: has {n_frames} frames; upload a single 2-D slice")


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on black: transparent background is "no signal" in an MRI slice.
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        return np.ascontiguousarray(np.rint(rgb).astype(np.uint8))
    if mode.startswith("I") or mode == "F":
        # 16/32-bit and float scans: stretch the actual range to 0..255 (clipping would saturate).
        arr = np.asarray(im).astype(np.float64)
        if arr.ndim == 3:
            arr = arr[..., 0]
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        grey = np.zeros(arr.shape, np.uint8) if hi <= lo else np.rint((arr - lo) * (255.0 / (hi - lo)))
        grey = grey.astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("1", "L"):
        grey = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    try:
        rgb = im.convert("RGB")  # RGB, CMYK, YCbCr, LAB, HSV, RGBX ...
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: unsupported colour mode {mode!r} ({exc})") from exc
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
