"""The persistent job queue: a SQLite database (WAL mode) in the state directory.

Only the master opens it while the daemon runs (forked workers never touch the inherited
connection); the `dicom-ingestd jobs` command opens it from another process to list, show
and re-queue jobs, which SQLite's locking makes safe.

Every change is a transaction of its own, committed before the master acts on it (starts a
process, answers a worker): `transaction()` groups the writes of one step (the records of one
outbox read, one job's start) and rolls all of them back on an error, so the database never
holds half a step and the caller can rebuild its state from what was committed.  With
storage.fsync the database is opened with synchronous=FULL (a committed job survives a power
failure), otherwise NORMAL (it survives a crash of the daemon).

Tables: `jobs` (one row per command to run), `batches` (one row per batch of a study, open or
closed, with the unique name of its manifest), `batch_files` (the objects of each batch, in
order of arrival), `outbox` (how far each outbox segment has been consumed), and for storage
commitment `stored_objects` (every object stored, by SOP instance, file and sending AE title:
up to MAX_SENDERS of them per file, the class being the file's), `commitments` (each request,
its transaction UID and its report's delivery job) and `counters` (requests, objects and
report deliveries since the database was made, for status and metrics).  Rows made
from an outbox record name its segment, so the master can tell when a segment is settled.
Times stored are wall-clock seconds (time.time()), because they must mean something after a
restart.
"""

import contextlib
import json
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

DATABASE = "jobs.sqlite"
SCHEMA_VERSION = 4
MAX_SENDERS = 8  # calling AE titles remembered per stored file (the latest ones)
# SQLite's primary result codes for a damaged database file (sqlite3.DatabaseError's
# sqlite_errorcode & 0xFF): the file must be moved aside, not retried.
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    command TEXT NOT NULL,
    argv TEXT NOT NULL,
    env TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    batch INTEGER NOT NULL DEFAULT 0,
    batch_id INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    timeout REAL NOT NULL,
    not_before REAL NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    pid INTEGER,
    pid_start TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '',
    segment TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs (study_uid, batch, id);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    batch INTEGER NOT NULL,
    state TEXT NOT NULL,
    opened REAL NOT NULL,
    closed REAL,
    reason TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    called_ae TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    manifest TEXT NOT NULL DEFAULT '',
    UNIQUE (study_uid, batch)
);
CREATE INDEX IF NOT EXISTS batches_by_state ON batches (state);
CREATE TABLE IF NOT EXISTS batch_files (
    batch_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    file TEXT NOT NULL,
    segment TEXT NOT NULL DEFAULT '',
    sop TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (batch_id, seq)
);
CREATE INDEX IF NOT EXISTS batch_files_by_segment ON batch_files (segment);
CREATE INDEX IF NOT EXISTS batch_files_by_sop ON batch_files (sop);
CREATE INDEX IF NOT EXISTS jobs_by_segment ON jobs (segment);
CREATE TABLE IF NOT EXISTS outbox (
    segment TEXT PRIMARY KEY,
    offset INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stored_objects (
    sop TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    stored REAL NOT NULL,
    PRIMARY KEY (sop, path, calling_ae)
);
CREATE INDEX IF NOT EXISTS stored_objects_by_time ON stored_objects (stored);
CREATE TABLE IF NOT EXISTS commitments (
    request_id TEXT PRIMARY KEY,
    transaction_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    association TEXT NOT NULL,
    received REAL NOT NULL,
    job_id INTEGER NOT NULL,
    committed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    held INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS commitments_by_transaction ON commitments (transaction_uid);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
# Version 1 databases (before the outbox) gain the new columns in place.
_MIGRATE_1 = """
ALTER TABLE jobs ADD COLUMN segment TEXT NOT NULL DEFAULT '';
ALTER TABLE batches ADD COLUMN manifest TEXT NOT NULL DEFAULT '';
ALTER TABLE batch_files ADD COLUMN segment TEXT NOT NULL DEFAULT '';
ALTER TABLE batch_files ADD COLUMN sop TEXT NOT NULL DEFAULT '';
ALTER TABLE batch_files ADD COLUMN path TEXT NOT NULL DEFAULT '';
UPDATE batches SET manifest = id || '.json' WHERE manifest = '';
"""
# Version 3 kept one sender per stored file (a resend by another AE title replaced it): the
# table is made again with the sender in its key (before _SCHEMA, then _MIGRATE_3_AFTER).
_MIGRATE_3 = """
ALTER TABLE stored_objects RENAME TO stored_objects_v3;
DROP INDEX IF EXISTS stored_objects_by_time;
"""
_MIGRATE_3_AFTER = """
INSERT OR IGNORE INTO stored_objects SELECT sop, path, sop_class, calling_ae, stored
    FROM stored_objects_v3;
DROP TABLE stored_objects_v3;
"""


class Counter(StrEnum):
    """The storage commitment counters (table `counters`)."""

    REQUESTS = "commitment_requests"  # requests evaluated
    COMMITTED = "commitment_objects_committed"  # references reported committed
    FAILED = "commitment_objects_failed"  # references reported failed
    DELIVERED = "commitment_reports_delivered"  # on the association or a new one
    ATTEMPTS_FAILED = "commitment_delivery_attempts_failed"  # runs that did not deliver
    DEAD = "commitment_reports_dead"  # given up after the last attempt


def is_corrupt(exc: BaseException) -> bool:
    """Whether `exc` says the database file itself is damaged (not full, locked or read-only)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None \
        and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


class JobState(StrEnum):
    """pending → running → done, or → pending again (retry) … → dead (dead letter)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"


class JobKind(StrEnum):
    RECEPTION = "reception"  # events.exec_on_reception, one per stored object
    RENAME = "rename"  # events.rename_on_eostudy, one per complete batch
    EOSTUDY = "eostudy"  # events.exec_on_eostudy, one per complete batch
    COMMITMENT = "commitment"  # a storage commitment report to deliver (no command of ours)


# Kinds that never wait for the earlier jobs of their batch (they have none).
_UNORDERED = (JobKind.RECEPTION, JobKind.COMMITMENT)


class JobPool(StrEnum):
    """The concurrency limits: a kind of job runs in one pool, and a pool's runs never take
    another pool's slots (a storage commitment report stuck on a hung modality never delays
    the jobs of [events])."""

    EVENTS = "events"  # jobs.concurrency
    DELIVERY = "delivery"  # storage_commitment.delivery_concurrency; one run per target


POOL: dict[JobKind, JobPool] = {
    JobKind.RECEPTION: JobPool.EVENTS, JobKind.RENAME: JobPool.EVENTS,
    JobKind.EOSTUDY: JobPool.EVENTS, JobKind.COMMITMENT: JobPool.DELIVERY,
}
# A delivery's target: the AE title its report goes to (DICOM_CALLING_AE of its request).
_TARGET = "json_extract(env, '$.DICOM_CALLING_AE')"


@dataclass(frozen=True, slots=True)
class Job:
    """One row of the jobs table."""

    id: int
    kind: JobKind
    state: JobState
    command: list[str]  # as configured (for logs and JOB_COMMAND)
    argv: list[str]  # what is executed
    env: dict[str, str]  # DICOM_* variables added to the daemon's environment
    study_uid: str
    batch: int
    batch_id: int
    attempts: int  # finished runs so far
    max_attempts: int
    timeout: float  # seconds per run; 0: none
    not_before: float
    created: float
    started: float | None
    finished: float | None
    pid: int | None
    pid_start: str
    result: str  # how the last run ended

    @property
    def display(self) -> str:
        return " ".join(self.command)

    @property
    def pool(self) -> JobPool:
        return POOL[self.kind]

    @property
    def target(self) -> str:
        """Whom a delivery job talks to (its pool runs one job per target at a time)."""
        return self.env.get("DICOM_CALLING_AE", "") if self.pool is JobPool.DELIVERY else ""


@dataclass(frozen=True, slots=True)
class Batch:
    """One row of the batches table."""

    id: int
    study_uid: str
    batch: int
    state: str  # open | closed
    opened: float
    closed: float | None
    reason: str
    calling_ae: str
    called_ae: str
    peer: str
    manifest: str  # file name of its manifest in the state directory's manifests/


def _job(row: sqlite3.Row) -> Job:
    return Job(row["id"], JobKind(row["kind"]), JobState(row["state"]),
               json.loads(row["command"]), json.loads(row["argv"]), json.loads(row["env"]),
               row["study_uid"], row["batch"], row["batch_id"], row["attempts"],
               row["max_attempts"], row["timeout"], row["not_before"], row["created"],
               row["started"], row["finished"], row["pid"], row["pid_start"], row["result"])


def _batch(row: sqlite3.Row) -> Batch:
    return Batch(row["id"], row["study_uid"], row["batch"], row["state"], row["opened"],
                 row["closed"], row["reason"], row["calling_ae"], row["called_ae"], row["peer"],
                 row["manifest"])


class JobQueue:
    """The database in `directory` (created with the directory when `create`)."""

    def __init__(self, directory: Path, *, create: bool = True, durable: bool = True,
                 busy_timeout: float = 2.0, first_id: int = 0) -> None:
        """Open (or with `create`, create) the database.  A new database numbers its jobs and
        batches from `first_id` + 1, so that ids are never reused when a database is rebuilt.
        Raises sqlite3.DatabaseError (see is_corrupt) for a damaged file."""
        self.directory = directory
        self.path = directory / DATABASE
        if create:
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        elif not self.path.exists():
            raise FileNotFoundError(f"no job database at {self.path}")
        self._depth = 0
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            if create:
                self._create(first_id)
        except BaseException:
            self._db.close()
            raise

    def _create(self, first_id: int) -> None:
        with self.transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            fresh = not self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone()
            if version == 1:
                for statement in filter(str.strip, _MIGRATE_1.split(";")):
                    self._write(statement)
            old_senders = version == 3 and self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'stored_objects'").fetchone()
            if old_senders:
                for statement in filter(str.strip, _MIGRATE_3.split(";")):
                    self._write(statement)
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._write(statement)
            if old_senders:
                for statement in filter(str.strip, _MIGRATE_3_AFTER.split(";")):
                    self._write(statement)
            if fresh and first_id:
                for table in ("jobs", "batches"):
                    self._write("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)",
                                (table, first_id))
            self._write(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def check(self) -> str:
        """'ok', or what SQLite's quick_check found wrong."""
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        return "; ".join(str(row[0]) for row in rows[:5])

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.rollback()
        self._db.close()

    # -- transactions ----------------------------------------------------------------------
    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
        return self._db.execute(sql, params)

    def commit(self) -> None:
        """Make every write since the last commit durable (outside `transaction()`)."""
        if self._db.in_transaction and not self._depth:
            self._db.execute("COMMIT")

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes inside are committed together at the end, or all rolled back when anything
        (the commit included) fails.  Nested uses join the outermost."""
        outer = not self._depth
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if outer:
                with contextlib.suppress(sqlite3.Error):
                    self.rollback()
            raise
        self._depth -= 1
        if outer:
            try:
                self.commit()
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self.rollback()
                raise

    # -- jobs ------------------------------------------------------------------------------
    def add(self, kind: JobKind, command: Sequence[str], argv: Sequence[str],
            env: dict[str, str], *, max_attempts: int, timeout: float, now: float,
            study_uid: str = "", batch: int = 0, batch_id: int = 0, segment: str = "",
            not_before: float | None = None) -> int:
        """Queue a job (pending, runnable from `now`, or from `not_before`); returns its id.
        `segment`: the outbox segment of the record it was made from (reception jobs)."""
        cursor = self._write(
            "INSERT INTO jobs (kind, state, command, argv, env, study_uid, batch, batch_id, "
            "max_attempts, timeout, not_before, created, segment) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (str(kind), str(JobState.PENDING), json.dumps(list(command)),
             json.dumps(list(argv)), json.dumps(env), study_uid, batch, batch_id,
             max_attempts, timeout, now if not_before is None else not_before, now, segment))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def get(self, job_id: int) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def due(self, now: float, limit: int, pool: JobPool = JobPool.EVENTS,
            busy: Sequence[str] = ()) -> list[Job]:
        """Pending jobs of `pool` runnable at `now`, oldest first.

        A rename or end-of-study job also waits until every earlier job of its batch
        (the reception jobs of its objects, the rename) has finished, done or dead.  In the
        delivery pool, the oldest job of each target only, and none of a target in `busy`
        (one that has a run going).
        """
        kinds = [str(kind) for kind, of in POOL.items() if of is pool]
        marks = ",".join("?" * len(kinds))
        if pool is JobPool.DELIVERY:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE id IN (SELECT MIN(id) FROM jobs WHERE state = "
                f"'pending' AND not_before <= ? AND kind IN ({marks}) AND {_TARGET} NOT IN "
                f"({','.join('?' * len(busy))}) GROUP BY {_TARGET}) ORDER BY id LIMIT ?",
                (now, *kinds, *busy, limit)).fetchall()
            return [_job(row) for row in rows]
        rows = self._db.execute(
            "SELECT * FROM jobs AS j WHERE j.state = 'pending' AND j.not_before <= ? AND "
            f"j.kind IN ({marks}) AND ("
            f" j.kind IN ({','.join('?' * len(_UNORDERED))}) OR NOT EXISTS (SELECT 1 FROM jobs"
            "  AS e WHERE e.batch_id = j.batch_id AND e.id < j.id"
            "  AND e.state IN ('pending', 'running')))"
            " ORDER BY j.id LIMIT ?", (now, *kinds, *map(str, _UNORDERED), limit)).fetchall()
        return [_job(row) for row in rows]

    def select(self, states: Sequence[str] = (), limit: int = 0) -> list[Job]:
        sql = "SELECT * FROM jobs"
        params: list[Any] = []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            params += list(states)
        sql += " ORDER BY id DESC"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        return [_job(row) for row in reversed(self._db.execute(sql, params).fetchall())]

    def counts(self) -> dict[str, int]:
        return {row[0]: row[1] for row in
                self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    def started(self, job_id: int, pid: int, pid_start: str, now: float) -> None:
        with self.transaction():
            self._write("UPDATE jobs SET state = 'running', started = ?, pid = ?, "
                        "pid_start = ? WHERE id = ?", (now, pid, pid_start, job_id))

    def finished(self, job_id: int, state: JobState, result: str, now: float, *,
                 attempts: int, not_before: float | None = None) -> None:
        """Record the end of a run: done, dead, or pending again from `not_before` (a
        delivery's outcome is counted too)."""
        with self.transaction():
            self._write("UPDATE jobs SET state = ?, result = ?, finished = ?, attempts = ?, "
                        "not_before = COALESCE(?, not_before), pid = NULL WHERE id = ?",
                        (str(state), result, now, attempts, not_before, job_id))
            row = self._db.execute("SELECT kind FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row[0] == JobKind.COMMITMENT:
                if state is JobState.DONE:
                    self._count(Counter.DELIVERED)
                else:
                    self._count(Counter.ATTEMPTS_FAILED)
                    if state is JobState.DEAD:
                        self._count(Counter.DEAD)

    def interrupted(self, job_id: int, result: str) -> None:
        """A run the daemon itself cut short (stop, crash): pending again, attempt not counted."""
        with self.transaction():
            self._write("UPDATE jobs SET state = 'pending', result = ?, pid = NULL "
                        "WHERE id = ?", (result, job_id))

    def retry(self, job_id: int, now: float) -> Job:
        """Re-queue a done, dead or waiting job to run now, with a fresh set of attempts.

        Raises KeyError for an unknown id and ValueError for a running job.
        """
        with self.transaction():
            job = self.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.state is JobState.RUNNING:
                raise ValueError(f"job {job_id} is running (pid {job.pid})")
            self._write("UPDATE jobs SET state = 'pending', attempts = 0, not_before = ?, "
                        "result = ? WHERE id = ?",
                        (now, f"re-queued by hand (was {job.state}: {job.result})".strip(),
                         job_id))
        job = self.get(job_id)
        assert job is not None
        return job

    # -- batches of studies ----------------------------------------------------------------
    def open_batch(self, study_uid: str, batch: int, now: float) -> int:
        """The id of a study's open batch, created if new, with a manifest name of its own
        (random: never the name of another batch, whatever happened to the database)."""
        self._write("INSERT OR IGNORE INTO batches (study_uid, batch, state, opened, manifest) "
                    "VALUES (?, ?, 'open', ?, ?)",
                    (study_uid, batch, now, f"{secrets.token_hex(12)}.json"))
        row = self._db.execute("SELECT id FROM batches WHERE study_uid = ? AND batch = ?",
                               (study_uid, batch)).fetchone()
        return int(row[0])

    def add_file(self, batch_id: int, seq: int, file: dict[str, Any], calling_ae: str,
                 called_ae: str, peer: str, segment: str = "") -> None:
        self._write("INSERT OR REPLACE INTO batch_files (batch_id, seq, file, segment, sop, "
                    "path) VALUES (?,?,?,?,?,?)",
                    (batch_id, seq, json.dumps(file), segment,
                     str(file.get("sop_instance_uid", "")), str(file.get("path", ""))))
        self._write("UPDATE batches SET calling_ae = ?, called_ae = ?, peer = ? WHERE id = ?",
                    (calling_ae, called_ae, peer, batch_id))

    def close_batch(self, batch_id: int, reason: str, now: float) -> None:
        self._write("UPDATE batches SET state = 'closed', reason = ?, closed = ? WHERE id = ?",
                    (reason, now, batch_id))

    def closed_batches(self, study_uid: str) -> int:
        """How many batches of the study were closed (the highest closed batch number)."""
        row = self._db.execute("SELECT MAX(batch) FROM batches WHERE study_uid = ? AND "
                               "state = 'closed'", (study_uid,)).fetchone()
        return int(row[0] or 0)

    def delivered(self, study_uid: str, sop_instance_uid: str, path: str) -> int:
        """The batch number of a closed batch of the study that already lists this file of
        this SOP instance, or 0."""
        row = self._db.execute(
            "SELECT b.batch FROM batch_files AS f JOIN batches AS b ON b.id = f.batch_id "
            "WHERE f.sop = ? AND f.path = ? AND b.study_uid = ? AND b.state = 'closed' "
            "LIMIT 1", (sop_instance_uid, path, study_uid)).fetchone()
        return int(row[0]) if row else 0

    def batch(self, batch_id: int) -> Batch | None:
        row = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return _batch(row) if row else None

    def open_batches(self) -> list[Batch]:
        return [_batch(row) for row in self._db.execute(
            "SELECT * FROM batches WHERE state = 'open' ORDER BY id")]

    def batch_files(self, batch_id: int) -> list[dict[str, Any]]:
        return [json.loads(row[0]) for row in self._db.execute(
            "SELECT file FROM batch_files WHERE batch_id = ? ORDER BY seq", (batch_id,))]

    # -- housekeeping ----------------------------------------------------------------------
    def running(self) -> list[Job]:
        return self.select([JobState.RUNNING])

    def prune(self, before: float) -> list[str]:
        """Forget done jobs and closed batches finished before `before` (batches only once
        none of their jobs is left); returns the manifest names of the batches removed."""
        with self.transaction():
            self._write("DELETE FROM jobs WHERE state = 'done' AND finished < ?", (before,))
            gone = [(int(row[0]), str(row[1])) for row in self._db.execute(
                "SELECT id, manifest FROM batches AS b WHERE b.state = 'closed' AND b.closed < ? "
                "AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.batch_id = b.id)", (before,))]
            for batch_id, _ in gone:
                self._write("DELETE FROM batch_files WHERE batch_id = ?", (batch_id,))
                self._write("DELETE FROM batches WHERE id = ?", (batch_id,))
        return [manifest for _, manifest in gone if manifest]

    # -- storage commitment ----------------------------------------------------------------
    def remember_object(self, sop: str, path: str, sop_class: str, calling_ae: str,
                        stored: float) -> None:
        """A file stored for SOP instance `sop` by `calling_ae`: every sender of the file
        stays known (the latest MAX_SENDERS), and all of them now see `sop_class`, the class
        the file holds now (overwritten, or kept as it was: the worker records the class of
        the file it kept)."""
        self._write("INSERT OR REPLACE INTO stored_objects (sop, path, sop_class, calling_ae, "
                    "stored) VALUES (?,?,?,?,?)", (sop, path, sop_class, calling_ae, stored))
        self._write("UPDATE stored_objects SET sop_class = ? WHERE sop = ? AND path = ? AND "
                    "sop_class != ?", (sop_class, sop, path, sop_class))
        self._write("DELETE FROM stored_objects WHERE sop = ? AND path = ? AND rowid NOT IN "
                    "(SELECT rowid FROM stored_objects WHERE sop = ? AND path = ? ORDER BY "
                    "stored DESC LIMIT ?)", (sop, path, sop, path, MAX_SENDERS))

    def stored_objects(self, sops: Sequence[str]) -> dict[str, list[tuple[str, str, str]]]:
        """(path, SOP class, calling AE) of every file stored for each SOP instance."""
        found: dict[str, list[tuple[str, str, str]]] = {}
        unique = list(dict.fromkeys(sops))
        for start in range(0, len(unique), 500):  # SQLite's bound on parameters
            part = unique[start:start + 500]
            for row in self._db.execute(
                    "SELECT sop, path, sop_class, calling_ae FROM stored_objects WHERE sop IN "
                    f"({','.join('?' * len(part))}) ORDER BY stored DESC", part):
                found.setdefault(row[0], []).append((row[1], row[2], row[3]))
        return found

    def moved_object(self, sop: str, old: str, new: str) -> None:
        """A stored file was renamed (rename on end of study)."""
        self._write("UPDATE OR REPLACE stored_objects SET path = ? WHERE sop = ? AND path = ?",
                    (new, sop, old))

    def manifest_of_file(self, sop: str, path: str) -> str:
        """The manifest name of a batch listing this file of this SOP instance, or ''."""
        row = self._db.execute(
            "SELECT b.manifest FROM batch_files AS f JOIN batches AS b ON b.id = f.batch_id "
            "WHERE f.sop = ? AND f.path = ? ORDER BY b.id DESC LIMIT 1", (sop, path)).fetchone()
        return str(row[0]) if row else ""

    def transaction_known(self, transaction_uid: str) -> bool:
        return self._db.execute("SELECT 1 FROM commitments WHERE transaction_uid = ? LIMIT 1",
                                (transaction_uid,)).fetchone() is not None

    def commitment_known(self, request_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM commitments WHERE request_id = ?",
                                (request_id,)).fetchone() is not None

    def add_commitment(self, request_id: str, transaction_uid: str, calling_ae: str,
                       association: str, received: float, job_id: int, committed: int,
                       failed: int, held: bool) -> None:
        self._write("INSERT INTO commitments (request_id, transaction_uid, calling_ae, "
                    "association, received, job_id, committed, failed, held) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (request_id, transaction_uid, calling_ae, association, received, job_id,
                     committed, failed, int(held)))
        self._count(Counter.REQUESTS)
        self._count(Counter.COMMITTED, committed)
        self._count(Counter.FAILED, failed)

    def held_commitments(self, association: str | None = None,
                         request_id: str | None = None) -> list[tuple[str, int]]:
        """(request ID, job ID) of reports held for their requesting association."""
        sql = "SELECT request_id, job_id FROM commitments WHERE held = 1"
        params: list[Any] = []
        if association is not None:
            sql += " AND association = ?"
            params.append(association)
        if request_id is not None:
            sql += " AND request_id = ?"
            params.append(request_id)
        return [(str(row[0]), int(row[1])) for row in self._db.execute(sql, params)]

    def release_commitment(self, request_id: str, job_id: int, now: float,
                           delivered: bool) -> bool:
        """End a report's hold: its job runs from `now`, or with `delivered` is done (it was
        answered on the requesting association).  False when the job is no longer waiting."""
        with self.transaction():
            self._write("UPDATE commitments SET held = 0 WHERE request_id = ?", (request_id,))
            if delivered:
                cursor = self._write(
                    "UPDATE jobs SET state = 'done', finished = ?, result = 'delivered on "
                    "the requesting association' WHERE id = ? AND state = 'pending' AND "
                    "attempts = 0", (now, job_id))
            else:
                cursor = self._write("UPDATE jobs SET not_before = ? WHERE id = ? AND state = "
                                     "'pending' AND not_before > ?", (now, job_id, now))
            if delivered and cursor.rowcount > 0:
                self._count(Counter.DELIVERED)
        return cursor.rowcount > 0

    # -- counters --------------------------------------------------------------------------
    def _count(self, counter: Counter, by: int = 1) -> None:
        if by:
            self._write("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                        "DO UPDATE SET value = value + excluded.value", (str(counter), by))

    def counters(self) -> dict[str, int]:
        """The storage commitment counters (every Counter, 0 when never counted)."""
        values = dict.fromkeys(map(str, Counter), 0)
        values.update({str(row[0]): int(row[1]) for row in
                       self._db.execute("SELECT name, value FROM counters")})
        return values

    def delivery_state(self, request_id: str) -> str | None:
        """The state of a request's delivery job: None when the request is unknown, '' when
        its job is gone (pruned)."""
        row = self._db.execute(
            "SELECT j.state FROM commitments AS c LEFT JOIN jobs AS j ON j.id = c.job_id "
            "WHERE c.request_id = ?", (request_id,)).fetchone()
        return None if row is None else str(row[0] or "")

    def forget_dead_deliveries(self, before: float) -> list[tuple[int, str, str]]:
        """Delete the dead delivery jobs that died before `before` (their reports are of no
        use any more); (job ID, request ID, transaction UID) of each."""
        with self.transaction():
            gone = [(int(row[0]), str(row[1]), str(row[2])) for row in self._db.execute(
                "SELECT j.id, c.request_id, c.transaction_uid FROM jobs AS j JOIN commitments "
                "AS c ON c.job_id = j.id WHERE j.kind = ? AND j.state = 'dead' AND "
                "j.finished < ?", (str(JobKind.COMMITMENT), before))]
            for job_id, _, _ in gone:
                self._write("DELETE FROM jobs WHERE id = ?", (job_id,))
        return gone

    def ended_holds(self, now: float) -> list[tuple[str, int, str, str]]:
        """End the holds whose job is due by `now` (see jobs/commitment.py); (request ID,
        job ID, transaction UID, calling AE title) of each."""
        rows = [(str(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in self._db.execute(
            "SELECT c.request_id, c.job_id, c.transaction_uid, c.calling_ae FROM commitments "
            "AS c JOIN jobs AS j ON j.id = c.job_id WHERE c.held = 1 AND j.not_before <= ?",
            (now,))]
        if rows:
            with self.transaction():
                for request_id, _, _, _ in rows:
                    self._write("UPDATE commitments SET held = 0 WHERE request_id = ?",
                                (request_id,))
        return rows

    def prune_commitments(self, before: float) -> int:
        """Forget objects stored and requests received before `before` (requests only once
        their job is finished and gone); returns the objects forgotten."""
        with self.transaction():
            gone = self._write("DELETE FROM stored_objects WHERE stored < ?", (before,)).rowcount
            self._write("DELETE FROM commitments WHERE received < ? AND NOT EXISTS (SELECT 1 "
                        "FROM jobs WHERE jobs.id = commitments.job_id)", (before,))
        return int(gone)

    # -- the outbox ------------------------------------------------------------------------
    def offsets(self) -> dict[str, int]:
        """How far each outbox segment has been consumed."""
        return {str(row[0]): int(row[1])
                for row in self._db.execute("SELECT segment, offset FROM outbox")}

    def set_offset(self, segment: str, offset: int) -> None:
        self._write("INSERT OR REPLACE INTO outbox (segment, offset) VALUES (?, ?)",
                    (segment, offset))

    def forget_segment(self, segment: str) -> None:
        with self.transaction():
            self._write("DELETE FROM outbox WHERE segment = ?", (segment,))

    def settled(self, segment: str) -> bool:
        """Whether nothing made from the segment's records is still to happen: its reception
        jobs are finished, and every batch its objects joined is closed with every job of it
        finished."""
        row = self._db.execute(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE segment = ? AND state IN "
            " ('pending', 'running')) OR EXISTS (SELECT 1 FROM batch_files AS f JOIN batches "
            " AS b ON b.id = f.batch_id WHERE f.segment = ? AND (b.state = 'open' OR EXISTS "
            " (SELECT 1 FROM jobs AS j WHERE j.batch_id = b.id AND j.state IN "
            " ('pending', 'running'))))", (segment, segment)).fetchone()
        return not row[0]
