"""Bilinear resizing with bounded temporaries, bit-identical to one PIL `resize` call.

PIL resamples in two separable passes (horizontal, then vertical) with a uint8 image in between, and
skips a pass whose axis keeps its length. So running the horizontal pass strip by strip (each row is
resampled on its own), then the vertical pass on the narrow intermediate, gives the same bytes as the
one-shot call while never holding more than a few MB beyond the input and the output. For the
pad-to-square step this also means the black square of side max(h, w) is never allocated: a
1 x 65,000 px image costs about 25 MB instead of 12 GB. Rows that are mostly padding (a tall, thin
image) skip PIL and apply Pillow's own integer weights to the real pixels only, so CPU time is
O(pixels) too (65,000 x 1: 0.2 s instead of 34 s).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

STRIP_BYTES = 4 << 20  # one strip's PIL image (4 bytes per RGB pixel); small next to any real budget
SPARSE_ASPECT = 4  # rows padded to more than 4x their width use the sparse pass (elongated: OOD anyway)
_BILINEAR = Image.Resampling.BILINEAR


def _rows_per_strip(width: int) -> int:
    return max(1, STRIP_BYTES // (4 * max(width, 1)))


_PRECISION_BITS = 32 - 8 - 2  # libImaging/Resample.c, 8 bits per channel


def _bilinear_coeffs(in_size: int, out_size: int) -> list[tuple[int, list[int]]]:
    """(first input pixel, integer weights) per output pixel, computed exactly as Pillow's C code does
    (precompute_coeffs + normalize_coeffs_8bpc for the bilinear filter over the full box), in the same
    double-precision order, so the sums below give the same bytes as Pillow."""
    scale = filterscale = in_size / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = 1.0 * filterscale
    out = []
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        ww = 0.0
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = []
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            wgt = 1.0 - t if t < 1.0 else 0.0
            weights.append(wgt)
            ww += wgt
        if ww != 0.0:
            weights = [wgt / ww for wgt in weights]
        scale_bits = 1 << _PRECISION_BITS
        out.append((xmin, [int(-0.5 + wgt * scale_bits) if wgt < 0 else int(0.5 + wgt * scale_bits)
                           for wgt in weights]))
    return out


def _horizontal_pass_sparse(arr: np.ndarray, out_w: int, pad_w: int) -> np.ndarray:
    """`horizontal_pass` for rows that are mostly padding (a tall, thin image): only the weights that
    touch real pixels are applied, so the cost is O(H x W), not O(H x pad_w). Same integer arithmetic
    as Pillow (tested byte for byte against it)."""
    h, w = arr.shape[:2]
    left = (pad_w - w) // 2
    out = np.zeros((h, out_w, 3), np.uint8)
    for j, (xmin, weights) in enumerate(_bilinear_coeffs(pad_w, out_w)):
        lo, hi = max(xmin, left), min(xmin + len(weights), left + w)
        if lo >= hi:
            continue  # only padding under this output pixel: Pillow's sum is 0 as well
        acc = np.full((h, 3), 1 << (_PRECISION_BITS - 1), np.int64)
        for x in range(lo, hi):
            acc += weights[x - xmin] * arr[:, x - left].astype(np.int64)
        out[:, j] = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return out


def horizontal_pass(arr: np.ndarray, out_w: int, *, pad_w: int | None = None) -> np.ndarray:
    """Each row of `arr` (uint8 H x W x 3), centred in a black row of `pad_w` >= W px, resampled to `out_w` px.

    Equal to the first pass of PIL's bilinear resize of the padded image (rows are independent).
    """
    h, w = arr.shape[:2]
    pad_w = w if pad_w is None else pad_w
    if pad_w > SPARSE_ASPECT * w and out_w != pad_w:
        # Padding more than 3/4 of each row: PIL would resample H x pad_w pixels (a 65,000 x 1 image:
        # 4.2 billion, ~30 s); only the real ones matter.
        return _horizontal_pass_sparse(arr, out_w, pad_w)
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
