"""Symlinks in the output and state trees (issue 16): every operation goes through
descriptors and follows none of them, the rename-on-end-of-study job included, and
"kept" (storage.duplicates = keep-first) means a regular file that holds the object.

Who can plant a symlink there?  Not a DICOM peer (names are built by naming.py), but any
local process with write access to the output directory: an end-of-study script, a
cleanup job, another service sharing the directory.  Each test checks the peer's status,
the log line and the files on disk inside and outside the output directory.
"""

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from support.daemon import start_daemon
from support.data import make_study, minimal_ct
from support.data import testdata as bundled
from support.peers import storescu
from support.uids import CT_IMAGE
from support.wait import wait_until
from support.wire import associate, c_store, release

UID = b"1.2.826.0.1.3680043.9.7.16.100"
NAME = "CT.1.2.826.0.1.3680043.9.7.16.100"


def _store_one(daemon: Any) -> int:
    assoc = associate(daemon.port)
    try:
        status = c_store(assoc, 1, CT_IMAGE.encode(), UID, minimal_ct(UID, b"1.2.3.4", b"Doe^John"))
        release(assoc)
    finally:
        assoc.sock.close()
    return status


@pytest.mark.parametrize("what", ["symlink", "dangling-symlink", "directory", "fifo"])
@pytest.mark.parametrize("duplicates", ["keep-first", "reject"])
def test_a_name_taken_by_something_else_than_a_file_is_not_kept(
        tmp_path: Path, daemon_factory: Any, duplicates: str, what: str) -> None:
    """The issue: with keep-first, a symlink at the object's name counted as "kept" and
    success was answered for an object stored nowhere.  Now: 0x0110 and one line saying
    what holds the name; nothing is written through it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"not a DICOM object")
    daemon = daemon_factory({"storage": {"duplicates": duplicates},
                             "logging": {"level": "info"}})
    taken = daemon.out / NAME
    if what == "symlink":
        taken.symlink_to(victim)
    elif what == "dangling-symlink":
        taken.symlink_to(outside / "nothing")
    elif what == "directory":
        taken.mkdir()
    else:
        os.mkfifo(taken)
    assert _store_one(daemon) == 0x0110
    kind = {"symlink": "a symbolic link", "dangling-symlink": "a symbolic link",
            "directory": "a directory", "fifo": "a FIFO"}[what]
    log = daemon.wait_log("failed with 0x0110")
    assert f"{NAME} exists and is {kind}, not a stored object" in log
    assert victim.read_bytes() == b"not a DICOM object"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert daemon.staging() == []


def test_keep_first_keeps_a_regular_file(daemon_factory: Any) -> None:
    daemon = daemon_factory({"storage": {"duplicates": "keep-first"}})
    assert _store_one(daemon) == 0
    first = (daemon.out / NAME).read_bytes()
    assert _store_one(daemon) == 0  # the same object again: kept
    assert (daemon.out / NAME).read_bytes() == first
    assert "kept the first copy" in daemon.log()


def test_overwrite_replaces_a_symlink_and_writes_nothing_through_it(
        tmp_path: Path, daemon_factory: Any) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    daemon = daemon_factory({"storage": {"duplicates": "overwrite"}})
    (daemon.out / NAME).symlink_to(victim)
    assert _store_one(daemon) == 0
    assert victim.read_bytes() == b"precious"
    stored = daemon.out / NAME
    assert stored.is_file() and not stored.is_symlink()
    assert str(dcmread(stored).SOPInstanceUID) == UID.decode()


def test_a_symlinked_study_directory_is_not_followed(tmp_path: Path,
                                                     daemon_factory: Any) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    daemon = daemon_factory({"storage": {"sort": "study-uid"}, "logging": {"level": "info"}})
    (daemon.out / "1.2.3.4").symlink_to(outside)
    assert _store_one(daemon) == 0xA700
    assert "cannot create 1.2.3.4" in daemon.wait_log("failed with 0xA700")
    assert list(outside.iterdir()) == []


def test_rename_job_refuses_a_study_directory_replaced_by_a_symlink(
        tmp_path: Path, daemon_factory: Any) -> None:
    """The issue: with a study directory replaced by a symlink, the rename job renamed
    files outside the output directory.  The study's reception jobs wait for a flag, the
    directory is moved out and replaced by a link to where it went, then the rename runs:
    it refuses, and the files outside keep their names."""
    flag = tmp_path / "go"
    waiter = tmp_path / "wait.py"
    waiter.write_text(f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n"
                      "    time.sleep(0.05)\n")
    daemon = daemon_factory({
        "storage": {"sort": "study-uid", "fsync": False},
        "events": {"rename_on_eostudy": True, "eostudy_timeout": 1,
                   "exec_on_reception": [sys.executable, str(waiter)]},
        "logging": {"level": "info"}})
    files = make_study(tmp_path / "in", 3)
    storescu(daemon.port, *files)
    study = daemon.out / str(dcmread(files[0]).StudyInstanceUID)
    names = sorted(p.name for p in study.iterdir())
    assert len(names) == 3 and all(n.startswith("CT.") for n in names)
    moved = tmp_path / "outside" / study.name
    moved.parent.mkdir()
    os.rename(study, moved)
    study.symlink_to(moved)
    flag.touch()
    wait_until(lambda: "missing or refused" in daemon.log(), 30, "the rename job's refusal")
    time.sleep(0.5)
    log = daemon.log()
    assert "not a directory, or a symbolic link, refused" in log
    assert sorted(p.name for p in moved.iterdir()) == names  # nothing renamed outside
    assert study.is_symlink()


def test_rename_job_renames_as_before(tmp_path: Path, daemon_factory: Any) -> None:
    daemon = daemon_factory({
        "storage": {"sort": "study-uid", "fsync": False},
        "events": {"rename_on_eostudy": True, "eostudy_timeout": 1},
        "logging": {"level": "info"}})
    files = make_study(tmp_path / "in", 3)
    storescu(daemon.port, *files)
    study = daemon.out / str(dcmread(files[0]).StudyInstanceUID)
    wait_until(lambda: sorted(p.name for p in study.iterdir()) ==
               ["CT000001", "CT000002", "CT000003"], 30, "the renamed study")


def test_a_symlinked_state_directory_is_refused_at_start(tmp_path: Path) -> None:
    """The issue: a symlinked .ingestd-state put the job database and manifests elsewhere.
    Now the daemon does not start (exit 73), and creates nothing where the link points."""
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / ".ingestd-state").symlink_to(elsewhere)
    daemon = start_daemon(tmp_path, {"storage": {"output_directory": str(out)},
                                     "events": {"exec_on_reception": ["/bin/true"]}},
                          wait=False)
    assert daemon.proc.wait(30) == 73
    assert "not a directory, or a symbolic link, refused" in daemon.log()
    assert list(elsewhere.iterdir()) == []


def test_staging_reads_do_not_follow_a_replaced_staging_directory(
        tmp_path: Path, daemon_factory: Any) -> None:
    """Re-encoding reads the received file back: through the staging directory's
    descriptor, so a .ingestd-tmp replaced by a symlink after start-up changes nothing; nor
    do the daemon's own files there (the counters, saved at most once a second and at stop:
    the daemon is stopped before looking)."""
    daemon = daemon_factory({"storage": {"transfer_syntax": "big-explicit"}})
    staging = daemon.out / ".ingestd-tmp"
    os.rename(staging, tmp_path / "old-staging")
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    staging.symlink_to(decoy)
    storescu(daemon.port, bundled("CT_small.dcm"))
    assert daemon.stop() == 0
    assert list(decoy.iterdir()) == []
    assert (tmp_path / "old-staging" / "stats.json").is_file()
    [stored] = [p for p in daemon.out.iterdir() if p.name.startswith("CT.")]
    assert dcmread(stored).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
