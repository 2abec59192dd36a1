"""The master's side of [events] and [jobs]: the outbox consumer, study tracking, the job queue
and its runner.

The master calls these hooks from its selector loop; each returns quickly and none raises (an
internal error is logged, the state is rebuilt from the database, and the records it was
working on are read again).  Only the master uses this module; forked workers call
`close_in_child()` and never touch the database.

The event path (outbox.py): a worker makes each stored object's record durable in the outbox
before it acknowledges the object.  The master consumes the records, in storescp's order
(storescp.cc storeSCP: executeOnReception, then executeEndOfStudyEvents, which renames, then
runs -xcs):

1. each record adds its object to its study's open batch and queues its reception job; the
   records of one read, their batches, their jobs and the new outbox offset are one
   transaction, so a record is acted on exactly once per database;
2. studies the object completed (another study arriving) are closed: a rename job and an
   end-of-study job are queued; both wait for the earlier jobs of their batch (the reception
   jobs, then the rename), so #p/#f of a reception job never points at a renamed file;
3. timeouts close studies at the loop's tick;
4. with events.exec_sync the worker waits (bounded) until its object's jobs are finished.

Nothing depends on the master being fast or alive: records written while it is paused, killed
or restarting are read when it runs again (a worker's datagram only wakes it sooner).  When a
write to the database fails (a full, read-only or failing state file system), the transaction
is rolled back, the in-memory state is rebuilt from what was committed and the records are
read again later.  A damaged database is moved aside (a critical log line names it) and a new
one is built from the outbox segments still kept: a segment is removed only once everything
made from its records is settled, so the new database gets every open batch and unfinished
job back (finished jobs of the kept segments run again: delivery is at least once).

State lives in the state directory: jobs.sqlite (see jobs/queue.py), outbox/ (outbox.py) and
manifests/NAME.json, the JSON list of a closed batch's objects (DICOM_MANIFEST), written
atomically from the database before the batch's first job starts.  NAME is random per batch,
so a manifest is never another batch's, whatever happened to the database.
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

from dicom_ingestd import ipc, outbox
from dicom_ingestd.codes import Status
from dicom_ingestd.commitment.spool import Spool
from dicom_ingestd.config.schema import Config
from dicom_ingestd.dcmtk.modalities import rename_prefix
from dicom_ingestd.errors import StorageError
from dicom_ingestd.event_commands import (
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
from dicom_ingestd.jobs.commitment import Commitments, records_wanted
from dicom_ingestd.jobs.queue import DATABASE, Job, JobKind, JobQueue, is_corrupt
from dicom_ingestd.jobs.rename import write_manifest
from dicom_ingestd.jobs.runner import JobRunner
from dicom_ingestd.processes import start_ticks
from dicom_ingestd.tracker import (
    Arrival,
    ClosedStudy,
    CloseReason,
    OpenStudy,
    StoredFile,
    StudyTracker,
    batch_label,
)

log = logging.getLogger("dicom_ingestd.events")

DEFAULT_STATE_DIRECTORY = ".ingestd-state"
MANIFESTS = "manifests"
PRUNE_INTERVAL = 3600.0
HOUSEKEEPING_INTERVAL = 5.0  # rotate and remove settled outbox segments
ROTATE_BYTES = 8 << 20  # start a new outbox segment past this size ...
ROTATE_AGE = 600.0  # ... or when the current one is this old and not empty
CONSUME_INTERVAL = 0.05  # a wake-up is acted on within this (records of many objects at once)
POLL_INTERVAL = 1.0  # the outbox is read at least this often (lost wake-ups, orphan workers)
ERROR_LOG_INTERVAL = 30.0  # the same failure is logged again at most this often
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

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


def _iso(wall: float | None) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat() if wall else ""


def _file(fields: dict[str, Any]) -> StoredFile:
    return StoredFile(str(fields.get("path", "")), str(fields.get("sop_class_uid", "")),
                      str(fields.get("sop_instance_uid", "")),
                      str(fields.get("series_uid", "")), str(fields.get("patient_id", "")),
                      int(fields.get("size", 0) or 0))


def _observer(func: Callable[_P, None]) -> Callable[_P, None]:
    """A hook of the master's loop: an unexpected error is logged and the service's state is
    rebuilt from the database (the first argument is the service)."""
    @functools.wraps(func)
    def hook(*args: _P.args, **kwargs: _P.kwargs) -> None:
        service = args[0]
        assert isinstance(service, EventService)
        try:
            func(*args, **kwargs)
        except Exception as exc:
            service._failed(func.__name__, exc)
    return hook


class _Link:
    """A worker's SyncLink (master end, events.exec_sync) and what it waits for."""

    def __init__(self, sock: socket.socket, association: str) -> None:
        self.sock = sock
        self.association = association
        self.jobs: dict[str, set[int]] = {}  # record id -> its unfinished jobs
        self.waiting: dict[str, set[int]] = {}  # record ids asked for -> jobs left

    def answer(self, record_id: str) -> None:
        self.waiting.pop(record_id, None)
        with contextlib.suppress(OSError):
            self.sock.send(record_id.encode("ascii", "replace"), socket.MSG_DONTWAIT)


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
        self.segments: outbox.Segments | None = None
        self.commitments: Commitments | None = None  # storage commitment (jobs/commitment.py)
        self._state_fd = -1
        self.tracker = StudyTracker(config.events.eostudy_timeout, clock, self._previous_batches)
        self._open_ids: dict[str, int] = {}  # study UID -> batch id of its open batch
        self._offsets: dict[str, int] = {}  # outbox segment -> bytes consumed (committed)
        self._live: set[str] = set()  # associations of this master's running workers
        self._configs: dict[str, Config] = {}  # the configuration each one runs under
        self._links: dict[int, _Link] = {}  # by fd
        self._link_of: dict[str, _Link] = {}  # by association
        self._next_prune = 0.0
        self._next_housekeeping = 0.0
        self._rotated = clock()
        self._logged: dict[str, float] = {}  # failure text -> when last logged
        self.stored = 0  # records consumed since start
        self._wanted = False  # a worker woke us: consume within CONSUME_INTERVAL
        self._consumed_at = 0.0

    # -- start -----------------------------------------------------------------------------
    def open(self) -> None:
        """Open the state directory (job database, outbox, manifests) when events are
        configured or state is left from an earlier run; recover the jobs that were running
        and the studies that were open; read what the outbox holds.

        Raises StorageError when the state directory cannot be used.
        """
        if self.queue is not None:
            return
        if not self._records_wanted(self.config) \
                and not (self.state_dir / DATABASE).exists() \
                and not (self.state_dir / outbox.OUTBOX).exists():
            return
        try:
            fresh = not self.state_dir.exists()
            # No symlink on the way (rename.open_directory): the job database and manifests
            # stay where the configuration says.
            self._state_fd = rename.open_directory(self.state_dir, create=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(MANIFESTS, 0o750, dir_fd=self._state_fd)
            self.segments = outbox.Segments(outbox.open_directory(self._state_fd, create=True),
                                            self.config.storage.fsync)
            self.segments.ensure_current()
            self.commitments = Commitments(
                Spool.open(self._state_fd, self.config.storage.fsync, create=True),
                self.state_dir, self.state_dir / MANIFESTS, clock=self._clock, wall=self._wall)
            queue = self._open_database(first_id=0 if fresh else int(self._wall() * 1000))
        except (OSError, sqlite3.Error) as exc:
            self._close_files()
            raise StorageError(f"state directory {self.state_dir} (jobs.state_directory) is not "
                               f"usable: {exc}", Status.OUT_OF_RESOURCES) from None
        self.queue = queue
        self.runner = JobRunner(
            queue, self.selector, self.config.jobs, prepare=self._prepare,
            on_finished=self._job_finished,
            delivery_concurrency=self.config.storage_commitment.delivery_concurrency,
            clock=self._clock, wall=self._wall)
        self._recover_running()
        self._rebuild()
        self.consume()
        assert self.commitments is not None
        # No association runs yet: reports held for one of an earlier run go out now.
        self.commitments.association_ended(queue, None)
        if not tracking_enabled(self.config.events):
            self._close_all(CloseReason.DISABLED)

    def _open_database(self, first_id: int) -> JobQueue:
        """The job database; a damaged one is moved aside and replaced by a new one."""
        durable = self.config.storage.fsync
        try:
            queue = JobQueue(self.state_dir, durable=durable, first_id=first_id)
            problem = queue.check()
            if problem == "ok":
                return queue
            queue.close()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            problem = str(exc)
        self._move_aside(problem)
        return JobQueue(self.state_dir, durable=durable, first_id=int(self._wall() * 1000))

    def _move_aside(self, problem: str) -> str:
        """Rename a damaged database (and its WAL) out of the way; returns the new name."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        moved = f"{DATABASE}.damaged-{stamp}-{os.getpid()}"
        os.rename(DATABASE, moved, src_dir_fd=self._state_fd, dst_dir_fd=self._state_fd)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(DATABASE + suffix, moved + suffix, src_dir_fd=self._state_fd,
                          dst_dir_fd=self._state_fd)
        if self.config.storage.fsync:
            os.fsync(self._state_fd)
        kept = len(self.segments.names()) if self.segments is not None else 0
        log.critical("job database %s is damaged (%s); moved it to %s and built a new one "
                     "from the %d outbox segment(s) kept; jobs and study batches recorded only "
                     "in the damaged file are not rebuilt (inspect it with sqlite3)",
                     self.state_dir / DATABASE, problem, self.state_dir / moved, kept,
                     extra={"journal": {"DICOM_DAMAGED_DATABASE": str(self.state_dir / moved)}})
        return moved

    def _replace_database(self, exc: BaseException) -> None:
        """The database turned out damaged while serving: move it aside, start a new one and
        read the outbox into it again."""
        assert self.queue is not None and self.runner is not None
        self.runner.abandon()
        self.queue.close()
        self.queue = None
        self._release_waits()
        self._move_aside(str(exc))
        queue = JobQueue(self.state_dir, durable=self.config.storage.fsync,
                         first_id=int(self._wall() * 1000))
        self.queue = self.runner.queue = queue
        self._offsets = {}
        self._rebuild()
        self.consume()

    def _recover_running(self) -> None:
        assert self.queue is not None
        for job in self.queue.running():
            if job.pid and job.pid_start and start_ticks(job.pid) == job.pid_start:
                log.warning("job %d: process group %d still runs from before the restart; "
                            "killing it", job.id, job.pid)
                with contextlib.suppress(OSError):
                    os.killpg(job.pid, signal.SIGKILL)
            self.queue.interrupted(job.id, "interrupted: the daemon ended while it ran; runs "
                                   "again")
            log.warning("job %d (%s) was running when the daemon ended; it runs again",
                        job.id, job.kind, extra={"journal": {"JOB_ID": job.id}})
        pending = self.queue.counts().get("pending", 0)
        if pending:
            log.info("%d job(s) pending in %s", pending, self.queue.path)

    def _rebuild(self, quiet: bool = False) -> None:
        """The in-memory state (open studies, outbox offsets) from the database."""
        assert self.queue is not None
        self.tracker = StudyTracker(self.config.events.eostudy_timeout, self._clock,
                                    self._previous_batches)
        self._open_ids = {}
        self._offsets = self.queue.offsets()
        for link in self._links.values():
            link.jobs.clear()
        for batch in self.queue.open_batches():
            files = [_file(f) for f in self.queue.batch_files(batch.id)]
            now = self._clock()
            study = OpenStudy(batch.study_uid, batch.batch, opened=now, last=now, files=files,
                              calling_ae=batch.calling_ae, called_ae=batch.called_ae,
                              peer=batch.peer)
            self.tracker.restore(study)
            self._open_ids[batch.study_uid] = batch.id
            if not quiet:
                log.info("%s: open with %d object(s) before the restart; tracking it again",
                         batch_label(batch.study_uid, batch.batch), len(files),
                         extra={"journal": {"DICOM_STUDY_UID": batch.study_uid}})

    # -- failures ----------------------------------------------------------------------------
    def _failed(self, what: str, exc: BaseException) -> None:
        """A step failed and was rolled back: log it (not in a loop), rebuild the in-memory
        state from the database; a damaged database is replaced."""
        if self.queue is not None and is_corrupt(exc):
            try:
                self._replace_database(exc)
            except Exception as again:
                self._log_failure(f"cannot replace the damaged job database: {again}")
            return
        if isinstance(exc, (OSError, sqlite3.Error)):
            self._log_failure(f"{what} failed: {exc}; retrying (the outbox keeps every record)")
        else:
            log.exception("events: internal error in %s", what)
        if self.queue is not None:
            try:
                self._rebuild(quiet=True)
            except (OSError, sqlite3.Error) as again:
                self._log_failure(f"cannot read the job database: {again}")

    def _log_failure(self, text: str) -> None:
        now = self._clock()
        if now - self._logged.get(text, -ERROR_LOG_INTERVAL) >= ERROR_LOG_INTERVAL:
            self._logged[text] = now
            if len(self._logged) > 100:
                self._logged = {text: now}
            log.error("events: %s", text)

    # -- the outbox --------------------------------------------------------------------------
    @staticmethod
    def _records_wanted(config: Config) -> bool:
        """Whether workers write outbox records: [events], or storage commitment."""
        return events_enabled(config.events) or records_wanted(config)

    @property
    def outbox_fd(self) -> int:
        """The outbox directory for new workers, or -1 when no record is wanted."""
        if self.segments is None or not self._records_wanted(self.config):
            return -1
        return self.segments.fd

    def wake(self) -> None:
        """A worker wrote a record: read the outbox soon (within CONSUME_INTERVAL) rather
        than at the next poll.  Records are durable already: waiting a little lets one
        transaction (one fsync of the database) take the records of many objects."""
        self._wanted = True

    @_observer
    def consume(self, final: frozenset[str] = frozenset()) -> None:
        """Act on every record written since the last call (see the module docstring);
        segments in `final` have no writer left, so their torn tail is skipped."""
        if self.queue is None or self.segments is None:
            return
        self._wanted = False
        self._consumed_at = self._clock()
        for name in self.segments.names():
            try:
                self._consume_segment(name, name in final)
            except OSError as exc:  # this segment only: the others are still read
                self._log_failure(f"cannot read outbox segment {name}: {exc}")

    def _consume_segment(self, name: str, final: bool) -> None:
        assert self.queue is not None and self.segments is not None
        offset = self._offsets.get(name, 0)
        size = self.segments.size(name)
        if size < offset:
            log.error("outbox segment %s shrank from %d to %d bytes (truncated by hand?): the "
                      "records that were there are gone", name, offset, size)
            with self.queue.transaction():
                self.queue.set_offset(name, size)
            self._offsets[name] = size
        while True:
            offset = self._offsets.get(name, 0)
            chunk = self.segments.read(name, offset, final=final)
            if chunk.end == offset:
                break
            if chunk.damaged:
                log.warning("outbox segment %s: skipped %d damaged byte(s) after offset %d "
                            "(a record torn by a killed writer or a crash, which "
                            "was never acknowledged, or bytes written there by hand)", name,
                            chunk.damaged, offset)
            made: list[tuple[_Link, str, set[int]]] = []
            with self.queue.transaction():
                for record in chunk.records:
                    jobs = self._arrive(record, name)
                    link = self._link_of.get(record.association)
                    if link is not None:
                        made.append((link, record.id, set(jobs)))
                self.queue.set_offset(name, chunk.end)
            self._offsets[name] = chunk.end
            self.stored += len(chunk.records)
            for link, record_id, made_jobs in made:
                link.jobs[record_id] = made_jobs
                if record_id in link.waiting:
                    self._wait(link, record_id)
            if self.runner is not None:
                self.runner.poke()

    def _arrive(self, record: outbox.ObjectRecord, segment: str) -> list[int]:
        """One record: its batch, its reception job, the studies it completed."""
        assert self.queue is not None
        try:
            os.lstat(record.path)
        except FileNotFoundError:
            # Withdrawn after its record was written (the record could not be made durable,
            # so the object was refused), or renamed and read again after a rebuild.
            log.info("outbox record %s: %s is gone; no events for it", record.id, record.path)
            return []
        except OSError:
            pass  # cannot tell: act on it (at least once)
        # A running association finishes under the configuration it started with (a reload
        # turning [events] off must not drop the records it goes on writing).
        config = self._configs.get(record.association, self.config)
        events = config.events
        if self.commitments is not None and (records_wanted(config)
                                             or records_wanted(self.config)):
            self.commitments.remember(self.queue, record)
        jobs: list[int] = []
        batch = batch_id = 0
        closed: list[ClosedStudy] = []
        delivered = 0
        if tracking_enabled(events) and record.study_uid:
            delivered = self.queue.delivered(record.study_uid, record.sop_instance_uid,
                                             record.path)
            if delivered:
                # Sent again (its response never reached the sender) after its batch was
                # complete: that batch's jobs have it already; it opens no new batch.
                log.info("%s: %s was sent again after the study was complete; it stays in "
                         "that batch", batch_label(record.study_uid, delivered),
                         record.sop_instance_uid,
                         extra={"journal": {"DICOM_STUDY_UID": record.study_uid,
                                            "DICOM_SOP_INSTANCE_UID": record.sop_instance_uid}})
        if tracking_enabled(events) and record.study_uid and not delivered:
            stored = StoredFile(record.path, record.sop_class_uid, record.sop_instance_uid,
                                record.series_uid, record.patient_id, record.size)
            arrival = Arrival(record.study_uid, stored, record.association, record.calling_ae,
                              record.called_ae, record.peer)
            study, closed = self.tracker.arrive(arrival)
            if record.association not in self._live:
                # A worker of an earlier master (or one that ended before its record was
                # read): its association is over.
                self.tracker.association_ended(record.association, released=False)
            batch = study.batch
            batch_id = self._open_ids.get(record.study_uid, 0)
            if not batch_id:
                batch_id = self.queue.open_batch(record.study_uid, batch, self._wall())
                self._open_ids[record.study_uid] = batch_id
                if batch > 1:
                    log.info("%s: an object of the study arrived after it was complete; "
                             "batch %d opened", batch_label(record.study_uid, batch), batch,
                             extra={"journal": {"DICOM_STUDY_UID": record.study_uid,
                                                "DICOM_BATCH": batch}})
            if study.last_added:
                self.queue.add_file(batch_id, len(study.files), {
                    "path": stored.path, "sop_class_uid": stored.sop_class_uid,
                    "sop_instance_uid": stored.sop_instance_uid, "series_uid": stored.series_uid,
                    "patient_id": stored.patient_id, "size": stored.size},
                    arrival.calling_ae, arrival.called_ae, arrival.peer, segment)
        if events.exec_on_reception:
            jobs.append(self._reception_job(config, record, batch, batch_id, segment))
        for complete in closed:
            jobs += self._closed(complete)
        return jobs

    def _reception_job(self, config: Config, record: outbox.ObjectRecord, batch: int,
                       batch_id: int, segment: str) -> int:
        assert self.queue is not None
        events, settings = config.events, config.jobs
        directory, _, name = record.path.rpartition("/")
        host = peer_host(record.peer)
        values = placeholder_values(directory or ".", record.calling_ae, record.called_ae, host,
                                    filename=name)
        env = environment({
            "DICOM_EVENT": "reception", "DICOM_OUTPUT_DIR": directory or ".",
            "DICOM_FILE": record.path, "DICOM_FILENAME": name,
            "DICOM_SOP_CLASS_UID": record.sop_class_uid,
            "DICOM_SOP_INSTANCE_UID": record.sop_instance_uid,
            "DICOM_STUDY_UID": record.study_uid, "DICOM_SERIES_UID": record.series_uid,
            "DICOM_PATIENT_ID": record.patient_id, "DICOM_CALLING_AE": record.calling_ae,
            "DICOM_CALLED_AE": record.called_ae, "DICOM_PEER": host,
            "DICOM_BATCH": batch or None})
        env.update(environment_for(values))  # what the shell form's references expand to
        return self.queue.add(
            JobKind.RECEPTION, events.exec_on_reception,
            build_argv(events.exec_on_reception, values, shell=events.shell), env,
            max_attempts=1 + settings.retries, timeout=settings.timeout, now=self._wall(),
            study_uid=record.study_uid, batch=batch, batch_id=batch_id, segment=segment)

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
        assert self.queue is not None
        jobs: list[int] = []
        with self.queue.transaction():
            for study in self.tracker.close_all(reason):
                jobs += self._closed(study)
        return jobs

    def _previous_batches(self, study_uid: str) -> int:
        return self.queue.closed_batches(study_uid) if self.queue is not None else 0

    # -- manifests ---------------------------------------------------------------------------
    def _manifest_path(self, batch_id: int) -> Path:
        assert self.queue is not None
        batch = self.queue.batch(batch_id)
        if batch is None:
            raise LookupError(f"batch {batch_id} is no longer in the job database")
        return self.state_dir / MANIFESTS / (batch.manifest or f"{batch_id}.json")

    def _prepare(self, job: Job) -> dict[str, str]:
        """Extra variables of a run: the batch's manifest (written on first use); a
        storage commitment report's delivery settings."""
        if job.kind is JobKind.COMMITMENT:
            assert self.commitments is not None
            return self.commitments.prepare(job, self.config)
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
            raise LookupError(f"batch {batch_id} is no longer in the job database")
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
    def worker_started(self, association: str, reply: socket.socket | None,
                       config: Config) -> None:
        """A new worker, serving under `config`: its association is live (its records follow
        `config`'s [events], whatever a reload says meanwhile); watch its SyncLink."""
        self._live.add(association)
        self._configs[association] = config
        if reply is None:
            return
        reply.setblocking(False)
        link = _Link(reply, association)
        self._links[reply.fileno()] = link
        self._link_of[association] = link
        self.selector.register(reply, selectors.EVENT_READ, self._link_readable)

    def _link_readable(self, sock: object) -> None:
        assert isinstance(sock, socket.socket)
        link = self._links.get(sock.fileno())
        if link is None:
            return
        while True:
            try:
                data = link.sock.recv(ipc.MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop_link(link)
                return
            record_id = data.decode("ascii", "replace")
            self.consume()  # the record is durable before the worker asks
            link.waiting[record_id] = set()
            self._wait(link, record_id)

    def _wait(self, link: _Link, record_id: str) -> None:
        jobs = link.jobs.pop(record_id, None)
        if not jobs or self.queue is None:
            link.answer(record_id)  # no job, or a record the master could not act on yet
            return
        link.waiting[record_id] = jobs

    def _drop_link(self, link: _Link) -> None:
        self._links.pop(link.sock.fileno(), None)
        self._link_of.pop(link.association, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(link.sock)
        link.sock.close()

    def _release_waits(self) -> None:
        for link in self._links.values():
            for record_id in list(link.waiting):
                link.answer(record_id)
            link.jobs.clear()

    def worker_done(self, association: str, released: bool) -> None:
        """A worker ended (`released`: its association ended with A-RELEASE): read what it
        wrote, forget its link, tell the tracker."""
        self.consume()
        link = self._link_of.get(association)
        if link is not None:
            self._drop_link(link)
        self._live.discard(association)
        self._configs.pop(association, None)
        if association:
            self.tracker.association_ended(association, released)
            if self.commitments is not None and self.queue is not None and self.runner \
                    and self.commitments.association_ended(self.queue, association):
                self.runner.poke()

    @_observer
    def commitment_note(self, message: ipc.CommitmentNote) -> None:
        """A worker's note about a storage commitment request (ipc.CommitmentNote)."""
        if self.commitments is not None and self.queue is not None and self.runner \
                and self.commitments.note(self.queue, message):
            self.runner.poke()

    def _job_finished(self, job_id: int, final: bool) -> None:
        if not final:
            return
        if self.commitments is not None and self.queue is not None:
            job = self.queue.get(job_id)
            if job is not None and job.kind is JobKind.RENAME and job.batch_id:
                with contextlib.suppress(LookupError):
                    self.commitments.job_finished(self.queue, job,
                                                  self._manifest_path(job.batch_id))
            elif job is not None and job.kind is JobKind.COMMITMENT:
                self.commitments.delivery_finished(job)
        for link in self._links.values():
            for jobs in link.jobs.values():  # made, not yet asked for
                jobs.discard(job_id)
            for record_id, jobs in list(link.waiting.items()):
                jobs.discard(job_id)
                if not jobs:
                    link.answer(record_id)

    # -- the loop ----------------------------------------------------------------------------
    def timeout(self) -> float:
        """Seconds until the next tick is needed (at most 1 s: the outbox is polled)."""
        if self.queue is None:
            return 1.0  # no events: nothing to poll
        now = self._clock()
        moments = [self._consumed_at + POLL_INTERVAL - now]
        if self._wanted:
            moments.append(self._consumed_at + CONSUME_INTERVAL - now)
        deadline = self.tracker.next_deadline()
        if deadline is not None:
            moments.append(deadline - self._clock())
        if self.runner is not None:
            wait = self.runner.timeout()
            if wait is not None:
                moments.append(wait)
        if self.commitments is not None:
            wait = self.commitments.due()
            if wait is not None:
                moments.append(wait)
        return max(0.0, min(moments))

    @_observer
    def tick(self) -> None:
        """Read the outbox, close timed-out studies, supervise and start jobs, housekeeping."""
        if self.queue is None or self.runner is None:
            return
        now = self._clock()
        deadline = self.tracker.next_deadline()
        if now >= self._consumed_at + (CONSUME_INTERVAL if self._wanted else POLL_INTERVAL) \
                or (deadline is not None and now >= deadline):
            self.consume()  # before a timeout: a record already written may extend the study
        if deadline is not None and now >= deadline:
            expired: list[int] = []
            with self.queue.transaction():
                for study in self.tracker.expire():
                    expired += self._closed(study)
            if expired:
                self.runner.poke()
        if self.commitments is not None and self.commitments.tick(
                self.queue, self.config, self._live, self.consume):
            self.runner.poke()
        self.runner.tick()
        now = self._clock()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_INTERVAL
            self._housekeep(now)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            self._prune()

    def _housekeep(self, now: float) -> None:
        """Rotate the outbox's current segment; remove segments that are settled."""
        assert self.segments is not None and self.queue is not None
        try:
            self._rotate_and_remove(self.segments, now)
        except OSError as exc:
            self._log_failure(f"outbox housekeeping in {self.state_dir}: {exc}")

    def _rotate_and_remove(self, segments: outbox.Segments, now: float) -> None:
        assert self.queue is not None
        segments.ensure_current()  # `current` or its segment name removed by hand
        strays = segments.strays()
        if strays:
            self._log_failure(f"outbox {self.state_dir / outbox.OUTBOX}: ignoring what is not "
                              f"a segment: {', '.join(strays[:5])}")
        current = segments.current_inode()
        for name in segments.names():
            try:
                inode = os.stat(name, dir_fd=segments.fd, follow_symlinks=False).st_ino
            except FileNotFoundError:
                continue
            if inode == current:
                # Rotated when large or old, and as soon as all of it is settled, so that a
                # rebuilt database replays as little as possible.
                size = segments.size(name)
                if size and (size >= ROTATE_BYTES or now - self._rotated >= ROTATE_AGE or (
                        self._offsets.get(name, 0) >= size and self.queue.settled(name))):
                    segments.rotate()
                    self._rotated = now
                continue
            with segments.exclusive(name) as alone:
                if not alone:
                    continue
                self.consume(final=frozenset({name}))
                if self._offsets.get(name, 0) >= segments.size(name) \
                        and self.queue.settled(name):
                    segments.remove(name)
                    self._offsets.pop(name, None)
                    self.queue.forget_segment(name)

    def _prune(self) -> None:
        assert self.queue is not None
        keep = self.config.jobs.keep_done_days * 86400
        for manifest in self.queue.prune(self._wall() - keep):
            with contextlib.suppress(OSError):
                os.unlink(self.state_dir / MANIFESTS / manifest)

    def reload(self, config: Config) -> bool:
        """Apply a new configuration: new jobs and studies follow it; queued jobs keep the
        command they were queued with.  jobs.state_directory needs a restart."""
        old = self.config
        self.config = config
        self.tracker.timeout = config.events.eostudy_timeout
        if self.runner is not None:
            self.runner.settings = config.jobs
            self.runner.delivery_concurrency = config.storage_commitment.delivery_concurrency
            self.runner.poke()
        if self.queue is None and self._records_wanted(config):
            try:
                self.open()
            except StorageError as exc:
                log.error("events stay off: %s", exc)
                return False
        if tracking_enabled(old.events) and not tracking_enabled(config.events) \
                and self.queue is not None:
            try:
                self._close_all(CloseReason.DISABLED)
            except (OSError, sqlite3.Error) as exc:
                self._failed("closing the open studies", exc)
        return True

    # -- stop and fork -----------------------------------------------------------------------
    def shutdown(self) -> None:
        """At the daemon's stop (no worker left): read the outbox, close or keep the open
        studies, interrupt running jobs (they run again after the restart), close the
        database."""
        if self.queue is None or self.runner is None:
            self._close_files()
            return
        try:
            self.consume()
            open_studies = self.tracker.open_studies()
            if open_studies and self.config.events.on_stop == "close":
                queued = self._close_all(CloseReason.STOP)
                log.info("closed %d open study batch(es) at stop (events.on_stop = close); "
                         "their %d job(s) run after the restart", len(open_studies), len(queued))
            elif open_studies:
                log.info("%d study batch(es) still open are kept in %s and resume after the "
                         "restart (events.on_stop = persist)", len(open_studies),
                         self.queue.path)
            self.runner.stop()
            pending = self.queue.counts().get("pending", 0)
            if pending:
                log.info("%d job(s) pending in %s run after the restart", pending,
                         self.queue.path)
        except (OSError, sqlite3.Error) as exc:
            log.error("events: at stop: %s (the outbox keeps every record for the restart)",
                      exc)
        finally:
            for link in list(self._links.values()):
                self._drop_link(link)
            self.queue.close()
            self.queue = None
            self._close_files()

    def _close_files(self) -> None:
        if self.commitments is not None:
            self.commitments.close()
            self.commitments = None
        if self.segments is not None:
            self.segments.close()
        if self.commitments is not None:
            self.commitments.close()
            os.close(self.segments.fd)
            self.segments = None
        if self._state_fd >= 0:
            os.close(self._state_fd)
            self._state_fd = -1

    def close_in_child(self) -> None:
        """In a forked worker: close the master's job, link and reader descriptors (the
        database connection is left alone: a worker never touches it); the outbox directory
        stays open for the worker's records."""
        if self.runner is not None:
            self.runner.close_in_child()
        for link in self._links.values():
            with contextlib.suppress(OSError):
                link.sock.close()
        if self.segments is not None:
            self.segments.close()
        if self.commitments is not None:
            self.commitments.close()

