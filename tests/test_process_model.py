"""The process model against the real daemon: fork and single workers, association limits,
timeouts, a worker killed mid-transfer, live reload, graceful stop and access control.

Every test runs `python -m dicom_ingestd run` (conftest's daemon_factory) and talks to it over
loopback with DCMTK tools, pynetdicom or raw sockets; nothing is mocked.  Settings use
logging.level = "info" unless a test needs more (see test_debug_log_is_quiet_while_idle for
why).  Each wait is bounded, so a hung daemon fails a test instead of hanging the run.
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage
from support.daemon import Daemon, config_of, log_lines, replace_config, write_config
from support.daemon import info_settings as settings
from support.data import ct_copies, ct_dataset
from support.peers import echoscu, require_tool, storescu
from support.procs import (
    BUSY_WORKER,
    IDLE_WORKER,
    alive,
    child_pids,
    helpers_of,
    process_name,
    workers_of,
)
from support.scu import assert_rejected_local_limit, associate, echo_ok, held, store_ok
from support.wait import wait_until
from support.wire import connect_from, recv_until_closed

Factory = Callable[..., Daemon]

# "2026-01-01 12:00:00,000 INFO [1234] 127.0.0.1:5555 STORESCU->ANY-SCP: stored 1.2.3 ..."
STORED = re.compile(r"^\S+ \S+ INFO \[(\d+)\] (\S+) \S+: stored (\S+) ", re.MULTILINE)


# -- helpers ---------------------------------------------------------------------------------
def start_partial_store(assoc: Association, ds: Dataset) -> int:
    """Send a C-STORE-RQ and all of its data set but the last fragment; return the bytes sent.

    Done on the association's socket directly (pynetdicom's own DIMSE layer would always send
    the whole message); the daemon is left in the middle of receiving a data set.
    """
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 0
    # The data set alone (no preamble, no file meta) as it goes on the wire.
    body = Dataset()
    body.update(ds)
    primitive.DataSet = BytesIO(encode(body, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for p_data in message.encode_msg(cx.context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(pdu)
    assert len(pdus) >= 3, "need a data set of more than one fragment"
    raw = assoc.dul.socket.socket
    sent = 0
    for pdu in pdus[:-1]:
        data = pdu.encode()
        raw.sendall(data)
        sent += len(data)
    return sent


def stored_names(daemon: Daemon) -> dict[str, Path]:
    """Stored files by SOP Instance UID (read from the files)."""
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in daemon.files()}


# -- fork and single -------------------------------------------------------------------------
def run_parallel_senders(port: int, batches: list[list[Path]]) -> None:
    require_tool("storescu")
    env = dict(os.environ, TCP_NODELAY="1")
    procs = [subprocess.Popen(["storescu", "127.0.0.1", str(port), *map(str, batch)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for batch in batches]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        outputs.append((proc.returncode, out.decode(errors="replace")))
    for code, out in outputs:
        assert code == 0, out


def test_fork_parallel_senders_are_served_by_separate_workers(
        daemon_factory: Factory, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(workers={"process_model": "fork"}))
    batches = [ct_copies(tmp_path / "in", 10, f"s{n}") for n in range(4)]
    run_parallel_senders(daemon.port, batches)

    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for batch in batches for p in batch}
    assert set(stored_names(daemon)) == expected
    stored = STORED.findall(daemon.log())
    assert {uid for _, _, uid in stored} == expected
    pids = {int(pid) for pid, _, _ in stored}
    assert len(pids) >= 2, pids
    assert daemon.proc.pid not in pids
    # Every worker that stored something was the master's child, and now waits for the next
    # association (reused: each ended cleanly) or is gone.
    wait_until(lambda: not workers_of(daemon.proc.pid, BUSY_WORKER), 5, "workers done")
    assert all(not alive(pid) or process_name(pid) == IDLE_WORKER for pid in pids)
    assert daemon.staging() == []


def test_single_process_parallel_senders_are_served_in_the_master(
        daemon_factory: Factory, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(workers={"process_model": "single"}))
    daemon.wait_log("process model single")
    batches = [ct_copies(tmp_path / "in", 10, f"s{n}") for n in range(4)]
    run_parallel_senders(daemon.port, batches)

    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                for batch in batches for p in batch}
    assert set(stored_names(daemon)) == expected
    stored = STORED.findall(daemon.log())
    assert len(stored) == 40
    assert {int(pid) for pid, _, _ in stored} == {daemon.proc.pid}
    # No association process was forked (the only child is the config watcher).
    assert len(child_pids(daemon.proc.pid)) <= 1
    assert not workers_of(daemon.proc.pid, IDLE_WORKER)


# -- association limits ----------------------------------------------------------------------
def test_max_associations_rejects_transient_local_limit(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(workers={"max_associations": 2}))
    first = associate(daemon.port)
    second = associate(daemon.port)
    with held(first), held(second):
        assert first.is_established and second.is_established
        for _ in range(3):
            extra = associate(daemon.port)
            with held(extra):
                assert_rejected_local_limit(extra)
        assert len(log_lines(daemon, "workers.max_associations = 2")) == 3
        # The held ones were not disturbed by the rejections.
        echo_ok(first)
        store_ok(second, ct_dataset())
        first.release()
        second.release()
    # Once both workers are done (only the watcher and idle workers remain), there is room
    # again.
    wait_until(lambda: len(log_lines(daemon, "association released")) == 2, 5,
               "both held associations released")
    wait_until(lambda: len(helpers_of(daemon.proc.pid)) <= 1, 5, "held workers done")
    again = associate(daemon.port)
    with held(again):
        assert again.is_established, "rejected after the held associations were released"
        echo_ok(again)
        again.release()


def test_max_associations_per_peer_counts_each_address(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(network={"bind_address": "127.0.0.1"},
                                     workers={"max_associations_per_peer": 1}))
    one = associate(daemon.port, bind="127.0.0.1")
    with held(one):
        assert one.is_established
        same_peer = associate(daemon.port, bind="127.0.0.1")
        with held(same_peer):
            assert_rejected_local_limit(same_peer)
        daemon.wait_log("from 127.0.0.1 (workers.max_associations_per_peer = 1)")
        other_peer = associate(daemon.port, bind="127.0.0.2")
        with held(other_peer):
            assert other_peer.is_established, "127.0.0.2 was limited by 127.0.0.1's association"
            store_ok(other_peer, ct_dataset())
            # 127.0.0.2 is now at its own limit too.
            limited = associate(daemon.port, bind="127.0.0.2")
            with held(limited):
                assert_rejected_local_limit(limited)
            other_peer.release()
        echo_ok(one)
        one.release()


# -- timeouts --------------------------------------------------------------------------------
def test_stalled_peer_is_dropped_while_others_are_served(
        daemon_factory: Factory, tmp_path: Path) -> None:
    daemon = daemon_factory(settings(network={"socket_timeout": 1}))
    stalled = socket.create_connection(("127.0.0.1", daemon.port))
    with stalled:
        stalled.sendall(b"\x01\x00\x00")  # half an A-ASSOCIATE-RQ header, then nothing
        start = time.monotonic()
        result = storescu(daemon.port, *ct_copies(tmp_path / "in", 1, "x"), timeout=20)
        assert result.returncode == 0
        assert time.monotonic() - start < 2.5, "storescu waited for the stalled peer"
        try:
            data, _ = recv_until_closed(stalled, 4)
        except TimeoutError:
            pytest.fail("stalled connection still open after socket_timeout = 1")
    took = time.monotonic() - start
    assert took < 3.5, took
    assert data in (b"", bytes.fromhex("07000000000400000200")), data  # nothing, or A-ABORT
    daemon.wait_log("dropping the association", timeout=2)
    assert len(daemon.files()) == 1


def test_peer_stalling_mid_data_set_is_dropped_and_partial_removed(
        daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(network={"socket_timeout": 1}))
    assoc = associate(daemon.port)
    with held(assoc):
        assert assoc.is_established
        start_partial_store(assoc, ct_dataset())
        wait_until(daemon.staging, 3, "a .part file for the stalled C-STORE")
        start = time.monotonic()
        wait_until(lambda: not assoc.is_established, 4, "association dropped by the daemon")
        assert time.monotonic() - start < 3
    wait_until(lambda: daemon.staging() == [], 3, "partial object removed")
    daemon.wait_log("dropping the association")
    assert daemon.files() == []
    echoscu(daemon.port)


# -- a worker killed mid-transfer -------------------------------------------------------------
@pytest.fixture(scope="module")
def big_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~100 MB CT object (7240 x 7240, 16 bit)."""
    ds = ct_dataset()
    ds.Rows = ds.Columns = 7240
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelData = bytes(7240 * 7240 * 2)
    ds["PixelData"].VR = "OW"
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sigkill_of_a_worker_mid_transfer(daemon_factory: Factory, big_object: Path,
                                          tmp_path: Path) -> None:
    # The smallest PDU we may advertise makes the 100 MB take long enough to catch.
    daemon = daemon_factory(settings(network={"max_pdu": 4096}))
    bystander = associate(daemon.port, title="BYSTANDER")
    with held(bystander):
        assert bystander.is_established
        echo_ok(bystander)
        env = dict(os.environ, TCP_NODELAY="1")
        sender = subprocess.Popen(["storescu", "127.0.0.1", str(daemon.port), str(big_object)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            def growing_part() -> Path | None:
                for part in daemon.staging():
                    with contextlib.suppress(FileNotFoundError):
                        if part.stat().st_size > 1 << 20:
                            return part
                return None

            part = wait_until(growing_part, 20, ".part file over 1 MB", interval=0.005)
            worker = int(part.name.split("-", 1)[0])
            assert worker in child_pids(daemon.proc.pid), (worker, child_pids(daemon.proc.pid))
            assert worker != daemon.proc.pid
            os.kill(worker, signal.SIGKILL)
            sender.communicate(timeout=30)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
        assert sender.returncode != 0, "storescu succeeded although its worker was killed"

        requested = [line for line in log_lines(daemon, "association requested")
                     if f"[{worker}]" in line]
        assert requested, daemon.log()
        peer = requested[0].split(f"[{worker}] ", 1)[1].split()[0]
        line = wait_until(lambda: [x for x in log_lines(daemon, "killed by SIGKILL")
                                   if f"worker {worker}" in x], 5, "master logs the kill")[0]
        assert " ERROR " in line and f"[{daemon.proc.pid}]" in line, line
        assert peer in line, (peer, line)
        wait_until(lambda: not [p for p in daemon.staging() if p.name.startswith(f"{worker}-")],
                   2, "the killed worker's partial file removed")
        assert daemon.files() == []

        # The association that was running meanwhile is unaffected.
        echo_ok(bystander)
        store_ok(bystander, ct_dataset())
        bystander.release()
    storescu(daemon.port, *ct_copies(tmp_path / "in", 1, "after"))
    assert len(daemon.files()) == 2
    assert daemon.proc.poll() is None


# -- reload ----------------------------------------------------------------------------------
def test_sighup_reload_applies_to_new_associations_only(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings())
    held_assoc = associate(daemon.port)
    with held(held_assoc):
        assert held_assoc.is_established
        old_ds = ct_dataset()
        store_ok(held_assoc, old_ds)

        config = config_of(daemon)
        config["storage"]["filename_extension"] = ".dcm"
        write_config(daemon.config_path, config)
        daemon.proc.send_signal(signal.SIGHUP)  # before the watcher's debounce could fire
        daemon.wait_log("received SIGHUP")
        daemon.wait_log("reload: configuration applied")
        first = log_lines(daemon, "reload: configuration applied")[0]
        assert "storage.filename_extension" in first, first

        # The held association keeps the configuration it started with.
        during = ct_dataset()
        store_ok(held_assoc, during)
        # A new one uses the new extension.
        fresh = associate(daemon.port)
        with held(fresh):
            new_ds = ct_dataset()
            store_ok(fresh, new_ds)
            fresh.release()
        names = stored_names(daemon)
        assert not names[old_ds.SOPInstanceUID].name.endswith(".dcm")
        assert not names[during.SOPInstanceUID].name.endswith(".dcm")
        assert names[new_ds.SOPInstanceUID].name.endswith(".dcm")

        # An invalid edit is refused: logged with file and key, the running config stays.
        for bad, key in ((lambda c: c["network"].update(port="x"), "network.port"),
                         (lambda c: c["storage"].update(filename_extention=".x"),
                          "storage.filename_extention")):
            broken = config_of(daemon)
            bad(broken)
            write_config(daemon.config_path, broken)
            daemon.proc.send_signal(signal.SIGHUP)
            error = wait_until(
                lambda k=key: [x for x in log_lines(daemon, "reload rejected") if k in x], 5,
                f"reload of an invalid {key} rejected")[0]
            assert " ERROR " in error and str(daemon.config_path) in error, error
            assert daemon.proc.poll() is None
            # No association dropped, and new associations still get the last good settings.
            later = ct_dataset()
            store_ok(held_assoc, later)
            assert not stored_names(daemon)[later.SOPInstanceUID].name.endswith(".dcm")
            check = associate(daemon.port)
            with held(check):
                newer = ct_dataset()
                store_ok(check, newer)
                check.release()
            assert stored_names(daemon)[newer.SOPInstanceUID].name.endswith(".dcm")
        held_assoc.release()
    assert "association aborted" not in daemon.log()


def test_config_file_rewrite_is_applied_without_sighup(daemon_factory: Factory,
                                                        tmp_path: Path) -> None:
    daemon = daemon_factory(settings())
    # The watcher process starts watching up to ~0.1 s after "ready" (see the next test).
    time.sleep(0.3)
    config = config_of(daemon)
    config["storage"]["filename_extension"] = ".img"
    replace_config(daemon, config)
    start = time.monotonic()
    daemon.wait_log("reload: configuration applied", timeout=2)
    assert time.monotonic() - start < 2
    assert "changed on disk: reloading" in daemon.log()
    assert "received SIGHUP" not in daemon.log()
    storescu(daemon.port, *ct_copies(tmp_path / "in", 1, "w"))
    [stored] = daemon.files()
    assert stored.name.endswith(".img"), stored


def test_config_rewrite_right_after_ready_is_not_lost(daemon_factory: Factory,
                                                       tmp_path: Path) -> None:
    """An edit made as soon as the daemon says it is ready must still be noticed.

    "ready" (the log line, and READY=1 to systemd) is announced right after the watcher
    process is forked, before it has imported watchdog and added its inotify watch; an edit in
    that window is silently never applied (no reload until the next edit or SIGHUP).
    """
    daemon = daemon_factory(settings(), wait=False)
    config = tomllib.loads(daemon.config_path.read_text())
    config["storage"]["filename_extension"] = ".early"
    temp = daemon.config_path.with_name("early.toml.tmp")
    write_config(temp, config)
    wait_until(lambda: "listening on" in daemon.log(), 10, "daemon ready", interval=0.002)
    os.replace(temp, daemon.config_path)
    try:
        daemon.wait_log("reload: configuration applied", timeout=2)
    except AssertionError:
        pytest.fail("config rewritten right after the 'ready' line was never reloaded:\n"
                    + daemon.log())
    storescu(daemon.port, *ct_copies(tmp_path / "in", 1, "early"))
    [stored] = daemon.files()
    assert stored.name.endswith(".early"), stored


def test_reload_does_not_leak_descriptors_in_the_master(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings())
    fd_dir = Path(f"/proc/{daemon.proc.pid}/fd")
    before = len(os.listdir(fd_dir))
    for round_ in range(6):
        config = config_of(daemon)
        config["storage"]["filename_extension"] = f".r{round_}"
        write_config(daemon.config_path, config)
        applied = len(log_lines(daemon, "reload: configuration applied"))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda n=applied: len(log_lines(daemon, "reload: configuration applied")) > n,
                   5, "reload applied")
    time.sleep(0.6)  # let the watcher's own (debounced) reloads of the same edits finish
    after = len(os.listdir(fd_dir))
    assert after <= before, (f"{after - before} more descriptors after 6 reloads "
                             f"changing [storage]: {sorted(os.listdir(fd_dir))}")


# -- graceful stop ---------------------------------------------------------------------------
def port_still_open(port: int, host: str = "127.0.0.1") -> str:
    """'' when connecting is refused, else what still listens there."""
    try:
        sock = socket.create_connection((host, port), 1)
    except ConnectionRefusedError:
        return ""
    with sock:
        return subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                              text=True).stdout.strip() or "?"


def test_sigterm_lets_a_running_transfer_finish(daemon_factory: Factory,
                                                tmp_path: Path) -> None:
    # CT_small (38 KB) in 16 KB PDUs is 3 data PDUs: about 3 s with sleep_during = 1.
    daemon = daemon_factory(settings(testing={"sleep_during": 1}))
    [path] = ct_copies(tmp_path / "in", 1, "slow")
    env = dict(os.environ, TCP_NODELAY="1")
    sender = subprocess.Popen(["storescu", "127.0.0.1", str(daemon.port), str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(daemon.staging, 5, "the transfer started")
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_log("received SIGTERM")
        # New connections are refused at once (not left hanging in a backlog nobody
        # accepts from); the running one goes on.  Checked at the end.
        listening = port_still_open(daemon.port)
        listening += f" (master pid {daemon.proc.pid}, children {child_pids(daemon.proc.pid)})"
        out, _ = sender.communicate(timeout=15)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert sender.returncode == 0, out.decode(errors="replace")
    assert daemon.proc.wait(10) == 0
    assert len(daemon.files()) == 1
    assert daemon.staging() == []
    assert "stopped after 1 association(s), 1 object(s) stored" in daemon.log()
    assert listening.startswith(" "), f"port still accepted connections while stopping: {listening}"


def test_stop_timeout_stops_a_held_worker(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(workers={"stop_timeout": 1}))
    assoc = associate(daemon.port)
    with held(assoc):
        assert assoc.is_established
        start_partial_store(assoc, ct_dataset())
        wait_until(daemon.staging, 3, "a .part file for the held C-STORE")
        [part] = daemon.staging()
        worker = int(part.name.split("-", 1)[0])
        start = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(10)
        took = time.monotonic() - start
    assert code == 0
    assert 0.8 < took < 4, took
    assert not alive(worker)
    assert daemon.staging() == []
    assert daemon.files() == []
    log = daemon.log()
    assert "stop timeout reached; stopping worker" in log
    assert f"worker {worker} killed by SIGTERM; 1 partial object(s) removed" in log


# -- access control --------------------------------------------------------------------------
def assert_closed_unanswered(sock: socket.socket) -> None:
    with sock:
        data, took = recv_until_closed(sock, 3)
    assert data == b"", data
    assert took < 1, took


def test_access_deny_closes_without_a_byte(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(network={"bind_address": "127.0.0.1"},
                                     access={"deny": ["127.0.0.2"]}))
    assert_closed_unanswered(connect_from("127.0.0.2", daemon.port))
    line = daemon.wait_log("refused by access control")
    assert "127.0.0.2" in line and "matches access.deny 127.0.0.2/32" in line
    # A denied peer never reaches a worker.
    assert "127.0.0.2" not in "".join(log_lines(daemon, "association requested"))
    echoscu(daemon.port)
    ok = associate(daemon.port, bind="127.0.0.3")
    with held(ok):
        assert ok.is_established
        ok.release()


def test_access_allow_admits_only_its_members(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(network={"bind_address": "127.0.0.1"},
                                     access={"allow": ["127.0.0.1/32"]}))
    assert_closed_unanswered(connect_from("127.0.0.3", daemon.port))
    daemon.wait_log("127.0.0.3 is not in access.allow")
    refused = associate(daemon.port, bind="127.0.0.3")
    assert not refused.is_established
    echoscu(daemon.port)


def test_ipv6_only_listener(daemon_factory: Factory) -> None:
    daemon = daemon_factory(settings(network={"ip_version": "ipv6", "bind_address": "::1"}))
    daemon.wait_log("listening on [::1]:")
    # DCMTK 3.6.7's echoscu cannot address an IPv6 peer ("Illegal service parameter"), so
    # pynetdicom is the IPv6 peer.
    assoc = associate(daemon.port, host="::1")
    with held(assoc):
        assert assoc.is_established
        echo_ok(assoc)
        store_ok(assoc, ct_dataset())
        assoc.release()
    assert log_lines(daemon, "[::1]:")
    assert len(daemon.files()) == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.port), 1).close()


def test_dual_stack_listener_applies_ipv4_rules_to_mapped_peers(
        daemon_factory: Factory) -> None:
    # A dual (IPv6, V6ONLY off) socket on the IPv4-mapped loopback: IPv4 peers arrive as
    # ::ffff:127.x.y.z, and access rules and per-peer limits must still see the IPv4 address.
    daemon = daemon_factory(settings(
        network={"ip_version": "dual", "bind_address": "::ffff:127.0.0.1"},
        access={"deny": ["127.0.0.2"]}, workers={"max_associations_per_peer": 1}))
    echoscu(daemon.port)
    assert_closed_unanswered(connect_from("127.0.0.2", daemon.port))
    daemon.wait_log("matches access.deny 127.0.0.2/32")
    one = associate(daemon.port, bind="127.0.0.3")
    with held(one):
        assert one.is_established
        again = associate(daemon.port, bind="127.0.0.3")
        with held(again):
            assert_rejected_local_limit(again)
        other = associate(daemon.port, bind="127.0.0.4")
        with held(other):
            assert other.is_established
            other.release()
        one.release()


# -- the config watcher process ----------------------------------------------------------------
def test_config_edited_in_place_is_reloaded(daemon_factory: Factory, tmp_path: Path) -> None:
    """Editors that write the file itself (nano, vim with backupcopy) instead of renaming a new
    one over it: the watcher's event filter must still let the change through."""
    daemon = daemon_factory(settings())
    config = config_of(daemon)
    config["storage"]["filename_extension"] = ".inplace"
    write_config(daemon.config_path, config)  # truncates and writes the same inode
    daemon.wait_log("reload: configuration applied", timeout=5)
    storescu(daemon.port, *ct_copies(tmp_path / "in", 1, "inplace"))
    [stored] = daemon.files()
    assert stored.name.endswith(".inplace"), stored


def test_debug_log_is_quiet_while_idle(daemon_factory: Factory, tmp_path: Path) -> None:
    """At debug level an idle daemon must not log forever.

    The config watcher (a child process) watches the config file's directory; conftest puts
    the log file next to the config file, as operators often do (/var/lib/x/{ingestd.toml,
    ingestd.log}).  Any event in that directory must not start a self-sustaining stream of log
    lines (each written line being a new event in the watched directory).
    """
    daemon = daemon_factory({"logging": {"level": "debug"}})
    (tmp_path / "unrelated-file").write_text("x")  # one event in the watched directory
    time.sleep(1.0)
    first = len(daemon.log().splitlines())
    time.sleep(1.0)
    second = len(daemon.log().splitlines())
    assert second - first < 5, (
        f"{second - first} log lines in 1 s from an idle daemon; sample:\n"
        + "\n".join(daemon.log().splitlines()[first:first + 5]))
