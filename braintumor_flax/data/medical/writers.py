"""Write 2-D slices (as a viewer shows them) into DICOM and NIfTI files whose headers state the true
orientation: demo files, test files and the volume benchmark are made from the BRISC JPEG slices with this.

Display conventions are those of `volume.py`. BRISC's sagittal slices show the face on the right, so their
DICOM row direction is anterior (-y in DICOM's LPS) — the header tells the truth about the picture.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

# Image Orientation (Patient) for a stored picture of each plane: row direction, column direction (LPS).
IOP: dict[str, tuple[float, ...]] = {
    "axial": (1, 0, 0, 0, 1, 0),  # columns run to the patient's left, rows to posterior
    "coronal": (1, 0, 0, 0, 0, -1),  # columns to the left, rows downwards (inferior)
    "sagittal": (0, -1, 0, 0, 0, -1),  # BRISC faces right: columns run to anterior, rows inferior
}
# Voxel order of a written NIfTI: the slice axis last (as converters store stacks), not canonical RAS,
# so a reader must really use the affine.
NIFTI_AXCODES = {"axial": ("L", "P", "S"), "coronal": ("L", "I", "A"), "sagittal": ("A", "I", "R")}


def displayed(picture: np.ndarray, plane: str) -> np.ndarray:
    """A stored BRISC picture as `Volume.cut` displays it (sagittal: anterior on the left)."""
    return picture[:, ::-1] if plane == "sagittal" else picture


def _base(plane: str, grey: np.ndarray, *, position: Sequence[float], pixel_spacing: float, thickness: float,
          monochrome1: bool, sop_class: str, series_uid: str, instance: int, extra: dict[str, Any] | None
          ) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = list(IOP[plane])
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = (int(n) for n in grey.shape[:2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    # Stored = 4 * value + 100 with slope 1/4, intercept -25: a reader must apply the rescale to get
    # the grey values back; the window 0..255 (centre 128, width 256) then maps them one to one.
    ds.RescaleSlope, ds.RescaleIntercept = 0.25, -25
    ds.WindowCenter, ds.WindowWidth = 128, 256
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


def _stored(grey: np.ndarray, monochrome1: bool) -> np.ndarray:
    value = 255 - grey.astype(np.int32) if monochrome1 else grey.astype(np.int32)
    return (value * 4 + 100).astype(np.uint16)


def _slice_positions(plane: str, n: int, spacing: float, gaps: Sequence[float] | None = None) -> np.ndarray:
    row, col = np.array(IOP[plane][:3]), np.array(IOP[plane][3:])
    normal = np.cross(row, col)
    steps = np.concatenate([[0.0], np.cumsum(gaps if gaps is not None else [spacing] * (n - 1))])
    return np.array([-100.0, -120.0, 40.0]) + steps[:, None] * normal[None, :]


def write_dicom_series(folder: Path, pictures: Sequence[np.ndarray], plane: str, *, pixel_spacing: float = 1.0,
                       slice_spacing: float = 1.0, gaps: Sequence[float] | None = None, monochrome1: bool = False,
                       transfer_syntax: str | None = None, extra: dict[str, Any] | None = None,
                       series_uid: str | None = None, names: Sequence[str] | None = None) -> list[Path]:
    """One single-frame DICOM file per uint8 grey picture (stored as shown), slices along the plane's
    normal (`gaps` overrides the spacing between consecutive slices)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    positions = _slice_positions(plane, len(pictures), slice_spacing, gaps)
    paths = []
    for i, grey in enumerate(pictures):
        ds = _base(plane, grey, position=positions[i], pixel_spacing=pixel_spacing, thickness=slice_spacing,
                   monochrome1=monochrome1, sop_class=MR_IMAGE_STORAGE, series_uid=series_uid, instance=i + 1,
                   extra=extra)
        ds.PixelData = _stored(grey, monochrome1).tobytes()
        if transfer_syntax:
            ds.compress(transfer_syntax)
        path = folder / (names[i] if names else f"IM{i:04d}")  # no .dcm: content, not the name, says DICOM
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_multiframe(path: Path, pictures: Sequence[np.ndarray], plane: str, *, pixel_spacing: float = 1.0,
                           slice_spacing: float = 1.0, extra: dict[str, Any] | None = None) -> Path:
    """An enhanced MR multi-frame file: geometry, rescale and window in the functional groups only."""
    first = pictures[0]
    ds = _base(plane, first, position=(0, 0, 0), pixel_spacing=pixel_spacing, thickness=slice_spacing,
               monochrome1=False, sop_class=ENHANCED_MR_IMAGE_STORAGE, series_uid=generate_uid(), instance=1,
               extra=extra)
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.NumberOfFrames = len(pictures)
    shared = Dataset()
    orientation, measures, transform, voi = Dataset(), Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = list(IOP[plane])
    measures.PixelSpacing = [pixel_spacing, pixel_spacing]
    measures.SliceThickness = slice_spacing
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 0.25, -25, "US"
    voi.WindowCenter, voi.WindowWidth = 128, 256
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transform]
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    positions = _slice_positions(plane, len(pictures), slice_spacing)
    order = list(range(len(pictures)))[::-1]  # frames stored in reverse: the reader must sort by position
    for i in order:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in positions[i]]
        item.PlanePositionSequence = [pos]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack([_stored(pictures[i], False) for i in order]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def nifti_from_pictures(pictures: Sequence[np.ndarray], plane: str, *, spacing: tuple[float, float, float] =
                        (1.0, 1.0, 1.0), scaled: bool = True) -> nib.Nifti1Image:
    """Pictures (uint8 grey, stored BRISC-style) stacked along the plane's axis into a NIfTI whose affine
    is true: cut along `plane`, the volume shows `displayed(picture, plane)` again."""
    shown = [displayed(p, plane).astype(np.float32) for p in pictures]
    h, w = shown[0].shape
    n = len(shown)
    if plane == "axial":
        ras = np.zeros((w, h, n), np.float32)
        for k, img in enumerate(shown):
            ras[:, :, k] = img[::-1, ::-1].T
    elif plane == "coronal":
        ras = np.zeros((w, n, h), np.float32)
        for k, img in enumerate(shown):
            ras[:, k, :] = img[::-1, ::-1].T
    else:
        ras = np.zeros((n, w, h), np.float32)
        for k, img in enumerate(shown):
            ras[k, :, :] = img[::-1, ::-1].T
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-90.0, -120.0, -60.0]
    # Re-lay the voxels in the file order of NIFTI_AXCODES, with the affine that keeps them in place.
    transform = orientations.ornt_transform(orientations.io_orientation(affine),
                                            orientations.axcodes2ornt(NIFTI_AXCODES[plane]))
    data = orientations.apply_orientation(ras, transform)
    affine = affine @ orientations.inv_ornt_aff(transform, ras.shape)
    if scaled:
        # int16 with scl_slope 0.5 / scl_inter 10 and cal_min / cal_max 0 / 255: the reader must apply the
        # scaling and the header window to get the original grey back.
        img = nib.Nifti1Image(np.rint((data - 10) / 0.5).astype(np.int16), affine)
        img.header.set_slope_inter(0.5, 10)
        img.header["cal_min"], img.header["cal_max"] = 0, 255
    else:
        img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def write_nifti(path: Path, pictures: Sequence[np.ndarray], plane: str, **kwargs: Any) -> Path:
    nib.save(nifti_from_pictures(pictures, plane, **kwargs), path)
    return path


def identifying_elements(marker: str = "ZZPHI") -> dict[str, Any]:
    """Patient-identifying elements filled with values that are easy to search for in every output."""
    today = datetime.date(1961, 7, 14).strftime("%Y%m%d")
    return {
        "PatientName": f"{marker}^DOE^JOHN", "PatientID": f"{marker}ID12345", "PatientBirthDate": today,
        "PatientSex": "M", "PatientAge": "063Y", "PatientAddress": f"{marker} 1 Main Street, Springfield",
        "PatientTelephoneNumbers": "555-0142-77", "OtherPatientIDs": f"{marker}OTHER99",
        "OtherPatientNames": f"{marker}^ALIAS", "PatientMotherBirthName": f"{marker}^MAIDEN",
        "StudyDate": "20190305", "SeriesDate": "20190306", "AcquisitionDate": "20190307",
        "ContentDate": "20190308", "StudyTime": "101112", "SeriesTime": "131415",
        "AccessionNumber": f"{marker}ACC77", "StudyID": f"{marker}ST88", "InstitutionName": f"{marker} General",
        "InstitutionAddress": f"{marker} Hospital Road 9", "InstitutionalDepartmentName": f"{marker} Radiology",
        "ReferringPhysicianName": f"{marker}^REFERRER", "PerformingPhysicianName": f"{marker}^PERFORMER",
        "NameOfPhysiciansReadingStudy": f"{marker}^READER", "OperatorsName": f"{marker}^OPERATOR",
        "StationName": f"{marker}STATION", "DeviceSerialNumber": f"{marker}SN4711",
        "StudyDescription": f"{marker} brain study", "SeriesDescription": f"{marker} T1 series",
        "ProtocolName": f"{marker} protocol", "ImageComments": f"{marker} comment",
    }


def searchable(elements: dict[str, Any]) -> list[str]:
    """The values worth searching outputs for: a one-letter Patient's Sex would match any word."""
    return [str(v) for v in elements.values() if len(str(v)) >= 4]

