"""Test objects: pydicom's bundled files, copies of them with new UIDs, and data sets built
byte by byte."""

import os
import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from support.uids import CT_IMAGE
from support.wire import LONG_VRS, element


def testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def make_study(folder: Path, count: int, *, study_uid: str | None = None, name: str = "s",
               patient: str | None = None, patient_id: str | None = None) -> list[Path]:
    """`count` CT objects (copies of CT_small, new SOP Instance UIDs) of one study."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or str(generate_uid())
    series_uid = str(generate_uid())
    files = []
    for index in range(count):
        ds = dcmread(testdata("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = index + 1
        if patient is not None:
            ds.PatientName = patient
        if patient_id is not None:
            ds.PatientID = patient_id
        path = folder / f"{name}-{index:03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def ct_copies(directory: Path, count: int, tag: str) -> list[Path]:
    """`count` copies of CT_small.dcm with fresh SOP Instance UIDs, written under directory."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = dcmread(testdata("CT_small.dcm"))
    paths = []
    for index in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = directory / f"{tag}-{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_dataset() -> Dataset:
    """CT_small with a new SOP Instance UID."""
    ds = dcmread(testdata("CT_small.dcm"))
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def new_ct_file(folder: Path, pixel_bytes: int | None = None, name: str | None = None) -> Path:
    """A copy of CT_small with a new SOP Instance UID (and, optionally, bigger pixel data)."""
    ds = dcmread(testdata("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if 0xFFFCFFFC in ds:  # storescu drops Data Set Trailing Padding when it sends
        del ds[0xFFFCFFFC]
    if pixel_bytes is not None:
        side = int((pixel_bytes // 2) ** 0.5)
        ds.Rows = ds.Columns = side
        ds.PixelData = os.urandom(side * side * 2)
    path = folder / (name or f"ct-{ds.SOPInstanceUID}.dcm")
    ds.save_as(path)
    return path


def minimal_ct(sop_instance: bytes, study: bytes, patient_name: bytes,
               series: bytes | None = None) -> bytes:
    """A small CT Image Storage data set (explicit VR LE) with raw values, UTF-8 declared."""
    series = series if series is not None else generate_uid().encode()
    return b"".join([
        element(0x0008, 0x0005, b"CS", b"ISO_IR 192"),
        element(0x0008, 0x0016, b"UI", CT_IMAGE.encode()),
        element(0x0008, 0x0018, b"UI", sop_instance),
        element(0x0008, 0x0060, b"CS", b"CT"),
        element(0x0010, 0x0010, b"PN", patient_name),
        element(0x0010, 0x0020, b"LO", b"HOSTILE"),
        element(0x0020, 0x000D, b"UI", study),
        element(0x0020, 0x000E, b"UI", series),
    ])


def split_part10(path: Path) -> tuple[bytes, bytes]:
    """(file meta group bytes, data set bytes) of a Part 10 file, without decoding either."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part 10 file"
    pos = 132
    while pos + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in LONG_VRS:
            pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return data[132:pos], data[pos:]


def data_set_bytes(path: Path) -> bytes:
    """The data set bytes of a Part 10 file: what follows its file meta group."""
    return split_part10(path)[1]


def declared_data_set(path: Path) -> bytes:
    """The bytes after the file meta information as its File Meta Information Group Length
    declares it (which must be there): a wrong group length in a stored file shows."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", path
    assert raw[132:136] == b"\x02\x00\x00\x00", "no File Meta Information Group Length"
    (group_length,) = struct.unpack_from("<L", raw, 140)
    return raw[144 + group_length:]
