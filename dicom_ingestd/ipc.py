"""Worker → master reports, one datagram each on a Unix socket pair made before forking.

Reports are best-effort observations (the master rebuilds nothing from them that the disk
does not hold), so a full or closed channel never blocks or fails an association.
"""

import contextlib
import json
import socket
from dataclasses import asdict, dataclass
from typing import Any

MAX_MESSAGE = 1 << 16


@dataclass(frozen=True, slots=True)
class Report:
    """What a worker tells the master: 'stored' (with object fields) or 'ended'."""

    kind: str
    pid: int
    fields: dict[str, Any]


class Channel:
    """Both ends: workers `send`, the master `receive`s (non-blocking)."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def send(self, report: Report) -> None:
        data = json.dumps(asdict(report), default=str).encode()
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
            try:
                raw = json.loads(data)
                reports.append(Report(str(raw["kind"]), int(raw["pid"]), dict(raw["fields"])))
            except (ValueError, KeyError, TypeError):
                continue

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
