"""Per-association figures, from the worker that serves the association to whoever counts them.

A leaf (stdlib only) shared by both sides: a worker's `Reporter` tallies each C-STORE it
answers (DIMSE status, bytes, the time its object took to become durable) and hands the
tally on as an `AssociationReport` at most once a second while objects arrive and once when
the association ends; the master merges the reports into `stats.Stats`.  Reports carry
differences since the previous report, so merging is a sum and a lost report loses only its
own figures, never an object: like every worker report they are statistics, best-effort.

The fsync/commit latency is a histogram with fixed bucket bounds (`COMMIT_BUCKETS`), so the
workers' tallies add up in the master without threads or shared memory.
"""

import contextlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_ingestd.codes import Ending

# Upper bounds (seconds) of the commit latency buckets: from the ~0.5 ms fsync of a small
# object on an SSD to the seconds of a large one on a busy disk.  The last bucket is +Inf.
COMMIT_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REPORT_INTERVAL = 1.0  # seconds between progress reports of one association
MAX_MESSAGE = 1 << 16


def bucket_index(seconds: float) -> int:
    """The bucket a latency falls in (len(COMMIT_BUCKETS) for +Inf)."""
    for index, bound in enumerate(COMMIT_BUCKETS):
        if seconds <= bound:
            return index
    return len(COMMIT_BUCKETS)


@dataclass(frozen=True, slots=True)
class AssociationReport:
    """What happened on one association since its previous report.

    `outcome` is None while the association runs, then how it ended.  `statuses` counts the
    C-STORE responses sent by DIMSE status (success included); `commit_counts` has one count
    per COMMIT_BUCKETS bound plus +Inf, not cumulative.  Times are wall-clock seconds.
    """

    pid: int
    peer: str
    calling_ae: str
    outcome: Ending | None = None
    statuses: dict[int, int] = field(default_factory=dict)
    bytes_stored: int = 0
    commit_counts: tuple[int, ...] = ()
    commit_sum: float = 0.0
    last_success: float = 0.0
    last_error: str = ""
    last_error_time: float = 0.0

    def encode(self) -> bytes:
        return json.dumps({
            "pid": self.pid, "peer": self.peer, "calling_ae": self.calling_ae,
            "outcome": self.outcome or "",
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "bytes_stored": self.bytes_stored, "commit_counts": list(self.commit_counts),
            "commit_sum": self.commit_sum, "last_success": self.last_success,
            "last_error": self.last_error, "last_error_time": self.last_error_time,
        }).encode()

    @classmethod
    def decode(cls, data: bytes) -> "AssociationReport | None":
        """The report in `data`, or None for a malformed message."""
        try:
            raw = json.loads(data)
            counts = tuple(int(n) for n in raw["commit_counts"])
            if counts and len(counts) != len(COMMIT_BUCKETS) + 1:
                return None
            return cls(int(raw["pid"]), str(raw["peer"]), str(raw["calling_ae"]),
                       Ending(raw["outcome"]) if raw["outcome"] else None,
                       {int(k): int(v) for k, v in dict(raw["statuses"]).items()},
                       int(raw["bytes_stored"]), counts, float(raw["commit_sum"]),
                       float(raw["last_success"]), str(raw["last_error"]),
                       float(raw["last_error_time"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class Reporter:
    """The worker side: tally one association's C-STOREs, report differences to `sink`."""

    def __init__(self, sink: Callable[[AssociationReport], None], pid: int,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._sink = sink
        self._pid = pid
        self._clock = clock
        self._wall = wall
        self._next = clock() + REPORT_INTERVAL
        self._reset()

    def _reset(self) -> None:
        self._statuses: dict[int, int] = {}
        self._bytes = 0
        self._counts = [0] * (len(COMMIT_BUCKETS) + 1)
        self._sum = 0.0
        self._success = 0.0
        self._error = ""
        self._error_time = 0.0
        self._pending = False

    def store(self, status: int, size: int, commit_seconds: float | None, why: str,
              peer: str, calling_ae: str) -> None:
        """One C-STORE answered with `status`; `commit_seconds` is how long the object took
        to become durable in place (None when it was not placed)."""
        self._statuses[status] = self._statuses.get(status, 0) + 1
        self._pending = True
        if status == 0:
            self._bytes += size
            self._success = self._wall()
        elif why:
            self._error, self._error_time = f"C-STORE 0x{status:04X}: {why}", self._wall()
        if commit_seconds is not None:
            self._counts[bucket_index(commit_seconds)] += 1
            self._sum += commit_seconds
        if self._clock() >= self._next:
            self._send(peer, calling_ae, None)

    def ended(self, outcome: Ending, peer: str, calling_ae: str) -> None:
        """The association is over: report the rest, with how it ended."""
        self._send(peer, calling_ae, outcome)

    def _send(self, peer: str, calling_ae: str, outcome: Ending | None) -> None:
        report = AssociationReport(
            self._pid, peer, calling_ae, outcome, dict(self._statuses), self._bytes,
            tuple(self._counts) if any(self._counts) else (), self._sum, self._success,
            self._error, self._error_time)
        self._reset()
        self._next = self._clock() + REPORT_INTERVAL
        with contextlib.suppress(Exception):  # statistics never fail an association
            self._sink(report)


class Channel:
    """Workers → master: one datagram per report on a socket pair made before forking.

    Non-blocking on both ends: a full channel drops a report (statistics), never blocks an
    association.
    """

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def send(self, report: AssociationReport) -> None:
        data = report.encode()
        if len(data) <= MAX_MESSAGE:
            with contextlib.suppress(OSError):
                self.writer.send(data)

    def receive(self) -> list[AssociationReport]:
        reports: list[AssociationReport] = []
        while True:
            try:
                data = self.reader.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return reports
            report = AssociationReport.decode(data)
            if report is not None:
                reports.append(report)

    def close_reader(self) -> None:
        """In a forked worker: only the writer is needed."""
        self.reader.close()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
