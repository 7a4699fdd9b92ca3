"""DICOM in: one file (2-D or multi-frame) or a series in a .zip → a `Volume`.

Recognised by content (the "DICM" marker at byte 128, or a preamble-less dataset that starts with a group
0002/0008 element), not by file name. Sizes are checked from the header before any pixel is decoded;
compressed transfer syntaxes are decoded by pydicom's pylibjpeg / libjpeg / openjpeg / RLE plugins.
Only the elements in `privacy.DICOM_ELEMENTS_READ` are read.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from braintumor_flax.data.medical import limits
from braintumor_flax.data.medical.privacy import quiet_pydicom_logging
from braintumor_flax.data.medical.volume import (
    MedicalFormatError,
    Volume,
    canonical,
    dicom_window,
    nearest_axis,
    percentile_window,
    spacing_of,
)

# Invalid values are not our business (we read few elements), and validation warnings quote values.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
quiet_pydicom_logging()

DEFAULT_ORIENTATION = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # rows → patient left, columns → posterior
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"}


def looks_like_dicom(head: bytes) -> bool:
    """True for a DICOM file: "DICM" at byte 128, or a raw dataset starting with a (0002|0008,xxxx) tag."""
    if head[128:132] == b"DICM":
        return True
    # Preamble-less files (old ACR-NEMA style exports): little-endian group 0x0002 or 0x0008 first, then a
    # small element number, then either a two-letter VR (explicit) or a 4-byte length (implicit).
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0:
        vr = head[4:6]
        return vr.isalpha() and vr.isupper() or head[7] == 0
    return False


@dataclasses.dataclass
class _Frame:
    pixels: np.ndarray  # [rows, cols] or [rows, cols, 3], float32, rescaled (modality units)
    position: np.ndarray | None  # Image Position (Patient), mm, LPS
    orientation: np.ndarray | None  # Image Orientation (Patient): row cosines, column cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    thickness: float | None  # Spacing Between Slices, else Slice Thickness
    window: tuple[float, float] | None  # (low, high) from Window Center / Width
    order: float  # Instance Number (or frame number): the fallback slice order


def _parse(data: bytes) -> Dataset:
    """Bytes → dataset (pixel data not decoded yet). Library messages are not passed on: they can quote
    element values."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except Exception:  # noqa: BLE001 - any parse failure is the file's fault; say so without details
        raise MedicalFormatError("not a readable DICOM file (the header is corrupt or truncated)") from None


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    try:
        value = ds.get(keyword, default)
    except Exception:  # noqa: BLE001 - an unparseable value counts as absent
        return default
    return default if value is None or value == "" else value


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple | MultiValue) else [value]


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in _values(value)], np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.all(np.isfinite(arr)) else None


def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued number (Window Center may hold several)."""
    if value is None:
        return None
    values = _values(value)
    try:
        out = float(values[0]) if values else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and np.isfinite(out) else None


def _group(ds: Dataset, index: int, sequence: str, keyword: str) -> Any:
    """An element of an enhanced multi-frame file: the frame's own functional group, else the shared one."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = _get(ds, groups)
        if seq is None or len(seq) <= i:
            continue
        inner = _get(seq[i], sequence)
        if inner is not None and len(inner):
            value = _get(inner[0], keyword)
            if value is not None:
                return value
    return None


def _element(ds: Dataset, index: int, sequence: str, keyword: str) -> Any:
    value = _group(ds, index, sequence, keyword)
    return _get(ds, keyword) if value is None else value


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


@dataclasses.dataclass
class _Header:
    rows: int
    cols: int
    frames: int
    samples: int
    photometric: str
    transfer_syntax: str


def check_header(ds: Dataset) -> _Header:
    """Everything that can refuse a file, from the header alone (nothing decoded yet)."""
    if not _has_pixels(ds):
        sop = UID(str(_get(ds, "SOPClassUID", "")))
        if not sop:
            # Lenient parsing turns garbage after a "DICM" marker into a few junk elements.
            raise MedicalFormatError("not a readable DICOM file (no image and no SOP class: corrupt header?)")
        kind = sop.name if sop.is_valid and sop.name != str(sop) else "a non-image object"
        raise MedicalFormatError(f"this DICOM file holds no image (it is {kind}); upload an image file")
    if str(_get(ds, "BurnedInAnnotation", "")).upper() == "YES":
        # Text burnt into the pixels (names, dates) would reach the images we show; we do not OCR it away.
        raise MedicalFormatError("the file states that identifying text is burnt into the image (Burned In "
                                 "Annotation = YES); it is not processed")
    try:
        rows, cols = int(_get(ds, "Rows", 0)), int(_get(ds, "Columns", 0))
        frames = int(_get(ds, "NumberOfFrames", 1) or 1)
        samples = int(_get(ds, "SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise MedicalFormatError("the image size elements (Rows, Columns, Number of Frames) are unreadable") \
            from None
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise MedicalFormatError(f"the header gives an empty image ({rows} x {cols}, {frames} frame(s))")
    limits.check_voxels(rows * cols * frames * samples, f"{frames} frame(s) of {rows} x {cols}")
    limits.check_slices(frames)
    photometric = str(_get(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in _GREY | _COLOUR:
        raise MedicalFormatError(f"photometric interpretation {photometric} is not supported (greyscale or RGB "
                                 "only)")
    meta = getattr(ds, "file_meta", None)
    ts = str(_get(meta, "TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        # No file meta (old exports): the encoding the parser found decides, as the standard's default would.
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ts = ("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1") if little else "1.2.840.10008.1.2.2"
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = UID(ts)
    uid = UID(ts)
    try:
        decoder = pydicom.pixels.get_decoder(uid)
        available = decoder.is_available
    except NotImplementedError:
        available = False
    if not available:
        name = uid.name if uid.is_transfer_syntax else "an unknown transfer syntax"
        raise MedicalFormatError(f"the pixel data is compressed as {name}, which this server cannot decode")
    return _Header(rows, cols, frames, samples, photometric, uid.name)


def _frames(ds: Dataset, header: _Header) -> list[_Frame]:
    """Decode and rescale every frame of one dataset, with its geometry and window."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception:  # noqa: BLE001 - any decoder failure: the file's pixel data is bad
        raise MedicalFormatError(f"the pixel data cannot be decoded ({header.transfer_syntax}: corrupt or "
                                 "truncated)") from None
    colour = header.samples == 3
    per_frame = pixels.ndim == (4 if colour else 3)
    stack = pixels if per_frame else pixels[None]
    if stack.shape[0] != header.frames and header.frames > 1:
        raise MedicalFormatError("the number of decoded frames does not match Number of Frames")
    out = []
    for i, raw in enumerate(stack):
        slope = _first(_element(ds, i, "PixelValueTransformationSequence", "RescaleSlope")) or 1.0
        intercept = _first(_element(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")) or 0.0
        values = raw.astype(np.float32)
        if not colour and (slope != 1.0 or intercept != 0.0):
            values = values * np.float32(slope) + np.float32(intercept)
        center = _first(_element(ds, i, "FrameVOILUTSequence", "WindowCenter"))
        width = _first(_element(ds, i, "FrameVOILUTSequence", "WindowWidth"))
        spacing = _floats(_element(ds, i, "PixelMeasuresSequence", "PixelSpacing"), 2)
        thickness = _first(_element(ds, i, "PixelMeasuresSequence", "SpacingBetweenSlices")) or \
            _first(_element(ds, i, "PixelMeasuresSequence", "SliceThickness"))
        order = _first(_get(ds, "InstanceNumber"))
        out.append(_Frame(
            pixels=values,
            position=_floats(_element(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(_element(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None and np.all(spacing > 0)
            else (1.0, 1.0),
            thickness=thickness if thickness and thickness > 0 else None,
            window=dicom_window(center, width) if center is not None and width and width > 0 and not colour
            else None,
            order=(order or 0.0) * 100_000 + i,
        ))
    return out


def _stack(frames: list[_Frame], header: _Header, source: dict[str, Any]) -> Volume:
    """Frames of one series → a canonical (RAS+) Volume: sorted by position along the slice normal."""
    shape = frames[0].pixels.shape
    if any(f.pixels.shape != shape for f in frames):
        raise MedicalFormatError("the images of this series differ in size; upload one series of equal images")
    known = all(f.orientation is not None for f in frames)
    iop = frames[0].orientation if known else DEFAULT_ORIENTATION
    assert iop is not None
    if known and any(np.max(np.abs(f.orientation - iop)) > 1e-3 for f in frames):  # type: ignore[operator]
        raise MedicalFormatError("the images of this series have different orientations (a localiser or "
                                 "several stacks?); upload one stack")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise MedicalFormatError("Image Orientation (Patient) is degenerate (its two directions are parallel)")
    normal /= np.linalg.norm(normal)
    if all(f.position is not None for f in frames):
        dist = np.array([float(f.position @ normal) for f in frames])  # type: ignore[operator]
        order = np.argsort(dist, kind="stable")
        frames = [frames[i] for i in order]
        dist = dist[order]
        gaps = np.diff(dist)
        if len(frames) > 1:
            if np.min(gaps) < 1e-3:
                raise MedicalFormatError("two images lie at the same slice position (a time series or "
                                         "repeated acquisition?); upload one stack")
            median = float(np.median(gaps))
            if np.max(np.abs(gaps - median)) > max(0.05, 0.1 * median):
                raise MedicalFormatError(f"inconsistent slice spacing: gaps from {np.min(gaps):.2f} to "
                                         f"{np.max(gaps):.2f} mm (a slice missing?)")
            step = (frames[-1].position - frames[0].position) / (len(frames) - 1)  # type: ignore[operator]
        else:
            step = normal * (frames[0].thickness or 1.0)
        origin = frames[0].position
    else:
        frames = sorted(frames, key=lambda f: f.order)
        step = normal * (frames[0].thickness or 1.0)
        origin = np.zeros(3)
    row_mm, col_mm = frames[0].pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm  # voxel axis 0 = column index (along a row)
    lps[:3, 1] = col_dir * row_mm  # voxel axis 1 = row index (down a column)
    lps[:3, 2] = step
    lps[:3, 3] = origin  # type: ignore[assignment]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS → NIfTI/nibabel RAS
    stacked = np.stack([f.pixels for f in frames], axis=0)  # [k, rows, cols(, 3)]
    data = np.moveaxis(stacked, (0, 1, 2), (2, 1, 0))  # [cols, rows, k(, 3)]
    del stacked
    data, ras, axis_map = canonical(data, affine)
    windows = {f.window for f in frames}
    if header.samples == 3:
        win, win_source = ((0.0, 255.0), "full 8-bit range (colour image)") if header_bits(source) <= 8 else \
            (percentile_window(data), f"percentile {limits.PERCENT_TEXT} (colour image)")
    elif len(windows) == 1 and None not in windows:
        win, win_source = windows.pop(), "DICOM Window Center / Width"  # type: ignore[assignment]
    else:
        why = "no window in the header" if windows == {None} else "header windows differ between slices"
        win, win_source = percentile_window(data), f"percentile {limits.PERCENT_TEXT} ({why})"
    return Volume(data=data, spacing=spacing_of(ras), window=win, window_source=win_source,
                  invert=header.photometric == "MONOCHROME1", acquired_axis=axis_map[2],
                  orientation_known=known, obliquity=nearest_axis(normal)[1] if known else 1.0,
                  source={**source, "slices_in_file": len(frames)})


def header_bits(source: dict[str, Any]) -> int:
    return int(source.get("bits_allocated", 8))


def _source(ds: Dataset, header: _Header, fmt: str) -> dict[str, Any]:
    modality = str(_get(ds, "Modality", "")).strip().upper()
    return {"format": fmt, "modality": modality if modality.isalnum() and len(modality) <= 4 else None,
            "transfer_syntax": header.transfer_syntax, "photometric": header.photometric,
            "bits_allocated": int(_get(ds, "BitsAllocated", 8) or 8)}


def read_dicom_file(source: str | Path | bytes) -> Volume:
    """One DICOM file (a 2-D image or a multi-frame stack) → Volume."""
    data = _read_bytes(source, limits.MAX_FILE_BYTES)
    if not looks_like_dicom(data[:256]):
        raise MedicalFormatError("not a DICOM file")
    ds = _parse(data)
    header = check_header(ds)
    fmt = "DICOM multi-frame" if header.frames > 1 else "DICOM"
    return _stack(_frames(ds, header), header, _source(ds, header, fmt))


def read_dicom_zip(source: str | Path | bytes) -> Volume:
    """A .zip holding one DICOM series (any file names, any order) → Volume sorted by slice position."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise MedicalFormatError("not a readable zip archive") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir() and "__MACOSX/" not in i.filename
                 and not os.path.basename(i.filename).startswith(".")]
        limits.check_files(len(infos))
        budget = limits.MAX_ZIP_TOTAL_BYTES
        series: dict[str, list[tuple[Dataset, _Header]]] = {}
        skipped = 0
        for info in infos:
            if info.flag_bits & 0x1:
                raise MedicalFormatError("the archive is encrypted")
            try:
                with archive.open(info) as member:
                    data = member.read(min(budget, limits.MAX_FILE_BYTES) + 1)
            except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError):
                raise MedicalFormatError("a member of the archive is corrupt") from None
            if len(data) > limits.MAX_FILE_BYTES:
                raise MedicalFormatError(f"a member of the archive is larger than "
                                         f"{limits.MAX_FILE_BYTES // 2**20} MB")
            budget -= len(data)
            if budget < 0:
                raise MedicalFormatError(f"the archive unpacks to more than "
                                         f"{limits.MAX_ZIP_TOTAL_BYTES // 2**20} MB")
            if not looks_like_dicom(data[:256]):
                skipped += 1  # a README, a thumbnail...: not part of the series
                continue
            ds = _parse(data)
            if not _has_pixels(ds):
                skipped += 1  # DICOMDIR, structured reports, presentation states travel with series
                continue
            header = check_header(ds)
            key = str(_get(ds, "SeriesInstanceUID", "")) or f"{header.rows}x{header.cols}"
            series.setdefault(key, []).append((ds, header))
    if not series:
        raise MedicalFormatError("the archive holds no DICOM image")
    if len(series) > 1:
        sizes = ", ".join(str(len(v)) for v in sorted(series.values(), key=len, reverse=True))
        raise MedicalFormatError(f"the archive holds {len(series)} image series ({sizes} images); put one series "
                                 "in each .zip")
    members = next(iter(series.values()))
    first = members[0][1]
    if any((h.rows, h.cols, h.samples) != (first.rows, first.cols, first.samples) for _, h in members):
        raise MedicalFormatError("the images of this series differ in size; upload one series of equal images")
    total = sum(h.rows * h.cols * h.frames * h.samples for _, h in members)
    limits.check_voxels(total, f"{len(members)} images of {first.rows} x {first.cols}")
    limits.check_slices(sum(h.frames for _, h in members))
    frames = [f for ds, h in members for f in _frames(ds, h)]
    source = _source(members[0][0], first, "DICOM series (zip)")
    source["files_skipped"] = skipped
    return _stack(frames, first, source)


def _read_bytes(source: str | Path | bytes, limit: int) -> bytes:
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise MedicalFormatError("file not found")
        if path.stat().st_size > limit:
            raise MedicalFormatError(f"file is {path.stat().st_size / 2**20:.1f} MB; the limit is "
                                     f"{limit // 2**20} MB")
        data = path.read_bytes()
    if len(data) > limit:
        raise MedicalFormatError(f"file is {len(data) / 2**20:.1f} MB; the limit is {limit // 2**20} MB")
    if not data:
        raise MedicalFormatError("empty file (0 bytes)")
    return data
