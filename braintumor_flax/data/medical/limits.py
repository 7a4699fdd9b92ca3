"""Size limits for medical inputs, checked from headers before any pixel is decoded.

Why these numbers: a 512 x 512 x 150 CT (39 M voxels) fits; as float32 that is 160 MB, so two requests
at once stay well inside a 16 GB Space. Every slice of a cut goes through the model, so the slice count
also bounds the time one request takes.
"""

from __future__ import annotations

from braintumor_flax.data.medical.volume import PERCENTILES, MedicalFormatError

MAX_VOXELS = 40_000_000  # per volume (x 3 for colour)
MAX_SLICES = 1024  # slices in a file or series, and slices along the chosen cut
MAX_FILES = 2048  # members of a series .zip
MAX_FILE_BYTES = 64 * 1024 * 1024  # one DICOM / NIfTI file (the app's upload limit is the same)
MAX_ZIP_TOTAL_BYTES = 256 * 1024 * 1024  # everything read out of one series archive
PERCENT_TEXT = f"{PERCENTILES[0]:g}–{PERCENTILES[1]:g} %"


def check_voxels(n: int, what: str) -> None:
    if n > MAX_VOXELS:
        raise MedicalFormatError(f"the scan is too large: {what} = {n:,} voxels; the limit is {MAX_VOXELS:,}")


def check_slices(n: int) -> None:
    if n > MAX_SLICES:
        raise MedicalFormatError(f"the scan has {n:,} slices; the limit is {MAX_SLICES:,}")


def check_files(n: int) -> None:
    if n > MAX_FILES:
        raise MedicalFormatError(f"the archive holds {n:,} files; the limit is {MAX_FILES:,}")
