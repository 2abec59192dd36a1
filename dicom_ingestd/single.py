"""process_model = "single": one process serving each association in a thread.

The association code (worker/session.py) has no global state, so threads are only a way to
serve several peers at once; a forked worker runs the very same Session.
"""

import logging
import os
import selectors
import signal
import socket
import threading
import time
from types import FrameType

from dicom_ingestd.config.schema import Config
from dicom_ingestd.sockets import describe
from dicom_ingestd.worker.session import Session, peer_name
from dicom_ingestd.worker.store import Store

log = logging.getLogger("dicom_ingestd.server")

STOP_TIMEOUT = 30.0  # seconds running associations may take to finish on SIGTERM


class SingleProcessServer:
    """Accept loop with one thread per association; stops gracefully on SIGTERM/SIGINT."""

    def __init__(self, config: Config, store: Store, listeners: list[socket.socket]) -> None:
        self.config = config
        self.store = store
        self.listeners = listeners
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._wakeup_r, self._wakeup_w = socket.socketpair()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping.set()
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        selector = selectors.DefaultSelector()
        for sock in self.listeners:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        selector.register(self._wakeup_r, selectors.EVENT_READ)
        log.info("listening on %s as %s, storing under %s",
                 ", ".join(describe(s) for s in self.listeners), self.config.network.aetitle,
                 self.store.root)
        while not self._stopping.is_set():
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj is self._wakeup_r:
                    continue
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                try:
                    conn, address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    log.error("accept failed: %s", exc.strerror or exc)
                    continue
                conn.setblocking(True)
                self._start(conn, peer_name(address))
        for sock in self.listeners:
            sock.close()
        self._drain()

    def _start(self, conn: socket.socket, peer: str) -> None:
        session = Session(conn, peer, self.config, self.store)
        thread = threading.Thread(target=self._run, args=(session,), name=f"assoc {peer}",
                                  daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run(self, session: Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _drain(self) -> None:
        with self._lock:
            running = list(self._threads)
        if running:
            log.info("stopping: waiting up to %.0f s for %d running association(s)",
                     STOP_TIMEOUT, len(running))
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = len(self._threads)
        if left:
            removed = self.store.remove_leftovers(os.getpid())
            log.warning("stopping with %d association(s) still running; %d partial "
                        "object(s) discarded", left, removed)
        log.info("stopped")
