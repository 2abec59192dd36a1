"""Test objects: pydicom's bundled files, and copies of them with new UIDs."""

from pathlib import Path

from pydicom.data import get_testdata_file


def testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def make_study(folder: Path, count: int, *, study_uid: str | None = None, name: str = "s",
               patient: str | None = None) -> list[Path]:
    """`count` CT objects (copies of CT_small, new SOP Instance UIDs) of one study."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

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
        path = folder / f"{name}-{index:03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files
