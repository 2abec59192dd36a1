"""Write errors injected for real: the output file system's disk starts failing its writes.

The output directory is ext4 on a loop device whose backing file is a sparse file on a small
tmpfs.  After one object is stored, that tmpfs is filled: every block the loop device has not
written before now fails with EIO, as a dying disk's writes do (this kernel build has no
device-mapper for the `error` or `flakey` targets).  Writes into the page cache still
succeed, so only the syncs can notice: an object received after that must not be answered
with success, in every placement recipe and output encoding (storage.sync_directories
"auto" and "always", a re-encoding transfer syntax, file_format = "dataset").  A daemon that
skips a sync, or swallows the error a sync reports, answers 0x0000 for an object that is on
no disk.
"""

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from support.daemon import Daemon, start_daemon
from support.data import testdata as data_file
from support.mounts import mounted_tmpfs, unmount
from support.peers import require_tool

IMAGE_SIZE = 128 << 20  # sparse, on a tmpfs of BACKING_SIZE
BACKING_SIZE = 64 << 20
SUCCESS = 0x0000


def run(args: list[str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed (these tests need root, loop devices and "
                    f"device-mapper): {result.stderr.strip()}")
    return result.stdout.strip()


@contextlib.contextmanager
def failing_device(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """(mountpoint, fail): ext4 on a loop device whose backing file lives on a small tmpfs;
    fail() fills that tmpfs, so every block the loop device has not written yet fails with
    an I/O error (device-mapper's `error` target, where the kernel has device-mapper, does
    the same).  Everything is torn down, whatever happens."""
    require_tool("mkfs.ext4")
    with mounted_tmpfs(tmp_path / "backing", f"size={BACKING_SIZE}") as backing:
        image, mountpoint = backing / "disk.img", tmp_path / "mnt"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)])
        mountpoint.mkdir()
        run(["mount", "-o", "loop", str(image), str(mountpoint)])
        filler = backing / "filler"
        try:
            def fail() -> None:
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(bytes(1 << 20))
                        f.flush()

            yield mountpoint, fail
        finally:
            with contextlib.suppress(OSError):
                filler.unlink()
            unmount(mountpoint)


def c_store(port: int, ds: Any) -> int | None:
    """The status of one C-STORE by pynetdicom, None when there was no response."""
    from pynetdicom import AE

    ae = AE(ae_title="IOERR")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ds.SOPClassUID, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


def new_object() -> Any:
    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    return ds


@pytest.mark.parametrize("storage", [
    {"sync_directories": "auto"},
    {"sync_directories": "always"},
    {"transfer_syntax": "implicit"},
    {"transfer_syntax": "big-explicit", "sync_directories": "always"},
    {"file_format": "dataset"},
], ids=["auto", "always", "reencoded-auto", "reencoded-always", "dataset"])
def test_no_success_when_the_disk_fails_its_syncs(tmp_path: Path,
                                                  storage: dict[str, str]) -> None:
    with failing_device(tmp_path) as (mountpoint, fail):
        settings = {"storage": {"output_directory": str(mountpoint / "out"),
                                "sort": "study-uid", **storage}}
        daemon: Daemon = start_daemon(tmp_path, settings)
        try:
            assert c_store(daemon.port, new_object()) == SUCCESS
            fail()
            refused = new_object()
            status = c_store(daemon.port, refused)
            assert status not in (SUCCESS, None), f"answered {status} after the disk failed"
            # Nor is a name left for it: a name whose data or link may not be durable goes.
            names = [path.name for path in daemon.files()]
            assert not [n for n in names if refused.SOPInstanceUID in n], names
            log = daemon.log()
            assert "Traceback" not in log, log
        finally:
            daemon.stop()
