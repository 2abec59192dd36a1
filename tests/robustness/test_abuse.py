"""Protocol abuse, exhausted file systems and hostile names: what tests/test_faults.py,
tests/test_receive.py and tests/test_events.py do not already cover.

Already covered elsewhere (not repeated here): a PDU larger than our max PDU, PDVs longer
than their PDU, PDVs on rejected or unproposed contexts, unknown PDU types, up to 1000
presentation contexts, a truncated A-ASSOCIATE-RQ then silence (test_faults.py
test_protocol_abuse_*, test_many_presentation_contexts, test_truncated_*); a full disk (A700,
nothing left, recovery) and storage.min_free_space (test_faults.py test_disk_full_*,
test_min_free_space_*); hostile UIDs, patient names and calling AE titles through every
file name and sorting mode (test_faults.py test_hostile_values_*); placeholders in argv and
shell forms with the same corpus (test_events.py test_hostile_values_arrive_verbatim_*).

Here: a peer that never releases, one that aborts or resets in the middle of a PDV, a PDU
length of 4 GiB, 1,800 and 5,000 presentation contexts, 64 KiB UIDs in the A-ASSOCIATE-RQ
and a 60 KiB SOP Instance UID in a command; a file system out of inodes (not bytes), and one
that turns read-only (ext4's answer to an I/O error; no device-mapper in a container); and the
hostile corpus through the daemon's exec placeholders and rename-on-end-of-study, with AE
titles, UIDs and patient names sent raw (newlines, NUL, '../', '$(...)').
"""

import contextlib
import random
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fuzzgen
import harness
import pytest
from support import uids, wire
from support.daemon import Daemon, start_daemon
from support.data import testdata as bundled
from support.mounts import mounted_tmpfs
from support.peers import echoscu, storescu
from support.recorder import Recorder
from support.wait import wait_until

SHORT = {"network": {"acse_timeout": 1, "dimse_timeout": 1, "socket_timeout": 1},
         "logging": {"level": "info"}}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the protocol abuse tests (each leaves it as it found it: settled())."""
    daemon = start_daemon(tmp_path_factory.mktemp("abuse"), SHORT, name="abuse")
    yield daemon
    daemon.stop()


@pytest.fixture
def daemon(shared: Daemon) -> Iterator[Daemon]:
    for path in shared.files():
        path.unlink()
    yield shared


def ct(uid: bytes, study: bytes = b"1.2.3.4", name: bytes = b"Abuse^Test",
       pixels: int = 8) -> bytes:
    rng = random.Random(uid)
    elements = fuzzgen.data_elements(uid, rng)
    elements[4] = (0x0010, 0x0010, b"PN", wire.even(name, b" "))
    elements[6] = (0x0020, 0x000D, b"UI", wire.even(study))
    elements[-1] = (0x7FE0, 0x0010, b"OW", bytes(pixels))
    return fuzzgen.encode_data_set(elements, implicit_vr=False)


def store_on(sock: socket.socket, uid: bytes, data: bytes) -> int | str:
    command = wire.command_set(wire.store_elements(uid))
    sock.sendall(wire.fragments(1, command, command=True)
                 + wire.fragments(1, data, command=False))
    return wire.read_status(sock)


def wait_new_log(daemon: Daemon, mark: int, text: str) -> None:
    """Wait until `text` is logged after offset `mark` (the daemon is shared)."""
    wait_until(lambda: text in daemon.log()[mark:], 10,
               lambda: f"{text!r} logged:\n{daemon.log()[mark:]}")


def settled(daemon: Daemon) -> None:
    """No worker left, nothing in staging, and still serving."""
    pid = daemon.proc.pid
    harness.wait_until_no_workers(pid, timeout=15)
    baseline = min(harness.fd_count(pid) for _ in range(5) if not time.sleep(0.05))
    wait_until(lambda: daemon.staging() == [], 10,
               lambda: f"an empty staging area: {daemon.staging()}")
    assert daemon.proc.poll() is None
    echoscu(daemon.port, timeout=30)
    harness.wait_until_no_workers(pid, timeout=15)
    wait_until(lambda: harness.fd_count(pid) <= baseline, 5,
               lambda: f"{baseline} descriptors, not {harness.fd_count(pid)}")
    assert not harness.bug_lines(daemon.log()), harness.bug_lines(daemon.log())[:5]


# --- protocol abuse ------------------------------------------------------------------------


def test_peer_that_never_releases_is_dropped_and_keeps_what_was_acknowledged(
        daemon: Daemon) -> None:
    mark = len(daemon.log())
    sock = harness.associate(daemon.port)
    try:
        assert store_on(sock, b"1.2.3.100", ct(b"1.2.3.100")) == 0
        # ... and then nothing: no A-RELEASE-RQ.  dimse_timeout ends it with an A-ABORT.
        assert wire.read_all_pdus(sock) == [wire.A_ABORT]
    finally:
        sock.close()
    assert [p.name for p in daemon.files()] == ["CT.1.2.3.100"]
    wait_new_log(daemon, mark, "dropping the association")
    settled(daemon)


@pytest.mark.parametrize("how", ["a-abort-inside-pdv", "reset-inside-pdv", "fin-inside-pdv"])
def test_peer_leaving_in_the_middle_of_a_pdv(daemon: Daemon, how: str) -> None:
    mark = len(daemon.log())
    sock = harness.associate(daemon.port)
    data = ct(b"1.2.3.200", pixels=8000)
    try:
        command = wire.command_set(wire.store_elements(b"1.2.3.200"))
        sock.sendall(wire.fragments(1, command, command=True))
        pdu = wire.p_data(1, 0x02, data)
        sock.sendall(pdu[:3000])  # PDU and PDV headers, part of the data set
        wait_until(lambda: bool(daemon.staging()), 10, "a temporary file")
        if how == "a-abort-inside-pdv":
            sock.sendall(wire.pdu(wire.A_ABORT, bytes(4)))  # read as data: the PDV is not over
            sock.shutdown(socket.SHUT_WR)
        elif how == "reset-inside-pdv":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_WR)
    finally:
        sock.close()
    wait_new_log(daemon, mark, "partial object was discarded")
    assert daemon.files() == []
    settled(daemon)


def test_pdu_length_of_4_gib_is_refused_without_reading_it(daemon: Daemon) -> None:
    mark = len(daemon.log())
    sock = harness.associate(daemon.port)
    try:
        sock.sendall(wire.pdu(wire.P_DATA_TF, bytes(64), length=0xFFFFFFFF))
        assert wire.read_all_pdus(sock) == [wire.A_ABORT]
    finally:
        sock.close()
    wait_new_log(daemon, mark, "exceeds our maximum PDU length")
    settled(daemon)


@pytest.mark.parametrize("count", [1800, 5000])
def test_thousands_of_presentation_contexts(daemon: Daemon, count: int) -> None:
    """1800 contexts (IDs wrap around) fit in the 128 KiB the daemon reads of an
    A-ASSOCIATE-RQ; 5000 do not and are aborted before decoding."""
    mark = len(daemon.log())
    contexts = [((2 * k + 1) & 0xFF, uids.CT_IMAGE if k % 2 else "1.2.3.4.5",
                 [uids.EXPLICIT_LE, uids.IMPLICIT_LE]) for k in range(count)]
    sock = harness.connect(daemon.port)
    try:
        sock.sendall(fuzzgen.associate_rq(contexts))
        types = wire.read_all_pdus(sock) if count > 2000 else [wire.read_pdu(sock)[0]]
        assert types[0] in (wire.A_ASSOCIATE_AC, wire.A_ASSOCIATE_RJ, wire.A_ABORT), types
        if count > 2000:
            assert types == [wire.A_ABORT]
    finally:
        sock.close()
    if count > 2000:
        wait_new_log(daemon, mark, "A-ASSOCIATE-RQ of")
    settled(daemon)


def test_very_long_uids_in_the_associate_rq(daemon: Daemon) -> None:
    long_uid = ("1." * 32000)[:64000]
    for contexts in ([(1, long_uid, [uids.EXPLICIT_LE]), (3, uids.CT_IMAGE,
                                                             [uids.EXPLICIT_LE])],
                     [(1, uids.CT_IMAGE, [long_uid, uids.EXPLICIT_LE])]):
        sock = harness.connect(daemon.port)
        try:
            sock.sendall(fuzzgen.associate_rq(contexts))
            pdu_type, _body = wire.read_pdu(sock)
            assert pdu_type in (wire.A_ASSOCIATE_AC, wire.A_ASSOCIATE_RJ, wire.A_ABORT)
            if pdu_type == wire.A_ASSOCIATE_AC:  # the long one is rejected, the other one works
                assert store_on(sock, b"1.2.3.300", ct(b"1.2.3.300")) == 0
        finally:
            sock.close()
    settled(daemon)


def test_sop_instance_uid_of_60_kib(daemon: Daemon) -> None:
    uid = b"1." * 30000
    sock = harness.associate(daemon.port)
    try:
        status = store_on(sock, uid, ct(uid))
        assert isinstance(status, int), status
    finally:
        sock.close()
    for path in daemon.files():
        assert len(path.name.encode()) <= 255 and path.is_relative_to(daemon.out)
    settled(daemon)


# --- a file system out of inodes ------------------------------------------------------------


@pytest.fixture
def tiny_inode_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "inodes", "size=16m,nr_inodes=12") as mountpoint:
        yield mountpoint


def test_out_of_inodes_answers_a700_and_recovers(tiny_inode_tmpfs: Path,
                                                 daemon_factory: Any) -> None:
    """Each object of a new study needs two inodes (its directory and its file) and one more
    while it is received (the temporary file): the file system runs out of inodes long
    before bytes, at the temporary file or the directory."""
    daemon = daemon_factory({**SHORT, "storage": {"output_directory": str(tiny_inode_tmpfs),
                                                  "sort": "study-uid"}})
    statuses = []
    try:
        sock = harness.associate(daemon.port)
        try:
            for k in range(12):
                uid = f"1.2.3.4.{k}".encode()
                statuses.append(store_on(sock, uid, ct(uid, study=f"1.2.9.{k}".encode())))
        finally:
            sock.close()
        assert 0 in statuses and 0xA700 in statuses, statuses
        assert statuses.index(0xA700) > 0 and set(statuses[statuses.index(0xA700):]) == {0xA700}
        stored = daemon.files()
        assert len(stored) == statuses.count(0), stored
        wait_until(lambda: daemon.staging() == [], 10, "an empty staging area")
        # Every directory holds its object: no half-made study left behind empty is fine,
        # but no file in it is partial.
        for path in stored:
            assert path.stat().st_size > 200
        for path in stored[:2]:  # space comes back: the daemon recovers by itself
            path.unlink()
        sock = harness.associate(daemon.port)
        try:
            assert store_on(sock, b"1.2.3.4.99", ct(b"1.2.3.4.99", study=b"1.2.9.0")) == 0
        finally:
            sock.close()
        settled(daemon)
    finally:
        daemon.stop()


# --- hostile names through exec placeholders and rename-on-end-of-study ------------------------

HOSTILE = ["../../etc/x", "/abs/path", "..", "$(touch PWNED)", "`touch PWNED`", "a\nb",
           "x\x00y", "*?[]~ |;&<>", "'\"\\", "\uff0e\uff0e", "9" * 300, "-rf", "%s%n"]


@pytest.mark.parametrize(("shell", "sort"), [
    pytest.param(True, "patientname", id="shell-patientname", marks=pytest.mark.slow),
    pytest.param(True, "study-uid", id="shell-study-uid", marks=pytest.mark.slow),
    pytest.param(False, "patientname", id="argv-patientname", marks=pytest.mark.slow),
    pytest.param(False, "study-uid", id="argv-study-uid", marks=pytest.mark.slow),
])
def test_hostile_values_through_exec_placeholders_and_rename(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder, shell: bool,
        sort: str) -> None:
    for marker in ("PWNED",):
        with contextlib.suppress(FileNotFoundError):
            (tmp_path / marker).unlink()
    before = set(tmp_path.parent.rglob("*"))
    if shell:
        command = [" ".join(recorder.command("rec")) + " #p #f #a #c #r"]
        eos = [" ".join(recorder.command("eos")) + " #p #a #c #r"]
    else:
        command = recorder.command("rec", "#p", "#f", "#a", "#c", "#r")
        eos = recorder.command("eos", "#p", "#a", "#c", "#r")
    daemon = daemon_factory({
        "network": {"acse_timeout": 5, "dimse_timeout": 5, "socket_timeout": 5},
        "storage": {"sort": sort, "sort_prefix": "P"},
        "events": {"exec_on_reception": command, "exec_on_eostudy": eos, "shell": shell,
                   "rename_on_eostudy": True, "eostudy_timeout": 1},
        "jobs": {"state_directory": str(tmp_path / "state"), "retry_backoff": 1},
        "logging": {"level": "info"}})
    stored = 0
    for k, value in enumerate(HOSTILE):
        raw = value.encode()
        rq = fuzzgen.associate_rq().replace(b"FUZZSCU".ljust(16, b" "),
                                            raw[:16].ljust(16, b" "), 1)
        sock = harness.connect(daemon.port)
        try:
            sock.sendall(rq)
            if wire.read_pdu(sock)[0] != wire.A_ASSOCIATE_AC:
                continue  # an AE title pynetdicom will not decode: refused, fine
            uid = f"1.2.3.77.{k}".encode()
            status = store_on(sock, uid, ct(uid, study=raw, name=raw))
            assert isinstance(status, int)
            stored += status == 0
        finally:
            sock.close()
    assert stored >= len(HOSTILE) // 2
    records = recorder.wait(stored, timeout=60)
    with contextlib.suppress(AssertionError):  # end-of-study jobs, if any come
        wait_until(lambda: len(recorder.records()) > stored, 30, "end-of-study jobs")
    storescu(daemon.port, bundled("CT_small.dcm"), timeout=60)
    daemon.stop()
    records = recorder.records()
    # No value was run as a command, nothing was created outside the output directory
    # (besides the state directory, config, log and recorder files).
    assert not [p for p in tmp_path.parent.rglob("*") if p.name == "PWNED"]
    created = set(tmp_path.parent.rglob("*")) - before
    allowed = (daemon.out, tmp_path / "state", recorder.path, daemon.config_path,
               daemon.log_path, recorder.script)
    outside = sorted(p for p in created
                     if not any(p == a or p.is_relative_to(a) for a in allowed))
    assert outside == [], outside
    for record in records:
        assert record["argv"][1].startswith(str(daemon.out)), record
    assert not harness.bug_lines(daemon.log()), harness.bug_lines(daemon.log())[:5]


# --- a file system that turns read-only (what ext4 does on an I/O error) ---------------------


def test_file_system_turning_read_only_answers_a700_and_recovers(
        tiny_inode_tmpfs: Path, daemon_factory: Any) -> None:
    """No device-mapper "error" target in a container, so the I/O error is the one ext4
    turns I/O errors into (errors=remount-ro): the output file system goes read-only between
    two associations, then comes back while the second one is still open.  (A voluntary
    remount needs no file open for writing: an association keeps the next object's
    temporary file open between objects, so the first association is released first.)"""
    out = tiny_inode_tmpfs
    daemon = daemon_factory({**SHORT, "storage": {"output_directory": str(out)}})

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(out)], check=True,
                       capture_output=True, timeout=30)

    try:
        sock = harness.associate(daemon.port)
        try:
            assert store_on(sock, b"1.2.3.5.1", ct(b"1.2.3.5.1")) == 0
            sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
            assert wire.read_pdu(sock)[0] == wire.A_RELEASE_RP
        finally:
            sock.close()
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not list((out / ".ingestd-tmp").iterdir()), 10,
                       "an empty staging area")
        remount("ro")
        sock = harness.associate(daemon.port)
        try:
            try:
                assert store_on(sock, b"1.2.3.5.2", ct(b"1.2.3.5.2")) == 0xA700
            finally:
                remount("rw")
            assert store_on(sock, b"1.2.3.5.3", ct(b"1.2.3.5.3")) == 0
        finally:
            sock.close()
        assert sorted(p.name for p in daemon.files()) == ["CT.1.2.3.5.1", "CT.1.2.3.5.3"]
        assert "Read-only file system" in daemon.log()
        settled(daemon)
    finally:
        daemon.stop()
