"""storescp's "current study" sorting (-ss conc-studies, -sp patientname) across parallel
associations (issue 16): each study in one directory, never two studies in one directory,
however many associations and worker processes store at once.

storescp keeps its current study per process; run per association (its --fork, or our
workers before this), interleaved studies were spread over dozens of directories, and two
studies named in the same millisecond shared one.  The decision is now made under a lock in
a state file of the staging directory (Store.study_directory), and a new study's directory
is created there, under the lock, with a name nothing else has.
"""

import subprocess
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from support.data import declared_data_set, make_study
from support.peers import run_tool
from support.uids import CT_IMAGE
from support.wire import associate, c_store, release

from dicom_ingestd.config.load import config_from_mapping
from dicom_ingestd.processes import start_ticks
from dicom_ingestd.worker.naming import study_subdirectory
from dicom_ingestd.worker.store import Store, sort_holder


def _interleave(a: list[Path], b: list[Path]) -> list[Path]:
    return [path for pair in zip(a, b, strict=True) for path in pair]


def _tree(out: Path) -> tuple[dict[str, set[str]], dict[str, set[str]], int]:
    """(study UID -> directories, directory -> study UIDs, files) of the output tree."""
    dirs_of: dict[str, set[str]] = defaultdict(set)
    studies_in: dict[str, set[str]] = defaultdict(set)
    count = 0
    for path in out.rglob("*"):
        if not path.is_file() or ".ingestd-tmp" in path.parts:
            continue
        study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        directory = str(path.parent.relative_to(out))
        dirs_of[study].add(directory)
        studies_in[directory].add(study)
        count += 1
    return dirs_of, studies_in, count


def _send_held(port: int, files: list[Path], started: threading.Barrier,
               done: threading.Barrier, statuses: list[int]) -> None:
    """One association, held open across both barriers; a raw Upper Layer client
    (test_faults.py): pynetdicom's SCU, in threads or processes, now and then misses a
    response that arrived (seen with the daemon before issue 16 too, never on the wire)."""
    assoc = associate(port)
    try:
        started.wait(60)
        for number, path in enumerate(files, start=1):
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID).encode()
            statuses.append(c_store(assoc, 1, CT_IMAGE.encode(), uid, declared_data_set(path),
                                    message_id=number))
        done.wait(120)
        release(assoc)
    finally:
        assoc.close()


@pytest.mark.parametrize("process_model", ["fork", "single"])
@pytest.mark.parametrize("sort", ["conc-studies", "patientname"])
def test_parallel_associations_keep_each_study_in_one_directory(
        tmp_path: Path, daemon_factory: Any, sort: str, process_model: str) -> None:
    """Three associations open at once, each alternating between two of three studies
    (three patients), so that every study arrives on two associations in parallel; only
    then are they released."""
    studies = [make_study(tmp_path / f"s{i}", 24, name=f"s{i}", patient=f"Patient^{i}")
               for i in range(3)]
    daemon = daemon_factory({"storage": {"sort": sort, "sort_prefix": "ST", "fsync": False},
                             "workers": {"process_model": process_model},
                             "logging": {"level": "info"}})
    halves = [(s[:12], s[12:]) for s in studies]
    batches = [_interleave(halves[i][0], halves[(i + 1) % 3][1]) for i in range(3)]
    started, done = threading.Barrier(3), threading.Barrier(3)
    statuses: list[int] = []
    senders = [threading.Thread(target=_send_held,
                                args=(daemon.port, batch, started, done, statuses))
               for batch in batches]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(300)
    assert statuses == [0] * 72
    dirs_of, studies_in, count = _tree(daemon.out)
    assert count == 72
    assert len(dirs_of) == 3
    assert all(len(dirs) == 1 for dirs in dirs_of.values()), dict(dirs_of)
    assert all(len(uids) == 1 for uids in studies_in.values()), dict(studies_in)
    if sort == "patientname":
        assert sorted(d.rsplit("_", 2)[0] for d in studies_in) == \
            ["Patient_0", "Patient_1", "Patient_2"]
    else:
        assert all(d.startswith("ST_") for d in studies_in)


def test_storescu_runs_one_after_another_follow_storescp(tmp_path: Path,
                                                         daemon_factory: Any) -> None:
    """Associations one at a time (storescu runs): study A in two runs, then B, then A:
    as in storescp, A's return after B starts a new directory (test_differential.py
    compares the names with storescp's own)."""
    a = make_study(tmp_path / "a", 6, name="a", patient="A^A")
    b = make_study(tmp_path / "b", 2, name="b", patient="B^B")
    daemon = daemon_factory({"storage": {"sort": "conc-studies", "fsync": False}})
    for batch in (a[:2], a[2:4], b, a[4:]):
        assert run_tool(["storescu", "127.0.0.1", str(daemon.port), *map(str, batch)],
                        timeout=60).returncode == 0
    _dirs_of, studies_in, count = _tree(daemon.out)
    assert count == 8 and len(studies_in) == 3
    assert all(len(uids) == 1 for uids in studies_in.values())


def _store(tmp_path: Path) -> Store:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    config = config_from_mapping({"storage": {"output_directory": str(out),
                                              "sort": "conc-studies"}})
    store = Store(config.storage)
    store.open()
    return store


def _names(when: datetime) -> Any:
    def new_name(later: int = 0) -> str:
        from datetime import timedelta
        return study_subdirectory("conc-studies", "", study_uid="1",
                                  patient_name=None, when=when + timedelta(milliseconds=later))
    return new_name


def test_two_studies_in_one_millisecond_get_two_directories(tmp_path: Path) -> None:
    """The same millisecond for two studies, and a directory of that name already on disk
    (a study from before a restart): three distinct directories, each created once."""
    store = _store(tmp_path)
    when = datetime(2026, 12, 1, 10, 0, 0, 5000)
    (store.root / "20261201_100000005").mkdir()
    a, b = sort_holder(), sort_holder()
    first = store.study_directory("k", "1.2.1", _names(when), a)
    second = store.study_directory("k", "1.2.2", _names(when), b)
    assert (first, second) == ("20261201_100000006", "20261201_100000007")
    assert store.study_directory("k", "1.2.1", _names(when), b) == first
    assert store.study_directory("k", "1.2.2", _names(when), a) == second
    store.close()


def test_one_association_at_a_time_is_storescp_s_rule(tmp_path: Path) -> None:
    """Study A, A again in a later association, then B, then A: storescp starts a new
    directory for A's return (a change of study ends the last one); so do we, once no
    running association holds A."""
    store = _store(tmp_path)
    when = datetime(2026, 12, 1, 10)
    names = []
    for study in ("1.2.1", "1.2.1", "1.2.2", "1.2.1"):
        holder = sort_holder()
        names.append(store.study_directory("k", study, _names(when), holder))
        store.release_studies("k", holder)
    assert names[0] == names[1]
    assert len(set(names)) == 3
    store.close()


def test_a_study_held_by_a_running_association_stays_open(tmp_path: Path) -> None:
    store = _store(tmp_path)
    when = datetime(2026, 12, 1, 10)
    a, b = sort_holder(), sort_holder()
    first = store.study_directory("k", "1.2.1", _names(when), a)
    store.study_directory("k", "1.2.2", _names(when), b)  # a held: stays open
    assert store.study_directory("k", "1.2.1", _names(when), b) == first
    store.close()


def test_a_dead_association_holds_nothing(tmp_path: Path) -> None:
    """A worker killed before it released its studies: its process is gone, so its hold
    ends as a release would."""
    store = _store(tmp_path)
    when = datetime(2026, 12, 1, 10)
    child = subprocess.Popen(["sleep", "30"])
    dead = f"{child.pid}:{start_ticks(child.pid)}:0"
    first = store.study_directory("k", "1.2.1", _names(when), dead)
    child.kill()
    child.wait()
    store.study_directory("k", "1.2.2", _names(when), sort_holder())
    assert store.study_directory("k", "1.2.1", _names(when), sort_holder()) != first
    store.close()


def test_a_study_idle_past_the_end_of_study_timeout_starts_a_new_directory(
        tmp_path: Path) -> None:
    store = _store(tmp_path)
    holder = sort_holder()
    when = datetime(2026, 12, 1, 10)
    first = store.study_directory("k", "1.2.1", _names(when), holder, idle=1.0)
    assert store.study_directory("k", "1.2.1", _names(when), holder, idle=1.0) == first
    time.sleep(1.5)
    later = store.study_directory("k", "1.2.1", _names(when), holder, idle=1.0)
    assert later != first  # the study was complete: as storescp -tos, a new directory
    store.close()


def test_the_state_survives_a_torn_write_without_mixing(tmp_path: Path) -> None:
    """A crash while the state file is written leaves it unreadable: studies start new
    directories, and the names on disk are still never reused."""
    store = _store(tmp_path)
    when = datetime(2026, 12, 1, 10)
    holder = sort_holder()
    first = store.study_directory("k", "1.2.1", _names(when), holder)
    (store.staging / "sort-state.json").write_text('{"version": 3, "key": "k", "stud')
    again = store.study_directory("k", "1.2.1", _names(when), holder)
    (store.staging / "sort-state.json").write_text('{"version": 3, "key": "k", '
                                                   '"studies": {"x": 1}}')
    other = store.study_directory("k", "1.2.2", _names(when), holder)
    assert len({first, again, other}) == 3
    store.close()
