"""Associations in progress, as the master sees them, and the thread runner.

An association runs in a warm worker process (process_model = fork: pool.py hands it over,
warm.py serves it) or in a thread of the master (process_model = single: `ThreadRunner`).
The master sees both the same way: `start(assignment)` returns a `Running` record, and the
runner calls back when the association is over, with how it ended and, when its worker died
with it, what happened to the worker.
"""

import contextlib
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_ingestd import ipc
from dicom_ingestd.assignment import Assignment, session_for
from dicom_ingestd.codes import Ending
from dicom_ingestd.event_commands import sync_enabled
from dicom_ingestd.peer import Peer
from dicom_ingestd.worker.store import Store


@dataclass(eq=False)
class Running:
    """An association in progress, as the master sees it."""

    peer: Peer
    association: str
    store: Store  # the output directory it writes to (reload may have replaced ours)
    started: float
    rejecting: bool = False
    reply: socket.socket | None = None  # master end of its SyncLink (events.exec_sync)
    peer_key: str = ""  # its normalised address (workers.max_associations_per_peer)
    pid: int = 0  # the worker process serving it; 0 for a thread
    pidfd: int = -1
    thread: str = ""  # the thread's name (process_model = single)
    signalled: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"worker {self.pid}" if self.pid else f"thread {self.thread}"

    def signal(self, signum: int) -> None:
        """Ask its worker process to stop (threads cannot be signalled; they time out)."""
        if self.pidfd >= 0 and signum not in self.signalled:
            self.signalled.add(signum)
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signum)


# Called when an association is over: (its record, what went wrong with its worker or None,
# how it ended, None when unknown because its worker died).
OnFinished = Callable[[Running, str | None, Ending | None], None]


class ThreadRunner:
    """process_model = single: each association runs in a thread of this process.

    The thread signals its end on an eventfd watched by the master's selector.
    """

    def __init__(self, selector: selectors.BaseSelector, channel: ipc.Channel,
                 on_finished: OnFinished) -> None:
        self._selector = selector
        self._channel = channel
        self._on_finished = on_finished

    def start(self, assignment: Assignment) -> Running:
        done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        link = ipc.SyncLink() if sync_enabled(assignment.config.events) else None
        outcome: list[Ending] = []

        def run() -> None:
            try:
                outcome.append(session_for(assignment, self._channel, link).run().how)
            finally:
                if link is not None:
                    link.worker_end.close()
                os.eventfd_write(done, 1)

        thread = threading.Thread(target=run, name=f"assoc {assignment.peer.name}", daemon=True)
        running = Running(assignment.peer, assignment.association, assignment.store,
                          time.monotonic(), rejecting=bool(assignment.reject_over_limit),
                          reply=link.master_end if link is not None else None,
                          thread=thread.name)

        def finished(_fd: object) -> None:
            self._selector.unregister(done)
            thread.join()
            os.close(done)
            self._on_finished(running, None, outcome[0] if outcome else None)

        self._selector.register(done, selectors.EVENT_READ, finished)
        thread.start()
        return running
