"""The storage commitment spool in the state directory: requests from workers to the master,
reports from the master to whoever delivers them.

Stdlib only.  Layout (STATE is jobs.state_directory):

    STATE/commitment/requests/ID.req   a request, written by the worker that received it
    STATE/commitment/reports/ID.rep    its result, written by the master

A file is written under a temporary name, fsynced (with storage.fsync), renamed into place
and its directory fsynced: it is whole or absent.  A request file is removed once the master
has evaluated it, a report once it is delivered (or, undelivered, with its dead job after
storage_commitment.keep_days); `size()` is what a worker compares with
storage_commitment.max_spool_size before it accepts another request.  The worker's request
is durable before its N-ACTION response (as an object's file and record are before the
C-STORE response), so an accepted request survives a crash and a restart.  IDs start with
the time in nanoseconds and sort in order of arrival.

Both files are text: a JSON header line, then one line per referenced SOP instance,
"CLASS INSTANCE" (validated UIDs never hold a space) and, in a report, the failure reason
in hexadecimal (0000: committed); a request ends with "end COUNT".
"""

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from dicom_ingestd.commitment.dataset import Reference

DIRECTORY = "commitment"
REQUESTS = "requests"
REPORTS = "reports"
REQUEST_SUFFIX = ".req"
REPORT_SUFFIX = ".rep"
_TEMP_PREFIX = ".tmp-"
_END = "end"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class SpoolError(ValueError):
    """A spool file that cannot be read as one (damaged, or not ours)."""


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """What a request file says besides its references."""

    request_id: str
    transaction_uid: str
    calling_ae: str
    called_ae: str
    peer: str
    association: str
    received: float  # wall-clock seconds


@dataclass(frozen=True, slots=True)
class ReportHeader:
    """What a report file says besides its results."""

    request_id: str
    transaction_uid: str
    calling_ae: str  # the requester: the report goes to this AE title
    called_ae: str
    association: str
    event_type: int
    committed: int
    failed: int


class Spool:
    """The spool directories under an open state directory."""

    def __init__(self, fd: int, fsync: bool) -> None:
        self.fd = fd  # STATE/commitment
        self.fsync = fsync
        self.requests = os.open(REQUESTS, _DIR_FLAGS, dir_fd=fd)
        self.reports = os.open(REPORTS, _DIR_FLAGS, dir_fd=fd)

    @classmethod
    def open(cls, state_fd: int, fsync: bool, create: bool) -> "Spool":
        """The spool of the state directory `state_fd` (created if `create`); OSError."""
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(DIRECTORY, 0o750, dir_fd=state_fd)
        fd = os.open(DIRECTORY, _DIR_FLAGS, dir_fd=state_fd)
        try:
            if create:
                for name in (REQUESTS, REPORTS):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o750, dir_fd=fd)
            return cls(fd, fsync)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def beside_outbox(cls, outbox_fd: int, fsync: bool) -> "Spool":
        """A worker's spool: the state directory is the outbox directory's parent (a worker
        is handed the outbox only)."""
        state_fd = os.open("..", _DIR_FLAGS, dir_fd=outbox_fd)
        try:
            return cls.open(state_fd, fsync, create=False)
        finally:
            os.close(state_fd)

    def close(self) -> None:
        for fd in (self.requests, self.reports, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- writing ---------------------------------------------------------------------------
    def _write(self, directory: int, name: str, lines: Iterable[bytes]) -> None:
        temp = _TEMP_PREFIX + name
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS, 0o640,
                     dir_fd=directory)
        try:
            with os.fdopen(os.dup(fd), "wb", buffering=1 << 16) as out:
                for line in lines:
                    out.write(line)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=directory)
            raise
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
        if self.fsync:
            os.fsync(directory)

    def write_request(self, header: RequestHeader, references: Iterable[Reference]) -> None:
        """Write a request durably; its references are consumed as they come (the iterable
        may raise: nothing is left behind then).  Raises OSError."""
        def lines() -> Iterator[bytes]:
            yield _header_line(asdict(header))
            count = 0
            for ref in references:
                count += 1
                yield f"{ref.sop_class_uid} {ref.sop_instance_uid}\n".encode("ascii")
            yield f"{_END} {count}\n".encode("ascii")  # whole: the reader checks it
        self._write(self.requests, header.request_id + REQUEST_SUFFIX, lines())

    def write_report(self, header: ReportHeader,
                     results: Iterable[tuple[Reference, int]]) -> None:
        def lines() -> Iterator[bytes]:
            yield _header_line(asdict(header))
            for ref, reason in results:
                yield f"{ref.sop_class_uid} {ref.sop_instance_uid} {reason:04x}\n" \
                    .encode("ascii")
        self._write(self.reports, header.request_id + REPORT_SUFFIX, lines())

    # -- reading ---------------------------------------------------------------------------
    def request_names(self) -> list[str]:
        """Request files, oldest first (temporary files of a writer are not listed)."""
        return sorted(name for name in os.listdir(self.requests)
                      if name.endswith(REQUEST_SUFFIX) and not name.startswith(_TEMP_PREFIX))

    def report_ids(self) -> list[str]:
        """Request IDs of the reports written (temporary files of a writer are not listed)."""
        return sorted(name[:-len(REPORT_SUFFIX)] for name in os.listdir(self.reports)
                      if name.endswith(REPORT_SUFFIX) and not name.startswith(_TEMP_PREFIX))

    def stale_temporaries(self, directory: int, older_than: float) -> list[str]:
        """Temporary files a writer left in `directory` (killed while writing) before
        `older_than`."""
        found = []
        for name in os.listdir(directory):
            if name.startswith(_TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(name, dir_fd=directory,
                               follow_symlinks=False).st_mtime < older_than:
                        found.append(name)
        return found

    def size(self) -> int:
        """Bytes the files of both directories take (requests, reports, leftovers)."""
        total = 0
        for directory in (self.requests, self.reports):
            for name in os.listdir(directory):
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(name, dir_fd=directory, follow_symlinks=False).st_size
        return total

    def read_request(self, name: str) -> tuple[RequestHeader, list[Reference]]:
        header, rows = _read(self.requests, name)
        try:
            request = RequestHeader(**header)
            end = rows.pop() if rows else []
            refs = [Reference(row[0], row[1]) for row in rows]
        except (TypeError, IndexError):
            raise SpoolError(f"request {name} is not a request file") from None
        if end != [_END, str(len(refs))]:
            raise SpoolError(f"request {name} is incomplete ({len(refs)} references and no "
                             "end line)")
        return request, refs

    def read_report(self, request_id: str) -> tuple[ReportHeader, list[tuple[Reference, int]]]:
        """A report (FileNotFoundError when it is not written yet)."""
        return _report(*_read(self.reports, request_id + REPORT_SUFFIX), request_id)

    def report_exists(self, request_id: str) -> bool:
        return _exists(self.reports, request_id + REPORT_SUFFIX)

    def request_exists(self, request_id: str) -> bool:
        return _exists(self.requests, request_id + REQUEST_SUFFIX)

    def remove_report(self, request_id: str) -> None:
        self.remove(self.reports, request_id + REPORT_SUFFIX)

    def remove(self, directory: int, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=directory)
        if self.fsync:
            os.fsync(directory)


def _exists(directory: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def new_request_id(association: str, number: int) -> str:
    """A request ID: sortable by time, unique (the association key is)."""
    return f"{time.time_ns():020d}-{association}-{number}"


def _header_line(values: dict[str, Any]) -> bytes:
    return json.dumps(values, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def _read(directory: int, name: str) -> tuple[dict[str, Any], list[list[str]]]:
    fd = os.open(name, os.O_RDONLY | _FILE_FLAGS | os.O_NONBLOCK, dir_fd=directory)
    with os.fdopen(fd, "rb") as source:
        first = source.readline()
        try:
            header = json.loads(first)
        except ValueError:
            raise SpoolError(f"{name}: no header line") from None
        if not isinstance(header, dict):
            raise SpoolError(f"{name}: no header line")
        rows = [line.decode("ascii", "replace").split() for line in source]
    return header, rows


def read_report_file(path: str) -> tuple[ReportHeader, list[tuple[Reference, int]]]:
    """A report by path (a delivery job's own process); OSError, SpoolError."""
    directory, _, name = path.rpartition("/")
    fd = os.open(directory or ".", _DIR_FLAGS)
    try:
        header, rows = _read(fd, name)
    finally:
        os.close(fd)
    return _report(header, rows, path)


def _report(header: dict[str, Any], rows: list[list[str]], name: str) \
        -> tuple[ReportHeader, list[tuple[Reference, int]]]:
    try:
        report = ReportHeader(**header)
        results = [(Reference(row[0], row[1]), int(row[2], 16)) for row in rows]
    except (TypeError, IndexError, ValueError):
        raise SpoolError(f"{name} is not a report file") from None
    return report, results
