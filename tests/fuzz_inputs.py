"""Seeded mutation fuzzing of the decoder and the archive reader (shared by tests/test_fuzz.py and
benchmarks/bench_fuzz.py).

Seeds are small valid files of every accepted format (several TIFF flavours: their parser is the
largest), plus zip archives of images. Each case mutates one seed with a few random edits biased
towards the header, where the parsers branch. The oracle: `decode_image` returns uint8 H x W x 3 or
raises `ImageDecodeError` with a non-empty reason; `batch.collect` + `batch.decode_items` give one
row per member (an array or a message) or raise `BatchError`. Nothing else may come out.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable

import numpy as np
from PIL import Image

from braintumor_flax.data.imageio import ImageDecodeError, decode_image, to_model_input
from braintumor_flax.serve import uploads as batch

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF)
INTERESTING_WORDS = (0, 1, 0xFFFF, 0x7FFF, 0x8000, 0xFFFFFFFF, 0x7FFFFFFF, 65_000, 20_000)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _slice_like(h: int = 24, w: int = 20) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((np.hypot(y - h / 2, x - w / 2) < min(h, w) / 2.5) * 160 + (x * 3 + y) % 40).astype(np.uint8)


def seeds() -> dict[str, list[bytes]]:
    """kind → small valid inputs (deterministic)."""
    grey = Image.fromarray(_slice_like())
    rgb = Image.fromarray(np.dstack([_slice_like(), _slice_like()[::-1], _slice_like()[:, ::-1]]))
    rgba = rgb.convert("RGBA")
    sixteen = Image.fromarray(_slice_like().astype(np.uint16) * 300)
    pages = [grey, Image.fromarray(255 - _slice_like())]
    multi = io.BytesIO()
    pages[0].save(multi, "TIFF", save_all=True, append_images=pages[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    out = {
        "png": [_encode(grey, "PNG"), _encode(rgba, "PNG"), _encode(sixteen, "PNG"),
                _encode(rgb.convert("P"), "PNG", transparency=0)],
        "jpeg": [_encode(grey, "JPEG", quality=80), _encode(rgb, "JPEG", exif=exif.tobytes()),
                 _encode(rgb, "JPEG", progressive=True), _encode(rgb.convert("CMYK"), "JPEG")],
        "tiff": [_encode(grey, "TIFF"), _encode(rgb, "TIFF", compression="tiff_lzw"),
                 _encode(sixteen, "TIFF", compression="tiff_adobe_deflate"),
                 _encode(rgba, "TIFF", compression="packbits"),
                 multi.getvalue(), _encode(Image.fromarray(_slice_like().astype(np.float32)), "TIFF")],
        "gif": [_encode(grey, "GIF"), _encode(rgb.convert("P"), "GIF", transparency=3)],
        "bmp": [_encode(grey, "BMP"), _encode(rgb, "BMP"), _encode(rgb.convert("P"), "BMP")],
        "webp": [_encode(rgb, "WEBP", quality=80), _encode(rgba, "WEBP", lossless=True)],
    }
    jpeg = out["jpeg"][0]
    zips = []
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression) as zf:
            zf.writestr("scans/a.jpg", jpeg)
            zf.writestr("b.png", out["png"][0])
            zf.writestr(".hidden.jpg", jpeg)
            zf.writestr("..\\..\\c.tiff", out["tiff"][0])
        zips.append(buf.getvalue())
    out["zip"] = zips
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """1-4 random edits; positions biased to the first 64 bytes (headers), sometimes a truncation."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not buf:
            break
        head = rng.random() < 0.6
        pos = int(rng.integers(0, min(len(buf), 64) if head else len(buf)))
        op = int(rng.integers(0, 7))
        if op == 0:  # flip one bit
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:  # a random byte
            buf[pos] = int(rng.integers(0, 256))
        elif op == 2:  # an interesting byte
            buf[pos] = INTERESTING[int(rng.integers(0, len(INTERESTING)))]
        elif op == 3:  # an interesting 16/32-bit word, either byte order (sizes, offsets, counts)
            word = INTERESTING_WORDS[int(rng.integers(0, len(INTERESTING_WORDS)))]
            width = 2 if word <= 0xFFFF and rng.random() < 0.5 else 4
            raw = (word & (2 ** (8 * width) - 1)).to_bytes(width, "big" if rng.random() < 0.5 else "little")
            buf[pos:pos + width] = raw
        elif op == 4:  # delete a run
            del buf[pos:pos + int(rng.integers(1, 32))]
        elif op == 5:  # duplicate a run elsewhere
            start = int(rng.integers(0, len(buf)))
            buf[pos:pos] = buf[start:start + int(rng.integers(1, 64))]
        else:  # truncate
            del buf[max(1, int(rng.integers(0, len(buf)))):]
    return bytes(buf)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk's CRC, so a mutation reaches the chunk parsers instead of the CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    buf, pos = bytearray(data), 8
    while pos + 12 <= len(buf):
        length = struct.unpack(">I", buf[pos:pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(buf):
            break
        buf[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(buf[pos + 4:end])))
        pos = end + 4
    return bytes(buf)


def check_image(data: bytes, *, max_pixels: int) -> str:
    """'ok' or 'error' (documented outcomes); anything else raises out of here."""
    try:
        rgb = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        assert exc.reason.strip() and str(exc).strip(), "empty error message"
        return "error"
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous, rgb.shape
    assert to_model_input(rgb, 32).shape == (32, 32, 3)
    return "ok"


def check_zip(data: bytes, *, max_pixels: int) -> str:
    try:
        items = batch.collect([("fuzz.zip", data)])
    except batch.BatchError:
        return "error"
    rows = batch.decode_items(items, lambda s: decode_image(s, max_pixels=max_pixels))
    assert len(rows) == len(items)
    for name, value in rows:
        assert isinstance(name, str) and name
        assert (isinstance(value, str) and value.strip()) or (isinstance(value, np.ndarray) and value.ndim == 3)
    return "ok" if any(isinstance(v, np.ndarray) for _, v in rows) else "error"


def case_bytes(kind: str, seed: int, case: int, pool: dict[str, list[bytes]] | None = None) -> bytes:
    """The input of one case (deterministic: reproduce any failure from its kind, seed and number)."""
    files = (pool or seeds())[kind]
    rng = np.random.default_rng([seed, case])
    data = mutate(files[int(rng.integers(0, len(files)))], rng)
    if kind == "png" and rng.random() < 0.5:
        data = fix_png_crcs(data)
    return data


# Cases that made the pre-hardening decoder (main 0d244ca) raise TypeError / SyntaxError out of Pillow.
ESCAPED_BEFORE = {"TypeError": ("tiff", 1, 26), "SyntaxError": ("tiff", 1, 7)}


def run(cases: int, seed: int = 0, *, max_pixels: int = 1 << 20,
        on_case: Callable[[str, int, bytes], None] | None = None) -> Counter:
    """Run `cases` mutated inputs spread evenly over every kind; returns outcome counts per kind.

    A failing case raises AssertionError (or whatever escaped) with the kind, case number and seed, so
    it can be reproduced: `mutate(seed_file, np.random.default_rng([seed, case]))`.
    """
    pool = seeds()
    kinds = sorted(pool)
    counts: Counter = Counter()
    for case in range(cases):
        kind = kinds[case % len(kinds)]
        data = case_bytes(kind, seed, case, pool)
        if on_case is not None:
            on_case(kind, case, data)
        try:
            outcome = (check_zip if kind == "zip" else check_image)(data, max_pixels=max_pixels)
        except BaseException as exc:
            raise AssertionError(f"{kind} case {case} (seed {seed}): {type(exc).__name__}: {exc}") from exc
        counts[(kind, outcome)] += 1
    return counts
