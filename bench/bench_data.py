"""Deterministic DICOM data sets for the benchmark, generated once and cached on disk.

Every byte is a function of the set's spec: UIDs come from `generate_uid` with fixed entropy
sources and pixel data from `random.Random` seeded with a string, so two machines (or two runs)
generating the same spec get identical files.  A set lives in ``<cache>/<key>/`` (DICOM files
only, so ``storescu +sd`` can scan it) and is valid only when ``<cache>/<key>.json`` lists
every file with its size; the manifest is written last, so an interrupted generation is
regenerated rather than reused.
"""

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

# Bump when the generated content changes, so stale caches are regenerated.
GENERATOR_VERSION = 1

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.3")

KINDS = ("ct", "small", "large", "ct38k")


@dataclass(frozen=True)
class DataSpec:
    """What to generate: `count` objects of one `kind` (frames: per object, large only)."""

    kind: str
    count: int
    frames: int = 1

    @property
    def key(self) -> str:
        """The cache directory name, unique per spec."""
        if self.kind == "large":
            return f"{self.kind}-{self.count}x{self.frames}f"
        return f"{self.kind}-{self.count}"


@dataclass(frozen=True)
class DataSet:
    """A generated set on disk: its files (sorted) and their total size in bytes."""

    spec: DataSpec
    directory: Path
    files: tuple[Path, ...]
    total_bytes: int


def _uid(*parts: str) -> UID:
    """A UID that is a pure function of `parts` (pydicom's root, hashed entropy)."""
    return generate_uid(entropy_srcs=["dicom-ingestd-bench", *parts])


def _pixels(seed: str, size: int) -> bytes:
    """`size` pseudo-random bytes, the same for the same seed on every machine."""
    return random.Random(seed).randbytes(size)


def _image(spec: DataSpec, index: int, sop_class: UID, modality: str) -> Dataset:
    """Patient/study/series/image attributes common to every kind; pixel module left open."""
    instance_uid = _uid(spec.key, "instance", str(index))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"BENCH{spec.kind.upper()}"
    ds.Modality = modality
    ds.Manufacturer = "dicom-ingestd bench"
    ds.ReferringPhysicianName = ""
    ds.PatientName = f"BENCH^{spec.kind.upper()}"
    ds.PatientID = f"BENCH-{spec.key}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(spec.key, "study")
    ds.SeriesInstanceUID = _uid(spec.key, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    return ds


def _ct(spec: DataSpec, index: int, size: int = 512) -> Dataset:
    """CT Image Storage, `size` x `size` x 16 bit: 0.5 MB of pixel data at 512."""
    ds = _image(spec, index, CT_IMAGE_STORAGE, "CT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = _uid(spec.key, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.KVP = "120"
    ds.SliceThickness = "1.0"
    ds.ImagePositionPatient = [-179.65, -179.65, -float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = -float(index)
    ds.PixelSpacing = [0.703125, 0.703125]
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = _pixels(f"{spec.key}/{index}", size * size * 2)
    return ds


def _ct38k(spec: DataSpec, index: int) -> Dataset:
    """CT Image Storage, 136 x 136 x 16 bit: a 38 KB file (the association sets' object)."""
    return _ct(spec, index, size=136)


def _small(spec: DataSpec, index: int) -> Dataset:
    """Secondary Capture Image Storage, 64 x 64 x 8 bit: about 5 KB on disk."""
    ds = _image(spec, index, SECONDARY_CAPTURE_IMAGE_STORAGE, "OT")
    ds.ConversionType = "WSD"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = _pixels(f"{spec.key}/{index}", 64 * 64)
    return ds


def _large(spec: DataSpec, index: int) -> Dataset:
    """Multi-frame Grayscale Word SC, 512 x 512 x 16 bit x `frames` (500 frames: 262 MB).

    The pixel data is built once as one bytes object; pydicom writes it without copying.
    """
    ds = _image(spec, index, MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE, "OT")
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = spec.frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = "40"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelData = _pixels(f"{spec.key}/{index}", 512 * 512 * 2 * spec.frames)
    return ds


_BUILDERS: dict[str, tuple[str, Callable[[DataSpec, int], Dataset]]] = {
    "ct": ("CT", _ct),
    "small": ("SC", _small),
    "large": ("MF", _large),
    "ct38k": ("CT", _ct38k),
}


def _manifest_path(cache: Path, spec: DataSpec) -> Path:
    return cache / f"{spec.key}.json"


def _load_cached(cache: Path, spec: DataSpec) -> DataSet | None:
    """The cached set if its manifest matches `spec` and every listed file has its size."""
    try:
        manifest = json.loads(_manifest_path(cache, spec).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("spec") != asdict(spec):
        return None
    directory = cache / spec.key
    files: list[Path] = []
    for name, size in manifest["files"]:
        path = directory / name
        try:
            if path.stat().st_size != size:
                return None
        except OSError:
            return None
        files.append(path)
    if sorted(p.name for p in directory.iterdir()) != sorted(p.name for p in files):
        return None  # stray files would be sent by storescu +sd
    return DataSet(spec, directory, tuple(files), sum(size for _, size in manifest["files"]))


def ensure_dataset(cache: Path, spec: DataSpec, log: Callable[[str], None]) -> DataSet:
    """Return the set for `spec`, generating it into `cache` first unless already there."""
    cached = _load_cached(cache, spec)
    if cached is not None:
        return cached
    prefix, build = _BUILDERS[spec.kind]
    log(f"generating data set {spec.key} ({spec.count} objects) in {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    _manifest_path(cache, spec).unlink(missing_ok=True)
    final = cache / spec.key
    scratch = cache / f"{spec.key}.tmp"
    for stale in (final, scratch):
        shutil.rmtree(stale, ignore_errors=True)
    scratch.mkdir()
    entries: list[tuple[str, int]] = []
    for index in range(spec.count):
        name = f"{prefix}{index:06d}.dcm"
        ds = build(spec, index)
        dcmwrite(scratch / name, ds, enforce_file_format=True)
        del ds  # the large kind holds 262 MB of pixel data; free it before the next one
        entries.append((name, (scratch / name).stat().st_size))
    scratch.rename(final)
    manifest = {"version": GENERATOR_VERSION, "spec": asdict(spec), "files": entries}
    tmp_manifest = _manifest_path(cache, spec).with_suffix(".json.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    tmp_manifest.rename(_manifest_path(cache, spec))
    cached = _load_cached(cache, spec)
    if cached is None:
        raise RuntimeError(f"generated data set {final} does not match its manifest")
    return cached


def _is_split_of(directory: Path, files: tuple[Path, ...]) -> bool:
    """True if `directory` holds exactly hard links to `files` (and nothing else)."""
    try:
        if sorted(os.listdir(directory)) != sorted(f.name for f in files):
            return False
        return all(os.path.samefile(directory / f.name, f) for f in files)
    except OSError:
        return False


def split_dataset(cache: Path, dataset: DataSet, parts: int) -> list[Path]:
    """`parts` directories that partition `dataset` round-robin (hard links, no copies).

    One directory per parallel sender, so each storescu scans its own with ``+sd``.
    """
    base = cache / f"{dataset.spec.key}.split{parts}"
    dirs = [base / f"part{k}" for k in range(parts)]
    if all(_is_split_of(d, dataset.files[k::parts]) for k, d in enumerate(dirs)):
        return dirs
    shutil.rmtree(base, ignore_errors=True)
    for k, directory in enumerate(dirs):
        directory.mkdir(parents=True)
        for source in dataset.files[k::parts]:
            try:
                os.link(source, directory / source.name)
            except OSError:
                shutil.copy2(source, directory / source.name)
    return dirs
