"""Storage Commitment Push Model SCP ([storage_commitment], [remote_aes]) against real peers:
pynetdicom as the modality (N-ACTION on one association; the N-EVENT-REPORT on that
association, or on a new one where it is the SCP of the SOP class) and Orthanc from Debian.

What a sender sees (statuses, reports), what is logged, what the job queue holds, and that
the daemon goes on serving after every bad request.
"""

import contextlib
import io
import json
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel, Verification
from support.daemon import Daemon, free_port
from support.data import make_study
from support.mounts import mounted_tmpfs
from support.peers import require_tool
from support.uids import APPLICATION_CONTEXT, EXPLICIT_LE
from support.uids import CT_IMAGE as CT
from support.uids import MR_IMAGE as MR
from support.uids import STORAGE_COMMITMENT_INSTANCE as WELL_KNOWN
from support.wait import wait_until
from support.wire import A_ASSOCIATE_AC, Closed, associate_rq, item, p_data, pdu, read_pdu

from dicom_ingestd.jobs.queue import (
    MAX_SENDERS,
    SCHEMA_VERSION,
    JobKind,
    JobPool,
    JobQueue,
)

MODALITY = "MODALITY"


class ReportSCP:
    """A modality's side that receives reports on associations the daemon opens."""

    def __init__(self, port: int, *, accept_role: bool = True) -> None:
        self.port = port
        self.reports: list[tuple[int, Dataset]] = []
        self.callers: list[str] = []  # the calling AE title of each report's association
        self.accept_role = accept_role
        self.server: Any = None

    def start(self) -> "ReportSCP":
        ae = AE(ae_title=MODALITY)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True,
                                 scp_role=self.accept_role)
        ae.add_supported_context(Verification)

        def on_report(event: Any) -> tuple[int, None]:
            self.callers.append(str(event.assoc.requestor.ae_title).strip())
            self.reports.append((event.event_type, event.event_information))
            return 0x0000, None

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def wait(self, count: int = 1, timeout: float = 30.0) -> list[tuple[int, Dataset]]:
        wait_until(lambda: len(self.reports) >= count, timeout, f"{count} report(s)")
        return self.reports


class Blackhole:
    """A modality that hangs: accepts TCP connections and never sends a byte."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.listener.accept()[0])

    def close(self) -> None:
        self.listener.close()
        for sock in self.held:
            sock.close()


class HostileReportSCP:
    """A report target that accepts the association (the SCP role granted) and answers the
    N-EVENT-REPORT badly, by `mode`: bigpdu (one P-DATA-TF PDU of 1 MiB), flood (data set
    fragments without end, never a command), wrongid (an N-EVENT-REPORT-RSP for message
    ID 7)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = self.listener.accept()[0]
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, Closed):
            _, request = read_pdu(conn)
            uid = StorageCommitmentPushModel.encode("ascii")
            context = bytes(4) + item(0x40, EXPLICIT_LE.encode())
            context = b"\x01" + context[1:]
            role = struct.pack(">H", len(uid)) + uid + b"\x00\x01"
            user = item(0x51, struct.pack(">L", 65536)) + item(0x54, role)
            accept = request[:68] + item(0x10, APPLICATION_CONTEXT.encode()) \
                + item(0x21, context) + item(0x50, user)
            conn.sendall(pdu(A_ASSOCIATE_AC, accept))
            last_data = False
            while not last_data:  # the report's command, then its data set
                _, body = read_pdu(conn)
                last_data = body[5] == 0x02
            if self.mode == "bigpdu":
                conn.sendall(p_data(1, 0x00, bytes(1 << 20)))
            elif self.mode == "flood":
                chunk = p_data(1, 0x00, bytes(16384))
                while True:
                    conn.sendall(chunk)
            elif self.mode == "wrongid":
                answer = Dataset()
                answer.AffectedSOPClassUID = StorageCommitmentPushModel
                answer.CommandField = 0x8100
                answer.MessageIDBeingRespondedTo = 7
                answer.CommandDataSetType = 0x0101
                answer.Status = 0
                answer.AffectedSOPInstanceUID = WELL_KNOWN
                answer.EventTypeID = 1
                conn.sendall(p_data(1, 0x03, encode(answer, True, True)))
            while conn.recv(65536):
                pass

    def close(self) -> None:
        self.listener.close()


def _command(**elements: Any) -> bytes:
    """A command set (implicit VR little endian), its group length first."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    assert body is not None
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + struct.pack("<L", len(body)) + body


class RawRequester:
    """A modality on a socket of its own, for what pynetdicom will not do: leave a report
    unanswered while it goes on (C-ECHOs, a slow C-STORE), answer it late or wrongly.
    Contexts: 1 Storage Commitment, 3 Verification, 5 CT Image Storage (explicit VR LE)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        contexts = [(cid, uid, [EXPLICIT_LE]) for cid, uid in
                    ((1, StorageCommitmentPushModel), (3, Verification), (5, CT))]
        self.sock.sendall(associate_rq(contexts, calling=MODALITY.encode(), called=b"STORESCP",
                                       max_pdu=65536, implementation_uid=b"1.2.3.4",
                                       version_name=None))
        assert self._read_pdu()[0] == A_ASSOCIATE_AC

    def _read_pdu(self) -> tuple[int, bytes]:
        return read_pdu(self.sock)

    def read_message(self) -> tuple[Dataset, bytes]:
        """The next command (decoded) and its data set bytes."""
        command, data = b"", b""
        while True:
            pdu_type, body = self._read_pdu()
            assert pdu_type == 4, f"PDU type {pdu_type}"
            pos = 0
            while pos < len(body):
                length, _, control = struct.unpack_from(">LBB", body, pos)
                if control & 1:
                    command += body[pos + 6:pos + 4 + length]
                else:
                    data += body[pos + 6:pos + 4 + length]
                pos += 4 + length
                if control & 2:
                    decoded = decode(io.BytesIO(command), True, True)
                    if not control & 1 or decoded.CommandDataSetType == 0x0101:
                        return decoded, data

    def send(self, context: int, command: bytes, data: bytes | None = None) -> None:
        self.sock.sendall(p_data(context, 0x03, command))
        if data is not None:
            self.sock.sendall(p_data(context, 0x02, data))

    def n_action(self, dataset: Dataset) -> int:
        data = encode(dataset, False, True)
        assert data is not None
        self.send(1, _command(CommandField=0x0130, MessageID=1, CommandDataSetType=0x0000,
                              RequestedSOPClassUID=StorageCommitmentPushModel,
                              RequestedSOPInstanceUID=WELL_KNOWN, ActionTypeID=1), data)
        return int(self.read_message()[0].Status)

    def echo(self, message_id: int) -> int:
        self.send(3, _command(CommandField=0x0030, MessageID=message_id,
                              CommandDataSetType=0x0101, AffectedSOPClassUID=Verification))
        return int(self.read_message()[0].Status)

    def answer_report(self, message_id: int) -> None:
        self.send(1, _command(CommandField=0x8100, MessageIDBeingRespondedTo=message_id,
                              CommandDataSetType=0x0101, Status=0, EventTypeID=1,
                              AffectedSOPClassUID=StorageCommitmentPushModel,
                              AffectedSOPInstanceUID=WELL_KNOWN))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def report_scp() -> Any:
    scp = ReportSCP(free_port()).start()
    yield scp
    scp.stop()


def settings(scp_port: int, **commitment: Any) -> dict[str, dict[str, Any]]:
    """Reports on a new association (to `scp_port`) unless same_association_wait is given:
    pynetdicom answers a report on the requesting association while it waits for anything
    else there (a C-ECHO response), so the tests choose the path they test."""
    commitment.setdefault("same_association_wait", 0)
    return {"storage_commitment": {"enabled": True, **commitment},
            "remote_aes": {MODALITY: {"host": "127.0.0.1", "port": scp_port}},
            "jobs": {"retry_backoff": 1, "retry_backoff_max": 1}}


def references(*items: tuple[str, str]) -> list[Dataset]:
    out = []
    for sop_class, sop_instance in items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop_instance
        out.append(ref)
    return out


def action(transaction: str | None, refs: list[Dataset] | None) -> Dataset:
    ds = Dataset()
    if transaction is not None:
        ds.TransactionUID = transaction
    if refs is not None:
        ds.ReferencedSOPSequence = refs
    return ds


def store(port: int, files: list[Path], calling: str = MODALITY) -> list[tuple[str, str]]:
    """C-STORE `files`; their (SOP class, SOP instance)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MR)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    assert assoc.is_established
    stored = []
    for path in files:
        ds = dcmread(path)
        assert assoc.send_c_store(ds).Status == 0
        stored.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    assoc.release()
    return stored


def request(port: int, dataset: Dataset | None, *, calling: str = MODALITY,
            called: str = "STORESCP", keep_open: float = 0.0, action_type: int = 1,
            roles: list[Any] | None = None) -> tuple[int, list[tuple[int, Dataset]]]:
    """Send one N-ACTION; (its status, the reports received on this association while it
    stays open for `keep_open` seconds)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(Verification)
    reports: list[tuple[int, Dataset]] = []

    def on_report(event: Any) -> tuple[int, None]:
        reports.append((event.event_type, event.event_information))
        return 0x0000, None

    assoc = ae.associate("127.0.0.1", port, ae_title=called, ext_neg=roles,
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    status, _ = assoc.send_n_action(dataset, action_type, StorageCommitmentPushModel,
                                    WELL_KNOWN)
    code = int(status.Status) if "Status" in status else -1
    deadline = time.monotonic() + keep_open
    while time.monotonic() < deadline and not reports:
        time.sleep(0.05)
    # The association goes on serving after whatever came before.
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    return code, reports


def cli(daemon: Daemon, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dicom_ingestd", *args, "-c",
                             str(daemon.config_path)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def uids(sequence: Any) -> list[tuple[str, str, int]]:
    return [(str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID),
             int(item.get("FailureReason", 0))) for item in sequence or []]


def jobs(daemon: Daemon) -> list[dict[str, Any]]:
    """The job database's rows (read as `dicom-ingestd jobs` does, from another process)."""
    path = daemon.out / ".ingestd-state" / "jobs.sqlite"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM jobs ORDER BY id")]


def spool_files(daemon: Daemon, directory: str = "reports") -> list[str]:
    path = daemon.out / ".ingestd-state" / "commitment" / directory
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# -- the cases ------------------------------------------------------------------------------
def test_all_present_report_on_a_new_association(daemon_factory: Any, report_scp: ReportSCP,
                                                 tmp_path: Path) -> None:
    daemon = daemon_factory(settings(report_scp.port))
    stored = store(daemon.port, make_study(tmp_path / "study", 3))
    transaction = str(generate_uid())
    status, here = request(daemon.port, action(transaction, references(*stored)))
    assert status == 0 and here == []
    event_type, info = report_scp.wait()[0]
    assert event_type == 1
    assert info.TransactionUID == transaction
    assert uids(info.ReferencedSOPSequence) == [(c, i, 0) for c, i in stored]
    assert "FailedSOPSequence" not in info
    log = daemon.wait_log("3 committed, 0 failed (event type 1)")
    assert f"storage commitment request received: transaction {transaction}, 3 object(s)" \
        in log
    assert f"storage commitment of transaction {transaction} from {MODALITY}" in log
    wait_until(lambda: [j["state"] for j in jobs(daemon)] == ["done"], 10, "job done")
    assert spool_files(daemon) == []  # delivered: its report file is gone


def test_the_report_comes_from_the_ae_title_the_modality_called(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # Our network.aetitle is STORESCP; the modality knows us as ARCHIVE1.
    daemon = daemon_factory(settings(report_scp.port))
    stored = store(daemon.port, make_study(tmp_path / "s", 1))
    assert request(daemon.port, action(str(generate_uid()), references(*stored)),
                   called="ARCHIVE1")[0] == 0
    assert report_scp.wait()[0][0] == 1
    assert report_scp.callers == ["ARCHIVE1"]
    daemon.wait_log(f"sent to {MODALITY}@127.0.0.1:{report_scp.port}: 1 committed, 0 failed "
                    "(event type 1); calling AE title ARCHIVE1")


def test_an_object_stored_just_before_the_request_counts(daemon_factory: Any,
                                                        report_scp: ReportSCP,
                                                        tmp_path: Path) -> None:
    # Store and request on one association, back to back, ten times: each request is
    # evaluated only after the records written before it (the master reads the outbox again
    # after it finds the request), whatever the timing of the worker's wake-ups.
    daemon = daemon_factory(settings(report_scp.port))
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="STORESCP")
    assert assoc.is_established
    for index, path in enumerate(make_study(tmp_path / "s", 10)):
        ds = dcmread(path)
        assert assoc.send_c_store(ds).Status == 0
        status, _ = assoc.send_n_action(
            action(str(generate_uid()), references((CT, str(ds.SOPInstanceUID)))), 1,
            StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0, index
    assoc.release()
    assert [event for event, _ in report_scp.wait(10)] == [1] * 10


def test_report_on_the_requesting_association(daemon_factory: Any, report_scp: ReportSCP,
                                              tmp_path: Path) -> None:
    daemon = daemon_factory(settings(report_scp.port, same_association_wait=10))
    stored = store(daemon.port, make_study(tmp_path / "study", 2))
    transaction = str(generate_uid())
    status, here = request(daemon.port, action(transaction, references(*stored)),
                           keep_open=15)
    assert status == 0
    assert [t for t, _ in here] == [1]
    assert uids(here[0][1].ReferencedSOPSequence) == [(c, i, 0) for c, i in stored]
    daemon.wait_log("on the requesting association: 2 committed, 0 failed")
    wait_until(lambda: [j["result"] for j in jobs(daemon)] ==
               ["delivered on the requesting association"], 10, "job done")
    time.sleep(1.5)  # a second delivery would go out within the runner's poll
    assert report_scp.reports == []
    assert spool_files(daemon) == []
    counters = json.loads(cli(daemon, "status", "--json"))["storage_commitment"]
    assert counters["reports_delivered"] == 1 and counters["delivery_attempts_failed"] == 0


def unanswered_report(daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path,
                      network: dict[str, Any]) -> tuple[Daemon, "RawRequester", str]:
    """A daemon (`network` settings), an object stored, and a raw modality that requested
    its commitment and took the report on its association, unanswered."""
    config = settings(report_scp.port, same_association_wait=10)
    config["network"] = network
    daemon = daemon_factory(config)
    stored = store(daemon.port, make_study(tmp_path / "s", 1))
    transaction = str(generate_uid())
    modality = RawRequester(daemon.port)
    assert modality.n_action(action(transaction, references(*stored))) == 0
    report, _ = modality.read_message()
    assert report.CommandField == 0x0100 and report.MessageID == 1
    return daemon, modality, transaction


def test_a_report_left_unanswered_on_its_association_goes_on_a_new_one(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # The sender takes the report on its association and never answers it, but keeps the
    # association busy (C-ECHOs): after network.dimse_timeout (here shorter than
    # same_association_wait) the report goes to its address on a new association, while
    # the first association goes on.  A late answer and an answer for a message ID never
    # sent are logged and ignored.
    daemon, modality, transaction = unanswered_report(
        daemon_factory, report_scp, tmp_path, {"dimse_timeout": 3})
    try:
        for message_id in range(2, 30):
            assert modality.echo(message_id) == 0
            if report_scp.reports:
                break
            time.sleep(0.5)
        event_type, info = report_scp.wait(timeout=1)[0]
        assert event_type == 1 and info.TransactionUID == transaction
        log = daemon.wait_log("within 3 s on the requesting association; it goes on a new "
                              "association")
        assert f"no answer to the storage commitment report of transaction {transaction} " \
            "(message ID 1)" in log
        modality.answer_report(1)  # too late
        modality.answer_report(999)  # never sent
        assert modality.echo(100) == 0
        log = daemon.wait_log("ignoring an N-EVENT-REPORT-RSP for message ID 999")
        assert f"the answer to the storage commitment report of transaction {transaction} " \
            "(message ID 1) came too late" in log
        assert "aborting" not in log
    finally:
        modality.close()


def test_a_report_held_by_a_busy_association_is_released_by_the_master(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # The sender takes the report and never answers: it sends an object slowly, so its
    # association never gets to look at the report's deadline; the master's bounded hold
    # (here network.dimse_timeout + 5 s) lets the job deliver it anyway.
    daemon, modality, transaction = unanswered_report(
        daemon_factory, report_scp, tmp_path, {"dimse_timeout": 2, "min_transfer_rate": 100})
    try:
        sop = str(generate_uid())
        modality.send(5, _command(CommandField=0x0001, MessageID=2, Priority=0,
                                  CommandDataSetType=0x0000, AffectedSOPClassUID=CT,
                                  AffectedSOPInstanceUID=sop))
        started = time.monotonic()
        while not report_scp.reports and time.monotonic() - started < 30:
            modality.sock.sendall(p_data(5, 0x00, bytes(200)))
            time.sleep(0.5)
        event_type, info = report_scp.wait(timeout=1)[0]
        assert event_type == 1 and info.TransactionUID == transaction
        daemon.wait_log(f"storage commitment report of transaction {transaction} to "
                        f"{MODALITY}: no answer on the requesting association within 2 s")
    finally:
        modality.close()


def test_never_sent_and_wrong_sop_class_fail_with_their_reasons(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(report_scp.port))
    (ct_class, ct_instance), = store(daemon.port, make_study(tmp_path / "s", 1))
    never = str(generate_uid())
    refs = references((ct_class, ct_instance), (CT, never), (MR, ct_instance))
    status, _ = request(daemon.port, action(str(generate_uid()), refs))
    assert status == 0
    event_type, info = report_scp.wait()[0]
    assert event_type == 2
    assert uids(info.ReferencedSOPSequence) == [(ct_class, ct_instance, 0)]
    assert uids(info.FailedSOPSequence) == [(CT, never, 0x0112), (MR, ct_instance, 0x0119)]
    daemon.wait_log("1 committed, 2 failed (event type 2)")


def test_a_resend_by_another_ae_keeps_the_first_senders_commitment(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # objects_from = requester: the modality sent X, a router sent X again (the same file,
    # overwritten): X is committed to either, not to an AE title that never sent it.
    config = settings(report_scp.port, objects_from="requester")
    config["remote_aes"]["ROUTER"] = {"host": "127.0.0.1", "port": report_scp.port}
    config["remote_aes"]["STRANGER"] = {"host": "127.0.0.1", "port": report_scp.port}
    daemon = daemon_factory(config)
    study = make_study(tmp_path / "s", 1)
    stored = store(daemon.port, study)
    assert store(daemon.port, study, calling="ROUTER") == stored
    for count, caller in enumerate((MODALITY, "ROUTER", "STRANGER"), 1):
        request(daemon.port, action(str(generate_uid()), references(*stored)), calling=caller)
        event_type, _ = report_scp.wait(count)[count - 1]
        assert event_type == (2 if caller == "STRANGER" else 1), caller
    assert uids(report_scp.reports[2][1].FailedSOPSequence) == [(*stored[0], 0x0112)]


def test_the_index_keeps_the_latest_senders_of_a_file_and_its_current_class(
        tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "state")
    try:
        with queue.transaction():
            for n in range(MAX_SENDERS + 4):
                queue.remember_object("1.2.3", "/out/x", CT, f"AE{n}", 1000.0 + n)
            queue.remember_object("1.2.3", "/out/x", MR, "AE5", 2000.0)  # overwritten as MR
        rows = queue.stored_objects(["1.2.3"])["1.2.3"]
        assert [ae for _, _, ae in rows] == \
            ["AE5", *[f"AE{n}" for n in range(MAX_SENDERS + 3, 3, -1) if n != 5]]
        assert {sop_class for _, sop_class, _ in rows} == {MR}
    finally:
        queue.close()


def test_deliveries_due_are_one_per_target_and_never_a_busy_one(tmp_path: Path) -> None:
    # The delivery pool runs one report per AE title at a time, whatever is due at once
    # (retries after an outage, a restart).
    queue = JobQueue(tmp_path / "state")
    try:
        with queue.transaction():
            ids = {title: [queue.add(JobKind.COMMITMENT, ["report"], ["true"],
                                     {"DICOM_CALLING_AE": title}, max_attempts=1,
                                     timeout=10, now=1000.0) for _ in range(3)]
                   for title in ("A", "B")}
        due = queue.due(2000.0, 10, JobPool.DELIVERY)
        assert [job.id for job in due] == [ids["A"][0], ids["B"][0]]
        assert [job.id for job in queue.due(2000.0, 10, JobPool.DELIVERY, ["A"])] == \
            [ids["B"][0]]
        assert queue.due(2000.0, 10) == []  # not the events pool's
    finally:
        queue.close()


def test_a_version_3_index_keeps_its_objects(tmp_path: Path) -> None:
    # Version 3 keyed stored_objects by (SOP instance, path): made again with the sender in
    # the key, every row kept.
    (tmp_path / "state").mkdir()
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "jobs.sqlite")) as db, db:
        db.execute("CREATE TABLE stored_objects (sop TEXT NOT NULL, path TEXT NOT NULL, "
                   "sop_class TEXT NOT NULL, calling_ae TEXT NOT NULL, stored REAL NOT NULL, "
                   "PRIMARY KEY (sop, path))")
        db.execute("CREATE INDEX stored_objects_by_time ON stored_objects (stored)")
        db.execute("INSERT INTO stored_objects VALUES ('1.2.3', '/out/x', ?, 'CT01', 1.0)",
                   (CT,))
        db.execute("PRAGMA user_version = 3")
    queue = JobQueue(tmp_path / "state")
    try:
        with queue.transaction():
            queue.remember_object("1.2.3", "/out/x", CT, "ROUTER", 2.0)
        assert sorted(ae for _, _, ae in queue.stored_objects(["1.2.3"])["1.2.3"]) == \
            ["CT01", "ROUTER"]
        assert queue._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        queue.close()


def test_keep_first_commits_the_class_of_the_file_kept(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # storage.duplicates = keep-first: X stored as one SR class, then again as another SR
    # class (the same file name): the file holds the first class, and so does the answer.
    first, second = "1.2.840.10008.5.1.4.1.1.88.70", "1.2.840.10008.5.1.4.1.1.88.75"
    config = settings(report_scp.port)
    config["storage"] = {"duplicates": "keep-first"}
    daemon = daemon_factory(config)
    path, = make_study(tmp_path / "s", 1)
    ds = dcmread(path)
    ds.Modality = "SR"
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(first)
    ae.add_requested_context(second)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="STORESCP")
    for sop_class in (first, second):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    kept, = (p for p in daemon.files() if ".ingestd-state" not in p.parts)
    assert dcmread(kept).SOPClassUID == first
    instance = str(ds.SOPInstanceUID)
    request(daemon.port, action(str(generate_uid()), references((first, instance),
                                                                (second, instance))))
    _, info = report_scp.wait()[0]
    assert uids(info.ReferencedSOPSequence) == [(first, instance, 0)]
    assert uids(info.FailedSOPSequence) == [(second, instance, 0x0119)]


def test_objects_stored_before_a_restart_count(daemon_factory: Any, report_scp: ReportSCP,
                                               tmp_path: Path) -> None:
    config = settings(report_scp.port)
    daemon = daemon_factory(config)
    stored = store(daemon.port, make_study(tmp_path / "s", 2))
    assert daemon.stop() == 0
    again = daemon_factory({**config, "network": {"port": daemon.port},
                            "storage": {"output_directory": str(daemon.out)}})
    status, _ = request(again.port, action(str(generate_uid()), references(*stored)))
    assert status == 0
    event_type, info = report_scp.wait()[0]
    assert event_type == 1 and len(info.ReferencedSOPSequence) == 2


def test_a_file_gone_from_where_it_was_filed_is_not_committed(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(report_scp.port))
    stored = store(daemon.port, make_study(tmp_path / "s", 2))
    victim = next(p for p in daemon.files() if p.name.endswith(stored[0][1]))
    victim.unlink()
    request(daemon.port, action(str(generate_uid()), references(*stored)))
    _, info = report_scp.wait()[0]
    assert uids(info.FailedSOPSequence) == [(*stored[0], 0x0112)]
    assert uids(info.ReferencedSOPSequence) == [(*stored[1], 0)]


def test_renamed_at_end_of_study_still_counts(daemon_factory: Any, report_scp: ReportSCP,
                                              tmp_path: Path) -> None:
    config = settings(report_scp.port)
    config["events"] = {"rename_on_eostudy": True, "eostudy_timeout": 1}
    config["storage"] = {"sort": "study-uid"}
    daemon = daemon_factory(config)
    stored = store(daemon.port, make_study(tmp_path / "s", 2))
    wait_until(lambda: sorted(p.name for p in daemon.files() if ".ingestd-state" not in p.parts)
               == ["CT000001", "CT000002"], 20, "renamed")
    request(daemon.port, action(str(generate_uid()), references(*stored)))
    event_type, info = report_scp.wait()[0]
    assert event_type == 1 and len(info.ReferencedSOPSequence) == 2


def test_objects_count_wherever_a_stopped_rename_left_them(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # The rename at end of study stops halfway (its fifth file immutable: EPERM; a kill or a
    # timeout leaves the same files behind) and its job is dead: the first four objects are
    # at their planned names, the others where they were filed, and every one is committed.
    # Re-queued once the file can move, the rename finishes: every one is committed still.
    config = settings(report_scp.port)
    config["events"] = {"rename_on_eostudy": True, "eostudy_timeout": 2}
    config["storage"] = {"sort": "study-uid"}
    config["jobs"]["retries"] = 0
    daemon = daemon_factory(config)
    stored = store(daemon.port, make_study(tmp_path / "s", 10))
    stuck = next(p for p in daemon.files() if p.name.endswith(stored[4][1]))
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        daemon.wait_log("job 1 failed", timeout=20)
        names = sorted(p.name for p in daemon.files() if ".ingestd-state" not in p.parts)
        assert [n for n in names if n.startswith("CT0")] == \
            ["CT000001", "CT000002", "CT000003", "CT000004"]
        request(daemon.port, action(str(generate_uid()), references(*stored)))
        event_type, info = report_scp.wait()[0]
        assert event_type == 1 and len(info.ReferencedSOPSequence) == 10
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    cli(daemon, "jobs", "retry", "1")
    daemon.wait_log("job 1 finished: exit status 0", timeout=20)
    request(daemon.port, action(str(generate_uid()), references(*stored)))
    event_type, info = report_scp.wait(2)[1]
    assert event_type == 1 and len(info.ReferencedSOPSequence) == 10


def test_the_report_waits_for_its_target(daemon_factory: Any, tmp_path: Path) -> None:
    port = free_port()
    daemon = daemon_factory(settings(port))
    stored = store(daemon.port, make_study(tmp_path / "s", 1))
    transaction = str(generate_uid())
    status, _ = request(daemon.port, action(transaction, references(*stored)))
    assert status == 0
    log = daemon.wait_log("report not delivered: ", timeout=20)
    assert f"report not delivered: cannot connect: Connection refused (AE {MODALITY} at " \
        f"127.0.0.1:{port})" in log
    daemon.wait_log("retry 1 of 20")
    scp = ReportSCP(port).start()
    try:
        event_type, info = scp.wait(timeout=30)[0]
        assert event_type == 1 and info.TransactionUID == transaction
    finally:
        scp.stop()
    wait_until(lambda: [j["state"] for j in jobs(daemon)] == ["done"], 10, "job done")
    # The counters, in status and metrics (live, then from the disk).
    failed = jobs(daemon)[0]["attempts"] - 1
    status = cli(daemon, "status", "--json")
    assert json.loads(status)["storage_commitment"] == {
        "requests": 1, "objects_committed": 1, "objects_failed": 0, "reports_delivered": 1,
        "delivery_attempts_failed": failed, "reports_dead": 0}
    assert f"storage commitment: 1 request(s), 1 object(s) committed, 0 failed; reports: 1 " \
        f"delivered, {failed} failed attempt(s), 0 dead" in cli(daemon, "status")
    assert daemon.stop() == 0
    metrics = cli(daemon, "metrics")
    assert 'dicom_ingestd_storage_commitment_reports_total{outcome="delivered"} 1.0' in metrics
    assert f'dicom_ingestd_storage_commitment_reports_total{{outcome="attempt_failed"}} ' \
        f'{failed}.0' in metrics
    assert "dicom_ingestd_storage_commitment_requests_total 1.0" in metrics


def test_report_files_live_only_while_a_report_may_still_go_out(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # A dead delivery keeps its report (jobs retry) for keep_days, then both go; a report
    # file no request waits for, and a writer's old temporary file, go at the start.
    config = settings(free_port(), delivery_retries=0, keep_days=1)
    daemon = daemon_factory(config)
    request(daemon.port, action(str(generate_uid()), references((CT, "1.2.3"))))
    daemon.wait_log("dead after 1 attempt(s)", timeout=20)
    dead, = spool_files(daemon)
    assert daemon.stop() == 0
    reports = daemon.out / ".ingestd-state" / "commitment" / "reports"
    (reports / "00000000000000000001-gone-1.rep").write_text("{}\n")
    leftover = reports / ".tmp-00000000000000000002-gone-1.rep"
    leftover.write_text("{}\n")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    again = daemon_factory({**config, "network": {"port": daemon.port},
                            "storage": {"output_directory": str(daemon.out)}})
    again.wait_log("removed 1 report file(s)")
    assert spool_files(again) == [dead]  # dead for less than keep_days: kept
    assert again.stop() == 0
    with contextlib.closing(sqlite3.connect(again.out / ".ingestd-state" / "jobs.sqlite")) \
            as db, db:
        db.execute("UPDATE jobs SET finished = finished - 2 * 86400, created = created - "
                   "2 * 86400")
        db.execute("UPDATE commitments SET received = received - 2 * 86400")
    third = daemon_factory({**config, "network": {"port": daemon.port},
                            "storage": {"output_directory": str(daemon.out)}})
    third.wait_log("was never delivered; its dead job")
    wait_until(lambda: spool_files(third) == [], 10, "the dead report's removal")
    assert jobs(third) == []


def test_undelivered_reports_are_bounded(daemon_factory: Any, tmp_path: Path) -> None:
    # Reports for a modality that never takes them fill the spool up to max_spool_size,
    # then requests are refused 0x0213 with nothing recorded.
    config = settings(free_port(), max_spool_size=1 << 20)
    daemon = daemon_factory(config)
    many = references(*[(CT, f"1.2.3.{'9' * 50}.{n}") for n in range(12000)])  # > 1 MiB
    assert request(daemon.port, action(str(generate_uid()), many))[0] == 0
    wait_until(lambda: len(spool_files(daemon)) == 1, 20, "the first report")
    assert request(daemon.port, action(str(generate_uid()), references((CT, "1.2.3"))))[0] \
        == 0x0213
    log = daemon.wait_log("refused with 0x0213")
    assert "storage_commitment.max_spool_size = 1048576" in log
    time.sleep(1.5)
    assert len(jobs(daemon)) == 1 and spool_files(daemon, "requests") == []


def test_a_request_whose_report_does_not_fit_blocks_nothing_and_logs_once(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # The state file system has room for a large request's file, not for its report: that
    # request waits (one error line, not one a second) while a small one behind it goes on;
    # once there is room again, the large one is evaluated and its report sent.
    with mounted_tmpfs(tmp_path / "state-fs", "size=4m") as mount:
        config = settings(report_scp.port)
        config["jobs"]["state_directory"] = str(mount / "state")
        daemon = daemon_factory(config)
        hole, filler = mount / "hole", mount / "filler"
        hole.write_bytes(bytes(220 << 10))
        with open(filler, "wb", buffering=0) as fh, pytest.raises(OSError):
            while True:
                fh.write(bytes(4096))
        hole.unlink()  # 220 KiB free: the request (133 kB) fits, its report (150 kB) not
        large = str(generate_uid())
        refs = references(*[(CT, f"1.2.3.{n}") for n in range(3500)])
        assert request(daemon.port, action(large, refs))[0] == 0
        daemon.wait_log("No space left on device")
        small = str(generate_uid())
        assert request(daemon.port, action(small, references((CT, "1.2.3"))))[0] == 0
        _, info = report_scp.wait(timeout=20)[0]
        assert info.TransactionUID == small
        time.sleep(4)  # attempts go on meanwhile, the log stays quiet
        errors = [line for line in daemon.log().splitlines()
                  if " ERROR " in line and "storage commitment" in line]
        assert len(errors) == 1, errors
        assert "cannot be evaluated: No space left on device; later requests go on" \
            in errors[0]
        filler.unlink()
        _, info = report_scp.wait(2, timeout=90)[1]
        assert info.TransactionUID == large and len(info.FailedSOPSequence) == 3500
        daemon.wait_log("evaluated after ")
        daemon.stop()


def test_a_target_refusing_the_scp_role_dead_letters_the_report(daemon_factory: Any,
                                                                tmp_path: Path) -> None:
    scp = ReportSCP(free_port(), accept_role=False).start()
    try:
        daemon = daemon_factory(settings(scp.port, delivery_retries=1))
        stored = store(daemon.port, make_study(tmp_path / "s", 1))
        request(daemon.port, action(str(generate_uid()), references(*stored)))
        log = daemon.wait_log("dead after 2 attempt(s)", timeout=30)
        assert "refused the Storage Commitment context" in log or "SCP role" in log
        assert scp.reports == []
        assert [j["state"] for j in jobs(daemon)] == ["dead"]
    finally:
        scp.stop()


def test_an_address_added_by_reload_serves_the_next_retry(daemon_factory: Any,
                                                          report_scp: ReportSCP,
                                                          tmp_path: Path) -> None:
    config = settings(report_scp.port)
    config["remote_aes"] = {}
    daemon = daemon_factory(config)
    stored = store(daemon.port, make_study(tmp_path / "s", 1))
    request(daemon.port, action(str(generate_uid()), references(*stored)))
    daemon.wait_log(f"no address for AE title '{MODALITY}'")
    text = daemon.config_path.read_text() + (
        f'\n[remote_aes.{MODALITY}]\nhost = "127.0.0.1"\nport = {report_scp.port}\n')
    daemon.config_path.write_text(text)
    assert report_scp.wait(timeout=30)[0][0] == 1


def test_a_hung_modality_delays_neither_events_nor_other_modalities(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    # Reports to a modality that accepts the connection and never answers (each attempt
    # waits network.acse_timeout) run in their own slots, one at a time for that AE title:
    # reception jobs (one [jobs] slot) and another modality's report go on meanwhile.
    hung = Blackhole()
    try:
        receptions = tmp_path / "receptions"
        config = settings(report_scp.port)
        config["remote_aes"]["HUNG"] = {"host": "127.0.0.1", "port": hung.port}
        config["network"] = {"acse_timeout": 300}
        config["jobs"]["concurrency"] = 1
        config["events"] = {"exec_on_reception": ["/bin/sh", "-c", f"echo x >> {receptions}"]}
        daemon = daemon_factory(config)
        for _ in range(3):
            request(daemon.port, action(str(generate_uid()), references((CT, "1.2.3"))),
                    calling="HUNG")
        wait_until(lambda: len(hung.held) == 1, 20, "a delivery to the hung modality")
        stored = store(daemon.port, make_study(tmp_path / "s", 3))
        wait_until(lambda: receptions.exists() and len(receptions.read_text().split()) == 3,
                   20, "the reception jobs")
        transaction = str(generate_uid())
        assert request(daemon.port, action(transaction, references(*stored)))[0] == 0
        event_type, info = report_scp.wait(timeout=20)[0]
        assert event_type == 1 and info.TransactionUID == transaction
        assert len(hung.held) == 1  # its other reports wait for that one's end
        hung_jobs = [j["state"] for j in jobs(daemon)
                     if json.loads(j["env"]).get("DICOM_CALLING_AE") == "HUNG"]
        assert sorted(hung_jobs) == ["pending", "pending", "running"]
    finally:
        hung.close()


@pytest.mark.parametrize("mode, why", [
    ("bigpdu", "the peer sent a PDU of 1048582 bytes (type 0x04), more than the 131072 we "
               "accept"),
    ("flood", "the peer sent more than 65536 bytes without a complete N-EVENT-REPORT-RSP "
              "command"),
    ("wrongid", "the N-EVENT-REPORT-RSP answers message ID 7, not the report's message ID 1: "
                "not an answer to the report"),
])
def test_a_hostile_report_target_costs_one_line(daemon_factory: Any, mode: str,
                                                why: str) -> None:
    # Whatever the target answers, the attempt ends (bounded in time and memory) with one
    # line naming the reason and the target; no traceback.
    hostile = HostileReportSCP(mode)
    try:
        config = settings(hostile.port, delivery_retries=0)
        config["remote_aes"] = {"HOSTILE": {"host": "127.0.0.1", "port": hostile.port}}
        daemon = daemon_factory(config)
        assert request(daemon.port, action(str(generate_uid()), references((CT, "1.2.3"))),
                       calling="HOSTILE")[0] == 0
        log = daemon.wait_log("dead after 1 attempt(s)", timeout=30)
        lines = [line for line in log.splitlines() if " stderr: " in line]
        assert len(lines) == 1, lines
        assert lines[0].endswith(f"stderr: report not delivered: {why} (AE HOSTILE at "
                                 f"127.0.0.1:{hostile.port})")
        assert "Traceback" not in log
    finally:
        hostile.close()


@pytest.mark.parametrize("dataset, why", [
    (action(None, references((CT, "1.2.3"))), "no Transaction UID"),
    (action("", references((CT, "1.2.3"))), "no Transaction UID"),
    (action("1.2.3", None), "no Referenced SOP Sequence"),
    (action("1.2.3", []), "is empty"),
    (action("1.2.3", references((CT, ""))), "no valid Referenced SOP Class UID"),
    (None, "no Action Information"),
], ids=["no-transaction", "empty-transaction", "no-sequence", "empty-sequence",
        "item-without-instance", "no-data-set"])
def test_a_malformed_request_is_refused_and_nothing_is_done(
        daemon_factory: Any, report_scp: ReportSCP, dataset: Dataset | None, why: str) -> None:
    daemon = daemon_factory(settings(report_scp.port))
    status, _ = request(daemon.port, dataset)
    assert status == 0x0115
    log = daemon.wait_log("storage commitment request refused with 0x0115")
    assert why in log and "nothing recorded" in log
    assert "Traceback" not in log
    time.sleep(1.5)  # the master looks at the spool every second
    assert jobs(daemon) == [] and report_scp.reports == []
    spool = daemon.out / ".ingestd-state" / "commitment" / "requests"
    assert list(spool.iterdir()) == []


def test_wrong_action_type_and_unauthorised_caller(daemon_factory: Any,
                                                   report_scp: ReportSCP) -> None:
    daemon = daemon_factory(settings(report_scp.port, allowed_calling_aetitles=["CT01"]))
    dataset = action(str(generate_uid()), references((CT, "1.2.3")))
    assert request(daemon.port, dataset, calling=MODALITY)[0] == 0x0124
    assert request(daemon.port, dataset, calling="CT01", action_type=2)[0] == 0x0123
    daemon.wait_log("may not request storage commitment")
    assert jobs(daemon) == []


def test_a_reused_transaction_uid_fails_every_reference_with_0131(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(report_scp.port))
    stored = store(daemon.port, make_study(tmp_path / "s", 1))
    transaction = str(generate_uid())
    assert request(daemon.port, action(transaction, references(*stored)))[0] == 0
    report_scp.wait(1)
    assert request(daemon.port, action(transaction, references(*stored)))[0] == 0
    event_type, info = report_scp.wait(2)[1]
    assert event_type == 2 and info.TransactionUID == transaction
    assert uids(info.FailedSOPSequence) == [(*stored[0], 0x0131)]
    daemon.wait_log("transaction UID used before: 0x0131 for each")


def test_a_requester_refusing_the_scu_role_gets_no_context(daemon_factory: Any,
                                                           report_scp: ReportSCP) -> None:
    daemon = daemon_factory(settings(report_scp.port))
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(Verification)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="STORESCP", ext_neg=[role])
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assert StorageCommitmentPushModel not in accepted
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    # Proposing both roles: the requester is SCU, and may request.
    both = build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    status, _ = request(daemon.port, action(str(generate_uid()), references((CT, "1.2.3"))),
                        roles=[both])
    assert status == 0


def test_disabled_means_no_context(daemon_factory: Any) -> None:
    daemon = daemon_factory({})
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="STORESCP")
    assert StorageCommitmentPushModel not in {str(cx.abstract_syntax)
                                              for cx in assoc.accepted_contexts}
    assoc.release()


def test_a_huge_reference_sequence_is_refused_with_bounded_memory(
        daemon_factory: Any, report_scp: ReportSCP, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(report_scp.port, max_references=2000))
    stored = store(daemon.port, make_study(tmp_path / "s", 1))
    at_limit = references(*stored, *[(CT, f"1.2.3.{n}") for n in range(1999)])
    assert request(daemon.port, action(str(generate_uid()), at_limit))[0] == 0
    _, info = report_scp.wait()[0]
    assert len(info.FailedSOPSequence) == 1999 and len(info.ReferencedSOPSequence) == 1
    # 50 times the limit: read and dropped beyond its bytes, refused, nothing recorded.
    huge = references(*[(CT, f"1.2.3.{n}") for n in range(100000)])
    assert request(daemon.port, action(str(generate_uid()), huge))[0] == 0x0213
    log = daemon.wait_log("refused with 0x0213")
    assert "exceeds" in log and "storage_commitment.max_references = 2000" in log
    # Just over the limit in count, within the byte bound: refused the same way.
    over = references(*[(CT, f"1.{n}") for n in range(2001)])
    assert request(daemon.port, action(str(generate_uid()), over))[0] == 0x0213
    time.sleep(1.5)
    assert len(jobs(daemon)) == 1


def test_requests_work_with_events_on_as_well(daemon_factory: Any, report_scp: ReportSCP,
                                              tmp_path: Path) -> None:
    config = settings(report_scp.port, same_association_wait=10)
    config["events"] = {"exec_on_reception": ["/bin/true"]}
    daemon = daemon_factory(config)
    stored = store(daemon.port, make_study(tmp_path / "s", 2))
    status, here = request(daemon.port, action(str(generate_uid()), references(*stored)),
                           keep_open=15)
    assert status == 0 and [t for t, _ in here] == [1]


# -- Orthanc as the requester ---------------------------------------------------------------
def _orthanc(tmp_path: Path, dicom_port: int, http_port: int, daemon_port: int) -> Any:
    require_tool("Orthanc")
    storage = tmp_path / "orthanc-db"
    config = {
        "Name": "commitment-test", "StorageDirectory": str(storage),
        "IndexDirectory": str(storage), "HttpPort": http_port, "DicomPort": dicom_port,
        "DicomAet": MODALITY, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomModalities": {"ingestd": {"AET": "STORESCP", "Host": "127.0.0.1",
                                        "Port": daemon_port}},
        "Plugins": [], "LogExportedResources": False, "StorageCommitmentReportsSize": 100,
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(config))
    log = open(tmp_path / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(["/usr/sbin/Orthanc", str(path)], stdout=log,
                            stderr=subprocess.STDOUT)
    return proc


def _rest(http_port: int, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{http_port}{path}", data=data,
            method="GET" if data is None else "POST"), timeout=30) as response:
        return json.loads(response.read() or b"null")


def test_orthanc_requests_commitment_of_what_it_sent(daemon_factory: Any,
                                                     tmp_path: Path) -> None:
    dicom_port, http_port = free_port(), free_port()
    daemon = daemon_factory(settings(dicom_port))
    orthanc = _orthanc(tmp_path, dicom_port, http_port, daemon.port)
    try:
        wait_until(lambda: _alive(http_port), 30, "Orthanc's REST API")
        ids = [_upload(http_port, path) for path in make_study(tmp_path / "s", 3)]
        _rest(http_port, "/modalities/ingestd/store", {"Resources": ids, "Synchronous": True})
        instances = [_rest(http_port, f"/instances/{i}/tags?simplify") for i in ids]
        refs = [{"SOPClassUID": t["SOPClassUID"], "SOPInstanceUID": t["SOPInstanceUID"]}
                for t in instances]
        refs.append({"SOPClassUID": CT, "SOPInstanceUID": str(generate_uid())})
        answer = _rest(http_port, "/modalities/ingestd/storage-commitment",
                       {"DicomInstances": refs})
        transaction = answer["ID"]

        def report() -> Any:
            return _rest(http_port, f"/storage-commitment/{transaction}")

        wait_until(lambda: report()["Status"] != "Pending", 30, "Orthanc's report")
        outcome = report()
        assert outcome["Status"] == "Failure"  # one reference was never sent
        assert sorted(s["SOPInstanceUID"] for s in outcome["Success"]) == \
            sorted(r["SOPInstanceUID"] for r in refs[:3])
        assert [f["SOPInstanceUID"] for f in outcome["Failures"]] == [refs[3]["SOPInstanceUID"]]
        assert [f["FailureReason"] for f in outcome["Failures"]] == [0x0112]
        daemon.wait_log(f"storage commitment report of transaction {transaction} sent to "
                        f"{MODALITY}@127.0.0.1:{dicom_port}: 3 committed, 1 failed")
    finally:
        orthanc.terminate()
        orthanc.wait(20)


def _alive(http_port: int) -> bool:
    try:
        _rest(http_port, "/system")
    except OSError:
        return False
    return True


def _upload(http_port: int, path: Path) -> str:
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{http_port}/instances", data=path.read_bytes(),
            method="POST"), timeout=30) as response:
        return str(json.loads(response.read())["ID"])

