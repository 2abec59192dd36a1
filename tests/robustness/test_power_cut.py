"""Power cut: the output file system stops dead at an instant of our choosing while objects
arrive.

The output directory and the state directory (outbox, job database) are on a file system of
their own, ext4 or XFS on a loop device.  At the chosen instant the daemon is frozen (SIGSTOP
of the master and every process under it, until each is stopped in user space: no system
call of ours is in flight), the file system is shut down without flushing its journal
(EXT4_IOC_SHUTDOWN / XFS_IOC_GOINGDOWN with NOLOGFLUSH, as xfstests simulates a crash) and
the daemon is thawed.  Whatever was not yet committed is lost, as in a power failure of the
machine, and from then on every write and sync of the daemon fails.  The loop device's
backing file plays the disk.  The daemon is stopped, and the file system is unmounted and
mounted again, which recovers its journal.  Then a new daemon starts on it.

The checks, after every cut: every object answered with success is there, whole -- whenever
the success arrived.  Nothing is excused: with the daemon frozen, the cut falls between two
of its system calls, so a success sent after the thaw is a promise too (its syncs completed
before the cut, or it is a success the daemon had no right to send).  Every visible file is a
complete object that was sent, no temporary file survives the restart, and with [events]
every acknowledged object gets its reception job (its outbox record was durable before its
success).  The first successes answered after the thaw are counted (acked_after_cut).

Cuts fall at two kinds of instant: "ack", right after a success that was the first object of
a new study (its directory just made; the sender then waits), where a missing sync of the
data, the name, the new directory or the outbox record loses that object every time; and
"random", anywhere in a stream of objects of random sizes, where partial files must stay
invisible.

Scenarios: each placement recipe of storage.sync_directories -- ext4's one journal commit
("auto" on ext4), one fsync ("auto" on ext4 without a journal) and file plus directory fsync
("always") -- with storescp's output options that take another way to the disk: objects
re-encoded (storage.transfer_syntax), written as bare data sets (file_format = "dataset"),
and study directories made by sorting (study-uid: a directory per study; conc-studies: a
new directory per study under the sort state's lock).  The default run cuts each scenario at
an "ack" and a "random" instant; `--run-slow` cuts each 40 times, and XFS too.

ext4 without a journal (mkfs -O ^has_journal, as the root file system of some cloud images)
has no log for the shutdown to withhold, and unmounting would write out the metadata buffers
the cut left dirty.  So the disk is read at the instant of the cut instead: the loop device's
backing file is copied right after the shutdown, checked with e2fsck -fy as a boot would, and
mounted in place of the original.  There "auto" rests on ext4's fsync writing the
directories of a newly named file (see worker/store.py).

Before the freeze, cuts fell while the daemon ran, and a sync the shutdown ioctl overtook
(about 10 ms on XFS) could still report success: the harness then had to excuse successes
answered after the cut began.  Frozen, nothing of ours runs during the ioctl.
"""

import contextlib
import ctypes
import fcntl
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import pytest
from support.mounts import unmount
from support.peers import require_tool
from support.uids import IMPLICIT_LE
from support.wait import wait_until
from transfer import Sender, check_tree, restart

SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32): EXT4_IOC_SHUTDOWN and XFS_IOC_GOINGDOWN
NOLOGFLUSH = 2  # EXT4_GOING_FLAGS_NOLOGFLUSH, XFS_FSOP_GOING_FLAGS_NOLOGFLUSH
IMAGE_SIZE = 512 << 20  # sparse; XFS needs at least 300 MB
NO_JOURNAL = "ext4-nojournal"  # ext4 made with -O ^has_journal
MKFS = {"ext4": ["mkfs.ext4", "-q"], NO_JOURNAL: ["mkfs.ext4", "-q", "-O", "^has_journal"],
        "xfs": ["mkfs.xfs", "-q"]}
RECORD_JOB = 'printf "%s\\n" "$1" >> "$0"'  # sh -c RECORD_JOB LEDGER FILENAME


@dataclass(frozen=True)
class Scenario:
    fs_type: str  # a key of MKFS
    storage: dict[str, str]  # [storage] settings besides the output directory
    encoding: str = "received"  # how objects are stored: see transfer.check_tree
    plan: tuple[str, ...] = ("ack", "random")  # the kind of each cut's instant
    one_sync: bool = field(init=False)

    def __post_init__(self) -> None:
        one = self.storage.get("sync_directories", "auto") == "auto" and self.fs_type != "xfs"
        object.__setattr__(self, "one_sync", one)


SCENARIOS = {
    "ext4-one-commit": Scenario("ext4", {"sync_directories": "auto", "sort": "study-uid"}),
    "ext4-always-reencoded": Scenario(
        "ext4", {"sync_directories": "always", "sort": "study-uid", "transfer_syntax": "implicit"},
        IMPLICIT_LE),
    "nojournal-one-fsync-dataset": Scenario(
        NO_JOURNAL, {"sync_directories": "auto", "sort": "conc-studies",
                     "file_format": "dataset"}, "dataset"),
    "nojournal-always": Scenario(
        NO_JOURNAL, {"sync_directories": "always", "sort": "study-uid"}, plan=("ack",)),
}
SLOW_SCENARIOS = {
    **SCENARIOS,
    "ext4-always": Scenario("ext4", {"sync_directories": "always", "sort": "conc-studies"}),
    "ext4-one-commit-reencoded": Scenario(
        "ext4", {"sync_directories": "auto", "sort": "conc-studies",
                 "transfer_syntax": "implicit"}, IMPLICIT_LE),
    "xfs-always": Scenario("xfs", {"sort": "study-uid"}),
    "xfs-always-dataset": Scenario("xfs", {"sort": "conc-studies", "file_format": "dataset"},
                                   "dataset"),
}


def run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed (these tests need root and loop devices): "
                    f"{result.stderr.strip()}")


@contextlib.contextmanager
def loop_file_system(tmp_path: Path, fs_type: str) -> Iterator[tuple[Path, Path]]:
    """(image, mountpoint): a fresh `fs_type` (a key of MKFS) on a loop device, unmounted
    afterwards."""
    require_tool(MKFS[fs_type][0])
    image, mountpoint = tmp_path / f"{fs_type}.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    run([*MKFS[fs_type], str(image)])
    mountpoint.mkdir()
    run(["mount", "-o", "loop", str(image), str(mountpoint)])
    try:
        yield image, mountpoint
    finally:
        unmount(mountpoint)
        image.unlink()


def cut_power(mountpoint: Path) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, SHUTDOWN, struct.pack("I", NOLOGFLUSH))
    finally:
        os.close(fd)


def syncfs(mountpoint: Path) -> None:
    """syncfs(2) of the file system at `mountpoint` (Python's os has no syncfs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)


def _stopped(pid: int) -> bool:
    """Every thread of `pid` stopped in user space (or the process gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def freeze(master: int) -> list[int]:
    """SIGSTOP the master and everything under it; return once no system call of theirs is
    in flight (each stopped in user space), with the pids to thaw."""
    frozen: list[int] = []
    pending = [master]
    while pending:
        for pid in pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        wait_until(lambda: all(_stopped(pid) for pid in frozen), 20, "the daemon frozen")
        # A process forked before its parent stopped is stopped in the next round.
        pending = sorted(harness.children(master) - set(frozen))
    return frozen


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def remount_after_cut(image: Path, mountpoint: Path, fs_type: str, snapshot: Path | None) -> None:
    """Mount what the disk held at the cut: the journal recovers it, or (without a journal)
    the snapshot taken at the cut replaces the image, repaired by e2fsck as a boot would."""
    unmount(mountpoint)
    if snapshot is not None:
        snapshot.replace(image)
        fsck = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True,
                              timeout=120)
        if fsck.returncode not in (0, 1):  # 1: errors corrected
            pytest.fail(f"e2fsck -fy after the cut: exit {fsck.returncode}\n{fsck.stdout}")
    run(["mount", "-o", "loop", str(image), str(mountpoint)])


def recorded_files(ledger: Path) -> set[str]:
    """The file names the reception jobs were run for (at least once each)."""
    return set(ledger.read_text().split()) if ledger.exists() else set()


def power_cuts(tmp_path: Path, scenario: Scenario, plan: tuple[str, ...],
               seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    figures: dict[str, Any] = {"fs": scenario.fs_type, **scenario.storage, "cuts": 0,
                               "acked_after_cut": 0, "sent": 0, "files": 0}
    sent: dict[str, bytes] = {}
    acked: set[str] = set()
    checked: set[str] = set()  # acknowledged, found whole and removed (the disk is small)
    ledger = tmp_path / "reception-jobs"  # off the cut file system
    started = time.monotonic()
    with loop_file_system(tmp_path, scenario.fs_type) as (image, mountpoint):
        settings: dict[str, dict[str, Any]] = {
            "logging": {"level": "info"}, "network": {"dimse_timeout": 10},
            "storage": {"output_directory": str(mountpoint / "out"), **scenario.storage},
            "jobs": {"state_directory": str(mountpoint / "state")},
            "events": {"exec_on_reception": ["/bin/sh", "-c", RECORD_JOB, str(ledger), "#f"]}}
        daemon = restart(tmp_path, settings, "cut")
        daemons = [daemon]
        try:
            one_sync = ("one journal commit per object (ext4)" in daemon.log()
                        or "one fsync per object (ext4 without a journal" in daemon.log())
            assert one_sync == scenario.one_sync, daemon.log()
            assert ("without a journal" in daemon.log()) == (scenario.fs_type == NO_JOURNAL)
            settings["network"]["port"] = daemon.port
            for instant, kind in enumerate(plan):
                sender = Sender(daemon.port, seed * 1000 + instant,
                                hold_after=rng.randrange(8) if kind == "ack" else None)
                sender.start()
                if kind == "ack":
                    assert sender.held.wait(60), "no new study acknowledged within 60 s"
                else:
                    time.sleep(rng.uniform(0.05, 0.8))
                frozen = freeze(daemon.proc.pid)
                cut_at = time.monotonic()
                cut_power(mountpoint)
                snapshot = None
                if scenario.fs_type == NO_JOURNAL:
                    snapshot = image.with_suffix(".cut")
                    run(["cp", "--sparse=always", str(image), str(snapshot)])
                thaw(frozen)
                figures["cuts"] += 1
                time.sleep(0.1)  # what the thawed daemon answers now is held to the promise
                sender.stop.set()
                sender.join(60)
                assert not sender.is_alive(), "sender hung"
                daemon.stop()
                sent.update(sender.sent)
                figures["sent"] += len(sender.sent)
                acked |= sender.acked
                figures["acked_after_cut"] += sum(at > cut_at for at in sender.acked_at.values())
                remount_after_cut(image, mountpoint, scenario.fs_type, snapshot)
                daemon = restart(tmp_path, settings, f"cut-{instant}")
                daemons.append(daemon)
                assert daemon.staging() == [], \
                    f"temporary files after restart: {daemon.staging()}"
                figures["files"] += check_tree(daemon, sent, acked, encoding=scenario.encoding)
                # Every record was read at the restart: the files can go (an operator moving
                # them away), so that 40 cuts fit on the disk.
                for path in daemon.files():
                    path.unlink()
                syncfs(mountpoint)  # or the next cut brings them back
                checked |= acked
                sent.clear()
                acked.clear()
            # Every acknowledged object's record survived: its reception job runs (now, if
            # not before the cuts).
            wanted = {f"CT.{uid}" for uid in checked}
            with contextlib.suppress(AssertionError):
                wait_until(lambda: wanted <= recorded_files(ledger), 30, "the reception jobs")
            missing = wanted - recorded_files(ledger)
            assert not missing, (f"{len(missing)} acknowledged object(s) never got their "
                                 f"reception job, e.g. {sorted(missing)[:3]}")
        finally:  # a failed check must not leave a daemon holding the mount
            for each in daemons:
                each.stop()
    figures["acked"] = len(checked)
    figures["seconds"] = round(time.monotonic() - started)
    print(f"power cuts: {figures}", file=sys.stderr)
    return figures


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_power_cut(tmp_path: Path, name: str) -> None:
    scenario = SCENARIOS[name]
    figures = power_cuts(tmp_path, scenario, scenario.plan, seed=len(name))
    assert figures["acked"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_SCENARIOS))
def test_power_cut_at_40_instants(tmp_path: Path, name: str) -> None:
    figures = power_cuts(tmp_path, SLOW_SCENARIOS[name], ("ack", "random") * 20,
                         seed=40 + len(name))
    assert figures["acked"] > 40


def test_shutdown_ioctl_is_what_a_crash_leaves(tmp_path: Path) -> None:
    """The harness itself: data written but never synced is gone after the cut."""
    with loop_file_system(tmp_path, "ext4") as (image, mountpoint):
        (mountpoint / "synced").write_bytes(b"kept")
        with open(mountpoint / "synced", "rb+") as f:
            os.fsync(f.fileno())
        (mountpoint / "unsynced").write_bytes(b"lost")
        cut_power(mountpoint)
        unmount(mountpoint)
        run(["mount", "-o", "loop", str(image), str(mountpoint)])
        assert (mountpoint / "synced").read_bytes() == b"kept"
        assert not (mountpoint / "unsynced").exists() or \
            (mountpoint / "unsynced").read_bytes() == b""
