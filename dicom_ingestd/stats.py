"""The daemon's counters: associations by outcome and calling AE, C-STOREs by DIMSE status,
bytes, the commit latency histogram, the last successful store and the last error.

Kept by the master (one `Stats`), fed by the workers' `ipc.AssociationReport`s and by
the master's own observations (refused connections, failed workers, rejected reloads), and
saved atomically (temporary file, fsync, rename) at most once a second while something
changed and at stop, so the counters survive restarts and crashes (a crash loses at most the
last second).  The file is `stats.json` in the output directory's staging directory
(.ingestd-tmp), the daemon's own place on the output file system, which exists whatever the
configuration: `dicom-ingestd status` and `dicom-ingestd metrics` read it when the daemon is
not running.  A per-connection instance (Accept=yes) adds its association to the file itself,
under a lock.

stdlib only; nothing here raises for a missing, unreadable or corrupt file: the counters
start again from zero and say since when (`since`).
"""

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_ingestd.codes import Ending
from dicom_ingestd.ipc import COMMIT_BUCKETS, AssociationReport, bucket_index

log = logging.getLogger("dicom_ingestd.stats")

FILE_NAME = "stats.json"
LOCK_NAME = "stats.lock"
FORMAT = 1
SAVE_INTERVAL = 1.0
# Calling AE titles come from the network: past this many distinct ones, further titles are
# counted together as OTHER_AE, so a peer cycling through titles cannot grow the file or the
# metrics without bound.
MAX_CALLING_AES = 200
OTHER_AE = "(other)"
NO_AE = "-"  # connections that ended before an A-ASSOCIATE-RQ named a calling AE


def status_class(status: int) -> str:
    """success, warning or failure, as PS3.7 classes a C-STORE status."""
    if status == 0:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


@dataclass
class Stats:
    """Counters since `since` (the first start that wrote the file, or a reset)."""

    path: Path | None = None
    since: float = field(default_factory=time.time)
    associations: dict[tuple[str, str], int] = field(default_factory=dict)
    objects: dict[int, int] = field(default_factory=dict)
    bytes_stored: int = 0
    commit_counts: list[int] = field(default_factory=lambda: [0] * (len(COMMIT_BUCKETS) + 1))
    commit_sum: float = 0.0
    last_success: float = 0.0
    last_error: str = ""
    last_error_time: float = 0.0
    dirty: bool = False
    _next_save: float = 0.0

    # -- what happened -------------------------------------------------------------------
    def association_ended(self, outcome: Ending, calling_ae: str) -> None:
        """One association (or refused connection) ended with `outcome`."""
        ae = calling_ae.strip()
        if ae in ("", "?"):  # the session's "?" before an A-ASSOCIATE-RQ
            ae = NO_AE
        if (outcome, ae) not in self.associations and ae not in (NO_AE, OTHER_AE) and \
                len({a for _, a in self.associations}) >= MAX_CALLING_AES:
            ae = OTHER_AE
        self.associations[(outcome, ae)] = self.associations.get((outcome, ae), 0) + 1
        self.dirty = True

    def store_result(self, status: int, size: int = 0, commit_seconds: float | None = None,
                     count: int = 1, when: float | None = None) -> None:
        """`count` C-STOREs answered with `status` (`size` bytes stored in all)."""
        self.objects[status] = self.objects.get(status, 0) + count
        if status == 0:
            self.bytes_stored += size
            self.last_success = max(self.last_success, when or time.time())
        if commit_seconds is not None:
            self.commit_counts[bucket_index(commit_seconds)] += 1
            self.commit_sum += commit_seconds
        self.dirty = True

    def error(self, text: str, when: float | None = None) -> None:
        """The last error an administrator should see (`status`, STATUS=, metrics)."""
        when = when or time.time()
        if when >= self.last_error_time:
            self.last_error, self.last_error_time = text, when
            self.dirty = True

    def merge(self, report: AssociationReport) -> None:
        """Add a worker's report (see telemetry)."""
        for status, count in report.statuses.items():
            self.store_result(status, count=count, when=report.last_success or None)
        self.bytes_stored += report.bytes_stored
        for index, count in enumerate(report.commit_counts):
            self.commit_counts[index] += count
        self.commit_sum += report.commit_sum
        if report.last_success:
            self.last_success = max(self.last_success, report.last_success)
        if report.last_error:
            self.error(f"{report.peer} {report.calling_ae}: {report.last_error}",
                       report.last_error_time)
        if report.outcome is not None:
            self.association_ended(report.outcome, report.calling_ae)
        self.dirty = True

    # -- reading -------------------------------------------------------------------------
    @property
    def stored(self) -> int:
        return self.objects.get(0, 0)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.objects.items() if status_class(s) == "failure")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "since": self.since,
            "associations": [{"outcome": o, "calling_ae": a, "count": n}
                             for (o, a), n in sorted(self.associations.items())],
            "objects": {f"0x{s:04X}": n for s, n in sorted(self.objects.items())},
            "bytes_stored": self.bytes_stored,
            "commit_seconds": {"buckets": list(COMMIT_BUCKETS),
                               "counts": list(self.commit_counts), "sum": self.commit_sum},
            "last_success": self.last_success,
            "last_error": {"time": self.last_error_time, "text": self.last_error},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path | None = None) -> "Stats":
        """Raises ValueError (or KeyError/TypeError) for a malformed document."""
        if raw.get("format") != FORMAT:
            raise ValueError(f"unknown format {raw.get('format')!r}")
        stats = cls(path=path, since=float(raw["since"]))
        for row in raw["associations"]:
            stats.associations[(str(row["outcome"]), str(row["calling_ae"]))] = int(row["count"])
        stats.objects = {int(k, 16): int(v) for k, v in dict(raw["objects"]).items()}
        stats.bytes_stored = int(raw["bytes_stored"])
        commit = raw["commit_seconds"]
        if [float(b) for b in commit["buckets"]] == list(COMMIT_BUCKETS):
            stats.commit_counts = [int(n) for n in commit["counts"]]
            stats.commit_sum = float(commit["sum"])
            if len(stats.commit_counts) != len(COMMIT_BUCKETS) + 1:
                raise ValueError("commit_seconds.counts does not match its buckets")
        stats.last_success = float(raw["last_success"])
        stats.last_error = str(raw["last_error"]["text"])
        stats.last_error_time = float(raw["last_error"]["time"])
        return stats

    # -- the file ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, dir_fd: int | None = None) -> "Stats":
        """The counters saved at `path` (its name under `dir_fd`, the staging directory's
        descriptor, when given); new ones (since now) when there are none."""
        try:
            return cls.from_dict(json.loads(_read(path, dir_fd)), path)
        except FileNotFoundError:
            return cls(path=path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("counters in %s are unreadable (%s); counting from zero", path, exc)
            return cls(path=path)

    def save(self, force: bool = False, clock: Callable[[], float] = time.monotonic,
             dir_fd: int | None = None) -> None:
        """Write the file if something changed (and, unless `force`, a second has passed).

        With `dir_fd` (the staging directory's descriptor) the file is written relative to
        it: never by path, as the staging directory may have been replaced since start-up,
        by a symlink to anywhere."""
        if self.path is None or not self.dirty:
            return
        now = clock()
        if not force and now < self._next_save:
            return
        self._next_save = now + SAVE_INTERVAL
        try:
            write_atomically(self.path, json.dumps(self.to_dict()).encode(), dir_fd)
            self.dirty = False
        except OSError as exc:  # a full or read-only disk: keep counting in memory
            log.debug("cannot save the counters to %s: %s", self.path, exc.strerror or exc)


def _read(path: Path, dir_fd: int | None) -> bytes:
    fd = os.open(path if dir_fd is None else path.name,
                 os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as file:
        return file.read()


def write_atomically(path: Path, data: bytes, dir_fd: int | None = None) -> None:
    """Replace `path` (its name under `dir_fd`, when given) with `data`: a crash leaves the
    old file or the new one, whole."""
    target = path if dir_fd is None else Path(path.name)
    temp = target.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o640, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def add_to_file(path: Path, report: AssociationReport, dir_fd: int | None = None) -> None:
    """A per-connection instance's association, added to the counters in `path` (its name
    under `dir_fd`, when given) under a lock (there is no master to keep them); errors are
    logged at debug and ignored."""
    try:
        fd = os.open(LOCK_NAME if dir_fd is not None else path.with_name(LOCK_NAME),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640,
                     dir_fd=dir_fd)
    except OSError as exc:
        log.debug("cannot count the association in %s: %s", path, exc.strerror or exc)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stats = Stats.load(path, dir_fd)
        stats.merge(report)
        stats.save(force=True, dir_fd=dir_fd)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
