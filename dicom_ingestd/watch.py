"""Watch the configuration file for edits, from a small process of its own.

watchdog's Observer runs threads, and the master must stay thread-free because it forks
workers; so the observer lives in a child process forked before any worker, watching the
file's directory (editors save by writing a new file and renaming it over the old one).
Changes are debounced and announced as one byte on a pipe the master selects on.

Only finished writes count: a file renamed into place, a writer closing the file
(IN_CLOSE_WRITE), or the file deleted.  Creating or modifying it does not, because the
writer may not be done: an announcement 0.3 s after "modified" applied a half-written (or
just truncated, `: > file`) configuration.  What a finished write leaves may still be empty
or cut short; the loader refuses that (config/load.py), and the master keeps the running
configuration and logs why.
"""

import inspect
import logging
import os
import select
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0
DEBOUNCE = 0.3  # seconds of quiet after the last event before announcing a change
_CHANGES = frozenset({"moved", "deleted", "closed"})  # finished writes only (see above)


class ConfigWatcher:
    """Master side: start(), fileno() to select on, drain() after readable, stop()."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.pid = 0
        self._read_fd = -1
        self._write_fd = -1

    def start(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._read_fd, False)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(self._read_fd)
                # Keep nothing of the master's: a listening socket held here would be
                # accepted on by the kernel after the master stopped listening.
                os.closerange(3, self._write_fd)
                os.closerange(self._write_fd + 1, 65536)
                logging.getLogger().setLevel(logging.WARNING)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _watch(self.path, self._write_fd, parent)
                code = 0
            finally:
                os._exit(code)
        self.pid = pid
        os.close(self._write_fd)
        self._write_fd = -1
        # Wait until the watch is in place, so no edit made after READY=1 can be missed.
        ready, _, _ = select.select([self._read_fd], [], [], READY_TIMEOUT)
        if not ready:
            log.warning("the configuration watcher did not start within %.0f s; edits of "
                        "%s are seen only on SIGHUP", READY_TIMEOUT, self.path)
        self.drain()

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> bool:
        """Consume the announcements; True when at least one change was announced."""
        changed = False
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except BlockingIOError:
                return changed
            if not data:
                return changed
            changed = True

    def close_in_child(self) -> None:
        if self._read_fd >= 0:
            os.close(self._read_fd)

    def stop(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1


def _watch(path: Path, out_fd: int, parent: int) -> None:
    """Child process body: observe path's directory until the parent goes away."""
    from watchdog import events
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    state: dict[str, float] = {"last": 0.0}
    target = str(path)

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            # Reading the file (ours included) produces opened/closed_no_write events.
            if event.event_type not in _CHANGES:
                return
            paths: list[Any] = [event.src_path, getattr(event, "dest_path", "")]
            if any(os.fsdecode(p) == target for p in paths if p):
                state["last"] = time.monotonic()

    observer = Observer()
    # Only changes: opening and reading files is the busiest traffic in a directory, e.g. the
    # output directory next to the configuration (as in the quick start), opened for every
    # object.  watchdog >= 4 then leaves those events out of the inotify mask; older versions
    # (Debian 12 has 2.2) have no filter and the handler drops them.
    kwargs: dict[str, Any] = {}
    if "event_filter" in inspect.signature(observer.schedule).parameters:
        kwargs["event_filter"] = [events.FileMovedEvent, events.FileDeletedEvent,
                                  events.FileClosedEvent]
    observer.schedule(Handler(), str(path.parent), recursive=False, **kwargs)
    observer.start()
    os.write(out_fd, b"R")  # ready: the master drains this before serving
    try:
        while os.getppid() == parent:
            time.sleep(0.1)
            last = state["last"]
            if last and time.monotonic() - last >= DEBOUNCE:
                state["last"] = 0.0
                try:
                    os.write(out_fd, b"!")
                except OSError:
                    return
    finally:
        observer.stop()
