"""Workers: one per association, as a forked process (process_model = fork) or a thread
(process_model = single).  The master sees both the same way: a handle with a file
descriptor that becomes readable when the worker is done (a pidfd, or an eventfd).
"""

import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_ingestd import ipc, outbox, telemetry
from dicom_ingestd.codes import ExitCode
from dicom_ingestd.config.schema import Config
from dicom_ingestd.events import sync_enabled
from dicom_ingestd.peer import Peer
from dicom_ingestd.worker.recorder import Recorder
from dicom_ingestd.worker.session import Session
from dicom_ingestd.worker.store import Store

log = logging.getLogger("dicom_ingestd.master")



@dataclass(frozen=True, slots=True)
class Assignment:
    """Everything one worker needs; nothing else of the master's state reaches it."""

    conn: socket.socket
    peer: Peer  # the client; behind a PROXY protocol balancer, the address it carried
    config: Config
    store: Store
    reject_over_limit: str  # non-empty: the limit that was hit; answer A-ASSOCIATE-RJ
    tls_context: ssl.SSLContext | None = None  # [tls]: the worker does the handshake
    association: str = ""  # unique key of the association (outbox records, study tracking)
    outbox_fd: int = -1  # the outbox directory when [events] are on (outbox.py)
    counters: telemetry.Channel | None = None  # per-association figures for the master


def session_for(assignment: Assignment, channel: ipc.Channel,
                link: ipc.SyncLink | None = None) -> Session:
    """The association handler.  Each stored object's event record goes to the outbox before
    its response (worker/recorder.py), and a datagram to the master over `channel`; with
    events.exec_sync, over its own `link`, the association waits after each object's response
    (as storescp -xs) until the master says the object's jobs are finished."""
    config = assignment.config
    writer = None
    if assignment.outbox_fd >= 0:
        writer = outbox.Writer(assignment.outbox_fd, config.storage.fsync)
    recorder = Recorder(channel, assignment.association, writer, link,
                        float(config.events.exec_sync_timeout))
    return Session(assignment.conn, assignment.peer, config, assignment.store,
                   recorder=recorder, over_limit=assignment.reject_over_limit,
                   tls_context=assignment.tls_context,
                   reporter=telemetry.Reporter(assignment.counters.send, os.getpid())
                   if assignment.counters is not None else None)


@dataclass(eq=False)
class Worker:
    """A running worker as the master sees it."""

    peer: Peer
    started: float
    fd: int  # readable when the worker has finished
    store: Store  # the output directory it writes to (reload may have replaced ours)
    pid: int = 0  # 0 for a thread
    thread: threading.Thread | None = None
    rejecting: bool = False
    signalled: set[int] = field(default_factory=set)
    reply: socket.socket | None = None  # master end of the worker's SyncLink (exec_sync)
    association: str = ""  # Assignment.association

    @property
    def name(self) -> str:
        return f"worker {self.pid}" if self.pid else f"thread {self.thread and self.thread.name}"

    def signal(self, signum: int) -> None:
        """Ask a process worker to stop (threads cannot be signalled; they time out)."""
        if self.pid and signum not in self.signalled:
            self.signalled.add(signum)
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.fd, signum)

    def reap(self) -> str | None:
        """Collect the finished worker; return a description when it did not end cleanly."""
        if self.thread is not None:
            self.thread.join()
            os.close(self.fd)
            return None
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return f"killed by {signal.Signals(sig).name}" + (
                " (core dumped)" if os.WCOREDUMP(status) else "")
        code = os.WEXITSTATUS(status)
        return None if code == ExitCode.OK else f"exited with status {code}"


class ForkSpawner:
    """Fork after accept(): the child serves the association and _exits; never returns."""

    def __init__(self, close_in_child: Callable[[], None], channel: ipc.Channel) -> None:
        self._close_in_child = close_in_child
        self._channel = channel

    def spawn(self, assignment: Assignment) -> Worker:
        link = ipc.SyncLink() if sync_enabled(assignment.config.events) else None
        try:
            pid = os.fork()
        except OSError:
            if link is not None:
                link.close()
            raise
        if pid == 0:  # child
            code = ExitCode.SOFTWARE  # a bug in the association code
            try:
                self._close_in_child()
                if link is not None:
                    link.master_end.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                # The association must finish when the master reloads or Ctrl-C reaches the
                # whole process group; the master decides when a worker must stop.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                session_for(assignment, self._channel, link).run()
                code = ExitCode.OK
            except BaseException:
                with contextlib.suppress(BaseException):
                    log.exception("worker %d (%s): unexpected error", os.getpid(),
                                  assignment.peer)
            finally:
                for handler in logging.getLogger().handlers:
                    with contextlib.suppress(BaseException):
                        handler.flush()
                os._exit(code)
        assignment.conn.close()
        if link is not None:
            link.worker_end.close()
        return Worker(assignment.peer, time.monotonic(), os.pidfd_open(pid), assignment.store,
                      pid=pid,
                      rejecting=bool(assignment.reject_over_limit),
                      reply=link.master_end if link is not None else None,
                      association=assignment.association)


class ThreadSpawner:
    """process_model = single: the association runs in a thread of this process."""

    def __init__(self, channel: ipc.Channel) -> None:
        self._channel = channel

    def spawn(self, assignment: Assignment) -> Worker:
        done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        link = ipc.SyncLink() if sync_enabled(assignment.config.events) else None

        def run() -> None:
            try:
                session_for(assignment, self._channel, link).run()
            finally:
                if link is not None:
                    link.worker_end.close()
                os.eventfd_write(done, 1)

        thread = threading.Thread(target=run, name=f"assoc {assignment.peer.name}", daemon=True)
        worker = Worker(assignment.peer, time.monotonic(), done, assignment.store, thread=thread,
                        rejecting=bool(assignment.reject_over_limit),
                        reply=link.master_end if link is not None else None,
                        association=assignment.association)
        thread.start()
        return worker
