"""The outbox: a durable record of every acknowledged object, written by the worker that stored
it before it answers, consumed by the master that turns it into study batches and jobs.

A worker appends one record per stored object to the outbox's current segment and, with
storage.fsync, fdatasyncs it before the success status goes out: a response 0x0000 means the
object and its record are both durable.  The master only consumes.  It reads each segment from
the offset it last committed to the job database, in the same transaction as the batches and
jobs it made from the records, so a record is acted on once per database whatever was killed,
paused or full in between.  A worker's wake-up datagram carries no data; it only spares the
master a poll.

A segment is a text file of framed lines, appended with O_APPEND by any number of writers
(the kernel serialises the appends of one file):

    \\n<CRC-32 of the JSON, 8 hex digits> <JSON, ASCII only>\\n

JSON escapes every control and non-ASCII character, so one line holds exactly one record
whatever the values contain, and a torn record (a writer killed mid-write, a power cut) is a
line whose checksum fails: the reader skips it and goes on at the next line.

Writers hold a shared flock on the segment they append to for as long as they have it open.
The master points `current` (a second hard link) at a new segment from time to time, and
removes a segment only while it holds it exclusively (no writer left), after reading all of it,
and once everything made from its records is settled (jobs/service.py decides that).  A writer
that finds its segment unlinked after taking its lock opens `current` again.
"""

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

OUTBOX = "outbox"
CURRENT = "current"
SEGMENT_SUFFIX = ".seg"
MAX_RECORD = 1 << 20  # an object whose identifying values need more is refused (0xA700)
_CHUNK = 4 * MAX_RECORD  # one read; a line longer than this is damage, not a record
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RecordTooLarge(ValueError):
    """The record of an object would exceed MAX_RECORD bytes."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A successfully stored object, as the event path sees it (the worker's view)."""

    path: str  # absolute path of the stored file
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    calling_ae: str
    called_ae: str
    peer: str
    size: int


@dataclass(frozen=True, slots=True)
class ObjectRecord(StoredObject):
    """A stored object's durable record: the object, and what the master needs besides."""

    id: str  # unique among all records ever written to this outbox
    association: str  # the association that stored it (the study tracker's key)
    stored_at: float  # wall-clock seconds

    @classmethod
    def of(cls, obj: StoredObject, record_id: str, association: str,
           stored_at: float) -> "ObjectRecord":
        values = {f.name: getattr(obj, f.name) for f in fields(StoredObject)}
        return cls(**values, id=record_id, association=association, stored_at=stored_at)


_FIELDS = tuple(f.name for f in fields(ObjectRecord))
_TYPES: dict[str, type] = {f.name: f.type for f in fields(ObjectRecord)}  # type: ignore[misc]


def encode(record: ObjectRecord) -> bytes:
    """The framed line of `record`; RecordTooLarge beyond MAX_RECORD."""
    payload = json.dumps({name: getattr(record, name) for name in _FIELDS},
                         ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if len(payload) > MAX_RECORD:
        raise RecordTooLarge(f"the object's record needs {len(payload)} bytes, more than "
                             f"{MAX_RECORD}")
    return b"\n%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> ObjectRecord | None:
    """The record of one line (without its newlines), or None when it is damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        raw = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    values: list[Any] = []
    for name in _FIELDS:
        value = raw.get(name)
        wanted = _TYPES[name]
        if wanted is float and type(value) is int:
            value = float(value)
        if type(value) is not wanted:
            return None
        values.append(value)
    return ObjectRecord(*values)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Records read from a segment: consume them, then commit `end` as the new offset."""

    records: list[ObjectRecord]
    end: int
    damaged: int  # bytes skipped as torn or unreadable


def open_directory(state_fd: int, create: bool) -> int:
    """The outbox directory under an open state directory (created if `create`)."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(OUTBOX, 0o750, dir_fd=state_fd)
    return os.open(OUTBOX, _DIR_FLAGS, dir_fd=state_fd)


class Writer:
    """A worker's appender: one per association, opened at its first record."""

    def __init__(self, directory_fd: int, fsync: bool) -> None:
        self._dir_fd = directory_fd
        self._fsync = fsync
        self._fd = -1

    @property
    def directory_fd(self) -> int:
        """The outbox directory (storage commitment's spool is beside it)."""
        return self._dir_fd

    def _open(self) -> int:
        for _ in range(5):
            # O_NONBLOCK: a FIFO planted as `current` must not hold the association.
            fd = os.open(CURRENT, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, dir_fd=self._dir_fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "the outbox's current segment is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink > 0:
                return fd
            os.close(fd)  # the master removed it between our open and our lock
        raise OSError("the outbox's current segment keeps disappearing")

    def append(self, record: ObjectRecord) -> None:
        """Write `record` (and make it durable with fsync on); raises OSError or
        RecordTooLarge, after which the record may or may not be there."""
        data = encode(record)
        if self._fd < 0:
            self._fd = self._open()
        written = os.write(self._fd, data)
        if written != len(data):
            # A short append (a full disk): the line is torn, and readers skip it.
            raise OSError(f"short write to the outbox ({written} of {len(data)} bytes)")
        if self._fsync:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _lines(data: bytes) -> Iterator[tuple[bytes, int]]:
    """Complete lines of `data` with the offset just past each one's newline."""
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            return
        yield data[start:end], end + 1
        start = end + 1


class Segments:
    """The master's side: segments, reading, rotation and removal."""

    def __init__(self, directory_fd: int, fsync: bool) -> None:
        self.fd = directory_fd
        self._fsync = fsync
        self._readers: dict[str, int] = {}

    # -- listing and reading -----------------------------------------------------------------
    def names(self) -> list[str]:
        """Segment names, oldest first (names start with their creation time); only regular
        files (anything else planted there is in `strays`)."""
        return sorted(entry.name for entry in os.scandir(self.fd)
                      if entry.name.endswith(SEGMENT_SUFFIX)
                      and entry.is_file(follow_symlinks=False))

    def strays(self) -> list[str]:
        """Entries that are neither segments nor ours (for a warning)."""
        ours = {CURRENT, CURRENT + ".new"}
        return sorted(entry.name for entry in os.scandir(self.fd)
                      if entry.name not in ours and not (entry.name.endswith(SEGMENT_SUFFIX)
                                                         and entry.is_file(follow_symlinks=False)))

    def size(self, name: str) -> int:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_size

    def read(self, name: str, offset: int, *, final: bool = False) -> Chunk:
        """Records after `offset`, up to the last complete line; with `final` (no writer
        can append any more) an incomplete last line is skipped as damage."""
        fd = self._readers.get(name)
        if fd is None:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self.fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, f"outbox segment {name} is not a regular file")
            self._readers[name] = fd
        data = os.pread(fd, _CHUNK, offset)
        records: list[ObjectRecord] = []
        damaged = 0
        end = 0
        for line, after in _lines(data):
            if line:
                record = decode(line)
                if record is None:
                    damaged += len(line)
                else:
                    records.append(record)
            end = after
        if end == 0 and len(data) == _CHUNK:
            end = damaged = len(data)  # no newline in a whole chunk: no record is this long
        elif final and len(data) < _CHUNK and end < len(data):
            damaged += len(data) - end
            end = len(data)
        return Chunk(records, offset + end, damaged)

    def forget(self, name: str) -> None:
        fd = self._readers.pop(name, -1)
        if fd >= 0:
            os.close(fd)

    # -- rotation ----------------------------------------------------------------------------
    def current_inode(self) -> int | None:
        try:
            return os.stat(CURRENT, dir_fd=self.fd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            return None

    def ensure_current(self) -> None:
        """Make sure `current` is a regular file with a segment name as well (at start-up and
        at every housekeeping: an administrator may have removed either)."""
        try:
            st = os.stat(CURRENT, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            self.rotate()
            return
        if not stat.S_ISREG(st.st_mode):
            self.rotate()  # replaces what was planted there (a directory stays: an error)
            return
        inode = st.st_ino
        named = {os.stat(n, dir_fd=self.fd, follow_symlinks=False).st_ino for n in self.names()}
        if inode not in named:  # a segment name was removed by hand: keep its records
            os.link(CURRENT, self._new_name(), src_dir_fd=self.fd, dst_dir_fd=self.fd,
                    follow_symlinks=False)
            self._sync_directory()

    def _new_name(self) -> str:
        return f"{time.time_ns():020d}-{os.getpid()}{SEGMENT_SUFFIX}"

    def rotate(self) -> str:
        """Start a new segment and point `current` at it; returns its name."""
        name = self._new_name()
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640, dir_fd=self.fd)
        try:
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(CURRENT + ".new", dir_fd=self.fd)
        os.link(name, CURRENT + ".new", src_dir_fd=self.fd, dst_dir_fd=self.fd,
                follow_symlinks=False)
        os.rename(CURRENT + ".new", CURRENT, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self._sync_directory()
        return name

    def _sync_directory(self) -> None:
        if self._fsync:
            os.fsync(self.fd)

    # -- removal -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Hold `name` with no writer on it (yields False when a writer still has it)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def remove(self, name: str) -> None:
        """Unlink a segment (call inside `exclusive`)."""
        self.forget(name)
        os.unlink(name, dir_fd=self.fd)
        self._sync_directory()

    def close(self) -> None:
        for name in list(self._readers):
            self.forget(name)
