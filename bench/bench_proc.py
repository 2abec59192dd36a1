"""Processes under measurement: the receiver (and its process tree) and the storescu senders.

Linux only: CPU time and memory come from /proc and from wait4's rusage.

- Receiver CPU during a transfer: the difference, across the transfer, of the process tree's
  utime+stime+cutime+cstime (/proc/PID/stat; cutime/cstime hold reaped children).
- Receiver CPU over its lifetime: wait4's rusage at exit (covers the children it waited for).
- Peak RSS of the largest process: the highest VmHWM (the kernel's per-process RSS high-water
  mark) of any process in the tree.  Not wait4's ru_maxrss: at exec the kernel folds the forked
  parent's memory into it, so it would report the harness's own peak (312 MiB for `sleep`
  started from a Python holding 300 MiB).
- Peak tree RSS: the summed VmRSS of the receiver and its descendants, sampled every 50 ms.
  Forked processes share pages, which this sum counts once per process; the summed PSS
  (/proc/PID/smaps_rollup, shared pages split between their users) is sampled alongside.
"""

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Exit:
    """How a process ended: its exit code (negative: killed by that signal), its CPU time.

    The CPU time is user+sys from wait4, including the children it waited for.
    """

    code: int
    cpu_seconds: float


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def is_listening(port: int) -> bool:
    """True if some socket listens on `port` (read from /proc/net, without connecting).

    Connecting to probe would start an association attempt that receivers log as an error.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    if fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:  # the process (or thread) is gone
        return None


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants (via /proc/PID/task/TID/children)."""
    found: list[int] = []
    pending = [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            children = _read(f"/proc/{pid}/task/{tid}/children")
            if children:
                pending.extend(int(child) for child in children.split())
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by the tree under `root`, including its reaped children."""
    ticks = 0
    for pid in process_tree(root):
        stat = _read(f"/proc/{pid}/stat")
        if stat is None:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
        ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def wait_idle(root: int, quiet: float = 0.1, timeout: float = 3.0) -> None:
    """Wait until the tree under `root` used no CPU for `quiet` s (at most `timeout` s).

    A receiver may still be starting (forking helpers, importing) after it listens; that
    work must not be counted as part of the first transfer.
    """
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(root)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = tree_cpu_seconds(root)
        if now == last:
            return
        last = now


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in KiB; zeros if it is gone or has no memory (a zombie)."""
    status = _read(f"/proc/{pid}/status")
    values = {"VmRSS:": 0, "VmHWM:": 0}
    for line in (status or "").splitlines():
        name = line.split(maxsplit=1)[0] if line else ""
        if name in values:
            values[name] = int(line.split()[1])
    return values["VmRSS:"], values["VmHWM:"]


def pss_kib(pid: int) -> int:
    """Proportional set size of `pid` in KiB (0 if it is gone)."""
    for line in (_read(f"/proc/{pid}/smaps_rollup") or "").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class MemorySampler:
    """Samples the tree under `root` in a thread (every `interval` s) until `stop()`.

    Keeps the largest summed VmRSS and PSS of the tree and the largest VmHWM of one process.
    """

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self.tree_rss_kib = 0
        self.tree_pss_kib = 0
        self.process_hwm_kib = 0
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def sample(self) -> None:
        rss_total = pss_total = 0
        for pid in process_tree(self._root):
            rss, hwm = memory_kib(pid)
            rss_total += rss
            pss_total += pss_kib(pid)
            self.process_hwm_kib = max(self.process_hwm_kib, hwm)
        self.tree_rss_kib = max(self.tree_rss_kib, rss_total)
        self.tree_pss_kib = max(self.tree_pss_kib, pss_total)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval):
                return

    def stop(self) -> None:
        """Stop sampling (after one last sample); the receiver must still be running."""
        self._stop.set()
        self._thread.join()
        self.sample()


def reap(pid: int) -> Exit:
    """Wait for `pid` (a child of ours) and return its exit code and rusage."""
    _, status, usage = os.wait4(pid, 0)
    return Exit(os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime)


def reap_within(pid: int, timeout: float) -> Exit | None:
    """Like `reap`, but give up (returning None) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited:
            return Exit(os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


class Receiver:
    """A receiver process started in the background, its stderr and stdout to `log_path`."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(self.argv, env=dict(env), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT)
        self.pid = self._proc.pid
        self.exit: Exit | None = None

    def wait_listening(self, port: int, timeout: float) -> None:
        """Return once `port` is listening; raise RuntimeError if the receiver exits first."""
        deadline = time.monotonic() + timeout
        while not is_listening(port):
            if self._proc.poll() is not None:
                # Popen reaped it; wait4 cannot report its rusage any more, nor is it needed.
                self.exit = Exit(self._proc.returncode, 0.0)
                raise RuntimeError(f"receiver exited with {self._proc.returncode} before "
                                   f"listening on port {port}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"receiver not listening on port {port} after {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> Exit:
        """SIGTERM, wait up to `timeout` s (then SIGKILL); reap it with its rusage."""
        if self.exit is not None:
            return self.exit
        os.kill(self.pid, signal.SIGTERM)
        exit_ = reap_within(self.pid, timeout)
        if exit_ is None:
            os.kill(self.pid, signal.SIGKILL)
            exit_ = reap(self.pid)
        self._proc.returncode = exit_.code  # reaped by us: keep Popen from waiting again
        self.exit = exit_
        return exit_


@dataclass(frozen=True)
class SenderResult:
    """The senders' wall time (start of the first to the end of the last) and their exits."""

    wall_seconds: float
    exits: list[Exit]
    timed_out: bool


def run_senders(commands: Sequence[Sequence[str]], env: Mapping[str, str],
                log_paths: Sequence[Path], timeout: float) -> SenderResult:
    """Start every command at once and wait for all; kill them all if `timeout` s pass."""
    procs: list[subprocess.Popen[bytes]] = []
    killed = threading.Event()

    def kill_all() -> None:
        killed.set()
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)

    watchdog = threading.Timer(timeout, kill_all)
    exits: list[Exit] = []
    try:
        start = time.perf_counter()
        for argv, log_path in zip(commands, log_paths, strict=True):
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                                              stdout=log, stderr=subprocess.STDOUT))
        watchdog.start()
        for proc in procs:  # blocking waits: the last one returns when the last sender ends
            exit_ = reap(proc.pid)
            proc.returncode = exit_.code
            exits.append(exit_)
        wall = time.perf_counter() - start
    finally:
        watchdog.cancel()
        if len(exits) < len(procs):  # a Popen or a wait failed: leave no sender behind
            kill_all()
            for proc in procs:
                proc.wait()
    return SenderResult(wall, exits, killed.is_set())
