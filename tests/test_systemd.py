"""systemd integration against the real daemon: socket activation (Accept=no, Accept=yes,
inetd), sd_notify (READY, STATUS, WATCHDOG, RELOADING, STOPPING) and the journal line prefix.

Socket activation uses systemd's own `systemd-socket-activate`; sd_notify is received on an
AF_UNIX datagram socket this test binds (with SO_PASSCRED, to check who sent each message,
as systemd's NotifyAccess=main does).  The daemon is started with support.daemon's `launch`
(start_daemon would wait for its log line, and gives it no NOTIFY_SOCKET or JOURNAL_STREAM),
with the environment each test sets.
"""

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from proxy_headers import Relay
from support.daemon import (
    REPO,
    Configured,
    Daemon,
    configure,
    daemon_argv,
    daemon_env,
    launch,
    socket_activated,
)
from support.data import ct_copies
from support.peers import echoscu, require_tool, storescu
from support.procs import alive
from support.wait import wait_until

ACTIVATE = "systemd-socket-activate"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture
def runs() -> Iterator[list[Daemon]]:
    """Everything a test started is stopped afterwards."""
    started: list[Daemon] = []
    yield started
    for run in started:
        run.stop()


def make_config(tmp_path: Path, **tables: dict[str, Any]) -> Configured:
    """A configuration of `tables`, logging at info level."""
    return configure(tmp_path, tables, level="info")


def start(runs: list[Daemon], configured: Configured, log_path: Path,
          env: dict[str, str] | None = None) -> Daemon:
    run = launch(daemon_argv(configured.config_path), configured, log_path, env=env)
    runs.append(run)
    return run


def activate(runs: list[Daemon], tmp_path: Path, options: list[str],
             **tables: dict[str, Any]) -> Daemon:
    run = socket_activated(tmp_path, options, tables)
    runs.append(run)
    return run


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except ConnectionRefusedError:
        return True
    return False


def pids_of(log: str, text: str) -> list[int]:
    """The [PID] of each daemon log line containing text."""
    return [int(line.split("[", 1)[1].split("]", 1)[0]) for line in log.splitlines()
            if text in line and "[" in line]


# -- socket activation -----------------------------------------------------------------------
def test_socket_activation_accept_no_uses_the_inherited_listener(
        runs: list[Daemon], tmp_path: Path) -> None:
    run = activate(runs, tmp_path, [])
    config_port = int(run.config_path.read_text().split("port = ", 1)[1].split()[0])
    echoscu(run.port, timeout=60)  # the first connection makes systemd-socket-activate exec
    run.wait_log(f"listening on 127.0.0.1:{run.port}")
    storescu(run.port, *ct_copies(tmp_path / "in", 1, "a"), timeout=60)
    assert len(run.files()) == 1
    assert refused(config_port), "the configured port is listening too"
    # One master (systemd-socket-activate exec'ed it: same pid) served both.
    assert pids_of(run.log(), "listening on") == [run.proc.pid]
    assert run.stop() == 0
    assert "stopped after 2 association(s), 1 object(s) stored" in run.log()


@pytest.mark.parametrize("options", [[], ["--accept"]], ids=["accept-no", "accept-yes"])
def test_socket_activation_on_a_unix_socket(runs: list[Daemon], tmp_path: Path,
                                            options: list[str]) -> None:
    """ListenStream=/run/x.sock (or HAProxy's `server x unix@...` in front of it): the
    connections are AF_UNIX, which refuse TCP options (TCP_NODELAY, TCP_QUICKACK: EOPNOTSUPP);
    associations are served all the same, by storescu and echoscu through a relay."""
    require_tool(ACTIVATE)
    configured = make_config(tmp_path)  # network.tcp_nodelay on: the default
    path = tmp_path / "in.sock"
    run = launch([ACTIVATE, *options, "-l", str(path), *daemon_argv(configured.config_path)],
                 configured, tmp_path / "activate.log", port=0)
    runs.append(run)
    run.wait_log(f"Listening on {path}")
    relay = Relay(0, lambda _client: b"", unix=str(path))
    try:
        storescu(relay.port, *ct_copies(tmp_path / "in", 1, "a"), timeout=60)
        echoscu(relay.port, timeout=60)
    finally:
        relay.close()
    assert len(run.files()) == 1
    log = run.wait_log("ECHOSCU->ANY-SCP: association released")
    assert re.search(r"INFO \[\d+\] local STORESCU->ANY-SCP: association released: 1 stored",
                     log), log
    assert "ERROR" not in log and "Operation not supported" not in log, log
    if not options:
        assert f"listening on {path}" in log


def test_socket_activation_accept_yes_one_process_per_connection(
        runs: list[Daemon], tmp_path: Path) -> None:
    run = activate(runs, tmp_path, ["--accept"])
    storescu(run.port, *ct_copies(tmp_path / "in", 1, "a"), timeout=60)
    storescu(run.port, *ct_copies(tmp_path / "in", 1, "b"), timeout=60)
    assert len(run.files()) == 2
    log = run.log()
    served = pids_of(log, "association released")
    assert len(served) == 2 and len(set(served)) == 2, log
    assert run.proc.pid not in served
    # Each per-connection instance exits after its association.
    for pid in served:
        wait_until(lambda p=pid: not alive(p), 10, f"instance {pid} exited")
    assert "listening on" not in log  # no instance became a listening master
    assert "exited with status" not in log and "Traceback" not in log
    assert run.proc.poll() is None  # systemd-socket-activate itself keeps listening


def test_accept_yes_with_events_is_refused_up_front_and_stores_nothing(
        runs: list[Daemon], tmp_path: Path) -> None:
    """[events] needs the master: check-config --per-connection (the accept socket's
    ExecStartPre) says so, and a connection that meets it anyway stores nothing."""
    run = activate(runs, tmp_path, ["--accept"], events={"exec_on_reception": ["/bin/true"]})
    checked = subprocess.run([sys.executable, "-m", "dicom_ingestd", "check-config",
                              "--per-connection", "-c", str(run.config_path)], capture_output=True,
                             text=True, timeout=30, cwd=REPO)
    assert checked.returncode == 78
    assert "events.exec_on_reception: [events] needs the master" in checked.stderr
    plain = subprocess.run([sys.executable, "-m", "dicom_ingestd", "check-config", "-c",
                            str(run.config_path)], capture_output=True, text=True, timeout=30,
                           cwd=REPO)
    assert plain.returncode == 0, plain.stderr
    result = storescu(run.port, *ct_copies(tmp_path / "in", 1, "a"), timeout=60, check=False)
    assert result.returncode != 0
    run.wait_log("[events] needs the master")
    assert run.files() == []


def test_inetd_mode_accepted_connection_on_stdin_stdout(runs: list[Daemon],
                                                        tmp_path: Path) -> None:
    # inetd "nowait": the accepted connection is fd 0 and fd 1; the daemon logs to stderr.
    run = activate(runs, tmp_path, ["--accept", "--inetd"], network={"inetd": True})
    storescu(run.port, *ct_copies(tmp_path / "in", 1, "a"), timeout=60)
    # A stray byte on stdout would have corrupted the A-ASSOCIATE-AC or a response, so a
    # second association (echo, then store) checks a fresh instance too.
    echoscu(run.port, timeout=60)
    storescu(run.port, *ct_copies(tmp_path / "in", 1, "b"), timeout=60)
    assert len(run.files()) == 2
    log = run.log()
    assert len(set(pids_of(log, "association released"))) == 3, log
    assert "Traceback" not in log


def test_inetd_mode_with_listening_socket_on_stdin(runs: list[Daemon], tmp_path: Path) -> None:
    """`systemd-socket-activate --inetd` without --accept passes the *listening* socket as fd 0
    (inetd "wait" style; systemd Accept=no with StandardInput=socket).  The daemon must serve
    the connection waiting on it, not treat fd 0 as a connected peer."""
    run = activate(runs, tmp_path, ["--inetd"], network={"inetd": True})
    result = storescu(run.port, *ct_copies(tmp_path / "in", 1, "a"), check=False, timeout=60)
    assert result.returncode == 0, (
        f"storescu failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
        f"daemon log:\n{run.log()}")
    assert len(run.files()) == 1


# -- sd_notify -------------------------------------------------------------------------------
@dataclass
class Message:
    at: float  # time.monotonic() on arrival
    pid: int  # sender, from SCM_CREDENTIALS
    fields: dict[str, str]
    text: str


@dataclass
class NotifySocket:
    """An sd_notify receiver: the NOTIFY_SOCKET a service manager would provide."""

    path: Path
    sock: socket.socket = field(init=False)
    messages: list[Message] = field(default_factory=list)
    _stop: bool = False

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        creds = struct.Struct("iII")
        while not self._stop:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(creds.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = creds.unpack(payload[:creds.size])[0]
            text = data.decode(errors="replace")
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            self.messages.append(Message(time.monotonic(), pid, fields, text))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float, what: str,
                 after: float = 0.0) -> Message:
        def find() -> Message | None:
            return next((m for m in list(self.messages) if m.at >= after and predicate(m)),
                        None)
        found: Message = wait_until(find, timeout, f"sd_notify {what}; got "
                                    f"{[m.text for m in self.messages][-10:]}")
        return found


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


def test_sd_notify_ready_status_watchdog_reload_stop(runs: list[Daemon], tmp_path: Path,
                                                     notify: NotifySocket) -> None:
    configured = make_config(tmp_path)
    env = daemon_env()
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    started = time.monotonic()
    run = start(runs, configured, tmp_path / "d.log", env)

    ready = notify.wait_for(lambda m: m.fields.get("READY") == "1", 20, "READY=1")
    # Ready means accepting: the port must take a connection the moment READY=1 arrives.
    with socket.create_connection(("127.0.0.1", configured.port), 2):
        pass
    assert "STATUS" in ready.fields, ready.text
    assert ready.pid == run.proc.pid, (ready.pid, run.proc.pid)

    # WatchdogSec=0.4 s: pinged every half interval, so >= 3 pings in ~1 s.
    window = time.monotonic()
    time.sleep(1.2)
    pings = [m for m in list(notify.messages) if m.at >= window and m.fields.get("WATCHDOG")]
    assert len(pings) >= 3, [m.text for m in notify.messages]

    storescu(configured.port, *ct_copies(tmp_path / "in", 1, "a"), timeout=60)
    notify.wait_for(lambda m: "1 object" in m.fields.get("STATUS", ""), 10,
                    "STATUS mentioning 1 object")

    before_hup = time.monotonic()
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    run.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for(lambda m: m.fields.get("RELOADING") == "1", 10, "RELOADING=1",
                                after=before_hup)
    assert "MONOTONIC_USEC" in reloading.fields, reloading.text
    assert 0 <= int(reloading.fields["MONOTONIC_USEC"]) - now_usec < 10_000_000
    notify.wait_for(lambda m: m.fields.get("READY") == "1", 10, "READY=1 after the reload",
                    after=reloading.at)

    before_term = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    notify.wait_for(lambda m: m.fields.get("STOPPING") == "1", 10, "STOPPING=1",
                    after=before_term)
    assert run.proc.wait(20) == 0
    # Only the main process talks to the service manager (NotifyAccess=main).
    senders = {m.pid for m in notify.messages}
    assert senders == {run.proc.pid}, senders
    assert notify.messages[0].at >= started


def test_sd_notify_watchdog_for_another_pid_is_not_ours(runs: list[Daemon], tmp_path: Path,
                                                        notify: NotifySocket) -> None:
    configured = make_config(tmp_path)
    env = daemon_env()
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000", WATCHDOG_PID="1")
    start(runs, configured, tmp_path / "d.log", env)
    notify.wait_for(lambda m: m.fields.get("READY") == "1", 20, "READY=1")
    time.sleep(1.0)
    assert not [m for m in notify.messages if "WATCHDOG" in m.fields]


# -- journal prefix --------------------------------------------------------------------------
def journal_run(runs: list[Daemon], tmp_path: Path, prefix: str | None) -> Daemon:
    """A daemon whose stderr "is the journal": JOURNAL_STREAM names its log file."""
    logging_table: dict[str, Any] = {"level": "info"}
    if prefix is not None:
        logging_table["journal_prefix"] = prefix
    configured = make_config(tmp_path, logging=logging_table,
                                    access={"deny": ["127.0.0.2"]})
    log_path = tmp_path / "journal.log"
    log_path.touch()
    st = os.stat(log_path)
    env = daemon_env()
    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    run = start(runs, configured, log_path, env)
    run.wait_log("listening on")
    echoscu(configured.port, timeout=60)  # info lines
    with socket.socket() as denied:  # a warning line (refused by access control)
        denied.bind(("127.0.0.2", 0))
        denied.connect(("127.0.0.1", configured.port))
        denied.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            denied.recv(1)
    run.wait_log("refused by access control")
    assert run.stop() == 0
    return run


def test_journal_stream_lines_carry_syslog_priorities(runs: list[Daemon],
                                                      tmp_path: Path) -> None:
    run = journal_run(runs, tmp_path, None)
    lines = [line for line in run.log().splitlines() if line]
    bad = [line for line in lines if line[:3] not in ("<2>", "<3>", "<4>", "<6>", "<7>")]
    assert not bad, bad
    if JOURNAL_SOCKET.exists() and not lines:
        return  # a journald is running: records went natively (the fallback is prefixed)
    assert any(line.startswith("<6>") and "listening on" in line for line in lines)
    warning = [line for line in lines if "refused by access control" in line]
    assert warning and warning[0].startswith("<4>"), warning
    # journald stamps the time itself: no timestamp in the line.
    assert all(line[3] == "[" for line in lines), lines[:3]


def test_journal_prefix_never(runs: list[Daemon], tmp_path: Path) -> None:
    run = journal_run(runs, tmp_path, "never")
    lines = [line for line in run.log().splitlines() if line]
    assert lines  # "never" also means: stderr, never the native journal protocol
    assert not [line for line in lines if line.startswith("<")], lines
    warning = [line for line in lines if "refused by access control" in line]
    assert warning and " WARNING [" in warning[0], warning


def test_journal_prefix_always_without_journal(runs: list[Daemon], tmp_path: Path) -> None:
    configured = make_config(tmp_path, logging={"level": "info",
                                                       "journal_prefix": "always"})
    run = start(runs, configured, tmp_path / "d.log")
    run.wait_log("listening on")
    assert run.stop() == 0
    lines = [line for line in run.log().splitlines() if line]
    assert lines and all(line.startswith("<6>[") for line in lines), lines


# -- peers in logs and journal fields --------------------------------------------------------
@pytest.mark.parametrize(("address", "name", "fields"), [
    (("::ffff:10.1.2.3", 52274, 0, 0), "10.1.2.3:52274",
     {"DICOM_PEER": "10.1.2.3", "DICOM_PEER_PORT": "52274"}),
    (("10.1.2.3", 104), "10.1.2.3:104", {"DICOM_PEER": "10.1.2.3", "DICOM_PEER_PORT": "104"}),
    (("2001:db8::1", 4242, 0, 0), "[2001:db8::1]:4242",
     {"DICOM_PEER": "2001:db8::1", "DICOM_PEER_PORT": "4242"}),
    (("::ffff:0:1", 7, 0, 0), "[::ffff:0:1]:7", {"DICOM_PEER": "::ffff:0:1",
                                                 "DICOM_PEER_PORT": "7"}),
    ("", "local", {"DICOM_PEER": "local"}),
])
def test_peer_names_and_journal_fields(address: object, name: str,
                                       fields: dict[str, str]) -> None:
    from dicom_ingestd.event_commands import peer_host
    from dicom_ingestd.peer import Peer

    peer = Peer.from_address(address)
    assert peer.name == str(peer) == name
    assert peer.fields() == fields
    assert peer_host(peer.name) == fields["DICOM_PEER"]  # #r


def test_dual_stack_peer_is_logged_as_plain_ipv4(runs: list[Daemon], tmp_path: Path) -> None:
    configured = make_config(tmp_path, network={"ip_version": "dual",
                                                       "bind_address": "::"})
    run = start(runs, configured, tmp_path / "d.log")
    run.wait_log("ready")
    storescu(configured.port, *ct_copies(tmp_path / "in", 1, "a"), timeout=60)
    log = run.wait_log("association released")
    assert "::ffff:" not in log and " 127.0.0.1:" in log, log


# -- STATUS= and reload outcomes -------------------------------------------------------------
def test_status_line_shows_failures_and_a_rejected_reload(runs: list[Daemon], tmp_path: Path,
                                                          notify: NotifySocket) -> None:
    configured = make_config(tmp_path, storage={"min_free_space": 10**17})
    env = daemon_env()
    env.update(NOTIFY_SOCKET=str(notify.path))
    run = start(runs, configured, tmp_path / "d.log", env)
    notify.wait_for(lambda m: m.fields.get("READY") == "1", 20, "READY=1")
    storescu(configured.port, *ct_copies(tmp_path / "in", 1, "a"), timeout=60, check=False)
    failed = notify.wait_for(lambda m: "1 failed" in m.fields.get("STATUS", ""), 10,
                             "STATUS counting the refused object")
    status = failed.fields["STATUS"]
    assert "0xA700" in status and "LOW DISK SPACE" in status, status
    config = configured.config_path
    config.write_text(config.read_text().replace("[storage]", "[storage]\nsort = 'x'"))
    result = subprocess.run([sys.executable, "-m", "dicom_ingestd", "reload", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, env=daemon_env())
    assert result.returncode == 78, result.stderr
    assert "storage.sort = 'x'" in result.stderr
    rejected = notify.wait_for(lambda m: m.fields.get("STATUS", "").startswith(
        "RELOAD REJECTED"), 10, "STATUS with the rejected reload")
    assert "storage.sort" in rejected.fields["STATUS"]
    assert run.proc.poll() is None
