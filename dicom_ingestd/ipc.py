"""Worker → master reports, one datagram each on a Unix socket pair made before forking.

Reports are best-effort observations (the master rebuilds nothing from them that the disk
does not hold), so a full or closed channel never blocks or fails an association.  The one
exception is events.exec_sync, where the association must wait for the master: each such
worker reports over a `SyncLink` of its own instead, reliably, and waits for the answer.
"""

import contextlib
import json
import socket
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 16


@dataclass(frozen=True, slots=True)
class Report:
    """What a worker tells the master: 'stored' (with object fields) or 'ended'."""

    kind: str
    pid: int
    fields: dict[str, Any]


def encode(report: Report) -> bytes:
    # Not dataclasses.asdict: it deep-copies the fields, once per stored object.
    return json.dumps({"kind": report.kind, "pid": report.pid, "fields": report.fields},
                      default=str).encode()


def decode(data: bytes) -> Report | None:
    """The report in `data`, or None for a malformed message."""
    try:
        raw = json.loads(data)
        return Report(str(raw["kind"]), int(raw["pid"]), dict(raw["fields"]))
    except (ValueError, KeyError, TypeError):
        return None


class Channel:
    """Both ends: workers `send`, the master `receive`s (non-blocking)."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def send(self, report: Report) -> None:
        data = encode(report)
        if len(data) > MAX_MESSAGE:
            return
        # A full channel loses a statistic, never an object.
        with contextlib.suppress(OSError):
            self.writer.send(data)

    def receive(self) -> list[Report]:
        reports: list[Report] = []
        while True:
            try:
                data = self.reader.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return reports
            report = decode(data)
            if report is not None:
                reports.append(report)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class SyncLink:
    """events.exec_sync: one worker's reliable report-and-wait link to the master.

    A SOCK_SEQPACKET pair made before the worker starts.  The worker sends each "stored"
    report on it (never lost, unlike the shared channel) and blocks until the master answers
    that the object's jobs are finished; the master reads `master_end` in its selector.
    """

    REPLY = b"done"

    def __init__(self) -> None:
        self.worker_end, self.master_end = socket.socketpair(socket.AF_UNIX,
                                                             socket.SOCK_SEQPACKET)

    def report_and_wait(self, report: Report) -> bool:
        """Send `report` and wait for the answer; False if the master is gone."""
        try:
            self.worker_end.send(encode(report))
            return bool(self.worker_end.recv(64))
        except OSError:
            return False

    def close(self) -> None:
        self.worker_end.close()
        self.master_end.close()
