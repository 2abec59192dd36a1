"""The master's side of [events] and [jobs]: study tracking, the job queue and its runner.

The master calls these hooks from its selector loop; each returns quickly and none raises (an
observer never breaks the master: an internal error is logged and the object, already stored
and acknowledged, stays on disk).  Only the master uses this module; forked workers call
`close_in_child()` and never touch the database.

What happens, in storescp's order (storescp.cc storeSCP: executeOnReception, then
executeEndOfStudyEvents, which renames, then runs -xcs):

1. a worker reports a stored object; the tracker adds it to its study's open batch (persisted
   at once, so a crash loses no study) and the reception job is queued;
2. studies the object completed (another study arriving) are closed: a rename job and an
   end-of-study job are queued; both wait for the earlier jobs of their batch (the reception
   jobs, then the rename), so #p/#f of a reception job never points at a renamed file;
3. timeouts close studies at the loop's tick;
4. with events.exec_sync the worker waits until its object's jobs are finished.

State lives in the state directory: jobs.sqlite (see jobs/queue.py) and manifests/N.json, the
JSON list of a closed batch's objects (DICOM_MANIFEST), written when its first job starts.
"""

import contextlib
import functools
import json
import logging
import os
import selectors
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from dicom_ingestd import ipc
from dicom_ingestd.codes import Status
from dicom_ingestd.config.schema import Config
from dicom_ingestd.errors import StorageError
from dicom_ingestd.events import (
    build_argv,
    environment,
    environment_for,
    events_enabled,
    files_variable,
    peer_host,
    placeholder_values,
    tracking_enabled,
)
from dicom_ingestd.jobs import rename
from dicom_ingestd.jobs.queue import DATABASE, Job, JobKind, JobQueue
from dicom_ingestd.jobs.rename import write_manifest
from dicom_ingestd.jobs.runner import JobRunner, process_start
from dicom_ingestd.tracker import (
    Arrival,
    ClosedStudy,
    CloseReason,
    OpenStudy,
    StoredFile,
    StudyTracker,
    batch_label,
)
from dicom_ingestd.worker.naming import rename_prefix

log = logging.getLogger("dicom_ingestd.events")

DEFAULT_STATE_DIRECTORY = ".ingestd-state"
MANIFESTS = "manifests"
PRUNE_INTERVAL = 3600.0

_P = ParamSpec("_P")
_R = TypeVar("_R")


def state_directory(config: Config) -> Path:
    """jobs.state_directory as an absolute path (relative: to storage.output_directory).

    A relative one is not resolved below the output directory: open() refuses it when a
    symlink leads there (rename.open_directory), rather than keeping the job database and
    manifests wherever the link points."""
    root = Path(config.storage.output_directory).resolve()
    path = Path(config.jobs.state_directory or DEFAULT_STATE_DIRECTORY)
    return path.resolve() if path.is_absolute() else Path(os.path.normpath(root / path))


def _observer(default: Any = None) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Log and swallow any error of a hook: events must never stop the master."""
    def wrap(func: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(func)
        def hook(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return func(*args, **kwargs)
            except (OSError, sqlite3.Error) as exc:
                log.error("events: %s failed: %s", func.__name__, exc)
            except Exception:
                log.exception("events: internal error in %s", func.__name__)
            return default  # type: ignore[no-any-return]
        return hook
    return wrap


def _iso(wall: float | None) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat() if wall else ""


def _file(fields: dict[str, Any]) -> StoredFile:
    return StoredFile(str(fields.get("path", "")), str(fields.get("sop_class_uid", "")),
                      str(fields.get("sop_instance_uid", "")),
                      str(fields.get("series_uid", "")), str(fields.get("patient_id", "")),
                      int(fields.get("size", 0) or 0))


class _Reply:
    """A worker's SyncLink (master end) and the jobs its current object waits for."""

    def __init__(self, sock: socket.socket, on_report: Callable[..., None]) -> None:
        self.sock = sock
        self.on_report = on_report
        self.waiting: set[int] | None = None

    def answer(self) -> None:
        self.waiting = None
        with contextlib.suppress(OSError):
            self.sock.send(ipc.SyncLink.REPLY, socket.MSG_DONTWAIT)


class EventService:
    """Everything [events] and [jobs] need in the master (see the module docstring)."""

    def __init__(self, config: Config, selector: selectors.BaseSelector, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.selector = selector
        self._clock = clock
        self._wall = wall
        self.state_dir = state_directory(config)
        self.queue: JobQueue | None = None
        self.runner: JobRunner | None = None
        self.tracker = StudyTracker(config.events.eostudy_timeout, clock, self._previous_batches)
        self._open_ids: dict[str, int] = {}  # study UID -> batch id of its open batch
        self._replies: dict[int, _Reply] = {}  # by fd
        self._next_prune = 0.0

    # -- start -----------------------------------------------------------------------------
    def open(self) -> None:
        """Open the job database when events are configured or jobs are left from an earlier
        run; recover the jobs that were running and the studies that were open.

        Raises StorageError when the state directory cannot be used.
        """
        if self.queue is not None:
            return
        if not events_enabled(self.config.events) and not (self.state_dir / DATABASE).exists():
            return
        try:
            os.close(rename.open_directory(self.state_dir, create=True))  # no symlink on the way
            queue = JobQueue(self.state_dir, durable=self.config.storage.fsync)
            (self.state_dir / MANIFESTS).mkdir(mode=0o750, exist_ok=True)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"state directory {self.state_dir} (jobs.state_directory) is not "
                               f"usable: {exc}", Status.OUT_OF_RESOURCES) from None
        self.queue = queue
        self.runner = JobRunner(queue, self.selector, self.config.jobs, prepare=self._prepare,
                                on_finished=self._job_finished, clock=self._clock,
                                wall=self._wall)
        self._recover()
        queue.commit()

    def _recover(self) -> None:
        assert self.queue is not None
        for job in self.queue.running():
            if job.pid and job.pid_start and process_start(job.pid) == job.pid_start:
                log.warning("job %d: process group %d still runs from before the restart; "
                            "killing it", job.id, job.pid)
                with contextlib.suppress(OSError):
                    os.killpg(job.pid, signal.SIGKILL)
            self.queue.interrupted(job.id, "interrupted: the daemon ended while it ran; runs "
                                   "again")
            log.warning("job %d (%s) was running when the daemon ended; it runs again",
                        job.id, job.kind, extra={"journal": {"JOB_ID": job.id}})
        for batch in self.queue.open_batches():
            files = [_file(f) for f in self.queue.batch_files(batch.id)]
            now = self._clock()
            study = OpenStudy(batch.study_uid, batch.batch, opened=now, last=now, files=files,
                              calling_ae=batch.calling_ae, called_ae=batch.called_ae,
                              peer=batch.peer)
            self.tracker.restore(study)
            self._open_ids[batch.study_uid] = batch.id
            log.info("%s: open with %d object(s) before the restart; tracking it again",
                     batch_label(batch.study_uid, batch.batch), len(files),
                     extra={"journal": {"DICOM_STUDY_UID": batch.study_uid}})
        pending = self.queue.counts().get("pending", 0)
        if pending:
            log.info("%d job(s) pending in %s", pending, self.queue.path)
        if not tracking_enabled(self.config.events):
            self._close_all(CloseReason.DISABLED)

    # -- reports ---------------------------------------------------------------------------
    @_observer()
    def stored(self, report: ipc.Report, reply: int | None = None) -> None:
        """A worker stored an object: track it, queue its jobs (and those of the studies it
        completed); with a `reply` link, answer when those jobs are finished."""
        jobs: list[int] = []
        try:
            if self.queue is not None:
                jobs = self._stored(report.fields, report.pid)
        finally:
            waiter = self._replies.get(reply) if reply is not None else None
            if waiter is not None:
                waiter.waiting = set(jobs)
                if not jobs:
                    waiter.answer()
        if self.runner is not None and jobs:
            self.runner.poke()

    def _stored(self, f: dict[str, Any], pid: int) -> list[int]:
        assert self.queue is not None
        events = self.config.events
        study_uid = str(f.get("study_uid", ""))
        jobs: list[int] = []
        batch = batch_id = 0
        closed: list[ClosedStudy] = []
        if tracking_enabled(events) and study_uid:
            stored = _file(f)
            arrival = Arrival(study_uid, stored, str(f.get("association") or pid),
                              str(f.get("calling_ae", "")), str(f.get("called_ae", "")),
                              str(f.get("peer", "")))
            study, closed = self.tracker.arrive(arrival)
            batch = study.batch
            batch_id = self._open_ids.get(study_uid, 0)
            if not batch_id:
                batch_id = self.queue.open_batch(study_uid, batch, self._wall())
                self._open_ids[study_uid] = batch_id
                if batch > 1:
                    log.info("%s: an object of the study arrived after it was complete; "
                             "batch %d opened", batch_label(study_uid, batch), batch,
                             extra={"journal": {"DICOM_STUDY_UID": study_uid,
                                                "DICOM_BATCH": batch}})
            self.queue.add_file(batch_id, len(study.files), {
                "path": stored.path, "sop_class_uid": stored.sop_class_uid,
                "sop_instance_uid": stored.sop_instance_uid, "series_uid": stored.series_uid,
                "patient_id": stored.patient_id, "size": stored.size},
                arrival.calling_ae, arrival.called_ae, arrival.peer)
        if events.exec_on_reception:
            jobs.append(self._reception_job(f, batch, batch_id))
        for complete in closed:
            jobs += self._closed(complete)
        return jobs

    def _reception_job(self, f: dict[str, Any], batch: int, batch_id: int) -> int:
        assert self.queue is not None
        events, settings = self.config.events, self.config.jobs
        path = str(f.get("path", ""))
        directory, _, name = path.rpartition("/")
        host = peer_host(str(f.get("peer", "")))
        values = placeholder_values(directory or ".", str(f.get("calling_ae", "")),
                                    str(f.get("called_ae", "")), host, filename=name)
        env = environment({
            "DICOM_EVENT": "reception", "DICOM_OUTPUT_DIR": directory or ".",
            "DICOM_FILE": path, "DICOM_FILENAME": name,
            "DICOM_SOP_CLASS_UID": f.get("sop_class_uid"),
            "DICOM_SOP_INSTANCE_UID": f.get("sop_instance_uid"),
            "DICOM_STUDY_UID": f.get("study_uid"), "DICOM_SERIES_UID": f.get("series_uid"),
            "DICOM_PATIENT_ID": f.get("patient_id"), "DICOM_CALLING_AE": f.get("calling_ae"),
            "DICOM_CALLED_AE": f.get("called_ae"), "DICOM_PEER": host,
            "DICOM_BATCH": batch or None})
        env.update(environment_for(values))  # what the shell form's references expand to
        return self.queue.add(
            JobKind.RECEPTION, events.exec_on_reception,
            build_argv(events.exec_on_reception, values, shell=events.shell), env,
            max_attempts=1 + settings.retries, timeout=settings.timeout, now=self._wall(),
            study_uid=str(f.get("study_uid", "")), batch=batch, batch_id=batch_id)

    def _closed(self, study: ClosedStudy) -> list[int]:
        """Record a complete batch and queue its rename and end-of-study jobs."""
        assert self.queue is not None
        events, settings = self.config.events, self.config.jobs
        batch_id = self._open_ids.pop(study.study_uid, 0)
        if not batch_id:
            batch_id = self.queue.open_batch(study.study_uid, study.batch, self._wall())
        self.queue.close_batch(batch_id, str(study.reason), self._wall())
        log.info("%s complete (%s): %d object(s) in %s",
                 batch_label(study.study_uid, study.batch), study.reason, len(study.files),
                 study.directory, extra={"journal": {
                     "DICOM_STUDY_UID": study.study_uid, "DICOM_BATCH": study.batch,
                     "DICOM_EOSTUDY_REASON": str(study.reason)}})
        host = peer_host(study.peer)
        env = environment({
            "DICOM_EVENT": "eostudy", "DICOM_OUTPUT_DIR": study.directory,
            "DICOM_STUDY_UID": study.study_uid, "DICOM_BATCH": study.batch,
            "DICOM_EOSTUDY_REASON": str(study.reason), "DICOM_CALLING_AE": study.calling_ae,
            "DICOM_CALLED_AE": study.called_ae, "DICOM_PEER": host})
        common: dict[str, Any] = {
            "max_attempts": 1 + settings.retries, "timeout": settings.timeout,
            "study_uid": study.study_uid, "batch": study.batch, "batch_id": batch_id}
        values = placeholder_values(study.directory, study.calling_ae, study.called_ae, host)
        env.update(environment_for(values))
        jobs = []
        if events.rename_on_eostudy:
            argv = [sys.executable, "-I", rename.__file__, str(self._manifest_path(batch_id))]
            if self.config.storage.fsync:
                argv.append("--fsync")
            jobs.append(self.queue.add(JobKind.RENAME, ["rename-on-eostudy"], argv, env,
                                       now=self._wall(), **common))
        if events.exec_on_eostudy:
            argv = build_argv(events.exec_on_eostudy, values, shell=events.shell)
            jobs.append(self.queue.add(JobKind.EOSTUDY, events.exec_on_eostudy, argv, env,
                                       now=self._wall(), **common))
        return jobs

    def _close_all(self, reason: CloseReason) -> list[int]:
        jobs: list[int] = []
        for study in self.tracker.close_all(reason):
            jobs += self._closed(study)
        return jobs

    def _previous_batches(self, study_uid: str) -> int:
        return self.queue.closed_batches(study_uid) if self.queue is not None else 0

    # -- manifests ---------------------------------------------------------------------------
    def _manifest_path(self, batch_id: int) -> Path:
        return self.state_dir / MANIFESTS / f"{batch_id}.json"

    def _prepare(self, job: Job) -> dict[str, str]:
        """Extra variables of a run: the batch's manifest (written on first use)."""
        if not job.batch_id or job.kind is JobKind.RECEPTION:
            return {}
        path = self._manifest_path(job.batch_id)
        if not path.exists():
            self._write_manifest(job.batch_id, path)
        extra = {"DICOM_MANIFEST": str(path)}
        if job.kind is JobKind.EOSTUDY:
            files = [str(f["path"]) for f in
                     json.loads(path.read_text(encoding="utf-8"))["files"]]
            extra["DICOM_FILE_COUNT"] = str(len(files))
            listing = files_variable(files)
            if listing is not None:
                extra["DICOM_FILES"] = listing
        return extra

    def _write_manifest(self, batch_id: int, path: Path) -> None:
        assert self.queue is not None
        batch = self.queue.batch(batch_id)
        if batch is None:
            raise OSError(f"batch {batch_id} is no longer in the database")
        files = self.queue.batch_files(batch_id)
        for entry in files:
            entry["rename_prefix"] = rename_prefix(str(entry.get("sop_class_uid", "")))
        last = str(files[-1]["path"]) if files else ""
        write_manifest(path, {
            "study_uid": batch.study_uid, "batch": batch.batch, "reason": batch.reason,
            "directory": last.rsplit("/", 1)[0] if "/" in last else ".",
            "calling_ae": batch.calling_ae, "called_ae": batch.called_ae,
            "peer": peer_host(batch.peer), "opened": _iso(batch.opened),
            "closed": _iso(batch.closed), "renamed": False, "files": files,
        }, self.config.storage.fsync)

    # -- workers -----------------------------------------------------------------------------
    def worker_started(self, reply: socket.socket | None,
                       on_report: Callable[[ipc.Report, int | None], None]) -> None:
        """Watch a new worker's SyncLink (events.exec_sync), if it has one."""
        if reply is None:
            return
        reply.setblocking(False)
        self._replies[reply.fileno()] = _Reply(reply, on_report)
        self.selector.register(reply, selectors.EVENT_READ, self._reply_readable)

    def _reply_readable(self, sock: object) -> None:
        assert isinstance(sock, socket.socket)
        self._drain_reply(sock.fileno())

    def _drain_reply(self, fd: int) -> None:
        entry = self._replies.get(fd)
        if entry is None:
            return
        while True:
            try:
                data = entry.sock.recv(ipc.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop_reply(fd)
                return
            report = ipc.decode(data)
            if report is not None:
                entry.on_report(report, fd)

    def _drop_reply(self, fd: int) -> None:
        entry = self._replies.pop(fd, None)
        if entry is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(entry.sock)
            entry.sock.close()

    @_observer()
    def worker_done(self, reply: socket.socket | None, association: str) -> None:
        """A worker ended: read what its link still holds, forget it, tell the tracker."""
        if reply is not None and reply.fileno() >= 0:
            fd = reply.fileno()
            self._drain_reply(fd)
            self._drop_reply(fd)
        if association:
            self.tracker.association_ended(association)

    def _job_finished(self, job_id: int, final: bool) -> None:
        if not final:
            return
        for entry in self._replies.values():
            if entry.waiting is not None and job_id in entry.waiting:
                entry.waiting.discard(job_id)
                if not entry.waiting:
                    entry.answer()

    # -- the loop ----------------------------------------------------------------------------
    def timeout(self) -> float:
        """Seconds until the next tick is needed (at most 1 s)."""
        moments = [1.0]
        deadline = self.tracker.next_deadline()
        if deadline is not None:
            moments.append(deadline - self._clock())
        if self.runner is not None:
            wait = self.runner.timeout()
            if wait is not None:
                moments.append(wait)
        return max(0.0, min(moments))

    @_observer()
    def tick(self) -> None:
        """Close timed-out studies, supervise and start jobs, commit the loop's writes."""
        if self.queue is None or self.runner is None:
            return
        try:
            if self.tracker.next_deadline() is not None:
                for study in self.tracker.expire():
                    self._closed(study)
                    self.runner.poke()
            self.runner.tick()
            now = self._clock()
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_INTERVAL
                self._prune()
        finally:
            self.queue.commit()

    def _prune(self) -> None:
        assert self.queue is not None
        keep = self.config.jobs.keep_done_days * 86400
        for batch_id in self.queue.prune(self._wall() - keep):
            with contextlib.suppress(OSError):
                self._manifest_path(batch_id).unlink()

    @_observer(default=False)
    def reload(self, config: Config) -> bool:
        """Apply a new configuration: new jobs and studies follow it; queued jobs keep the
        command they were queued with.  jobs.state_directory needs a restart."""
        old = self.config
        self.config = config
        self.tracker.timeout = config.events.eostudy_timeout
        if self.runner is not None:
            self.runner.settings = config.jobs
            self.runner.poke()
        if self.queue is None and events_enabled(config.events):
            try:
                self.open()
            except StorageError as exc:
                log.error("events stay off: %s", exc)
                return False
        if tracking_enabled(old.events) and not tracking_enabled(config.events) \
                and self.queue is not None:
            self._close_all(CloseReason.DISABLED)
            self.queue.commit()
        return True

    # -- stop and fork -----------------------------------------------------------------------
    @_observer()
    def shutdown(self) -> None:
        """At the daemon's stop (no worker left): close or keep the open studies, interrupt
        running jobs (they run again after the restart), close the database."""
        if self.queue is None or self.runner is None:
            return
        try:
            open_studies = self.tracker.open_studies()
            if open_studies and self.config.events.on_stop == "close":
                queued = self._close_all(CloseReason.STOP)
                log.info("closed %d open study batch(es) at stop (events.on_stop = close); "
                         "their %d job(s) run after the restart", len(open_studies), len(queued))
            elif open_studies:
                log.info("%d study batch(es) still open are kept in %s and resume after the "
                         "restart (events.on_stop = persist)", len(open_studies),
                         self.queue.path)
            self.queue.commit()
            self.runner.stop()
            pending = self.queue.counts().get("pending", 0)
            if pending:
                log.info("%d job(s) pending in %s run after the restart", pending,
                         self.queue.path)
        finally:
            for fd in list(self._replies):
                self._drop_reply(fd)
            self.queue.close()
            self.queue = None

    def close_in_child(self) -> None:
        """In a forked worker: close the master's job and link descriptors (the database
        connection is left alone: a worker never touches it)."""
        if self.runner is not None:
            self.runner.close_in_child()
        for entry in self._replies.values():
            with contextlib.suppress(OSError):
                entry.sock.close()
