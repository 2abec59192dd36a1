"""Power cut: the output file system stops dead at a random instant while objects arrive.

The output directory is a file system of its own, ext4 or XFS on a loop device. At a random
instant it is shut down without flushing its journal (EXT4_IOC_SHUTDOWN / XFS_IOC_GOINGDOWN
with NOLOGFLUSH, as xfstests simulates a crash). Whatever was not yet committed is lost, as
in a power failure of the machine. The loop device's backing file plays the disk. The daemon
is stopped, and the file system is unmounted and mounted again, which recovers its journal.
Then a new daemon starts on it, and the checks are those of the SIGKILL suite: every object
answered with success before the cut began is there bit-exact, every visible file is a
complete object that was sent, and no temporary file survives the restart.

A real power cut is instantaneous and nothing is answered after it.  The shutdown ioctl takes
milliseconds (XFS: about 10 ms here), and an fsync it overtakes can still return success, so
a success that arrives while it runs is no promise: it is counted (acked_during_cut), its
file must still be whole if it is there, but it need not be.

This is the test of storage.sync_directories: "auto" (one journal commit per object on ext4,
the default) and "always" (file and directory fsync). Each association sends a study of its
own into study subdirectories, so a cut can also fall between creating a directory and
placing a file in it. The normal run cuts the power at 3 instants on ext4 and at 2 on ext4
without a journal; `--run-slow` at 40 per mode, and at 40 on XFS.

ext4 without a journal (mkfs -O ^has_journal, as the root file system of some cloud images)
has no log for the shutdown to withhold, and unmounting would write out the metadata buffers
the cut left dirty.  So the disk is read at the instant of the cut instead: the loop device's
backing file is copied right after the shutdown, checked with e2fsck -fy as a boot would, and
mounted in place of the original.  There "auto" rests on ext4's fsync writing the
directories of a newly named file (see worker/store.py).  This harness finds losses: with
"always" minus its directory fsync it lost 35 of 85 acknowledged objects in 3 cuts, with
storage.fsync off 92; "auto" lost none in 3 runs of 40 cuts (907, 909 and 887 acknowledged).

XFS seemed to lose the last acknowledged object in about half of the runs of 40 cuts, until
the success times were recorded: the one lost object had been answered 4 ms after the cut
began, while the 10 ms shutdown ioctl was still running.  Counting only the successes sent
before the cut, XFS ("always": file and directory fsync) lost none in 7 runs of 40 cuts.
XFS keeps the two-fsync recipe: the one-commit argument is about ext4's journal.
"""

import contextlib
import fcntl
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool, unmount
from transfer import Sender, check_tree, restart

SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32): EXT4_IOC_SHUTDOWN and XFS_IOC_GOINGDOWN
NOLOGFLUSH = 2  # EXT4_GOING_FLAGS_NOLOGFLUSH, XFS_FSOP_GOING_FLAGS_NOLOGFLUSH
IMAGE_SIZE = 512 << 20  # sparse; XFS needs at least 300 MB
NO_JOURNAL = "ext4-nojournal"  # ext4 made with -O ^has_journal
MKFS = {"ext4": ["mkfs.ext4", "-q"], NO_JOURNAL: ["mkfs.ext4", "-q", "-O", "^has_journal"],
        "xfs": ["mkfs.xfs", "-q"]}


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


def power_cuts(tmp_path: Path, fs_type: str, mode: str, count: int,
               seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    figures: dict[str, Any] = {"fs": fs_type, "sync_directories": mode, "cuts": 0,
                               "acked_during_cut": 0}
    sent: dict[str, bytes] = {}
    acked: set[str] = set()
    started = time.monotonic()
    with loop_file_system(tmp_path, fs_type) as (image, mountpoint):
        out = mountpoint / "out"
        settings: dict[str, dict[str, Any]] = {
            "logging": {"level": "info"}, "network": {"dimse_timeout": 10},
            "storage": {"output_directory": str(out), "sync_directories": mode,
                        "sort": "study-uid"}}
        daemon = restart(tmp_path, settings, "cut")
        daemons = [daemon]
        try:
            one_sync = ("one journal commit per object (ext4)" in daemon.log()
                        or "one fsync per object (ext4 without a journal" in daemon.log())
            assert one_sync == (mode == "auto" and fs_type != "xfs"), daemon.log()
            assert ("without a journal" in daemon.log()) == (fs_type == NO_JOURNAL), daemon.log()
            settings["network"]["port"] = daemon.port
            for instant in range(count):
                sender = Sender(daemon.port, seed * 1000 + instant)
                sender.start()
                time.sleep(rng.uniform(0.05, 0.8))
                cut_at = time.monotonic()
                cut_power(mountpoint)
                snapshot = None
                if fs_type == NO_JOURNAL:
                    snapshot = image.with_suffix(".cut")
                    run(["cp", "--sparse=always", str(image), str(snapshot)])
                figures["cuts"] += 1
                time.sleep(0.1)  # stores in flight fail now (successes after cut_at: see below)
                sender.stop.set()
                sender.join(60)
                assert not sender.is_alive(), "sender hung"
                daemon.stop()
                sent.update(sender.sent)
                # A real power cut is instantaneous; the shutdown ioctl is not, and a sync it
                # overtakes may still report success.  Only successes that arrived before the
                # cut began are promises; later ones are counted, and must still be whole files.
                promised = {uid for uid, at in sender.acked_at.items() if at < cut_at}
                figures["acked_during_cut"] += len(sender.acked) - len(promised)
                acked |= promised
                remount_after_cut(image, mountpoint, fs_type, snapshot)
                daemon = restart(tmp_path, settings, f"cut-{instant}")
                daemons.append(daemon)
                assert daemon.staging() == [], \
                    f"temporary files after restart: {daemon.staging()}"
                figures["files"] = check_tree(daemon, sent, acked)
        finally:  # a failed check must not leave a daemon holding the mount
            for each in daemons:
                each.stop()
    figures["sent"], figures["acked"] = len(sent), len(acked)
    figures["seconds"] = round(time.monotonic() - started)
    print(f"power cuts: {figures}", file=sys.stderr)
    return figures


@pytest.mark.parametrize(("fs_type", "mode", "count"), [("ext4", "auto", 2),
                                                        ("ext4", "always", 1),
                                                        (NO_JOURNAL, "auto", 2)])
def test_power_cut_at_random_instants(tmp_path: Path, fs_type: str, mode: str,
                                      count: int) -> None:
    figures = power_cuts(tmp_path, fs_type, mode, count, seed=len(mode) + count)
    assert figures["acked"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("fs_type", "mode"), [
    ("ext4", "auto"), ("ext4", "always"), (NO_JOURNAL, "auto"),
    ("xfs", "always")])
def test_power_cut_at_40_random_instants(tmp_path: Path, fs_type: str, mode: str) -> None:
    figures = power_cuts(tmp_path, fs_type, mode, 40, seed=40 + len(fs_type + mode))
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
