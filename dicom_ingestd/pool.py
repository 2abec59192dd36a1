"""The master's pool of warm workers (process_model = fork).

Forking a worker after accept() put ~9 ms of CPU on every association's critical path (the
fork, the child's copy-on-write faults, its exit).  Like Apache's prefork MPM and gunicorn's
arbiter, the master keeps `workers.spare_workers` idle workers forked ahead of demand and
hands each accepted connection to one of them (handoff.py); a new spare is forked after the
hand-off, off the critical path.  A worker serves another association only when the one it
served ended cleanly (warm.judge), under the configuration generation the pool is at, and
while no more than twice `spare_workers` are idle; otherwise it is retired (its control
channel closed: it exits) and replaced by a fresh fork.

Promises kept from the fork-per-association model:
- a crash in one association never touches another: each association runs in a process of
  its own, never shared with another at the same time;
- a reload makes a new generation: idle workers of the old one are retired at once, so the
  next association is served by a worker forked under the new configuration, while running
  ones finish under the old and are then retired;
- a worker that dies before it took its connection (killed while idle) loses nothing: the
  master keeps a descriptor of the worker's own end of the control channel (its `inbox`), so
  a hand-off the worker never received is still there, connection attached, when its pidfd
  says it died; the master takes it back and hands it to another worker.  (The master closes
  its copy of the connection as soon as it is sent: a worker need not say it took it, which
  spares the master a wake-up per association.)

The pool's descriptors (a control socket, an inbox and a pidfd per worker; the first and the
last in the master's selector) drive it through callbacks, with `maintain()` from the
master's tick.
"""

import contextlib
import gc
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from dicom_ingestd import handoff, ipc, warm
from dicom_ingestd.assignment import Assignment
from dicom_ingestd.codes import ExitCode
from dicom_ingestd.event_commands import sync_enabled
from dicom_ingestd.processes import describe_exit
from dicom_ingestd.running import OnFinished, Running
from dicom_ingestd.warm import Generation

log = logging.getLogger("dicom_ingestd.master")

HANDOFF_TRIES = 3  # fresh workers tried for one connection before giving up on it
# Idle workers beyond workers.spare_workers (left by a burst) retire one per TRIM_INTERVAL
# once no association has started for that long.
TRIM_INTERVAL = 0.5
# A spare that cannot be forked (out of processes, memory or descriptors) is tried again
# after this pause, doubling to FORK_BACKOFF_MAX while it keeps failing.
FORK_BACKOFF_MIN = 0.1
FORK_BACKOFF_MAX = 2.0


def _problem(status: int) -> str | None:
    """A worker's wait status as its lines say it; None for a clean exit.  (A job's outcome,
    stored and shown by `jobs`, says "exit status N"; a worker "exited with status N".)"""
    if os.WIFSIGNALED(status):
        return describe_exit(status)
    code = os.WEXITSTATUS(status)
    return None if code == 0 else f"exited with status {code}"


class State(Enum):
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"  # control channel closed by us: exiting


@dataclass(eq=False)
class Worker:
    """A warm worker process as the master sees it."""

    pid: int
    pidfd: int  # readable once it has exited
    control: socket.socket | None  # master end; None once retired
    generation: Generation
    state: State = State.IDLE
    # The worker's end of the control channel: what was sent and not yet received waits
    # there, descriptors attached (see the module docstring).  Never read unless the worker
    # is dead; closed when it is reaped.
    inbox: socket.socket | None = None
    running: Running | None = None  # the association it serves (BUSY)
    message: handoff.Assignment | None = None  # the hand-off of that association


class WorkerPool:
    """Warm workers: `start()` hands an assignment to one; see the module docstring."""

    def __init__(self, selector: selectors.BaseSelector, close_in_child: Callable[[], None],
                 channel: ipc.Channel, counters: ipc.Channel,
                 on_finished: OnFinished) -> None:
        self._selector = selector
        self._close_in_child = close_in_child
        self._channel = channel
        self._counters = counters
        self._on_finished = on_finished
        self.workers: dict[int, Worker] = {}  # by pid
        self._idle: list[Worker] = []  # the most recently used last: it is taken first
        self.generation: Generation | None = None
        self._sync = False  # events.exec_sync in the generation: a SyncLink per association
        self.stopping = False
        self.forks = 0  # workers forked since start
        self._last_start = 0.0
        self._next_trim = 0.0
        self._fork_backoff = 0.0
        self._next_fork = 0.0
        self._name = warm.own_name()

    # -- what the master asks ----------------------------------------------------------------
    def configure(self, generation: Generation) -> None:
        """Serve new associations under `generation`; idle workers of older ones retire."""
        self.generation = generation
        self._sync = sync_enabled(generation.config.events)  # per generation, not per start
        for worker in list(self._idle):
            if worker.generation is not generation:
                self._retire(worker)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def processes(self) -> int:
        """Worker processes alive or not yet reaped, whatever their state."""
        return len(self.workers)

    def start(self, assignment: Assignment) -> Running:
        """Hand `assignment` to an idle worker of the current generation (forking one if none
        is idle); raises OSError when no worker can be had (fork or pidfd_open failed).

        The hand-off first, the master's records of it after: the client is waiting."""
        generation = self.generation
        assert generation is not None and assignment.config is generation.config
        link = ipc.SyncLink() if self._sync else None
        pending = [assignment.conn] if link is None else [assignment.conn, link.worker_end]
        message = handoff.Assignment(generation.number, assignment.association,
                                     assignment.peer, assignment.reject_over_limit)
        try:
            worker = self._hand_over(pending, message)
        except OSError:
            if link is not None:
                link.close()
            raise
        self._last_start = now = time.monotonic()
        running = Running(assignment.peer, assignment.association, generation.store, now,
                          rejecting=bool(assignment.reject_over_limit),
                          reply=link.master_end if link is not None else None)
        self._busy(worker, running)
        return running

    def fill(self) -> None:
        """Fork every missing spare now (at start, before the daemon says it is ready)."""
        generation = self.generation
        assert generation is not None
        while self.idle < generation.config.workers.spare_workers:
            self._idle.insert(0, self._fork(generation))

    def maintain(self, now: float) -> None:
        """Fork one spare when fewer than workers.spare_workers are idle (called from the
        master's tick: one fork per loop turn keeps accepting responsive in a burst); retire
        one surplus idle worker when quiet."""
        generation = self.generation
        if self.stopping or generation is None:
            return
        spares = generation.config.workers.spare_workers
        if self.idle < spares:
            if now < self._next_fork:
                return
            try:
                self._idle.insert(0, self._fork(generation))
                self._fork_backoff = 0.0
            except OSError as exc:
                # Out of processes, memory or descriptors: the next accept forks on demand
                # and reports it; here only a pause, no line per try.
                self._fork_backoff = min(max(2 * self._fork_backoff, FORK_BACKOFF_MIN),
                                         FORK_BACKOFF_MAX)
                self._next_fork = now + self._fork_backoff
                log.debug("cannot fork a spare worker: %s; next try in %.1f s",
                          exc.strerror or exc, self._fork_backoff)
        elif self.idle > spares and now >= max(self._next_trim,
                                               self._last_start + TRIM_INTERVAL):
            self._next_trim = now + TRIM_INTERVAL
            self._retire(self._idle[0])  # the one idle longest

    def next_maintenance(self, now: float) -> float:
        """Seconds until maintain() has something to do (at most 1)."""
        generation = self.generation
        if self.stopping or generation is None:
            return 1.0
        spares = generation.config.workers.spare_workers
        if self.idle < spares:
            return max(0.0, self._next_fork - now)
        if self.idle > spares:
            return max(0.0, min(1.0, max(self._next_trim, self._last_start + TRIM_INTERVAL)
                                - now))
        return 1.0

    def stop(self) -> None:
        """No more spares; idle workers retire now, busy ones when their association ends."""
        self.stopping = True
        for worker in list(self._idle):
            self._retire(worker)

    def kill_retiring(self) -> None:
        """At the stop deadline: retired workers that have not exited yet are killed."""
        for worker in self.workers.values():
            if worker.state is State.RETIRING:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)

    def close_in_child(self) -> None:
        """In a newly forked worker: every other worker's descriptors are not ours."""
        for worker in self.workers.values():
            if worker.control is not None:
                worker.control.close()
            os.close(worker.pidfd)
            if worker.inbox is not None:
                worker.inbox.close()

    # -- hand-off ----------------------------------------------------------------------------
    def _hand_over(self, pending: list[socket.socket],
                   message: handoff.Assignment) -> Worker:
        """Send `message` with `pending` attached to a worker, and return it (the caller
        makes it _busy).  A worker whose channel is broken (it died while idle, its exit not
        reaped yet) is left to its pidfd and the next one tried: every idle one, then up to
        HANDOFF_TRIES fresh forks (forked on the critical path, as before the pool)."""
        generation = self.generation
        assert generation is not None
        fresh = 0
        while True:
            if self._idle:  # configure() keeps only the current generation idle
                worker = self._idle.pop()
            else:
                worker = self._fork(generation)
                fresh += 1
            assert worker.control is not None
            try:
                handoff.send(worker.control, message, [s.fileno() for s in pending])
            except OSError as exc:
                log.debug("worker %d cannot take a connection (%s); trying another",
                          worker.pid, exc.strerror or exc)
                self._retire(worker)
                if fresh >= HANDOFF_TRIES:
                    raise
                continue
            for sock in pending:  # in flight now: until received, in the worker's inbox
                sock.close()
            worker.state = State.BUSY
            worker.message = message
            return worker

    @staticmethod
    def _busy(worker: Worker, running: Running) -> None:
        worker.running = running
        running.pid, running.pidfd = worker.pid, worker.pidfd

    def _fork(self, generation: Generation) -> Worker:
        master_end, worker_end = handoff.pair()
        # Objects that exist now are never collected in the child: a collection there would
        # write to every one of them and copy the master's heap page by page.
        gc.freeze()
        # Named before the fork, so that no moment shows a worker under the master's name.
        warm.set_name(warm.IDLE_NAME)
        try:
            pid = os.fork()
        except OSError:
            gc.unfreeze()
            warm.set_name(self._name)
            master_end.close()
            worker_end.close()
            raise
        if pid == 0:  # child: never returns
            code = ExitCode.SOFTWARE
            try:
                master_end.close()
                self._close_in_child()
                code = warm.serve(worker_end, generation, self._channel, self._counters)
            except BaseException:
                with contextlib.suppress(BaseException):
                    log.exception("worker %d: unexpected error", os.getpid())
            finally:
                for handler in logging.getLogger().handlers:
                    with contextlib.suppress(BaseException):
                        handler.flush()
                os._exit(code)
        gc.unfreeze()
        warm.set_name(self._name)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            master_end.close()
            worker_end.close()
            raise
        master_end.setblocking(False)
        # worker_end stays blocking: its file status flags are the worker's too.
        worker = Worker(pid, pidfd, master_end, generation, inbox=worker_end)
        self.workers[pid] = worker
        self.forks += 1
        self._selector.register(master_end, selectors.EVENT_READ,
                                lambda _sock: self._drain(worker))
        self._selector.register(pidfd, selectors.EVENT_READ, lambda _fd: self._exited(worker))
        return worker

    def _retire(self, worker: Worker) -> None:
        """Close its control channel: the worker reads the end of it and exits."""
        if worker.state is State.IDLE and worker in self._idle:
            self._idle.remove(worker)
        worker.state = State.RETIRING
        if worker.control is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.control)
            worker.control.close()
            worker.control = None

    # -- what workers say --------------------------------------------------------------------
    def _drain(self, worker: Worker, until_empty: bool = False) -> None:
        """What `worker` said: one message (a worker says one thing per association, and
        the selector calls again while there is more), or all of them (`until_empty`)."""
        while worker.control is not None:
            try:
                message, fds, ended = handoff.receive(worker.control)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                ended, message, fds = True, None, []
            for fd in fds:  # workers never send descriptors
                os.close(fd)
            if ended:
                # It closed its end: its pidfd says how it exited; stop watching this.
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(worker.control)
                return
            if isinstance(message, handoff.Finished) and worker.running is not None:
                self._finished(worker, message)
            else:
                log.error("worker %d sent an unexpected message %r; retiring it", worker.pid,
                          message)
                self._retire(worker)
            if not until_empty:
                return

    def _finished(self, worker: Worker, message: handoff.Finished) -> None:
        running, worker.running = worker.running, None
        worker.message = None
        assert running is not None
        keep = (message.verdict is handoff.Verdict.REUSABLE and not self.stopping
                and worker.generation is self.generation
                and self.idle < 2 * worker.generation.config.workers.spare_workers)
        if keep:
            worker.state = State.IDLE
            self._idle.append(worker)
        else:
            if message.verdict is not handoff.Verdict.REUSABLE \
                    and log.isEnabledFor(logging.DEBUG):
                log.debug("worker %d not reused: %s", worker.pid, message.verdict.describe())
            self._retire(worker)
        self._on_finished(running, None, message.outcome)

    def _exited(self, worker: Worker) -> None:
        self._drain(worker, until_empty=True)  # a Finished it sent before it exited
        self._selector.unregister(worker.pidfd)
        _, status = os.waitpid(worker.pid, 0)
        problem = _problem(status)
        del self.workers[worker.pid]
        state = worker.state
        self._retire(worker)
        running = worker.running
        if running is not None:
            running.pidfd = -1  # closed below; never signal what may reuse its number
        unreceived = self._unreceived(worker) if running is not None else None
        try:
            if running is not None and unreceived is not None:
                self._rescue(worker, running, unreceived, problem)
            elif running is not None:
                self._on_finished(running, problem or "exited during its association", None)
            elif problem is not None and state is State.IDLE:
                log.warning("idle worker %d %s; a new one takes its place", worker.pid,
                            problem)
            elif problem is not None and problem != "killed by SIGKILL":
                log.warning("retired worker %d %s", worker.pid, problem)
        finally:
            os.close(worker.pidfd)
            worker.pidfd = -1
            if worker.inbox is not None:
                worker.inbox.close()
                worker.inbox = None

    @staticmethod
    def _unreceived(worker: Worker) -> list[socket.socket] | None:
        """The descriptors of a dead worker's hand-off still in its inbox (it never received
        it), as sockets; None when there is none."""
        if worker.inbox is None or worker.message is None:
            return None
        try:
            # MSG_DONTWAIT, not a non-blocking socket: the flag is the worker's too.
            message, fds, _ = handoff.receive(worker.inbox, socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError: nothing waits, the worker took it
            return None
        if not isinstance(message, handoff.Assignment) or not fds:
            for fd in fds:
                os.close(fd)
            return None
        return [socket.socket(fileno=fd) for fd in fds]

    def _rescue(self, worker: Worker, running: Running, pending: list[socket.socket],
                problem: str | None) -> None:
        """The worker died before it took its connection (`pending`, the descriptors taken
        back from its inbox): hand it to another one."""
        message = worker.message
        assert message is not None
        generation = self.generation
        assert generation is not None
        if message.generation != generation.number:
            # Reloaded meanwhile: the association has not started, the new configuration
            # is the one for it.
            message = replace(message, generation=generation.number)
            running.store = generation.store
        log.warning("%s: worker %d %s before it took the connection; handing it to another "
                    "worker", running.peer, worker.pid, problem or "exited")
        try:
            self._busy(self._hand_over(pending, message), running)
        except OSError as exc:
            for sock in pending:
                sock.close()
            self._on_finished(running, f"could not be handed to another worker "
                              f"({exc.strerror or exc})", None)
