"""What is read from a medical file, and how nothing that identifies a patient gets out.

The readers copy into a `Volume` only the pixel data and the technical elements below; every other data
element (names, IDs, dates, institution, physicians, free-text descriptions, private tags...) is never
looked at, so it cannot reach an answer, a CSV, a log line or an error message. Error messages are written
by us and name elements by keyword, never by value; library exception texts (which can quote a value) are
not passed on. NIfTI's free-text fields (descrip, aux_file, intent_name, db_name) and header extensions
(which may carry a whole DICOM header) are not read either.
"""

from __future__ import annotations

import logging

# DICOM elements the readers use (by keyword). Series Instance UID only groups the files of a .zip; it is
# never shown. Modality and the transfer syntax's name are reported: neither identifies anyone.
DICOM_ELEMENTS_READ: tuple[str, ...] = (
    "TransferSyntaxUID", "SOPClassUID", "Modality", "SeriesInstanceUID", "InstanceNumber",
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "PlanarConfiguration", "PixelData", "FloatPixelData",
    "DoubleFloatPixelData", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "BurnedInAnnotation",
    # Enhanced multi-frame files keep the same values inside these functional-group sequences.
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PlaneOrientationSequence",
    "PlanePositionSequence", "PixelMeasuresSequence", "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
)

# Elements a test fills with recognisable values and then searches every output for (PS3.15 Annex E's
# basic profile, the identifying ones a scanner or PACS typically writes).
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "StationName", "DeviceSerialNumber", "StudyDescription", "SeriesDescription", "ProtocolName",
    "ImageComments", "RequestingPhysician",
)


def quiet_pydicom_logging() -> None:
    """pydicom's own log lines can quote element values (e.g. an invalid date); keep them out of the
    server log. Errors still reach us as exceptions, which we turn into our own messages."""
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
