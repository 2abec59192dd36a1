"""File systems of a test's own: a tmpfs, or ext4 on a loop device (these tests need root)."""

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.peers import require_tool


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    """A tmpfs of its own at `mountpoint` (created), unmounted (lazily if busy) afterwards."""
    require_tool("mount")
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (these tests need root): {result.stderr}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


@contextlib.contextmanager
def mounted_ext4(mountpoint: Path, size_mb: int, options: str = "") -> Iterator[Path]:
    """A fresh ext4 on a loop device at `mountpoint` (created), unmounted afterwards."""
    require_tool("mkfs.ext4")
    image = mountpoint.with_name(mountpoint.name + ".img")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    mountpoint.mkdir()
    for args in (["mkfs.ext4", "-q", str(image)],
                 ["mount", "-o", ",".join(filter(None, ["loop", options])), str(image),
                  str(mountpoint)]):
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed (these tests need root and loop devices): "
                        f"{result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
        image.unlink()


def unmount(mountpoint: Path) -> None:
    """Unmount, lazily when something still holds the file system."""
    if subprocess.run(["umount", str(mountpoint)], capture_output=True,
                      timeout=60).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=60)
