"""A warm worker's life, in the forked process: wait for a connection, serve it, report, and
serve the next one only when this one provably left nothing behind.

The master forks warm workers ahead of demand (pool.py).  Each waits on its control channel
(handoff.py) for an assignment, takes the connection, serves the association with the
configuration it was forked under, and answers how it went.  It serves another only when its
association ended with A-RELEASE, without TLS, without a failed C-STORE, below
workers.max_associations_per_worker, with exactly the descriptors and threads it had when it
became warm and with its memory grown by less than MEMORY_GROWTH; otherwise it exits and the
master forks a fresh one.  A worker whose control channel closes (it was retired by a reload,
a stop or a surplus of idle workers, or the master is gone) exits.
"""

import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import threading
from dataclasses import dataclass

from dicom_ingestd import handoff, ipc
from dicom_ingestd.assignment import Assignment, session_for
from dicom_ingestd.codes import Ending, ExitCode
from dicom_ingestd.config.schema import Config
from dicom_ingestd.dicom import pdu
from dicom_ingestd.handoff import Verdict
from dicom_ingestd.worker.session import Outcome
from dicom_ingestd.worker.store import Store

log = logging.getLogger("dicom_ingestd.master")

# A worker whose resident memory grew more than this since it became warm is not reused:
# Python keeps freed memory in its arenas, so one large re-encoded data set would stay with
# every later association (serving small objects grows a worker by well under 1 MiB).
MEMORY_GROWTH = 16 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Process names (ps, top, /proc/PID/comm): which workers wait and which serve.
IDLE_NAME = b"ingestd-idle"
BUSY_NAME = b"ingestd-assoc"
_PR_SET_NAME = 15


@dataclass(frozen=True, slots=True)
class Generation:
    """What a worker forked now serves under; every applied reload makes a new one."""

    number: int
    config: Config
    store: Store
    tls_context: ssl.SSLContext | None  # [tls]: the worker does the handshake
    outbox_fd: int  # -1 without [events]


@dataclass(frozen=True, slots=True)
class Hygiene:
    """What must be the same after an association for the worker to serve another."""

    descriptors: frozenset[int]
    resident: int  # bytes

    @classmethod
    def now(cls) -> "Hygiene":
        resident = int(os.pread(_statm(), 64, 0).split()[1]) * PAGE_SIZE
        return cls(frozenset(map(int, os.listdir("/proc/self/fd"))), resident)


_STATM: list[int] = []  # [pid, descriptor] of this process's open /proc/self/statm


def _statm() -> int:
    """This process's /proc/PID/statm, opened at its first Hygiene (the baseline, so the
    descriptor is part of it) and kept: a pread at offset 0 reads it anew, one system call
    after each association instead of an open, fstat, ioctl, read and close.  The file names
    the process that opened it, so a forked child opens its own."""
    pid = os.getpid()
    if not _STATM or _STATM[0] != pid:
        _STATM[:] = [pid, os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)]
    return _STATM[1]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()  # loaded in the master, before any fork


def set_name(name: bytes) -> None:
    """Name this process (15 bytes at most) for ps and top; best effort."""
    if _LIBC is not None:
        with contextlib.suppress(Exception):
            _LIBC.prctl(_PR_SET_NAME, name, 0, 0, 0)  # bytes pass as a char *


def own_name() -> bytes:
    """This process's name (what set_name changes)."""
    try:
        with open("/proc/self/comm", "rb") as comm:
            return comm.read().rstrip(b"\n")
    except OSError:
        return b"dicom-ingestd"


def judge(outcome: Outcome, generation: Generation, served: int, baseline: Hygiene) -> Verdict:
    """May this worker serve another association after `outcome`?"""
    if outcome.how is not Ending.RELEASED:
        return Verdict.NOT_RELEASED
    if generation.tls_context is not None:
        return Verdict.TLS
    if outcome.failed:
        return Verdict.FAILED_STORE
    limit = generation.config.workers.max_associations_per_worker
    if limit and served >= limit:
        return Verdict.LAST
    if threading.active_count() != 1:
        return Verdict.THREADS
    now = Hygiene.now()
    # The listing itself holds one more descriptor while it runs, at the same number both
    # times (the lowest free one), so the sets compare as they are.
    if now.descriptors != baseline.descriptors:
        return Verdict.DESCRIPTORS
    if now.resident - baseline.resident > MEMORY_GROWTH:
        return Verdict.MEMORY
    return Verdict.REUSABLE


def reset_signals() -> None:
    """The master's handlers and wake-up descriptor are not ours."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The association must finish when the master reloads or Ctrl-C reaches the whole
    # process group; the master decides when a worker must stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def serve(control: socket.socket, generation: Generation, channel: ipc.Channel,
          counters: ipc.Channel) -> ExitCode:
    """Serve assignments from `control` until told (or allowed) no more; the exit code."""
    reset_signals()
    # Allocated (and its pages touched) now, once per worker, not in each association's
    # critical path; every association's channel takes it and gives it back (pdu.py says why
    # no peer can read another's bytes through it).
    pdu.reserve_buffer()
    baseline = Hygiene.now()
    served = 0
    while True:
        # Wait for the hand-off and read it without taking it (a peek installs no
        # descriptor): one this worker cannot serve stays in its channel, where the master
        # takes it back when this worker has exited and hands the connection on (pool.py).
        try:
            peeked = control.recv(handoff.MAX_MESSAGE, socket.MSG_PEEK)
        except OSError:
            return ExitCode.OK  # the master is gone
        if not peeked:
            return ExitCode.OK
        message = handoff.decode(peeked)
        if not isinstance(message, handoff.Assignment) or message.generation != generation.number:
            log.error("worker %d: unusable assignment %r (generation %d); exiting",
                      os.getpid(), message, generation.number)
            return ExitCode.SOFTWARE
        # Named busy before taking it: a worker still named idle has not taken its
        # connection (its death loses nothing, the master hands the connection on).
        set_name(BUSY_NAME)
        try:
            message, fds, _ = handoff.receive(control)
        except OSError:
            return ExitCode.OK
        if not isinstance(message, handoff.Assignment) or not fds:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            log.error("worker %d: assignment without a connection %r; exiting", os.getpid(),
                      message)
            return ExitCode.SOFTWARE
        conn = socket.socket(fileno=fds[0])
        link = ipc.SyncWait(socket.socket(fileno=fds[1])) if len(fds) > 1 else None
        assignment = Assignment(conn, message.peer, generation.config, generation.store,
                                message.over_limit, generation.tls_context,
                                message.association, generation.outbox_fd, counters)
        try:
            outcome = session_for(assignment, channel, link).run()
        finally:
            if link is not None:
                link.worker_end.close()
        served += 1
        verdict = judge(outcome, generation, served, baseline)
        try:
            handoff.send(control, handoff.Finished(message.association, outcome.how, verdict,
                                                   served))
        except OSError:
            return ExitCode.OK
        if verdict is not Verdict.REUSABLE:
            return ExitCode.OK
        set_name(IDLE_NAME)
