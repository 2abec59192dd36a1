"""Durable, atomic placement of received objects under the output directory.

The contract: a file appears under its final name only complete and (with fsync on) durable.
Objects are received into a temporary file in a hidden staging directory on the same file
system; `commit` fsyncs it, links or renames it into place relative to directory file
descriptors opened without following symlinks, and fsyncs the directory.  No DICOM here: the
caller decides the relative path (see naming.py).

On ext4 with a journal (storage.sync_directories = "auto") the same guarantee costs one
journal commit instead of two.  The data is written out (sync_file_range, which also
allocates its blocks) before the link, and the file is fsynced after it.  ext4 commits its
one journal in order, and the fsync of an inode whose link count changed commits the
transaction holding the link.  So a crash leaves either no name, or a name on data that was
already on disk (tests/robustness/test_power_cut.py).  Other file systems, XFS included,
keep the two-step recipe: this argument is about ext4's journal.

ext4 without a journal (mkfs -O ^has_journal, as some cloud images ship) has nothing to order
writes, but its fsync of a file that was just given a name also writes that name's directory,
and the directories above it that are new too (ext4_sync_parent: every new directory entry
marks its inode, and fsync follows the inode's newest name up while the mark is set).  The
staging name is created first and the final name linked or renamed last, so the fsync after
it writes the final directory.  The same test checks this on a copy of the disk taken at the
cut; without a journal the start-up line says so.  One window remains, in ext4's design and
not in our code: the mark is cleared before the parent is written, so when two associations
fsync their first files in a brand-new study directory at the same instant, one may be
answered before the other has finished writing that directory's entry.

With fsync on, writeback of a large object starts every WRITEBACK_STEP bytes while it is
received (sync_file_range without waiting), so the disk works while the network delivers, and
the rest starts once the last byte is in (TempFile.finish), so the disk works while the object
is read and named; commit() waits for it (TempFile.settle) before any name points at the file.
"""

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import os
import random
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from dicom_ingestd.codes import Status
from dicom_ingestd.config.schema import StorageConfig
from dicom_ingestd.errors import StorageError
from dicom_ingestd.processes import start_ticks, started_at

STAGING_DIR = ".ingestd-tmp"
SORT_STATE = "sort-state.json"
SORT_STATE_VERSION = 3
SORT_STATE_STUDIES = 256  # studies remembered without events.eostudy_timeout
SORT_NAME_TRIES = 1000  # milliseconds tried after a taken study directory name
TEMP_SUFFIX = ".part"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_counter = itertools.count()
# File systems whose fsync of a file also commits the links made to it before (see above).
ONE_COMMIT_FILE_SYSTEMS = ("ext4",)
_SYNC_FILE_RANGE_WRITE = 2  # start writeback, do not wait
_SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
# A large object's data is handed to the disk in steps while it arrives, so that the disk
# writes while the network delivers, and the final sync has less left to wait for.
WRITEBACK_STEP = 8 << 20


def _load_sync_file_range() -> Callable[[int, int, int, int], None] | None:
    """sync_file_range(2), which Python's os module does not offer."""
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int

    def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if func(fd, offset, nbytes, flags) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))

    return sync_file_range


_sync_file_range = _load_sync_file_range()


def _write_out(fd: int) -> None:
    """Write the file's data to disk and wait for it (allocating its blocks), no commit."""
    assert _sync_file_range is not None
    _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_ALL)


def _no_sync(fd: int) -> None:
    pass


def filesystem_type(fd: int) -> str:
    """The type ("ext4", "xfs", ...) of the file system holding the open file fd, or ""."""
    dev = os.fstat(fd).st_dev
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and "-" in fields:
                    return fields[fields.index("-") + 1]
    except OSError:
        pass
    return ""


def has_journal(fd: int) -> bool:
    """True if the file system holding fd has a jbd2 journal (ext3/ext4 list theirs under
    /proc/fs/jbd2 as DEVICE-8, 8 being the journal's inode).  False when it cannot be told,
    e.g. for an external journal device; for the start-up line only."""
    dev = os.fstat(fd).st_dev
    try:
        device = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    except OSError:
        return False
    return os.path.isdir(f"/proc/fs/jbd2/{device}-8")


def _writer_alive(name: str, mtime: float) -> bool:
    """Could the process that named this temporary file still be writing it?

    A pid alone is not proof: after a restart (or a reboot) the pid may belong to another
    process, so that process must also be a dicom-ingestd process that started before the
    file was last written.
    """
    pid_text = name.split("-", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    started = started_at(int(pid_text))
    if started is None or started > mtime + 1.0:
        return False
    try:  # every writer is a dicom-ingestd master or a fork of one
        with open(f"/proc/{pid_text}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"dicom_ingestd" in cmdline or b"dicom-ingestd" in cmdline


def _read_sort_state(fd: int, key: str) -> dict[str, Any]:
    """The sort state in the open file, or a fresh one (another key, or unreadable: a crash
    while it was written leaves it empty, which forgets directories but mixes nothing, since
    new ones are only ever created)."""
    size = os.fstat(fd).st_size
    try:
        state = json.loads(os.pread(fd, size, 0) or b"{}")
    except ValueError:
        state = {}
    fresh = {"version": SORT_STATE_VERSION, "key": key, "studies": {}}
    if not isinstance(state, dict) or state.get("version") != SORT_STATE_VERSION or \
            state.get("key") != key or not isinstance(state.get("studies"), dict):
        return fresh
    for entry in state["studies"].values():
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float)) and isinstance(entry[2], list)
                and all(isinstance(h, str) for h in entry[2])):
            return fresh
    return state


_own_start: tuple[int, str] = (0, "")  # (pid, its start_ticks): read once per process


def sort_holder() -> str:
    """A new association's name in the sort state: pid, process start, a serial."""
    global _own_start
    pid = os.getpid()
    if _own_start[0] != pid:  # first use in this process (a forked worker: a new pid)
        _own_start = (pid, start_ticks(pid))
    return f"{pid}:{_own_start[1]}:{next(_counter)}"


def _holder_alive(holder: str) -> bool:
    """Is the holder's process still the one that named it?  (Its association may be
    over, but then it released its studies, unless the process died first.)"""
    pid, _, rest = holder.partition(":")
    ticks = rest.partition(":")[0]
    return pid.isdigit() and bool(ticks) and start_ticks(int(pid)) == ticks


def _write_sort_state(fd: int, state: dict[str, Any]) -> None:
    data = json.dumps(state, separators=(",", ":")).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _not_a_regular_file(dir_fd: int, name: str) -> str:
    """"" when the entry `name` is a regular file, else what it is (never followed)."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode):
        return ""
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "a device node")


def _is_safe(part: str) -> bool:
    return part not in ("", ".", "..") and "/" not in part and "\x00" not in part


def _resource_error(exc: OSError, what: str) -> StorageError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return StorageError(f"{what}: {reason}", Status.OUT_OF_RESOURCES)


class TempFile:
    """A file being received.  Writes of network data go straight to it."""

    def __init__(self, staging_fd: int, name: str, staging: Path, one_commit: bool = False,
                 writeback: bool = False, reserved: bool = False) -> None:
        self.name = name
        self._staging = staging
        self._staging_fd = staging_fd
        self._one_commit = one_commit
        self._writeback = writeback and _sync_file_range is not None
        self._written_back = 0  # bytes handed to the disk early (WRITEBACK_STEP)
        self.fsync_after_link = False  # settle() wrote the data out; commit() fsyncs
        self._settle: Callable[[int], None] | None = None  # what settle() still waits for
        # A reserved file (Store.reserve) exists already, empty; any other is created here.
        flags = os.O_TRUNC if reserved else os.O_CREAT | os.O_EXCL
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o644,
                     dir_fd=staging_fd)
        self._file = open(fd, "wb", buffering=1 << 18)  # noqa: SIM115 - closed in close()
        self.size = 0
        self.error: StorageError | None = None

    @property
    def path(self) -> Path:
        # Built on demand: pathlib costs ~15 us a join, and the path is rarely needed.
        return self._staging / self.name

    def open_read(self) -> BinaryIO:
        """The file for reading, opened relative to the staging directory's descriptor
        without following a symlink (never by path: the staging directory may have been
        replaced since start-up).  Call after finish()."""
        fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=self._staging_fd)
        return open(fd, "rb")

    def write(self, data: bytes | memoryview) -> None:
        """Append data; after the first failure, further data is dropped and the error kept.

        The peer keeps sending the rest of the data set whatever happens to the disk, so the
        failure is remembered and answered with the response rather than raised mid-PDU.
        """
        if self.error is not None:
            return
        try:
            self._file.write(data)
            self.size += len(data)
            if self._writeback and self.size - self._written_back >= WRITEBACK_STEP:
                self._file.flush()
                self._start_writeback()
        except OSError as exc:
            self.error = _resource_error(exc, f"cannot write {self.path}")

    def _start_writeback(self) -> None:
        # Only a head start for the final sync, which reports any real error; a file system
        # that refuses sync_file_range just does without.
        assert _sync_file_range is not None
        try:
            _sync_file_range(self._file.fileno(), self._written_back,
                             self.size - self._written_back, _SYNC_FILE_RANGE_WRITE)
        except OSError:
            self._writeback = False
        self._written_back = self.size

    def finish(self, fsync: bool) -> None:
        """The data is complete: flush it; raise StorageError if anything failed.

        With `fsync` the file stays open and its writeback only starts here: the caller
        reads and names the object while the disk writes, and `settle()` (which commit()
        calls before the link) waits for the data.  On the one-commit path that wait only
        writes the data out, and commit() fsyncs the file after the link
        (fsync_after_link); otherwise settle() fsyncs it.  Without `fsync` it is closed.
        """
        if not fsync:
            self._sync_and_close(_no_sync)
            return
        if self._one_commit and _sync_file_range is not None:
            self._settle = _write_out
            self.fsync_after_link = True
        else:
            self._settle = os.fsync
        if self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self.error = _resource_error(exc, f"cannot write {self.path}")
        if self.error is not None:
            self.close()
            raise self.error
        if self._writeback and self.size > self._written_back:
            self._start_writeback()

    def settle(self) -> None:
        """Wait until the data finish() flushed is on disk (a no-op without fsync); raise
        StorageError if it cannot be.  Never link a name to the file before this."""
        sync, self._settle = self._settle, None
        if sync is not None:
            self._sync_and_close(sync, keep_open=self.fsync_after_link)

    def fsync_and_close(self) -> None:
        """The one commit of the ext4 path, after the link: data, inode and new name."""
        self._sync_and_close(os.fsync)

    def _sync_and_close(self, sync: Callable[[int], None], keep_open: bool = False) -> None:
        if self.error is None:
            try:
                self._file.flush()
                sync(self._file.fileno())
            except OSError as exc:
                self.error = _resource_error(exc, f"cannot write {self.path}")
        if self.error is None and keep_open:
            return
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError as exc:
                self.error = self.error or _resource_error(exc, f"cannot write {self.path}")

    def discard(self) -> None:
        """Close and remove the temporary file (never raises)."""
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self._staging_fd)


class WhenTaken(Enum):
    """What `Store.commit` does when every candidate name exists (storage.duplicates)."""

    KEEP = "keep"  # the existing file stands; success (keep-first)
    REJECT = "reject"  # DUPLICATE_SOP_INSTANCE (reject)
    ERROR = "error"  # PROCESSING_FAILURE: no name was free (every other policy)


@dataclass(frozen=True, slots=True)
class Placed:
    """Where an object ended up, and whether an existing file was kept instead."""

    path: str
    kept_existing: bool = False
    directories: tuple[str, ...] = ()  # below the root, and the file's name there
    name: str = ""


class Store:
    """The output directory of one configuration: staging, placement, cleanup."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.root = Path(config.output_directory).resolve()
        self.staging = self.root / STAGING_DIR
        self._root = str(self.root)
        self._root_fd = -1
        self._staging_fd = -1
        self.one_commit = False  # see the module docstring
        self.fs_type = ""

    def open(self) -> None:
        """Open the output directory and create the staging directory.

        Raises StorageError when the directory does not exist or is not writable.
        """
        try:
            self._root_fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            raise StorageError(f"output directory {self.root} is not usable: "
                               f"{exc.strerror}", Status.OUT_OF_RESOURCES) from None
        try:
            # Group-readable (as received files are), so that a consumer's `find` does not
            # stop at it; only the daemon writes there.
            os.mkdir(STAGING_DIR, 0o750, dir_fd=self._root_fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot create {self.staging}: {exc.strerror}",
                               Status.OUT_OF_RESOURCES) from None
        try:
            self._staging_fd = os.open(STAGING_DIR, _DIR_FLAGS, dir_fd=self._root_fd)
        except OSError as exc:
            raise StorageError(f"{self.staging} is not a directory we own: {exc.strerror}",
                               Status.OUT_OF_RESOURCES) from None
        with contextlib.suppress(OSError):  # made 0700 by earlier versions
            if os.fstat(self._staging_fd).st_mode & 0o777 == 0o700:
                os.fchmod(self._staging_fd, 0o750)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"output directory {self.root} is not writable",
                               Status.OUT_OF_RESOURCES)
        self.fs_type = filesystem_type(self._root_fd)
        self.one_commit = (self.config.fsync and self.config.sync_directories == "auto"
                           and _sync_file_range is not None
                           and self.fs_type in ONE_COMMIT_FILE_SYSTEMS)
        if self.fs_type == "ext4" and not has_journal(self._root_fd):
            self.fs_type = "ext4 without a journal"

    @property
    def staging_fd(self) -> int:
        """The staging directory's descriptor (open from `open()` to `close()`): the daemon's
        own files there are reached through it, never by path."""
        return self._staging_fd

    @property
    def durability(self) -> str:
        """How success is made durable, for the start-up line."""
        if not self.config.fsync:
            return "no fsync (storage.fsync = false)"
        if self.one_commit and self.fs_type == "ext4":
            return "fsync, one journal commit per object (ext4)"
        if self.one_commit:
            return (f"fsync, one fsync per object ({self.fs_type}, whose fsync of a new file "
                    "also writes the directories naming it)")
        return f"fsync of file and directory ({self.fs_type or 'unknown file system'})"

    def close(self) -> None:
        for fd in (self._staging_fd, self._root_fd):
            if fd >= 0:
                os.close(fd)
        self._staging_fd = self._root_fd = -1

    def remove_leftovers(self, owner_pid: int | None = None) -> int:
        """Delete temporary files of one (finished) worker pid, or of every dead process.

        Names start with the writer's pid, so a second daemon or a per-connection instance
        sharing the directory never loses a file it is still writing.
        """
        removed = 0
        prefix = f"{owner_pid}-" if owner_pid is not None else ""
        for entry in os.scandir(self._staging_fd):
            if not (entry.name.startswith(prefix) and entry.name.endswith(TEMP_SUFFIX)):
                continue
            if owner_pid is None:
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if _writer_alive(entry.name, mtime):
                    continue
            try:
                os.unlink(entry.name, dir_fd=self._staging_fd)
                removed += 1
            except OSError:
                pass
        return removed

    def temp_file(self, reserved: str = "") -> TempFile:
        """A new temporary file named after our pid (for crash cleanup): the `reserved` one
        (Store.reserve) when given and still there, else one created exclusively now."""
        if reserved:
            try:
                return TempFile(self._staging_fd, reserved, self.staging, self.one_commit,
                                writeback=self.config.fsync, reserved=True)
            except OSError:  # gone (removed by hand), or no descriptor: try a new one
                self.unreserve(reserved)
        try:
            return TempFile(self._staging_fd, self._temp_name(), self.staging,
                            self.one_commit, writeback=self.config.fsync)
        except OSError as exc:
            raise _resource_error(exc, f"cannot create a file in {self.staging}") from None

    def reserve(self) -> str:
        """Create a temporary file ahead of its object and close it: the name, for
        temp_file() to open (an inode costs 0.1-0.5 ms on ext4; a reopen a few µs).  Nothing
        stays open meanwhile, so a waiting association keeps no file system busy (a
        read-only remount still succeeds).  Raises StorageError."""
        name = self._temp_name()
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=self._staging_fd))
        except OSError as exc:
            raise _resource_error(exc, f"cannot create a file in {self.staging}") from None
        return name

    def unreserve(self, name: str) -> None:
        """Remove a file reserve() made and temp_file() did not take (never raises)."""
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=self._staging_fd)

    def _temp_name(self) -> str:
        # The random part keeps a restarted daemon whose pid was reused off the names of
        # leftovers; `random` (reseeded in each forked child) spares a getrandom() per object.
        return f"{os.getpid()}-{next(_counter)}-{random.getrandbits(32):08x}{TEMP_SUFFIX}"

    def study_directory(self, key: str, study_uid: str, new_name: Callable[[int], str],
                        holder: str, *, idle: float = 0.0) -> str:
        """The directory of a study under storescp's "current study" sorting (-ss, -sp),
        shared by every association, worker and daemon using this output directory.

        storescp keeps one "current study" per process: an object of another study than the
        last one starts a new directory.  Run per association (storescp --fork, or our
        workers before issue 16), parallel associations spread one study over many
        directories, and two studies named in the same millisecond share one.  Here a state
        file in the staging directory, under an exclusive lock, maps each open study to its
        directory and to the running associations (`holder`s) that stored objects of it:

        * an object of an open study goes to that study's directory;
        * an object of any other study gets a new directory, created here under the lock,
          named `new_name(0)` (the time of its first object) or, when that name is taken on
          disk or by another study, `new_name(1)`, `new_name(2)`, ... (a millisecond later
          each), so two studies never share one;
        * it also closes, as storescp's change of study does, every other open study that no
          running association has stored objects of (release_studies, or its process gone);
        * a study with no object for `idle` seconds (events.eostudy_timeout, then complete)
          is closed whatever holds it.

        Used one association at a time this is storescp's rule; used by many at once, each
        study stays in one directory.  `key` identifies the sorting configuration (a change
        of it closes every study).  Raises OSError when the state file or the directory
        cannot be written.
        """
        with self._sort_state(key) as state:
            studies: dict[str, list[Any]] = state["studies"]
            now = time.time()
            for uid, (_dir, used, holders) in list(studies.items()):
                holders[:] = [h for h in holders if h == holder or _holder_alive(h)]
                if idle and now - used > idle:
                    del studies[uid]
            entry = studies.get(study_uid)
            if entry is None:
                taken = {str(d) for d, _used, _holders in studies.values()}
                entry = studies[study_uid] = [self._new_study_directory(new_name, taken),
                                              now, []]
            for uid in [u for u, (_d, _u, holders) in studies.items()
                        if u != study_uid and not holders]:
                del studies[uid]  # storescp: a change of study ends the last one
            if now - entry[1] >= 1.0:  # a second's precision is enough for `idle`
                entry[1] = now
            if holder not in entry[2]:
                entry[2].append(holder)
            if len(studies) > SORT_STATE_STUDIES:
                for uid in sorted(studies, key=lambda u: studies[u][1])[
                        :len(studies) - SORT_STATE_STUDIES]:
                    del studies[uid]
            return str(entry[0])

    def release_studies(self, key: str, holder: str) -> None:
        """An association ends: it holds its studies open no more (see study_directory)."""
        with self._sort_state(key) as state:
            for _dir, _used, holders in state["studies"].values():
                if holder in holders:
                    holders.remove(holder)

    @contextlib.contextmanager
    def _sort_state(self, key: str) -> Iterator[dict[str, Any]]:
        """The sort state, locked; written back when the block ends without an error."""
        fd = os.open(SORT_STATE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600,
                     dir_fd=self._staging_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = _read_sort_state(fd, key)
            before = json.dumps(state)
            yield state
            if json.dumps(state) != before:  # most objects change nothing
                _write_sort_state(fd, state)
        finally:
            os.close(fd)  # releases the lock

    def _new_study_directory(self, new_name: Callable[[int], str], taken: set[str]) -> str:
        for step in range(SORT_NAME_TRIES):
            name = new_name(step)
            if name in taken or not _is_safe(name):
                continue
            try:
                os.mkdir(name, 0o755, dir_fd=self._root_fd)
            except FileExistsError:  # another study's (or anything else): never shared
                continue
            if self.config.fsync:
                os.fsync(self._root_fd)
            return name
        raise OSError(errno.EEXIST, f"no free study directory name after {SORT_NAME_TRIES} "
                      f"tries from {new_name(0)}")

    def has_free_space(self) -> bool:
        """False when the reserve storage.min_free_space is not available."""
        if not self.config.min_free_space:
            return True
        st = os.statvfs(self._root_fd)
        return st.f_bavail * st.f_frsize >= self.config.min_free_space

    def _open_subdirs(self, parts: list[str], fsync: bool) -> int:
        """Open (creating as needed) the directory chain below the root, never via symlinks."""
        fd = os.dup(self._root_fd)
        for part in parts:
            try:
                os.mkdir(part, 0o777, dir_fd=fd)  # the umask decides (storage.group_write)
                if fsync:
                    os.fsync(fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            finally:
                os.close(fd)
            fd = child
        return fd

    def commit(self, temp: TempFile, directories: list[str], candidates: Sequence[str], *,
               replace: bool, when_taken: WhenTaken) -> Placed:
        """Move a finished temporary file into place under the root, durably.

        `directories` are the subdirectory components and `candidates` the file names to try
        in order; every component must already be a safe name (naming.py).  With `replace` the
        first candidate is atomically replaced if it exists (storescp's behaviour); otherwise
        a candidate is only ever created, never replaced (link() refuses existing names), and
        when every candidate exists `when_taken` decides (WhenTaken).
        Raises StorageError with the DIMSE status to answer; the temporary file is gone either
        way.
        """
        for part in [*directories, candidates[0]]:
            if not _is_safe(part):
                temp.discard()
                raise StorageError(f"refusing unsafe path component {part!r}",
                                   Status.PROCESSING_FAILURE)
        fsync = self.config.fsync
        sync_directories = fsync and not temp.fsync_after_link
        try:
            dir_fd = self._open_subdirs(directories, sync_directories)
        except OSError as exc:
            temp.discard()
            raise _resource_error(exc, f"cannot create {'/'.join(directories)}") from None
        placed: str | None = None
        try:
            temp.settle()  # the data on disk before any name points at it
            if replace:
                os.rename(temp.name, candidates[0], src_dir_fd=self._staging_fd,
                          dst_dir_fd=dir_fd)
                placed = candidates[0]
            else:
                placed = self._link_first_free(temp, candidates, dir_fd)
            if placed is not None:
                if temp.fsync_after_link:
                    temp.fsync_and_close()
                elif sync_directories:
                    os.fsync(dir_fd)
        except (OSError, StorageError) as exc:
            temp.discard()
            if placed is not None:  # never leave a name whose data or link may not be durable
                with contextlib.suppress(OSError):
                    os.unlink(placed, dir_fd=dir_fd)
            os.close(dir_fd)
            if isinstance(exc, StorageError):
                raise
            raise _resource_error(exc, f"cannot store {'/'.join([*directories, candidates[0]])}") \
                from None
        # What holds the name we did not take: only a regular file can be the object
        # (keep-first's "kept", reject's "duplicate"); a symlink, directory or FIFO is not.
        not_an_object = _not_a_regular_file(dir_fd, candidates[0]) if placed is None else ""
        os.close(dir_fd)
        if replace:
            temp.close()  # renamed: no staging name left to remove
        else:
            temp.discard()
        if placed is None:
            existing = os.path.join(self._root, *directories, candidates[0])
            if not_an_object:
                raise StorageError(f"{existing} exists and is {not_an_object}, not a stored "
                                   "object: the object was not stored (nothing replaced)",
                                   Status.PROCESSING_FAILURE)
            if when_taken is WhenTaken.KEEP:
                return Placed(existing, kept_existing=True)
            status = (Status.DUPLICATE_SOP_INSTANCE if when_taken is WhenTaken.REJECT
                      else Status.PROCESSING_FAILURE)
            raise StorageError(f"{existing} exists", status)
        return Placed(os.path.join(self._root, *directories, placed),
                      directories=tuple(directories), name=placed)

    def withdraw(self, placed: Placed) -> None:
        """Remove a file `commit` just placed, when what must accompany its success (its
        event record) could not be made; best effort, never through symlinks."""
        if not placed.name:
            return
        fd = os.dup(self._root_fd)
        try:
            for part in placed.directories:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
            os.unlink(placed.name, dir_fd=fd)
            if self.config.fsync:
                os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _link_first_free(self, temp: TempFile, candidates: Sequence[str],
                         dir_fd: int) -> str | None:
        for candidate in candidates:
            if not _is_safe(candidate):
                break
            try:
                os.link(temp.name, candidate, src_dir_fd=self._staging_fd, dst_dir_fd=dir_fd,
                        follow_symlinks=False)
            except FileExistsError:
                continue
            return candidate
        return None
