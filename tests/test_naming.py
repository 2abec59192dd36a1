"""Tests for dicom_ingestd.worker.naming: storescp parity, and safety against hostile values.

The parity tests run the real DCMTK storescp/storescu/echoscu (required: they fail, not skip,
when DCMTK is missing) and compare what storescp wrote with what our functions compute.
Timestamps are read back from storescp's names and fed to our functions, so the comparison is
byte for byte, not just a pattern match.
"""

import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import dcmtk_facts
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from support.daemon import free_port
from support.uids import CT_IMAGE as CT
from support.uids import MR_IMAGE as MR

from dicom_ingestd.codes import Status
from dicom_ingestd.config.schema import StorageConfig
from dicom_ingestd.dcmtk.modalities import MODALITIES, modality_prefix, rename_prefix
from dicom_ingestd.errors import StorageError
from dicom_ingestd.jobs.rename import rename_filename
from dicom_ingestd.worker.naming import (
    ANONYMOUS,
    NAME_MAX,
    PLACEHOLDER,
    MissingStudyUID,
    SortMode,
    default_filename,
    patient_name_component,
    safe_component,
    study_subdirectory,
    time_filename,
    unique_filename,
)
from dicom_ingestd.worker.store import STAGING_DIR, Store, WhenTaken

WHEN = datetime(2024, 1, 2, 3, 4, 5, 678_901)
MODES: tuple[SortMode, ...] = ("conc-studies", "study-uid", "patientname")

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def assert_safe(name: str, max_len: int = NAME_MAX) -> None:
    """The contract every name we hand to the file system must meet."""
    assert SAFE_NAME.fullmatch(name), name
    assert name not in (".", "..")
    assert len(name.encode()) <= max_len
    assert Path(name).parts == (name,)
    assert safe_component(name, max_len=max_len) == name  # already safe: left alone


# ---------------------------------------------------------------------------------------------
# Modality table
# ---------------------------------------------------------------------------------------------


def test_table_has_every_row_of_dcmtk_3_6_7() -> None:
    assert len(MODALITIES) == 194


@pytest.mark.parametrize(
    ("uid", "code"),
    [
        (CT, "CT"),
        (MR, "MR"),
        ("1.2.840.10008.5.1.4.1.1.2.1", "CTe"),  # Enhanced CT
        ("1.2.840.10008.5.1.4.1.1.88.67", "SRd"),  # X-Ray Radiation Dose SR
        ("1.2.840.10008.5.1.4.1.1.481.5", "RP"),  # RT Plan
        ("1.2.840.10008.5.1.4.1.1.104.1", "PDF"),  # Encapsulated PDF
        ("1.2.840.10008.5.1.4.1.1.88.1", "SR_t"),  # draft SR text
        ("1.2.840.10008.5.1.4.1.1.501.4", "AI2"),  # DICOS 2D AIT
        ("1.2.840.10008.5.1.4.1.1.88.73", "SRq"),  # Patient Radiation Dose SR
        ("1.2.840.10008.5.1.4.1.1.88.75", "SRi"),  # DCMTK uses SRi twice
        ("1.2.840.10008.5.1.4.1.1.88.70", "SRi"),
    ],
)
def test_modality_prefix_known(uid: str, code: str) -> None:
    assert modality_prefix(uid) == code


@pytest.mark.parametrize("uid", ["", "1.2.3", "1.2.840.10008.5.1.4.1.1", CT + ".0", "CT"])
def test_modality_prefix_unknown(uid: str) -> None:
    assert modality_prefix(uid) == "UNKNOWN"
    assert modality_prefix(uid, default="OT") == "OT"


@pytest.mark.parametrize("uid", [CT + "\0", f" {CT} ", CT + "\r\n", "1.2.840.10008.5.1.4.1.1. 2"])
def test_modality_prefix_ignores_padding_like_dimse(uid: str) -> None:
    assert modality_prefix(uid) == "CT"


def test_modality_codes_are_short_safe_and_rename_well() -> None:
    for code in MODALITIES.values():
        assert re.fullmatch(r"[A-Za-z0-9_]{2,4}", code), code
        assert_safe(code)


def test_modality_table_matches_installed_libdcmdata() -> None:
    """Call DCMTK's own dcmSOPClassUIDToModality on every UID it lists or we map."""
    uids = set(dcmtk_facts.storage_sop_classes()) | set(MODALITIES) | {"1.2.3", "", CT + ".9"}
    for uid in sorted(uids):
        assert modality_prefix(uid) == dcmtk_facts.modality_of(uid), uid


# ---------------------------------------------------------------------------------------------
# safe_component
# ---------------------------------------------------------------------------------------------

HOSTILE: list[str] = [
    "../x",
    "../../../../etc/passwd",
    "/etc/passwd",
    "a/../../b",
    "\\..\\..\\windows",
    "a\x00b",
    "\x00",
    "\n",
    "\t",
    "a\nb\rc",
    "\x7f\x85\x9b",
    ".",
    "..",
    "...",
    ".hidden",
    "-rf",
    "--help",
    "-",
    "",
    " ",
    "ǅ",  # U+01C5 Latin capital D with small z caron: a single code point looking like 2
    "Ǆǅǆ",
    "\u2215etc\u2215passwd",  # division slash
    "\uff0e\uff0e\uff0fx",  # fullwidth ..
    "\u202egpj.exe",  # right-to-left override
    "a\u200bb",  # zero-width space
    "\ud800",  # lone surrogate (os.fsdecode surrogateescape)
    "x" * 10_000,
    "€" * 5_000,
    "1." * 5_000,
    "$(rm -rf /)",
    "`id`",
    "a;b|c&d>e<f",
    "'\"",
    "*?[]{}",
    "~root",
    "%s%n%x",
    "CON",
]


@pytest.mark.parametrize("max_len", [34, 64, 200, NAME_MAX])
def test_safe_component_invariants(max_len: int) -> None:
    for value in HOSTILE:
        out = safe_component(value, max_len=max_len)
        assert_safe(out, max_len)
        assert safe_component(value, max_len=max_len) == out, value  # deterministic


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("../x", "___x"),
        ("/etc/passwd", "_etc_passwd"),
        ("a\x00b", "a_b"),
        ("\n", "_"),
        (".", "_"),
        ("..", "__"),
        ("-rf", "_rf"),
        (".-.x", "___x"),
        ("x.-", "x.-"),
        ("ǅ", "_"),
        ("Müller", "M_ller"),
        ("$(rm -rf /)", "__rm_-rf___"),
        ("", PLACEHOLDER),
    ],
)
def test_safe_component_replaces_forbidden_characters(value: str, expected: str) -> None:
    out = safe_component(value)
    if expected in (value, PLACEHOLDER):
        assert out == expected
    else:
        # Lossy: the replaced form plus a hash of the original, so mangled values stay distinct.
        assert re.fullmatch(re.escape(expected) + r"_[0-9a-f]{16}", out), out


def test_values_that_clean_alike_get_distinct_names() -> None:
    groups = [("a/b", "a_b"), ("..", "__"), ("1.2/3", "1.2_3"), ("x\ny", "xy", "x_y")]
    for group in groups:
        names = {safe_component(v) for v in group}
        assert len(names) == len(group), group


def _random_uids(n: int) -> Iterator[str]:
    rng = random.Random(1234)
    for _ in range(n):
        parts = [str(rng.randrange(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(2, 9))]
        yield ".".join(parts)[:64].rstrip(".")


@pytest.mark.parametrize("uid", [CT, "1.2.3", "0", *(generate_uid() for _ in range(5))])
def test_safe_component_keeps_uids(uid: str) -> None:
    assert safe_component(uid) == uid


def test_safe_component_keeps_random_uids() -> None:
    for uid in _random_uids(2_000):
        assert safe_component(uid) == uid


def test_safe_component_long_values_do_not_collide() -> None:
    a, b = "1." * 5_000 + "1", "1." * 5_000 + "2"
    assert safe_component(a) != safe_component(b)
    assert safe_component(a).startswith("1.1.1.")
    assert len(safe_component(a)) == 200


def test_safe_component_long_multibyte_value_is_capped_in_bytes() -> None:
    out = safe_component("é" * 300, max_len=64)
    assert len(out.encode("utf-8")) <= 64
    out.encode("ascii")  # nothing left of a split code point


def test_safe_component_random_hostile_fuzz() -> None:
    rng = random.Random(99)
    alphabet = "./\\\0\n\t -~$`;|&<>*?'\"aZ09é€ǅ\u202e\ud800\U0001f600"
    for _ in range(3_000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        assert_safe(safe_component(value, max_len=100), 100)


def test_safe_component_rejects_tiny_max_len() -> None:
    with pytest.raises(ValueError, match="max_len"):
        safe_component("x", max_len=33)


# ---------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------


def test_default_filename() -> None:
    assert default_filename(CT, "1.2.3") == "CT.1.2.3"
    assert default_filename(CT, "1.2.3", ".dcm") == "CT.1.2.3.dcm"
    assert default_filename("1.2.3", "4.5", "dcm") == "UNKNOWN.4.5dcm"  # -fe is verbatim
    assert default_filename(CT, "1.2.3\0") == "CT.1.2.3"  # NUL padding, as DIMSE strips it
    assert default_filename(CT, "") == "CT.UNKNOWN"


def test_unique_filename() -> None:
    assert unique_filename(MR, "1.2.276.0.7230010.3.1.4.1", ".dcm") == (
        "MR.X.1.2.276.0.7230010.3.1.4.1.dcm"
    )


def test_time_filename() -> None:
    assert time_filename(WHEN, None, CT) == "20240102030405678.CT"
    assert time_filename(WHEN, None, CT, ".dcm") == "20240102030405678.CT.dcm"
    assert time_filename(WHEN, 0, MR, ".dcm") == "20240102030405678_0000.MR.dcm"
    assert time_filename(WHEN, 12345, "1.2") == "20240102030405678_12345.UNKNOWN"
    with pytest.raises(ValueError, match="serial"):
        time_filename(WHEN, -1, CT)


@pytest.mark.parametrize(
    ("second", "microsecond", "millis"),
    [
        (5, 678_901, "678"),
        (1, 1_999, "001"),
        (1, 1_000, "000"),  # DCMTK: in doubles 1.001 - 1 < 0.001, and the ms is truncated
        (0, 1_000, "001"),
        (59, 999_999, "999"),
        (0, 0, "000"),
    ],
)
def test_milliseconds_truncate_like_dcmtk_oftime(
    second: int, microsecond: int, millis: str
) -> None:
    when = WHEN.replace(second=second, microsecond=microsecond)
    assert time_filename(when, None, CT) == f"202401020304{second:02d}{millis}.CT"


# ---------------------------------------------------------------------------------------------
# Study subdirectories
# ---------------------------------------------------------------------------------------------


def test_study_subdirectory_modes() -> None:
    def sub(mode: SortMode, prefix: str, name: str | bytes | None = "Doe^John") -> str:
        return study_subdirectory(mode, prefix, study_uid="1.2.3", patient_name=name, when=WHEN)

    assert sub("conc-studies", "PFX") == "PFX_20240102_030405678"
    assert sub("conc-studies", "") == "20240102_030405678"
    assert sub("study-uid", "PFX") == "PFX_1.2.3"
    assert sub("study-uid", "") == "1.2.3"
    assert sub("patientname", "") == "Doe_John_20240102_030405678"
    assert sub("patientname", "ignored") == "Doe_John_20240102_030405678"
    assert sub("patientname", "", None) == "ANONYMOUS_20240102_030405678"


def test_study_uid_loses_only_its_padding() -> None:
    """storescp drops every white-space character and keeps the first of several values;
    distinct values would then share a directory.  Only padding goes here: a value that is
    not a plain UID keeps its difference as a hash suffix (issue 16)."""
    def sub(uid: str) -> str:
        return study_subdirectory("study-uid", "S", study_uid=uid, patient_name=None, when=WHEN)

    assert sub("1.2.3\0") == sub("1.2.3 ") == sub("1.2.3\0\0") == "S_1.2.3"
    variants = [" 1.2.3", "1.2. 3", "1.2.\t3", "1.2.3\n", "1.2.3\\4.5.6", "1.2.3\\7"]
    names = {sub(v) for v in variants}
    assert len(names) == len(variants) and "S_1.2.3" not in names, names
    assert all(n.startswith("S_") and len(n) < 60 for n in names), names


@pytest.mark.parametrize("uid", ["1.2.3.85.1", "1.2.3.85. 1", "1.2.3.85.\t1", "1.2.3.85.1\n",
                                 " 1.2.3.85.1", "1.2.3.85.1\\2"])
def test_sop_instance_uids_differing_in_white_space_name_distinct_files(uid: str) -> None:
    others = {"1.2.3.85.1", "1.2.3.85. 1", "1.2.3.85.\t1", "1.2.3.85.1\n", " 1.2.3.85.1",
              "1.2.3.85.1\\2"} - {uid}
    name = default_filename(CT, uid)
    assert name not in {default_filename(CT, other) for other in others}
    assert (name == "CT.1.2.3.85.1") == (uid == "1.2.3.85.1")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("uid", [None, "", "   ", "\0\0", "\0 \0 "])
def test_missing_study_uid_is_refused_in_every_mode(mode: SortMode, uid: str | None) -> None:
    with pytest.raises(MissingStudyUID) as caught:
        study_subdirectory(mode, "P", study_uid=uid, patient_name="X", when=WHEN)
    assert caught.value.status is Status.CANNOT_UNDERSTAND
    assert int(caught.value.status) == 0xC000
    assert isinstance(caught.value, ValueError)


def test_unknown_sort_mode() -> None:
    with pytest.raises(ValueError, match="sort mode"):
        study_subdirectory("nope", "P", study_uid="1", patient_name=None, when=WHEN)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Observed from storescp 3.6.7 -sp:
        (b"M\xfcller^J\xfcrgen \xdf", "Mueller_Juergen_ss"),  # ISO 8859-1
        ("Müller^ß".encode(), "MA_ller_A_"),  # UTF-8, folded byte by byte
        (b"  lead^space   ", "__lead_space"),
        (b"First\\Second", "First"),
        (b"", ANONYMOUS),
        (b"   ", ANONYMOUS),
        (None, ANONYMOUS),
        (b"Doe^John=\x1b$B^\x1b(B", "Doe_John___B___B"),
        (b"\xc4\xc6\xd7\xde\xff", "AeA__y"),
        # str input is read as ISO 8859-1:
        ("Müller^Jürgen ß", "Mueller_Juergen_ss"),
        ("山田^太郎", "_____"),
        ("../../etc", "______etc"),
        ("-rf", "_rf"),
    ],
)
def test_patient_name_component(raw: str | bytes | None, expected: str) -> None:
    assert patient_name_component(raw) == expected


def test_patient_name_folds_latin1_letters_to_ascii() -> None:
    out = patient_name_component(bytes(range(0xC0, 0x100)))
    assert out == (
        "AAAAAeAACEEEEIIII"  # À-Ï
        "DNOOOOOe_OUUUUeY_ss"  # Ð-ß
        "aaaaaeaaceeeeiiii"  # à-ï
        "dnoooooe_ouuuuey_y"  # ð-ÿ
    )


def test_patient_name_is_capped_like_any_network_value() -> None:
    out = patient_name_component(b"A" * 10_000)
    assert_safe(out, 200)
    assert out != patient_name_component(b"A" * 9_999)


# ---------------------------------------------------------------------------------------------
# --rename-on-eostudy
# ---------------------------------------------------------------------------------------------


def test_rename() -> None:
    assert rename_prefix(CT) == "CT"
    assert rename_prefix("1.2.840.10008.5.1.4.1.1.88.67") == "SR"
    assert rename_prefix("1.2.840.10008.5.1.4.1.1.88.1") == "SR"  # SR_t
    assert rename_prefix("9.9") == "UN"
    assert rename_filename("CT", 1) == "CT000001"
    assert rename_filename("MR", 1_234_567) == "MR1234567"


# ---------------------------------------------------------------------------------------------
# Every builder, fed hostile values, yields one safe component
# ---------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[str], str]] = {
    "default": lambda v: default_filename(v, v, ".dcm"),
    "default-ext": lambda v: default_filename(CT, "1.2", v),
    "unique": lambda v: unique_filename(v, v, ".dcm"),
    "time": lambda v: time_filename(WHEN, 3, v, v),
    "conc": lambda v: study_subdirectory(
        "conc-studies", v, study_uid="1", patient_name=v, when=WHEN
    ),
    "study": lambda v: study_subdirectory(
        "study-uid", v, study_uid=v.replace("\\", "/") + "1", patient_name=v, when=WHEN
    ),
    "patient": lambda v: study_subdirectory(
        "patientname", v, study_uid="1", patient_name=v, when=WHEN
    ),
    "patient-bytes": lambda v: patient_name_component(v.encode("utf-8", "surrogatepass")),
    "rename": lambda v: rename_filename(rename_prefix(v), 7),
}


DIRECTORY_BUILDERS = {"conc", "study", "patient"}  # the others name files


def _place(store: Store, directories: list[str], name: str) -> str:
    """Place a new file as the daemon does (Store.commit: relative to directory descriptors,
    link or rename, never through a symlink); return where it went."""
    temp = store.temp_file()
    temp.write(b"object")
    temp.finish(False)
    return store.commit(temp, directories, [name], replace=True, when_taken=WhenTaken.ERROR).path


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_builders_name_one_safe_component_the_store_places(builder: str,
                                                           tmp_path: Path) -> None:
    """Every builder, fed every hostile value, yields one safe component, and the daemon's
    placement puts a file there: directly in the output directory (a file name) or in one
    directory of it (a study directory), nothing anywhere else."""
    root = tmp_path / "out"
    root.mkdir()
    store = Store(StorageConfig(output_directory=str(root), fsync=False))
    store.open()
    placed = set()
    try:
        for value in HOSTILE:
            name = BUILDERS[builder](value)
            assert_safe(name)
            if builder in DIRECTORY_BUILDERS:
                path = _place(store, [name], "CT.1.2")
                assert path == os.path.join(root, name, "CT.1.2"), (value, path)
            else:
                path = _place(store, [], name)
                assert path == os.path.join(root, name), (value, path)
            placed.add(path)
    finally:
        store.close()
    found = {str(p) for p in root.rglob("*") if p.is_file() and STAGING_DIR not in p.parts}
    assert found == placed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(("directories", "name"), [
    ([], ".."), ([], "."), ([], ""), ([], "a/b"), ([], "x\0y"), (["..", "x"], "CT.1"),
    (["."], "CT.1"), (["a/../.."], "CT.1"), ([""], "CT.1"), (["/etc"], "CT.1"),
])
def test_the_store_refuses_unsafe_components(tmp_path: Path, directories: list[str],
                                             name: str) -> None:
    """The daemon's last guard, behind the builders: a component that is not one plain name
    is refused (0x0110) before anything is created, and the object is discarded."""
    root = tmp_path / "out"
    root.mkdir()
    store = Store(StorageConfig(output_directory=str(root), fsync=False))
    store.open()
    try:
        with pytest.raises(StorageError, match="refusing unsafe path component") as refused:
            _place(store, directories, name)
    finally:
        store.close()
    assert refused.value.status == Status.PROCESSING_FAILURE
    assert sorted(p.name for p in root.iterdir()) == [STAGING_DIR]
    assert list((root / STAGING_DIR).iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------
# Parity with the real storescp
# ---------------------------------------------------------------------------------------------

TIMEOUT = 60


@dataclass(frozen=True)
class Sample:
    path: Path
    sop_class: str
    sop_instance: str
    study_uid: str | None
    patient_name: bytes | None  # raw value bytes, as storescp sees them

    @property
    def default_name(self) -> str:
        return default_filename(self.sop_class, self.sop_instance)


def _sample(path: Path) -> Sample:
    ds = pydicom.dcmread(path)
    # The raw bytes, before pydicom decodes (or splits) anything: what storescp folds.
    raw = ds.get_item(0x00100010).value if 0x00100010 in ds else None
    assert raw is None or isinstance(raw, bytes)
    return Sample(path, ds.SOPClassUID, ds.SOPInstanceUID, ds.get("StudyInstanceUID"), raw)


def _variant(
    src: str, dest: Path, *, same_study: bool = False, name: bytes | None = None, charset: str = ""
) -> Sample:
    """A copy of a pydicom test file with a new instance (and study) UID, maybe a new name."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if not same_study:
        ds.StudyInstanceUID = generate_uid()
    if name is not None:
        ds.SpecificCharacterSet = charset
        ds["PatientName"].value = name  # raw bytes go out as they are
    ds.save_as(dest)
    return _sample(dest)


@dataclass(frozen=True)
class Samples:
    ct: Sample
    ct2: Sample  # same study as ct
    mr: Sample
    rt: Sample  # RT Plan, implicit VR
    dose: Sample  # RT Dose
    names: tuple[Sample, ...]  # patient-name variants, each its own study
    no_study: Sample


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    d = tmp_path_factory.mktemp("samples")

    def data(name: str) -> str:
        path = get_testdata_file(name)
        assert isinstance(path, str), name
        return path

    ct_src = data("CT_small.dcm")
    names = [
        _variant(
            ct_src, d / "pn_latin1.dcm", name=b"M\xfcller^J\xfcrgen \xdf", charset="ISO_IR 100"
        ),
        _variant(ct_src, d / "pn_utf8.dcm", name="Müller^ß".encode(), charset="ISO_IR 192"),
        _variant(ct_src, d / "pn_spaces.dcm", name=b"  lead^space   ", charset="ISO_IR 100"),
        _variant(ct_src, d / "pn_multi.dcm", name=b"First\\Second", charset="ISO_IR 100"),
        _variant(ct_src, d / "pn_empty.dcm", name=b"", charset="ISO_IR 100"),
        _variant(ct_src, d / "pn_punct.dcm", name=b"O'Brien-Smith^Dr. A.", charset="ISO_IR 100"),
    ]
    ds = pydicom.dcmread(ct_src)
    del ds.PatientName
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.save_as(d / "pn_absent.dcm")
    names.append(_sample(d / "pn_absent.dcm"))

    ds = pydicom.dcmread(ct_src)
    del ds.StudyInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(d / "no_study.dcm")

    return Samples(
        ct=_sample(Path(ct_src)),
        ct2=_variant(ct_src, d / "ct2.dcm", same_study=True),
        mr=_sample(Path(data("MR_small.dcm"))),
        rt=_sample(Path(data("rtplan.dcm"))),
        dose=_sample(Path(data("rtdose.dcm"))),
        names=tuple(names),
        no_study=_sample(d / "no_study.dcm"),
    )


@dataclass(frozen=True)
class Received:
    out: Path
    started: datetime
    finished: datetime

    def files(self) -> set[str]:
        return {p.relative_to(self.out).as_posix() for p in self.out.rglob("*") if p.is_file()}

    def dirs(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_dir())

    def plausible(self, when: datetime) -> datetime:
        """``when`` read from a name must lie within the run (local time, like storescp)."""
        slack = timedelta(seconds=2)
        assert self.started - slack <= when <= self.finished + slack, when
        return when


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"DCMTK's {name} is not on PATH; the storescp parity tests need DCMTK 3.6.7")
    return path




def _echo(port: int) -> bool:
    """C-ECHO: succeeds only once storescp has finished everything before this association."""
    done = subprocess.run(
        [_tool("echoscu"), "-aec", "STORESCP", "127.0.0.1", str(port)],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    return done.returncode == 0


def _start_storescp(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    # storescp 3.6.7 cannot bind to one address; a free loopback-probed port is the best we have.
    for _ in range(3):
        port = free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [_tool("storescp"), "--aetitle", "STORESCP", *args, str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            if _echo(port):
                return proc, port
            time.sleep(0.05)
        _stop(proc)
    pytest.fail(f"storescp did not come up: {log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def receive(
    tmp_path: Path, options: Sequence[str], files: Sequence[Sample], *, all_ok: bool = True
) -> Received:
    """Run storescp with ``options``, send ``files`` in one association, stop storescp."""
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "storescp.log"
    proc, port = _start_storescp(["-od", str(out), *options], log)
    try:
        started = datetime.now()
        sent = subprocess.run(
            [_tool("storescu"), "--no-halt", "-aec", "STORESCP", "127.0.0.1", str(port)]
            + [str(f.path) for f in files],
            capture_output=True,
            timeout=TIMEOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
            check=False,
        )
        # storescp renames (-rns) after answering; the next association waits for that.
        assert _echo(port)
        finished = datetime.now()
    finally:
        _stop(proc)
    if all_ok:
        assert sent.returncode == 0, (sent.stdout, sent.stderr, log.read_text(errors="replace"))
    return Received(out, started, finished)


STAMP = re.compile(r"(\d{4})(\d{2})(\d{2})_?(\d{2})(\d{2})(\d{2})(\d{3})")


def parse_stamp(text: str) -> datetime:
    """storescp's YYYYMMDD[_]HHMMSSmmm, as a time in the middle of that millisecond.

    The middle, so that our float emulation of DCMTK's truncation prints the same digits.
    """
    m = STAMP.fullmatch(text)
    assert m, text
    y, mo, d, h, mi, s, ms = (int(g) for g in m.groups())
    return datetime(y, mo, d, h, mi, s, ms * 1000 + 500)


def test_storescp_su_default_names(tmp_path: Path, samples: Samples) -> None:
    s = samples
    sent = [s.ct, s.mr, s.rt, s.no_study, s.ct2, s.dose]
    got = receive(tmp_path, ["-su", "PFX", "-fe", ".dcm"], sent, all_ok=False)
    expected = set()
    for f in sent:
        if f is s.no_study:  # storescp refuses it (0xC000) and writes nothing; so do we
            with pytest.raises(MissingStudyUID):
                study_subdirectory(
                    "study-uid", "PFX", study_uid=f.study_uid, patient_name=None, when=WHEN
                )
            continue
        sub = study_subdirectory(
            "study-uid", "PFX", study_uid=f.study_uid, patient_name=None, when=WHEN
        )
        expected.add(f"{sub}/{default_filename(f.sop_class, f.sop_instance, '.dcm')}")
    assert got.files() == expected


def _samples_by_default_name(samples: Sequence[Sample], ext: str = "") -> dict[str, Sample]:
    return {default_filename(f.sop_class, f.sop_instance, ext): f for f in samples}


def test_storescp_ss_timestamp_dirs(tmp_path: Path, samples: Samples) -> None:
    s = samples
    sent = [s.ct, s.ct2, s.mr, s.rt]
    got = receive(tmp_path, ["-ss", "PFX"], sent)
    by_name = _samples_by_default_name(sent)
    studies = []
    for sub in got.dirs():
        inside = sorted(p.name for p in sub.iterdir())
        members = [by_name[n] for n in inside]
        assert len({m.study_uid for m in members}) == 1
        when = got.plausible(parse_stamp(sub.name.removeprefix("PFX_")))
        ours = study_subdirectory(
            "conc-studies", "PFX", study_uid=members[0].study_uid, patient_name=None, when=when
        )
        assert ours == sub.name
        studies.append(sorted(inside))
    assert sorted(studies) == sorted(
        [sorted([s.ct.default_name, s.ct2.default_name]), [s.mr.default_name], [s.rt.default_name]]
    )


def test_storescp_sp_patient_name_dirs(tmp_path: Path, samples: Samples) -> None:
    s = samples
    sent = [s.ct, s.mr, s.rt, *s.names]
    got = receive(tmp_path, ["-sp", "-fe", ".dcm"], sent)
    by_name = _samples_by_default_name(sent, ".dcm")
    seen = []
    for sub in got.dirs():
        (only,) = [p.name for p in sub.iterdir()]  # every sample is its own study
        f = by_name[only]
        stem, stamp = sub.name[: -len("_YYYYMMDD_HHMMSSmmm")], sub.name[-18:]
        when = got.plausible(parse_stamp(stamp))
        ours = study_subdirectory(
            "patientname", "", study_uid=f.study_uid, patient_name=f.patient_name, when=when
        )
        assert ours == sub.name, (f.patient_name, stem)
        seen.append(f)
    assert sorted(f.default_name for f in seen) == sorted(f.default_name for f in sent)


def test_storescp_tn_time_names(tmp_path: Path, samples: Samples) -> None:
    s = samples
    sent = [s.ct, s.mr, s.rt, s.ct2, s.dose, s.ct]  # ct twice: a new name, never an overwrite
    got = receive(tmp_path, ["-tn", "-fe", ".dcm"], sent)
    pattern = re.compile(r"(\d{17})(?:_(\d{4,}))?\.([A-Za-z0-9_]+)\.dcm")
    parsed = []
    for name in got.files():
        m = pattern.fullmatch(name)
        assert m, name
        serial = -1 if m[2] is None else int(m[2])
        parsed.append((m[1], serial, name))
    assert len(parsed) == len(sent)
    # Objects received within one millisecond share a stamp, and then their order cannot be
    # read back from the names; so check each name on its own and the serial rule per stamp.
    by_modality = {modality_prefix(f.sop_class): f for f in sent}
    taken: set[str] = set()
    for stamp, serial, name in sorted(parsed, key=lambda p: (p[0], p[1])):
        modality = name.split(".")[1]
        sample = by_modality[modality]
        when = got.plausible(parse_stamp(stamp))
        expected = time_filename(when, None if serial < 0 else serial, sample.sop_class, ".dcm")
        assert expected == name
        if serial >= 0:  # a serial only when the plain name was already written
            assert time_filename(when, None, sample.sop_class, ".dcm") in taken, name
        taken.add(name)


def test_storescp_uf_unique_names(tmp_path: Path, samples: Samples) -> None:
    s = samples
    sent = [s.ct, s.mr, s.rt, s.dose]
    got = receive(tmp_path, ["+uf", "-fe", ".dcm"], sent)
    by_modality = {modality_prefix(f.sop_class): f for f in sent}
    assert len(by_modality) == len(sent)
    names = got.files()
    assert len(names) == len(sent)
    for name in names:
        mod, x, rest = name.split(".", 2)
        assert x == "X"
        new_uid = rest.removesuffix(".dcm")
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)+", new_uid) and len(new_uid) <= 64, new_uid
        assert unique_filename(by_modality.pop(mod).sop_class, new_uid, ".dcm") == name
    assert not by_modality


def test_storescp_rename_on_end_of_study(tmp_path: Path, samples: Samples) -> None:
    """``-ss ""``: no leading ``_``; ``-rns``: finished studies renamed, extension dropped."""
    s = samples
    sent = [s.ct, s.ct2, s.mr, s.rt]
    got = receive(tmp_path, ["-ss", "", "-rns", "-fe", ".dcm"], sent)
    subs = got.dirs()  # names are bare timestamps: sorted == received order
    assert len(subs) == 3
    for sub, first in zip(subs, [s.ct, s.mr, s.rt], strict=True):
        when = got.plausible(parse_stamp(sub.name))
        assert sub.name == study_subdirectory(
            "conc-studies", "", study_uid=first.study_uid, patient_name=None, when=when
        )
    contents = [sorted(p.name for p in sub.iterdir()) for sub in subs]
    assert contents == [
        [rename_filename(rename_prefix(CT), 1), rename_filename(rename_prefix(CT), 2)],
        [rename_filename(rename_prefix(MR), 1)],
        [default_filename(s.rt.sop_class, s.rt.sop_instance, ".dcm")],  # last study: not ended
    ]
    assert contents[0] == ["CT000001", "CT000002"]


def test_storescp_rename_with_time_names(tmp_path: Path, samples: Samples) -> None:
    """With ``-tn`` storescp finds the prefix after the timestamp: still the modality's start."""
    s = samples
    sent = [s.ct, s.ct2, s.mr, s.dose]
    got = receive(tmp_path, ["-su", "PFX", "-tn", "-rns", "-fe", ".dcm"], sent)
    expected_dirs = {
        study_subdirectory("study-uid", "PFX", study_uid=f.study_uid, patient_name=None, when=WHEN)
        for f in sent
    }
    assert {p.name for p in got.dirs()} == expected_dirs
    files = got.files()
    ct_dir = study_subdirectory(
        "study-uid", "PFX", study_uid=s.ct.study_uid, patient_name=None, when=WHEN
    )
    mr_dir = study_subdirectory(
        "study-uid", "PFX", study_uid=s.mr.study_uid, patient_name=None, when=WHEN
    )
    assert {f"{ct_dir}/CT000001", f"{ct_dir}/CT000002", f"{mr_dir}/MR000001"} <= files
    (last,) = files - {f"{ct_dir}/CT000001", f"{ct_dir}/CT000002", f"{mr_dir}/MR000001"}
    dose_dir, dose_name = last.split("/")
    m = re.fullmatch(r"(\d{17})\.RD\.dcm", dose_name)
    assert m, dose_name
    when = got.plausible(parse_stamp(m[1]))
    assert time_filename(when, None, s.dose.sop_class, ".dcm") == dose_name
    assert dose_dir == study_subdirectory(
        "study-uid", "PFX", study_uid=s.dose.study_uid, patient_name=None, when=WHEN
    )
