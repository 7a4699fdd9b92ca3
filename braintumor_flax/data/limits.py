"""What one request may cost, decided from image headers before any pixel is decoded.

Memory of a decode is about 8 bytes per pixel at its peak (Pillow's 4-byte pixels + our 3-byte RGB array
+ small strips; measured in `benchmarks/bench_soak.py`), so the per-image pixel limit bounds one request;
a per-request pixel budget bounds a batch's decoding work; and images above BIG_DECODE_PIXELS decode one
at a time across the whole server, so two concurrent requests cannot both be at their peak.
Shapes no MRI slice has (very elongated, tiny) are answered, but flagged as out of distribution with a
plain reason.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from braintumor_flax.data.imageio import ImageDecodeError

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per image file (a 16-bit 4k x 4k scan fits)
MAX_PIXELS = 4096 * 4096  # per image, from the header: about 8 B/px at peak ⇒ ~135 MB
MAX_SIDE = 65_535  # longer side, from the header (the strip resize costs O(side x model size) only)
REQUEST_PIXEL_BUDGET = 256 * 1024 * 1024  # decoded pixels per request (≈ 1,000 slices of 512², 16 of 4096²)
BIG_DECODE_PIXELS = 2048 * 2048  # above this, decodes take turns (one at a time per process)

# Out-of-distribution shapes. Every training slice (13,023 BRISC + Kaggle images) has an aspect ratio
# under 2.0 and a shorter side of at least 130 px even after downscaling to 256 px.
MAX_ASPECT = 3.0
MIN_SIDE = 64

_big_decode = threading.BoundedSemaphore(1)


class BudgetError(ImageDecodeError):
    """The request's decoding budget is spent (shown to the user as-is)."""


def shape_reasons(height: int, width: int) -> list[str]:
    """Plain reasons why an image of this shape cannot be a brain MRI slice (empty: plausible shape)."""
    reasons = []
    long, short = max(height, width), max(1, min(height, width))
    if long / short > MAX_ASPECT:
        reasons.append(f"the image is {width} x {height} px, an aspect ratio of {long / short:,.1f}:1; "
                       f"MRI slices are close to square (at most {MAX_ASPECT:g}:1 here)")
    if min(height, width) < MIN_SIDE:
        reasons.append(f"the image is only {width} x {height} px; a readable slice needs at least "
                       f"{MIN_SIDE} px on each side")
    return reasons


class RequestBudget:
    """Pixels one request may still decode; `admit` is called with each image's header size."""

    def __init__(self, pixels: int = REQUEST_PIXEL_BUDGET):
        self.total = pixels
        self.left = pixels
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def admit(self, width: int, height: int) -> Iterator[None]:
        pixels = width * height
        with self._lock:
            if pixels > self.left:
                raise BudgetError(f"this request has used its decoding budget ({self.total / 2**20:,.0f} million "
                                  "pixels); send the remaining images in another request")
            self.left -= pixels
        if pixels <= BIG_DECODE_PIXELS:
            yield
            return
        with _big_decode:  # large decodes take turns: the server's peak stays one large image
            yield
