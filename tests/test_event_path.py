"""The event path's promise: every object answered 0x0000 reaches its jobs and its study's
batch, whatever the size of its values, and whether the master is slow, paused, killed or
its state storage full, read-only or damaged; a job sees exactly its own study's objects.

Real daemons, real senders (pynetdicom's SCU in tests/ack_sender.py writes down every status
it was answered), real faults: SIGSTOP/SIGKILL of the master, tmpfs file systems filled up
or remounted read-only, garbage written into the job database.
"""

import json
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ack_sender import acknowledged
from pydicom import dcmread
from support.daemon import REPO, Daemon, start_daemon, write_config
from support.data import make_study
from support.mounts import mounted_ext4, mounted_tmpfs
from support.peers import echoscu
from support.recorder import Recorder, complete_lines
from support.wait import wait_until

SENDER = Path(__file__).with_name("ack_sender.py")

EOSTUDY_SOURCE = '''\
import json, os, sys
manifest = json.load(open(os.environ["DICOM_MANIFEST"]))
record = {"study": os.environ["DICOM_STUDY_UID"], "batch": int(os.environ["DICOM_BATCH"]),
          "count": int(os.environ["DICOM_FILE_COUNT"]), "manifest": os.environ["DICOM_MANIFEST"],
          "job": os.environ["DICOM_JOB_ID"],
          "objects": [[f["sop_instance_uid"], f["path"]] for f in manifest["files"]]}
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (json.dumps(record) + "\\n").encode())
os.close(fd)
'''


def send(port: int, ledger: Path, files: list[Path], *, deadline: float = 60.0,
         per_association: int = 0, by_study: bool = False,
         timeout: float = 10.0) -> "subprocess.Popen[bytes]":
    args = [sys.executable, str(SENDER), str(port), str(ledger), "--deadline", str(deadline),
            "--timeout", str(timeout)]
    if per_association:
        args += ["--per-association", str(per_association)]
    if by_study:
        args.append("--by-study")
    return subprocess.Popen([*args, *map(str, files)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def statuses(ledger: Path) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in ledger.read_text().splitlines()}


def sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Ledger:
    """The eostudy command's ledger (EOSTUDY_SOURCE)."""

    def __init__(self, tmp_path: Path) -> None:
        self.script = tmp_path / "eostudy.py"
        self.script.write_text(EOSTUDY_SOURCE)
        self.path = tmp_path / "eostudy.jsonl"

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.path)]

    def runs(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in complete_lines(self.path) if line]


def settings(tmp_path: Path, recorder: Recorder | None = None, ledger: Ledger | None = None,
             **events: Any) -> dict[str, dict[str, Any]]:
    values: dict[str, Any] = {"eostudy_timeout": 2, **events}
    if recorder is not None:
        values["exec_on_reception"] = recorder.command()
    if ledger is not None:
        values["exec_on_eostudy"] = ledger.command()
    return {"events": values, "jobs": {"retry_backoff": 1, "concurrency": 8}}


def received(recorder: Recorder) -> list[str]:
    return [r["env"]["DICOM_SOP_INSTANCE_UID"] for r in recorder.records()]


# --- values of any size ------------------------------------------------------------------

def oversized_study(folder: Path, count: int = 3) -> list[Path]:
    """A study whose first object has a 40 kB Patient ID and a 30 kB Series Instance UID:
    together far more than a datagram (64 KiB)."""
    files = make_study(folder, count)
    ds = dcmread(files[0])
    ds.PatientID = "P" * 40_000
    ds.SeriesInstanceUID = "1.2." + "3" * 30_000
    ds.save_as(files[0])
    return files


def test_oversized_values_reach_their_jobs_and_manifest(tmp_path: Path, daemon_factory: Any,
                                                        recorder: Recorder) -> None:
    ledger = Ledger(tmp_path)
    daemon = daemon_factory(settings(tmp_path, recorder, ledger))
    files = oversized_study(tmp_path / "a")
    out = tmp_path / "ack"
    assert send(daemon.port, out, files).wait(60) == 0
    assert acknowledged(out) == [sop(f) for f in files]
    records = recorder.wait(3)
    big = next(r for r in records if len(r["env"]["DICOM_PATIENT_ID"]) == 40_000)
    assert len(big["env"]["DICOM_SERIES_UID"]) == 30_004
    wait_until(lambda: ledger.runs(), 20, "the end-of-study job")
    (run,) = ledger.runs()
    assert run["count"] == 3 and [o[0] for o in run["objects"]] == acknowledged(out)
    daemon.stop()
    assert "3 object(s) stored" in daemon.log()


def test_a_record_too_large_is_refused_and_nothing_is_left(tmp_path: Path, daemon_factory: Any,
                                                          recorder: Recorder) -> None:
    """Identifying values beyond the outbox's 1 MiB record: refused before the success
    status, the file withdrawn, no job; the daemon goes on serving."""
    daemon = daemon_factory(settings(tmp_path, recorder))
    files = make_study(tmp_path / "a", 2)
    ds = dcmread(files[0])
    ds.PatientID = "P" * 1_200_000
    ds.save_as(files[0])
    out = tmp_path / "ack"
    send(daemon.port, out, files).wait(60)
    answers = statuses(out)
    # Refused either before the record (identify bounds what it reads: 0xC000) or by the
    # record's own limit (0xA700); never acknowledged.
    assert answers[sop(files[0])] in ("a700", "c000") and answers[sop(files[1])] == "0000"
    recorder.wait(1)
    time.sleep(1)
    assert received(recorder) == [sop(files[1])]
    assert no_object_named(daemon, sop(files[0]))
    assert not no_object_named(daemon, sop(files[1]))


def test_exec_sync_oversized_objects_never_hold_a_worker(tmp_path: Path, daemon_factory: Any,
                                                         recorder: Recorder) -> None:
    config = settings(tmp_path, recorder, exec_sync=True)
    config["workers"] = {"max_associations": 3}
    daemon = daemon_factory(config)
    senders = []
    for n in range(3):
        senders.append(send(daemon.port, tmp_path / f"ack{n}",
                            oversized_study(tmp_path / f"s{n}", 1)))
    assert [s.wait(60) for s in senders] == [0, 0, 0]
    later = make_study(tmp_path / "later", 1)
    assert send(daemon.port, tmp_path / "ack-later", later).wait(60) == 0
    assert acknowledged(tmp_path / "ack-later") == [sop(later[0])]
    assert len(recorder.wait(4)) == 4
    assert "Local Limit Exceeded" not in daemon.log()


def test_exec_sync_waits_a_bounded_time_for_a_paused_master(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    daemon = daemon_factory(settings(tmp_path, recorder, exec_sync=True, exec_sync_timeout=2))
    files = make_study(tmp_path / "a", 2)
    sender = send(daemon.port, tmp_path / "ack", files, per_association=2)
    daemon.wait_log("association accepted")
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert sender.wait(30) == 0
        elapsed = time.monotonic() - started
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert acknowledged(tmp_path / "ack") == [sop(f) for f in files]
    assert 2 <= elapsed < 15, elapsed
    assert "did not finish within 2 s (events.exec_sync_timeout)" in daemon.log()
    recorder.wait(2)
    assert sorted(received(recorder)) == sorted(sop(f) for f in files)


# --- a slow, paused or killed master ----------------------------------------------------

def parallel_studies(tmp_path: Path, senders: int, studies: int, per_study: int) -> list[
        list[Path]]:
    return [[f for k in range(studies)
             for f in make_study(tmp_path / f"send{n}-{k}", per_study, name=f"{n}-{k}")]
            for n in range(senders)]


def check_every_acknowledged_object(recorder: Recorder, ledger: Ledger | None,
                                    ledgers: list[Path], timeout: float = 30.0) -> int:
    acked = [uid for path in ledgers for uid in acknowledged(path)]
    wait_until(lambda: set(received(recorder)) >= set(acked), timeout,
               "a reception job for every acknowledged object")
    if ledger is not None:
        def in_manifests() -> set[str]:
            return {o[0] for run in ledger.runs() for o in run["objects"]}
        wait_until(lambda: in_manifests() >= set(acked), timeout,
                   "every acknowledged object in an end-of-study manifest")
    return len(acked)


def test_a_paused_master_loses_no_job(tmp_path: Path, daemon_factory: Any,
                                      recorder: Recorder) -> None:
    ledger = Ledger(tmp_path)
    daemon = daemon_factory(settings(tmp_path, recorder, ledger))
    work = parallel_studies(tmp_path, 3, 2, 15)
    ledgers = [tmp_path / f"ack{n}" for n in range(3)]
    senders = [send(daemon.port, ledgers[n], work[n], per_association=5) for n in range(3)]
    # Paused while an association is at its first or second object of five, so that it has
    # objects left to store without the master (new associations wait for it).
    wait_until(lambda: sum(len(acknowledged(p)) for p in ledgers) >= 5
               and any(len(acknowledged(p)) % 5 in (1, 2) for p in ledgers), 30,
               "a few stores, one association under way")
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        during = sum(len(acknowledged(p)) for p in ledgers)
        time.sleep(3)
        during = sum(len(acknowledged(p)) for p in ledgers) - during
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert [s.wait(60) for s in senders] == [0, 0, 0]
    assert during > 0  # workers went on acknowledging while the master was paused
    assert check_every_acknowledged_object(recorder, ledger, ledgers) == 90


def test_objects_acknowledged_by_orphans_of_a_killed_master_get_their_jobs(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    ledger = Ledger(tmp_path)
    config = settings(tmp_path, recorder, ledger)
    daemon = daemon_factory(config)
    work = parallel_studies(tmp_path, 2, 1, 60)  # one association each, long enough
    ledgers = [tmp_path / f"ack{n}" for n in range(2)]
    senders = [send(daemon.port, ledgers[n], work[n]) for n in range(2)]
    wait_until(lambda: sum(len(acknowledged(p)) for p in ledgers) >= 6, 30, "a few stores")
    daemon.proc.kill()
    daemon.proc.wait(10)
    at_kill = sum(len(acknowledged(p)) for p in ledgers)
    wait_until(lambda: sum(len(acknowledged(p)) for p in ledgers) > at_kill + 5, 30,
               "orphaned workers acknowledging more objects")
    again = start_daemon(tmp_path, config | {
        "network": {"port": daemon.port},
        "storage": {"output_directory": str(daemon.out)}}, name="again")
    try:
        assert [s.wait(120) for s in senders] == [0, 0]
        assert check_every_acknowledged_object(recorder, ledger, ledgers) == 120
    finally:
        again.stop()


# --- manifests and the job database -----------------------------------------------------

def test_manifests_are_never_another_studys(tmp_path: Path, daemon_factory: Any) -> None:
    """A job database recreated by hand restarts its batch ids: the manifests do not."""
    ledger = Ledger(tmp_path)
    config = settings(tmp_path, ledger=ledger)
    first = daemon_factory(config, name="first")
    a = make_study(tmp_path / "a", 3)
    assert send(first.port, tmp_path / "ack-a", a).wait(60) == 0
    wait_until(lambda: len(ledger.runs()) == 1, 20, "study A's end-of-study job")
    first.stop()
    state = first.out / ".ingestd-state"
    for name in os.listdir(state):
        if name.startswith("jobs.sqlite"):
            os.unlink(state / name)
    config["network"] = {"port": first.port}
    config["storage"] = {"output_directory": str(first.out)}
    second = daemon_factory(config, name="second")
    b = make_study(tmp_path / "b", 2)
    assert send(second.port, tmp_path / "ack-b", b).wait(60) == 0
    study_b = str(dcmread(b[0]).StudyInstanceUID)
    wait_until(lambda: any(r["study"] == study_b for r in ledger.runs()), 20,
               "study B's end-of-study job")
    # Study A's records may be read into the new database again (at least once), but
    # every run lists exactly its own study's objects, from a manifest of its own.
    objects = {str(dcmread(f[0]).StudyInstanceUID): sorted(map(sop, f)) for f in (a, b)}
    runs = ledger.runs()
    for run in runs:
        assert sorted(o[0] for o in run["objects"]) == objects[run["study"]]
        assert run["count"] == len(objects[run["study"]])
    manifests = [r["manifest"] for r in runs]
    assert len(set(manifests)) == len({(r["study"], r["manifest"]) for r in runs})
    assert {r["manifest"] for r in runs if r["study"] == study_b}.isdisjoint(
        r["manifest"] for r in runs if r["study"] != study_b)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_job_database_is_moved_aside_and_rebuilt(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder, damage: str) -> None:
    ledger = Ledger(tmp_path)
    config = settings(tmp_path, recorder, ledger, eostudy_timeout=0)
    first = daemon_factory(config, name="first")
    a = make_study(tmp_path / "a", 3)
    assert send(first.port, tmp_path / "ack-a", a).wait(60) == 0
    recorder.wait(3)
    first.stop()  # study A is still open (no timeout, no next study)
    database = first.out / ".ingestd-state" / "jobs.sqlite"
    if damage == "garbage":
        database.write_bytes(os.urandom(8192))
    else:
        with open(database, "r+b") as fh:
            fh.truncate(1000)
    config["network"] = {"port": first.port}
    config["storage"] = {"output_directory": str(first.out)}
    config["events"]["eostudy_timeout"] = 2
    second = daemon_factory(config, name="second")
    log = second.wait_log("is damaged")
    line = next(x for x in log.splitlines() if "is damaged" in x)
    assert "CRITICAL" in line or "crit" in line.lower()
    moved = Path(line.split("moved it to ")[1].split(" and built")[0])
    assert moved.exists() and moved.name.startswith("jobs.sqlite.damaged-")
    # Study A is rebuilt from the outbox and completes; receiving goes on.
    b = make_study(tmp_path / "b", 2)
    assert send(second.port, tmp_path / "ack-b", b).wait(60) == 0
    wait_until(lambda: {r["study"] for r in ledger.runs()} >= {
        str(dcmread(a[0]).StudyInstanceUID), str(dcmread(b[0]).StudyInstanceUID)}, 20,
        "both studies' end-of-study jobs")
    by_study = {r["study"]: r for r in ledger.runs()}
    assert sorted(o[0] for o in by_study[str(dcmread(a[0]).StudyInstanceUID)]["objects"]) \
        == sorted(map(sop, a))
    assert set(received(recorder)) >= {sop(f) for f in a + b}


# --- state storage faults ---------------------------------------------------------------

def state_on_tmpfs(tmp_path: Path, recorder: Recorder, mount: Path) -> dict[str, Any]:
    config = settings(tmp_path, recorder)
    config["jobs"]["state_directory"] = str(mount / "state")
    return config


def no_object_named(daemon: Daemon, uid: str) -> bool:
    return all(uid not in p.name for p in daemon.files())


def test_a_full_state_file_system_refuses_stores_and_recovers(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    with mounted_tmpfs(tmp_path / "state-fs", "size=2m") as mount:
        daemon = daemon_factory(state_on_tmpfs(tmp_path, recorder, mount))
        before = make_study(tmp_path / "before", 1)
        assert send(daemon.port, tmp_path / "ack0", before).wait(60) == 0
        recorder.wait(1)
        filler = mount / "filler"
        with open(filler, "wb") as fh, pytest.raises(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        # The outbox's last page may still hold a record or two: those objects are
        # acknowledged (their records are durable) and get their jobs once the database can
        # be written again; the rest are refused and leave nothing behind.
        during = make_study(tmp_path / "during", 20)
        send(daemon.port, tmp_path / "ack1", during).wait(60)
        answers = statuses(tmp_path / "ack1")
        assert set(answers.values()) <= {"0000", "a700"} and "a700" in answers.values()
        assert "cannot record the object in the state directory's outbox: " \
               "No space left on device" in daemon.log()
        refused = [uid for uid, status in answers.items() if status == "a700"]
        assert all(no_object_named(daemon, uid) for uid in refused)
        assert not daemon.staging()
        filler.unlink()
        after = make_study(tmp_path / "after", 2)
        assert send(daemon.port, tmp_path / "ack2", after).wait(60) == 0
        expected = {sop(before[0]), *acknowledged(tmp_path / "ack1"), *map(sop, after)}
        wait_until(lambda: set(received(recorder)) == expected, 20,
                   "the jobs of every acknowledged object")
        records = recorder.records()
        assert len(records) == len(expected)  # each once: no job lost, none run twice
        assert len({r["env"]["DICOM_JOB_ID"] for r in records}) == len(expected)
        assert not set(received(recorder)) & set(refused)
        daemon.stop()


def test_a_state_file_system_gone_read_only_refuses_stores(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    """ext4 with errors=remount-ro after an error: the state goes read-only under the running
    daemon (a remount by hand is refused while the database is open for writing)."""
    with mounted_ext4(tmp_path / "state-fs", 32, "errors=remount-ro") as mount:
        daemon = daemon_factory(state_on_tmpfs(tmp_path, recorder, mount))
        device = Path(subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mount)],
                                     capture_output=True, text=True, check=True).stdout.strip())
        Path(f"/sys/fs/ext4/{device.name}/trigger_fs_error").write_text("1")
        during = make_study(tmp_path / "during", 2)
        send(daemon.port, tmp_path / "ack1", during).wait(60)
        assert set(statuses(tmp_path / "ack1").values()) == {"a700"}
        assert "Read-only file system" in daemon.log()
        assert all(no_object_named(daemon, sop(f)) for f in during)
        assert not daemon.staging()
        echoscu(daemon.port)  # still serving
        time.sleep(1)
        assert recorder.records() == []
        assert daemon.stop() == 0


def test_an_immutable_outbox_refuses_stores_and_recovers(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    with mounted_ext4(tmp_path / "state-fs", 32) as mount:
        daemon = daemon_factory(state_on_tmpfs(tmp_path, recorder, mount))
        current = mount / "state" / "outbox" / "current"
        subprocess.run(["chattr", "+i", str(current)], check=True)
        try:
            during = make_study(tmp_path / "during", 2)
            send(daemon.port, tmp_path / "ack1", during).wait(60)
            assert set(statuses(tmp_path / "ack1").values()) == {"a700"}
            assert "Operation not permitted" in daemon.log()
            assert all(no_object_named(daemon, sop(f)) for f in during)
        finally:
            subprocess.run(["chattr", "-i", str(current)], check=True)
        after = make_study(tmp_path / "after", 2)
        assert send(daemon.port, tmp_path / "ack2", after).wait(60) == 0
        recorder.wait(2)
        time.sleep(0.5)
        assert sorted(received(recorder)) == sorted(map(sop, after))
        assert daemon.stop() == 0


def test_an_immutable_state_directory_never_hands_a_job_another_manifest(
        tmp_path: Path, daemon_factory: Any) -> None:
    ledger = Ledger(tmp_path)
    with mounted_ext4(tmp_path / "state-fs", 32) as mount:
        config = settings(tmp_path, ledger=ledger, eostudy_timeout=1)
        config["jobs"]["state_directory"] = str(mount / "state")
        daemon = daemon_factory(config)
        studies = [make_study(tmp_path / f"s{n}", 2 + n) for n in range(3)]
        frozen = [mount / "state", mount / "state" / "manifests"]
        subprocess.run(["chattr", "+i", *map(str, frozen)], check=True)
        try:
            for n, files in enumerate(studies):
                assert send(daemon.port, tmp_path / f"ack{n}", files).wait(60) == 0
            daemon.wait_log("complete (timeout)", 10)
            time.sleep(2)  # the end-of-study jobs fail to start: no manifest can be made
        finally:
            subprocess.run(["chattr", "-i", *map(str, frozen)], check=True)
        wait_until(lambda: len({r["study"] for r in ledger.runs()}) == 3, 40,
                   "the three end-of-study jobs")
        objects = {str(dcmread(f[0]).StudyInstanceUID): sorted(map(sop, f)) for f in studies}
        for run in ledger.runs():
            assert sorted(o[0] for o in run["objects"]) == objects[run["study"]]
            assert run["count"] == len(objects[run["study"]])
        assert len({r["manifest"] for r in ledger.runs()}) == 3
        assert daemon.stop() == 0


# --- the randomized campaign --------------------------------------------------------------

def test_kills_at_random_instants_lose_no_event_and_mix_no_study(tmp_path: Path) -> None:
    kills_at_random_instants(tmp_path, kills=12, master_kills=2, studies=3, per_study=15)


@pytest.mark.slow
def test_kills_at_60_random_instants_lose_no_event_and_mix_no_study(tmp_path: Path) -> None:
    kills_at_random_instants(tmp_path, kills=60, master_kills=6, studies=4, per_study=25)


def kills_at_random_instants(tmp_path: Path, *, kills: int, master_kills: int, studies: int,
                             per_study: int) -> None:
    """3 parallel senders, `studies` studies each (more while the kills go on); the master
    and workers are SIGKILLed at random instants (at least `kills`, `master_kills` of them
    the master's), the master restarted each time.  After the end-of-study timeout: every
    acknowledged object is in exactly one manifest, of its own study, and has had its
    reception job; every study's end-of-study job ran with its complete object list; no job
    saw a foreign object.  EVENT_PATH_SEED=N repeats a run."""
    import random

    seed = int(os.environ.get("EVENT_PATH_SEED", time.time()))
    print(f"EVENT_PATH_SEED={seed}", file=sys.stderr)  # shown with a failure
    rng = random.Random(seed)
    ledger = Ledger(tmp_path)
    # Reception jobs note their object with a shell, not Python: hundreds of them run.
    receptions = tmp_path / "receptions"
    config = settings(tmp_path, None, ledger, eostudy_timeout=5)
    config["events"]["exec_on_reception"] = [
        "/bin/sh", "-c", 'printf "%s\\n" "$DICOM_SOP_INSTANCE_UID" >> "$0"', str(receptions)]

    def received_uids() -> set[str]:
        return set(complete_lines(receptions)) if receptions.exists() else set()

    out = tmp_path / "out"
    config["storage"] = {"output_directory": str(out)}
    def children(pid: int) -> list[int]:
        return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                               text=True).stdout.split()]

    daemons: list[Daemon] = []

    def start(name: str) -> tuple[Daemon, set[int]]:
        started = start_daemon(tmp_path, config, name=name)
        daemons.append(started)
        # The configuration watcher, forked before any worker, is no association.
        return started, set(children(started.proc.pid))

    daemon, spared = start("k0")
    config["network"] = {"port": daemon.port}
    work: list[list[Path]] = []
    ledgers: list[Path] = []
    senders: list[subprocess.Popen[bytes]] = []

    def another_round() -> None:
        # New studies for three more senders, until the kills are done.
        round_work = parallel_studies(tmp_path / f"round{len(work)}", 3, studies, per_study)
        for files in round_work:
            ledgers.append(tmp_path / f"ack{len(ledgers)}")
            work.append(files)
            # A sender that notices a broken association within 2 s, as DCMTK's do at once
            # (pynetdicom waits for its timeout when the peer vanishes mid-response).
            # One study per association, as storescu sends a study: after a kill the rest
            # of the study goes on an association of its own.  (A fixed count per
            # association would start the next study in the association that ends this
            # one, once a retry shifted the count: by storescp's rule that study is then
            # complete when that association is released and another stores anything.)
            senders.append(send(daemon.port, ledgers[-1], files, deadline=240,
                                by_study=True, timeout=2))

    another_round()
    wanted, wanted_master = kills, master_kills
    kills = master_kills = 0
    try:
        while kills < wanted or master_kills < wanted_master:
            if all(s.poll() is not None for s in senders):
                another_round()
            time.sleep(rng.uniform(0.02, 0.2))
            workers = [p for p in children(daemon.proc.pid) if p not in spared]
            master_now = master_kills < wanted_master and (not workers or rng.random() < 0.2)
            if workers and not master_now:
                try:
                    os.kill(rng.choice(workers), signal.SIGKILL)
                except ProcessLookupError:
                    continue  # it ended by itself: not a kill
                kills += 1
            elif master_now:
                daemon.proc.kill()
                daemon.proc.wait(10)
                kills += 1
                master_kills += 1
                time.sleep(rng.uniform(0, 0.3))
                daemon, spared = start(f"k{master_kills}")
        assert all(s.wait(240) == 0 for s in senders)
        acked = [uid for path in ledgers for uid in acknowledged(path)]
        assert len(acked) == sum(map(len, work))
        study_of = {sop(f): str(dcmread(f, stop_before_pixels=True).StudyInstanceUID)
                    for files in work for f in files}
        wait_until(lambda: {o[0] for r in ledger.runs() for o in r["objects"]} >= set(acked),
                   60, "every acknowledged object in an end-of-study manifest")
        wait_until(lambda: received_uids() >= set(acked), 60,
                   "a reception job for every acknowledged object")
        runs = ledger.runs()
        manifests: dict[str, set[str]] = {}
        for run in runs:
            for uid, _ in run["objects"]:
                assert study_of[uid] == run["study"], "a job saw another study's object"
            manifests.setdefault(run["manifest"], set()).update(o[0] for o in run["objects"])
        for uid in acked:
            holders = [m for m, objects in manifests.items() if uid in objects]
            assert len(holders) == 1, (uid, holders)
        complete = {study: sorted(u for u in acked if study_of[u] == study)
                    for study in set(study_of.values())}
        for study, objects in complete.items():
            if not any(sorted(o[0] for o in r["objects"]) == objects
                       for r in runs if r["study"] == study):
                logs = "\n".join(line for p in sorted(tmp_path.glob("k*.log"))
                                  for line in p.read_text().splitlines()
                                  if study in line and ("complete" in line or "batch" in line
                                                        or "open with" in line))
                batches = [(r["batch"], r["count"]) for r in runs if r["study"] == study]
                raise AssertionError(f"study {study} incomplete: {len(objects)} objects, runs "
                                     f"(batch, count) {batches}\n{logs}")
        print(f"{kills} kills ({master_kills} of the master), {len(acked)} objects "
              f"acknowledged, {len(runs)} end-of-study runs, {len(received_uids())} objects "
              "with reception runs, nothing lost")
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
        for each in daemons:
            each.stop()


def test_single_process_mode_records_events_too(tmp_path: Path, daemon_factory: Any,
                                                recorder: Recorder) -> None:
    ledger = Ledger(tmp_path)
    config = settings(tmp_path, recorder, ledger)
    config["workers"] = {"process_model": "single"}
    daemon = daemon_factory(config)
    files = oversized_study(tmp_path / "a")
    assert send(daemon.port, tmp_path / "ack", files).wait(60) == 0
    assert len(recorder.wait(3)) == 3
    wait_until(lambda: ledger.runs(), 20, "the end-of-study job")
    assert ledger.runs()[0]["count"] == 3


def test_an_object_sent_again_after_its_study_is_complete_opens_no_batch(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    """A sender that never got a response sends the object again, maybe after the study
    was complete: its batch's jobs have it; no second manifest lists it."""
    ledger = Ledger(tmp_path)
    daemon = daemon_factory(settings(tmp_path, recorder, ledger, eostudy_timeout=1))
    files = make_study(tmp_path / "a", 3)
    assert send(daemon.port, tmp_path / "ack", files).wait(60) == 0
    wait_until(lambda: ledger.runs(), 20, "the end-of-study job")
    assert send(daemon.port, tmp_path / "ack-again", files[1:2]).wait(60) == 0
    daemon.wait_log("was sent again after the study was complete")
    recorder.wait(4)  # its reception job runs again: at least once
    late = make_study(tmp_path / "a", 1, study_uid=str(dcmread(files[0]).StudyInstanceUID),
                      name="late")
    assert send(daemon.port, tmp_path / "ack-late", late).wait(60) == 0
    wait_until(lambda: len(ledger.runs()) == 2, 20, "batch 2's end-of-study job")
    first, second = ledger.runs()
    assert (first["batch"], second["batch"]) == (1, 2)
    assert [o[0] for o in second["objects"]] == [sop(late[0])]


# --- found by attacking the event path from outside ------------------------------------------

def master_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_job_database_refusing_writes_never_spins_the_master(
        tmp_path: Path, daemon_factory: Any) -> None:
    with mounted_ext4(tmp_path / "state-fs", 32, "errors=remount-ro") as mount:
        config = settings(tmp_path)
        config["events"]["exec_on_reception"] = ["/bin/false"]
        config["jobs"].update(state_directory=str(mount / "state"), retries=50)
        daemon = daemon_factory(config)
        assert send(daemon.port, tmp_path / "ack", make_study(tmp_path / "a", 1)).wait(60) == 0
        daemon.wait_log("job ")
        device = Path(subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mount)],
                                     capture_output=True, text=True, check=True).stdout.strip())
        Path(f"/sys/fs/ext4/{device.name}/trigger_fs_error").write_text("1")
        time.sleep(1)
        before = master_cpu(daemon.proc.pid)
        time.sleep(4)
        used = master_cpu(daemon.proc.pid) - before
        assert used < 0.5, f"the master used {used:.2f} CPU-seconds in 4 s"
        assert "takes writes again" not in daemon.log()
        echoscu(daemon.port)
        assert daemon.stop() == 0


def test_things_planted_in_the_outbox_neither_block_nor_stop_the_event_path(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    daemon = daemon_factory(settings(tmp_path, recorder))
    box = daemon.out / ".ingestd-state" / "outbox"
    (box / "00000000000000000001-1.seg").mkdir()
    os.mkfifo(box / "00000000000000000002-1.seg")
    first = make_study(tmp_path / "a", 2)
    assert send(daemon.port, tmp_path / "ack1", first).wait(60) == 0
    recorder.wait(2)
    # `current` removed by hand: stores are refused until housekeeping puts it back.
    (box / "current").unlink()
    later = make_study(tmp_path / "b", 1)
    wait_until(lambda: send(daemon.port, tmp_path / "ack2", later).wait(60) == 0
               and "0000" in statuses(tmp_path / "ack2").values(), 20,
               "stores accepted again")
    # A FIFO planted as `current` never holds an association.
    (box / "current").unlink()
    os.mkfifo(box / "current")
    fifo = make_study(tmp_path / "c", 1)
    started = time.monotonic()
    send(daemon.port, tmp_path / "ack3", fifo, deadline=5).wait(30)
    assert time.monotonic() - started < 20
    wait_until(lambda: len(recorder.records()) >= 3, 20, "the jobs of every acknowledged one")
    acked = {*acknowledged(tmp_path / "ack1"), *acknowledged(tmp_path / "ack2"),
             *acknowledged(tmp_path / "ack3")}
    wait_until(lambda: set(received(recorder)) >= acked, 20, "every acknowledged object's job")
    assert "not a segment" in daemon.log() or "not a regular file" in daemon.log()
    echoscu(daemon.port)


def test_values_too_long_for_one_variable_still_let_the_job_run(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    daemon = daemon_factory(settings(tmp_path, recorder))
    files = make_study(tmp_path / "a", 1)
    ds = dcmread(files[0])
    ds.PatientID = "P" * 200_000
    ds.save_as(files[0])
    assert send(daemon.port, tmp_path / "ack", files).wait(60) == 0
    (record,) = recorder.wait(1)
    assert "DICOM_PATIENT_ID" not in record["env"]  # left out; the object holds it
    assert record["env"]["DICOM_SOP_INSTANCE_UID"] == sop(files[0])


def test_a_reload_turning_events_off_keeps_them_for_running_associations(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    config = settings(tmp_path, recorder)
    daemon = daemon_factory(config)
    files = make_study(tmp_path / "a", 60)
    sender = send(daemon.port, tmp_path / "ack", files)
    wait_until(lambda: len(acknowledged(tmp_path / "ack")) >= 5, 30, "a few stores")
    off = {k: dict(v) for k, v in config.items()}
    off["events"] = {}
    off["network"] = {"port": daemon.port, "bind_address": "127.0.0.1"}
    off["storage"] = {"output_directory": str(daemon.out)}
    off["logging"] = {"level": "debug"}
    write_config(daemon.config_path, off)
    daemon.proc.send_signal(signal.SIGHUP)
    assert sender.wait(60) == 0
    wait_until(lambda: set(received(recorder)) >= set(acknowledged(tmp_path / "ack")), 20,
               "the jobs of every object of the association that began before the reload")


@pytest.mark.parametrize("events", [False, True], ids=["without-events", "with-events"])
def test_an_idle_master_sleeps(tmp_path: Path, daemon_factory: Any, recorder: Recorder,
                               events: bool) -> None:
    daemon = daemon_factory(settings(tmp_path, recorder) if events else None)
    assert send(daemon.port, tmp_path / "ack", make_study(tmp_path / "a", 2)).wait(60) == 0
    time.sleep(1)
    before = master_cpu(daemon.proc.pid)
    time.sleep(3)
    used = master_cpu(daemon.proc.pid) - before
    assert used < 0.3, f"an idle master used {used:.2f} CPU-seconds in 3 s"


# --- the master's consumer in process: a write refused inside its transaction ---------------


def _consumer(tmp_path: Path) -> Any:
    """The master's EventService on a state directory of its own (jobs are queued, never
    run: nothing ticks its runner)."""
    from dicom_ingestd.config.load import config_from_mapping
    from dicom_ingestd.jobs.service import EventService

    out = tmp_path / "out"
    out.mkdir()
    config = config_from_mapping({
        "storage": {"output_directory": str(out), "fsync": False},
        "events": {"exec_on_reception": ["/bin/true", "#f"], "exec_on_eostudy": ["/bin/true"],
                   "eostudy_timeout": 0},
        "jobs": {"state_directory": str(tmp_path / "state")}})
    service = EventService(config, selectors.DefaultSelector())
    service.open()
    return service


def _append_records(service: Any, out: Path, studies: dict[str, int]) -> list[str]:
    """Files and their outbox records, as a worker writes them: `studies` {UID: count}, in
    order, one association; returns the paths."""
    from dicom_ingestd import outbox

    writer = outbox.Writer(service.segments.fd, fsync=False)
    paths = []
    try:
        for study, count in studies.items():
            for index in range(count):
                path = out / f"CT.{study}.{index}"
                path.write_bytes(b"object")
                stored = outbox.StoredObject(
                    str(path), "1.2.840.10008.5.1.4.1.1.2", f"{study}.{index}", study,
                    f"{study}.9", "PID", "Doe^J", "SCU", "SCP", "127.0.0.1:4000", 6)
                writer.append(outbox.ObjectRecord.of(stored, f"a1-{len(paths) + 1}", "a1",
                                                     time.time()))
                paths.append(str(path))
    finally:
        writer.close()
    return paths


@pytest.mark.parametrize("refused", ["outbox", "jobs", "batch_files", "batches"])
def test_a_write_refused_in_the_consumers_transaction_leaves_nothing_half_done(
        tmp_path: Path, refused: str) -> None:
    """The records of one read, their batches, their jobs and the new outbox offset are one
    transaction.  When the database refuses one of these writes (SQLite's own refusal, by
    its authorizer, at the write), none of the others is kept and the records are read
    again: each record is then acted on exactly once -- one reception job per object, one
    end-of-study job for the study the next one completed, each object once in its batch."""
    service = _consumer(tmp_path)
    try:
        paths = _append_records(service, tmp_path / "out", {"1.2.3.1": 4, "1.2.3.2": 1})
        db = service.queue._db

        def refuse(action: int, table: str | None, *_: Any) -> int:
            writes = (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE)
            return sqlite3.SQLITE_DENY if action in writes and table == refused \
                else sqlite3.SQLITE_OK

        db.set_authorizer(refuse)
        service.consume()
        db.set_authorizer(None)
        assert service.queue.counts() == {}
        assert service.queue.offsets() == {}
        assert service.queue.open_batches() == []
        service.consume()
        jobs = service.queue.select()
        reception = sorted(job.env["DICOM_FILE"] for job in jobs if job.kind == "reception")
        assert reception == sorted(paths)
        assert [(job.kind, job.study_uid) for job in jobs if job.kind != "reception"] == \
            [("eostudy", "1.2.3.1")]
        closed = next(job.batch_id for job in jobs if job.kind == "eostudy")
        assert [f["path"] for f in service.queue.batch_files(closed)] == paths[:4]
        assert [b.study_uid for b in service.queue.open_batches()] == ["1.2.3.2"]
        [(segment, offset)] = service.queue.offsets().items()
        assert offset == service.segments.size(segment)
    finally:
        service.shutdown()


def test_a_database_restored_from_a_backup_never_hands_a_batch_another_manifest(
        tmp_path: Path) -> None:
    """The job database and outbox restored from a backup (manifests left as they are) hand
    out again the batch ids given since the backup: the new batches must still get
    manifests of their own, not the files written for the earlier owners of their ids."""
    import shutil

    from dicom_ingestd.jobs.service import EventService

    state, out = tmp_path / "state", tmp_path / "out"
    service = _consumer(tmp_path)
    config = service.config
    try:
        _append_records(service, out, {"1.2.3.1": 2, "1.2.3.2": 1})
        service.consume()
    finally:
        service.shutdown()
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in os.listdir(state):
        if name.startswith("jobs.sqlite") or name == "outbox":
            copy = shutil.copytree if (state / name).is_dir() else shutil.copy2
            copy(state / name, backup / name)

    def manifests_of_closed_batches(records: dict[str, int]) -> dict[str, list[str]]:
        """Append and consume `records`; the manifest each end-of-study job gets, by study."""
        service = EventService(config, selectors.DefaultSelector())
        service.open()
        try:
            _append_records(service, out, records)
            service.consume()
            got = {}
            for job in service.queue.select():
                if job.kind == "eostudy":
                    path = Path(service._prepare(job)["DICOM_MANIFEST"])
                    manifest = json.loads(path.read_text())
                    assert manifest["study_uid"] == job.study_uid, (job.study_uid, manifest)
                    got[job.study_uid] = [f["path"] for f in manifest["files"]]
            return got
        finally:
            service.shutdown()

    later = manifests_of_closed_batches({"1.2.3.3": 2, "1.2.3.4": 1})
    assert set(later) >= {"1.2.3.2", "1.2.3.3"}
    for name in os.listdir(state):
        if name.startswith("jobs.sqlite") or name == "outbox":
            target = state / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    for name in os.listdir(backup):
        copy = shutil.copytree if (backup / name).is_dir() else shutil.copy2
        copy(backup / name, state / name)
    again = manifests_of_closed_batches({"1.2.3.5": 3, "1.2.3.6": 1})
    assert again["1.2.3.5"] == [str(out / f"CT.1.2.3.5.{n}") for n in range(3)]
