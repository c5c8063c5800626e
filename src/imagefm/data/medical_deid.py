"""De-identification of DICOM files before anything leaves the machine that holds them.

A subset of the DICOM basic application-level confidentiality profile (PS3.15 Annex E, table
E.1-1, "Basic Prof." column) that covers the attributes a typical CT/MR/CR header carries:

* ``Z`` (kept, made empty: the attribute is type 2): PatientName, PatientID, PatientBirthDate,
  PatientSex, StudyDate, StudyTime, AccessionNumber, ReferringPhysicianName, StudyID...
* ``X`` (removed): addresses, telephone numbers, other IDs and names, institution and
  department, station, device serial, physicians and operators, ages/sizes/weights, comments,
  dates and times of series/acquisition/content...
* ``U`` (replaced by a new UID, the same new UID for the same old one, so series still group):
  Study/Series/SOP Instance UIDs, Frame of Reference, referenced SOP instances, the file meta's
  MediaStorageSOPInstanceUID.
* every private tag removed; sequences walked to any depth; ``PatientIdentityRemoved = YES`` and
  ``DeidentificationMethod`` set so the copy says what was done to it.

Limits (say them to whoever uses it): text burned into the pixels is not touched — files that
declare ``BurnedInAnnotation = YES`` are refused by ``deidentify_file`` unless ``allow_burned_in``
— and free-text attributes outside the list below are kept. This is a tool for a pipeline that
a data-protection officer has approved, not a certificate.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from imagefm.checkpoint import atomic_write
from imagefm.data.medical import MedicalReadError, read_dataset

BLANK = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "AccessionNumber", "ReferringPhysicianName", "StudyID", "ContentDate", "ContentTime")
REMOVE = (
    "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthTime",
    "PatientAge", "PatientSize", "PatientWeight", "MilitaryRank", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "MedicalRecordLocator",
    "PatientReligiousPreference",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionCodeSequence", "StationName", "DeviceSerialNumber", "PhysiciansOfRecord",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "RequestingPhysician", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ScheduledPerformingPhysicianName", "PerformedLocation", "PerformedStationName",
    "RequestAttributesSequence", "SeriesDate", "SeriesTime", "AcquisitionDate",
    "AcquisitionTime", "AcquisitionDateTime", "InstanceCreationDate", "InstanceCreationTime",
    "StudyDescription", "SeriesDescription", "ImageComments", "ProtocolName",
    "IssuerOfPatientID", "CountryOfResidence", "RegionOfResidence", "ResponsiblePerson",
    "ResponsibleOrganization", "PatientState", "Allergies", "PregnancyStatus",
    "SmokingStatus", "LastMenstrualDate", "AdmissionID", "AdmittingDiagnosesDescription",
    "CurrentPatientLocation", "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "RequestedProcedureDescription", "ScheduledProcedureStepDescription",
)
REMAP_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
              "ReferencedSOPInstanceUID", "ReferencedFrameOfReferenceUID",
              "SynchronizationFrameOfReferenceUID", "IrradiationEventUID",
              "ConcatenationUID", "DimensionOrganizationUID", "StorageMediaFileSetUID")
METHOD = "imagefm: PS3.15 E.1-1 basic profile subset"  # LO: at most 64 characters


def new_uid(old: str, salt: str) -> str:
    """A new UID (``2.25.<decimal>``) from a keyed hash of the old one: the same old UID and salt
    give the same new UID (series stay together), the old one cannot be read back from it."""
    digest = hashlib.sha256(f"{salt}\0{old}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _walk(ds: Any, salt: str) -> None:
    for keyword in BLANK:
        if keyword in ds:
            ds[keyword].value = ""
    for keyword in REMOVE:
        if keyword in ds:
            del ds[keyword]
    for keyword in REMAP_UIDS:
        if keyword in ds and ds[keyword].value:
            value = ds[keyword].value  # a UID (a str) or several (a MultiValue)
            ds[keyword].value = (new_uid(value, salt) if isinstance(value, str)
                                 else [new_uid(str(v), salt) for v in value])
    for element in list(ds):
        if element.VR == "SQ":
            for item in element.value:
                _walk(item, salt)


def deidentify(ds: Any, salt: str) -> Any:
    """De-identify a pydicom Dataset in place (and return it); ``salt`` keys the UID remapping —
    keep it secret and the same across one export so series and studies still link up."""
    if not salt:
        raise ValueError("deidentify needs a non-empty salt (a secret kept by the exporter)")
    ds.remove_private_tags()
    _walk(ds, salt)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or new_uid(
            str(meta.MediaStorageSOPInstanceUID), salt)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    return ds


def identifying_left(ds: Any) -> list[str]:
    """Keywords of list attributes still holding a value, private tags included (for checks)."""
    found: list[str] = []
    for element in ds.iterall():
        if element.tag.is_private:
            found.append(str(element.tag))
        elif element.keyword in BLANK and element.value not in ("", None):
            found.append(element.keyword)
        elif element.keyword in REMOVE:
            found.append(element.keyword)
    return found


def deidentify_file(src: str | Path, dst: str | Path, salt: str, *,
                    allow_burned_in: bool = False) -> Path:
    """Read ``src``, de-identify it, write ``dst`` atomically (temp file + rename)."""
    ds = read_dataset(src)
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and not allow_burned_in:
        raise MedicalReadError("burned-in annotation",
                               f"{src}: BurnedInAnnotation=YES (text in the pixels is not removed "
                               f"by tag de-identification); pass allow_burned_in to copy it anyway")
    deidentify(ds, salt)
    return atomic_write(dst, lambda tmp: ds.save_as(tmp, enforce_file_format=False))
