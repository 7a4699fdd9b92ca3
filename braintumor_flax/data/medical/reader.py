"""One entry point: any uploaded file → what it is (by content) → a `Volume` or a single slice."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from braintumor_flax.data.medical.dicom import looks_like_dicom, read_dicom_file, read_dicom_zip
from braintumor_flax.data.medical.nifti import looks_like_nifti, read_nifti
from braintumor_flax.data.medical.volume import MedicalFormatError, Volume

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
T = TypeVar("T")
log = logging.getLogger(__name__)


def sniff(path: str | Path) -> str | None:
    """"dicom", "nifti", "zip" or None (e.g. a picture), from the first bytes of the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if looks_like_dicom(head):
        return "dicom"
    if head[:4] in ZIP_MAGIC:
        return "zip"
    if looks_like_nifti(path):
        return "nifti"
    return None


def is_dicom(source: str | Path | bytes) -> bool:
    """A path or the bytes of a file: DICOM by content?"""
    if isinstance(source, bytes | bytearray):
        return looks_like_dicom(bytes(source[:256]))
    return sniff(source) == "dicom"


def _guarded(read: Callable[..., T]) -> Callable[..., T]:
    """Any failure that is not already one of our messages becomes a generic one: a library's exception
    text (or a traceback in the server log) could quote a header value."""

    @functools.wraps(read)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return read(*args, **kwargs)
        except MedicalFormatError:
            raise
        except Exception as exc:  # noqa: BLE001 - see above
            log.error("medical reader failed: %s", type(exc).__name__)  # the type only, never the message
            raise MedicalFormatError("this file could not be read (unexpected error while decoding it)") from None

    return wrapper


@_guarded
def read_volume(path: str | Path, *, volume_index: int | None = None) -> Volume:
    """A DICOM file, a .zip of one DICOM series, or a NIfTI file → Volume."""
    kind = sniff(path)
    if kind == "dicom":
        return read_dicom_file(path)
    if kind == "zip":
        return read_dicom_zip(path)
    if kind == "nifti":
        return read_nifti(path, volume_index=volume_index)
    raise MedicalFormatError("not a DICOM file, a .zip of a DICOM series or a NIfTI (.nii / .nii.gz) file")


@_guarded
def read_dicom_slice(path: str | Path | bytes) -> tuple[np.ndarray, str | None, dict]:
    """A single-image DICOM file → (uint8 RGB slice as the file's plane shows it, header plane, facts).

    The slice is cut along the plane it was acquired in; a multi-frame file is refused (it is a volume).
    """
    volume = read_dicom_file(path)
    if volume.source.get("slices_in_file", 1) > 1:
        raise MedicalFormatError(f"this DICOM file holds {volume.source['slices_in_file']} frames (a volume); "
                                 "send it to /predict_volume")
    plane = volume.acquired_plane or "axial"  # no orientation in the header: shown as stored
    return volume.slice_rgb(plane, 0), volume.acquired_plane, volume.info(plane)
