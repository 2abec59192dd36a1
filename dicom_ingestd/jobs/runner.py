"""Runs queued jobs as supervised subprocesses, inside the master's selector loop.

Each run is a `subprocess.Popen` in a new session (so a process group of its own), with stdin
from /dev/null and stdout/stderr on pipes the master reads without blocking: every line goes
to the log (and the journal, with JOB_ID, JOB_KIND, JOB_COMMAND, DICOM_STUDY_UID fields).  The
end of a run is seen on a pidfd and collected with waitpid(pid) -- never waitpid(-1), which
would steal the status of the workers or of other jobs.

Per run: a timeout (jobs.timeout) after which the whole process group gets SIGTERM, then
SIGKILL 5 s later.  Per job: up to 1 + jobs.retries runs, with exponential backoff between
them; after the last failure the job is dead (dead letter).  Each pool (queue.JobPool) has
its own limit of runs at a time: jobs.concurrency for the jobs of [events],
storage_commitment.delivery_concurrency for report deliveries (one per target AE title at a
time); pending jobs start in id order.  A full pool waits for an end of run, never polls.
`stop()` interrupts the runs still going (SIGTERM to their groups, SIGKILL after the grace)
and returns them to pending, so they run again after the restart (at-least-once delivery).

Every change of a job's state is committed before the runner goes on (queue.py).  When the
database cannot take it (a full or failing state file system), a run whose start cannot be
recorded is stopped at once and stays pending, an outcome that cannot be recorded is kept and
written again at every tick, and nothing new starts until the database takes writes again:
the database never says less than what happened, so a job never runs under an id that a
rolled-back insert frees for another.
"""

import contextlib
import logging
import os
import select
import selectors
import shlex
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_ingestd.config.schema import JobsConfig
from dicom_ingestd.jobs.queue import Job, JobPool, JobQueue, JobState
from dicom_ingestd.jobs.reminders import REMINDER_INTERVAL, Reminders
from dicom_ingestd.processes import KILL_GRACE, describe_returncode, start_ticks

log = logging.getLogger("dicom_ingestd.jobs")

MAX_LINE = 8192  # longer output lines are logged in pieces
POLL_INTERVAL = 1.0  # look for due jobs (retries, `jobs retry`) at least this often
RECORD_RETRY = 2.0  # seconds between attempts to write outcomes the database refused
# Failures that repeat every RECORD_RETRY while the state storage fails (reminders.py).
_PREPARE = "prepare"
_START = "record start"


def shown(argv: list[str]) -> str:
    """An argument vector for a log line: shell-quoted, one line."""
    return shlex.join(argv).replace("\n", "\\n")


def backoff(settings: JobsConfig, failures: int) -> float:
    """Seconds to wait after the `failures`-th failed run (1, 2, ...)."""
    delay = float(settings.retry_backoff) * (2 ** max(0, failures - 1))
    return float(min(delay, float(settings.retry_backoff_max)))


def journal_fields(job: Job, **more: object) -> dict[str, object]:
    fields: dict[str, object] = {"JOB_ID": job.id, "JOB_KIND": str(job.kind),
                                 "JOB_COMMAND": job.display}
    if job.study_uid:
        fields["DICOM_STUDY_UID"] = job.study_uid
    transaction = job.env.get("DICOM_TRANSACTION_UID")  # storage commitment reports
    if transaction:
        fields["DICOM_TRANSACTION_UID"] = transaction
    fields.update({k: v for k, v in more.items() if v is not None})
    return {"journal": fields}


@dataclass(eq=False)
class _Stream:
    name: str  # stdout | stderr
    fd: int
    buffer: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class _Run:
    job: Job
    popen: "subprocess.Popen[bytes]"
    pidfd: int
    started: float  # monotonic
    deadline: float | None
    streams: list[_Stream]
    term_at: float | None = None  # when SIGTERM went to the group
    killed: bool = False
    timed_out: bool = False
    interrupted: bool = False  # stopped by us at daemon stop: not the job's failure
    recorded: bool = True  # its start is in the database (else it is still pending there)


class JobRunner:
    """Starts due jobs, watches them, records their outcome in `queue`.

    `prepare(job)` returns extra environment variables for a run; it raises OSError when the
    state storage fails (the job waits, no attempt counted) and LookupError when the job
    cannot run at all (the run fails).  `on_finished(job_id, final)` is called after every
    run; `final` means the job is done or dead (it will not run again by itself).
    """

    def __init__(self, queue: JobQueue, selector: selectors.BaseSelector, settings: JobsConfig,
                 *, prepare: Callable[[Job], dict[str, str]],
                 on_finished: Callable[[int, bool], None], delivery_concurrency: int = 1,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.selector = selector
        self.settings = settings
        self.delivery_concurrency = delivery_concurrency
        self._prepare = prepare
        self._on_finished = on_finished
        self._clock = clock
        self._wall = wall
        self._runs: dict[int, _Run] = {}  # by job id
        self._dirty = True
        self._next_poll = 0.0
        self.launching = True
        # Outcomes the database refused, written again at each tick (oldest first), with
        # what to tell on_finished once written.
        self._unrecorded: list[tuple[Callable[[], None], int, bool | None]] = []
        self._next_record = 0.0
        self._hold_until = 0.0  # no job starts before (the state storage failed us)
        self._reminders = Reminders(clock=clock)

    # -- the loop's hooks --------------------------------------------------------------------
    def poke(self) -> None:
        """Something was queued or finished: look for due jobs at the next tick."""
        self._dirty = True

    def running(self) -> int:
        return len(self._runs)

    def _free(self, pool: JobPool) -> int:
        """Runs `pool` may start now."""
        limit = self.settings.concurrency if pool is JobPool.EVENTS \
            else self.delivery_concurrency
        return limit - sum(1 for run in self._runs.values() if run.job.pool is pool)

    def timeout(self) -> float | None:
        """Seconds until this runner needs a tick (None: no need before the next event).

        With every pool full, only the runs' deadlines count: the end of a run (its pidfd)
        is what frees a slot, so a full runner sleeps instead of polling the queue."""
        now = self._clock()
        moments: list[float] = []
        held = now < self._hold_until or bool(self._unrecorded)
        free = self.launching and any(self._free(pool) > 0 for pool in JobPool)
        if free and self._dirty and not held:
            return 0.0
        for run in self._runs.values():
            if run.term_at is not None:
                moments.append(run.term_at + KILL_GRACE)
            elif run.deadline is not None:
                moments.append(run.deadline)
        if self._unrecorded:
            moments.append(self._next_record)  # nothing starts before that
        elif free:
            moments.append(max(self._next_poll, self._hold_until))
        return max(0.0, min(moments) - now) if moments else None

    def tick(self) -> None:
        now = self._clock()
        for run in list(self._runs.values()):
            if run.term_at is None and run.deadline is not None and now >= run.deadline:
                run.timed_out = True
                log.warning("job %d: timed out after %d s; stopping its process group %d",
                            run.job.id, run.job.timeout, run.popen.pid,
                            extra=journal_fields(run.job))
                self._signal(run, signal.SIGTERM)
                run.term_at = now
            elif run.term_at is not None and not run.killed and now >= run.term_at + KILL_GRACE:
                log.warning("job %d: process group %d still running %d s after SIGTERM; "
                            "sending SIGKILL", run.job.id, run.popen.pid, KILL_GRACE,
                            extra=journal_fields(run.job))
                self._signal(run, signal.SIGKILL)
                run.killed = True
        if self._unrecorded and now >= self._next_record:
            self._write_unrecorded(now)
        if self.launching and not self._unrecorded and now >= self._hold_until \
                and (self._dirty or now >= self._next_poll):
            self._dirty = False
            self._next_poll = now + POLL_INTERVAL
            for pool in JobPool:
                free = self._free(pool)
                if free <= 0:
                    continue
                busy = sorted({run.job.target for run in self._runs.values()
                               if run.job.pool is pool})
                for job in self.queue.due(self._wall(), free, pool, busy):
                    if job.id not in self._runs:
                        self._launch(job)

    # -- one run -----------------------------------------------------------------------------
    def _launch(self, job: Job) -> None:
        attempt = job.attempts + 1
        env = dict(os.environ)
        env.update(job.env)
        env.update(DICOM_JOB_ID=str(job.id), DICOM_JOB_KIND=str(job.kind),
                   DICOM_JOB_ATTEMPT=str(attempt))
        try:
            env.update(self._prepare(job))
        except OSError as exc:
            # The state directory (its manifest) failed us, not the job: no attempt counts.
            count = self._reminders.failed(_PREPARE)
            if count:
                log.error("job %d: cannot prepare its run (%s); it stays pending and no job "
                          "starts for %g s (%d attempt(s) so far; logged again every %d min "
                          "while it lasts)", job.id, exc, RECORD_RETRY, count,
                          REMINDER_INTERVAL // 60, extra=journal_fields(job))
            self._hold_until = self._clock() + RECORD_RETRY
            return
        except (LookupError, ValueError) as exc:  # its batch is gone: the job cannot run
            self._record_failure(job, attempt, f"cannot start: {exc}", 0.0)
            return
        if self._reminders.recovered(_PREPARE):
            log.info("job %d: prepared; the state directory takes writes again", job.id)
        try:
            popen = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, close_fds=True,
                                     start_new_session=True)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._record_failure(job, attempt, f"cannot start: {exc}", 0.0)
            return
        assert popen.stdout is not None and popen.stderr is not None
        pidfd = os.pidfd_open(popen.pid)
        streams = [_Stream("stdout", popen.stdout.fileno()),
                   _Stream("stderr", popen.stderr.fileno())]
        now = self._clock()
        run = _Run(job, popen, pidfd, now, now + job.timeout if job.timeout else None, streams)
        self._runs[job.id] = run
        self.selector.register(pidfd, selectors.EVENT_READ, lambda _fd, r=run: self._exited(r))
        for stream in streams:
            os.set_blocking(stream.fd, False)
            self.selector.register(stream.fd, selectors.EVENT_READ,
                                   lambda _fd, r=run, s=stream: self._output(r, s))
        try:
            self.queue.started(job.id, popen.pid, start_ticks(popen.pid), self._wall())
        except (OSError, sqlite3.Error) as exc:
            count = self._reminders.failed(_START)
            if count:
                log.error("job %d: cannot record its start (%s); stopping it: it stays "
                          "pending and no job starts for %g s (%d attempt(s) so far; logged "
                          "again every %d min while it lasts)", job.id, exc, RECORD_RETRY,
                          count, REMINDER_INTERVAL // 60, extra=journal_fields(job))
            run.interrupted, run.recorded = True, False
            self._signal(run, signal.SIGKILL)
            self._hold_until = now + RECORD_RETRY
            return
        if self._reminders.recovered(_START):
            log.info("job %d: its start is recorded; the job database takes writes again",
                     job.id)
        log.info("job %d (%s%s) started, attempt %d of %d, pid %d: %s", job.id, job.kind,
                 f", study {job.study_uid}" if job.study_uid else "", attempt, job.max_attempts,
                 popen.pid, shown(job.argv),
                 extra=journal_fields(job, JOB_ATTEMPT=attempt, JOB_PID=popen.pid))

    def _signal(self, run: _Run, signum: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(run.popen.pid, signum)

    def _output(self, run: _Run, stream: _Stream) -> None:
        try:
            data = os.read(stream.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_stream(run, stream)
            return
        stream.buffer += data
        self._emit_lines(run, stream, final=False)

    def _emit_lines(self, run: _Run, stream: _Stream, final: bool) -> None:
        buffer = stream.buffer
        while buffer:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) < MAX_LINE and not final:
                    return
                end = min(len(buffer), MAX_LINE)
                line, rest = bytes(buffer[:end]), buffer[end:]
            else:
                line, rest = bytes(buffer[:end]), buffer[end + 1:]
            stream.buffer = buffer = bytearray(rest)
            text = line.decode("utf-8", "replace").rstrip("\r")
            log.log(logging.INFO if stream.name == "stdout" else logging.WARNING,
                    "job %d %s: %s", run.job.id, stream.name, text,
                    extra=journal_fields(run.job, JOB_STREAM=stream.name))

    def _close_stream(self, run: _Run, stream: _Stream) -> None:
        if stream.fd < 0:
            return
        self._emit_lines(run, stream, final=True)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(stream.fd)
        stream.fd = -1  # the Popen file object owns the descriptor and closes it

    def _exited(self, run: _Run) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(run.pidfd)
        os.close(run.pidfd)
        returncode = run.popen.wait()  # waitpid(pid): this job only
        # The process is gone; its output may still sit in the pipes (or a descendant may
        # hold them open): take what is there now, then stop listening.
        for stream in run.streams:
            while stream.fd >= 0:
                try:
                    data = os.read(stream.fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    data = b""
                if not data:
                    break
                stream.buffer += data
                self._emit_lines(run, stream, final=False)
            self._close_stream(run, stream)
        for pipe in (run.popen.stdout, run.popen.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        del self._runs[run.job.id]
        self._dirty = True
        job = run.job
        duration = self._clock() - run.started
        if run.interrupted and not run.recorded:
            return
        if run.interrupted:
            self._record(lambda: self.queue.interrupted(
                job.id, "interrupted by the daemon's stop; runs again after the restart"),
                job.id, None)
            log.info("job %d: interrupted (%s) by the daemon's stop after %.1f s; it runs "
                     "again after the restart", job.id, describe_returncode(returncode), duration,
                     extra=journal_fields(job, JOB_STATUS=describe_returncode(returncode)))
            return
        attempt = job.attempts + 1
        if returncode == 0 and not run.timed_out:
            log.info("job %d finished: exit status 0 after %.2f s", job.id, duration,
                     extra=journal_fields(job, JOB_STATUS="exit status 0",
                                          JOB_DURATION=f"{duration:.3f}", JOB_ATTEMPT=attempt))
            wall = self._wall()
            self._record(lambda: self.queue.finished(job.id, JobState.DONE, "exit status 0",
                                                     wall, attempts=attempt), job.id, True)
            return
        result = describe_returncode(returncode)
        if run.timed_out:
            result = f"timed out after {job.timeout:g} s ({result})"
        self._record_failure(job, attempt, result, duration)

    def _record_failure(self, job: Job, attempt: int, result: str, duration: float) -> None:
        fields = journal_fields(job, JOB_STATUS=result, JOB_DURATION=f"{duration:.3f}",
                                JOB_ATTEMPT=attempt)
        wall = self._wall()
        if attempt < job.max_attempts:
            delay = backoff(self.settings, attempt)
            log.warning("job %d failed: %s after %.2f s; retry %d of %d in %g s", job.id,
                        result, duration, attempt, job.max_attempts - 1, delay, extra=fields)
            self._record(lambda: self.queue.finished(
                job.id, JobState.PENDING, result, wall, attempts=attempt,
                not_before=wall + delay), job.id, False)
        else:
            log.error("job %d failed: %s after %.2f s; dead after %d attempt(s) (re-queue it "
                      "with: dicom-ingestd jobs retry %d)", job.id, result, duration, attempt,
                      job.id, extra=fields)
            self._record(lambda: self.queue.finished(job.id, JobState.DEAD, result, wall,
                                                     attempts=attempt), job.id, True)
        self._dirty = True

    def _record(self, write: Callable[[], None], job_id: int, final: bool | None) -> None:
        """Write an outcome now, or keep it for later if the database refuses it."""
        if not self._unrecorded:
            try:
                write()
            except (OSError, sqlite3.Error) as exc:
                log.error("job %d: cannot record its outcome (%s); trying again every %g s, "
                          "and no job starts until then", job_id, exc, RECORD_RETRY)
                self._next_record = self._clock() + RECORD_RETRY
            else:
                if final is not None:
                    self._on_finished(job_id, final)
                return
        self._unrecorded.append((write, job_id, final))

    def _write_unrecorded(self, now: float) -> None:
        while self._unrecorded:
            write, job_id, final = self._unrecorded[0]
            try:
                write()
            except (OSError, sqlite3.Error):
                self._next_record = now + RECORD_RETRY
                return
            self._unrecorded.pop(0)
            if final is not None:
                self._on_finished(job_id, final)
        log.info("the job database takes writes again; jobs start again")
        self._dirty = True

    def abandon(self) -> None:
        """The database was replaced (it was damaged): stop every run without recording
        anything; the new database knows none of these jobs."""
        for run in self._runs.values():
            run.interrupted, run.recorded = True, False
            self._signal(run, signal.SIGKILL)
        self._unrecorded.clear()
        self._dirty = True

    # -- stop and fork -----------------------------------------------------------------------
    def stop(self, grace: float = KILL_GRACE) -> None:
        """Stop launching; interrupt every run (SIGTERM, SIGKILL after `grace`) and return its
        job to pending.  Blocks until every run is collected."""
        self.launching = False
        if not self._runs:
            return
        log.info("stopping %d running job(s); they run again after the restart",
                 len(self._runs))
        for run in self._runs.values():
            run.interrupted = True
            self._signal(run, signal.SIGTERM)
        deadline = self._clock() + grace
        killed = False
        while self._runs:
            remaining = deadline - self._clock()
            if remaining <= 0 and not killed:
                for run in self._runs.values():
                    log.warning("job %d: process group %d still running %g s after SIGTERM; "
                                "sending SIGKILL", run.job.id, run.popen.pid, grace,
                                extra=journal_fields(run.job))
                    self._signal(run, signal.SIGKILL)
                killed = True
            by_fd = {run.pidfd: run for run in self._runs.values()}
            poller = select.poll()
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(max(0.0, remaining) * 1000 if not killed else 1000):
                self._exited(by_fd[fd])

    def close_in_child(self) -> None:
        """In a forked worker: drop the descriptors of running jobs (never touch them)."""
        for run in self._runs.values():
            with contextlib.suppress(OSError):
                os.close(run.pidfd)
            for stream in run.streams:
                if stream.fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(stream.fd)
