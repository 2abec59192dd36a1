"""Crash consistency: SIGKILL at random instants while objects are being sent.

A raw Upper Layer sender (harness) sends objects of random sizes (200 bytes to 2 MB, unique
SOP instances) over short associations and records every object answered with success.  At a
random instant one of three things is killed with SIGKILL:
  worker  one association worker (the master goes on serving);
  master  the master alone (its workers are orphans that finish their association);
  all     the master and every worker at once.
After a master kill the daemon is started again on the same output directory.  Then, for
every instant: each acknowledged object is on disk, bit-exact; every file in the output tree
is a complete object that was sent (no partial file is ever visible); once the orphans are
gone the staging directory holds no temporary file.  The normal run kills at 3 instants (one
of each kind), `--run-slow` at 120.
"""

import contextlib
import os
import random
import signal
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fuzzgen
import harness
import pytest
from conftest import Daemon, start_daemon

SIZES = [200, 20_000, 300_000, 2_000_000]


def make_object(rng: random.Random, index: int) -> tuple[str, bytes]:
    uid = f"1.2.826.0.1.3680043.9.7.{os.getpid()}.{index}.{rng.randrange(1 << 30)}"
    side = int((rng.choice(SIZES) // 2) ** 0.5) or 1
    pixels = rng.randbytes(side * side * 2)
    elements = [
        (0x0008, 0x0016, b"UI", fuzzgen.even(fuzzgen.CT_IMAGE.encode())),
        (0x0008, 0x0018, b"UI", fuzzgen.even(uid.encode())),
        (0x0008, 0x0060, b"CS", b"CT"),
        (0x0010, 0x0010, b"PN", b"Crash^Test"),
        (0x0020, 0x000D, b"UI", b"1.2.3.4.5.6"),
        (0x0020, 0x000E, b"UI", b"1.2.3.4.5.7."),
        (0x0028, 0x0010, b"US", struct.pack("<H", side)),
        (0x0028, 0x0011, b"US", struct.pack("<H", side)),
        (0x7FE0, 0x0010, b"OW", pixels),
    ]
    return uid, fuzzgen.encode_data_set(elements, implicit_vr=False)


class Sender(threading.Thread):
    """Sends objects until stopped; `sent` has every object, `acked` the successes."""

    def __init__(self, port: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.rng = random.Random(seed)
        self.sent: dict[str, bytes] = {}
        self.acked: set[str] = set()
        self.stop = threading.Event()
        self.index = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                sock = harness.associate(self.port)
            except (OSError, AssertionError, harness.Closed):
                time.sleep(0.02)
                continue
            try:
                for _ in range(self.rng.randint(1, 6)):
                    if self.stop.is_set():
                        break
                    self.index += 1
                    uid, data = make_object(self.rng, self.index)
                    self.sent[uid] = data
                    command = fuzzgen.command_set(fuzzgen.store_elements(uid.encode(),
                                                                         self.index & 0xFFFF))
                    sock.sendall(fuzzgen.fragments(1, command, command=True)
                                 + fuzzgen.fragments(1, data, command=False))
                    status = harness.read_status(sock)
                    if status == 0:
                        self.acked.add(uid)
                    elif isinstance(status, str):
                        break
                else:
                    sock.sendall(fuzzgen.pdu(0x05, bytes(4)))
                    with contextlib.suppress(harness.Closed):
                        harness.read_pdu(sock)
            except (OSError, AssertionError, harness.Closed):
                pass
            finally:
                sock.close()


def stored_data_set(path: Path) -> bytes:
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    (group_length,) = struct.unpack_from("<L", raw, 140)
    return raw[144 + group_length:]


def check_tree(daemon: Daemon, sent: dict[str, bytes], acked: set[str]) -> int:
    """Every acknowledged object bit-exact; every file a complete sent object."""
    by_name = {f"CT.{uid}": uid for uid in sent}
    found: set[str] = set()
    for path in daemon.files():
        uid = by_name.get(path.name)
        assert uid is not None, f"unexpected file {path}"
        assert stored_data_set(path) == sent[uid], f"{path} is not the object sent"
        found.add(uid)
    missing = acked - found
    assert not missing, f"{len(missing)} acknowledged object(s) lost, e.g. {sorted(missing)[:3]}"
    return len(found)


def kill_one(daemon: Daemon, mode: str, ignore: set[int], rng: random.Random) -> list[int]:
    """SIGKILL per `mode`; return the workers left orphaned (mode "master")."""
    master = daemon.proc.pid
    deadline = time.monotonic() + 5
    workers = sorted(harness.children(master) - ignore)
    while not workers and mode == "worker" and time.monotonic() < deadline:
        time.sleep(0.005)  # between two associations: the next one starts in a moment
        workers = sorted(harness.children(master) - ignore)
    if mode == "worker":
        if workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(workers), signal.SIGKILL)
        return []
    daemon.proc.kill()
    daemon.proc.wait(10)
    if mode == "all":
        for pid in workers + sorted(harness.children(master) - ignore):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return []
    return workers


def run_instants(tmp_path: Path, count: int, seed: int,
                 modes: list[str] | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    settings: dict[str, dict[str, Any]] = {"logging": {"level": "info"},
                                           "network": {"dimse_timeout": 10}}
    daemon = start_daemon(tmp_path, settings, name="crash")
    out = daemon.out
    settings["storage"] = {"output_directory": str(out)}
    settings["network"]["port"] = daemon.port
    ignore = harness.children(daemon.proc.pid)  # the configuration watcher
    sent: dict[str, bytes] = {}
    acked: set[str] = set()
    figures = {"worker": 0, "master": 0, "all": 0, "sent": 0, "acked": 0, "restarts": 0}
    orphans: list[int] = []
    started = time.monotonic()
    try:
        for instant in range(count):
            mode = modes[instant] if modes else rng.choice(["worker", "worker", "master", "all"])
            sender = Sender(daemon.port, seed * 1000 + instant)
            sender.start()
            time.sleep(rng.uniform(0.02, 0.8))
            orphans += kill_one(daemon, mode, ignore, rng)
            figures[mode] += 1
            if mode != "worker":
                # A new master at once, as systemd would (Restart=on-failure); in "master"
                # mode the orphans may still be finishing their association meanwhile.
                daemon = _restart(tmp_path, settings, instant)
                ignore = harness.children(daemon.proc.pid)
                figures["restarts"] += 1
            sender.stop.set()
            sender.join(60)
            assert not sender.is_alive(), "sender hung"
            sent.update(sender.sent)
            acked |= sender.acked
            orphans = [pid for pid in orphans if harness.alive(pid)]
            check_tree(daemon, sent, acked)
            if mode == "worker" and not orphans:
                # The master removes a killed worker's temporary file itself, no restart.
                assert harness.poll(daemon.staging, 10, want=[]), daemon.staging()
        # The end: orphans finish, the last daemon stops; a fresh start cleans up.
        assert wait_gone(orphans), f"orphaned workers {orphans} did not end"
        daemon.stop()
        daemon = _restart(tmp_path, settings, count)
        assert daemon.staging() == [], f"temporary files after restart: {daemon.staging()}"
        figures["files"] = check_tree(daemon, sent, acked)
        assert daemon.proc.poll() is None
        bugs = harness.bug_lines(daemon.log())
        assert not bugs, bugs[:5]
    finally:
        daemon.stop()
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    figures["sent"], figures["acked"] = len(sent), len(acked)
    figures["seconds"] = round(time.monotonic() - started)
    print(f"crash consistency: {figures}", file=sys.stderr)
    return figures


def _restart(tmp_path: Path, settings: dict[str, dict[str, Any]], instant: int) -> Daemon:
    deadline = time.monotonic() + 20
    while True:  # the old listener's port may take a moment to be free
        daemon = start_daemon(tmp_path, settings, name=f"crash-{instant}", wait=False)
        try:
            daemon.wait_log("listening on", timeout=15)
            return daemon
        except AssertionError:
            daemon.stop()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(harness.alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    figures = run_instants(tmp_path, 3, seed=9, modes=["worker", "master", "all"])
    assert figures["acked"] > 0


@pytest.mark.slow
def test_sigkill_at_120_random_instants(tmp_path: Path) -> None:
    figures = run_instants(tmp_path, 120, seed=90)
    assert figures["worker"] + figures["master"] + figures["all"] == 120
    assert figures["acked"] > 100
