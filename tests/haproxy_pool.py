"""N dicom-ingestd instances behind a real HAProxy (Debian's) on loopback, as
docs/scale-out.md describes them: TCP mode, send-proxy-v2, the DICOM health check from
dicom_ingestd.healthcheck.  Used by tests/test_scale_out.py and bench/scale_out.py.

Each instance is a process group of its own (master, workers, config watcher), so that
`kill()` takes the whole instance down at once, as a crashed host or an OOM-killed cgroup
would.  HAProxy runs in the foreground, logging to a file; its runtime socket answers
`show stat` for the servers' check states.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from support.daemon import Configured, daemon_argv, launch
from support.wait import wait_until

from dicom_ingestd.healthcheck import haproxy_rules


@dataclass
class Instance:
    """One dicom-ingestd behind the balancer, with its own output directory."""

    name: str
    port: int
    out: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, timeout: float = 30.0) -> None:
        self.proc = launch(daemon_argv(self.config_path),
                           Configured(self.config_path, self.out, self.port), self.log_path,
                           append=True, own_group=True).proc
        self.starts += 1
        wait_until(lambda: self.log().count(" ready: pid ") >= self.starts, timeout,
              f"{self.name} ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL to the whole instance (master, workers, watcher) at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT the master: its port still completes TCP handshakes."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def stored(self) -> list[Path]:
        """Every object file under the output directory (staging and state excluded)."""
        return sorted(p for p in self.out.rglob("*")
                      if p.is_file() and not any(part.startswith(".ingestd-")
                                                 for part in p.relative_to(self.out).parts))

    def staging(self) -> list[Path]:
        return sorted((self.out / ".ingestd-tmp").glob("*.part"))


def instance_settings(port: int, out: Path, **tables: dict[str, Any]) -> dict[str, Any]:
    """An instance behind a balancer on 127.0.0.1 (docs/scale-out.md, on loopback)."""
    settings: dict[str, Any] = {name: dict(values) for name, values in tables.items()}
    network = settings.setdefault("network", {})
    network.update(port=port, bind_address="127.0.0.1")
    network.setdefault("proxy_protocol", "v2")
    network.setdefault("trusted_proxies", ["127.0.0.1"])
    settings.setdefault("storage", {})["output_directory"] = str(out)
    settings.setdefault("logging", {}).setdefault("level", "info")
    return settings


@dataclass
class Checks:
    """The servers' health check timing (HAProxy's inter, fall, rise, timeout check)."""

    inter_ms: int = 500
    fall: int = 2
    rise: int = 2
    timeout_ms: int = 1000


# docs/scale-out.md's balancing methods: spread, or keep each sender on one instance (by
# address, or by calling AE title: bytes 26-41 of the A-ASSOCIATE-RQ) for end-of-study events.
# The tcp-request lines go to the frontend: the request must be in before the backend picks.
BALANCE = {
    "leastconn": ("balance leastconn",),
    "source": ("balance source", "hash-type consistent"),
    "source-stick": ("balance leastconn", "stick-table type ip size 100k expire 30m",
                     "stick on src"),
    "calling-ae": ("balance leastconn", "stick-table type binary len 16 size 100k expire 30m",
                   "stick on req.payload(26,16)", "tcp-request inspect-delay 5s",
                   "tcp-request content accept if { req.len ge 42 }"),
}


def haproxy_config(port: int, servers: list[tuple[str, int]], stats_socket: Path,
                   checks: Checks, balance: str = "leastconn",
                   called_ae: str = "STORESCP") -> str:
    """The balancer of docs/scale-out.md, on loopback."""
    lines = [*BALANCE[balance], *haproxy_rules(called_ae).splitlines()]
    inspect = "".join(f"    {line}\n" for line in lines if line.startswith("tcp-request"))
    rules = "".join(f"    {line}\n" for line in lines if not line.startswith("tcp-request"))
    server_lines = "".join(
        f"    server {name} 127.0.0.1:{server_port} send-proxy-v2 check "
        f"inter {checks.inter_ms} fall {checks.fall} rise {checks.rise}\n"
        for name, server_port in servers)
    return f"""\
global
    log stdout format iso local0 info
    stats socket {stats_socket} mode 600 level admin
    maxconn 1000

defaults
    mode tcp
    log global
    option tcplog
    option redispatch
    retries 3
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout check {checks.timeout_ms}ms

frontend dicom
    bind 127.0.0.1:{port}
{inspect}    default_backend ingest

backend ingest
{rules}{server_lines}"""


@dataclass
class HAProxy:
    """Debian's haproxy in the foreground, with a runtime socket for `show stat`."""

    directory: Path
    port: int
    instances: list[Instance]
    checks: Checks = field(default_factory=Checks)
    balance: str = "leastconn"
    proc: subprocess.Popen[bytes] | None = None
    text: str = ""  # a configuration of the test's own instead of haproxy_config()

    @property
    def config_path(self) -> Path:
        return self.directory / "haproxy.cfg"

    @property
    def stats_socket(self) -> Path:
        return self.directory / "haproxy.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "haproxy.log"

    def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.config_path.write_text(self.text or haproxy_config(
            self.port, [(i.name, i.port) for i in self.instances], self.stats_socket,
            self.checks, self.balance))
        subprocess.run([binary, "-c", "-q", "-f", str(self.config_path)], check=True,
                       timeout=30)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen([binary, "-f", str(self.config_path)],
                                         stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_until(lambda: self.stats_socket.exists() and self._answers(), timeout,
              "haproxy's runtime socket")

    def _answers(self) -> bool:
        try:
            self.command("show info")
        except OSError:
            return False
        return True

    def command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_socket))
            sock.sendall(text.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each server's check status: UP, DOWN, "UP 1/2" (going down), "DOWN 1/2" ..."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "ingest" and row.get("svname") not in ("BACKEND", None):
                states[row["svname"]] = row["status"]
        return states

    def wait_state(self, name: str, status: str, timeout: float) -> float:
        """Wait until `name` is exactly `status`; return the seconds it took."""
        started = time.monotonic()
        wait_until(lambda: self.states().get(name) == status, timeout,
              f"{name} {status} (states: {self.states()})", interval=0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def make_instances(directory: Path, ports: list[int], **tables: dict[str, Any]) \
        -> list[Instance]:
    """Configured (not started) instances, one output directory each."""
    instances = []
    for index, port in enumerate(ports):
        name = f"i{index}"
        out = directory / f"{name}-out"
        out.mkdir(parents=True, exist_ok=True)
        config = directory / f"{name}.toml"
        config.write_text(tomli_w.dumps(instance_settings(port, out, **tables)))
        instances.append(Instance(name, port, out, config, directory / f"{name}.log"))
    return instances
