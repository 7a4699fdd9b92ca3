"""NIfTI in: `.nii` / `.nii.gz` (NIfTI-1 or -2), recognised by content → a `Volume`.

3-D volumes are read as they are; a 4-D file (e.g. fMRI, several contrasts) gives one 3-D volume, chosen by
`volume_index` (default: the first, reported in the answer); 5-D and higher are refused. The shape is checked
from the header before any voxel is read. nibabel applies scl_slope / scl_inter; the display window is the
header's cal_min / cal_max when set, else a robust percentile window.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from braintumor_flax.data.medical import limits
from braintumor_flax.data.medical.volume import (
    MedicalFormatError,
    Volume,
    canonical,
    nearest_axis,
    percentile_window,
    spacing_of,
)

GZIP_MAGIC = b"\x1f\x8b"


def _header_kind(head: bytes) -> int | None:
    """1 or 2 for a single-file NIfTI header (either byte order), else None."""
    if len(head) >= 348:
        for fmt in ("<i", ">i"):
            size = struct.unpack(fmt, head[:4])[0]
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return 1 if head[344:348] == b"n+1\x00" else -1
            if size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return 2 if head[4:8] == b"n+2\x00" else -2
    return None


def _head(path: Path, n: int = 540) -> bytes:
    with path.open("rb") as f:
        raw = f.read(n)
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        with gzip.open(path, "rb") as g:
            return g.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def looks_like_nifti(path: str | Path) -> bool:
    kind = _header_kind(_head(Path(path)))
    return kind is not None


def read_nifti(path: str | Path, *, volume_index: int | None = None) -> Volume:
    """A NIfTI file → Volume. `volume_index` picks one 3-D volume of a 4-D file (default 0)."""
    path = Path(path)
    if not path.is_file():
        raise MedicalFormatError("file not found")
    if path.stat().st_size > limits.MAX_FILE_BYTES:
        raise MedicalFormatError(f"file is {path.stat().st_size / 2**20:.1f} MB; the limit is "
                                 f"{limits.MAX_FILE_BYTES // 2**20} MB")
    kind = _header_kind(_head(path))
    if kind is None:
        raise MedicalFormatError("not a NIfTI file")
    if kind < 0:
        raise MedicalFormatError("this is the header of a two-file NIfTI (.hdr + .img); upload a single-file .nii")
    klass = nib.Nifti1Image if kind == 1 else nib.Nifti2Image
    with path.open("rb") as f:
        compressed = f.read(2) == GZIP_MAGIC
    # A nameless in-memory stream, not the file name: the content decided the format (nibabel would
    # otherwise re-open by extension); the file is at most MAX_FILE_BYTES.
    raw = io.BytesIO(path.read_bytes())
    with gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw as stream:
        try:
            img = klass.from_stream(stream)  # type: ignore[arg-type]
            shape = tuple(int(n) for n in img.header.get_data_shape())
            dtype = img.header.get_data_dtype()
        except Exception:  # noqa: BLE001 - nibabel's message may quote header text; give our own
            raise MedicalFormatError("the NIfTI header is corrupt or uses an unsupported data type") from None
        if dtype.fields is not None or dtype.kind == "c":
            raise MedicalFormatError(f"NIfTI data type {dtype} (colour or complex voxels) is not supported")
        if len(shape) < 2 or min(shape) <= 0:
            raise MedicalFormatError(f"the NIfTI header gives an empty shape {shape}")
        shape3 = (shape + (1,))[:3] if len(shape) == 2 else shape[:3]
        extra = shape[3:]
        if any(n > 1 for n in extra[1:]):
            raise MedicalFormatError(f"a {len(shape)}-D NIfTI {shape} is not supported; upload a 3-D volume "
                                     "(or a 4-D series of volumes)")
        n_volumes = extra[0] if extra else 1
        if volume_index is None:
            volume_index = 0
        if not 0 <= volume_index < n_volumes:
            raise MedicalFormatError(f"volume {volume_index} asked for, but the file holds {n_volumes} volume(s) "
                                     f"(0..{n_volumes - 1})")
        limits.check_voxels(int(np.prod(shape3)), " x ".join(map(str, shape3)))
        limits.check_slices(max(shape3))
        try:
            proxy = img.dataobj
            if len(shape) == 2:
                raw = np.asarray(proxy)[:, :, None]
            elif len(shape) == 3:
                raw = np.asarray(proxy)
            else:
                # Only the chosen volume is read (and scaled): a long fMRI run is not loaded whole.
                raw = np.asarray(proxy[(slice(None),) * 3 + (volume_index,) + (0,) * (len(shape) - 4)])
            data = np.asarray(raw, np.float32)
        except Exception:  # noqa: BLE001 - truncated or corrupt voxel data
            raise MedicalFormatError("the NIfTI voxel data is truncated or corrupt") from None
    sform_code = int(img.header["sform_code"])
    qform_code = int(img.header["qform_code"])
    known = sform_code > 0 or qform_code > 0
    affine = np.asarray(img.affine, np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MedicalFormatError("the NIfTI affine is degenerate")
    data, ras, axis_map = canonical(data, affine)
    cal_min, cal_max = float(img.header["cal_min"]), float(img.header["cal_max"])
    if np.isfinite(cal_min) and np.isfinite(cal_max) and cal_max > cal_min:
        win, source = (cal_min, cal_max), "NIfTI cal_min / cal_max"
    else:
        win, source = percentile_window(data), f"percentile {limits.PERCENT_TEXT} (no cal_min / cal_max)"
    # The file's third voxel axis is how slice stacks are stored; its direction decides the acquired plane.
    obliquity = min(nearest_axis(affine[:3, i])[1] for i in range(3))
    return Volume(data=data, spacing=spacing_of(ras), window=win, window_source=source,
                  acquired_axis=axis_map[2], orientation_known=known, obliquity=obliquity,
                  source={"format": f"NIfTI-{abs(kind)}" + (" (gzip)" if compressed else ""),
                          "file_shape": list(shape), "volume_index": volume_index, "n_volumes": n_volumes,
                          "orientation_from": "sform" if sform_code > 0 else "qform" if qform_code > 0 else None})
