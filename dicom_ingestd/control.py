"""The control socket: `dicom-ingestd reload` and `dicom-ingestd status` ask the running master.

A SOCK_SEQPACKET Unix socket, `control.sock` in the output directory's staging directory
(.ingestd-tmp, the daemon's own directory), mode 0600: only the service user (systemd's
ExecReload= runs as it, in the same sandbox) and root can connect.  One request per
connection, one answer: `{"command": "reload"}` or `{"command": "status"}`, answered with a
JSON object.  The master serves it from its selector, never blocking on a client: requests
and answers are single packets, the answer is sent without waiting, and a connection that
says nothing is closed after REQUEST_TIMEOUT.

Under systemd the socket is also reachable as $RUNTIME_DIRECTORY/control.sock (a symbolic
link, /run/dicom-ingestd/control.sock for the packaged unit), so that ExecReload= finds the
daemon even when the edited configuration no longer says where its output directory is.

A reload requested here is the reload: the master applies or rejects it and answers with the
outcome of exactly this request, so `systemctl reload` cannot report success for a reload
that was rejected.
"""

import contextlib
import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("dicom_ingestd.control")

SOCKET_NAME = "control.sock"
PACKAGED_RUNTIME_LINK = Path("/run/dicom-ingestd") / SOCKET_NAME


def runtime_link() -> Path | None:
    """$RUNTIME_DIRECTORY/control.sock when systemd gave us a runtime directory."""
    directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(directory) / SOCKET_NAME if directory else None
MAX_PACKET = 1 << 20
REQUEST_TIMEOUT = 5.0
MAX_CLIENTS = 8
_SUN_PATH_MAX = 107


class ControlError(Exception):
    """No daemon answered (not running, or another one's socket); the message says why."""


def _address(path: Path) -> tuple[str, int | None]:
    """A path bind()/connect() accept: long paths go through an O_PATH descriptor of the
    directory (/proc/self/fd/N/NAME), as sun_path holds at most 107 bytes."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
        return str(path), None
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{path.name}", fd


class ControlServer:
    """The master's end: handlers by command name, served from the master's selector."""

    def __init__(self, path: Path, selector: selectors.BaseSelector,
                 handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._selector = selector
        self._handlers = handlers
        self._clock = clock
        self._sock: socket.socket | None = None
        self._link: Path | None = None
        self._clients: dict[int, tuple[socket.socket, float]] = {}

    def open(self) -> bool:
        """Bind and listen; False (logged) when it cannot, e.g. another daemon serves the
        same output directory.  The daemon runs without a control socket then."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        address, fd = _address(self.path)
        try:
            if self.path.exists():
                if _alive(address):
                    log.warning("%s: another daemon answers there; this one has no control "
                                "socket (dicom-ingestd reload and status reach the other)",
                                self.path)
                    sock.close()
                    return False
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # left by a daemon that was killed
            old = os.umask(0o177)
            try:
                sock.bind(address)
            finally:
                os.umask(old)
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            log.warning("cannot create the control socket %s: %s; dicom-ingestd reload and "
                        "status will not reach this daemon", self.path, exc.strerror or exc)
            sock.close()
            return False
        finally:
            if fd is not None:
                os.close(fd)
        sock.setblocking(False)
        self._sock = sock
        self._selector.register(sock, selectors.EVENT_READ, self._accept)
        self._link = runtime_link()
        if self._link is not None:
            try:
                with contextlib.suppress(FileNotFoundError):
                    self._link.unlink()
                self._link.symlink_to(self.path)
            except OSError as exc:
                log.debug("cannot link %s to the control socket: %s", self._link, exc)
                self._link = None
        return True

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def _accept(self, _sock: object) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("control socket accept: %s", exc)
                return
            if len(self._clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            self._clients[conn.fileno()] = (conn, self._clock() + REQUEST_TIMEOUT)
            self._selector.register(conn, selectors.EVENT_READ, self._request)

    def _request(self, conn: object) -> None:
        assert isinstance(conn, socket.socket)
        try:
            data = conn.recv(MAX_PACKET)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        answer: dict[str, Any]
        try:
            request = json.loads(data) if data else None
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
            handler = self._handlers.get(str(request.get("command")))
            if handler is None:
                answer = {"error": f"unknown command {request.get('command')!r}"}
            else:
                answer = handler(request)
        except ValueError as exc:
            answer = {"error": f"malformed request: {exc}"}
        if data:
            with contextlib.suppress(OSError):
                conn.send(json.dumps(answer).encode())
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self._clients.pop(conn.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        conn.close()

    def expire(self) -> None:
        """Close connections that sent nothing in time (called from the master's tick)."""
        now = self._clock()
        for conn, deadline in list(self._clients.values()):
            if now >= deadline:
                self._drop(conn)

    def close_in_child(self) -> None:
        """In a forked worker: close the descriptors without touching the file."""
        for conn, _ in self._clients.values():
            conn.close()
        self._clients.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        for conn, _ in list(self._clients.values()):
            self._drop(conn)
        if self._sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._sock)
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()
            if self._link is not None:
                with contextlib.suppress(OSError):
                    self._link.unlink()


def _alive(address: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.settimeout(1.0)
    try:
        probe.connect(address)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def request(path: Path, command: str, timeout: float = 60.0) -> dict[str, Any]:
    """Send `command` to the daemon listening at `path` and return its answer.

    Raises ControlError when no daemon answers (no socket, nobody listening, permission
    denied, no answer within `timeout`).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    try:
        try:
            address, fd = _address(path)
        except OSError as exc:
            raise ControlError(f"{path.parent}: {exc.strerror or exc}") from None
        try:
            sock.connect(address)
        except FileNotFoundError:
            raise ControlError(f"no daemon is running for this configuration (no {path})") \
                from None
        except ConnectionRefusedError:
            raise ControlError(f"no daemon is running for this configuration ({path} is "
                               "left from an earlier one)") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror or exc}") \
                from None
        finally:
            if fd is not None:
                os.close(fd)
        try:
            sock.send(json.dumps({"command": command}).encode())
            data = sock.recv(MAX_PACKET)
        except TimeoutError:
            raise ControlError(f"the daemon at {path} did not answer within {timeout:g} s") \
                from None
        except OSError as exc:
            raise ControlError(f"the daemon at {path}: {exc.strerror or exc}") from None
        if not data:
            raise ControlError(f"the daemon at {path} closed the connection without an "
                               "answer")
        try:
            answer = json.loads(data)
        except ValueError:
            raise ControlError(f"the daemon at {path} answered something unreadable") \
                from None
        if not isinstance(answer, dict):
            raise ControlError(f"the daemon at {path} answered something unreadable")
        return answer
    finally:
        sock.close()
