"""[events]: placeholders and quoting, study tracking, rename-on-end-of-study, exec_sync, and
the same options on DCMTK storescp side by side.

Daemon tests run the real daemon (fork workers) with real senders (DCMTK storescu, pynetdicom
for deterministic interleaving); every command is a real process, the `recorder` fixture,
which appends its arguments and DICOM_* variables to a JSON-lines file.
"""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from support.daemon import Daemon, free_port
from support.data import make_study
from support.peers import listening, require_tool, storescu
from support.recorder import Recorder
from support.wait import wait_until

from dicom_ingestd.event_commands import (
    build_argv,
    environment_for,
    peer_host,
    placeholder_values,
    shell_references,
    substitute,
)
from dicom_ingestd.tracker import Arrival, CloseReason, StoredFile, StudyTracker

HOSTILE = [
    "two words", "semi;colon", "$(touch PWNED)", "`touch PWNED`", "'single'", '"double"',
    "new\nline", "back\\slash", "#a#f", "-rf", "", "a'\"$`;|&<>*?[]{}~",
]


def events_settings(tmp_path: Path, **events: Any) -> dict[str, dict[str, Any]]:
    return {"storage": {"sort": "study-uid", "sort_prefix": "PRE"},
            "events": events,
            "jobs": {"state_directory": str(tmp_path / "state"), "retry_backoff": 1}}


# --- placeholders and quoting (pure, then executed for real) ----------------------------------


def test_substitution_is_one_pass_and_keeps_undefined_placeholders() -> None:
    values = placeholder_values("/out/#a", "#c", "CALLED", "10.0.0.1")
    assert substitute("#p|#a|#c|#r|#f|##p", values) == "/out/#a|#c|CALLED|10.0.0.1|#f|#/out/#a"
    assert substitute("x\0y#a", {"#a": "n\0ul"}) == "x\0ynul"  # NUL dropped from values only


def test_shell_form_references_variables_quoted_for_their_context() -> None:
    values = placeholder_values("d", "a", "c", "r", filename="f")
    assert shell_references("cmd #p/#f '#a' \"x #c\" \\#r #r", values) == (
        'cmd "${DICOM_OUTPUT_DIR}"/"${DICOM_FILENAME}" \'\'"${DICOM_CALLING_AE}"\'\' '
        '"x ${DICOM_CALLED_AE}" \\#r "${DICOM_PEER}"')
    assert shell_references("eos #p #f", placeholder_values("d", "a", "c", "r")) == \
        'eos "${DICOM_OUTPUT_DIR}" #f'  # no #f at end of study: left as written


def test_a_stopped_rename_leaves_each_file_at_its_original_or_its_saved_planned_path(
        tmp_path: Path) -> None:
    """Whatever stops a rename run (here: the third file is immutable, EPERM), each file is
    where it was filed or at its planned name as saved in the manifest, even when a planned
    name was taken by someone else meanwhile (storage commitment counts on it)."""
    from dicom_ingestd.jobs import rename

    study = tmp_path / "study"
    study.mkdir()
    files = [study / f"CT.{n}" for n in range(4)]
    for n, path in enumerate(files):
        path.write_text(f"object {n}")
    manifest = tmp_path / "manifest.json"
    entries = [{"path": str(p), "rename_prefix": "CT", "sop_instance_uid": str(n)}
               for n, p in enumerate(files)]
    rename.write_manifest(manifest, {"files": entries, "renamed": False,
                                     "plan": rename.plan(entries)}, fsync=False)
    (study / "CT000002").write_text("someone else's")  # the second file's planned name
    subprocess.run(["chattr", "+i", str(files[2])], check=True)
    try:
        assert rename.main([str(manifest)]) == 1
    finally:
        subprocess.run(["chattr", "-i", str(files[2])], check=True)
    saved = json.loads(manifest.read_text())
    assert not saved["renamed"]
    for n, (entry, planned) in enumerate(zip(saved["files"], saved["plan"], strict=True)):
        where = [p for p in (Path(entry["path"]), Path(planned)) if p.is_file()
                 and p.read_text() == f"object {n}"]
        assert len(where) == 1, (n, entry, planned)
    assert saved["plan"][1] == str(study / "CT000005")
    assert (study / "CT000005").read_text() == "object 1"
    assert rename.main([str(manifest)]) == 0  # the rerun follows the saved plan
    done = json.loads(manifest.read_text())
    assert [Path(e["path"]).read_text() for e in done["files"]] == \
        [f"object {n}" for n in range(4)]
    assert [Path(e["path"]).name for e in done["files"]] == \
        ["CT000001", "CT000005", "CT000003", "CT000004"]


def test_peer_host_strips_the_port() -> None:
    assert peer_host("127.0.0.1:4242") == "127.0.0.1"
    assert peer_host("[::1]:104") == "::1"
    assert peer_host("socket") == "socket"


@pytest.mark.parametrize("shell", [False, True], ids=["argv", "shell"])
def test_hostile_values_arrive_verbatim_and_execute_nothing(tmp_path: Path, recorder: Recorder,
                                                           shell: bool) -> None:
    for index, value in enumerate(HOSTILE):
        values = placeholder_values(value, value + "A", value + "C", value + "R",
                                    filename=value + "F")
        if shell:
            # storescp style: one command line, placeholders bare, in quotes, in words, and
            # in command substitutions (where a pasted quoted literal would be re-parsed).
            line = (" ".join(recorder.command()) + " #p #f '#a' \"#c\" x#r"
                    " \"$(printf %s #p)\" \"`printf %s #p`\" \"$(printf %s \"#p\")\""
                    " \"$(echo $((1+1)) '#p' \"#p\")\"")
            argv = build_argv([line], values, shell=True)
            assert argv[:2] == ["/bin/sh", "-c"] and (not value or value not in argv[2])
        else:
            argv = build_argv([*recorder.command(), "#p", "#f", "#a", "#c", "x#r"],
                              values, shell=False)
        subprocess.run(argv, cwd=tmp_path, check=True, timeout=30,
                       env={**os.environ, **environment_for(values)})
        args = recorder.records()[index]["argv"]
        expected = [value, value + "F", value + "A", value + "C", "x" + value + "R"]
        assert args[:5] == expected
        if shell:
            # Command substitution strips trailing newlines.
            assert args[5:8] == [value.rstrip("\n")] * 3
            assert args[8] == f"2 {value} {value}".rstrip("\n")
        else:
            assert len(args) == 5
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("shell", [False, True], ids=["argv", "shell"])
def test_hostile_network_values_and_paths_through_the_daemon(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder, shell: bool) -> None:
    out = tmp_path / "out dir;$(touch PWNED)`touch PWNED`'"
    study_uid = "1.2.3;$(touch PWNED)`touch PWNED`'\"|&"
    files = make_study(tmp_path / "data", 1, study_uid=study_uid)
    if shell:
        command = [" ".join(recorder.command("rec")) + " #p #f #a #c #r"]
    else:
        command = recorder.command("rec", "#p", "#f", "#a", "#c", "#r")
    eos_command = ([" ".join(recorder.command("eos")) + " #p #a"] if shell
                   else recorder.command("eos", "#p", "#a"))
    settings = events_settings(tmp_path, exec_on_reception=command, shell=shell,
                               exec_on_eostudy=eos_command, eostudy_timeout=1)
    settings["storage"]["output_directory"] = str(out)
    daemon = daemon_factory(settings)
    calling, called = "A;$(touch P)`x`", "B'\"|&>PWNED"
    storescu(daemon.port, *files, extra=["-aet", calling, "-aec", called])
    records = recorder.wait(2)
    (path,) = daemon.files()
    reception = next(r for r in records if r["argv"][0] == "rec")
    assert reception["argv"][1:] == [str(path.parent), path.name, calling, called, "127.0.0.1"]
    assert reception["env"]["DICOM_CALLING_AE"] == calling
    study_uid = study_uid.replace(" ", "")  # storescu removes spaces from UIDs
    assert reception["env"]["DICOM_STUDY_UID"] == study_uid
    assert reception["env"]["DICOM_FILE"] == str(path)
    eos = next(r for r in records if r["argv"][0] == "eos")
    assert eos["argv"][1:] == [str(path.parent), calling]
    assert eos["env"]["DICOM_STUDY_UID"] == study_uid
    assert eos["env"]["DICOM_OUTPUT_DIR"] == str(path.parent)
    from support.daemon import REPO
    for where in (tmp_path, REPO):  # the jobs run in the daemon's directory
        assert not [p for p in where.rglob("*") if p.name in ("PWNED", "P")], \
            "a value from the network or a path was executed"


# --- the tracker's rules, with a fake clock ----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_objects = itertools.count(1)


def arrive(tracker: StudyTracker, study: str, assoc: str) -> list[str]:
    """A new object of `study` through `assoc`; the studies it completed."""
    n = next(_objects)
    _, closed = tracker.arrive(Arrival(study, StoredFile(f"/o/{study}/{n}", "1.2", f"{n}"),
                                       assoc))
    return [f"{c.study_uid}:{c.batch}:{c.reason}:{len(c.files)}" for c in closed]


def test_tracker_rules() -> None:
    clock = Clock()
    tracker = StudyTracker(10, clock)
    # One association, study after study: storescp's rule.
    assert arrive(tracker, "A", "x") == []
    assert arrive(tracker, "A", "x") == []
    assert arrive(tracker, "B", "x") == ["A:1:next-study:2"]
    # A parallel association interleaving another study closes nothing.
    assert arrive(tracker, "C", "y") == []
    assert arrive(tracker, "B", "x") == []
    assert arrive(tracker, "C", "y") == []
    # y ends while x goes on with B: C stays open (x is not a later association).
    clock.now += 1
    tracker.association_ended("y")
    assert arrive(tracker, "B", "x") == []
    # A later association with another study closes C (ended before it began), not B.
    clock.now += 1
    assert arrive(tracker, "D", "z") == ["C:1:next-study:2"]
    # Timeout: B and D after 10 s without an object of theirs.
    clock.now += 9.5
    assert arrive(tracker, "D", "z") == []
    clock.now += 0.6
    assert [(c.study_uid, c.reason) for c in tracker.expire()] == [("B", CloseReason.TIMEOUT)]
    # An object of a closed study opens batch 2; batches are never merged.
    study, closed = tracker.arrive(Arrival("A", StoredFile("/o/A/late", "1.2", "9"), "w"))
    assert study.batch == 2 and closed == []
    assert sorted((c.study_uid, c.batch) for c in tracker.close_all(CloseReason.STOP)) == [
        ("A", 2), ("D", 1)]


def test_tracker_restored_study_closes_on_the_next_study() -> None:
    clock = Clock()
    first = StudyTracker(0, clock)
    arrive(first, "A", "x")
    (open_study,) = first.open_studies()
    second = StudyTracker(0, clock)
    second.restore(open_study)
    assert second.next_deadline() is None  # eostudy_timeout = 0: never by time
    assert arrive(second, "A", "q") == []  # the same study continues its batch
    assert arrive(second, "B", "r") == []  # q is still sending A
    second.association_ended("q")
    clock.now += 1
    assert arrive(second, "C", "s") == ["A:1:next-study:2"]  # r still sends B
    second.association_ended("r")
    second.association_ended("s")
    clock.now += 1
    assert arrive(second, "A", "t") == ["B:1:next-study:1", "C:1:next-study:1"]
    assert [s.batch for s in second.open_studies()] == [2]


def test_tracker_an_association_cut_short_leaves_its_study_to_the_timeout() -> None:
    """A sender whose association was aborted (or whose worker died) retries on a new one:
    its study is not complete because a later association sent another study."""
    clock = Clock()
    tracker = StudyTracker(10, clock)
    arrive(tracker, "A", "x")
    tracker.association_ended("x", released=False)
    clock.now += 1
    assert arrive(tracker, "B", "y") == []  # released, x would have been done with A
    assert arrive(tracker, "A", "z") == []  # the retry continues batch 1
    assert arrive(tracker, "B", "z") == []  # z moves on, but x may still come back
    clock.now += 10.5
    assert [(c.study_uid, c.batch, len(c.files)) for c in tracker.expire()] == [
        ("A", 1, 2), ("B", 1, 2)]


def test_tracker_restored_study_waits_for_its_timeout() -> None:
    clock = Clock()
    first = StudyTracker(10, clock)
    arrive(first, "A", "x")
    (open_study,) = first.open_studies()
    second = StudyTracker(10, clock)
    second.restore(open_study)
    assert arrive(second, "B", "q") == []  # its senders reconnect after the restart
    assert arrive(second, "A", "r") == []
    clock.now += 10.5
    assert [(c.study_uid, len(c.files)) for c in second.expire()] == [("A", 2), ("B", 1)]


def test_tracker_lists_an_object_sent_again_once() -> None:
    tracker = StudyTracker(10, Clock())
    file = StoredFile("/o/A/1", "1.2", "1")
    study, _ = tracker.arrive(Arrival("A", file, "x"))
    assert study.last_added
    study, _ = tracker.arrive(Arrival("A", file, "y"))  # no response came: sent again
    assert not study.last_added and len(study.files) == 1
    study, _ = tracker.arrive(Arrival("A", StoredFile("/o/A/2", "1.2", "1"), "y"))
    assert study.last_added and len(study.files) == 2  # another file of the same UID


# --- end of study through the daemon ---------------------------------------------------------


def test_end_of_study_by_next_study_and_by_timeout(tmp_path: Path, daemon_factory: Any,
                                                   recorder: Recorder) -> None:
    first = make_study(tmp_path / "a", 3, name="a")
    second = make_study(tmp_path / "b", 2, name="b")
    daemon = daemon_factory(events_settings(
        tmp_path, exec_on_reception=recorder.command("rec", "#f"),
        exec_on_eostudy=recorder.command("eos", "#p"), eostudy_timeout=1))
    storescu(daemon.port, *first, *second)
    records = recorder.wait(7)
    eos = [r for r in records if r["argv"][0] == "eos"]
    assert [r["env"]["DICOM_EOSTUDY_REASON"] for r in eos] == ["next-study", "timeout"]
    a_uid, b_uid = (dcmread(f[0]).StudyInstanceUID for f in (first, second))
    assert [r["env"]["DICOM_STUDY_UID"] for r in eos] == [a_uid, b_uid]
    assert [r["env"]["DICOM_FILE_COUNT"] for r in eos] == ["3", "2"]
    assert eos[0]["argv"][1] == str(daemon.out / f"PRE_{a_uid}")
    manifest = json.loads(Path(eos[0]["env"]["DICOM_MANIFEST"]).read_text())
    assert [f["sop_instance_uid"] for f in manifest["files"]] == [
        dcmread(f).SOPInstanceUID for f in first]
    assert eos[0]["env"]["DICOM_FILES"].split("\n") == [f["path"] for f in manifest["files"]]
    # storescp's order: the new study's first reception job is queued before the end of
    # the previous study, and an end-of-study job waits for its study's reception jobs.
    rec_ids = {r["argv"][1]: int(r["env"]["DICOM_JOB_ID"]) for r in records
               if r["argv"][0] == "rec"}
    assert int(eos[0]["env"]["DICOM_JOB_ID"]) > min(rec_ids.values()) + 3
    assert records.index(eos[0]) > 2
    assert "complete (next-study): 3 object(s)" in daemon.log()


def test_parallel_associations_interleaving_two_studies(tmp_path: Path, daemon_factory: Any,
                                                        recorder: Recorder) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    first = make_study(tmp_path / "a", 4, name="a")
    second = make_study(tmp_path / "b", 4, name="b")
    daemon = daemon_factory(events_settings(
        tmp_path, exec_on_eostudy=recorder.command("eos"), eostudy_timeout=1))
    ae = AE(ae_title="INTERLEAVE")
    ae.add_requested_context(CTImageStorage)
    one = ae.associate("127.0.0.1", daemon.port)
    two = ae.associate("127.0.0.1", daemon.port)
    assert one.is_established and two.is_established
    try:
        for a, b in zip(first, second, strict=True):
            assert one.send_c_store(dcmread(a)).Status == 0
            assert two.send_c_store(dcmread(b)).Status == 0
    finally:
        one.release()
        two.release()
    eos = recorder.wait(2)
    time.sleep(1.5)  # no third closure (no study closed twice, none split)
    assert len(recorder.records()) == 2
    assert {r["env"]["DICOM_STUDY_UID"]: r["env"]["DICOM_FILE_COUNT"] for r in eos} == {
        dcmread(first[0]).StudyInstanceUID: "4", dcmread(second[0]).StudyInstanceUID: "4"}
    assert {r["env"]["DICOM_EOSTUDY_REASON"] for r in eos} == {"timeout"}
    assert {r["env"]["DICOM_BATCH"] for r in eos} == {"1"}
    # The master's "association K handed to worker PID" lines (debug): two parallel
    # associations are two worker processes of the pool, whatever reuse does later.
    workers = set(re.findall(r"association \S+ handed to worker (\d+)", daemon.log()))
    assert len(workers) == 2, "each association ran in a worker process of its own"


def test_late_object_opens_a_new_batch_and_rename_never_overwrites(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    files = make_study(tmp_path / "a", 4, name="a")
    daemon = daemon_factory(events_settings(
        tmp_path, exec_on_eostudy=recorder.command("eos", "#p"), rename_on_eostudy=True,
        eostudy_timeout=1))
    storescu(daemon.port, *files[:3])
    recorder.wait(1)
    storescu(daemon.port, files[3])
    eos = recorder.wait(2)
    study_dir = daemon.out / f"PRE_{dcmread(files[0]).StudyInstanceUID}"
    assert sorted(p.name for p in study_dir.iterdir()) == [
        "CT000001", "CT000002", "CT000003", "CT000004"]
    # The first batch kept its names; the late object took the next free number.
    sops = [dcmread(f).SOPInstanceUID for f in files]
    assert [dcmread(study_dir / f"CT00000{n}").SOPInstanceUID for n in (1, 2, 3, 4)] == sops
    assert [(r["env"]["DICOM_BATCH"], r["env"]["DICOM_FILE_COUNT"]) for r in eos] == [
        ("1", "3"), ("2", "1")]
    assert eos[1]["env"]["DICOM_FILES"] == str(study_dir / "CT000004")
    manifest = json.loads(Path(eos[1]["env"]["DICOM_MANIFEST"]).read_text())
    assert manifest["renamed"] and manifest["batch"] == 2
    assert Path(manifest["files"][0]["original_path"]).name == f"CT.{sops[3]}"
    assert "(batch 2) complete (timeout): 1 object(s)" in daemon.log()
    assert "batch 2 opened" in daemon.log()


def test_exec_sync_holds_the_association_until_the_job_ends(
        tmp_path: Path, daemon_factory: Any, recorder: Recorder) -> None:
    files = make_study(tmp_path / "a", 2)
    slow = ["/bin/sh", "-c", 'sleep 0.7; exec "$@"', "sh", *recorder.command("rec", "#f")]
    daemon = daemon_factory(events_settings(tmp_path, exec_on_reception=slow, exec_sync=True))
    started = time.monotonic()
    storescu(daemon.port, *files)
    assert time.monotonic() - started >= 1.4  # both jobs ran inside the association
    assert len(recorder.records()) == 2
    log = daemon.log()
    assert log.index("job 1 finished") < log.index(f"stored {dcmread(files[1]).SOPInstanceUID}")


@pytest.mark.parametrize("on_stop", ["persist", "close"])
def test_open_studies_survive_a_restart(tmp_path: Path, daemon_factory: Any,
                                        recorder: Recorder, on_stop: str) -> None:
    files = make_study(tmp_path / "a", 2)
    settings = events_settings(tmp_path, exec_on_eostudy=recorder.command("eos"),
                               eostudy_timeout=2, on_stop=on_stop)
    settings["network"] = {"port": free_port()}
    daemon = daemon_factory(settings)
    storescu(daemon.port, *files)
    assert daemon.stop() == 0 and recorder.records() == []
    if on_stop == "persist":
        assert "1 study batch(es) still open are kept" in daemon.log()
    else:
        assert "closed 1 open study batch(es) at stop" in daemon.log()
    again = daemon_factory(settings)
    (eos,) = recorder.wait(1)
    assert eos["env"]["DICOM_FILE_COUNT"] == "2"
    assert eos["env"]["DICOM_EOSTUDY_REASON"] == ("timeout" if on_stop == "persist" else "stop")
    if on_stop == "persist":
        assert "open with 2 object(s) before the restart" in again.log()


def test_state_directory_defaults_to_the_output_directory(tmp_path: Path, daemon_factory: Any,
                                                          recorder: Recorder) -> None:
    daemon = daemon_factory({"events": {"exec_on_reception": recorder.command("#f")}})
    storescu(daemon.port, *make_study(tmp_path / "a", 1))
    recorder.wait(1)
    assert (daemon.out / ".ingestd-state" / "jobs.sqlite").exists()


def test_no_state_directory_without_events(daemon: Daemon, tmp_path: Path) -> None:
    storescu(daemon.port, *make_study(tmp_path / "a", 1))
    assert not (daemon.out / ".ingestd-state").exists()


# --- differential: DCMTK storescp with the same event options -----------------------------------


def test_events_match_storescp(tmp_path: Path, daemon_factory: Any) -> None:
    """storescp -su PRE -xcr ... -xcs ... -rns -tos 1 -xs against the equivalent TOML: the
    same renamed files, and the same commands run (their arguments, in order)."""
    require_tool("storescp")
    files = make_study(tmp_path / "data", 4)
    script = tmp_path / "recorder.py"
    from support.recorder import RECORDER_SOURCE
    script.write_text(RECORDER_SOURCE)
    ref_log, our_log = tmp_path / "storescp.jsonl", tmp_path / "ingestd.jsonl"
    ref_out = tmp_path / "storescp-out"
    ref_out.mkdir()
    port = free_port()
    rec = f"{sys.executable} {script} {ref_log}"
    with open(tmp_path / "storescp.log", "wb") as log_file:
        reference = subprocess.Popen(
            ["storescp", "-su", "PRE", "-xcr", f"{rec} rec #p #f #a #c #r",
             "-xcs", f"{rec} eos #p #a #c #r", "-rns", "-tos", "1", "-xs", "-dhl",
             "-od", str(ref_out), str(port)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        ours_rec = [sys.executable, str(script), str(our_log)]
        settings = events_settings(tmp_path, exec_on_reception=[
            *ours_rec, "rec", "#p", "#f", "#a", "#c", "#r"],
            exec_on_eostudy=[*ours_rec, "eos", "#p", "#a", "#c", "#r"],
            rename_on_eostudy=True, eostudy_timeout=1, exec_sync=True)
        settings["jobs"]["retries"] = 0
        ours = daemon_factory(settings)
        wait_until(lambda: listening(port), 10, "storescp listening")
        storescu(port, *files)
        storescu(ours.port, *files)

        def argv_lines(path: Path, out: Path) -> list[list[str]]:
            if not path.exists():
                return []
            lines = [json.loads(line)["argv"] for line in path.read_text().splitlines()]
            return [[a.replace(str(out), "<OUT>") for a in argv] for argv in lines]

        wait_until(lambda: len(argv_lines(ref_log, ref_out)) == 5
                   and len(argv_lines(our_log, ours.out)) == 5, 15, "both end-of-study events")
        ref_runs, our_runs = argv_lines(ref_log, ref_out), argv_lines(our_log, ours.out)
        assert our_runs == ref_runs
        assert [r[0] for r in our_runs] == ["rec"] * 4 + ["eos"]
        assert our_runs[0][1:] == ["<OUT>/PRE_" + dcmread(files[0]).StudyInstanceUID,
                                   f"CT.{dcmread(files[0]).SOPInstanceUID}", "STORESCU",
                                   "ANY-SCP", "127.0.0.1"]

        def tree(out: Path) -> dict[str, str]:
            return {str(p.relative_to(out)): dcmread(p).SOPInstanceUID
                    for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")
                    and ".ingestd-tmp" not in p.parts}

        assert tree(ours.out) == tree(ref_out)
        assert sorted(Path(k).name for k in tree(ours.out)) == [
            "CT000001", "CT000002", "CT000003", "CT000004"]
    finally:
        reference.send_signal(signal.SIGTERM)
        try:
            reference.wait(10)
        except subprocess.TimeoutExpired:
            reference.kill()
            reference.wait(5)


def test_rename_requires_sorting(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[events]\nrename_on_eostudy = true\n")
    result = subprocess.run([sys.executable, "-m", "dicom_ingestd", "check-config", "-c",
                             str(config)], capture_output=True, text=True, timeout=30,
                            env={**os.environ})
    assert result.returncode == 78
    assert "events.rename_on_eostudy = True: requires storage.sort" in result.stderr
