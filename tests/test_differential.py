"""DCMTK storescp and dicom-ingestd side by side: same arguments, same sender, same output.

Each case runs the real `storescp ARGS -od D1 PORT1`, translates `ARGS -od D2 PORT2` with
`dicom-ingestd config from-storescp --` and runs `dicom-ingestd run -c` on the result unchanged
(so logging is as translated), sends the same files with the same storescu invocation to both,
stops both and compares the two output trees:

* the relative paths of files and directories are equal once the parts storescp derives from the
  clock or a fresh UID are replaced by placeholders (`_YYYYMMDD_HHMMSSmmm` of study
  directories, the `YYYYMMDDHHMMSSmmm[_NNNN]` of -tn names, the new UID of +uf names), and each
  object (keyed by its SOP Instance UID) lies at the same normalised path in both trees;
* each pair of files holds equal data sets: every element outside group 0002, and in group
  0002 the Media Storage SOP Class/Instance UID and the Transfer Syntax UID.

Documented differences in the file meta information, asserted as such: the Implementation Class
UID and Implementation Version Name are each receiver's own.  (The Source Application Entity
Title is *not* a difference: storescp 3.6.7 writes the calling AE title there, as we do.)
"""

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from support.daemon import REPO, STAGING, free_port
from support.data import make_study
from support.data import testdata as data_file
from support.peers import require_tool, run_tool
from support.uids import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from support.uids import RLE_LOSSLESS as RLE
from support.wait import wait_until

from dicom_ingestd.dicom.pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

DCMTK_UID_ROOT = "1.2.276.0.7230010.3"
SECOND_PATIENT = "Doe^John Smith"


# --- the files sent --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """15 uncompressed objects, in the order storescu sends them.

    Ten CT objects of one study (copies of CT_small with new SOP Instance UIDs), three CT
    objects of a second study whose patient name has a '^' and a space, MR_small, and an RT
    Plan (implicit VR little endian).  Every one is sendable with storescu's default proposal
    (all uncompressed transfer syntaxes).
    """
    folder = tmp_path_factory.mktemp("study")
    files = make_study(folder, 10, name="0-ct") + make_study(
        folder, 3, name="1-ct", patient=SECOND_PATIENT, patient_id="PID-2")
    for name in ("MR_small.dcm", "rtplan.dcm"):
        path = folder / f"9-{name}"
        path.write_bytes(data_file(name).read_bytes())
        files.append(path)
    return files


# --- the two receivers -----------------------------------------------------------------------


@dataclass
class Receiver:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_listening(receiver: Receiver, timeout: float = 15.0) -> None:
    """Wait until the receiver accepts TCP connections (the translated level hides our log)."""
    def accepts() -> bool:
        if receiver.proc.poll() is not None:
            raise AssertionError(f"{receiver.name} exited with {receiver.proc.returncode}:\n"
                                 f"{receiver.log()}")
        try:
            with socket.create_connection(("127.0.0.1", receiver.port), timeout=1.0):
                return True
        except OSError:
            return False
    wait_until(accepts, timeout, lambda: f"{receiver.name} listening on {receiver.port}:\n"
               f"{receiver.log()}", interval=0.05)


def start_storescp(tmp_path: Path, args: Sequence[str]) -> Receiver:
    require_tool("storescp")
    out = tmp_path / "storescp-out"
    out.mkdir()
    port = free_port()
    log_path = tmp_path / "storescp.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(["storescp", *args, "-od", str(out), str(port)],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path)
    receiver = Receiver("storescp", proc, port, out, log_path)
    wait_listening(receiver)
    return receiver


def translate(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_ingestd", "config", "from-storescp",
                           "--", *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def start_ingestd(tmp_path: Path, args: Sequence[str]) -> Receiver:
    out = tmp_path / "ingestd-out"
    out.mkdir()
    port = free_port()
    result = translate([*args, "-od", str(out), str(port)])
    assert result.returncode == 0, f"translation of {args} failed:\n{result.stderr}"
    config = tmp_path / "ingestd.toml"
    config.write_text(result.stdout)
    log_path = tmp_path / "ingestd.log"
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_ingestd", "run", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    receiver = Receiver("dicom-ingestd", proc, port, out, log_path)
    wait_listening(receiver)
    return receiver


@dataclass
class Side:
    receiver: Receiver
    scu: list[subprocess.CompletedProcess[str]]  # one storescu run per association

    @property
    def returncodes(self) -> list[int]:
        return [run.returncode for run in self.scu]

    @property
    def stderr(self) -> str:
        return "\n".join(run.stderr for run in self.scu)


def run_both(tmp_path: Path, receivers: list[Receiver], args: Sequence[str],
             files: Sequence[Path], scu_args: Sequence[str] = (), *,
             batches: Sequence[Sequence[Path]] = ()) -> tuple[Side, Side]:
    """Run storescp and dicom-ingestd with `args`, send `files` to each, stop both.

    With `batches`, each batch is sent by its own storescu run (its own association), one
    after the other, instead of `files` in one run.
    """
    reference = start_storescp(tmp_path, args)
    receivers.append(reference)
    ours = start_ingestd(tmp_path, args)
    receivers.append(ours)
    sides = []
    for receiver in (reference, ours):
        runs = [run_tool(["storescu", "-v", *scu_args, "127.0.0.1", str(receiver.port),
                          *map(str, batch)], timeout=120) for batch in (batches or [files])]
        sides.append(Side(receiver, runs))
    for receiver in (reference, ours):
        receiver.stop()
    return sides[0], sides[1]


# --- comparing the trees ---------------------------------------------------------------------

_STUDY_DIR_TIME = re.compile(r"(^|_)\d{8}_\d{9}$")
_TIME_NAME = re.compile(r"^\d{17}(?:_\d{4})?(?=\.)")
_UNIQUE_NAME = re.compile(r"^([A-Za-z0-9]+)\.X\.\d+(?:\.\d+)*")


def normalise(relative: Path, is_dir: bool) -> str:
    """The path with storescp's clock- and UID-generated parts replaced by placeholders."""
    parts = list(relative.parts)
    for i, part in enumerate(parts):
        if i < len(parts) - 1 or is_dir:
            parts[i] = _STUDY_DIR_TIME.sub(r"\1<YYYYMMDD_HHMMSSmmm>", part)
        else:
            part = _TIME_NAME.sub("<YYYYMMDDHHMMSSmmm>", part)
            parts[i] = _UNIQUE_NAME.sub(r"\1.X.<UID>", part)
    return "/".join(parts)


@dataclass
class Tree:
    directories: list[str]  # normalised, sorted
    objects: dict[str, tuple[str, Path]]  # SOP Instance UID -> (normalised path, path)


def read_tree(out: Path) -> Tree:
    directories: list[str] = []
    objects: dict[str, tuple[str, Path]] = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if relative.parts[0] == STAGING:
            continue
        if path.is_dir():
            directories.append(normalise(relative, True))
            continue
        assert path.is_file(), f"{path} is neither a file nor a directory"
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid not in objects, f"{uid} stored twice: {objects[uid][1]} and {path}"
        objects[uid] = (normalise(relative, False), path)
    return Tree(sorted(directories), objects)


def element_differences(reference: Dataset, ours: Dataset) -> list[str]:
    """Every data set element outside group 0002 that differs, as readable lines."""
    ref_tags = {elem.tag for elem in reference}
    our_tags = {elem.tag for elem in ours}
    lines = [f"{tag} only in storescp's file" for tag in sorted(ref_tags - our_tags)]
    lines += [f"{tag} only in ours" for tag in sorted(our_tags - ref_tags)]
    for tag in sorted(ref_tags & our_tags):
        a, b = reference[tag], ours[tag]
        if a.VR != b.VR or a.value != b.value:
            lines.append(f"{tag} {a.keyword}: storescp {a.VR} {a.repval} != ours {b.VR} "
                         f"{b.repval}")
    return lines


def compare_meta(reference: Dataset, ours: Dataset, where: str) -> None:
    ref, our = reference.file_meta, ours.file_meta
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                    "TransferSyntaxUID"):
        assert ref.get(keyword) == our.get(keyword), f"{where}: {keyword} differs"
    # Documented differences: each receiver names itself.
    assert str(ref.ImplementationClassUID).startswith(DCMTK_UID_ROOT), where
    assert our.ImplementationClassUID == IMPLEMENTATION_CLASS_UID, where
    assert str(ref.ImplementationVersionName).startswith("OFFIS_DCM"), where
    assert our.ImplementationVersionName == IMPLEMENTATION_VERSION, where
    # Not a difference: both write the calling AE title (storescu's STORESCU by default).
    assert ref.get("SourceApplicationEntityTitle") == our.get("SourceApplicationEntityTitle"), \
        f"{where}: SourceApplicationEntityTitle differs"


def assert_same_output(reference: Side, ours: Side, expected_count: int) -> Tree:
    """The two trees hold the same objects at the same (normalised) paths with equal data."""
    assert reference.returncodes == ours.returncodes, (
        f"storescu exit codes differ: storescp {reference.returncodes}, ours "
        f"{ours.returncodes}\n--- storescp side:\n{reference.stderr}\n--- our side:\n"
        f"{ours.stderr}\n--- our log:\n{ours.receiver.log()}")
    pdv = re.compile(r"Association Accepted \(Max Send PDV: (\d+)\)")
    assert pdv.findall(reference.stderr) == pdv.findall(ours.stderr), \
        "the receivers advertised different maximum PDU lengths"
    ref_tree, our_tree = read_tree(reference.receiver.out), read_tree(ours.receiver.out)
    assert our_tree.directories == ref_tree.directories, (
        f"directories differ: storescp {ref_tree.directories}, ours {our_tree.directories}")
    ref_paths = {uid: entry[0] for uid, entry in ref_tree.objects.items()}
    our_paths = {uid: entry[0] for uid, entry in our_tree.objects.items()}
    assert our_paths == ref_paths
    assert len(our_paths) == expected_count
    for uid, (relative, ref_path) in ref_tree.objects.items():
        our_path = our_tree.objects[uid][1]
        reference_ds, our_ds = dcmread(ref_path), dcmread(our_path)
        compare_meta(reference_ds, our_ds, relative)
        assert element_differences(reference_ds, our_ds) == [], relative
    staging = ours.receiver.out / STAGING
    assert not staging.exists() or list(staging.glob("*.part")) == []
    bad = [line for line in ours.receiver.log().splitlines()
           if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
    assert bad == [], "\n".join(bad)
    return our_tree


# --- the cases -------------------------------------------------------------------------------

CASES: list[tuple[list[str], list[str]]] = [
    ([], []),
    (["+B"], []),
    (["-su", "PFX"], []),
    (["-su", ""], []),
    (["-ss", "PFX"], []),
    (["-sp"], []),
    (["-fe", ".dcm"], []),
    (["-uf"], []),
    (["+xi"], []),
    (["+xb"], []),
    (["-tn"], []),
    (["+uf"], []),
    (["-aet", "FOO"], ["-aec", "FOO"]),
    (["-pdu", "65536"], []),
    (["-ss", "PFX", "-fe", ".dcm"], []),
    (["-sp", "-tn"], []),
    (["-su", "S", "+uf", "-fe", ".x"], []),
]


@pytest.mark.parametrize(("args", "scu_args"), CASES,
                         ids=[" ".join(args) or "default" for args, _ in CASES])
def test_tree_matches_storescp(tmp_path: Path, receivers: list[Receiver],
                               study_files: list[Path], args: list[str],
                               scu_args: list[str]) -> None:
    reference, ours = run_both(tmp_path, receivers, args, study_files, scu_args)
    assert ours.returncodes == [0], ours.stderr
    tree = assert_same_output(reference, ours, len(study_files))
    paths = [entry[0] for entry in tree.objects.values()]
    if "-tn" in args:
        assert all(re.fullmatch(r"(.*/)?<YYYYMMDDHHMMSSmmm>\.(CT|MR|RP)", p) for p in paths), paths
    if "+uf" in args:
        assert all(re.fullmatch(r"(.*/)?(CT|MR|RP)\.X\.<UID>(\.x)?", p) for p in paths), paths
    if "-sp" in args:
        assert any(p.startswith("Doe_John_Smith_<YYYYMMDD_HHMMSSmmm>/") for p in paths), paths
    if args == ["-fe", ".dcm"]:
        assert all(re.fullmatch(r"(CT|MR|RP)\.[0-9.]+\.dcm", p) for p in paths), paths


@pytest.mark.parametrize("args", [["-ss", "PFX"], ["-sp"], ["-ss", "PFX", "-tn"]],
                         ids=["-ss PFX", "-sp", "-ss PFX -tn"])
def test_study_sent_in_two_associations_matches_storescp(
        tmp_path: Path, receivers: list[Receiver], study_files: list[Path],
        args: list[str]) -> None:
    """One study sent by two storescu runs, then a second study, then the first again.

    storescp (single process, its default, which the translation claims to reproduce) keeps
    the current study directory across associations: the second run of the same study goes
    into the directory the first one created, and only a change of study starts a new one.
    """
    first, second = study_files[:10], study_files[10:13]
    batches = [first[:4], first[4:8], second, first[8:]]
    reference, ours = run_both(tmp_path, receivers, args, [], batches=batches)
    assert ours.returncodes == [0, 0, 0, 0], ours.stderr
    tree = assert_same_output(reference, ours, 13)
    assert len(tree.directories) == 3, tree.directories


def test_unimplemented_option_is_refused_by_name() -> None:
    """+uc (convert UN to known VRs) is not implemented: the translation fails and names it."""
    result = translate(["+uc", "-od", "/tmp", "11112"])
    assert result.returncode != 0
    assert "+uc" in result.stderr
    assert "not implemented" in result.stderr
    assert result.stdout == ""


# --- which transfer syntax each receiver accepts ---------------------------------------------

CT = "CT_small.dcm"
MR_RLE = "MR_small_RLE.dcm"
# (storescp preference, storescu options, file, the transfer syntax stored; None: not sent)
TS_CASES: list[tuple[str, list[str], str, str | None]] = [
    ("+x=", ["-R", "+C"], CT, EXPLICIT_LE),
    ("+xe", ["-R", "+C"], CT, EXPLICIT_LE),
    ("+xb", ["-R", "+C"], CT, EXPLICIT_BE),
    ("+xi", ["-R", "+C"], CT, IMPLICIT_LE),
    ("+xa", ["-R", "+C"], CT, EXPLICIT_LE),
    ("+xb", ["-xi"], CT, IMPLICIT_LE),
    ("+xr", ["-xr", "-R", "+C"], MR_RLE, RLE),
    ("+xa", ["-xr", "-R", "+C"], MR_RLE, RLE),
    # storescp and we both choose explicit LE; storescu cannot decode RLE, so nothing is sent
    ("+x=", ["-xr", "-R", "+C"], MR_RLE, None),
]


@pytest.mark.parametrize(("preference", "scu_args", "name", "expected"), TS_CASES,
                         ids=[f"{p} {' '.join(s)} {n}" for p, s, n, _ in TS_CASES])
def test_accepted_transfer_syntax_matches_storescp(
        tmp_path: Path, receivers: list[Receiver], preference: str, scu_args: list[str],
        name: str, expected: str | None) -> None:
    """storescu proposes every syntax in one context (-R +C); the acceptor's order decides."""
    reference, ours = run_both(tmp_path, receivers, [preference], [data_file(name)], scu_args)
    tree = assert_same_output(reference, ours, 0 if expected is None else 1)
    if expected is None:
        assert ours.returncodes != [0]
        return
    assert ours.returncodes == [0], ours.stderr
    for _relative, path in tree.objects.values():
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == expected
