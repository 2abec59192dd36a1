"""Objects sent while faults are injected, and the check of what is on disk afterwards.

A raw Upper Layer sender sends objects of random sizes (200 bytes to 2 MB, unique SOP
instances) over short associations and records every object answered with success;
`check_tree` then holds the daemon to its promise: every acknowledged object on disk,
bit-exact, and every visible file a complete object that was sent.  Used by the SIGKILL
(test_crash_consistency) and file-system shutdown (test_power_cut) suites.
"""

import contextlib
import io
import os
import random
import struct
import threading
import time
from pathlib import Path
from typing import Any

import fuzzgen
import harness
from support import uids, wire
from support.daemon import Daemon, start_daemon

SIZES = [200, 20_000, 300_000, 2_000_000]


def make_object(rng: random.Random, index: int, study_uid: str) -> tuple[str, bytes]:
    uid = f"1.2.826.0.1.3680043.9.7.{os.getpid()}.{index}.{rng.randrange(1 << 30)}"
    side = int((rng.choice(SIZES) // 2) ** 0.5) or 1
    pixels = rng.randbytes(side * side * 2)
    elements = [
        (0x0008, 0x0016, b"UI", wire.even(uids.CT_IMAGE.encode())),
        (0x0008, 0x0018, b"UI", wire.even(uid.encode())),
        (0x0008, 0x0060, b"CS", b"CT"),
        (0x0010, 0x0010, b"PN", b"Crash^Test"),
        (0x0020, 0x000D, b"UI", wire.even(study_uid.encode())),
        (0x0020, 0x000E, b"UI", wire.even(b"1.2.3.4.5.7")),
        (0x0028, 0x0010, b"US", struct.pack("<H", side)),
        (0x0028, 0x0011, b"US", struct.pack("<H", side)),
        (0x7FE0, 0x0010, b"OW", pixels),
    ]
    return uid, fuzzgen.encode_data_set(elements, implicit_vr=False)


class Sender(threading.Thread):
    """Sends objects until stopped; `sent` has every object, `acked` the successes.

    Each association sends a study of its own, so that with storage.sort = "study-uid" its
    first object also creates a directory.
    """

    def __init__(self, port: int, seed: int, *, hold_after: int | None = None) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.rng = random.Random(seed)
        self.sent: dict[str, bytes] = {}
        self.acked: set[str] = set()
        self.acked_at: dict[str, float] = {}  # time.monotonic() when each success arrived
        self.stop = threading.Event()
        self.index = 0
        # hold_after N (None: never): after N successes, at the next one that is the first of its
        # association (its study's directory has just been made), send nothing more (the
        # association stays open) and set `held`: a fault can strike right after it.
        self.hold_after = hold_after
        self.held = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                sock = harness.associate(self.port)
            except (OSError, AssertionError, wire.Closed):
                time.sleep(0.02)
                continue
            study_uid = f"1.2.826.0.1.3680043.9.7.{os.getpid()}.0.{self.rng.randrange(1 << 30)}"
            try:
                for number in range(self.rng.randint(1, 6)):
                    if self.stop.is_set():
                        break
                    self.index += 1
                    uid, data = make_object(self.rng, self.index, study_uid)
                    self.sent[uid] = data
                    command = wire.command_set(wire.store_elements(uid.encode(),
                                                                         self.index & 0xFFFF))
                    sock.sendall(wire.fragments(1, command, command=True)
                                 + wire.fragments(1, data, command=False))
                    status = wire.read_status(sock)
                    if status == 0:
                        self.acked.add(uid)
                        self.acked_at[uid] = time.monotonic()
                        if self.hold_after is not None and number == 0 and \
                                len(self.acked) > self.hold_after:
                            self.held.set()
                            self.stop.wait()
                            break
                    elif isinstance(status, str):
                        break
                else:
                    sock.sendall(wire.pdu(wire.A_RELEASE_RQ, bytes(4)))
                    with contextlib.suppress(wire.Closed):
                        wire.read_pdu(sock)
            except (OSError, AssertionError, wire.Closed):
                pass
            finally:
                sock.close()


def stored_data_set(path: Path) -> bytes:
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    (group_length,) = struct.unpack_from("<L", raw, 140)
    return raw[144 + group_length:]


def _elements(ds: Any) -> list[tuple[int, Any]]:
    return [(int(element.tag), element.value) for element in ds]


def _same_object(path: Path, sent: bytes, encoding: str) -> bool:
    """Is the file at `path` the whole object `sent` (explicit VR little endian) as stored
    with `encoding`: "received" (Part 10, the data set bit-exact), "dataset" (the data set
    alone, bit-exact) or a transfer syntax UID it was re-encoded in (a Part 10 file whose
    elements all have the values sent)?"""
    if encoding == "received":
        return stored_data_set(path) == sent
    if encoding == "dataset":
        return path.read_bytes() == sent
    from pydicom import dcmread
    from pydicom.filereader import read_dataset

    stored = dcmread(path)  # raises on a truncated file
    assert stored.file_meta.TransferSyntaxUID == encoding, f"{path}: not re-encoded"
    original = read_dataset(io.BytesIO(sent), is_implicit_VR=False, is_little_endian=True)
    return _elements(stored) == _elements(original)


def check_tree(daemon: Daemon, sent: dict[str, bytes], acked: set[str], *,
               encoding: str = "received") -> int:
    """Every acknowledged object whole; every file a complete sent object (see _same_object
    for `encoding`)."""
    by_name = {f"CT.{uid}": uid for uid in sent}
    found: set[str] = set()
    for path in daemon.files():
        uid = by_name.get(path.name)
        assert uid is not None, f"unexpected file {path}"
        assert _same_object(path, sent[uid], encoding), f"{path} is not the object sent"
        found.add(uid)
    missing = acked - found
    assert not missing, f"{len(missing)} acknowledged object(s) lost, e.g. {sorted(missing)[:3]}"
    return len(found)


def restart(tmp_path: Path, settings: dict[str, dict[str, Any]], name: str) -> Daemon:
    """Start a daemon again on the same port and output directory, as systemd would."""
    deadline = time.monotonic() + 20
    while True:  # the old listener's port may take a moment to be free
        daemon = start_daemon(tmp_path, settings, name=name, wait=False)
        try:
            daemon.wait_log("listening on", timeout=15)
            return daemon
        except AssertionError:
            daemon.stop()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
