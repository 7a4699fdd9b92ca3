"""Robust image decoding shared by training and the web app.

Every input (file path, raw bytes or a PIL image) becomes uint8 RGB HxWx3, or an
ImageDecodeError whose message can be shown to a user as-is. Nothing else escapes: Pillow's
plugins raise many exception types on crafted files (TypeError, KeyError, struct.error, ...),
and each becomes an ImageDecodeError naming the stage that failed. Messages name a file by its
base name only, never by a server path.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from braintumor_flax.data.resize import pad_resize_square, resize_rgb

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_SIDE = 65_535  # JPEG's own limit; with the strip resize a long side costs O(side x model size)
# The formats the app names (JPG, PNG, TIFF, BMP, GIF, WebP; Pillow's JPEG opener itself turns camera
# JPEGs with extra pictures into MPO). Everything else (EPS would start Ghostscript, and dozens of rarely
# used plugins) is never tried.
ALLOWED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP")
ACCEPTED_NAMES = "JPEG, PNG, TIFF, BMP, GIF or WebP"
STRIP_PIXELS = 1 << 20  # colour conversion runs on strips of this many pixels: temporaries stay small
ImageSource = str | Path | bytes | bytearray | Image.Image
# Called with the header's (width, height) before any pixel is decoded; it may raise ImageDecodeError
# (a request's budget is spent) and holds its context while the pixels are decoded and converted.
Admit = Callable[[int, int], contextlib.AbstractContextManager[None]]


class ImageDecodeError(ValueError):
    """An input that cannot be turned into a single 2-D RGB image; the message says why.

    `reason` is the message without the leading source name (for a row that already names the file).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


def _fail(name: str, reason: str) -> ImageDecodeError:
    return ImageDecodeError(f"{name}: {reason}", reason)


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 160 else text[:159] + "…"


def decode_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
                 formats: tuple[str, ...] = ALLOWED_FORMATS, admit: Admit | None = None) -> np.ndarray:
    """Decode `source` to a contiguous uint8 RGB array of shape (H, W, 3); any failure is an ImageDecodeError."""
    name = _describe(source)
    # DecompressionBombWarning (PIL's soft limit) must not slip through as a mere warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(source, name, max_pixels, max_side, formats, admit)
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _fail(name, f"image too large ({exc})") from exc
        except MemoryError as exc:
            raise _fail(name, "image too large to decode in memory") from exc
        except Exception as exc:  # noqa: BLE001 - the last line of defence: no Pillow error reaches a caller
            raise _fail(name, f"cannot decode this image ({_short(exc)})") from exc


def _decode(source: ImageSource, name: str, max_pixels: int, max_side: int, formats: tuple[str, ...],
            admit: Admit | None) -> np.ndarray:
    im = _open(source, name, formats)
    try:
        _check_header(im, name, max_pixels, max_side)
        with admit(*im.size) if admit is not None else contextlib.nullcontext():
            try:
                im.load()  # truncated or corrupt pixel data fails here
            except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, KeyError ...
                raise _fail(name, f"corrupt or truncated image data ({_short(exc)})") from exc
            orientation = _orientation(im)
            rgb = _to_rgb(im, name)
            if im is not source:
                im.close()  # frees the decoded pixels before the orientation copy
            return _orient(rgb, orientation)
    finally:
        if im is not source:
            im.close()


def to_model_input(rgb: np.ndarray, size: int) -> np.ndarray:
    """Pad to a centred black square, then resize (PIL bilinear, antialiased) to size x size x 3.

    The same bytes as padding and calling PIL once, but strip by strip (`braintumor_flax.data.resize`): the
    square of side max(h, w) is never allocated, so a long thin image costs O(max(h, w) x size) bytes.
    """
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
    if h == w:
        return np.ascontiguousarray(arr) if side == size else resize_rgb(arr, size, size)
    return pad_resize_square(np.ascontiguousarray(arr), size)


def _describe(source: ImageSource) -> str:
    if isinstance(source, str | Path):
        return Path(source).name or "file"  # the base name only: server folders are nobody's business
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    return "<PIL image>"


def _open(source: ImageSource, name: str, formats: tuple[str, ...]) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise _fail(name, "file not found (an upload may have expired; send it again)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _fail(name, f"cannot read file ({exc.strerror or type(exc).__name__})") from exc
    elif isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        raise TypeError(f"unsupported image source type {type(source).__name__}")
    if not data:
        raise _fail(name, "empty file (0 bytes)")
    try:
        # Image.open reads only the header; pixel data is decoded by load().
        return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError as exc:
        raise _fail(name, f"not a recognised image format (accepted: {ACCEPTED_NAMES})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - header parsers raise anything on crafted input
        raise _fail(name, f"cannot read image header ({_short(exc)})") from exc


def _check_header(im: Image.Image, name: str, max_pixels: int, max_side: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise _fail(name, f"image has zero size ({w}x{h})")
    if max(w, h) > max_side:
        raise _fail(name, f"image too large ({w}x{h} px; the longer side may be at most {max_side:,} px)")
    if w * h > max_pixels:
        raise _fail(name, f"image too large ({w}x{h} = {w * h:,} pixels; limit {max_pixels:,})")
    try:
        n_frames = int(getattr(im, "n_frames", 1))  # TIFF walks its page chain here: may raise on crafted files
    except Exception as exc:  # noqa: BLE001
        raise _fail(name, f"corrupt image structure ({_short(exc)})") from exc
    if n_frames > 1:
        raise _fail(name, f"has {n_frames} frames; upload a single 2-D slice")


def _orientation(im: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1..8, as ImageOps.exif_transpose reads it; 1 when broken or absent."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply the orientation on the array (the same pixels as PIL's transpose, without a 4-byte PIL copy)."""
    views = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270 (90 degrees clockwise)
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
        8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90 (counter-clockwise)
    }
    view = views.get(orientation)
    return rgb if view is None else np.ascontiguousarray(view(rgb))


def _strips(im: Image.Image) -> Iterator[tuple[int, int, Image.Image]]:
    """(first row, end row, tile) covering the image; pixel-wise conversions give the same bytes per tile."""
    w, h = im.size
    rows = max(1, STRIP_PIXELS // w)
    if rows >= h:
        yield 0, h, im
        return
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        yield y0, y1, im.crop((0, y0, w, y1))


def _grey_values(tile: Image.Image) -> np.ndarray:
    arr = np.asarray(tile).astype(np.float64)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
    mode = im.mode
    w, h = im.size
    out = np.empty((h, w, 3), np.uint8)
    if mode.startswith("I") or mode == "F":
        # 16/32-bit and float scans: stretch the actual range to 0..255 (clipping would saturate).
        lo, hi = np.inf, -np.inf
        for _, _, tile in _strips(im):
            values = _grey_values(tile)
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        for y0, y1, tile in _strips(im):
            values = _grey_values(tile)
            grey = np.zeros(values.shape, np.uint8) if hi <= lo else np.rint((values - lo) * (255.0 / (hi - lo)))
            out[y0:y1] = grey.astype(np.uint8)[:, :, None]
        return out
    if mode == "P":
        target = "RGBA" if "transparency" in im.info else "RGB"
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        target = "RGBA"
    elif mode in ("1", "L"):
        target = "L"
    else:
        target = "RGB"  # RGB, CMYK, YCbCr, LAB, HSV, RGBX ...
    for y0, y1, tile in _strips(im):
        try:
            converted = tile.convert(target)
        except (OSError, ValueError) as exc:
            raise _fail(name, f"unsupported colour mode {mode!r} ({exc})") from exc
        if target == "RGBA":
            # Composite on black: transparent background is "no signal" in an MRI slice.
            rgba = np.asarray(converted, dtype=np.float32)
            out[y0:y1] = np.rint(rgba[..., :3] * (rgba[..., 3:4] / 255.0)).astype(np.uint8)
        elif target == "L":
            out[y0:y1] = np.asarray(converted, dtype=np.uint8)[:, :, None]
        else:
            out[y0:y1] = np.asarray(converted, dtype=np.uint8)
    return out
