"""Hostile peers, round two (issue 16): each case driven by a real peer or a raw socket
against the running daemon, checking what the peer received, the log line, the files on
disk, and the RSS or CPU figure where the case is about resources.

- odd-length fragments: aborted as storescp aborts them (compared with storescp itself);
- deflate bombs: identification inflates a bounded prefix; re-encoding is capped
  (storage.max_decoded_size); worker RSS measured in fork and single-process mode;
- trickling and idle peers: a minimum transfer rate inside a message, bounded A-RELEASE-RQ
  bodies, a finite dimse_timeout by default;
- descriptor exhaustion: the master pauses accepting, with one log line per interval;
- UIDs that differ only in white space: distinct files.
"""

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import fuzzgen
import harness
import pytest
from support import uids, wire
from support.daemon import Daemon, free_port
from support.data import testdata as bundled
from support.peers import require_tool
from support.uids import DEFLATED_LE
from support.wait import wait_until


def pdus_until_close(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every PDU the daemon sends until it closes the connection."""
    found = []
    while True:
        try:
            found.append(wire.read_pdu(sock))
        except wire.Closed:
            return found


def raw_store(sock: socket.socket, uid: bytes, data_set: bytes, context_id: int = 1,
              max_pdu: int = wire.MAX_PDU) -> None:
    command = wire.command_set(wire.store_elements(uid))
    sock.sendall(wire.fragments(context_id, command, command=True)
                 + wire.fragments(context_id, data_set, command=False, max_pdu=max_pdu))


# --- odd-length fragments ------------------------------------------------------------------


def _pynetdicom_storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pynetdicom", "storescu", "-cx", "-v",
                           "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=60)


def test_odd_length_data_set_is_aborted_as_storescp_does(tmp_path: Path,
                                                         daemon_factory: Any) -> None:
    """pydicom's rtplan_truncated.dcm is a 1829-byte data set; pynetdicom's storescu sends it
    as it is.  storescp aborts the association ("DIMSE: Odd Fragment Length: 1829") and
    stores nothing: the same peer, sent to both, sees the same thing."""
    source = bundled("rtplan_truncated.dcm")
    require_tool("storescp")
    reference_dir = tmp_path / "storescp"
    reference_dir.mkdir()
    port = free_port()
    reference = subprocess.Popen(["storescp", "-od", str(reference_dir), str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        theirs = _pynetdicom_storescu(port, source)
    finally:
        reference.send_signal(signal.SIGTERM)
        reference_log = reference.communicate(timeout=10)[0]
    assert "Odd Fragment Length: 1829" in reference_log, reference_log
    assert "Association Aborted" in theirs.stderr + theirs.stdout
    assert list(reference_dir.iterdir()) == []

    daemon = daemon_factory({"logging": {"level": "info"}})
    ours = _pynetdicom_storescu(daemon.port, source)
    assert "Association Aborted" in ours.stderr + ours.stdout, ours.stderr
    log = daemon.wait_log("odd fragment length 1829 in a data set PDV")
    assert "aborting association" in log and "partial object was discarded" in log
    assert daemon.files() == []
    wait_until(lambda: daemon.staging() == [], 10,
               lambda: f"an empty staging area: {daemon.staging()}")


@pytest.mark.parametrize("where", ["command", "data-set-split", "data-set-last"])
def test_every_odd_fragment_is_aborted_and_nothing_is_stored(daemon_factory: Any,
                                                             where: str) -> None:
    """DCMTK checks every PDV, not the total: two odd fragments of an even data set, or an
    odd command fragment, end the association too (A-ABORT source 0, reason 0, as
    storescp sends)."""
    daemon = daemon_factory({"logging": {"level": "info"}})
    uid = b"1.2.826.0.1.3680043.9.7.16.1"
    data = fuzzgen.encode_data_set(fuzzgen.data_elements(uid, __import__("random").Random(1)),
                                   implicit_vr=False)
    command = wire.command_set(wire.store_elements(uid))
    assert len(data) % 2 == 0 and len(command) % 2 == 0
    if where == "command":
        stream = wire.p_data(1, 0x01, command[:9]) + wire.p_data(1, 0x03, command[9:])
    elif where == "data-set-split":
        stream = wire.fragments(1, command, command=True) \
            + wire.p_data(1, 0x00, data[:101]) + wire.p_data(1, 0x02, data[101:])
    else:
        stream = wire.fragments(1, command, command=True) \
            + wire.p_data(1, 0x02, data + b"\x00")
    sock = harness.associate(daemon.port)
    try:
        sock.sendall(stream)
        assert pdus_until_close(sock) == [(wire.A_ABORT, bytes(4))]
    finally:
        sock.close()
    kind = "command" if where == "command" else "data set"
    daemon.wait_log(f"in a {kind} PDV")
    assert daemon.files() == []
    wait_until(lambda: daemon.staging() == [], 10,
               lambda: f"an empty staging area: {daemon.staging()}")
    # The next association is served as usual.
    sock = harness.associate(daemon.port)
    try:
        raw_store(sock, uid, data)
        assert wire.read_status(sock) == 0
    finally:
        sock.close()
    assert len(daemon.files()) == 1


# --- deflate bombs ---------------------------------------------------------------------------

GIB = 1 << 30
DEFLATED_CONTEXTS = [(1, uids.CT_IMAGE, [DEFLATED_LE]), (3, uids.VERIFICATION,
                                                            [uids.EXPLICIT_LE])]


def _raw_deflate(data: bytes, final: bool) -> bytes:
    """`data` as raw deflate blocks ending on a byte boundary (a full flush: no reference to
    what came before), so that such pieces concatenate into one valid stream."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if final
                                                        else zlib.Z_FULL_FLUSH)


_ZEROS_MIB = _raw_deflate(bytes(1 << 20), final=False)  # ~1 KiB each


def deflate_bomb(uid: bytes, inflated: int, *, identifiers_first: bool) -> bytes:
    """A deflated explicit VR LE data set of `inflated` bytes, most of them one zero value.

    With `identifiers_first`, the identifying attributes come first and the zeros are the
    pixel data (found in the first 64 KiB); otherwise the zeros are a value before them
    (0008,0001), so finding them means inflating it all."""
    elements = fuzzgen.data_elements(uid, __import__("random").Random(uid))[:-1]
    ids = fuzzgen.encode_data_set(elements, implicit_vr=False)
    mib = max(1, (inflated - len(ids)) >> 20)
    if identifiers_first:
        head, tail = ids + struct.pack("<HH2sxxL", 0x7FE0, 0x0010, b"OB", mib << 20), b""
    else:
        head, tail = struct.pack("<HH2sxxL", 0x0008, 0x0001, b"UN", mib << 20), ids
    # PS3.5 A.5: a deflated data set of odd length gets one trailing NUL.
    return wire.even(_raw_deflate(head, False) + _ZEROS_MIB * mib + _raw_deflate(tail, True))


class Sampler:
    """Samples VmHWM (peak RSS) and CPU time of the master and its workers every 10 ms."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.ignore = harness.children(master)  # the configuration watcher
        self.peak_kib: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.sample()
        self.sample()

    def sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for pid in (harness.children(self.master) - self.ignore) | {self.master}:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), int(line.split()[1]))
            self.cpu[pid] = (int(stat[11]) + int(stat[12])) / tick

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def workers_seen(self) -> bool:
        return any(pid != self.master for pid in self.peak_kib)

    def worker_peak_mib(self) -> float:
        workers = [kib for pid, kib in self.peak_kib.items() if pid != self.master]
        return max(workers, default=0) / 1024

    def worker_cpu(self) -> float:
        return max((s for pid, s in self.cpu.items() if pid != self.master), default=0.0)

    def master_peak_mib(self) -> float:
        return self.peak_kib.get(self.master, 0) / 1024

    def peak_mib(self, single: bool) -> float:
        """The figure that matters: the master in single-process mode, else the workers'."""
        peak = self.master_peak_mib() if single else self.worker_peak_mib()
        assert peak > 0, "nothing sampled"
        return peak


def send_bomb(port: int, uid: bytes, data: bytes, sampler: Sampler,
              single: bool = False) -> int | str:
    """Store one deflated object; the association stays open until its worker was sampled
    (VmHWM keeps the peak), then is released."""
    sock = harness.connect(port, timeout=120)
    try:
        sock.sendall(fuzzgen.associate_rq(DEFLATED_CONTEXTS))
        pdu_type, body = wire.read_pdu(sock)
        assert pdu_type == wire.A_ASSOCIATE_AC, (pdu_type, body)
        assert DEFLATED_LE.encode() in body, "deflated transfer syntax not accepted"
        raw_store(sock, uid, data)
        status = wire.read_status(sock)
        if not single:
            wait_until(sampler.workers_seen, 5, "a worker sampled")
        sock.sendall(wire.pdu(wire.A_RELEASE_RQ, bytes(4)))
        return status
    finally:
        sock.close()


def bomb_daemon(daemon_factory: Any, **storage: Any) -> tuple[Daemon, int]:
    single = storage.pop("single", False)
    settings: dict[str, dict[str, Any]] = {
        "negotiation": {"preferred_transfer_syntax": "deflated"},
        "logging": {"level": "info"}, "storage": dict(storage)}
    if single:
        settings["workers"] = {"process_model": "single"}
    daemon = daemon_factory(settings)
    time.sleep(0.3)  # the master's RSS after start-up, before any association
    return daemon, harness.rss_kib(daemon.proc.pid) // 1024


def report(label: str, sampler: Sampler, base_mib: int) -> str:
    line = (f"{label}: master RSS at start {base_mib} MiB; peak worker RSS "
            f"{sampler.worker_peak_mib():.0f} MiB, worker CPU {sampler.worker_cpu():.2f} s; "
            f"peak master RSS {sampler.master_peak_mib():.0f} MiB")
    print(line, file=sys.stderr)
    return line


@pytest.mark.parametrize("single", [False, True], ids=["fork", "single"])
def test_deflate_bomb_stored_as_received_in_bounded_memory(daemon_factory: Any,
                                                           single: bool) -> None:
    """1 MB that inflates to 1 GiB, identifying attributes first: stored as received (the
    bytes the peer sent), identified from 64 KiB of inflated head."""
    daemon, base = bomb_daemon(daemon_factory, single=single)
    uid = b"1.2.826.0.1.3680043.9.7.16.2"
    data = deflate_bomb(uid, GIB, identifiers_first=True)
    assert len(data) < 1_200_000
    sampler = Sampler(daemon.proc.pid)
    try:
        assert send_bomb(daemon.port, uid, data, sampler, single) == 0
    finally:
        sampler.stop()
    report("deflate bomb stored as received", sampler, base)
    (stored,) = daemon.files()
    assert stored.stat().st_size < len(data) + 1024  # as received, meta header added
    assert stored.read_bytes().endswith(data)
    daemon.wait_log(f"stored {uid.decode()}")
    peak = sampler.peak_mib(single)
    assert peak < base + 40, report("deflate bomb stored as received", sampler, base)


@pytest.mark.parametrize("single", [False, True], ids=["fork", "single"])
def test_deflate_bomb_hiding_its_identifiers_is_refused_at_the_limit(daemon_factory: Any,
                                                                    single: bool) -> None:
    """The identifying attributes behind 1 GiB of inflated zeros: the walk inflates and
    discards up to storage.max_decoded_size (512 MiB by default), then refuses with 0xA700
    and one line; memory stays flat, CPU is bounded by the limit."""
    daemon, base = bomb_daemon(daemon_factory, single=single)
    uid = b"1.2.826.0.1.3680043.9.7.16.3"
    data = deflate_bomb(uid, GIB, identifiers_first=False)
    sampler = Sampler(daemon.proc.pid)
    try:
        assert send_bomb(daemon.port, uid, data, sampler, single) == 0xA700
    finally:
        sampler.stop()
    line = report("deflate bomb, identifiers behind 1 GiB", sampler, base)
    log = daemon.wait_log("failed with 0xA700")
    assert log.count("inflates to more than 536870912 bytes before its identifying "
                     "attributes (storage.max_decoded_size)") == 1, log
    assert daemon.files() == []
    wait_until(lambda: daemon.staging() == [], 10, "an empty staging area")
    peak = sampler.peak_mib(single)
    assert peak < base + 40, line
    if not single:
        assert sampler.worker_cpu() < 5.0, line


def test_deflate_bomb_within_a_raised_limit_is_walked_in_bounded_memory(
        daemon_factory: Any) -> None:
    """With storage.max_decoded_size above 1 GiB the same object is identified by inflating
    all of it, 64 KiB at a time, and stored as received."""
    daemon, base = bomb_daemon(daemon_factory, max_decoded_size=2 * GIB)
    uid = b"1.2.826.0.1.3680043.9.7.16.4"
    data = deflate_bomb(uid, GIB, identifiers_first=False)
    sampler = Sampler(daemon.proc.pid)
    try:
        assert send_bomb(daemon.port, uid, data, sampler) == 0
    finally:
        sampler.stop()
    line = report("deflate bomb walked whole (limit 2 GiB)", sampler, base)
    assert len(daemon.files()) == 1
    assert sampler.peak_mib(False) < base + 40, line


@pytest.mark.parametrize("single", [False, True], ids=["fork", "single"])
def test_deflate_bomb_is_not_re_encoded(daemon_factory: Any, single: bool) -> None:
    """storage.transfer_syntax = little-explicit (storescp +te) re-encodes in memory: the
    inflated size is measured first, in 64 KiB pieces, and the bomb refused (0xA700, one
    line); no 1 GiB file, no 1 GiB of memory."""
    daemon, base = bomb_daemon(daemon_factory, single=single,
                               transfer_syntax="little-explicit")
    uid = b"1.2.826.0.1.3680043.9.7.16.5"
    data = deflate_bomb(uid, GIB, identifiers_first=True)
    sampler = Sampler(daemon.proc.pid)
    try:
        assert send_bomb(daemon.port, uid, data, sampler, single) == 0xA700
    finally:
        sampler.stop()
    line = report("deflate bomb with +te", sampler, base)
    log = daemon.wait_log("failed with 0xA700")
    assert log.count("the deflated data set inflates to more than 536870912 bytes") == 1
    assert daemon.files() == []
    wait_until(lambda: daemon.staging() == [], 10, "an empty staging area")
    peak = sampler.peak_mib(single)
    assert peak < base + 40, line


def _large_ct(uid: bytes, pixel_bytes: int) -> bytes:
    elements = fuzzgen.data_elements(uid, __import__("random").Random(uid))[:-1]
    return fuzzgen.encode_data_set(elements, implicit_vr=False) + \
        struct.pack("<HH2sxxL", 0x7FE0, 0x0010, b"OW", pixel_bytes) + bytes(pixel_bytes)


def _re_encoding_peak(daemon_factory: Any, limit: int, size: int) -> tuple[int | str, float,
                                                                             int, Daemon]:
    daemon = daemon_factory({"storage": {"transfer_syntax": "big-explicit",
                                         "max_decoded_size": limit},
                             "logging": {"level": "info"}})
    time.sleep(0.3)
    base = harness.rss_kib(daemon.proc.pid) // 1024
    uid = b"1.2.826.0.1.3680043.9.7.16.6"
    data = _large_ct(uid, size)
    sampler = Sampler(daemon.proc.pid)
    sock = harness.associate(daemon.port)
    try:
        raw_store(sock, uid, data)
        status = wire.read_status(sock)
        wait_until(sampler.workers_seen, 5, "a worker sampled")
        sock.sendall(wire.pdu(wire.A_RELEASE_RQ, bytes(4)))
    finally:
        sock.close()
        sampler.stop()
    report(f"re-encoding (+tb) a {size >> 20} MiB data set, limit {limit >> 20} MiB", sampler,
           base)
    return status, sampler.peak_mib(False), base, daemon


def test_re_encoding_memory_is_bounded_by_max_decoded_size(daemon_factory: Any) -> None:
    """Re-encoding holds the data set in memory: at most storage.max_decoded_size of it
    (about twice that at the peak); a larger one is refused before a byte of it is read."""
    limit = 64 << 20
    status, peak, base, daemon = _re_encoding_peak(daemon_factory, limit, 60 << 20)
    assert status == 0 and len(daemon.files()) == 1
    assert peak < base + 3 * (limit >> 20), (peak, base)
    status, peak, base, daemon = _re_encoding_peak(daemon_factory, limit, 70 << 20)
    assert status == 0xA700 and daemon.files() == []
    log = daemon.wait_log("failed with 0xA700")
    assert "re-encoding holds the data set in memory, and its 73400" in log
    assert "exceed storage.max_decoded_size (67108864)" in log
    assert peak < base + 40, (peak, base)


@pytest.mark.slow
def test_worst_worker_rss_at_the_default_limit(daemon_factory: Any) -> None:
    """The worst case per worker with the defaults and an output option: a data set just
    under 512 MiB re-encoded (figure in the README)."""
    status, peak, base, _daemon = _re_encoding_peak(daemon_factory, 512 << 20,
                                                    (512 << 20) - (1 << 20))
    assert status == 0
    assert peak < base + 3 * 512, (peak, base)


# --- UIDs that differ only in white space ----------------------------------------------------

WHITE_SPACE_UIDS = [b"1.2.826.0.1.3680043.9.7.16.85.1", b"1.2.826.0.1.3680043.9.7.16.85. 1",
                    b"1.2.826.0.1.3680043.9.7.16.85.\t1", b"1.2.826.0.1.3680043.9.7.16.85.1\n"]


def _patient_object(uid: bytes, patient: int) -> bytes:
    elements = fuzzgen.data_elements(uid, __import__("random").Random(patient))
    elements[4] = (0x0010, 0x0010, b"PN", wire.even(f"Patient^{patient}".encode(), b" "))
    elements[5] = (0x0010, 0x0020, b"LO", wire.even(f"P{patient}".encode(), b" "))
    return fuzzgen.encode_data_set(elements, implicit_vr=False)


def _store_four(port: int) -> list[int | str]:
    statuses: list[int | str] = []
    sock = harness.associate(port)
    try:
        for patient, uid in enumerate(WHITE_SPACE_UIDS, start=1):
            raw_store(sock, uid, _patient_object(uid, patient))
            statuses.append(wire.read_status(sock))
        sock.sendall(wire.pdu(wire.A_RELEASE_RQ, bytes(4)))
        assert wire.read_pdu(sock)[0] == wire.A_RELEASE_RP
    finally:
        sock.close()
    return statuses


def _patients_on_disk(files: list[Path]) -> list[str]:
    return sorted(f"P{p}" for f in files for p in range(1, 5)
                  if wire.even(f"P{p}".encode(), b" ") in f.read_bytes())


@pytest.mark.parametrize("duplicates", ["overwrite", "keep-first", "reject", "keep-both"])
def test_uids_differing_in_white_space_never_share_a_file(daemon_factory: Any,
                                                          duplicates: str) -> None:
    """Four patients' objects whose SOP Instance UIDs differ only in white space: four
    files, whatever storage.duplicates says; the plain UID keeps storescp's name, the
    others get a distinct one (a hash suffix)."""
    daemon = daemon_factory({"storage": {"duplicates": duplicates, "sort": "study-uid"},
                             "logging": {"level": "info"}})
    assert _store_four(daemon.port) == [0, 0, 0, 0]
    files = daemon.files()
    assert len(files) == 4, [f.name for f in files]
    assert _patients_on_disk(files) == ["P1", "P2", "P3", "P4"]
    names = sorted(f.name for f in files)
    assert "CT.1.2.826.0.1.3680043.9.7.16.85.1" in names
    assert all(n.startswith("CT.1.2.826.0.1.3680043.9.7.16.85._") or
               n.startswith("CT.1.2.826.0.1.3680043.9.7.16.85.1") for n in names), names
    log = daemon.wait_log("association released")
    assert log.count("stored 1.2.826.0.1.3680043.9.7.16.85.") == 4


def test_storescp_lets_them_overwrite_each_other(tmp_path: Path) -> None:
    """The comparison (README): storescp names all four CT.1.2.826...85.1, so three
    acknowledged objects are gone; the last one stays."""
    require_tool("storescp")
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    reference = subprocess.Popen(["storescp", "-od", str(out), str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        assert _store_four(port) == [0, 0, 0, 0]
    finally:
        reference.terminate()
        reference.wait(10)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["CT.1.2.826.0.1.3680043.9.7.16.85.1"]
    assert _patients_on_disk(files) == ["P4"]


# --- trickling and idle peers ------------------------------------------------------------------

TRICKLE = {"network": {"acse_timeout": 3, "dimse_timeout": 3, "socket_timeout": 3},
           "logging": {"level": "info"}}


def _trickle(sock: socket.socket, chunks: list[bytes], every: float, limit: float) -> float:
    """Send `chunks` one per `every` seconds until the daemon ends the association; the
    seconds that took (AssertionError after `limit`)."""
    started = time.monotonic()
    sock.settimeout(every)
    for chunk in chunks:
        if time.monotonic() - started > limit:
            break
        try:
            sock.sendall(chunk)
        except OSError:
            return time.monotonic() - started
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
        assert data[:1] in (b"\x07", b""), data[:16]  # an A-ABORT, or the close
        return time.monotonic() - started
    raise AssertionError(f"still associated after {time.monotonic() - started:.0f} s")


def test_release_request_claiming_4_gib_is_refused_at_once(daemon_factory: Any) -> None:
    """The issue's peer: an A-RELEASE-RQ whose length claims 4 GiB, then one byte at a
    time.  Its body is 4 bytes; a longer one is a protocol error, answered with A-ABORT
    before a byte of it is read."""
    daemon = daemon_factory(TRICKLE)
    sock = harness.associate(daemon.port)
    try:
        took = _trickle(sock, [wire.pdu(wire.A_RELEASE_RQ, b"", length=0xFFFFFFFF)] + [b"\0"] * 20,
                        every=1.0, limit=20)
    finally:
        sock.close()
    assert took < 1.0, took
    daemon.wait_log("A-RELEASE-RQ of 4294967295 bytes (4 expected)")
    harness.wait_until_no_workers(daemon.proc.pid, timeout=10)


@pytest.mark.parametrize("how", ["bytes-inside-a-pdu", "tiny-pdus", "command-bytes"])
def test_trickling_peer_is_dropped_by_the_minimum_rate(daemon_factory: Any, how: str) -> None:
    """One byte (or one 14-byte PDU) a second, each well inside socket_timeout (3 s): the
    per-read timeout never fires.  network.min_transfer_rate (1024 bytes/s by default,
    measured over each socket_timeout of waiting) ends it within two windows."""
    settings = {k: dict(v) for k, v in TRICKLE.items()}
    if how == "command-bytes":  # between messages: even without a DIMSE timeout
        settings["network"]["dimse_timeout"] = 0
    daemon = daemon_factory(settings)
    uid = b"1.2.826.0.1.3680043.9.7.16.7"
    command = wire.command_set(wire.store_elements(uid))
    sock = harness.associate(daemon.port)
    watch = harness.WorkerWatch(daemon.proc.pid, harness.children(daemon.proc.pid))
    try:
        if how == "bytes-inside-a-pdu":
            lying = wire.pdu(wire.P_DATA_TF, wire.pdv(1, 0x02, b"", length=1002), length=1006)
            sock.sendall(wire.fragments(1, command, command=True) + lying)
            chunks = [b"\0"] * 60
        elif how == "tiny-pdus":
            sock.sendall(wire.fragments(1, command, command=True))
            chunks = [wire.p_data(1, 0x00, b"\0\0")] * 60
        else:
            chunks = [bytes([b]) for b in wire.p_data(1, 0x03, command)] * 2
        took = _trickle(sock, chunks, every=1.0, limit=30)
    finally:
        sock.close()
        watch.stop()
    assert 2.5 < took < 8.0, took
    log = daemon.wait_log("less than network.min_transfer_rate (1024 bytes/s)")
    assert "dropping the association" in log
    assert watch.longest < 10, watch.longest
    assert daemon.files() == []
    wait_until(lambda: daemon.staging() == [], 10, "an empty staging area")


def test_slow_but_steady_sender_is_served(daemon_factory: Any) -> None:
    """The minimum rate must not catch a sender on a slow link: 4 KiB/s for 6 s."""
    daemon = daemon_factory(TRICKLE)
    uid = b"1.2.826.0.1.3680043.9.7.16.8"
    data = _large_ct(uid, 24 << 10)
    sock = harness.associate(daemon.port)
    try:
        command = wire.command_set(wire.store_elements(uid))
        stream = wire.fragments(1, command, command=True) + \
            wire.fragments(1, data, command=False)
        for offset in range(0, len(stream), 1024):
            sock.sendall(stream[offset:offset + 1024])
            time.sleep(0.25)
        assert wire.read_status(sock) == 0
    finally:
        sock.close()
    assert len(daemon.files()) == 1


@pytest.mark.slow
def test_trickling_peer_with_the_default_timeouts(daemon_factory: Any) -> None:
    """The issue's figures with the defaults (socket_timeout 60): one byte every 50 s inside
    a PDU is dropped after the first 60 s window, not after 200 s or never."""
    daemon = daemon_factory({"logging": {"level": "info"}})
    uid = b"1.2.826.0.1.3680043.9.7.16.9"
    command = wire.command_set(wire.store_elements(uid))
    sock = harness.associate(daemon.port)
    try:
        sock.sendall(wire.fragments(1, command, command=True)
                     + wire.pdu(wire.P_DATA_TF, wire.pdv(1, 0x02, b"", length=1002), length=1006))
        took = _trickle(sock, [b"\0"] * 10, every=50.0, limit=300)
    finally:
        sock.close()
    assert 55 < took < 125, took
    daemon.wait_log("less than network.min_transfer_rate")


def test_defaults_bound_idle_peers_and_associations() -> None:
    from dicom_ingestd.config.schema import Config

    config = Config()
    assert config.network.dimse_timeout == 60
    assert config.network.min_transfer_rate == 1024
    assert config.workers.max_associations == 100
    assert config.workers.max_associations_per_peer == 32


# --- descriptor exhaustion -------------------------------------------------------------------


def _master_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def _silent_connections(port: int, count: int, source: str = "127.0.0.1"
                        ) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))  # EINPROGRESS: the kernel completes it
        socks.append(sock)
    return socks


def test_out_of_descriptors_the_master_pauses_instead_of_spinning(daemon_factory: Any) -> None:
    """The issue's flood, made to exhaust the master: a descriptor limit of 64 and no
    association limit.  accept() fails with EMFILE while silent connections wait; the
    master stops watching its listeners, backs off (0.1 s doubling to 2 s) and logs one
    line per 10 s, instead of 497,271 lines and 16.6 CPU-seconds.  When the silent peers
    are dropped (acse_timeout), it accepts again and a storescu is served."""
    daemon = daemon_factory({"network": {"acse_timeout": 6, "socket_timeout": 6},
                             "workers": {"max_associations": 0,
                                         "max_associations_per_peer": 0},
                             "logging": {"level": "info"}})
    pid = daemon.proc.pid
    __import__("resource").prlimit(pid, __import__("resource").RLIMIT_NOFILE, (64, 64))
    cpu_before = _master_cpu(pid)
    socks = _silent_connections(daemon.port, 150)
    try:
        daemon.wait_log("Too many open files; not accepting connections for", timeout=10)
        time.sleep(4)  # exhausted: the backlog stays full while the silent peers wait
        cpu = _master_cpu(pid) - cpu_before
        log = daemon.log()
        lines = [line for line in log.splitlines() if "Too many open files" in line]
        assert 1 <= len(lines) <= 2, lines
        assert "not accepting connections for" in lines[0]
        assert "open descriptors, limit 64" in lines[0]
        assert cpu < 1.5, f"master used {cpu:.2f} s of CPU in ~5 s of exhaustion"
        print(f"descriptor exhaustion: master CPU {cpu:.2f} s in ~5 s, {len(lines)} line(s)",
              file=sys.stderr)
    finally:
        for sock in socks:
            sock.close()
    # The silent peers time out (acse_timeout): descriptors come back, accepting resumes.
    # Closed by us, they still wait in the listener's queue until the master has accepted
    # each (and handed it to a worker that sees the close): a connection queued behind them
    # would meet the limit again.  Drained means: queue empty, no worker busy, descriptors back.
    wait_until(lambda: harness.accept_queue(daemon.port) == 0, 30,
               lambda: f"accept queue drained: {harness.accept_queue(daemon.port)} waiting")
    harness.wait_until_no_workers(pid, timeout=30)
    wait_until(lambda: harness.fd_count(pid) < 40, 10,
               lambda: f"under 40 descriptors: {harness.fd_count(pid)}")
    assert harness.accept_queue(daemon.port) == 0
    from support.peers import storescu
    storescu(daemon.port, bundled("CT_small.dcm"), timeout=60)
    assert len(daemon.files()) == 1
    assert not harness.bug_lines(daemon.log()), harness.bug_lines(daemon.log())


def test_flood_of_silent_connections_under_the_default_limits(daemon_factory: Any) -> None:
    """1,100 silent connections from one address against the default limits
    (max_associations 100, 32 per peer) with the usual soft limit of 1024 descriptors: the
    master never runs out of descriptors, logs a bounded number of lines and uses little
    CPU; a sender from another address is served during the flood, and after it."""
    daemon = daemon_factory({"network": {"acse_timeout": 4, "socket_timeout": 4},
                             "storage": {"fsync": False, "filenames": "unique"},
                             "logging": {"level": "info"}})
    pid = daemon.proc.pid
    __import__("resource").prlimit(pid, __import__("resource").RLIMIT_NOFILE, (1024, 1024))
    baseline = harness.Resources.of(pid)
    cpu_before = _master_cpu(pid)
    socks = _silent_connections(daemon.port, 1100, source="127.0.0.3")
    try:
        time.sleep(1)
        # During the flood, a sender from another address is served (the flood's address
        # holds at most workers.max_associations_per_peer = 32 of the 100).
        from support.peers import storescu as send
        send(daemon.port, bundled("CT_small.dcm"), timeout=30)
        time.sleep(1)
        fds = harness.fd_count(pid)
        cpu = _master_cpu(pid) - cpu_before
    finally:
        for sock in socks:
            sock.close()
    after = harness.settle(pid, baseline, timeout=60)  # workers reaped, not only exited
    assert after.fds <= baseline.fds, (after, baseline)
    from support.peers import storescu
    storescu(daemon.port, bundled("CT_small.dcm"), timeout=60)
    log = daemon.log()
    assert "Too many open files" not in log
    assert fds < 400, fds
    closing = [line for line in log.splitlines() if "closing the connection unanswered" in line]
    assert 1 <= len(closing) <= 3, len(closing)
    assert cpu < 15, cpu
    print(f"flood of 1100: master fds {fds}, master CPU {cpu:.2f} s in the first 2 s, "
          f"{len(closing)} flood line(s)", file=sys.stderr)
    assert len(daemon.files()) == 2
    assert "from 127.0.0.3 (workers.max_associations_per_peer = 32)" in log


# --- a value that starts with "-" ------------------------------------------------------------


def test_a_calling_ae_title_like_an_option_after_double_dash(daemon_factory: Any,
                                                            tmp_path: Path) -> None:
    """A calling AE title "-rf" reaches an argv command as one argument; without "--" an
    option parser takes it for options, after "--" it is a value (the documented form)."""
    record = tmp_path / "args.txt"
    script = tmp_path / "tool.py"
    script.write_text(
        "import argparse, sys\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('-r', action='store_true')\n"
        "p.add_argument('-f', action='store_true')\n"
        "p.add_argument('values', nargs='*')\n"
        "a = p.parse_args()\n"
        f"open({str(record)!r}, 'a').write(repr((a.r, a.f, a.values)) + '\\n')\n")
    daemon = daemon_factory({"events": {"exec_on_reception": [
        sys.executable, str(script), "#a", "--", "#a"]}, "logging": {"level": "info"}})
    from support.peers import storescu
    storescu(daemon.port, bundled("CT_small.dcm"), extra=["-aet", "-rf"])
    wait_until(record.exists, 15, f"{record}")
    # Before "--": parsed as the options -r -f; after it: the value itself.
    assert record.read_text().strip() == "(True, True, ['-rf'])"
