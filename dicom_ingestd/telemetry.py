"""Per-association figures, from the worker that serves the association to whoever counts them.

A worker's `Reporter` tallies each C-STORE it answers (DIMSE status, bytes, the time its
object took to become durable) and hands the tally on as an `ipc.AssociationReport` at most
once a second while objects arrive and once when the association ends; the master merges the
reports into `stats.Stats` (a per-connection instance adds them to the counters' file itself).
Reports carry differences since the previous report, so merging is a sum and a lost report
loses only its own figures, never an object: like every worker report they are statistics,
best-effort.  stdlib only.
"""

import contextlib
import time
from collections.abc import Callable

from dicom_ingestd.codes import Ending
from dicom_ingestd.ipc import COMMIT_BUCKETS, MAX_STATUSES, AssociationReport, bucket_index

REPORT_INTERVAL = 1.0  # seconds between progress reports of one association


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
        count = self._statuses.get(status, 0)
        if not count and len(self._statuses) >= MAX_STATUSES:
            self._send(peer, calling_ae, None)  # a report holds so many statuses at most
        self._statuses[status] = count + 1
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
