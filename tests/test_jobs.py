"""[jobs]: the supervised job runner -- timeouts that kill the whole process group, retries
with backoff, dead letters, `dicom-ingestd jobs`, and at-least-once delivery across a
systemctl-restart-like stop (SIGTERM, then start) and a SIGKILL of the master.

Every job is a real process; reception jobs are queued by real storescu transfers.
"""

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.daemon import REPO, Daemon, free_port
from support.data import make_study
from support.peers import storescu
from support.wait import wait_until

from dicom_ingestd.config.schema import JobsConfig
from dicom_ingestd.jobs.queue import JobKind, JobQueue, JobState
from dicom_ingestd.jobs.runner import JobRunner


def jobs_settings(tmp_path: Path, command: list[str], **jobs: Any) -> dict[str, dict[str, Any]]:
    jobs.setdefault("state_directory", str(tmp_path / "state"))
    jobs.setdefault("retry_backoff", 1)
    return {"network": {"port": free_port()}, "events": {"exec_on_reception": command},
            "jobs": jobs}


def jobs_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_ingestd", "jobs", *args, "-c",
                           str(daemon.config_path)], capture_output=True, text=True,
                          timeout=30, cwd=REPO)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_timeout_kills_the_whole_process_group(tmp_path: Path, daemon_factory: Any) -> None:
    pids = tmp_path / "pids"
    # The job leaves a grandchild behind in its group, then hangs.
    command = ["/bin/sh", "-c", f'sleep 60 & echo $! >> {pids}; sleep 60']
    daemon = daemon_factory(jobs_settings(tmp_path, command, timeout=1, retries=0))
    storescu(daemon.port, *make_study(tmp_path / "a", 1))
    daemon.wait_log("job 1 failed: timed out after 1 s (killed by SIGTERM)", timeout=10)
    assert "dead after 1 attempt(s)" in daemon.log()
    grandchild = int(pids.read_text().split()[0])
    wait_until(lambda: not alive(grandchild), 5, "the grandchild's end")
    listing = jobs_cli(daemon, "list")
    assert listing.returncode == 0, listing.stderr
    assert "dead" in listing.stdout.splitlines()[1]


def test_failed_run_is_retried_with_backoff(tmp_path: Path, daemon_factory: Any) -> None:
    # Fails on its first run only.
    command = ["/bin/sh", "-c", 'echo "run $DICOM_JOB_ATTEMPT"; [ "$DICOM_JOB_ATTEMPT" -ge 2 ]']
    daemon = daemon_factory(jobs_settings(tmp_path, command, retries=2))
    storescu(daemon.port, *make_study(tmp_path / "a", 1))
    log = daemon.wait_log("job 1 finished: exit status 0", timeout=10)
    assert "job 1 failed: exit status 1" in log and "retry 1 of 2 in 1 s" in log
    assert "job 1 stdout: run 1" in log and "job 1 stdout: run 2" in log
    assert log.index("retry 1 of 2") < log.index("job 1 stdout: run 2")
    shown = jobs_cli(daemon, "show", "1")
    assert shown.returncode == 0, shown.stderr
    assert "state:     done" in shown.stdout and "runs:      2 of at most 3" in shown.stdout
    assert "env:       DICOM_SOP_INSTANCE_UID=" in shown.stdout


def test_dead_letter_and_retry_by_hand(tmp_path: Path, daemon_factory: Any) -> None:
    flag = tmp_path / "fixed"
    command = ["/bin/sh", "-c", f'echo oops >&2; test -e {flag}']
    daemon = daemon_factory(jobs_settings(tmp_path, command, retries=1))
    storescu(daemon.port, *make_study(tmp_path / "a", 1))
    log = daemon.wait_log("dead after 2 attempt(s)", timeout=10)
    assert "job 1 stderr: oops" in log
    listing = jobs_cli(daemon, "list", "--state", "dead")
    assert "1 dead" in listing.stdout and " dead " in listing.stdout
    flag.touch()
    retried = jobs_cli(daemon, "retry", "1")
    assert retried.returncode == 0, retried.stderr
    daemon.wait_log("job 1 finished: exit status 0", timeout=10)
    assert jobs_cli(daemon, "retry", "99").returncode == 1
    assert "state:     done" in jobs_cli(daemon, "show", "1").stdout


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_pending_and_running_jobs_complete_after_a_restart(
        tmp_path: Path, daemon_factory: Any, how: signal.Signals) -> None:
    runs = tmp_path / "runs"
    # The first run outlives any scheduling delay of a loaded machine, so the stop (or the
    # restart's kill of the orphan) always lands in the middle of it; later runs are short.
    first = tmp_path / "first-run"
    command = ["/bin/sh", "-c", f'echo "start $DICOM_JOB_ID" >> {runs}; '
               f'if [ -e {first} ]; then sleep 0.3; else touch {first}; sleep 60; fi; '
               f'echo "end $DICOM_JOB_ID" >> {runs}']
    settings = jobs_settings(tmp_path, command, concurrency=1)
    daemon = daemon_factory(settings)
    storescu(daemon.port, *make_study(tmp_path / "a", 3))
    wait_until(lambda: runs.exists() and "start 1" in runs.read_text(), 10, "job 1's start")
    # This test is about queued and running jobs (records not yet read are test_event_path's),
    # so all three are queued first.
    wait_until(lambda: len(jobs_cli(daemon, "list").stdout.splitlines()) == 5, 10,
               "three jobs queued")
    daemon.proc.send_signal(how)
    daemon.proc.wait(15)
    text = runs.read_text()
    assert "end 1" not in text and "start 2" not in text
    if how == signal.SIGTERM:
        assert daemon.proc.returncode == 0
        assert "job 1: interrupted (killed by SIGTERM) by the daemon's stop" in daemon.log()
        assert "2 job(s) pending" in daemon.log() or "3 job(s) pending" in daemon.log()
    again = daemon_factory(settings)
    wait_until(lambda: all(f"end {n}" in runs.read_text() for n in (1, 2, 3)), 15,
               "every job's end")
    log = again.log()
    assert "3 job(s) pending" in log
    if how == signal.SIGKILL:
        # The database still said running; the orphaned first run was still going: it was
        # killed, not left to run alongside its second run.
        assert "job 1 (reception) was running when the daemon ended; it runs again" in log
        assert "still runs from before the restart; killing it" in log
    lines = runs.read_text().splitlines()
    assert lines.count("start 1") == 2 and lines.count("end 1") == 1
    assert lines[-4:] == ["start 2", "end 2", "start 3", "end 3"]


def test_job_output_lines_carry_journal_fields(tmp_path: Path) -> None:
    """The runner in-process (a real subprocess): each output line is a log record whose
    journal fields name the job, its study and its command."""
    queue = JobQueue(tmp_path / "state")
    selector = selectors.DefaultSelector()
    finished: list[tuple[int, bool]] = []
    runner = JobRunner(queue, selector, JobsConfig(), prepare=lambda job: {},
                       on_finished=lambda job_id, final: finished.append((job_id, final)))
    command = ["/bin/sh", "-c", "echo out; echo err >&2; printf partial"]
    job_id = queue.add(JobKind.RECEPTION, command, command, {"DICOM_X": "1"}, max_attempts=1,
                       timeout=10, now=time.time(), study_uid="1.2.3")
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Capture()
    logger = logging.getLogger("dicom_ingestd.jobs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        deadline = time.monotonic() + 10
        while not finished and time.monotonic() < deadline:
            runner.tick()
            for key, _ in selector.select(0.1):
                key.data(key.fileobj)
    finally:
        logger.removeHandler(handler)
    assert finished == [(job_id, True)]
    job = queue.get(job_id)
    assert job is not None and job.state is JobState.DONE
    lines = {r.getMessage(): getattr(r, "journal", {}) for r in records}
    fields = lines[f"job {job_id} stdout: out"]
    assert fields["JOB_ID"] == job_id and fields["DICOM_STUDY_UID"] == "1.2.3"
    assert fields["JOB_COMMAND"] == " ".join(command) and fields["JOB_STREAM"] == "stdout"
    assert lines[f"job {job_id} stderr: err"]["JOB_STREAM"] == "stderr"
    assert f"job {job_id} stdout: partial" in lines  # a last line without newline
    assert any(m.startswith(f"job {job_id} finished: exit status 0") for m in lines)
    queue.close()


def test_a_full_runner_waits_for_an_end_of_run_not_for_the_clock(tmp_path: Path) -> None:
    """Every slot busy and more jobs due: the runner needs no tick until a run ends (its
    pidfd wakes the loop) or a run's deadline comes, however long the wait; a runner with a
    free slot looks at the queue once per poll interval, never in a loop."""
    queue = JobQueue(tmp_path / "state")
    selector = selectors.DefaultSelector()
    now = [1000.0]
    runner = JobRunner(queue, selector, JobsConfig(concurrency=1), prepare=lambda job: {},
                       on_finished=lambda job_id, final: None, delivery_concurrency=1,
                       clock=lambda: now[0])
    command = ["sleep", "30"]
    for _ in range(3):
        queue.add(JobKind.RECEPTION, command, command, {}, max_attempts=1, timeout=0,
                  now=time.time())
    try:
        runner.tick()
        assert runner.running() == 1
        for _ in range(3):  # the delivery pool is free: a look per poll interval
            now[0] += 5.0
            runner.tick()
            assert runner.timeout() == pytest.approx(1.0)
        queue.add(JobKind.COMMITMENT, command, command, {"DICOM_CALLING_AE": "A"},
                  max_attempts=1, timeout=20, now=time.time())
        queue.add(JobKind.COMMITMENT, command, command, {"DICOM_CALLING_AE": "B"},
                  max_attempts=1, timeout=20, now=time.time())
        runner.poke()
        assert runner.timeout() == 0.0
        runner.tick()
        assert runner.running() == 2  # one slot each: both pools are full now
        for _ in range(3):  # long past the poll interval: only the deadline counts
            now[0] += 5.0
            runner.poke()  # something queued: no slot, so no tick needed either
            assert runner.timeout() == pytest.approx(1035.0 - now[0])
            runner.tick()
    finally:
        runner.stop(grace=1)
        queue.close()


def test_a_job_database_refusing_writes_is_logged_once_not_every_attempt(
        tmp_path: Path) -> None:
    """The job database refuses to record a start (here: another connection holds its
    write lock, as a full state file system would fail it): the run is stopped and tried
    again every RECORD_RETRY, with one error line (then a reminder every few minutes), not
    one per attempt; the recovery is logged."""
    import sqlite3

    queue = JobQueue(tmp_path / "state", busy_timeout=0.05)
    selector = selectors.DefaultSelector()
    now = [1000.0]
    runner = JobRunner(queue, selector, JobsConfig(), prepare=lambda job: {},
                       on_finished=lambda job_id, final: None, clock=lambda: now[0])
    with queue.transaction():
        job_id = queue.add(JobKind.RECEPTION, ["true"], ["true"], {}, max_attempts=1,
                           timeout=10, now=time.time())
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    def step() -> None:
        runner.tick()
        deadline = time.monotonic() + 5
        while runner.running() and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                key.data(key.fileobj)
        now[0] += 3.0  # past RECORD_RETRY

    handler = Capture()
    logger = logging.getLogger("dicom_ingestd.jobs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    blocker = sqlite3.connect(tmp_path / "state" / "jobs.sqlite", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        for _ in range(5):
            step()
        blocker.execute("ROLLBACK")
        step()
    finally:
        blocker.close()
        logger.removeHandler(handler)
        runner.stop(grace=1)
    messages = [r.getMessage() for r in records]
    assert len([m for m in messages if "cannot record its start" in m]) == 1, messages
    assert f"job {job_id}: its start is recorded; the job database takes writes again" \
        in messages
    job = queue.get(job_id)
    assert job is not None and job.state is JobState.DONE
    queue.close()


def master_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_master_sleeps_while_every_job_slot_is_busy(tmp_path: Path,
                                                        daemon_factory: Any) -> None:
    """The master with its only slot busy and a job waiting for it: idle, not spinning
    (the bound is generous: a loop polling for a free slot takes a whole core); the waiting
    job runs when the slot frees."""
    runs = tmp_path / "runs"
    command = ["/bin/sh", "-c", f'echo "start $DICOM_JOB_ID" >> {runs}; sleep 6']
    daemon = daemon_factory(jobs_settings(tmp_path, command, concurrency=1))
    storescu(daemon.port, *make_study(tmp_path / "a", 2))
    wait_until(lambda: runs.exists() and "start 1" in runs.read_text(), 10, "job 1's start")
    time.sleep(1)  # the second job is queued, and waits
    before = master_cpu_seconds(daemon.proc.pid)
    time.sleep(4)
    used = master_cpu_seconds(daemon.proc.pid) - before
    assert "start 2" not in runs.read_text()
    assert used < 0.5, f"the master used {used:.2f} s of CPU in 4 s with nothing to do"
    wait_until(lambda: "start 2" in runs.read_text(), 15, "job 2's start")


def test_backoff_grows_and_is_capped_by_the_queues_timestamps(tmp_path: Path,
                                                             daemon_factory: Any) -> None:
    """Back-off measured from the job database and the runs themselves, not the log: after
    failure k the job is pending until `finished` + min(1 * 2^(k-1), 2) s, and no run starts
    before that instant."""
    import sqlite3

    starts = tmp_path / "starts"
    command = ["/bin/sh", "-c",
               f'date +%s.%N >> {starts}; [ "$DICOM_JOB_ATTEMPT" -ge 4 ]']
    daemon = daemon_factory(jobs_settings(tmp_path, command, retries=3, retry_backoff=1,
                                          retry_backoff_max=2))
    storescu(daemon.port, *make_study(tmp_path / "a", 1))
    database = tmp_path / "state" / "jobs.sqlite"
    wait_until(database.exists, 10, "the job database")
    seen: dict[int, tuple[float, float]] = {}  # failures -> (finished, not_before)
    deadline = time.monotonic() + 30
    state = ""
    while state != "done" and time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True,
                                                timeout=5)) as db:
            row = db.execute("SELECT state, attempts, finished, not_before FROM jobs "
                             "WHERE id = 1").fetchone()
        if row is not None:
            state, attempts, finished, not_before = row
            if state == "pending" and attempts:
                seen[attempts] = (finished, not_before)
        time.sleep(0.05)
    assert state == "done", f"job 1 is {state!r} after 30 s"
    assert sorted(seen) == [1, 2, 3], seen
    for failures, expected in ((1, 1.0), (2, 2.0), (3, 2.0)):
        finished, not_before = seen[failures]
        assert not_before - finished == pytest.approx(expected, abs=0.01), (failures, seen)
    runs = [float(line) for line in starts.read_text().split()]
    assert len(runs) == 4, runs
    for failures in (1, 2, 3):  # the next run waits for not_before, and not much longer
        wait = runs[failures] - seen[failures][1]
        assert -0.05 <= wait < 1.5, (failures, wait, runs, seen)


@pytest.mark.parametrize(("durable", "expected"), [(True, 2), (False, 1)])
def test_the_queue_syncs_its_commits_when_storage_fsync_is_on(tmp_path: Path, durable: bool,
                                                              expected: int) -> None:
    """With storage.fsync the job database commits with synchronous = FULL (2): a committed
    job survives a power cut.  Checked on the connection the queue uses, not by a power cut
    (the outbox would hide a lost tail of the database until its segment is removed)."""
    queue = JobQueue(tmp_path / "state", durable=durable)
    try:
        assert queue._db.execute("PRAGMA synchronous").fetchone()[0] == expected
        assert queue._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        queue.close()


def test_at_most_concurrency_jobs_run_at_once(tmp_path: Path, daemon_factory: Any) -> None:
    """jobs.concurrency: each job notes how many jobs are running as it starts (a file per
    running job); with 6 objects and concurrency 2 none ever sees more than 2."""
    running, seen = tmp_path / "running", tmp_path / "seen"
    running.mkdir()
    script = (f'touch {running}/$$; ls {running} | wc -l >> {seen}; sleep 0.5; '
              f'rm {running}/$$')
    daemon = daemon_factory(jobs_settings(tmp_path, ["/bin/sh", "-c", script], concurrency=2))
    storescu(daemon.port, *make_study(tmp_path / "a", 6))
    wait_until(lambda: seen.exists() and len(seen.read_text().split()) == 6, 30,
               "six jobs run")
    wait_until(lambda: not list(running.iterdir()), 10, "the last job's end")
    counts = [int(n) for n in seen.read_text().split()]
    assert max(counts) <= 2, counts
