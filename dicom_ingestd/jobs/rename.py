"""The rename-on-end-of-study job: ``python3 -I .../jobs/rename.py MANIFEST [--fsync]``.

Stdlib only and run as a script, so that it works whatever the installation's sys.path (the
Debian package's launcher sets it up in-process only).  The master computes each file's
two-character prefix (naming.rename_prefix) into the manifest as "rename_prefix".

Renames a complete batch's files as storescp -rns does (storescp.cc renameOnEndOfStudy): in
order of arrival, each file gets the first two characters of its modality and a 6-digit number
counting from 000001 (CT000001, MR000002, ...), in its own directory, without its extension.
Unlike storescp, an existing file is never replaced: a number whose name is taken is skipped
(storescp restarts at 000001 for every batch and rename() clobbers the earlier batch's files).

Idempotent, so that the job queue may run it again after a crash: the new names are planned
first and the plan saved in the manifest; a rerun follows the saved plan (files already at their
new name are left alone), and a finished run marks the manifest "renamed".  The manifest is
rewritten with the new paths (the old ones kept as "original_path") for the end-of-study command.
Renames use renameat2(RENAME_NOREPLACE), or link()+unlink() where the file system lacks it.

Exit status: 0 done (files that vanished are reported and skipped), 1 on an error.
"""

import argparse
import contextlib
import ctypes
import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)
if _RENAMEAT2 is not None:
    _RENAMEAT2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
    _RENAMEAT2.restype = ctypes.c_int


def rename_noreplace(source: str, target: str) -> None:
    """Rename `source` to `target`; FileExistsError if `target` exists (never replaced)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), source, None, target)
    os.link(source, target, follow_symlinks=False)  # refuses an existing target too
    os.unlink(source)


def write_manifest(path: Path, manifest: dict[str, Any], fsync: bool = True) -> None:
    """Replace the manifest atomically (temporary file, fsync, rename)."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(temp, path)
    if fsync:
        _fsync_dir(str(path.parent))


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rename_filename(prefix2: str, number: int) -> str:
    """storescp's new name (sprintf "%s%06d"); the same as naming.rename_filename."""
    return f"{prefix2}{number:06d}"


class _Namer:
    """Hands out free names: counter from 1, skipping names taken on disk or planned."""

    def __init__(self) -> None:
        self.counter = 1
        self.planned: set[str] = set()

    def next(self, directory: str, prefix: str) -> str:
        while True:
            target = os.path.join(directory, rename_filename(prefix, self.counter))
            self.counter += 1
            if target not in self.planned and not os.path.lexists(target):
                self.planned.add(target)
                return target


def plan(files: list[dict[str, Any]]) -> list[str | None]:
    """New paths for `files` in order (None for a file that no longer exists)."""
    namer = _Namer()
    targets: list[str | None] = []
    for entry in files:
        path = str(entry["path"])
        if not os.path.lexists(path):
            targets.append(None)
            continue
        targets.append(namer.next(os.path.dirname(path), str(entry["rename_prefix"])))
    return targets


def rename_batch(manifest_path: Path, fsync: bool) -> int:
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("renamed"):
        print(f"{manifest_path}: already renamed")
        return 0
    files: list[dict[str, Any]] = manifest["files"]
    targets: list[str | None] = manifest.get("plan") or plan(files)
    if "plan" not in manifest:
        manifest["plan"] = targets
        write_manifest(manifest_path, manifest, fsync)
    namer = _Namer()
    namer.planned.update(t for t in targets if t)
    renamed = missing = 0
    directories: set[str] = set()
    for entry, target in zip(files, targets, strict=True):
        source = str(entry["path"])
        if target is None:
            print(f"{source}: no longer exists; not renamed")
            missing += 1
            continue
        if not os.path.lexists(source):
            if os.path.lexists(target):
                entry["original_path"], entry["path"] = source, target  # done by a run before
            else:
                print(f"{source}: no longer exists; not renamed")
                missing += 1
            continue
        while True:
            try:
                rename_noreplace(source, target)
                break
            except FileExistsError:
                # Created by someone else since the plan: take the next free number.
                target = namer.next(os.path.dirname(source), str(entry["rename_prefix"]))
        entry["original_path"], entry["path"] = source, target
        directories.add(os.path.dirname(target))
        renamed += 1
    if fsync:
        for directory in sorted(directories):
            _fsync_dir(directory)
    manifest["renamed"] = True
    del manifest["plan"]
    write_manifest(manifest_path, manifest, fsync)
    names = [os.path.basename(str(f["path"])) for f in files]
    where = ", ".join(sorted(directories)) or "-"
    print(f"renamed {renamed} file(s) in {where}"
          + (f": {names[0]} .. {names[-1]}" if renamed else "")
          + (f"; {missing} missing" if missing else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rename.py",
                                     description="Rename a complete study batch's files.")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--fsync", action="store_true", help="fsync directories and manifest")
    args = parser.parse_args(argv)
    try:
        return rename_batch(args.manifest, args.fsync)
    except (OSError, ValueError, KeyError) as exc:
        print(f"rename failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
