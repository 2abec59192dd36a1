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

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fuzzgen
import harness
import pytest
from conftest import free_port, require_tool
from conftest import testdata as bundled

DEFLATED_LE = "1.2.840.10008.1.2.1.99"


def pdus_until_close(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every PDU the daemon sends until it closes the connection."""
    found = []
    while True:
        try:
            found.append(harness.read_pdu(sock))
        except harness.Closed:
            return found


def raw_store(sock: socket.socket, uid: bytes, data_set: bytes, context_id: int = 1,
              max_pdu: int = fuzzgen.MAX_PDU) -> None:
    command = fuzzgen.command_set(fuzzgen.store_elements(uid))
    sock.sendall(fuzzgen.fragments(context_id, command, command=True)
                 + fuzzgen.fragments(context_id, data_set, command=False, max_pdu=max_pdu))


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
    assert harness.poll(lambda: daemon.staging() == [], 10), daemon.staging()


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
    command = fuzzgen.command_set(fuzzgen.store_elements(uid))
    assert len(data) % 2 == 0 and len(command) % 2 == 0
    if where == "command":
        stream = fuzzgen.p_data(1, 0x01, command[:9]) + fuzzgen.p_data(1, 0x03, command[9:])
    elif where == "data-set-split":
        stream = fuzzgen.fragments(1, command, command=True) \
            + fuzzgen.p_data(1, 0x00, data[:101]) + fuzzgen.p_data(1, 0x02, data[101:])
    else:
        stream = fuzzgen.fragments(1, command, command=True) \
            + fuzzgen.p_data(1, 0x02, data + b"\x00")
    sock = harness.associate(daemon.port)
    try:
        sock.sendall(stream)
        assert pdus_until_close(sock) == [(0x07, bytes(4))]
    finally:
        sock.close()
    kind = "command" if where == "command" else "data set"
    daemon.wait_log(f"in a {kind} PDV")
    assert daemon.files() == []
    assert harness.poll(lambda: daemon.staging() == [], 10), daemon.staging()
    # The next association is served as usual.
    sock = harness.associate(daemon.port)
    try:
        raw_store(sock, uid, data)
        assert harness.read_status(sock) == 0
    finally:
        sock.close()
    assert len(daemon.files()) == 1
