"""Shared fixtures: a real dicom-ingestd process on loopback, and real DCMTK peers.

Nothing here is mocked: the daemon runs as `python -m dicom_ingestd run -c CONFIG` in a
subprocess, and peers are DCMTK's command-line tools or pynetdicom.  A missing peer tool is a
failure, not a skip (the test command installs them).
"""

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the long robustness tests (marked slow)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def require_tool(name: str) -> str:
    """The path of a peer tool; fail (never skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run the README's test command, which installs it")
    return path


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the ephemeral range.

    A port from bind(("", 0)) is an ephemeral one: between this call and the daemon's own
    bind, any outgoing connection on the machine may be given it (CI once saw "Address
    already in use" that way).  connect() never picks a port below the range.
    """
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20000), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


@dataclass
class Daemon:
    """A running `dicom-ingestd run` process and the paths it uses."""

    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    config_path: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log()
            if text in content:
                return content
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s; log:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def reconfigure(self, table: str, values: dict[str, Any]) -> None:
        """Replace the [table] of the running daemon's configuration and reload it through
        the control socket (`dicom-ingestd reload`'s request): back once the master has
        applied it, so the next association runs with it."""
        import tomllib

        from dicom_ingestd import control

        settings = tomllib.loads(self.config_path.read_text())
        settings[table] = values
        staged = self.config_path.with_suffix(".new")
        write_config(staged, settings)
        staged.replace(self.config_path)  # whole: the file watcher may reload it at once
        answer = control.request(self.out / ".ingestd-tmp" / control.SOCKET_NAME, "reload",
                                 timeout=30)
        outcome = answer.get("reload") or {}
        assert outcome.get("outcome") == "applied", (answer, self.log()[-3000:])

    def files(self) -> list[Path]:
        """Every regular file under the output directory, staging area excluded."""
        return sorted(p for p in self.out.rglob("*")
                      if p.is_file() and ".ingestd-tmp" not in p.parts)

    def staging(self) -> list[Path]:
        """Temporary (partial) objects in the staging area."""
        staging = self.out / ".ingestd-tmp"
        return sorted(staging.glob("*.part")) if staging.exists() else []


def write_config(path: Path, settings: dict[str, dict[str, Any]]) -> None:
    path.write_text(tomli_w.dumps(settings))


def start_daemon(tmp_path: Path, settings: dict[str, dict[str, Any]] | None = None, *,
                 name: str = "d", wait: bool = True) -> Daemon:
    """Start dicom-ingestd on a free loopback port with [storage] output under tmp_path."""
    settings = {k: dict(v) for k, v in (settings or {}).items()}
    port = int(settings.get("network", {}).get("port", free_port()))
    out = Path(settings.get("storage", {}).get("output_directory", tmp_path / f"{name}-out"))
    out.mkdir(parents=True, exist_ok=True)
    settings.setdefault("network", {}).update(port=port)
    settings["network"].setdefault("bind_address", "127.0.0.1")
    settings.setdefault("storage", {})["output_directory"] = str(out)
    settings.setdefault("logging", {}).setdefault("level", "debug")
    config_path = tmp_path / f"{name}.toml"
    write_config(config_path, settings)
    log_path = tmp_path / f"{name}.log"
    env = dict(os.environ)
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_ingestd", "run", "-c",
                                 str(config_path)], stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env)
    daemon = Daemon(proc, port, out, config_path, log_path, env)
    if wait:
        daemon.wait_log("listening on")
    return daemon


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """Start daemons with start_daemon(tmp_path, settings); all are stopped afterwards."""
    started: list[Daemon] = []

    def factory(settings: dict[str, dict[str, Any]] | None = None, **kw: Any) -> Daemon:
        kw.setdefault("name", f"d{len(started)}")
        daemon = start_daemon(tmp_path, settings, **kw)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    """A daemon with the default configuration."""
    return daemon_factory()  # type: ignore[no-any-return]


def run_tool(args: list[str], *, timeout: float = 60.0, nodelay: bool = True,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool; TCP_NODELAY=1 as our benchmarks do unless `nodelay` is False."""
    require_tool(args[0])
    env = dict(os.environ)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def storescu(port: int, *files: Path | str, extra: list[str] | None = None,
             check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_tool(["storescu", *(extra or []), "127.0.0.1", str(port),
                     *map(str, files)], check=check, **kw)


def echoscu(port: int, extra: list[str] | None = None, check: bool = True,
            **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_tool(["echoscu", *(extra or []), "127.0.0.1", str(port)], check=check, **kw)


# --- DCMTK storescp as the reference (differential tests) ------------------------------------


def _listening(port: int) -> bool:
    """True once a socket listens on ``port`` (read from /proc, so storescp sees no probe)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@contextlib.contextmanager
def storescp(options: Sequence[str], outdir: Path) -> Iterator[int]:
    """Run a real storescp with ``options`` on a free port; always terminated on exit.

    storescp 3.6.7 has no bind-address option, so it listens on every interface for the
    test's short life; every connection the tests make goes to 127.0.0.1.
    """
    require_tool("storescp")
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):  # a free port can be taken between probe and bind: retry
            port = free_port()
            proc = subprocess.Popen(
                ["storescp", *options, "-od", str(outdir), "--aetitle", "STORESCP", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and proc.poll() is None and not _listening(port):
                time.sleep(0.01)
            if proc.poll() is None and _listening(port):
                yield port
                return
            proc.kill()
            proc.wait()
        pytest.fail(f"storescp {' '.join(options)} did not start")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- events and jobs (test_events.py, test_jobs.py) --------------------------------------------

RECORDER_SOURCE = '''\
import json, os, sys
record = {"argv": sys.argv[2:], "pid": os.getpid(),
          "env": {k: v for k, v in os.environ.items() if k.startswith("DICOM_")}}
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (json.dumps(record) + "\\n").encode())
os.close(fd)
'''


def complete_lines(path: Path) -> list[str]:
    """The lines of a file other processes append to, without a last one still being
    written (a reader can see part of an append: only a newline ends a line)."""
    return path.read_text().split("\n")[:-1]


@dataclass
class Recorder:
    """A command that appends its arguments and DICOM_* variables to a JSON-lines file."""

    script: Path
    path: Path

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(self.script), str(self.path), *args]

    def records(self) -> list[dict[str, Any]]:
        import json
        if not self.path.exists():
            return []
        return [json.loads(line) for line in complete_lines(self.path) if line]

    def wait(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records()
            if len(records) >= count:
                return records
            time.sleep(0.05)
        raise AssertionError(f"{count} record(s) expected within {timeout} s, got "
                             f"{self.records()}")


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER_SOURCE)
    return Recorder(script, tmp_path / "records.jsonl")


def make_study(folder: Path, count: int, *, study_uid: str | None = None, name: str = "s",
               patient: str | None = None) -> list[Path]:
    """`count` CT objects (copies of CT_small, new SOP Instance UIDs) of one study."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or str(generate_uid())
    series_uid = str(generate_uid())
    files = []
    for index in range(count):
        ds = dcmread(testdata("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = index + 1
        if patient is not None:
            ds.PatientName = patient
        path = folder / f"{name}-{index:03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


@contextlib.contextmanager
def mounted_tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    """A tmpfs of its own at `mountpoint` (created), unmounted (lazily if busy) afterwards."""
    require_tool("mount")
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (these tests need root): {result.stderr}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


@contextlib.contextmanager
def mounted_ext4(mountpoint: Path, size_mb: int, options: str = "") -> Iterator[Path]:
    """A fresh ext4 on a loop device at `mountpoint` (created), unmounted afterwards."""
    require_tool("mkfs.ext4")
    image = mountpoint.with_name(mountpoint.name + ".img")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    mountpoint.mkdir()
    for args in (["mkfs.ext4", "-q", str(image)],
                 ["mount", "-o", ",".join(filter(None, ["loop", options])), str(image),
                  str(mountpoint)]):
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed (these tests need root and loop devices): "
                        f"{result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)
        image.unlink()


def unmount(mountpoint: Path) -> None:
    """Unmount, lazily when something still holds the file system."""
    if subprocess.run(["umount", str(mountpoint)], capture_output=True,
                      timeout=60).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=60)


@pytest.fixture
def receivers() -> Iterator[list[Any]]:
    """Receivers a test starts (test_differential's); all are stopped however it ends."""
    started: list[Any] = []
    yield started
    for receiver in started:
        receiver.stop()


# warm.py's process names: a worker waiting for a connection, and one serving an association.
IDLE_WORKER = "ingestd-idle"
BUSY_WORKER = "ingestd-assoc"


def child_pids(pid: int) -> set[int]:
    """The pids of pid's children (zombies included until reaped)."""
    result: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                result.update(int(x) for x in text.split())
    return result


def process_name(pid: int) -> str:
    """/proc/PID/comm, "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def workers_of(master: int, name: str) -> set[int]:
    """The master's worker processes named `name` (IDLE_WORKER or BUSY_WORKER)."""
    return {pid for pid in child_pids(master) if process_name(pid) == name}


def helpers_of(master: int) -> set[int]:
    """The master's children that are not idle workers: the configuration watcher, job
    processes and workers serving (or just done with) an association."""
    return {pid for pid in child_pids(master) if process_name(pid) != IDLE_WORKER}


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")
