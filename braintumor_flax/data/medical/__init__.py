"""Medical formats in: DICOM (file, multi-frame, series .zip) and NIfTI, read into one oriented `Volume`,
windowed as a radiology viewer shows it, cut along any plane, with no patient data read beyond geometry."""

from braintumor_flax.data.medical.reader import is_dicom, read_dicom_slice, read_volume, sniff
from braintumor_flax.data.medical.volume import PLANE_AXIS, MedicalFormatError, Volume

__all__ = ["PLANE_AXIS", "MedicalFormatError", "Volume", "is_dicom", "read_dicom_slice", "read_volume", "sniff"]
