"""Bilinear resizing with bounded temporaries, bit-identical to one PIL `resize` call.

PIL resamples in two separable passes (horizontal, then vertical) with a uint8 image in between, and
skips a pass whose axis keeps its length. So running the horizontal pass strip by strip (each row is
resampled on its own), then the vertical pass on the narrow intermediate, gives the same bytes as the
one-shot call while never holding more than a few MB beyond the input and the output. For the
pad-to-square step this also means the black square of side max(h, w) is never allocated: a
1 x 65,000 px image costs about 25 MB instead of 12 GB.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

STRIP_BYTES = 4 << 20  # one strip's PIL image (4 bytes per RGB pixel); small next to any real budget
_BILINEAR = Image.Resampling.BILINEAR


def _rows_per_strip(width: int) -> int:
    return max(1, STRIP_BYTES // (4 * max(width, 1)))


def horizontal_pass(arr: np.ndarray, out_w: int, *, pad_w: int | None = None) -> np.ndarray:
    """Each row of `arr` (uint8 H x W x 3), centred in a black row of `pad_w` >= W px, resampled to `out_w` px.

    Equal to the first pass of PIL's bilinear resize of the padded image (rows are independent).
    """
    h, w = arr.shape[:2]
    pad_w = w if pad_w is None else pad_w
    left = (pad_w - w) // 2
    out = np.empty((h, out_w, 3), np.uint8)
    rows = _rows_per_strip(pad_w)
    buf = np.zeros((min(rows, h), pad_w, 3), np.uint8) if pad_w != w else None
    for y0 in range(0, h, rows):
        strip = arr[y0:y0 + rows]
        n = strip.shape[0]
        if buf is not None:
            buf[:n, left:left + w] = strip  # the padding columns stay black
            strip = buf[:n]
        tile = Image.fromarray(np.ascontiguousarray(strip))
        out[y0:y0 + n] = np.asarray(tile.resize((out_w, n), _BILINEAR) if out_w != pad_w else tile)
    return out


def resize_rgb(arr: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """`np.asarray(Image.fromarray(arr).resize((out_w, out_h), BILINEAR))` for uint8 H x W x 3, strip by strip."""
    h, w = arr.shape[:2]
    if (out_w, out_h) == (w, h):
        return np.array(arr, np.uint8, copy=True)
    inter = horizontal_pass(arr, out_w) if out_w != w else arr
    if out_h == h:
        return np.ascontiguousarray(inter)
    return np.asarray(Image.fromarray(np.ascontiguousarray(inter)).resize((out_w, out_h), _BILINEAR))


def pad_resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre uint8 H x W x 3 in a black square of side max(H, W), resize to size x size (bilinear).

    Same bytes as padding first and calling PIL once; memory O(max(H, W) x size), not O(max(H, W)^2).
    """
    h, w = arr.shape[:2]
    side = max(h, w)
    inter = horizontal_pass(arr, size, pad_w=side)  # h x size
    if side != h:
        tall = np.zeros((side, size, 3), np.uint8)  # padding rows: the horizontal pass of a black row is black
        top = (side - h) // 2
        tall[top:top + h] = inter
        inter = tall
    if side == size:
        return inter
    return np.asarray(Image.fromarray(inter).resize((size, size), _BILINEAR))
