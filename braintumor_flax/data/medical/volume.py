"""A scan as one oriented grid of intensities, windowed and cut into display-ready slices.

Every reader (DICOM file, DICOM series, NIfTI) ends in a `Volume` whose voxel axes are nibabel's canonical
RAS+ order: axis 0 runs to the patient's Right, axis 1 to Anterior, axis 2 to Superior. Cutting it is then
the same for every format: a sagittal slice fixes axis 0, a coronal one axis 1, an axial one axis 2, and each
is shown as a radiology viewer shows it:

    axial     rows: anterior at the top,  columns: the patient's right on the image's left
    coronal   rows: superior at the top,  columns: the patient's right on the image's left
    sagittal  rows: superior at the top,  columns: anterior on the image's left

Intensities: the readers apply rescale slope / intercept; `window` maps them to 0..255 grey with the
header's window, or a robust percentile window; MONOCHROME1 is inverted. The uint8 grey slice is repeated
to three channels, i.e. the same uint8 RGB a picture decodes to, so the same `to_model_input` follows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from nibabel import orientations
from PIL import Image

from braintumor_flax.data.imageio import ImageDecodeError

# Plane of a cut ↔ the canonical axis it fixes.
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
AXIS_PLANE = {v: k for k, v in PLANE_AXIS.items()}
OBLIQUE_COS = 0.8  # a slice normal less aligned than this (~37°) with its nearest axis is reported oblique
PERCENTILES = (0.5, 99.5)  # the robust window when the header states none
MAX_DISPLAY_SIDE = 1024  # a cut resampled to square pixels is capped at this many pixels a side


class MedicalFormatError(ImageDecodeError):
    """A DICOM / NIfTI input that cannot be used; the message is safe to show (no path, no header value)."""


@dataclasses.dataclass
class Volume:
    """Intensities [X, Y, Z] (grey) or [X, Y, Z, 3] (colour), float32, canonical RAS+ voxel order."""

    data: np.ndarray
    spacing: tuple[float, float, float]  # mm along X, Y, Z
    window: tuple[float, float]  # display window (low, high) in data units
    window_source: str
    invert: bool = False  # MONOCHROME1: low values are shown bright
    acquired_axis: int | None = 2  # canonical axis the file's slices were stacked along (None: unknown)
    orientation_known: bool = True  # False: the file states no orientation (the plane is then unknown)
    obliquity: float = 1.0  # |cos| between the acquisition normal and its nearest axis
    source: dict[str, Any] = dataclasses.field(default_factory=dict)  # format facts, never patient data

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def acquired_plane(self) -> str | None:
        """The plane the file's own slices lie in, from its header (None when the header does not say)."""
        if not self.orientation_known or self.acquired_axis is None:
            return None
        return AXIS_PLANE[self.acquired_axis]

    @property
    def is_oblique(self) -> bool:
        return self.obliquity < OBLIQUE_COS

    def n_slices(self, plane: str) -> int:
        return self.shape[PLANE_AXIS[plane]]

    def cut(self, plane: str, index: int) -> np.ndarray:
        """One slice in data units, displayed the right way up, resampled to square pixels."""
        axis = PLANE_AXIS[plane]
        if not 0 <= index < self.shape[axis]:
            raise IndexError(f"slice {index} outside 0..{self.shape[axis] - 1}")
        d = self.data
        if plane == "axial":
            img = d[::-1, ::-1, index]
        elif plane == "coronal":
            img = d[::-1, index, ::-1]
        else:
            img = d[index, ::-1, ::-1]
        img = np.swapaxes(img, 0, 1)  # [cols, rows] → [rows, cols]
        return _square_pixels(np.ascontiguousarray(img), *self._pixel_mm(plane))

    def _pixel_mm(self, plane: str) -> tuple[float, float]:
        """(mm between rows, mm between columns) of a cut before resampling."""
        x, y, z = self.spacing
        return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[plane]

    def pixel_area_mm2(self, plane: str) -> float | None:
        """Area of one pixel of a cut as displayed (after resampling to square pixels), in mm²."""
        rows_mm, cols_mm = self._pixel_mm(plane)
        if rows_mm <= 0 or cols_mm <= 0:
            return None
        axes = [a for a in range(3) if a != PLANE_AXIS[plane]]
        h, w = self.shape[axes[1]], self.shape[axes[0]]  # rows run along the second remaining axis
        out_h, out_w = _square_size(h, w, rows_mm, cols_mm)
        return h * rows_mm * w * cols_mm / (out_h * out_w)

    def slice_rgb(self, plane: str, index: int) -> np.ndarray:
        """One slice as the uint8 RGB HxWx3 that a decoded picture is."""
        return to_rgb(window(self.cut(plane, index), self.window, invert=self.invert))

    def info(self, plane: str) -> dict[str, Any]:
        """Facts about the scan and the cut, for answers (geometry and formats only)."""
        return {**self.source, "shape_ras": list(self.shape), "spacing_mm": [round(s, 4) for s in self.spacing],
                "acquired_plane": self.acquired_plane, "oblique": self.is_oblique, "cut_plane": plane,
                "n_slices": self.n_slices(plane), "pixel_area_mm2": _rounded(self.pixel_area_mm2(plane)),
                "slice_thickness_mm": round(self.spacing[PLANE_AXIS[plane]], 4),
                "window": [round(float(w), 4) for w in self.window],
                "window_source": self.window_source, "inverted": self.invert}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _square_size(h: int, w: int, rows_mm: float, cols_mm: float) -> tuple[int, int]:
    """(height, width) of a cut resampled to square pixels (unchanged when they are square within 1 %)."""
    if rows_mm <= 0 or cols_mm <= 0 or abs(rows_mm / cols_mm - 1) < 0.01:
        return h, w
    pixel = min(rows_mm, cols_mm)
    new_h, new_w = max(1, round(h * rows_mm / pixel)), max(1, round(w * cols_mm / pixel))
    scale = min(1.0, MAX_DISPLAY_SIDE / max(new_h, new_w))
    return max(1, round(new_h * scale)), max(1, round(new_w * scale))


def _square_pixels(img: np.ndarray, rows_mm: float, cols_mm: float) -> np.ndarray:
    """Resample so a pixel is as tall as it is wide (a sagittal cut of 5 mm slices is not squashed)."""
    h, w = img.shape[:2]
    out_h, out_w = _square_size(h, w, rows_mm, cols_mm)
    if (out_h, out_w) == (h, w):
        return img
    size = (out_w, out_h)
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR))
    return np.stack([_square_pixels(img[..., c], rows_mm, cols_mm) for c in range(img.shape[2])], axis=-1)


def dicom_window(center: float, width: float) -> tuple[float, float]:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2) as (low, high)."""
    width = max(float(width), 1.0)
    return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2


def percentile_window(data: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> tuple[float, float]:
    """Robust (low, high) over the finite voxels; a subsample keeps it fast on big volumes."""
    flat = data.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if hi <= lo:  # a near-constant image: use the full range instead
        lo, hi = float(sample.min()), float(sample.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def window(values: np.ndarray, win: tuple[float, float], *, invert: bool = False) -> np.ndarray:
    """Data units → uint8 grey: low..high mapped linearly onto 0..255, clipped; NaN → black."""
    lo, hi = win
    scaled = (np.nan_to_num(values.astype(np.float32), nan=lo, posinf=hi, neginf=lo) - lo) * (255.0 / (hi - lo))
    out = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    return 255 - out if invert else out


def to_rgb(grey_or_rgb: np.ndarray) -> np.ndarray:
    if grey_or_rgb.ndim == 2:
        return np.ascontiguousarray(np.repeat(grey_or_rgb[:, :, None], 3, axis=2))
    return np.ascontiguousarray(grey_or_rgb)


def nearest_axis(direction: np.ndarray) -> tuple[int, float]:
    """World axis (0 = x, 1 = y, 2 = z) a direction is closest to, and |cos| of the angle to it."""
    v = np.asarray(direction, np.float64)
    norm = float(np.linalg.norm(v))
    if norm == 0 or not np.isfinite(norm):
        raise MedicalFormatError("the header's orientation vectors are degenerate")
    v = np.abs(v / norm)
    axis = int(np.argmax(v))
    return axis, float(v[axis])


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Reorder / flip voxel axes to RAS+ (nibabel's closest-canonical). Returns data, its affine, and
    where each original voxel axis went."""
    ornt = orientations.io_orientation(affine)
    out = orientations.apply_orientation(data, ornt)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, data.shape[:3])
    return np.ascontiguousarray(out, dtype=np.float32), new_affine, [int(a) for a in ornt[:, 0]]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.linalg.norm(affine[:3, :3], axis=0)
    return float(s[0]), float(s[1]), float(s[2])
