"""Read the identifying attributes of a received object from its temporary file.

Only the first elements are parsed (pydicom skips the values of other tags and stops before
pixel data), so this costs the same for a 5 KB and a 5 GB object.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.tag import Tag

from dicom_ingestd.errors import IngestError
from dicom_ingestd.worker import header

_TAGS = [Tag(0x0008, 0x0016), Tag(0x0008, 0x0018), Tag(0x0008, 0x0060), Tag(0x0010, 0x0010),
         Tag(0x0010, 0x0020), Tag(0x0020, 0x000D), Tag(0x0020, 0x000E)]


class UnreadableDataSet(IngestError):
    """The data set could not be parsed far enough to identify it."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who and what an object is; empty strings for absent attributes."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_name: str
    patient_name_raw: bytes  # as received: storescp's -sp names fold these bytes
    patient_id: str
    modality: str


def _text(value: object, fix_padding: bool = False) -> str:
    text = "" if value is None else str(value).rstrip("\x00")
    return text.strip() if fix_padding else text


def _raw(ds: Any, tag: int) -> bytes:
    element = ds.get_item(tag)
    if element is None:
        return b""
    value = element.value
    if isinstance(value, bytes):
        return value
    return str(value).encode("latin-1", "replace")


def _uid(value: bytes | None, fix_padding: bool) -> str:
    text = (value or b"").decode("ascii", "replace").rstrip("\x00")
    return text.strip() if fix_padding else text.rstrip(" ")


def identify_prefix(prefix: bytes, transfer_syntax: str, *, complete: bool,
                    fix_uid_padding: bool = False) -> Identity | None:
    """Identify from the data set's first bytes (header.py); None: use identify()."""
    found = header.read_identifiers(prefix, transfer_syntax, complete)
    if found is None:
        return None
    name_raw = found.get(0x00100010, b"").rstrip(b" \x00")
    return Identity(
        sop_class_uid=_uid(found.get(0x00080016), fix_uid_padding),
        sop_instance_uid=_uid(found.get(0x00080018), fix_uid_padding),
        study_uid=_uid(found.get(0x0020000D), fix_uid_padding),
        series_uid=_uid(found.get(0x0020000E), fix_uid_padding),
        patient_name=name_raw.decode("latin-1"),
        patient_name_raw=name_raw,
        patient_id=found.get(0x00100020, b"").decode("latin-1").strip(" \x00"),
        modality=found.get(0x00080060, b"").decode("latin-1").strip(" \x00"),
    )


def identify(path: Path, *, fix_uid_padding: bool = False) -> Identity:
    """Parse the identifying attributes; raise UnreadableDataSet on malformed data."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=True)
        return Identity(
            sop_class_uid=_text(ds.get("SOPClassUID"), fix_uid_padding),
            sop_instance_uid=_text(ds.get("SOPInstanceUID"), fix_uid_padding),
            study_uid=_text(ds.get("StudyInstanceUID"), fix_uid_padding),
            series_uid=_text(ds.get("SeriesInstanceUID"), fix_uid_padding),
            patient_name=_text(ds.get("PatientName")),
            patient_name_raw=_raw(ds, 0x00100010),
            patient_id=_text(ds.get("PatientID")),
            modality=_text(ds.get("Modality")),
        )
    except Exception as exc:  # pydicom raises many types on malformed input
        raise UnreadableDataSet(f"{exc.__class__.__name__}: {exc}") from None
