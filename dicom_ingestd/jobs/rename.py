"""The rename-on-end-of-study job: ``python3 -I .../jobs/rename.py MANIFEST [--fsync]``.

Stdlib only and run as a script, so that it works whatever the installation's sys.path (the
Debian package's launcher sets it up in-process only).  The master computes each file's
two-character prefix (dcmtk.modalities.rename_prefix) into the manifest as "rename_prefix".

Renames a complete batch's files as storescp -rns does (storescp.cc renameOnEndOfStudy): in
order of arrival, each file gets the first two characters of its modality and a 6-digit number
counting from 000001 (CT000001, MR000002, ...), in its own directory, without its extension.
Unlike storescp, an existing file is never replaced: a number whose name is taken is skipped
(storescp restarts at 000001 for every batch and rename() clobbers the earlier batch's files).

Idempotent, so that the job queue may run it again after a crash: the new names are planned
first and the plan saved in the manifest; a rerun follows the saved plan (files already at their
new name are left alone), and a finished run marks the manifest "renamed".  A name taken by
someone else since the plan is replaced by the next free one in the saved plan before the file
moves, so that at every instant, whatever stops the run, each file is at its original path or
at its planned one (storage commitment relies on that, jobs/commitment.py).  The manifest is
rewritten with the new paths (the old ones kept as "original_path") for the end-of-study command.
Renames use renameat2(RENAME_NOREPLACE), or link()+unlink() where the file system lacks it.

Every file-system operation goes through directory descriptors opened one path component at
a time from "/" with O_NOFOLLOW (open_directory), and renames, links and checks name entries
relative to them: a symlink anywhere in a path (a study directory replaced by a link to
/etc, say) is refused, never followed, and a name that is not a regular file (a symlink, a
directory, a FIFO) is not renamed.  The paths in a manifest are those the daemon stored under
its resolved output directory, so they hold no symlink of their own.

Exit status: 0 done (files that vanished or are refused are reported and skipped), 1 on an
error.
"""

import argparse
import contextlib
import ctypes
import errno
import json
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

_RENAME_NOREPLACE = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)
if _RENAMEAT2 is not None:
    _RENAMEAT2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
    _RENAMEAT2.restype = ctypes.c_int
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_directory(path: str | Path, *, create: bool = False, mode: int = 0o750) -> int:
    """A descriptor of the directory at absolute `path`, reached one component at a time
    from "/" without following a symlink (OSError ELOOP or ENOTDIR names the component);
    with `create`, missing components are created.  "." and ".." components are refused."""
    text = os.fspath(path)
    if not text.startswith("/"):
        raise OSError(errno.EINVAL, "not an absolute path", text)
    fd = os.open("/", _DIR_FLAGS)
    walked = ""
    try:
        for part in text.split("/"):
            if not part:
                continue
            walked += "/" + part
            if part in (".", ".."):
                raise OSError(errno.EINVAL, "a path with . or .. components", text)
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(exc.errno, "not a directory, or a symbolic link, refused",
                                  walked) from None
                raise OSError(exc.errno, exc.strerror, walked) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _directory(path: str | Path) -> Iterator[int]:
    fd = open_directory(path)
    try:
        yield fd
    finally:
        os.close(fd)


def _entry(dir_fd: int, name: str) -> os.stat_result | None:
    """The directory entry itself (never what a symlink points to), or None."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def rename_noreplace(dir_fd: int, source: str, target: str) -> None:
    """Rename `source` to `target` in the directory `dir_fd`; FileExistsError if `target`
    exists (never replaced)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(dir_fd, os.fsencode(source), dir_fd, os.fsencode(target),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), source, None, target)
    # link() refuses an existing target too, and never follows a symlink source.
    os.link(source, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(source, dir_fd=dir_fd)


def read_manifest(path: Path) -> dict[str, Any]:
    with _directory(path.parent) as dir_fd:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with open(fd, encoding="utf-8") as fh:
            data: dict[str, Any] = json.load(fh)
            return data


def write_manifest(path: Path, manifest: dict[str, Any], fsync: bool = True) -> None:
    """Replace the manifest atomically (temporary file, fsync, rename), through a descriptor
    of its directory (open_directory: no symlink followed)."""
    temp = path.name + ".tmp"
    with _directory(path.parent) as dir_fd:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640, dir_fd=dir_fd)
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(temp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if fsync:
            with contextlib.suppress(OSError):
                os.fsync(dir_fd)


def rename_filename(prefix2: str, number: int) -> str:
    """storescp -rns's new name: `prefix2` and `number` as at least 6 digits (CT000001),
    without the -fe extension (storescp.cc 2283, sprintf "%s%06d")."""
    return f"{prefix2}{number:06d}"


class _Directories:
    """Descriptors of the batch's directories, opened once each (open_directory)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def fd(self, directory: str) -> int:
        if directory not in self._fds:
            self._fds[directory] = open_directory(directory)
        return self._fds[directory]

    def sync(self, directories: set[str]) -> None:
        for directory in sorted(directories):
            with contextlib.suppress(OSError):
                os.fsync(self.fd(directory))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Namer:
    """Hands out free names: counter from 1, skipping names taken on disk or planned."""

    def __init__(self, directories: _Directories) -> None:
        self.counter = 1
        self.planned: set[str] = set()
        self._directories = directories

    def next(self, directory: str, prefix: str) -> str:
        dir_fd = self._directories.fd(directory)
        while True:
            name = rename_filename(prefix, self.counter)
            target = os.path.join(directory, name)
            self.counter += 1
            if target not in self.planned and _entry(dir_fd, name) is None:
                self.planned.add(target)
                return target


def _refusal(directories: _Directories, path: str) -> str:
    """Why the file at `path` is not renamed, or "" (a regular file, reached without a
    symlink); "missing" when it is gone."""
    try:
        entry = _entry(directories.fd(os.path.dirname(path)), os.path.basename(path))
    except OSError as exc:
        return f"{exc.filename or path}: {exc.strerror}"
    if entry is None:
        return "missing"
    if not stat.S_ISREG(entry.st_mode):
        return f"{path}: not a regular file (mode {stat.filemode(entry.st_mode)}), refused"
    return ""


def plan(files: list[dict[str, Any]], directories: _Directories | None = None
         ) -> list[str | None]:
    """New paths for `files` in order (None for a file that no longer exists or is refused)."""
    directories = directories or _Directories()
    namer = _Namer(directories)
    targets: list[str | None] = []
    for entry in files:
        path = str(entry["path"])
        if _refusal(directories, path):
            targets.append(None)
            continue
        targets.append(namer.next(os.path.dirname(path), str(entry["rename_prefix"])))
    return targets


def rename_batch(manifest_path: Path, fsync: bool) -> int:
    manifest = read_manifest(manifest_path)
    if manifest.get("renamed"):
        print(f"{manifest_path}: already renamed")
        return 0
    directories = _Directories()
    try:
        return _rename(manifest_path, manifest, directories, fsync)
    finally:
        directories.close()


def _rename(manifest_path: Path, manifest: dict[str, Any], directories: _Directories,
            fsync: bool) -> int:
    files: list[dict[str, Any]] = manifest["files"]
    targets: list[str | None] = manifest.get("plan") or plan(files, directories)
    if "plan" not in manifest:
        manifest["plan"] = targets
        write_manifest(manifest_path, manifest, fsync)
    namer = _Namer(directories)
    namer.planned.update(t for t in targets if t)
    renamed = missing = 0
    touched: set[str] = set()
    done: list[tuple[dict[str, Any], str, str]] = []  # entry, original path, new path
    for index, (entry, target) in enumerate(zip(files, targets, strict=True)):
        source = str(entry["path"])
        why = _refusal(directories, source)
        if target is None or why:
            if why == "missing" and target is not None and \
                    not _refusal(directories, target):
                done.append((entry, source, target))  # renamed by a run before
                continue
            print(f"{source}: no longer exists; not renamed" if why in ("missing", "")
                  else f"{why}; not renamed")
            missing += 1
            continue
        directory = os.path.dirname(source)
        dir_fd = directories.fd(directory)
        while True:
            try:
                rename_noreplace(dir_fd, os.path.basename(source), os.path.basename(target))
                break
            except FileExistsError:
                # Created by someone else since the plan: the next free number, in the saved
                # plan before the file moves there.
                target = namer.next(directory, str(entry["rename_prefix"]))
                targets[index] = target
                write_manifest(manifest_path, manifest, fsync)
        done.append((entry, source, target))
        touched.add(directory)
        renamed += 1
    if fsync:
        directories.sync(touched)
    for entry, source, target in done:
        entry["original_path"], entry["path"] = source, target
    manifest["renamed"] = True
    del manifest["plan"]
    write_manifest(manifest_path, manifest, fsync)
    names = [os.path.basename(str(f["path"])) for f in files]
    where = ", ".join(sorted(touched)) or "-"
    print(f"renamed {renamed} file(s) in {where}"
          + (f": {names[0]} .. {names[-1]}" if renamed else "")
          + (f"; {missing} missing or refused" if missing else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rename.py",
                                     description="Rename a complete study batch's files.")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--fsync", action="store_true", help="fsync directories and manifest")
    args = parser.parse_args(argv)
    try:
        return rename_batch(args.manifest.absolute(), args.fsync)
    except (OSError, ValueError, KeyError) as exc:
        print(f"rename failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
