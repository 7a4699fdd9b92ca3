"""Batch inputs (many files and/or .zip archives) → named images, and batch results → table, counts, CSV.

Archives are read in memory, member by member: no member is ever extracted to disk, and member names
are display labels only, never paths. Zip bombs are stopped by limits on member count, on each member's
size and on the total uncompressed size, enforced on the bytes actually read (declared sizes can lie).
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from braintumor_flax.data.imageio import ImageDecodeError
from braintumor_flax.labels import PLANES, TUMOR_CLASSES

MAX_BATCH_IMAGES = 200  # images per batch request (files + archive members)
MAX_ZIP_MEMBER_BYTES = 20 * 1024 * 1024  # one image inside an archive
MAX_ZIP_TOTAL_BYTES = 256 * 1024 * 1024  # everything read out of the archives of one request
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})


class BatchError(ValueError):
    """The request as a whole is unusable (e.g. too many images); shown to the user as-is."""


@dataclass
class BatchItem:
    name: str  # display label only
    data: bytes | None = None  # archive members (read in memory)
    path: str | None = None  # an upload already on disk (Gradio's own cache file)
    error: str | None = None


def display_name(name: str, limit: int = 120) -> str:
    """A client-supplied file or member name made safe to show (and to put in a CSV cell)."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/"))
    name = "".join(ch if ch.isprintable() else "?" for ch in name).strip() or "unnamed"
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _is_zip(head: bytes) -> bool:
    return head[:4] in ZIP_MAGIC


def _read_limited(member: zipfile.ZipExtFile, limit: int) -> bytes:
    """At most `limit` bytes (+1 to detect overflow), whatever the header claims."""
    return member.read(limit + 1)


def _zip_members(data: bytes | Path, label: str, budget: list[int]) -> Iterator[BatchItem]:
    """Image members of one archive, in archive order; `budget` = [bytes left] shared by the request."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        yield BatchItem(label, error=f"not a readable zip archive ({exc})")
        return
    with archive:
        for info in archive.infolist():
            inner = f"{label}/{display_name(info.filename)}"
            base = os.path.basename(info.filename.rstrip("/"))
            if info.is_dir() or base.startswith(".") or "__MACOSX/" in info.filename:
                continue  # folders and macOS/hidden metadata files are not images anyone sent
            if Path(base).suffix.lower() == ".zip":
                yield BatchItem(inner, error="archives inside archives are not opened")
                continue
            if info.flag_bits & 0x1:
                yield BatchItem(inner, error="encrypted archive member")
                continue
            if info.file_size > MAX_ZIP_MEMBER_BYTES:
                yield BatchItem(inner, error=f"member is {info.file_size / 2**20:.0f} MB uncompressed; "
                                             f"the limit is {MAX_ZIP_MEMBER_BYTES / 2**20:.0f} MB")
                continue
            if info.file_size > budget[0]:
                yield BatchItem(inner, error=f"archive total exceeds {MAX_ZIP_TOTAL_BYTES / 2**20:.0f} MB "
                                             "uncompressed; remaining members skipped")
                return
            try:
                with archive.open(info) as member:
                    blob = _read_limited(member, min(MAX_ZIP_MEMBER_BYTES, budget[0]))
            except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, EOFError, NotImplementedError) as exc:
                yield BatchItem(inner, error=f"cannot read archive member ({exc})")
                continue
            if len(blob) > min(MAX_ZIP_MEMBER_BYTES, budget[0]):
                # The header understated the size: a bomb, or the request's total budget is spent.
                budget[0] = 0
                yield BatchItem(inner, error="member decompresses to more than its declared size or the "
                                             f"{MAX_ZIP_TOTAL_BYTES / 2**20:.0f} MB archive limit")
                return
            budget[0] -= len(blob)
            yield BatchItem(inner, data=blob)


def collect(files: list[tuple[str, str | Path | bytes]]) -> list[BatchItem]:
    """(display name, uploaded temp path or bytes) per upload → one item per image, archives expanded.

    Raises BatchError when the request holds more than MAX_BATCH_IMAGES images.
    """
    items: list[BatchItem] = []
    budget = [MAX_ZIP_TOTAL_BYTES]
    for name, source in files:
        label = display_name(name)
        if isinstance(source, bytes):
            head = source[:4]
        else:
            try:
                with open(source, "rb") as f:
                    head = f.read(4)
            except OSError as exc:
                items.append(BatchItem(label, error=f"cannot read upload ({exc.strerror or exc})"))
                continue
        if _is_zip(head):
            # Open the upload in place (zipfile seeks): the archive is never loaded whole into memory.
            items.extend(_zip_members(source if isinstance(source, bytes) else Path(source), label, budget))
        elif isinstance(source, bytes):
            items.append(BatchItem(label, data=source))
        else:
            items.append(BatchItem(label, path=str(source)))
        if len(items) > MAX_BATCH_IMAGES:
            raise BatchError(f"a batch may hold at most {MAX_BATCH_IMAGES} images; this one has more "
                             "(split it into several requests)")
    return items


def decode_items(items: list[BatchItem], decode: Callable[[Any], np.ndarray]) -> list[tuple[str, np.ndarray | str]]:
    """Decode each item with `decode` (path or bytes → RGB); a failure becomes that row's error message."""
    out: list[tuple[str, np.ndarray | str]] = []
    for item in items:
        if item.error is not None:
            out.append((item.name, item.error))
            continue
        source = item.data if item.data is not None else item.path
        try:
            out.append((item.name, decode(source)))
        except ImageDecodeError as exc:
            out.append((item.name, _strip_source(str(exc))))
    return out


def _strip_source(message: str) -> str:
    """ImageDecodeError messages start with the source ("/tmp/gradio/.../x.jpg: ..." or "<123 bytes>: ...");
    the row already names the file, and server paths are not the client's business."""
    head, sep, tail = message.partition(": ")
    return tail if sep and (head.startswith("<") or "/" in head or "\\" in head) else message


# ---------------------------------------------------------------------------------------------
# results → table, counts, CSV

TABLE_HEADERS = ["file", "status", "plane", "plane confidence", "tumour", "tumour confidence", "note"]
CSV_HEADERS = (["file", "status", "plane", "plane_confidence"] + [f"p_{p}" for p in PLANES]
               + ["tumor", "tumor_confidence"] + [f"p_{t}" for t in TUMOR_CLASSES]
               + ["ood", "ood_score", "note"])


def table_rows(results: list[Any]) -> list[list[Any]]:
    """One display row per result (SliceResult-like objects)."""
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.name, "error", "", "", "", "", r.error])
        elif r.is_ood:
            rows.append([r.name, "not MRI?", "", "", "", "", "; ".join(r.ood.reasons)])
        else:
            rows.append([r.name, "ok", r.plane, round(r.plane_probs[r.plane], 3), r.tumor,
                         round(r.tumor_probs[r.tumor], 3), ""])
    return rows


def counts(results: list[Any]) -> dict[str, dict[str, int]]:
    """Per-class counts (as the original page showed), OOD and errors counted apart."""
    ok = [r for r in results if r.ok and not r.is_ood]
    tumour = Counter(r.tumor for r in ok)
    plane = Counter(r.plane for r in ok)
    return {
        "tumor": {t: tumour.get(t, 0) for t in TUMOR_CLASSES},
        "plane": {p: plane.get(p, 0) for p in PLANES},
        "other": {"analysed": len(ok), "not_mri": sum(1 for r in results if r.ok and r.is_ood),
                  "errors": sum(1 for r in results if not r.ok), "total": len(results)},
    }


def _csv_safe(value: Any) -> Any:
    """Defuse spreadsheet formula injection through client-chosen file names."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_csv(results: list[Any], folder: str | Path | None = None) -> Path:
    """Results as CSV in a fresh private temp folder under a fixed name (nothing chosen by the client)."""
    out_dir = Path(tempfile.mkdtemp(prefix="braintumor_csv_", dir=folder))
    path = out_dir / "braintumor_predictions.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADERS)
        for r in results:
            if not r.ok:
                row = [r.name, "error"] + [""] * (len(CSV_HEADERS) - 3) + [r.error]
            else:
                flagged = r.is_ood
                row = ([r.name, "not_mri" if flagged else "ok", "" if flagged else r.plane,
                        f"{r.plane_probs[r.plane]:.4f}"] + [f"{r.plane_probs[p]:.4f}" for p in PLANES]
                       + ["" if flagged else r.tumor, f"{r.tumor_probs[r.tumor]:.4f}"]
                       + [f"{r.tumor_probs[t]:.4f}" for t in TUMOR_CLASSES]
                       + [int(flagged), f"{r.ood.score:.3f}", "; ".join(r.ood.reasons)])
            writer.writerow([_csv_safe(v) for v in row])
    return path
