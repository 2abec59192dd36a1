"""The warm worker pool (pool.py, warm.py) against the real daemon.

Spares are forked before the daemon is ready and replaced after each hand-off; a SIGKILLed
idle worker is replaced and loses nothing, even one killed after it was handed a connection
and before it took it; a reload retires the idle workers of the old configuration, so the very
next association runs under the new one; a worker is reused only after a clean association
(released, no TLS, no failed C-STORE) and never past workers.max_associations_per_worker; a
stop retires idle workers at once and lets running associations finish.
"""

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tls_certs
from support import wire
from support.daemon import STAGING, Daemon, config_of, replace_config
from support.daemon import info_settings as settings
from support.data import ct_copies, ct_dataset
from support.peers import echoscu, require_tool, storescu
from support.procs import BUSY_WORKER, IDLE_WORKER, alive, child_pids, process_name, workers_of
from support.scu import assert_rejected_local_limit, associate, held, rejections, store_ok
from support.uids import IMPLICIT_LE, VERIFICATION
from support.wait import wait_until

from dicom_ingestd import control
from dicom_ingestd.codes import Ending
from dicom_ingestd.handoff import Verdict
from dicom_ingestd.warm import MEMORY_GROWTH, Generation, Hygiene, judge
from dicom_ingestd.worker.session import Outcome

Factory = Callable[..., Daemon]


def idle(daemon: Daemon) -> set[int]:
    return workers_of(daemon.proc.pid, IDLE_WORKER)


def busy(daemon: Daemon) -> set[int]:
    return workers_of(daemon.proc.pid, BUSY_WORKER)


def served_by(daemon: Daemon, calling_ae: str) -> int:
    """The pid of the worker that accepted the association of `calling_ae`."""
    pattern = re.compile(rf"\[(\d+)\] \S+ {calling_ae}->\S+: association (?:accepted|rejected)")
    found: list[int] = []
    wait_until(lambda: bool(found.extend(int(m) for m in pattern.findall(daemon.log()))
                            or found), 5, f"the association of {calling_ae} in the log")
    return found[-1]


def store_once(daemon: Daemon, calling_ae: str) -> int:
    """One C-STORE over an association of its own, released; the pid that served it."""
    assoc = associate(daemon.port, title=calling_ae)
    with held(assoc):
        assert assoc.is_established
        store_ok(assoc, ct_dataset())
        assoc.release()
    return served_by(daemon, calling_ae)


def test_spares_are_ready_and_replaced(daemon_factory: Factory, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(workers={"spare_workers": 3}))
    assert "process model fork (3 spare workers)" in daemon.wait_log("ready")
    first = idle(daemon)
    assert len(first) == 3, first
    assert all(pid in child_pids(daemon.proc.pid) for pid in first)
    storescu(daemon.port, *ct_copies(tmp_path / "in", 5, "a"))
    # Three spares again once the association is over (a used worker may be among them).
    wait_until(lambda: len(idle(daemon)) == 3 and not busy(daemon), 5, "three spares again")
    assert len(daemon.files()) == 5


def test_a_clean_associations_worker_serves_the_next(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(workers={"spare_workers": 1}))
    first = store_once(daemon, "CLEAN1")
    wait_until(lambda: first in idle(daemon), 5, "the worker back in the pool")
    assert store_once(daemon, "CLEAN2") == first  # the most recently used is taken first


def test_max_associations_per_worker_one_forks_for_each(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(workers={"spare_workers": 1,
                                              "max_associations_per_worker": 1}))
    pids = [store_once(daemon, f"ONCE{n}") for n in range(3)]
    assert len(set(pids)) == 3, pids
    wait_until(lambda: not any(alive(pid) for pid in pids), 5, "used workers gone")


def test_aborted_association_ends_its_worker(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(workers={"spare_workers": 2}))
    aborted = associate(daemon.port, title="ABORTER")
    with held(aborted):
        assert aborted.is_established
        aborted.abort()
    pid = served_by(daemon, "ABORTER")
    wait_until(lambda: not alive(pid), 5, "the aborted association's worker gone")
    # The pool is whole again, and serves.
    wait_until(lambda: len(idle(daemon)) == 2, 5, "spares replaced")
    store_once(daemon, "AFTER")


def test_failed_store_ends_its_worker(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(storage={"min_free_space": 10**17}))
    failing = associate(daemon.port, title="FAILER")
    with held(failing):
        status = failing.send_c_store(ct_dataset())
        assert status and status.Status == 0xA700, status
        failing.release()
    pid = served_by(daemon, "FAILER")
    wait_until(lambda: not alive(pid), 5, "the failed association's worker gone")


def test_tls_association_ends_its_worker(daemon_factory: Factory,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    require_tool("openssl")
    certs = tls_certs.make(tmp_path_factory.mktemp("certs"))
    daemon = daemon_factory(settings(workers={"spare_workers": 1}, tls={
        "enabled": True, "private_key": str(certs.server.key),
        "certificate": str(certs.server.cert), "ca_files": [str(certs.ca.cert)]}))
    tls_client = ["+tls", str(certs.client.key), str(certs.client.cert),
                  "+cf", str(certs.ca.cert)]
    echoscu(daemon.port, [*tls_client, "-aet", "TLSONE"])
    first = served_by(daemon, "TLSONE")
    wait_until(lambda: not alive(first), 5, "the TLS association's worker gone")
    echoscu(daemon.port, [*tls_client, "-aet", "TLSTWO"])
    assert served_by(daemon, "TLSTWO") != first


def test_rejected_association_ends_its_worker(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(association={"allowed_calling_aetitles": ["ONLYME"]}))
    assoc = associate(daemon.port, title="NOTYOU")
    with held(assoc):
        rejection = rejections.get(assoc)  # as received (support.scu's note)
        assert rejection is not None and rejection.reason_diagnostic == 3, rejection
    pid = served_by(daemon, "NOTYOU")
    wait_until(lambda: not alive(pid), 5, "the rejecting worker gone")


def test_sigkill_of_idle_workers_loses_nothing(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(workers={"spare_workers": 2}))
    results: list[int] = []
    failures: list[str] = []
    done = threading.Event()

    def sender() -> None:
        for number in range(40):
            try:
                assoc = associate(daemon.port, title=f"KILL{number}")
                with held(assoc):
                    if not assoc.is_established:
                        failures.append(f"association {number} not established")
                        continue
                    status = assoc.send_c_store(ct_dataset())
                    results.append(status.Status if status else -1)
                    assoc.release()
            except Exception as exc:  # reported below, with the others
                failures.append(f"association {number}: {exc!r}")
        done.set()

    thread = threading.Thread(target=sender)
    thread.start()
    killed = 0
    while not done.is_set():
        for pid in idle(daemon):
            # Stopped, its name cannot change: still idle, it has not taken a connection
            # (it may have been handed one), and its death must lose nothing.
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.kill(pid, signal.SIGSTOP)
                if process_name(pid) == IDLE_WORKER:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                else:
                    os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    thread.join()
    assert not failures, failures
    assert results == [0] * 40, results
    assert len(daemon.files()) == 40
    assert killed > 0
    log = daemon.log()
    assert "killed by SIGKILL; a new one takes its place" in log
    assert "Traceback" not in log and "could not be handed" not in log
    wait_until(lambda: len(idle(daemon)) == 2, 5, "spares replaced")


def test_worker_killed_before_taking_its_connection(daemon_factory: Factory) -> None:
    """The master keeps its copy of the connection until the worker says it took it."""
    daemon = daemon_factory(settings(workers={"spare_workers": 1}))
    wait_until(lambda: len(idle(daemon)) == 1, 5, "one spare")
    [frozen] = idle(daemon)
    os.kill(frozen, signal.SIGSTOP)  # it will be handed the connection, and not take it
    try:
        result: list[Any] = []
        thread = threading.Thread(target=lambda: result.append(
            store_once(daemon, "RESCUED")))
        thread.start()
        wait_until(lambda: process_name(frozen) == IDLE_WORKER
                   and len(child_pids(daemon.proc.pid)) >= 3, 5, "a new spare forked")
        time.sleep(0.2)  # the hand-off to the stopped worker is done by now
    finally:
        os.kill(frozen, signal.SIGKILL)
    thread.join(30)
    assert result and result[0] != frozen, result
    assert "before it took the connection; handing it to another worker" in daemon.log()
    assert len(daemon.files()) == 1


def test_reload_retires_old_spares_and_the_next_association_is_new(
        daemon_factory: Factory, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(workers={"spare_workers": 2}))
    wait_until(lambda: len(idle(daemon)) == 2, 5, "two spares")
    old = idle(daemon)
    config = config_of(daemon)
    config["storage"]["filename_extension"] = ".gen2"
    replace_config(daemon, config)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("reload: configuration applied")
    pid = store_once(daemon, "NEWCONF")  # at once: no wait for the old spares to go
    assert pid not in old
    # Not even offered to an old one (which would refuse it: the generations differ).
    assert "unusable assignment" not in daemon.log()
    assert "before it took the connection" not in daemon.log()
    [stored] = daemon.files()
    assert stored.name.endswith(".gen2"), stored
    wait_until(lambda: not any(alive(p) for p in old), 5, "old spares gone")


def status_when_quiet(daemon: Daemon) -> dict[str, Any]:
    """The first live status answer that shows no association in progress."""
    path = daemon.out / STAGING / control.SOCKET_NAME
    answers: list[dict[str, Any]] = []
    wait_until(lambda: bool(answers.append(control.request(path, "status"))
                            or answers[-1]["daemon"]["active_associations"] == 0),
               10, "no association in progress")
    return answers[-1]


def test_a_status_with_no_association_in_progress_counts_every_one_that_ended(
        daemon_factory: Factory) -> None:
    """The workers' reports reach the master in batches, not at each association's end (it
    no longer wakes up for them): a status answer reads them first, so one that shows no
    association in progress has counted every association that ended."""
    daemon = daemon_factory(settings())
    for number in range(1, 6):
        store_once(daemon, f"COUNT{number}")
        counters = status_when_quiet(daemon)["counters"]
        released = {r["calling_ae"]: r["count"] for r in counters["associations"]
                    if r["outcome"] == "released"}
        assert released == {f"COUNT{n}": 1 for n in range(1, number + 1)}, counters
        assert counters["stored"] == number, counters


def test_an_association_that_ended_in_the_same_wake_up_leaves_room_for_the_next(
        daemon_factory: Factory) -> None:
    """The master hands a new connection over before the rest of what woke it up; when the
    end of the association holding the only place came in the same wake-up, the new one
    waits for that end (OVER_LIMIT_WAIT) and is served, not rejected."""
    daemon = daemon_factory(settings(workers={"max_associations": 1, "spare_workers": 2}))
    first = associate(daemon.port, title="HOLDER")
    result: list[Any] = []
    with held(first):
        assert first.is_established
        worker = served_by(daemon, "HOLDER")
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # it sees all that follows at one wake-up
        try:
            first.release()
            # Named idle again once it has told the (stopped) master it is done.
            wait_until(lambda: process_name(worker) == IDLE_WORKER, 10, "HOLDER's end sent")
            thread = threading.Thread(target=lambda: result.append(
                associate(daemon.port, title="NEXT")))
            thread.start()
            time.sleep(0.3)  # connected by now: the kernel completes it, in the backlog
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        thread.join(30)
    [second] = result
    with held(second):
        assert second.is_established, "rejected: the ended association still counted"
        store_ok(second, ct_dataset())
        second.release()
    assert "association rejected" not in daemon.log()


def test_a_sender_that_reconnects_at_once_after_its_release_is_never_refused(
        daemon_factory: Factory) -> None:
    """A worker tells the master its association is over only after the peer has the
    A-RELEASE-RP; a sender of one object per association reconnects at once, and must not
    meet the limit of the association it has just released (storescp, one association at a
    time, never refuses it).  The next one that really is over the limit still is."""
    daemon = daemon_factory(settings(workers={"max_associations": 1, "spare_workers": 2}))
    for number in range(150):
        assoc = wire.associate(daemon.port, [(1, VERIFICATION, [IMPLICIT_LE])])
        wire.release(assoc)
        assert "association rejected" not in daemon.log(), f"association {number + 1}"
    holder = wire.associate(daemon.port)
    try:
        sock, pdu_type, body = wire.request_association(daemon.port, wire.DEFAULT_CONTEXTS)
        sock.close()
        assert pdu_type == wire.A_ASSOCIATE_RJ, (pdu_type, body)
    finally:
        wire.release(holder)
    assert "workers.max_associations = 1" in daemon.wait_log("association rejected")


def test_stop_retires_idle_workers_and_drains(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(workers={"spare_workers": 3, "stop_timeout": 20}))
    wait_until(lambda: len(idle(daemon)) == 3, 5, "three spares")
    spares = idle(daemon)
    assoc = associate(daemon.port, title="DRAINED")
    with held(assoc):
        assert assoc.is_established
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_log("waiting up to 20 s for 1 running association(s) to finish")
        wait_until(lambda: not any(alive(p) for p in spares - {served_by(daemon, "DRAINED")}),
                   5, "idle workers gone at once")
        store_ok(assoc, ct_dataset())  # the running association goes on
        assoc.release()
    assert daemon.proc.wait(20) == 0
    assert len(daemon.files()) == 1


def test_max_associations_rejects_with_spares_idle(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(workers={"spare_workers": 4, "max_associations": 1}))
    first = associate(daemon.port, title="HOLDER")
    with held(first):
        assert first.is_established
        second = associate(daemon.port, title="EXTRA")
        with held(second):
            assert_rejected_local_limit(second)
        first.release()
    assert "workers.max_associations = 1" in daemon.wait_log("association rejected")


# -- the reuse rule, in-process ------------------------------------------------------------------
@pytest.mark.parametrize("case", ["clean", "aborted", "tls", "failed", "limit", "descriptor",
                                  "memory"])
def test_judge(case: str, tmp_path: Path) -> None:
    """Judged in a forked child, as in a worker: only the forking thread exists there,
    whatever threads earlier tests left in this pytest process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, _judge_case(case, tmp_path).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        got = answer.read().decode()
    os.waitpid(pid, 0)
    assert got == "as expected", got


def _judge_case(case: str, tmp_path: Path) -> str:
    from dicom_ingestd.config.load import config_from_mapping
    from dicom_ingestd.worker.store import Store

    config = config_from_mapping({"storage": {"output_directory": str(tmp_path)},
                                  "workers": {"max_associations_per_worker": 3}})
    generation = Generation(1, config, Store(config.storage), None, -1)
    outcome = Outcome(how=Ending.RELEASED, stored=1)
    served = 1
    expected = Verdict.REUSABLE
    import ssl
    tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # before the baseline: it opens files
    baseline = Hygiene.now()
    held_open = None
    if case == "aborted":
        outcome.how, expected = Ending.ABORTED, Verdict.NOT_RELEASED
    elif case == "tls":
        generation = Generation(1, config, generation.store, tls_context, -1)
        expected = Verdict.TLS
    elif case == "failed":
        outcome.failed, expected = 1, Verdict.FAILED_STORE
    elif case == "limit":
        served, expected = 3, Verdict.LAST
    elif case == "descriptor":
        held_open = os.open(os.devnull, os.O_RDONLY)
        expected = Verdict.DESCRIPTORS
    elif case == "memory":
        baseline = Hygiene(baseline.descriptors, baseline.resident - MEMORY_GROWTH - 1)
        expected = Verdict.MEMORY
    verdict = judge(outcome, generation, served, baseline)
    if held_open is not None:
        os.close(held_open)
    return "as expected" if verdict is expected else f"{verdict.name}, not {expected.name}"
