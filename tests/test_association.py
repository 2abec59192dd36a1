"""The receive path against real peers: negotiation, storage, policies, test aids, failures.

DCMTK's storescu/echoscu/dcmsend are the peers wherever they can express the case; pynetdicom
(or raw bytes) only where a client must send something DCMTK will not.
"""

import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import Daemon, echoscu, run_tool, storescu
from conftest import testdata as bundled
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context as context_for

CT = "1.2.840.10008.5.1.4.1.1.2"
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def data_set_bytes(path: Path) -> bytes:
    """Everything after the File Meta Information."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", path
    group_length = struct.unpack_from("<L", raw, 132 + 8)[0]
    return raw[132 + 12 + group_length:]


def ct_copy(tmp_path: Path, name: str, **changes: Any) -> Path:
    ds = dcmread(bundled("CT_small.dcm"))
    # storescu drops the trailing padding element; keep files comparable byte for byte.
    if (0xFFFC, 0xFFFC) in ds:
        del ds[0xFFFC, 0xFFFC]
    ds.SOPInstanceUID = changes.pop("SOPInstanceUID", generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def status_of(result: Any) -> str:
    """The DIMSE status storescu reports (needs -v), e.g. '0x0111'."""
    found = re.findall(r"Received Store Response \(([^)]*)\)", result.stderr + result.stdout)
    return found[-1] if found else ""


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def scu_ae() -> Iterator[AE]:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    yield ae
    ae.shutdown()


# -- verification and storage ---------------------------------------------------------------

def test_echo_is_answered_and_logged_with_the_calling_ae(daemon: Daemon) -> None:
    echoscu(daemon.port, ["-aet", "MYSCU"])
    log = daemon.wait_log("C-ECHO")
    assert re.search(r"127\.0\.0\.1:\d+ MYSCU->ANY-SCP: association accepted", log), log


def _sendable_test_files() -> list[Path]:
    """pydicom's bundled files that are complete Part 10 storage objects."""
    chosen = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=True)
            meta = ds.file_meta
            sop_class = str(meta.MediaStorageSOPClassUID)
        except Exception:  # not a Part 10 file, or a deliberately broken one
            continue
        if (not ds.preamble or "FileMetaInformationGroupLength" not in meta
                or not sop_class.startswith("1.2.840.10008.5.1.4.1.1.")
                or meta.MediaStorageSOPInstanceUID != ds.get("SOPInstanceUID")):
            continue
        chosen.append(path)
    return chosen


def _without_group_lengths(ds: Any) -> dict[int, Any]:
    """Elements and values, group lengths (which senders may recompute) left out."""
    # (FFFC,FFFC) trailing padding is dropped by DCMTK's senders.
    return {int(elem.tag): elem.value for elem in ds
            if elem.tag.element != 0 and elem.tag != 0xFFFCFFFC}


def test_every_bundled_transfer_syntax_is_stored_bit_for_bit(daemon_factory: Any,
                                                              tmp_path: Path) -> None:
    d = daemon_factory({"negotiation": {"preferred_transfer_syntax": "all"},
                        "storage": {"duplicates": "keep-both"}})
    files = _sendable_test_files()
    assert len(files) > 20
    report = tmp_path / "report.txt"
    # dcmsend proposes each file's own transfer syntax and never converts (-dn).
    run_tool(["dcmsend", "-nh", "-dn", "-nuc", "+crf", str(report), "127.0.0.1", str(d.port),
              *map(str, files)], timeout=120)
    stored = {str(dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID):
              p for p in d.files()}
    syntaxes = set()
    compared = 0
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        uid = str(ds.SOPInstanceUID)
        if uid not in stored:
            continue
        if sum(1 for f in files if dcmread(f, stop_before_pixels=True).SOPInstanceUID
               == uid) == 1:  # several bundled files share a UID; compare the unique ones
            ours = dcmread(stored[uid], stop_before_pixels=True)
            if ours.file_meta.TransferSyntaxUID != ds.file_meta.TransferSyntaxUID:
                # dcmsend also proposes the uncompressed syntaxes and converts between them
                # itself when we prefer another one (as storescp would): nothing to compare.
                assert {ours.file_meta.TransferSyntaxUID, ds.file_meta.TransferSyntaxUID} <= \
                    UNCOMPRESSED, path.name
                continue
            if data_set_bytes(stored[uid]) != data_set_bytes(path):
                # dcmsend itself rewrites some files (e.g. recomputed group lengths): then
                # what we stored must still be what it sent, element for element.
                assert _without_group_lengths(dcmread(stored[uid])) == \
                    _without_group_lengths(dcmread(path)), path.name
            compared += 1
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    assert compared >= 20, compared
    assert len(syntaxes) >= 8, syntaxes
    assert d.staging() == []


def test_preference_decides_like_storescp(daemon_factory: Any, tmp_path: Path) -> None:
    ct = ct_copy(tmp_path, "ct.dcm")
    for preference, expected in (("uncompressed", "1.2.840.10008.1.2.1"),
                                 ("implicit", "1.2.840.10008.1.2"),
                                 ("big", "1.2.840.10008.1.2.2")):
        d = daemon_factory({"negotiation": {"preferred_transfer_syntax": preference}})
        storescu(d.port, ct, extra=["-R", "+C"])  # one context: the acceptor's order decides
        (stored,) = d.files()
        assert dcmread(stored).file_meta.TransferSyntaxUID == expected, preference


def test_bit_preserving_keeps_the_data_set_bytes(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory({"storage": {"bit_preserving": True}})
    ct = ct_copy(tmp_path, "ct.dcm")
    storescu(d.port, ct)
    (stored,) = d.files()
    assert data_set_bytes(stored) == data_set_bytes(ct)
    assert stored.name.startswith("CT.")


@pytest.mark.parametrize(("policy", "files", "second_status"), [
    ("overwrite", 1, "Success"), ("keep-first", 1, "Success"), ("keep-both", 2, "Success"),
    ("reject", 1, "0x111"),
])
def test_duplicate_policies(daemon_factory: Any, tmp_path: Path, policy: str, files: int,
                            second_status: str) -> None:
    d = daemon_factory({"storage": {"duplicates": policy}})
    uid = generate_uid()
    first = ct_copy(tmp_path, "first.dcm", SOPInstanceUID=uid, PatientID="FIRST")
    second = ct_copy(tmp_path, "second.dcm", SOPInstanceUID=uid, PatientID="SECOND")
    storescu(d.port, first)
    result = storescu(d.port, second, extra=["-v"], check=False)
    assert second_status in status_of(result), result.stderr
    stored = d.files()
    assert len(stored) == files
    ids = sorted(str(dcmread(p).PatientID) for p in stored)
    expected = {"overwrite": ["SECOND"], "keep-first": ["FIRST"], "reject": ["FIRST"],
                "keep-both": ["FIRST", "SECOND"]}[policy]
    assert ids == expected
    assert d.staging() == []


# -- association policy ------------------------------------------------------------------------

def test_refuse(daemon_factory: Any) -> None:
    d = daemon_factory({"association": {"refuse": True}})
    result = echoscu(d.port, check=False)
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr
    assert "refusing every association" in d.wait_log("association rejected")


def test_called_ae_title_check(daemon_factory: Any) -> None:
    d = daemon_factory({"association": {"require_called_aetitle": True}})
    wrong = echoscu(d.port, ["-aec", "WRONG"], check=False)
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr, wrong.stderr
    echoscu(d.port, ["-aec", "STORESCP"])


def test_calling_ae_allow_list(daemon_factory: Any) -> None:
    d = daemon_factory({"association": {"allowed_calling_aetitles": ["GOOD"]}})
    bad = echoscu(d.port, ["-aet", "EVIL"], check=False)
    assert "Calling AE Title Not Recognized" in bad.stderr, bad.stderr
    echoscu(d.port, ["-aet", "GOOD"])
    assert "calling AE title 'EVIL' is not allowed" in d.log()


def _raw_request(port: int, implementation_uid: bool) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAW"
    primitive.called_ae_title = "STORESCP"
    cx = context_for("1.2.840.10008.1.1")
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    items: list[Any] = [max_length]
    if implementation_uid:
        from pynetdicom.pdu_primitives import ImplementationClassUIDNotification
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = "1.2.3.4"
        items.append(impl)
    primitive.user_information = items
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(rq.encode())
        return s.recv(4096)


def test_reject_without_implementation_uid(daemon_factory: Any) -> None:
    d = daemon_factory({"association": {"reject_without_implementation_uid": True}})
    answer = _raw_request(d.port, implementation_uid=False)
    assert answer[0] == 0x03, answer  # A-ASSOCIATE-RJ
    assert tuple(answer[7:10]) == (1, 1, 1)  # permanent, service user, no reason given
    assert _raw_request(d.port, implementation_uid=True)[0] == 0x02  # A-ASSOCIATE-AC


def test_advertised_max_pdu_is_the_configured_one(daemon_factory: Any, scu_ae: AE) -> None:
    d = daemon_factory({"network": {"max_pdu": 32768}})
    scu_ae.add_requested_context("1.2.840.10008.1.1")
    assoc = scu_ae.associate("127.0.0.1", d.port, ae_title="STORESCP")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 32768
    assoc.release()


# -- test aids ---------------------------------------------------------------------------------

def test_ignore_receives_but_stores_nothing(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory({"testing": {"ignore": True}})
    storescu(d.port, ct_copy(tmp_path, "a.dcm"))
    assert d.files() == [] and d.staging() == []


@pytest.mark.parametrize("aid", ["abort_after", "abort_during"])
def test_abort_aids_leave_nothing(daemon_factory: Any, tmp_path: Path, aid: str) -> None:
    d = daemon_factory({"testing": {aid: True}})
    result = storescu(d.port, ct_copy(tmp_path, "a.dcm"), check=False)  # 39 KB: several PDUs
    assert result.returncode != 0
    assert f"testing.{aid}" in d.wait_log("aborting association")
    assert d.files() == [] and d.staging() == []
    echoscu(d.port)


def test_sleep_after_still_succeeds(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory({"testing": {"sleep_after": 1}})
    started = time.monotonic()
    storescu(d.port, ct_copy(tmp_path, "a.dcm"), ct_copy(tmp_path, "b.dcm"))
    assert time.monotonic() - started >= 1.0
    assert len(d.files()) == 2


# -- failures are answered -----------------------------------------------------------------

def _send_with_command_uid(ae: AE, port: int, path: Path, command_uid: str,
                           monkeypatch: pytest.MonkeyPatch, sop_class: str | None = None) -> int:
    """C-STORE whose command names `command_uid` (and `sop_class`) but whose data set is the
    file's: pynetdicom takes both from the data set, so the encoder is swapped client-side."""
    ds = dcmread(path)
    sent = encode(ds, False, True)
    import pynetdicom.association

    monkeypatch.setattr(pynetdicom.association, "encode", lambda *args, **kw: sent)
    pretend = dcmread(path)
    pretend.SOPInstanceUID = command_uid
    if sop_class:
        pretend.SOPClassUID = sop_class
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    assert assoc.is_established
    status = assoc.send_c_store(pretend)
    assoc.release()
    return int(status.Status)


def test_data_set_not_matching_the_request_is_refused(daemon: Daemon, scu_ae: AE,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ct = ct_copy(tmp_path, "a.dcm")
    assert _send_with_command_uid(scu_ae, daemon.port, ct, "1.2.3.999", monkeypatch) == 0xA900
    assert "does not match the request" in daemon.log()
    assert daemon.files() == [] and daemon.staging() == []
    echoscu(daemon.port)


def test_sop_class_on_a_context_for_another_class(daemon: Daemon, scu_ae: AE,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ct = ct_copy(tmp_path, "a.dcm")
    uid = str(dcmread(ct).SOPInstanceUID)
    status = _send_with_command_uid(scu_ae, daemon.port, ct, uid, monkeypatch,
                                    sop_class="1.2.840.10008.5.1.4.1.1.4")
    assert status != 0x0000
    assert daemon.files() == []
    echoscu(daemon.port)


def test_garbage_and_silence_are_dropped(daemon_factory: Any) -> None:
    d = daemon_factory({"network": {"acse_timeout": 1}})
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert s.recv(64)[:1] in (b"\x07", b"")  # A-ABORT or closed
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        started = time.monotonic()
        assert s.recv(64)[:1] in (b"\x07", b"")
        assert time.monotonic() - started < 4
    echoscu(d.port)


# -- memory ------------------------------------------------------------------------------------

def test_a_200_mb_object_streams_with_bounded_memory(daemon_factory: Any,
                                                     tmp_path: Path) -> None:
    # single process, so the receiving code runs in the process we measure
    d = daemon_factory({"workers": {"process_model": "single"}, "logging": {"level": "info"}})
    ds = dcmread(bundled("CT_small.dcm"))
    del ds[0xFFFC, 0xFFFC]  # storescu does not send trailing padding
    frames = 400
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame grayscale word SC
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = os.urandom(512 * 512 * 2) * frames
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds
    baseline = vm_hwm(d.proc.pid)
    storescu(d.port, big, timeout=300)
    grown = vm_hwm(d.proc.pid) - baseline
    assert grown < 64 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"
    (stored,) = d.files()
    assert data_set_bytes(stored)[-4096:] == data_set_bytes(big)[-4096:]
    assert stored.stat().st_size - data_set_bytes(stored).__len__() < 1024
    assert len(data_set_bytes(stored)) == len(data_set_bytes(big))


def test_host_lookup_names_the_peer_when_enabled(daemon_factory: Any) -> None:
    d = daemon_factory({"network": {"disable_host_lookup": False}})
    echoscu(d.port, ["-aet", "NAMED"])
    log = d.wait_log("C-ECHO")
    assert re.search(r"localhost:\d+ NAMED->ANY-SCP: association accepted", log), log
