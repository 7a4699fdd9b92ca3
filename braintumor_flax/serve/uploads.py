"""Batch inputs (many files and/or .zip archives) → named images, and batch results → table, counts, CSV.

Archives are read in memory, member by member: no member is ever extracted to disk, and member names
are display labels only, never paths. Zip bombs are stopped by limits on member count, on each member's
size and on the total uncompressed size, enforced on the bytes actually read (declared sizes can lie).
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import time
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braintumor_flax.data.imageio import ImageDecodeError
from braintumor_flax.labels import PLANES, TUMOR_CLASSES

MAX_BATCH_IMAGES = 200  # images per batch request (files + archive members)
# Checked from the archive's end record before its directory is parsed: zipfile builds one ZipInfo per
# entry (50,000 entries ≈ 0.6 s and 37 MB), so a huge directory is refused unread.
MAX_ZIP_ENTRIES = 1000  # entries per archive (folders and metadata files included)
MAX_ZIP_DIRECTORY_BYTES = 512 * 1024  # the central directory (an end record can understate the count)
MAX_ZIP_MEMBER_BYTES = 20 * 1024 * 1024  # one image inside an archive
MAX_ZIP_TOTAL_BYTES = 256 * 1024 * 1024  # everything read out of the archives of one request
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})


log = logging.getLogger(__name__)


class BatchError(ValueError):
    """The request as a whole is unusable (e.g. too many images); shown to the user as-is."""


@dataclass
class BatchItem:
    name: str  # display label only
    data: bytes | None = None  # archive members (read in memory)
    path: str | None = None  # an upload already on disk (Gradio's own cache file)
    error: str | None = None
    counted: bool = True  # False: a notice row (hidden or metadata file), not an image the limit counts


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


def _directory_problem(fp: io.BufferedIOBase | io.BytesIO) -> str | None:
    """Why the archive's directory is not read (too many entries, too large), from its end record only."""
    end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]  # stdlib helper; handles zip64 end records
    if end is None:
        return None  # not a zip: ZipFile says so below
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > MAX_ZIP_ENTRIES:
        return f"archive lists {entries:,} entries; at most {MAX_ZIP_ENTRIES:,} are read (split it)"
    if size > MAX_ZIP_DIRECTORY_BYTES:
        return (f"archive directory is {size / 2**10:,.0f} KB; at most {MAX_ZIP_DIRECTORY_BYTES / 2**10:,.0f} KB "
                "is read (split the archive)")
    return None


def _open_archive(data: bytes | Path) -> tuple[zipfile.ZipFile | None, str | None]:
    fp = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")  # noqa: SIM115 - ZipFile owns it
    try:
        problem = _directory_problem(fp)
        if problem is None:
            archive = zipfile.ZipFile(fp)
            if len(archive.infolist()) <= MAX_ZIP_ENTRIES:
                return archive, None
            problem = f"archive has more than {MAX_ZIP_ENTRIES:,} entries (split it)"
            archive.close()
    except Exception as exc:  # noqa: BLE001 - a crafted directory can raise struct.error, IndexError ...
        problem = f"not a readable zip archive ({type(exc).__name__}: {exc})"[:200]
    fp.close()
    return None, problem


def _zip_members(data: bytes | Path, label: str, budget: list[int]) -> Iterator[BatchItem]:
    """Image members of one archive, in archive order; `budget` = [bytes left] shared by the request."""
    archive, problem = _open_archive(data)
    if archive is None:
        yield BatchItem(label, error=problem)
        return
    with archive:
        for info in archive.infolist():
            inner = f"{label}/{display_name(info.filename)}"
            # Names made on Windows use backslashes ("..\\..\\x.png"): its base name is "x.png".
            path = info.filename.replace("\\", "/")
            base = path.rstrip("/").rsplit("/", 1)[-1]
            if not path:
                yield BatchItem(inner, error="archive member without a name; skipped", counted=False)
                continue
            if path.endswith("/"):
                continue  # folders are not images anyone sent
            if path.startswith("__MACOSX/") or "/__MACOSX/" in path:
                continue  # the metadata folder macOS adds to every archive it makes (documented)
            if base.startswith("."):
                yield BatchItem(inner, error="hidden file (name starts with '.'); skipped", counted=False)
                continue
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
            except Exception as exc:  # noqa: BLE001 - zlib.error, BadZipFile, NotImplementedError (method) ...
                yield BatchItem(inner, error=f"cannot read archive member ({type(exc).__name__}: {exc})"[:200])
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
            try:
                items.extend(_zip_members(source if isinstance(source, bytes) else Path(source), label, budget))
            except Exception as exc:  # noqa: BLE001 - members read so far keep their rows; the rest is one row
                items.append(BatchItem(label, error=f"archive could not be read further ({type(exc).__name__})"))
        elif isinstance(source, bytes):
            items.append(BatchItem(label, data=source))
        else:
            items.append(BatchItem(label, path=str(source)))
        if sum(item.counted for item in items) > MAX_BATCH_IMAGES:
            raise BatchError(f"a batch may hold at most {MAX_BATCH_IMAGES} images; this one has more "
                             "(split it into several requests)")
    return items


def decode_items(items: list[BatchItem], decode: Callable[[Any], Any], *,
                 deadline: float | None = None) -> list[tuple[str, Any]]:
    """Decode each item with `decode` (path or bytes → RGB or a prepared model input); a failure, of any
    kind, becomes that row's error message and the rest of the batch carries on. Past `deadline`
    (time.monotonic()), the remaining images are not decoded and their rows say so."""
    out: list[tuple[str, Any]] = []
    for item in items:
        if item.error is not None:
            out.append((item.name, item.error))
            continue
        if deadline is not None and time.monotonic() > deadline:
            out.append((item.name, "not analysed: the request reached its time limit; send this image again "
                                   "in a smaller batch"))
            continue
        source = item.data if item.data is not None else item.path
        item.data = None  # the member's bytes are not needed once decoded
        try:
            out.append((item.name, decode(source)))
        except ImageDecodeError as exc:
            out.append((item.name, exc.reason))
        except MemoryError:
            out.append((item.name, "image too large to decode in memory"))
        except Exception:  # noqa: BLE001 - one bad item must not abort the batch; the log keeps the details
            log.exception("unexpected error decoding a batch item")
            out.append((item.name, "could not be decoded (unexpected internal error; reported in the server log)"))
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
               + ["ood", "ood_score", "tumour_area_px", "note"])


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
                       + [int(flagged), f"{r.ood.score:.3f}",
                          "" if r.tumor_area_px is None else r.tumor_area_px, "; ".join(r.ood.reasons)])
            writer.writerow([_csv_safe(v) for v in row])
    return path
