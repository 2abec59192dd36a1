"""The master's side of storage commitment: which objects are committed, requests turned into
reports and delivery jobs.

Called by the EventService (jobs/service.py) from the master's loop:

* `remember` (for each outbox record, in the transaction that consumes it): the object goes
  into `stored_objects`, SOP instance -> file, SOP class, calling AE title.  The outbox
  record is written before the object's success response (outbox.py), so this index knows
  exactly what was acknowledged, across restarts.
* `tick`: requests in the spool (commitment/spool.py) are evaluated, oldest first, after the
  outbox was read once more *after* they were listed: every object record written before a
  request was written is then in the index, so a just-stored object counts.  A request that
  cannot be evaluated (its report does not fit on a full state file system, the database
  refuses the write) is tried again with back-off up to RETRY_MAX while the requests behind
  it go on; the failure is one log line, then a reminder every few minutes (reminders.py).
  Each request becomes, in one transaction, its report file (written first), a
  `commitments` row and a job of kind commitment; the request file is removed after the
  commit (a request seen again after a crash is recognised by its ID and removed).
* A report for an association that is still running is held (its job waits) while that
  association may deliver it itself (worker/commitment.py); the worker's notes (ipc) or the
  end of the association release it: done when delivered there, due at once otherwise.  The
  hold is bounded (the job's not_before: answer_wait after the evaluation, plus HOLD_SLACK),
  so a sender that keeps its association busy and never answers gets its report on a new
  association all the same; `tick` logs each hold that ran out.
* `prepare` gives a delivery run its settings from the configuration in force *then*: a
  [remote_aes] entry added by a reload serves the next retry.
* A report file lives as long as it may still be sent: it is removed once delivered (on the
  association or by its job), and an undelivered one with its dead job keep_days after it
  died; the hourly prune (and the first tick after a start) also removes report files no
  request waits for (a crash between two steps, a rebuilt database) and writers' leftovers.

Committed (PS3.4 J.3.3.1.2): the SOP instance was stored by this daemon with that SOP class
(storage_commitment.objects_from: by any calling AE, or by the requester only), and its file
is, at the moment the request is evaluated, a regular file where it was filed, or where the
end-of-study rename moves it: the new path in the batch's manifest once the rename is done,
or the planned one while it runs or after it was killed, timed out or dead-lettered.
"""

import contextlib
import json
import logging
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from dicom_ingestd import ipc
from dicom_ingestd.commitment import deliver_job
from dicom_ingestd.commitment.dataset import EventType, Reason, Reference
from dicom_ingestd.commitment.spool import (
    DIRECTORY,
    REPORT_SUFFIX,
    REPORTS,
    ReportHeader,
    Spool,
    SpoolError,
)
from dicom_ingestd.commitment.waits import answer_wait
from dicom_ingestd.config.schema import Config
from dicom_ingestd.jobs.queue import Job, JobKind, JobQueue, JobState
from dicom_ingestd.jobs.reminders import REMINDER_INTERVAL, Reminders
from dicom_ingestd.outbox import ObjectRecord

log = logging.getLogger("dicom_ingestd.commitment")

HOLD_SLACK = 5.0  # seconds beyond answer_wait for the worker to see the report and send it
RETRY_MAX = 60.0  # longest wait between two attempts to evaluate a request that failed
PRUNE_INTERVAL = 3600.0
STALE_TEMPORARY = 3600.0  # a writer's temporary request file older than this is removed
COMMAND = "storage-commitment-report"


def records_wanted(config: Config) -> bool:
    """Whether storage commitment needs the outbox records (and the state directory)."""
    return config.storage_commitment.enabled


def package_path() -> str:
    """sys.path entries a delivery run needs (this package and its dependencies, wherever
    they are installed: the Debian launcher adds private directories at run time only)."""
    import pydicom

    paths = [str(Path(__file__).resolve().parents[2]),
             str(Path(pydicom.__file__).resolve().parents[1])]
    return os.pathsep.join(dict.fromkeys(paths))


class Commitments:
    """See the module docstring.  `spool` is the state directory's commitment spool."""

    def __init__(self, spool: Spool, state_dir: Path, manifests: Path, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.reports = state_dir / DIRECTORY / REPORTS
        self.manifests = manifests
        self._clock = clock
        self._wall = wall
        self._wanted = True  # look at the spool at the first tick
        self._next_look = 0.0
        self._next_prune = 0.0
        # Notes that came before their request was evaluated (the worker sees the report
        # file before the transaction that queues its job commits): request ID -> delivered.
        self._early: dict[str, bool] = {}
        # Manifests read for the request being evaluated: name -> (the file's identity,
        # original path -> planned or new path).
        self._manifests: dict[str, tuple[tuple[int, int, int], dict[str, str]]] = {}
        # Requests that could not be evaluated: file name -> (next attempt, failures).
        self._retry_at: dict[str, tuple[float, int]] = {}
        self._reminders = Reminders(clock=clock)

    def close(self) -> None:
        self.spool.close()

    # -- the index -------------------------------------------------------------------------
    def remember(self, queue: JobQueue, record: ObjectRecord) -> None:
        queue.remember_object(record.sop_instance_uid, record.path, record.sop_class_uid,
                              record.calling_ae, record.stored_at)

    def job_finished(self, queue: JobQueue, job: Job, manifest: Path | None) -> None:
        """A finished rename job: its files' new paths go into the index."""
        if job.kind is not JobKind.RENAME or manifest is None:
            return
        try:
            files = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
            with queue.transaction():
                for entry in files:
                    old, new = entry.get("original_path"), entry.get("path")
                    if old and new and old != new:
                        queue.moved_object(str(entry.get("sop_instance_uid", "")), old, new)
        except (OSError, ValueError, AttributeError, sqlite3.Error) as exc:
            # The manifest is consulted again when a request names one of these objects.
            log.warning("storage commitment: cannot note the renames of job %d (%s)", job.id,
                        exc)

    # -- notes and associations ------------------------------------------------------------
    def note(self, queue: JobQueue, message: ipc.CommitmentNote) -> bool:
        """A worker's note; True when a job became due."""
        if message.step is ipc.CommitmentStep.REQUESTED:
            self._wanted = True
            return False
        delivered = message.step is ipc.CommitmentStep.DELIVERED
        held = queue.held_commitments(request_id=message.request_id)
        if not held:
            if not queue.commitment_known(message.request_id):
                self._early[message.request_id] = delivered
                if len(self._early) > 1000:  # notes of requests that never come: bounded
                    self._early.pop(next(iter(self._early)))
            return False
        for request_id, job_id in held:
            if queue.release_commitment(request_id, job_id, self._wall(), delivered) \
                    and delivered:
                self._forget_report(request_id)
        return not delivered

    def association_ended(self, queue: JobQueue, association: str | None) -> bool:
        """Release the reports held for `association` (None: every one, at start-up)."""
        released = False
        for request_id, job_id in queue.held_commitments(association=association):
            queue.release_commitment(request_id, job_id, self._wall(), delivered=False)
            released = True
        return released

    # -- requests --------------------------------------------------------------------------
    def due(self) -> float | None:
        """Seconds until the spool should be looked at (None: at the next poll)."""
        return 0.0 if self._wanted else max(0.0, self._next_look - self._clock())

    def tick(self, queue: JobQueue, config: Config, live: set[str],
             consume: Callable[[], None]) -> list[int]:
        """Evaluate the requests waiting in the spool; returns the jobs made due."""
        now = self._clock()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            self._prune(queue, config)
        if not self._wanted and now < self._next_look:
            return []
        self._wanted = False
        self._next_look = now + 1.0
        due = self._end_holds(queue, config)
        names = self.spool.request_names()
        for gone in set(self._retry_at).difference(names):  # removed by hand
            self._retry_at.pop(gone)
        ready = [name for name in names if self._retry_at.get(name, (0.0, 0))[0] <= now]
        if not ready:
            return due
        consume()  # after listing: every record written before these requests is read
        for name in ready:
            try:
                job = self._evaluate(queue, config, live, name)
            except (OSError, sqlite3.Error) as exc:
                self._stuck(name, exc, now)
                continue
            self._unstuck(name)
            if job:
                due.append(job)
        return due

    def _stuck(self, name: str, exc: BaseException, now: float) -> None:
        failures = self._retry_at.get(name, (0.0, 0))[1] + 1
        self._retry_at[name] = (now + min(RETRY_MAX, 2.0 ** failures), failures)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        count = self._reminders.failed(reason)
        if count == 1:
            log.error("storage commitment request %s cannot be evaluated: %s; later requests "
                      "go on, this one is tried again (at least every %g s), and this is "
                      "logged again every %d min while it lasts", name, reason, RETRY_MAX,
                      REMINDER_INTERVAL // 60)
        elif count:
            minutes = (self._clock() - self._reminders.since(reason)) / 60
            log.error("storage commitment: %d request(s) still cannot be evaluated: %s (%d "
                      "failed attempt(s) in %.0f min)", len(self._retry_at), reason, count,
                      minutes)

    def _unstuck(self, name: str) -> None:
        stuck = self._retry_at.pop(name, None)
        if stuck is not None:
            log.info("storage commitment request %s evaluated after %d failed attempt(s)",
                     name, stuck[1])
        if not self._retry_at:
            self._reminders.clear()

    def _end_holds(self, queue: JobQueue, config: Config) -> list[int]:
        """Holds that ran out (no answer on the requesting association in time): their jobs
        are due now."""
        ended = queue.ended_holds(self._wall())
        for request_id, job_id, transaction, calling_ae in ended:
            log.info("storage commitment report of transaction %s to %s: no answer on the "
                     "requesting association within %g s; it goes on a new association "
                     "(job %d)", transaction, calling_ae, answer_wait(config), job_id,
                     extra={"journal": {"DICOM_TRANSACTION_UID": transaction,
                                        "DICOM_CALLING_AE": calling_ae, "JOB_ID": job_id,
                                        "DICOM_COMMITMENT_REQUEST": request_id}})
        return [job_id for _, job_id, _, _ in ended]

    def _evaluate(self, queue: JobQueue, config: Config, live: set[str], name: str) -> int:
        spool = self.spool
        try:
            request, refs = spool.read_request(name)
        except (SpoolError, UnicodeError) as exc:
            log.critical("storage commitment request file %s is damaged (%s); moved aside "
                         "as %s.damaged, no report is sent for it", name, exc, name)
            os.rename(name, name + ".damaged", src_dir_fd=spool.requests,
                      dst_dir_fd=spool.requests)
            return 0
        if queue.commitment_known(request.request_id):  # evaluated before a crash
            spool.remove(spool.requests, name)
            return 0
        duplicate = queue.transaction_known(request.transaction_uid)
        results = self._results(queue, config, request.calling_ae, refs, duplicate)
        failed = sum(1 for _, reason in results if reason)
        committed = len(results) - failed
        event_type = EventType.FAILURES if failed else EventType.ALL_COMMITTED
        report = ReportHeader(request.request_id, request.transaction_uid, request.calling_ae,
                              request.called_ae, request.association, int(event_type),
                              committed, failed)
        spool.write_report(report, results)
        early = self._early.pop(request.request_id, None)
        held = early is not False and request.association in live \
            and config.storage_commitment.same_association_wait > 0
        wall = self._wall()
        hold = answer_wait(config) + HOLD_SLACK
        env = {"DICOM_TRANSACTION_UID": request.transaction_uid,
               "DICOM_CALLING_AE": request.calling_ae, "DICOM_CALLED_AE": request.called_ae,
               "DICOM_COMMITMENT_REQUEST": request.request_id}
        with queue.transaction():
            job = queue.add(JobKind.COMMITMENT,
                            [COMMAND, request.transaction_uid, "to", request.calling_ae],
                            [sys.executable, "-I", deliver_job.__file__,
                             request.request_id + REPORT_SUFFIX], env,
                            max_attempts=1 + config.storage_commitment.delivery_retries,
                            timeout=config.jobs.timeout, now=wall,
                            not_before=wall + hold if held else None)
            queue.add_commitment(request.request_id, request.transaction_uid,
                                 request.calling_ae, request.association, request.received,
                                 job, committed, failed, held)
            if early:  # already answered on the requesting association
                queue.release_commitment(request.request_id, job, wall, delivered=True)
        spool.remove(spool.requests, name)
        if early:
            self._forget_report(request.request_id)
        fields = {"DICOM_TRANSACTION_UID": request.transaction_uid,
                  "DICOM_CALLING_AE": request.calling_ae, "JOB_ID": job,
                  "DICOM_COMMITMENT_COMMITTED": committed, "DICOM_COMMITMENT_FAILED": failed}
        log.info("storage commitment of transaction %s from %s (%s): %d object(s), %d "
                 "committed, %d failed%s; report job %d%s", request.transaction_uid,
                 request.calling_ae, request.peer, len(results), committed, failed,
                 " (transaction UID used before: 0x0131 for each)" if duplicate else "", job,
                 " (offered on the requesting association first)" if held else "",
                 extra={"journal": fields})
        return 0 if held else job

    def _results(self, queue: JobQueue, config: Config, requester: str,
                 refs: list[Reference], duplicate: bool) -> list[tuple[Reference, int]]:
        if duplicate:
            return [(ref, Reason.DUPLICATE_TRANSACTION) for ref in refs]
        only_requester = config.storage_commitment.objects_from == "requester"
        stored = queue.stored_objects([ref.sop_instance_uid for ref in refs])
        results: list[tuple[Reference, int]] = []
        self._manifests.clear()
        for ref in refs:
            reason: int = Reason.NO_SUCH_OBJECT
            for path, sop_class, calling_ae in stored.get(ref.sop_instance_uid, []):
                if only_requester and calling_ae != requester:
                    continue
                if not self._present(queue, config, ref.sop_instance_uid, path):
                    continue
                if sop_class == ref.sop_class_uid:
                    reason = 0
                    break
                reason = Reason.CLASS_INSTANCE_CONFLICT
            results.append((ref, reason))
        return results

    def _present(self, queue: JobQueue, config: Config, sop: str, path: str) -> bool:
        if _regular_file(path):
            return True
        # Renamed at end of study (the index not told yet, or the rename still running,
        # killed or dead): the batch's manifest maps the original path to the planned new
        # one, saved before any file moves, or to the new one once the rename is done
        # (jobs/rename.py keeps every file at one of the two at every instant).
        manifest = queue.manifest_of_file(sop, path)
        if not manifest:
            return False
        moved = self._moves(manifest, fresh=False)
        if moved.get(path) and _regular_file(moved[path]):
            return True
        # Read before the rename moved on (its plan saved, a name taken meanwhile): look
        # again if the manifest changed since.
        again = self._moves(manifest, fresh=True)
        return again is not moved and bool(again.get(path)) and _regular_file(again[path])

    def _moves(self, manifest: str, fresh: bool) -> dict[str, str]:
        """Original path -> where the batch's rename puts it (planned or done), from the
        manifest `manifest`; read once per request, or again when `fresh` and the file was
        replaced since (the rename writes a new file each time)."""
        path = self.manifests / manifest
        try:
            identity = os.stat(path, follow_symlinks=False)
        except OSError:
            return {}
        key = (identity.st_ino, identity.st_mtime_ns, identity.st_size)
        cached = self._manifests.get(manifest)
        if cached is not None and (not fresh or cached[0] == key):
            return cached[1]
        moved: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            data = json.loads(path.read_text("utf-8"))
            files = data.get("files", [])
            plan = data.get("plan") or []
            for index, entry in enumerate(files):
                if entry.get("original_path"):  # renamed: the manifest says where
                    moved[str(entry["original_path"])] = str(entry.get("path", ""))
                elif index < len(plan) and plan[index]:  # planned, maybe moved already
                    moved[str(entry.get("path", ""))] = str(plan[index])
        self._manifests[manifest] = (key, moved)
        return moved

    # -- report files ----------------------------------------------------------------------
    def delivery_finished(self, job: Job) -> None:
        """A delivery job is done (its report was answered with success) or dead: a done
        one's report is removed; a dead one's is kept for `jobs retry` (see _prune)."""
        if job.kind is JobKind.COMMITMENT and job.state is JobState.DONE:
            self._forget_report(job.env.get("DICOM_COMMITMENT_REQUEST", ""))

    def _forget_report(self, request_id: str) -> None:
        if not request_id:
            return
        try:
            self.spool.remove_report(request_id)
        except OSError as exc:  # the hourly sweep tries again
            log.warning("storage commitment: cannot remove the delivered report %s%s: %s",
                        request_id, REPORT_SUFFIX, exc)

    def _prune(self, queue: JobQueue, config: Config) -> None:
        """Forget what keep_days no longer covers; remove the report files nothing waits
        for (see the module docstring)."""
        before = self._wall() - config.storage_commitment.keep_days * 86400
        spool = self.spool
        try:
            for job_id, request_id, transaction in queue.forget_dead_deliveries(before):
                spool.remove_report(request_id)
                log.warning("storage commitment report of transaction %s was never delivered; "
                            "its dead job %d and its report are removed after %d day(s) "
                            "(storage_commitment.keep_days)", transaction, job_id,
                            config.storage_commitment.keep_days,
                            extra={"journal": {"DICOM_TRANSACTION_UID": transaction,
                                               "JOB_ID": job_id}})
            queue.prune_commitments(before)
            orphans = 0
            for request_id in spool.report_ids():
                state = queue.delivery_state(request_id)
                if state in (JobState.PENDING, JobState.RUNNING, JobState.DEAD) or (
                        state is None and spool.request_exists(request_id)):
                    continue  # still to be sent, or to be written again from its request
                spool.remove_report(request_id)
                orphans += state is None
            if orphans:
                log.warning("storage commitment: removed %d report file(s) in %s that no "
                            "request in the job database waits for (a rebuilt database, or "
                            "files from an earlier version)", orphans, self.reports)
            for directory in (spool.requests, spool.reports):
                for temp in spool.stale_temporaries(directory, self._wall() - STALE_TEMPORARY):
                    spool.remove(directory, temp)
        except (OSError, sqlite3.Error) as exc:
            log.error("storage commitment: housekeeping of %s failed (%s); trying again in "
                      "%d min", self.reports.parent, exc, PRUNE_INTERVAL // 60)

    # -- delivery runs ---------------------------------------------------------------------
    def prepare(self, job: Job, config: Config) -> dict[str, str]:
        """The variables of a delivery run; LookupError when it cannot run (the run fails
        and is retried: a reload may add the address meanwhile)."""
        title = job.env.get("DICOM_CALLING_AE", "")
        remote = config.remote_aes.aetitles.get(title)
        if remote is None:
            raise LookupError(f"no address for AE title {title!r}: add [remote_aes.{title}] "
                              "(host, port) and reload")
        network = config.network
        # The report comes from the AE title the modality called, not network.aetitle: a
        # modality knows the archive by the title it calls, and may refuse an association
        # from a title it does not know.
        called = job.env.get("DICOM_CALLED_AE", "").strip(" ")
        settings = {
            "host": remote.host, "port": remote.port, "tls": remote.tls,
            "calling_ae": called if _ae_title(called) else network.aetitle, "called_ae": title,
            "acse_timeout": network.acse_timeout, "dimse_timeout": network.dimse_timeout or 60,
            "max_pdu": network.max_pdu, "tls_config": asdict(config.tls) if remote.tls else {},
        }
        return {"DICOM_INGESTD_PATH": package_path(), "DICOM_DELIVERY": json.dumps(settings),
                "DICOM_COMMITMENT_REPORTS": str(self.reports)}


def _ae_title(title: str) -> bool:
    """Whether `title` can be sent as an AE title (1-16 characters of the default character
    repertoire, no backslash)."""
    return 1 <= len(title) <= 16 and "\\" not in title and all(" " <= c <= "~" for c in title)


def _regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
