"""The one runner of a real daemon: `python -m dicom_ingestd run -c CONFIG` in a subprocess,
its log in a file, its output directory under the test's tmp_path."""

import os
import random
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from support.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
STAGING = ".ingestd-tmp"

# What a service manager hands a process; a test's daemon gets none of it unless the test
# says so (the tests may themselves run under systemd).
_MANAGER_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
                      "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

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


def write_config(path: Path, settings: dict[str, dict[str, Any]]) -> None:
    path.write_text(tomli_w.dumps(settings))


def info_settings(**tables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings of the given tables, logging at info level (the debug level's inotify lines
    would drown what a test looks for)."""
    result = {name: dict(values) for name, values in tables.items()}
    result.setdefault("logging", {}).setdefault("level", "info")
    return result


def daemon_env() -> dict[str, str]:
    """The test's environment without a service manager's variables."""
    return {k: v for k, v in os.environ.items() if k not in _MANAGER_VARIABLES}


def daemon_argv(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "dicom_ingestd", "run", "-c", str(config_path)]


@dataclass
class Daemon:
    """A running `dicom-ingestd run` process (or a wrapper that runs it) and its paths."""

    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    config_path: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 20.0) -> str:
        """The log once it contains `text`; fails at once when the process has ended."""
        def found() -> tuple[str] | None:
            content = self.log()
            if text in content or self.proc.poll() is not None:
                return (content,)
            return None
        (content,) = wait_until(found, timeout, lambda: f"{text!r} logged; log:\n{self.log()}")
        if text not in content:
            raise AssertionError(f"{text!r} not logged before the process ended; log:\n"
                                 f"{self.log()}")
        return content

    def stop(self, timeout: float = 20.0) -> int:
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

        from dicom_ingestd import control

        settings = tomllib.loads(self.config_path.read_text())
        settings[table] = values
        staged = self.config_path.with_suffix(".new")
        write_config(staged, settings)
        staged.replace(self.config_path)  # whole: the file watcher may reload it at once
        answer = control.request(self.out / STAGING / control.SOCKET_NAME, "reload",
                                 timeout=30)
        outcome = answer.get("reload") or {}
        assert outcome.get("outcome") == "applied", (answer, self.log()[-3000:])

    def files(self) -> list[Path]:
        """Every regular file under the output directory, staging area excluded."""
        return sorted(p for p in self.out.rglob("*")
                      if p.is_file() and STAGING not in p.parts)

    def staging(self) -> list[Path]:
        """Temporary (partial) objects in the staging area."""
        staging = self.out / STAGING
        return sorted(staging.glob("*.part")) if staging.exists() else []


@dataclass(frozen=True)
class Configured:
    """A configuration file written for a daemon, and what it names."""

    config_path: Path
    out: Path
    port: int


def configure(tmp_path: Path, settings: dict[str, dict[str, Any]] | None = None, *,
              name: str = "d", level: str = "debug") -> Configured:
    """Write tmp_path/NAME.toml: `settings` on a free loopback port (unless it names one),
    output under tmp_path/NAME-out (unless it names one), logging at `level` (unless set)."""
    settings = {k: dict(v) for k, v in (settings or {}).items()}
    port = int(settings.get("network", {}).get("port", free_port()))
    out = Path(settings.get("storage", {}).get("output_directory", tmp_path / f"{name}-out"))
    out.mkdir(parents=True, exist_ok=True)
    settings.setdefault("network", {}).update(port=port)
    settings["network"].setdefault("bind_address", "127.0.0.1")
    settings.setdefault("storage", {})["output_directory"] = str(out)
    settings.setdefault("logging", {}).setdefault("level", level)
    config_path = tmp_path / f"{name}.toml"
    write_config(config_path, settings)
    return Configured(config_path, out, port)


def launch(argv: list[str], configured: Configured, log_path: Path, *,
           port: int | None = None, env: dict[str, str] | None = None, append: bool = False,
           own_group: bool = False) -> Daemon:
    """Start `argv` (the daemon, or a wrapper that runs it) with stdout and stderr to
    log_path (appended to, for a restart, with `append`); `port` is where it accepts
    connections (the configured one by default); `own_group` makes it a process group of its
    own, so that killpg takes the master and its workers at once."""
    env = daemon_env() if env is None else env
    with open(log_path, "ab" if append else "wb") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                process_group=0 if own_group else None)
    return Daemon(proc, configured.port if port is None else port, configured.out,
                  configured.config_path, log_path, env)


def start_daemon(tmp_path: Path, settings: dict[str, dict[str, Any]] | None = None, *,
                 name: str = "d", wait: bool = True) -> Daemon:
    """Start dicom-ingestd on a free loopback port with [storage] output under tmp_path."""
    configured = configure(tmp_path, settings, name=name)
    daemon = launch(daemon_argv(configured.config_path), configured, tmp_path / f"{name}.log")
    if wait:
        daemon.wait_log("listening on")
    return daemon


def socket_activated(tmp_path: Path, options: list[str],
                     settings: dict[str, dict[str, Any]] | None = None, *,
                     level: str = "info") -> Daemon:
    """systemd-socket-activate OPTIONS -l 127.0.0.1:PORT dicom-ingestd run -c CONFIG, once
    systemd-socket-activate listens.

    The configuration names another (free, unused) port, so a working association proves the
    inherited socket is the one in use.
    """
    from support.peers import require_tool

    require_tool("systemd-socket-activate")
    configured = configure(tmp_path, settings, level=level)
    port = free_port()
    daemon = launch(["systemd-socket-activate", *options, "-l", f"127.0.0.1:{port}",
                     *daemon_argv(configured.config_path)], configured,
                    tmp_path / "activate.log", port=port)
    daemon.wait_log(f"Listening on 127.0.0.1:{port}")  # systemd-socket-activate's own line
    return daemon


def tree_outside_staging(out: Path) -> list[Path]:
    """Every entry (file or directory) under `out`, except the staging directory and its files."""
    return sorted(p for p in out.rglob("*") if p.relative_to(out).parts[0] != STAGING)


def log_lines(daemon: Daemon, text: str) -> list[str]:
    """The lines of the daemon's log that contain `text`."""
    return [line for line in daemon.log().splitlines() if text in line]


def config_of(daemon: Daemon) -> dict[str, Any]:
    return tomllib.loads(daemon.config_path.read_text())


def replace_config(daemon: Daemon, config: dict[str, Any]) -> None:
    """Rewrite the configuration like an editor does: a new file renamed over the old one."""
    temp = daemon.config_path.with_name(daemon.config_path.name + ".swp~")
    write_config(temp, config)
    os.replace(temp, daemon.config_path)
