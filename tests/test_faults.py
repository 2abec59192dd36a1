"""The durability promise under faults, and hostile peers.

* A crash (SIGKILL) mid-transfer leaves nothing in the output tree but a partial file in the
  staging directory, which the next start removes; the object can then be sent again.
* A peer that aborts or vanishes mid data set leaves no file and an empty staging directory.
* A full disk answers 0xA700 and leaves nothing behind, and the daemon recovers by itself when
  space is free again; storage.min_free_space refuses before anything is written.
* Hostile values (UIDs, patient names, AE titles) through every naming and sorting mode never
  create anything outside the output directory.
* Protocol abuse is answered with A-ABORT (or a clean reject), and the daemon keeps serving.

Peers are DCMTK's tools, pynetdicom, and the raw-socket Upper Layer client of
tests/support/wire.py (so that values no conforming library would send can be sent).  Every
socket and subprocess has a timeout; mounts are undone and daemons stopped however a test ends.
"""

import errno
import os
import socket
import struct
import subprocess
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from support.daemon import STAGING, Daemon, tree_outside_staging
from support.data import declared_data_set, make_study, minimal_ct, new_ct_file
from support.data import testdata as data_file
from support.mounts import mounted_tmpfs
from support.peers import assert_serving, require_tool, storescp, storescu
from support.procs import alive, descendants
from support.scu import pynetdicom_store
from support.uids import CT_IMAGE, EXPLICIT_LE, IMPLICIT_LE, MR_IMAGE, VERIFICATION
from support.wait import wait_until
from support.wire import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    ABORT_PDU,
    P_DATA_TF,
    Aborted,
    Association,
    associate,
    associate_rq,
    c_echo_rq,
    c_store,
    c_store_rq,
    connect,
    p_data,
    parse_ac,
    pdu,
    read_response,
    read_until_closed,
    release,
    request_association,
    send_fragments,
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


# --- crash mid-transfer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT object of about 100 MB."""
    return new_ct_file(tmp_path_factory.mktemp("big"), 100_000_000, "big-ct.dcm")


class ThrottledProxy:
    """Forwards one TCP connection to `target_port`, the client's bytes at `rate` bytes/s.

    Set `rate` to 0 to stop throttling.
    """

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = [self.listener]
        self.threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self.threads.append(accept)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        except OSError:
            return
        self.sockets += [client, server]
        for src, dst, throttled in ((client, server, True), (server, client, False)):
            src.settimeout(60)
            thread = threading.Thread(target=self._pump, args=(src, dst, throttled), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while True:
                data = src.recv(32768)
                if not data:
                    break
                dst.sendall(data)
                if throttled and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            # Closed, not only shut down: a sender blocked writing into a connection whose
            # other end died must learn it now (a reset), not at its own timeout.
            for sock in (src, dst):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with suppress(OSError):
                    sock.close()

    def close(self) -> None:
        for sock in self.sockets:
            with suppress(OSError):
                sock.close()
        for thread in self.threads:
            thread.join(5)


@dataclass
class Transfer:
    """storescu sending one file to the daemon through a throttling proxy, in the background."""

    proxy: ThrottledProxy
    sender: subprocess.Popen[bytes]

    def finish(self, timeout: float = 120) -> int:
        try:
            self.sender.wait(timeout)
        except subprocess.TimeoutExpired:
            self.sender.kill()
            self.sender.wait(5)
        finally:
            self.proxy.close()
        return int(self.sender.returncode)


def start_transfer(daemon: Daemon, path: Path, log: Path, rate: float = 4_000_000) -> Transfer:
    require_tool("storescu")
    proxy = ThrottledProxy(daemon.port, rate=rate)
    env = dict(os.environ, TCP_NODELAY="1")
    with open(log, "wb") as scu_log:
        sender = subprocess.Popen(["storescu", "-v", "127.0.0.1", str(proxy.port), str(path)],
                                  stdout=scu_log, stderr=subprocess.STDOUT, env=env)
    return Transfer(proxy, sender)


def wait_for_growing_part(daemon: Daemon, size: int = 1_000_000) -> Path:
    """Wait until a temporary file in the staging directory is larger than `size`."""
    found: list[Path] = []

    def growing() -> bool:
        found[:] = [p for p in daemon.staging()
                    if p.name.endswith(".part") and p.stat().st_size > size]
        return bool(found)

    wait_until(growing, 60, lambda: f"a .part above {size} bytes:\n{daemon.log()}")
    return found[0]


def assert_stored_intact(daemon: Daemon, source: Path) -> None:
    stored = daemon.files()
    assert len(stored) == 1, stored
    assert declared_data_set(stored[0]) == declared_data_set(source)
    meta = dcmread(stored[0], stop_before_pixels=True).file_meta
    original = dcmread(source, stop_before_pixels=True).file_meta
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                    "TransferSyntaxUID"):
        assert meta[keyword].value == original[keyword].value


def test_sigkill_during_transfer_leaves_only_a_partial_file_removed_at_restart(
        tmp_path: Path, daemon_factory: Any, big_object: Path) -> None:
    """The whole daemon (master and association workers) is SIGKILLed mid-object."""
    daemon = daemon_factory({"network": {"max_pdu": 131072}})
    transfer = start_transfer(daemon, big_object, tmp_path / "storescu.log")
    pids: list[int] = []
    try:
        wait_for_growing_part(daemon)
        pids = [daemon.proc.pid, *descendants(daemon.proc.pid)]
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, 9)
        daemon.proc.wait(10)
        # Gone from /proc, not merely dead: a zombie's pid still looks like a live writer.
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 20,
                   f"killed processes {pids} reaped")
    finally:
        returncode = transfer.finish(30)
    assert returncode != 0, "storescu reported success for an interrupted transfer"
    assert tree_outside_staging(daemon.out) == [], "a file appeared outside the staging area"
    parts = daemon.staging()
    assert len(parts) == 1 and parts[0].name.endswith(".part"), parts
    assert parts[0].stat().st_size > 1_000_000

    again = daemon_factory({"storage": {"output_directory": str(daemon.out)}})
    log = again.log()
    assert f"removed 1 partial object(s) left by an earlier crash in {daemon.out / STAGING}" \
        in log, log
    assert again.staging() == []
    storescu(again.port, big_object, timeout=300)
    assert_stored_intact(again, big_object)
    assert again.staging() == []


def test_sigkill_of_the_master_alone_keeps_acknowledged_objects_consistent(
        tmp_path: Path, daemon_factory: Any, big_object: Path) -> None:
    """Daemon.proc.kill() mid-object: only the master dies; a new master starts at once.

    The association's worker outlives its master (it is an ordinary child process) and goes on
    receiving, while the new master's start-up cleanup runs on the same staging directory.
    Whatever the interleaving, storescu's outcome and the tree must agree: success means one
    intact file, failure means none; and nothing is left in the staging directory.
    """
    daemon = daemon_factory({"network": {"max_pdu": 131072}})
    transfer = start_transfer(daemon, big_object, tmp_path / "storescu.log")
    workers: list[int] = []  # the association's worker and any other child of the master
    try:
        wait_for_growing_part(daemon)
        workers = list(descendants(daemon.proc.pid))
        daemon.proc.kill()
        daemon.proc.wait(10)
        again = daemon_factory({"storage": {"output_directory": str(daemon.out)}})
        transfer.proxy.rate = 0  # let the rest through at full speed
        returncode = transfer.finish(120)
        wait_until(lambda: not any(alive(pid) for pid in workers), 30,
                   f"the orphaned worker(s) {workers} exited after the association ended")
    finally:
        transfer.finish(5)
        for pid in workers:  # started by this test's daemon; never leave one behind
            if alive(pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, 9)
    scu_output = (tmp_path / "storescu.log").read_text(errors="replace")
    logs = f"--- storescu:\n{scu_output}\n--- first daemon:\n{daemon.log()[-3000:]}\n" \
           f"--- second daemon:\n{again.log()[-3000:]}"
    if returncode == 0:
        assert_stored_intact(again, big_object)
    else:
        assert tree_outside_staging(again.out) == [], logs
    wait_until(lambda: again.staging() == [], 10,
               lambda: f"staging emptied: {again.staging()}")
    assert_serving(again)
    if returncode != 0:
        storescu(again.port, big_object, timeout=300)
        assert_stored_intact(again, big_object)


# --- a peer that leaves mid data set ------------------------------------------------------


@pytest.mark.parametrize("how", ["a-abort", "tcp-close", "a-abort-after-command"])
def test_peer_leaving_mid_data_set_leaves_nothing(daemon: Daemon, how: str) -> None:
    source = data_file("CT_small.dcm")
    ds = dcmread(source)
    data = declared_data_set(source)
    assoc = associate(daemon.port)
    try:
        send_fragments(assoc, 1, c_store_rq(CT_IMAGE.encode(), ds.SOPInstanceUID.encode()),
                       command=True)
        if how != "a-abort-after-command":
            assoc.sock.sendall(p_data(1, 0x00, data[:4096]))  # not the last fragment
        wait_until(lambda: any(p.name.endswith(".part") for p in daemon.staging()), 10,
                   lambda: f"a temporary file:\n{daemon.log()}")
        if how != "tcp-close":
            assoc.sock.sendall(ABORT_PDU)
    finally:
        assoc.close()
    daemon.wait_log("aborted by the peer" if how != "tcp-close" else "partial object")
    wait_until(lambda: daemon.staging() == [], 10,
               lambda: f"staging emptied: {daemon.staging()}")
    assert tree_outside_staging(daemon.out) == []
    storescu(daemon.port, source, timeout=30)
    assert [p.name for p in daemon.files()] == [f"CT.{ds.SOPInstanceUID}"]


@pytest.mark.parametrize("how", ["release", "a-abort", "tcp-close"])
def test_storage_association_without_a_c_store_leaves_nothing(daemon: Daemon,
                                                             how: str) -> None:
    """The first object's temporary file is made as soon as a storage context is accepted
    (while the peer sends the object); an association that then stores nothing must not
    leave it behind, whichever way it ends, and a Verification-only one makes none."""
    echo_only = associate(daemon.port, [(1, VERIFICATION, [IMPLICIT_LE])])
    try:
        time.sleep(0.2)  # ample for a file to appear, were one made
        assert daemon.staging() == [], "a Verification-only association made a staging file"
    finally:
        release(echo_only)
    assoc = associate(daemon.port)
    try:
        wait_until(lambda: any(p.name.endswith(".part") for p in daemon.staging()), 10,
                   lambda: f"the first object's temporary file, made at once:\n{daemon.log()}")
        if how == "release":
            release(assoc)
            assert daemon.staging() == [], "a temporary file outlived the A-RELEASE-RP"
        elif how == "a-abort":
            assoc.sock.sendall(ABORT_PDU)
    finally:
        assoc.close()
    wait_until(lambda: daemon.staging() == [], 10,
               lambda: f"staging emptied: {daemon.staging()}\n{daemon.log()}")
    assert tree_outside_staging(daemon.out) == []
    source = data_file("CT_small.dcm")
    storescu(daemon.port, source, timeout=30)
    assert [p.name for p in daemon.files()] == [f"CT.{dcmread(source).SOPInstanceUID}"]
    assert daemon.staging() == []


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_mb_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_ct_file(tmp_path_factory.mktemp("five"), 5_000_000, "five-mb-ct.dcm")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (request this fixture before daemon_factory, so it is unmounted last)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "size=2m") as mountpoint:
        yield mountpoint


def remount(mountpoint: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)],
                          capture_output=True, text=True, timeout=30)


def test_an_association_waiting_for_its_next_object_keeps_no_file_open(
        small_tmpfs: Path, daemon_factory: Any) -> None:
    """The next object's temporary file is made ahead (after the A-ASSOCIATE-AC, after each
    object) but not held open: an association waiting for the peer keeps nothing open for
    writing, so an administrator's read-only remount of the output file system succeeds."""
    daemon = daemon_factory({"storage": {"output_directory": str(small_tmpfs / "out")}})
    assoc = associate(daemon.port)
    try:
        wait_until(lambda: any(p.name.endswith(".part") for p in daemon.staging()), 10,
                   lambda: f"the first object's temporary file:\n{daemon.log()}")
        for round_ in ("before the first object", "between objects"):
            result = remount(small_tmpfs, "ro")
            assert result.returncode == 0, f"read-only remount {round_}: {result.stderr}"
            assert remount(small_tmpfs, "rw").returncode == 0
            if round_ == "before the first object":
                ds = dcmread(data_file("CT_small.dcm"))
                status = c_store(assoc, 1, CT_IMAGE.encode(), ds.SOPInstanceUID.encode(),
                                 declared_data_set(data_file("CT_small.dcm")))
                assert status == 0x0000, hex(status)
                time.sleep(0.2)  # past the wait after which the next file is made ahead
        release(assoc)
    finally:
        assoc.close()
    assert daemon.staging() == []
    assert [p.name for p in daemon.files()] == [f"CT.{ds.SOPInstanceUID}"]


def fill(path: Path) -> None:
    """Write `path` until the file system is full."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with open(path, "ab", buffering=0) as f, suppress(OSError):  # the last bytes, one by one
        for _ in range(65536):
            f.write(b"\0")


def test_disk_full_answers_a700_leaves_nothing_and_recovers(
        small_tmpfs: Path, daemon_factory: Any, five_mb_object: Path, tmp_path: Path) -> None:
    daemon = daemon_factory({"storage": {"output_directory": str(small_tmpfs)}})
    try:
        assert pynetdicom_store(daemon.port, five_mb_object) == OUT_OF_RESOURCES
        assert tree_outside_staging(small_tmpfs) == []
        assert daemon.staging() == []
        errors = [line for line in daemon.log().splitlines()
                  if " ERROR " in line and "No space left" in line]
        assert errors, daemon.log()

        # The failed temporary file was removed, so there is room for a small object.
        first = new_ct_file(tmp_path)
        assert pynetdicom_store(daemon.port, first) == SUCCESS
        assert [p.name for p in daemon.files()] == [f"CT.{dcmread(first).SOPInstanceUID}"]

        filler = small_tmpfs / "filler.bin"
        fill(filler)
        second = new_ct_file(tmp_path)
        assert pynetdicom_store(daemon.port, second) == OUT_OF_RESOURCES
        assert daemon.staging() == []
        first_stored = small_tmpfs / f"CT.{dcmread(first).SOPInstanceUID}"
        assert tree_outside_staging(small_tmpfs) == sorted([filler, first_stored])

        filler.unlink()  # space is back: the daemon recovers by itself
        third = new_ct_file(tmp_path)
        assert pynetdicom_store(daemon.port, third) == SUCCESS
        assert len(daemon.files()) == 2
        assert daemon.staging() == []
        assert_serving(daemon)
    finally:
        daemon.stop()


def test_min_free_space_refuses_before_writing(
        small_tmpfs: Path, daemon_factory: Any, tmp_path: Path) -> None:
    daemon = daemon_factory({"storage": {"output_directory": str(small_tmpfs),
                                         "min_free_space": 4 * 1024 * 1024}})
    try:
        before = os.statvfs(small_tmpfs)
        obj = new_ct_file(tmp_path)
        assert pynetdicom_store(daemon.port, obj) == OUT_OF_RESOURCES
        log = daemon.log()
        assert "min_free_space" in log, log
        assert "No space left" not in log
        assert tree_outside_staging(small_tmpfs) == []
        assert daemon.staging() == []
        after = os.statvfs(small_tmpfs)
        assert after.f_bfree == before.f_bfree
        assert_serving(daemon)
    finally:
        daemon.stop()
    # Below the free space, the same object is stored.
    daemon = daemon_factory({"storage": {"output_directory": str(small_tmpfs),
                                         "min_free_space": 65536}})
    try:
        assert pynetdicom_store(daemon.port, obj) == SUCCESS
        assert len(daemon.files()) == 1
    finally:
        daemon.stop()


# --- hostile names ---------------------------------------------------------------------------

PWNED = [Path("/tmp/pwned"), Path("/tmp/pwned2")]
HOSTILE: list[str] = [
    "../../etc/x",
    "/abs/path",
    "a/b",
    "..",
    ".",
    "../" * 10 + "tmp/x",
    "9" * 400,
    "name\nwith newline",
    "$(touch /tmp/pwned)",
    "`touch /tmp/pwned2`",
    "-rf",
    "a\u2215b\u2215..\u2215x",  # DIVISION SLASH
    "\uff0e\uff0e",  # FULLWIDTH FULL STOP x2
    "\\..\\x",
    "x\x00y",
    "*?[]~ \t|;&<>",
]
FILENAME_MODES = ["default", "unique", "timenames"]
SORT_MODES = ["none", "conc-studies", "study-uid", "patientname"]


def _printable_ascii(value: str) -> bool:
    return value.isascii() and all(unicodedata.category(c)[0] != "C" for c in value)


def snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@dataclass
class HostileResult:
    value: str
    field: str
    outcome: str  # "0x0000", "0xA700", ..., "rejected", "aborted"


@pytest.mark.parametrize("sort", SORT_MODES)
@pytest.mark.parametrize("filenames", FILENAME_MODES)
def test_hostile_values_stay_under_the_output_directory(
        tmp_path: Path, daemon_factory: Any, filenames: str, sort: str) -> None:
    for marker in PWNED:
        with suppress(FileNotFoundError):
            marker.unlink()  # a stale marker would hide nothing but fail the test
    base = tmp_path.parent
    before = snapshot(base)
    storage: dict[str, Any] = {"filenames": filenames, "sort": sort}
    if sort in ("conc-studies", "study-uid"):
        storage["sort_prefix"] = "P"
    daemon = daemon_factory({"storage": storage})
    results: list[HostileResult] = []

    # 1. One association: each value as SOP Instance UID (command and data set), Study
    #    Instance UID and Patient Name of one object.
    assoc = associate(daemon.port, calling=b"HOSTILE")
    try:
        for number, value in enumerate(HOSTILE, start=1):
            raw = value.encode("utf-8")
            try:
                status = c_store(assoc, 1, CT_IMAGE.encode(), raw,
                                 minimal_ct(raw, raw, raw), message_id=number)
            except Aborted as exc:
                results.append(HostileResult(value, "uids+name", f"aborted {exc}"))
                break
            results.append(HostileResult(value, "uids+name", f"0x{status:04X}"))
        else:
            release(assoc)
    finally:
        assoc.close()

    # 2. Each value (its first 16 bytes) as the calling AE title of an association.
    for value in HOSTILE:
        raw = value.encode("utf-8")
        sock, pdu_type, body = request_association(
            daemon.port, [(1, CT_IMAGE, [EXPLICIT_LE])], calling=raw)
        try:
            if pdu_type == A_ASSOCIATE_RJ:
                results.append(HostileResult(value, "calling-ae", "rejected"))
                continue
            if pdu_type == A_ABORT:
                results.append(HostileResult(value, "calling-ae", "aborted"))
                continue
            assert pdu_type == A_ASSOCIATE_AC, pdu_type
            accepted, max_pdu = parse_ac(body)
            ae_assoc = Association(sock, accepted, max_pdu)
            uid = generate_uid().encode()
            status = c_store(ae_assoc, 1, CT_IMAGE.encode(), uid,
                             minimal_ct(uid, generate_uid().encode(), b"Calling^AE"))
            results.append(HostileResult(value, "calling-ae", f"0x{status:04X}"))
            release(ae_assoc)
        finally:
            sock.close()

    assert_serving(daemon)
    storescu(daemon.port, data_file("CT_small.dcm"), timeout=30)
    daemon.stop()

    # Nothing outside the output directory (besides this test's config and log files).
    created = snapshot(base) - before
    ours = {daemon.config_path, daemon.log_path, daemon.out}
    outside = sorted(p for p in created if p not in ours and not p.is_relative_to(daemon.out))
    assert outside == [], f"created outside {daemon.out}: {outside}"
    for path in [*PWNED, Path("/abs/path"), Path("/abs"), Path("/etc/x"), Path("/tmp/x")]:
        assert not path.exists(), f"{path} exists"

    # Every name in the tree is one tame component.
    for path in tree_outside_staging(daemon.out):
        name = path.name
        assert not name.startswith((".", "-")), path
        assert _printable_ascii(name) and " " not in name, repr(name)
        assert len(name.encode()) <= 255, path
    assert daemon.staging() == []

    # Outcomes: printable ASCII values (without '\\', which makes a value multi-valued) are
    # stored, their names made safe; others may be refused with a failure status or a
    # reject/abort, never a hang or a dropped connection mid-store.
    summary = "\n".join(f"{r.field:10} {r.value!r:.60}: {r.outcome}" for r in results)
    for result in results:
        if result.field == "uids+name":
            assert result.outcome.startswith("0x"), summary
        if _printable_ascii(result.value) and "\\" not in result.value:
            assert result.outcome == "0x0000", summary
    if filenames != "default":  # default names of distinct odd UIDs may coincide, see below
        expected = sum(r.outcome == "0x0000" for r in results) + 1
        assert len(daemon.files()) == expected, summary


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_distinct_sop_instances_never_share_a_file(daemon: Daemon) -> None:
    """Two objects acknowledged with success must both exist afterwards.

    Making names safe maps '/' and a leading '.' to '_', so the SOP Instance UIDs 'a/b' and
    'a_b' (or '..' and '__') would get the same default file name, and the second object
    would silently replace the first one, which was already acknowledged as stored.
    """
    pairs = [(b"a/b", b"a_b"), (b"..", b"__"), (b"1.2/3", b"1.2_3")]
    assoc = associate(daemon.port)
    try:
        for number, uid in enumerate([u for pair in pairs for u in pair], start=1):
            status = c_store(assoc, 1, CT_IMAGE.encode(), uid,
                             minimal_ct(uid, b"1.2.3", b"Doe^John"), message_id=number)
            assert status == SUCCESS, uid
        release(assoc)
    finally:
        assoc.close()
    stored = daemon.files()
    uids = sorted(str(dcmread(p).SOPInstanceUID) for p in stored)
    assert uids == sorted(u.decode() for pair in pairs for u in pair), \
        f"acknowledged objects were overwritten: {[p.name for p in stored]}"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("sort", ["none", "study-uid", "patientname"])
def test_hostile_values_through_pynetdicom(tmp_path: Path, daemon_factory: Any,
                                           monkeypatch: pytest.MonkeyPatch, sort: str) -> None:
    """The same values sent by a stock pynetdicom SCU.

    pynetdicom refuses UIDs over 64 characters and AE titles with odd characters even with
    ENFORCE_UID_CONFORMANCE off (its default); replacing its validators lets them through.
    Values it cannot encode at all (non-ASCII in a UI, NUL, '\\') are left to the raw client.
    """
    from pynetdicom import AE, _config

    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    monkeypatch.setitem(_config.VALIDATORS, "AE", lambda value: (True, ""))
    for marker in PWNED:
        with suppress(FileNotFoundError):
            marker.unlink()
    base = tmp_path.parent
    before = snapshot(base)
    daemon = daemon_factory({"storage": {"sort": sort}})
    ae = AE(ae_title="../../x")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CT_IMAGE, [EXPLICIT_LE])
    values = [v for v in HOSTILE if v.isascii() and "\\" not in v and "\0" not in v]
    statuses: dict[str, int | None] = {}
    assoc = ae.associate("127.0.0.1", daemon.port)
    assert assoc.is_established
    try:
        for value in values:
            ds = dcmread(data_file("CT_small.dcm"))
            ds.SOPInstanceUID = ds.StudyInstanceUID = ds.PatientName = value
            ds.file_meta.MediaStorageSOPInstanceUID = value
            status = assoc.send_c_store(ds)
            statuses[value] = int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()
    assert statuses == dict.fromkeys(values, SUCCESS)
    assert_serving(daemon)
    daemon.stop()
    created = snapshot(base) - before
    ours = {daemon.config_path, daemon.log_path, daemon.out}
    outside = sorted(p for p in created if p not in ours and not p.is_relative_to(daemon.out))
    assert outside == [], f"created outside {daemon.out}: {outside}"
    for path in [*PWNED, Path("/abs/path"), Path("/etc/x"), Path("/tmp/x")]:
        assert not path.exists(), f"{path} exists"
    for path in tree_outside_staging(daemon.out):
        assert not path.name.startswith((".", "-")) and _printable_ascii(path.name), path


# --- start-up cleanup and logging ---------------------------------------------------------


def _start_over_an_hour_old_leftover(tmp_path: Path, daemon_factory: Any, pid: int) -> Daemon:
    """Start a daemon on an output directory whose staging holds a .part file of `pid`,
    last written an hour ago; assert that start-up removed it."""
    out = tmp_path / "out"
    staging = out / STAGING
    staging.mkdir(parents=True)
    leftover = staging / f"{pid}-0-0123abcd.part"
    leftover.write_bytes(b"\0" * 4096)
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    daemon: Daemon = daemon_factory({"storage": {"output_directory": str(out)}})
    assert daemon.staging() == [], (
        f"leftover {leftover.name} kept at start-up; log:\n{daemon.log()[:2000]}")
    return daemon


def test_leftover_of_a_pid_now_used_by_another_process_is_removed(
        tmp_path: Path, daemon_factory: Any) -> None:
    """After a reboot, a crashed worker's pid may belong to any process (here: pid 1).

    The staging directory is the daemon's own (.ingestd-tmp, mode 0700); a .part file there
    whose pid is alive but is no dicom-ingestd process is a leftover all the same, and must be
    removed at start-up like any other.
    """
    daemon = _start_over_an_hour_old_leftover(tmp_path, daemon_factory, pid=1)
    assert "removed 1 partial object(s) left by an earlier crash" in daemon.log()


def test_leftover_of_a_pid_now_used_by_a_younger_daemon_is_removed(
        tmp_path: Path, daemon_factory: Any) -> None:
    """The crashed worker's pid now belongs to a dicom-ingestd process after all -- one that
    started after the file was last written, so it cannot be its writer: a leftover."""
    other = daemon_factory({"storage": {"output_directory": str(tmp_path / "other")}})
    _start_over_an_hour_old_leftover(tmp_path, daemon_factory, pid=other.proc.pid)


def test_idle_daemon_with_debug_log_next_to_its_config_stays_quiet(daemon: Daemon) -> None:
    """start_daemon's layout: config and log file in one directory, logging.level = debug.

    An idle daemon has next to nothing to say; it must not log about its own log file, however
    often someone reads it (as `tail -f` or this test suite's wait_log do) or whatever else
    happens in that directory.
    """
    time.sleep(1)  # the configuration watcher is up
    before = len(daemon.log().splitlines())
    (daemon.config_path.parent / "unrelated.txt").write_text("an unrelated file\n")
    for _ in range(10):  # someone following the log
        daemon.log()
        time.sleep(0.1)
    time.sleep(2)
    lines = daemon.log().splitlines()[before:]
    assert len(lines) < 50, (f"{len(lines)} log lines in 3 s while idle, e.g.:\n"
                             + "\n".join(line[:200] for line in lines[-3:]))


# --- protocol abuse ------------------------------------------------------------------------


def expect_abort(sock: socket.socket) -> bytes:
    """The peer sends an A-ABORT (as the first thing still unread) and closes the connection."""
    data = read_until_closed(sock)
    assert data[:1] == bytes([A_ABORT]) and len(data) >= 10, f"no A-ABORT, got {data!r}"
    assert data[1:6] == b"\0\0\0\0\x04", data
    return data[:10]


def _oversized_pdu(assoc: Association, daemon: Daemon) -> None:
    length = assoc.peer_max_pdu + 1000  # whatever the daemon advertised
    body = struct.pack(">LBB", length - 4, 1, 0x01) + bytes(length - 6)
    assoc.sock.sendall(pdu(P_DATA_TF, body))


def _pdv_longer_than_pdu(assoc: Association, daemon: Daemon) -> None:
    assoc.sock.sendall(pdu(P_DATA_TF, struct.pack(">LBB", 5000, 1, 0x03) + bytes(94)))


def _pdv_on_unaccepted_context(assoc: Association, daemon: Daemon) -> None:
    assert 3 not in assoc.accepted  # proposed, rejected (unknown abstract syntax)
    send_fragments(assoc, 3, c_echo_rq(), command=True)


def _pdv_on_unproposed_context(assoc: Association, daemon: Daemon) -> None:
    send_fragments(assoc, 7, c_echo_rq(), command=True)


def _unknown_pdu_type(assoc: Association, daemon: Daemon) -> None:
    assoc.sock.sendall(pdu(0x09, bytes(4)))


def _second_associate_rq(assoc: Association, daemon: Daemon) -> None:
    assoc.sock.sendall(associate_rq([(1, CT_IMAGE, [EXPLICIT_LE])]))


def _data_without_command(assoc: Association, daemon: Daemon) -> None:
    assoc.sock.sendall(p_data(1, 0x02, b"\x08\x00\x16\x00"))


def _zero_length_pdv(assoc: Association, daemon: Daemon) -> None:
    assoc.sock.sendall(pdu(P_DATA_TF, struct.pack(">LBB", 0, 1, 0x03)[:4]))


ABUSES = {
    "pdu-larger-than-max-pdu": _oversized_pdu,
    "pdv-longer-than-its-pdu": _pdv_longer_than_pdu,
    "pdv-on-rejected-context": _pdv_on_unaccepted_context,
    "pdv-on-unproposed-context": _pdv_on_unproposed_context,
    "unknown-pdu-type-0x09": _unknown_pdu_type,
    "second-a-associate-rq": _second_associate_rq,
    "data-set-without-command": _data_without_command,
    "zero-length-pdv": _zero_length_pdv,
}


@pytest.mark.parametrize("abuse", list(ABUSES))
def test_protocol_abuse_is_aborted_and_the_daemon_keeps_serving(
        daemon: Daemon, abuse: str) -> None:
    assoc = associate(daemon.port, [(1, CT_IMAGE, [EXPLICIT_LE]),
                                    (3, "1.2.3.4.5.6.7.8.9", [EXPLICIT_LE])])
    try:
        assert assoc.accepted == {1: EXPLICIT_LE}
        ABUSES[abuse](assoc, daemon)
        abort = expect_abort(assoc.sock)
    finally:
        assoc.close()
    assert abort[8] == 2, f"A-ABORT source {abort[8]}, expected 2 (service provider)"
    wait_until(lambda: daemon.staging() == [], 10, "an empty staging area")
    assert tree_outside_staging(daemon.out) == []
    assert_serving(daemon)


def test_unknown_pdu_before_association_is_aborted(daemon: Daemon) -> None:
    sock = connect(daemon.port)
    try:
        sock.sendall(pdu(0x09, bytes(4)))
        expect_abort(sock)
    finally:
        sock.close()
    assert_serving(daemon)


@pytest.mark.parametrize("max_pdu", [None, 16384], ids=["default", "storescp-default"])
def test_pdu_of_exactly_max_pdu_is_accepted(daemon_factory: Callable[..., Daemon],
                                             tmp_path: Path, max_pdu: int | None) -> None:
    """The limit is inclusive: a P-DATA-TF whose length is max_pdu is valid (our default,
    131072, and storescp's, 16384)."""
    daemon = daemon_factory({"network": {"max_pdu": max_pdu}} if max_pdu else {})
    limit = max_pdu or 131072
    source = new_ct_file(tmp_path, 3 * limit)
    ds = dcmread(source)
    data = declared_data_set(source)
    assert len(data) > 2 * limit
    assoc = associate(daemon.port)
    try:
        assert assoc.peer_max_pdu == limit
        send_fragments(assoc, 1, c_store_rq(CT_IMAGE.encode(), ds.SOPInstanceUID.encode()),
                       command=True)
        chunk = limit - 6  # PDV item: 4-byte length, context ID, control header
        offsets = range(0, len(data), chunk)
        for offset in offsets:
            piece = data[offset:offset + chunk]
            last = offset + chunk >= len(data)
            packet = p_data(1, 0x02 if last else 0x00, piece)
            assert last or len(packet) == 6 + limit
            assoc.sock.sendall(packet)
        assert read_response(assoc) == SUCCESS
        release(assoc)
    finally:
        assoc.close()
    stored = daemon.files()
    assert len(stored) == 1
    assert declared_data_set(stored[0]) == data


def context_items(body: bytes) -> list[tuple[int, int, str]]:
    """The presentation context items of an A-ASSOCIATE-AC: (ID, result, transfer syntax);
    the syntax only of an accepted context (PS3.8 9.3.3.2: not to be tested otherwise, and
    storescp and we write different ones there)."""
    items = []
    offset = 68
    while offset < len(body):
        item_type, _reserved, length = struct.unpack_from(">BBH", body, offset)
        value = body[offset + 4:offset + 4 + length]
        if item_type == 0x21:
            _ts_type, _r, ts_length = struct.unpack_from(">BBH", value, 4)
            syntax = value[8:8 + ts_length].decode().rstrip("\0") if value[2] == 0 else ""
            items.append((value[0], value[2], syntax))
        offset += 4 + length
    return items


@pytest.mark.parametrize("count", [128, 129, 256, 1000])
def test_many_presentation_contexts_as_storescp(daemon: Daemon, tmp_path: Path,
                                                count: int) -> None:
    """DICOM allows 128 contexts (odd IDs 1-255): 128 is a legal request, answered with an
    A-ASSOCIATE-AC that accepts every context but the unknown abstract syntax's (96), and the
    association works.  More make the IDs wrap around (the requestor's error): storescp still
    accepts, answering each ID once (128 items), and the daemon answers exactly as storescp,
    item for item, and keeps serving."""
    syntaxes = [CT_IMAGE, MR_IMAGE, VERIFICATION, "1.2.3.4.5.6.7.8.9"]
    contexts = [((2 * i + 1) % 256, syntaxes[i % len(syntaxes)], [EXPLICIT_LE, IMPLICIT_LE])
                for i in range(count)]
    with storescp([], tmp_path) as port:
        sock, pdu_type, body = request_association(port, contexts)
        sock.close()
    assert pdu_type == A_ASSOCIATE_AC
    theirs = context_items(body)
    assert len(theirs) == 128 and sum(result == 0 for _, result, _ in theirs) == 96
    sock, pdu_type, body = request_association(daemon.port, contexts)
    try:
        assert pdu_type == A_ASSOCIATE_AC, pdu_type
        assert context_items(body) == theirs
        accepted, max_pdu = parse_ac(body)
        assoc = Association(sock, accepted, max_pdu)
        cid = next(c for c in accepted if contexts[(c - 1) // 2][1] == VERIFICATION)
        send_fragments(assoc, cid, c_echo_rq(), command=True)
        assert read_response(assoc) == SUCCESS
        release(assoc)
    finally:
        sock.close()
    assert_serving(daemon)


def test_truncated_associate_rq_then_silence_times_out(daemon_factory: Any) -> None:
    """A peer that sends half an A-ASSOCIATE-RQ and stalls is dropped (ARTIM)."""
    daemon = daemon_factory({"network": {"acse_timeout": 1, "socket_timeout": 2}})
    sock = connect(daemon.port)
    try:
        sock.sendall(associate_rq([(1, CT_IMAGE, [EXPLICIT_LE])])[:40])
        started = time.monotonic()
        read_until_closed(sock, limit=15)
        assert time.monotonic() - started < 10
    finally:
        sock.close()
    assert_serving(daemon)


# --- symlinks planted in the output directory ----------------------------------------------


def test_planted_symlinks_are_never_followed(tmp_path: Path, daemon_factory: Any) -> None:
    """A study directory and a file name replaced by symlinks to a directory outside: nothing
    is ever written through them (directories are opened with O_NOFOLLOW, names are linked,
    never opened)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"not yours")
    daemon = daemon_factory({"storage": {"sort": "study-uid", "sort_prefix": "ST_"}})
    study_uid = "1.2.826.0.1.3680043.2.1545.22.1"
    files = make_study(tmp_path / "study", 3, study_uid=study_uid)
    storescu(daemon.port, files[0])
    study_dir = daemon.out / f"ST__{study_uid}"  # storescp joins prefix and UID with "_"
    first = next(study_dir.iterdir())
    # The file name the next copy of the first object would take, as a symlink to a victim.
    first.unlink()
    first.symlink_to(victim)
    storescu(daemon.port, files[0], check=False)
    assert victim.read_bytes() == b"not yours"
    # The study directory itself, as a symlink to the outside directory.
    study_dir.rename(tmp_path / "moved")
    study_dir.symlink_to(outside, target_is_directory=True)
    result = storescu(daemon.port, files[1], check=False)
    assert sorted(p.name for p in outside.iterdir()) == ["victim"], result.stdout + result.stderr
    assert victim.read_bytes() == b"not yours"
    assert study_dir.is_symlink()
    assert_serving(daemon)
