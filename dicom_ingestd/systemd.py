"""systemd integration: inherited sockets (LISTEN_FDS), sd_notify, the native journal protocol.

Everything here is a no-op outside systemd and never raises: a daemon must not fail because
its supervisor is absent.  sd_notify goes through the `sdnotify` package; the journal's native
protocol is a datagram of KEY=value lines, written here because the C-backed bindings
(python3-systemd) are not installable from PyPI without a compiler and libsystemd headers.
"""

import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import ClassVar

import sdnotify

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
JOURNAL_SOCKET = "/run/systemd/journal/socket"


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A socket passed by systemd (or inetd); `listening` tells Accept=no from Accept=yes."""

    sock: socket.socket
    name: str
    listening: bool


def listen_fds(unset_environment: bool = True) -> list[InheritedSocket]:
    """The sockets systemd passed us, per sd_listen_fds(3); [] when none were passed.

    The LISTEN_* variables are removed (so children and job commands do not inherit them)
    and every fd is made close-on-exec.
    """
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    result = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
            listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError as exc:
            log.warning("ignoring inherited fd %d: %s", fd, exc.strerror or exc)
            continue
        name = names[index] if index < len(names) and names[index] else f"fd{fd}"
        result.append(InheritedSocket(sock, name, listening))
    return result


class Notifier:
    """sd_notify(3) messages; silent when NOTIFY_SOCKET is not set."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status = ""
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        # Children must not talk to systemd in our name.
        os.environ.pop("NOTIFY_SOCKET", None)
        os.environ.pop("WATCHDOG_USEC", None)
        os.environ.pop("WATCHDOG_PID", None)

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str = "") -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")


class JournalHandler(logging.Handler):
    """Send records to journald natively, with DICOM_* fields from `extra={"journal": {...}}`.

    Used instead of stderr when stderr is the journal, so `journalctl DICOM_CALLING_AE=X`
    works; on any send failure the record goes to stderr with a <N> prefix instead.
    """

    _PRIORITY: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}

    def __init__(self, identifier: str, fallback: logging.Handler) -> None:
        super().__init__()
        self.identifier = identifier
        self.fallback = fallback
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @staticmethod
    def _field(key: str, value: object) -> bytes:
        data = str(value).encode("utf-8", "replace")
        name = key.encode("ascii")
        if b"\n" in data:
            return name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        return name + b"=" + data + b"\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields: dict[str, object] = {
                "MESSAGE": message,
                "PRIORITY": self._PRIORITY.get(record.levelno, 7),
                "SYSLOG_IDENTIFIER": self.identifier,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,
                "CODE_FUNC": record.funcName,
                "LOGGER": record.name,
                "TID": record.process,
            }
            extra = getattr(record, "journal", None)
            if isinstance(extra, dict):
                fields.update({k: v for k, v in extra.items() if k.isupper()})
            payload = b"".join(self._field(k, v) for k, v in fields.items())
            self._sock.sendto(payload, JOURNAL_SOCKET)
        except OSError:
            self.fallback.handle(record)
        except Exception:  # never let logging kill an association
            self.handleError(record)
