"""End-to-end reception: a real dicom-ingestd process and real peers on loopback.

Peers are DCMTK's tools (echoscu, storescu, dcmsend, and storescp as the reference
implementation), pynetdicom (when a test needs to read the A-ASSOCIATE-AC, send a data set's raw
bytes or misuse a presentation context on the client side) and a few raw-socket Upper Layer
helpers for what no library sends (no implementation class UID, garbage, a stalled PDU).

What is checked, besides each feature: every stored file is a valid Part 10 file whose data set
is the received one byte for byte, and no test leaves anything in the staging area.  Every
subprocess and socket is bounded by a timeout.
"""

import hashlib
import os
import re
import socket
import struct
import subprocess
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from support.daemon import STAGING, Daemon
from support.data import ct_copies, data_set_bytes
from support.data import testdata as data_file
from support.peers import echoscu, require_tool, run_tool, storescp, storescu
from support.procs import BUSY_WORKER, workers_of
from support.uids import (
    CT_IMAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    MR_IMAGE,
    SECONDARY_CAPTURE,
    VERIFICATION,
)
from support.wait import wait_until
from support.wire import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    IO_TIMEOUT,
    P_DATA_TF,
    associate,
    associate_rq,
    c_store_rq,
    connect,
    p_data,
    pdu,
    read_pdu,
)

# --- fixtures ------------------------------------------------------------------------------------


def leftovers(daemon: Daemon) -> list[Path]:
    """Anything in the staging area, and any .part file anywhere under the output directory."""
    return sorted(set(daemon.staging()) | set(daemon.out.rglob("*.part")))


@pytest.fixture
def ingestd(daemon_factory: Any) -> Iterator[Callable[..., Daemon]]:
    """daemon_factory, plus the promise checked after every test: nothing left in staging.

    Workers discard a partial object when their association ends, which may be a moment after
    the peer has given up; so the check waits a little before it fails.
    """
    started: list[Daemon] = []

    def start(settings: dict[str, dict[str, Any]] | None = None, **kw: Any) -> Daemon:
        daemon: Daemon = daemon_factory(settings, **kw)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        wait_until(lambda d=daemon: not leftovers(d), 5.0,
                   lambda d=daemon: f"an empty staging area; left in it: {leftovers(d)}\n"
                   f"log:\n{tail(d.log())}")


def tail(log: str, lines: int = 60) -> str:
    """The end of a log, without watchdog's inotify chatter (see test_idle_debug_log_is_quiet)."""
    kept = [line for line in log.splitlines() if "in-event" not in line]
    return "\n".join(kept[-lines:])


# --- Part 10 files -------------------------------------------------------------------------------

def meta_of(path: Path) -> FileMetaDataset:
    return read_file_meta_info(path)


def instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
               .SOPInstanceUID)


def assert_meta_matches(stored: Path, *, sop_class: str, sop_instance: str,
                        transfer_syntax: str) -> None:
    meta = meta_of(stored)
    assert meta.MediaStorageSOPClassUID == sop_class, stored
    assert meta.MediaStorageSOPInstanceUID == sop_instance, stored
    assert meta.TransferSyntaxUID == transfer_syntax, stored


def copy_with(source: Path, target: Path, **changes: Any) -> Path:
    """Write `source` to `target` with some elements changed (UIDs too, if asked)."""
    ds = dcmread(source)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    ds.save_as(target, enforce_file_format=True)
    return target


@cache
def dcmtk_can_read(path: Path) -> bool:
    result = subprocess.run([require_tool("dcmdump"), "-q", str(path)], capture_output=True,
                            timeout=30)
    return result.returncode == 0


@cache
def bundled_files() -> tuple[Path, ...]:
    """pydicom's bundled test files that are sendable storage objects.

    pydicom.data.get_testdata_files() would also list pydicom-data's online files and try to
    download them (this machine has no network), so only the files shipped inside the pydicom
    package are globbed.  Each file is skipped, on purpose, when:
    * pydicom cannot read it completely (no file meta / 'DICM' prefix, truncated data);
    * its file meta has no transfer syntax, or its MediaStorageSOPInstanceUID is not the data
      set's SOPInstanceUID (the C-STORE command would then not match the data set);
    * its SOP class is not a storage SOP class (or it has none);
    * its SOP Class/Instance UIDs are explicitly encoded with VR UN (rtdose_rle*): DCMTK then
      puts the first byte's hex ("31") into the C-STORE-RQ, which is not the context's class;
    * DCMTK cannot read it (dcmsend would refuse it: truncated or mis-encoded files).
    """
    chosen = []
    for path in sorted((Path(DATA_ROOT) / "test_files").glob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path)
                # the VRs as encoded in the file (elements are converted once accessed)
                encoded_vrs = {ds.get_item(kw).VR for kw in ("SOPClassUID", "SOPInstanceUID")
                               if kw in ds}
                ds.get("PixelData")
        except Exception:  # unreadable: see the docstring
            continue
        meta = ds.file_meta
        sop_class = str(ds.get("SOPClassUID", ""))
        if not meta.get("TransferSyntaxUID"):
            continue
        if not ds.get("SOPInstanceUID") or \
                meta.get("MediaStorageSOPInstanceUID") != ds.SOPInstanceUID:
            continue
        if not sop_class or uid_to_service_class(sop_class) is not StorageServiceClass:
            continue
        if "UN" in encoded_vrs:
            continue
        if not dcmtk_can_read(path):
            continue
        if odd_data_set(path):
            continue  # storescp and we abort these (test_hostile_peers.py); see even_copy()
        chosen.append(path)
    assert len(chosen) > 40, "pydicom's bundled test files changed; revisit the filter"
    return tuple(chosen)


def odd_data_set(path: Path) -> bool:
    """Is the data set after the file meta of odd length?  (image_dfl.dcm's deflated stream
    is not padded to even length, as PS3.5 A.5 asks.)"""
    data = path.read_bytes()
    return (len(data) - 144 - struct.unpack_from("<L", data, 140)[0]) % 2 == 1


def even_copy(path: Path, folder: Path) -> Path:
    """A copy whose odd data set has the trailing NUL PS3.5 asks for (deflated streams)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / path.name
    copy.write_bytes(path.read_bytes() + (b"\x00" if odd_data_set(path) else b""))
    return copy


# --- pynetdicom as the peer ----------------------------------------------------------------------


@contextmanager
def pynetdicom_association(port: int, contexts: list[tuple[str, list[str]]], *,
                           calling: str = "PYSCU") -> Iterator[Association]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = IO_TIMEOUT
    for abstract_syntax, transfer_syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, transfer_syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    try:
        assert assoc.is_established, "pynetdicom could not associate"
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


@contextmanager
def raw_data_set_sends() -> Iterator[None]:
    """Make pynetdicom send a file's data set bytes as they are in the file (no re-encoding).

    With STORE_SEND_CHUNKED_DATASET, send_c_store(path) streams the file from the end of its
    file meta, and takes the command's SOP class/instance and the transfer syntax from the file
    meta.
    """
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def store_status(assoc: Association, path: Path) -> int:
    status = assoc.send_c_store(path)
    assert "Status" in status, f"no C-STORE-RSP for {path.name}"
    return int(status.Status)


# --- a raw Upper Layer peer ----------------------------------------------------------------------


def seconds_until_dropped(sock: socket.socket, limit: float) -> float:
    """Read (discarding an A-ABORT, if any) until the daemon closes; return the time taken."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        pytest.fail(f"the daemon kept the connection open for more than {limit} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - start


# --- DCMTK helpers -------------------------------------------------------------------------------


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and STAGING not in p.parts)


def dcmsend(port: int, files: list[Path] | tuple[Path, ...]) -> subprocess.CompletedProcess[str]:
    """dcmsend every file in one association, each in its own transfer syntax."""
    return run_tool(["dcmsend", "-v", "-nh", "-dn", "-ma", "127.0.0.1", str(port),
                     *map(str, files)], timeout=120)


def dcmsend_summary(output: str) -> tuple[int, int]:
    """(objects sent to the peer, of which with status SUCCESS) from dcmsend -v's summary."""
    sent = re.search(r"sent to the peer\s*:\s*(\d+)", output)
    ok = re.search(r"with status SUCCESS\s*:\s*(\d+)", output)
    assert sent and ok, output[-3000:]
    return int(sent.group(1)), int(ok.group(1))


# =================================================================================================
# Verification
# =================================================================================================


def test_echo_succeeds_and_logs_the_calling_ae(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd()
    echoscu(daemon.port, ["-aet", "MYSCU"])
    log = daemon.wait_log("association released")
    assert re.search(r"127\.0\.0\.1:\d+ MYSCU->ANY-SCP: association requested", log), tail(log)
    assert re.search(r"MYSCU->ANY-SCP: association accepted", log), tail(log)
    assert re.search(r"MYSCU->ANY-SCP: C-ECHO \(message \d+\)", log), tail(log)


def test_idle_debug_log_is_quiet(ingestd: Callable[..., Daemon]) -> None:
    """At debug level, an idle daemon writes nothing: its log must not feed itself.

    The daemon's log here lives next to its configuration file (as with
    `run -c ./ingestd.toml 2>./ingestd.log`); the configuration watcher observes that directory.
    """
    daemon = ingestd()
    echoscu(daemon.port)
    daemon.wait_log("association released")
    time.sleep(1.0)
    before = daemon.log_path.stat().st_size
    time.sleep(1.0)
    grown = daemon.log()[before:]
    assert grown == "", f"an idle daemon logged {len(grown)} bytes in 1 s, e.g.:\n" \
                        f"{grown[:600]}"


# =================================================================================================
# Storage across transfer syntaxes: nothing is re-encoded
# =================================================================================================


def test_dcmsend_every_bundled_file_is_stored_once_as_sent(
        ingestd: Callable[..., Daemon], tmp_path: Path) -> None:
    """dcmsend proposes each file's own transfer syntax; we accept all (storescp +xa).

    DCMTK re-encodes data sets when it sends them, so the bytes on the wire are not always the
    file's: the reference for "as sent" is what storescp +B (bit-preserving) writes for the very
    same dcmsend command.
    """
    files = bundled_files()
    daemon = ingestd({"negotiation": {"preferred_transfer_syntax": "all"},
                      "storage": {"filenames": "unique"}})
    result = dcmsend(daemon.port, files)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert dcmsend_summary(result.stdout + result.stderr) == (len(files), len(files))
    stored = daemon.files()
    assert len(stored) == len(files), [p.name for p in stored]

    # Every object once, with a file meta that names it.
    def identity(meta: FileMetaDataset) -> tuple[str, str]:
        return str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)

    for path in stored:
        assert meta_of(path).MediaStorageSOPInstanceUID == instance_uid(path), path.name
    assert Counter(identity(meta_of(p)) for p in stored) == \
        Counter(identity(meta_of(p)) for p in files)
    # Compressed objects keep their transfer syntax (dcmsend -dn never converts them).
    stored_syntaxes = Counter((*identity(meta_of(p)), str(meta_of(p).TransferSyntaxUID))
                              for p in stored)
    for path in files:
        meta = meta_of(path)
        if meta.TransferSyntaxUID.is_compressed:
            assert stored_syntaxes[(*identity(meta), str(meta.TransferSyntaxUID))], path.name

    # The same transfer syntaxes as storescp +xa chose, and byte for byte what went over the
    # wire.
    reference = tmp_path / "storescp-B"
    with storescp(["+B", "+xa", "+uf"], reference) as port:
        again = dcmsend(port, files)
    assert dcmsend_summary(again.stdout + again.stderr) == (len(files), len(files))
    theirs = files_under(reference)
    assert stored_syntaxes == Counter(
        (*identity(meta_of(p)), str(meta_of(p).TransferSyntaxUID)) for p in theirs)
    expected = Counter(data_set_bytes(p) for p in theirs)
    received = Counter(data_set_bytes(p) for p in stored)
    assert received == expected, (
        f"{sum((expected - received).values())} data set(s) differ from what storescp +B "
        "stored for the same dcmsend")


def send_raw_and_check(daemon: Daemon, files: tuple[Path, ...] | list[Path]) -> None:
    """Send each file's data set bytes (own transfer syntax, one context per class/syntax pair);
    every one must be stored once with exactly those bytes and a file meta naming it."""
    metas = {path: meta_of(path) for path in files}
    contexts = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                       for m in metas.values()})
    assert len(contexts) <= 128
    with raw_data_set_sends(), pynetdicom_association(
            daemon.port, [(cls, [ts]) for cls, ts in contexts]) as assoc:
        statuses = {path.name: store_status(assoc, path) for path in files}
    assert statuses == dict.fromkeys(statuses, 0x0000)

    stored = daemon.files()
    assert len(stored) == len(files)
    by_bytes = {data_set_bytes(p): p for p in stored}
    for path in files:
        original = data_set_bytes(path)
        assert original in by_bytes, f"{path.name}: no stored file has its data set bytes"
        meta = metas[path]
        assert_meta_matches(by_bytes[original], sop_class=meta.MediaStorageSOPClassUID,
                            sop_instance=meta.MediaStorageSOPInstanceUID,
                            transfer_syntax=meta.TransferSyntaxUID)


def test_raw_data_sets_of_every_bundled_file_are_stored_unchanged(
        ingestd: Callable[..., Daemon], tmp_path: Path) -> None:
    """A peer that sends the file's own data set bytes: the stored data set is those bytes,
    for uncompressed, deflated, encapsulated and big endian transfer syntaxes alike."""
    daemon = ingestd({"negotiation": {"preferred_transfer_syntax": "all"},
                      "storage": {"filenames": "unique"}})
    deflated = even_copy(data_file("image_dfl.dcm"), tmp_path / "even")
    send_raw_and_check(daemon, (*bundled_files(), deflated))


def test_bit_preserving_stores_the_sent_bytes(ingestd: Callable[..., Daemon],
                                              tmp_path: Path) -> None:
    daemon = ingestd({"storage": {"bit_preserving": True, "filenames": "unique"},
                      "negotiation": {"preferred_transfer_syntax": "all"}})
    send_raw_and_check(daemon, [even_copy(data_file(name), tmp_path / "even") for name in (
        "CT_small.dcm", "MR_small_padded.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
        "MR_small_RLE.dcm", "JPEG2000.dcm")])


# =================================================================================================
# Transfer syntax preference: the same choice as storescp for the same proposal
# =================================================================================================


@pytest.mark.parametrize(("source", "preference", "storescp_option", "expected"), [
    ("CT_small.dcm", "uncompressed", [], EXPLICIT_LE),
    ("CT_small.dcm", "implicit", ["+xi"], IMPLICIT_LE),
    # storescu proposes the file's own syntax in a context of its own too, and sends in it when
    # that context is accepted: a big endian preference still ends in explicit little endian.
    ("CT_small.dcm", "big", ["+xb"], EXPLICIT_LE),
    # an implicit VR file is proposed with every uncompressed syntax; ours come first
    ("MR_small_implicit.dcm", "uncompressed", [], EXPLICIT_LE),
    ("MR_small_implicit.dcm", "implicit", ["+xi"], IMPLICIT_LE),
])
def test_transfer_syntax_preference_matches_storescp(
        ingestd: Callable[..., Daemon], tmp_path: Path, source: str, preference: str,
        storescp_option: list[str], expected: str) -> None:
    """storescu's default proposal of a file; the syntax accepted is the one storescp accepts."""
    path = data_file(source)
    daemon = ingestd({"negotiation": {"preferred_transfer_syntax": preference}})
    storescu(daemon.port, path)
    [ours] = daemon.files()
    with storescp(storescp_option, tmp_path / "ref") as port:
        storescu(port, path)
    [theirs] = files_under(tmp_path / "ref")
    assert (meta_of(ours).TransferSyntaxUID, meta_of(theirs).TransferSyntaxUID) == \
        (expected, expected)
    assert ours.name == theirs.name
    assert data_set_bytes(ours) == data_set_bytes(theirs)  # storescp -B re-encodes nothing here


# =================================================================================================
# File names and sorting (the exact formats are unit-tested in test_naming.py)
# =================================================================================================

CT_UID = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
CT_STUDY_UID = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"


def stored_names(daemon: Daemon) -> list[str]:
    return [p.relative_to(daemon.out).as_posix() for p in daemon.files()]


def test_default_names_are_modality_dot_uid(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd()
    mr = data_file("MR_small.dcm")
    storescu(daemon.port, data_file("CT_small.dcm"), mr)
    assert sorted(stored_names(daemon)) == sorted([f"CT.{CT_UID}", f"MR.{instance_uid(mr)}"])


def test_filename_extension_is_appended(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"storage": {"filename_extension": ".dcm"}})
    storescu(daemon.port, data_file("CT_small.dcm"))
    assert stored_names(daemon) == [f"CT.{CT_UID}.dcm"]


def test_sort_on_study_uid_with_prefix(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"storage": {"sort": "study-uid", "sort_prefix": "ST"}})
    storescu(daemon.port, data_file("CT_small.dcm"))
    assert stored_names(daemon) == [f"ST_{CT_STUDY_UID}/CT.{CT_UID}"]


def test_timenames_give_every_object_of_one_association_its_own_file(
        ingestd: Callable[..., Daemon], tmp_path: Path) -> None:
    copies = ct_copies(tmp_path / "copies", 20, "ct")
    daemon = ingestd({"storage": {"filenames": "timenames"}})
    storescu(daemon.port, *copies)
    log = daemon.wait_log("association released")
    assert re.search(r"association released: 20 stored, 0 failed", log), tail(log)
    names = stored_names(daemon)
    assert len(names) == 20
    assert all(re.fullmatch(r"\d{17}(_\d{4})?\.CT", name) for name in names), names
    assert {instance_uid(p) for p in daemon.files()} == {instance_uid(p) for p in copies}


def test_unique_names_keep_every_copy(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"storage": {"filenames": "unique"}})
    ct = data_file("CT_small.dcm")
    storescu(daemon.port, ct)
    storescu(daemon.port, ct)
    names = stored_names(daemon)
    assert len(names) == 2
    assert all(re.fullmatch(r"CT\.X\.[0-9.]+", name) for name in names), names
    assert all(instance_uid(p) == CT_UID for p in daemon.files())


# =================================================================================================
# Duplicates
# =================================================================================================


@pytest.fixture
def two_versions(tmp_path: Path) -> tuple[Path, Path]:
    """CT_small, and a copy with the same UIDs but another PatientName."""
    first = data_file("CT_small.dcm")
    second = copy_with(first, tmp_path / "second.dcm", PatientName="SECOND^COPY")
    assert instance_uid(second) == instance_uid(first)
    return first, second


def patient_name(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).PatientName)


def test_duplicates_overwrite(ingestd: Callable[..., Daemon],
                              two_versions: tuple[Path, Path]) -> None:
    daemon = ingestd({"storage": {"duplicates": "overwrite"}})
    storescu(daemon.port, two_versions[0])
    storescu(daemon.port, two_versions[1])
    [stored] = daemon.files()
    assert stored.name == f"CT.{CT_UID}"
    assert patient_name(stored) == "SECOND^COPY"


def test_duplicates_keep_first(ingestd: Callable[..., Daemon],
                               two_versions: tuple[Path, Path]) -> None:
    daemon = ingestd({"storage": {"duplicates": "keep-first"}})
    storescu(daemon.port, two_versions[0])
    second = storescu(daemon.port, two_versions[1], extra=["-v"])
    assert "Received Store Response (Success)" in second.stdout + second.stderr
    [stored] = daemon.files()
    assert patient_name(stored) == patient_name(two_versions[0]) != "SECOND^COPY"
    daemon.wait_log("kept the first copy")


def test_duplicates_keep_both(ingestd: Callable[..., Daemon],
                              two_versions: tuple[Path, Path]) -> None:
    daemon = ingestd({"storage": {"duplicates": "keep-both"}})
    storescu(daemon.port, two_versions[0])
    storescu(daemon.port, two_versions[1])
    assert sorted(stored_names(daemon)) == [f"CT.{CT_UID}", f"CT.{CT_UID}_1"]
    assert patient_name(daemon.out / f"CT.{CT_UID}") == patient_name(two_versions[0])
    assert patient_name(daemon.out / f"CT.{CT_UID}_1") == "SECOND^COPY"


def test_duplicates_reject_answers_0111(ingestd: Callable[..., Daemon],
                                        two_versions: tuple[Path, Path]) -> None:
    daemon = ingestd({"storage": {"duplicates": "reject"}})
    storescu(daemon.port, two_versions[0])
    second = storescu(daemon.port, two_versions[1], extra=["-d"], check=False)
    output = second.stdout + second.stderr
    assert re.search(r"Status\s*:\s*0x0111", output), output[-3000:]
    assert "Received Store Response (Success)" not in output
    [stored] = daemon.files()
    assert patient_name(stored) == patient_name(two_versions[0])
    daemon.wait_log("failed with 0x0111")


# =================================================================================================
# Association policy
# =================================================================================================


def test_refuse_rejects_every_association(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"association": {"refuse": True}})
    result = echoscu(daemon.port, check=False)
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    daemon.wait_log("association rejected")


def test_require_called_aetitle(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"association": {"require_called_aetitle": True}})
    wrong = echoscu(daemon.port, ["-aec", "WRONG"], check=False)
    assert wrong.returncode != 0
    assert re.search(r"called AE title not recognized", wrong.stdout + wrong.stderr, re.I), \
        wrong.stdout + wrong.stderr
    log = daemon.wait_log("association rejected")
    assert re.search(r"association rejected: called AE title 'WRONG'", log), tail(log)
    echoscu(daemon.port, ["-aec", "STORESCP"])


def test_allowed_calling_aetitles(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"association": {"allowed_calling_aetitles": ["GOODSCU"]}})
    bad = echoscu(daemon.port, ["-aet", "BADSCU"], check=False)
    assert bad.returncode != 0
    assert re.search(r"calling AE title not recognized", bad.stdout + bad.stderr, re.I), \
        bad.stdout + bad.stderr
    daemon.wait_log("calling AE title 'BADSCU' is not allowed")
    echoscu(daemon.port, ["-aet", "GOODSCU"])


def test_reject_without_implementation_uid(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"association": {"reject_without_implementation_uid": True}})
    verification = [(1, VERIFICATION, [IMPLICIT_LE])]
    with connect(daemon.port) as sock:
        sock.sendall(associate_rq(verification, implementation_uid=None, version_name=None))
        pdu_type, body = read_pdu(sock)
    assert pdu_type == A_ASSOCIATE_RJ
    assert tuple(body[1:4]) == (1, 1, 1)  # rejected permanent, service user, no reason given
    daemon.wait_log("no implementation class UID")
    with connect(daemon.port) as sock:
        sock.sendall(associate_rq(verification))
        pdu_type, _ = read_pdu(sock)
    assert pdu_type == A_ASSOCIATE_AC


@pytest.mark.parametrize("max_pdu", [32768, 4096, 131072])
def test_max_pdu_is_advertised(ingestd: Callable[..., Daemon], max_pdu: int) -> None:
    daemon = ingestd({"network": {"max_pdu": max_pdu}})
    with pynetdicom_association(daemon.port, [(CT_IMAGE, [EXPLICIT_LE])]) as assoc:
        assert assoc.acceptor.maximum_length == max_pdu
        assert store_status(assoc, data_file("CT_small.dcm")) == 0x0000
    assert stored_names(daemon) == [f"CT.{CT_UID}"]


@pytest.mark.parametrize("peer_max_pdu", [128, 0])
def test_packed_pdvs_and_the_peers_max_pdu(ingestd: Callable[..., Daemon],
                                           peer_max_pdu: int) -> None:
    """A raw peer packs the command and the first data fragment into one P-DATA-TF, and says it
    receives PDUs of at most 128 bytes (or unlimited: 0); the response respects that."""
    daemon = ingestd()
    ct = data_file("CT_small.dcm")
    data_set = data_set_bytes(ct)
    with connect(daemon.port) as sock:
        sock.sendall(associate_rq([(1, CT_IMAGE, [EXPLICIT_LE])], max_pdu=peer_max_pdu))
        assert read_pdu(sock)[0] == A_ASSOCIATE_AC
        command = c_store_rq(CT_IMAGE, CT_UID)
        first, rest = data_set[:1000], data_set[1000:]
        pdvs = (struct.pack(">LBB", len(command) + 2, 1, 0x03) + command
                + struct.pack(">LBB", len(first) + 2, 1, 0x00) + first)
        sock.sendall(pdu(P_DATA_TF, pdvs))
        for offset in range(0, len(rest), 8000):
            last = offset + 8000 >= len(rest)
            sock.sendall(p_data(1, 0x02 if last else 0x00, rest[offset:offset + 8000]))
        response = b""
        while True:
            pdu_type, body = read_pdu(sock)
            assert pdu_type == P_DATA_TF
            if peer_max_pdu:
                assert len(body) <= peer_max_pdu
            response += body[6:]
            if body[5] & 0x02:
                break
        sock.sendall(struct.pack(">BxL", 0x05, 4) + bytes(4))  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06
    status = dcmread(BytesIO(response), force=True)
    assert status.Status == 0x0000
    [stored] = daemon.files()
    assert data_set_bytes(stored) == data_set


# =================================================================================================
# storescp's test aids
# =================================================================================================


def test_ignore_answers_success_and_stores_nothing(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"testing": {"ignore": True}})
    result = storescu(daemon.port, data_file("CT_small.dcm"), extra=["-v"])
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    daemon.wait_log("association released")
    assert daemon.files() == []


def test_abort_after(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"testing": {"abort_after": True}})
    result = storescu(daemon.port, data_file("CT_small.dcm"), check=False)
    assert result.returncode != 0
    daemon.wait_log("aborting association: testing.abort_after")
    assert daemon.files() == []
    echoscu(daemon.port)


def test_abort_during_a_multi_pdu_object(ingestd: Callable[..., Daemon]) -> None:
    ct = data_file("CT_small.dcm")
    assert ct.stat().st_size > 16384 * 2
    daemon = ingestd({"testing": {"abort_during": True}, "network": {"max_pdu": 16384}})
    result = storescu(daemon.port, ct, check=False)
    assert result.returncode != 0
    daemon.wait_log("aborting association: testing.abort_during")
    assert daemon.files() == []
    wait_until(lambda: not leftovers(daemon), 5.0, lambda: f"no leftovers: {leftovers(daemon)}")
    echoscu(daemon.port)


def test_sleep_after_still_succeeds(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"testing": {"sleep_after": 1}})
    start = time.monotonic()
    storescu(daemon.port, data_file("CT_small.dcm"))
    assert time.monotonic() - start >= 1.0
    assert stored_names(daemon) == [f"CT.{CT_UID}"]


# =================================================================================================
# Failures are answered, and the daemon goes on serving
# =================================================================================================


def test_data_set_not_matching_the_command_is_answered_a900(
        ingestd: Callable[..., Daemon], tmp_path: Path) -> None:
    """The command's SOP instance comes from the file meta, the data set keeps its own UID."""
    mismatched = tmp_path / "mismatched.dcm"
    ds = dcmread(data_file("CT_small.dcm"))
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(mismatched)  # enforce_file_format would make the file meta match again
    daemon = ingestd()
    with raw_data_set_sends(), pynetdicom_association(
            daemon.port, [(CT_IMAGE, [EXPLICIT_LE])]) as assoc:
        assert store_status(assoc, mismatched) == 0xA900
        # the association goes on: a good object is still stored
        assert store_status(assoc, data_file("CT_small.dcm")) == 0x0000
    assert stored_names(daemon) == [f"CT.{CT_UID}"]
    daemon.wait_log("failed with 0xA900")
    echoscu(daemon.port)


def test_sop_class_on_another_context_is_refused(ingestd: Callable[..., Daemon]) -> None:
    """An MR object sent on the CT context (client-side misuse of pynetdicom)."""
    daemon = ingestd()
    with pynetdicom_association(daemon.port, [(CT_IMAGE, [EXPLICIT_LE]),
                                              (MR_IMAGE, [EXPLICIT_LE])]) as assoc:
        [ct_context] = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CT_IMAGE]
        real = assoc._get_valid_context
        assoc._get_valid_context = lambda *args, **kwargs: ct_context  # type: ignore[method-assign]
        try:
            status = store_status(assoc, data_file("MR_small.dcm"))
        finally:
            assoc._get_valid_context = real  # type: ignore[method-assign]
        assert status != 0x0000
        assert status == 0x0122
        assert store_status(assoc, data_file("MR_small.dcm")) == 0x0000
    assert [n.split(".")[0] for n in stored_names(daemon)] == ["MR"]
    echoscu(daemon.port)


# =================================================================================================
# Misbehaving peers
# =================================================================================================


def test_garbage_is_answered_with_abort_or_close(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd()
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\xff" * 64,
                    struct.pack(">BxL", A_ASSOCIATE_RQ, 20) + b"\x00" * 20):
        with connect(daemon.port) as sock:
            sock.sendall(garbage)
            sock.settimeout(5.0)
            try:
                reply = sock.recv(16)
            except ConnectionResetError:
                reply = b""
            assert reply == b"" or reply[0] == A_ABORT, (garbage, reply)
            seconds_until_dropped(sock, 5.0)
        echoscu(daemon.port)


def test_garbage_inside_an_association_is_answered_with_abort(
        ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd()
    for garbage in (b"\xff" * 64,  # unknown PDU type
                    struct.pack(">BxL", A_ASSOCIATE_RQ, 4) + b"\0" * 4,  # unexpected PDU
                    p_data(9, 0x03, c_store_rq(CT_IMAGE, generate_uid())),  # unknown context
                    p_data(1, 0x02, b"\x08\x00\x10\x00")):  # data set without a command
        with associate(daemon.port, [(1, CT_IMAGE, [EXPLICIT_LE])]).sock as sock:
            sock.sendall(garbage)
            pdu_type, _body = read_pdu(sock)
            assert pdu_type == A_ABORT, (garbage, pdu_type)
            seconds_until_dropped(sock, 5.0)
        echoscu(daemon.port)


def test_silent_peer_is_dropped_after_acse_timeout(ingestd: Callable[..., Daemon]) -> None:
    daemon = ingestd({"network": {"acse_timeout": 1}})
    with connect(daemon.port) as sock:
        elapsed = seconds_until_dropped(sock, 5.0)
    assert 0.8 <= elapsed <= 3.0, elapsed
    echoscu(daemon.port)


def _stall_in_associate_rq(sock: socket.socket) -> None:
    rq = associate_rq([(1, CT_IMAGE, [EXPLICIT_LE])])
    sock.sendall(rq[:len(rq) // 2])


def _stall_in_command(sock: socket.socket) -> None:
    _associate_on(sock)
    packet = p_data(1, 0x03, c_store_rq(CT_IMAGE, generate_uid()))
    sock.sendall(packet[:len(packet) - 20])


def _stall_in_data_set(sock: socket.socket) -> None:
    _associate_on(sock)
    sock.sendall(p_data(1, 0x03, c_store_rq(CT_IMAGE, generate_uid())))
    announced = 1000
    sock.sendall(struct.pack(">BxL", P_DATA_TF, announced)
                 + struct.pack(">LBB", announced - 4, 1, 0x00) + b"\x08\x00" * 50)


def _associate_on(sock: socket.socket) -> None:
    sock.sendall(associate_rq([(1, CT_IMAGE, [EXPLICIT_LE])]))
    pdu_type, _body = read_pdu(sock)
    assert pdu_type == A_ASSOCIATE_AC


@pytest.mark.parametrize("stall", [_stall_in_associate_rq, _stall_in_command, _stall_in_data_set],
                         ids=["associate-rq", "command", "data-set"])
def test_peer_stalled_mid_pdu_is_dropped(ingestd: Callable[..., Daemon],
                                         stall: Callable[[socket.socket], None]) -> None:
    """Half a PDU, then nothing: dropped after socket_timeout; another peer is served meanwhile.

    acse_timeout stays at its default (30 s), so only socket_timeout can end the stall.
    """
    daemon = ingestd({"network": {"socket_timeout": 1}})
    with connect(daemon.port) as sock:
        stall(sock)
        stalled = time.monotonic()
        storescu(daemon.port, data_file("CT_small.dcm"))
        seconds_until_dropped(sock, 5.0)
        elapsed = time.monotonic() - stalled
    assert elapsed <= 3.0, elapsed
    log = daemon.wait_log("dropping the association")
    assert "stored 1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322" in log
    assert stored_names(daemon) == [f"CT.{CT_UID}"]
    echoscu(daemon.port)


# =================================================================================================
# A large object streams through bounded memory
# =================================================================================================

LARGE_PIXELS = 1024 * 1024 * 2 * 100  # 100 frames of 1024x1024 16-bit: 200 MiB


@pytest.fixture(scope="module")
def large_object(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A ~200 MiB Secondary Capture file (written in pieces) and its pixel data's SHA-256."""
    path = tmp_path_factory.mktemp("large") / "large.dcm"
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "LARGE^OBJECT"
    ds.PatientID = "LARGE"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = 100
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, LARGE_PIXELS))
        for i in range(LARGE_PIXELS >> 20):
            chunk = bytes([i & 0xFF]) + block[1:]  # no two MiB alike
            digest.update(chunk)
            fh.write(chunk)
    return path, digest.hexdigest()


def pixel_data_digest(path: Path, length: int) -> str:
    """SHA-256 of a file's PixelData value, which must be its last element (explicit VR LE,
    `length` bytes); read from disk in pieces."""
    offset = path.stat().st_size - length
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset - 12)
        assert fh.read(12) == struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length)
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of a process in bytes (None when it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) * 1024 if match else None


@pytest.mark.parametrize("process_model", ["single", "fork"])
def test_large_object_streams_in_bounded_memory(
        ingestd: Callable[..., Daemon], large_object: tuple[Path, str],
        process_model: str) -> None:
    path, digest = large_object
    daemon = ingestd({"workers": {"process_model": process_model}})
    echoscu(daemon.port)  # warm up: the first association imports what serving needs
    daemon.wait_log("association released")
    baseline = vm_hwm(daemon.proc.pid)
    assert baseline

    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        # The worker serving the association (it may exit with it): sample every worker's
        # VmHWM while the transfer runs.
        while not done.is_set():
            pids = [daemon.proc.pid, *workers_of(daemon.proc.pid, BUSY_WORKER)]
            for pid in pids:
                peak = vm_hwm(pid)
                if peak is not None:
                    peaks[pid] = max(peaks.get(pid, 0), peak)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        storescu(daemon.port, path, timeout=180)
    finally:
        done.set()
        sampler.join(5)
    master_peak = vm_hwm(daemon.proc.pid)
    assert master_peak is not None
    peaks[daemon.proc.pid] = max(peaks.get(daemon.proc.pid, 0), master_peak)
    if process_model == "fork":
        assert len(peaks) >= 2, "never saw the worker process"
    limit = baseline + 64 * 1024 * 1024
    assert max(peaks.values()) < limit, \
        f"peak RSS {max(peaks.values()) >> 20} MiB, baseline {baseline >> 20} MiB"

    [stored] = daemon.files()
    assert pixel_data_digest(stored, LARGE_PIXELS) == digest
    assert meta_of(stored).MediaStorageSOPInstanceUID == meta_of(path).MediaStorageSOPInstanceUID


def test_host_lookup_names_the_peer_when_enabled(daemon_factory: Any) -> None:
    d = daemon_factory({"network": {"disable_host_lookup": False}})
    echoscu(d.port, ["-aet", "NAMED"])
    log = d.wait_log("C-ECHO")
    assert re.search(r"localhost:\d+ NAMED->ANY-SCP: association accepted", log), log


# --- storescp -pm (negotiation.promiscuous), against the daemon ----------------------------


@pytest.mark.parametrize("promiscuous", [True, False])
def test_promiscuous_mode_stores_a_private_sop_class(ingestd: Callable[..., Daemon],
                                                     promiscuous: bool) -> None:
    """A private SOP class DCMTK cannot name: accepted and stored with -pm, refused without,
    while a known class is negotiated alike in both modes."""
    private = "1.2.826.0.1.3680043.2.1545.22.7"
    daemon = ingestd({"negotiation": {"promiscuous": promiscuous}})
    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = private
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ae = AE(ae_title="PMTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(private, [EXPLICIT_LE])
    ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", daemon.port)
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert CT_IMAGE in accepted
        assert (private in accepted) == promiscuous, accepted
        if promiscuous:
            status = assoc.send_c_store(ds)
            assert int(status.Status) == 0x0000
    finally:
        assoc.release()
    stored = [p for p in daemon.out.rglob("*") if ds.SOPInstanceUID in p.name]
    if promiscuous:
        assert len(stored) == 1, stored
        assert dcmread(stored[0]).SOPClassUID == private
    else:
        assert stored == []
