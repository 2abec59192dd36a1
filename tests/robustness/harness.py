"""Shared pieces of the robustness suite: watching the daemon's processes and resources, and
the loopback fuzz driver.

Resources are read from /proc (the master's open descriptors and VmRSS, its live children),
never from the daemon's own account.  The driver sends fuzzgen's inputs from a few threads at
a bounded rate and judges every answer by the Upper Layer rules: a fresh connection gets an
A-ASSOCIATE-AC/RJ, an A-ABORT or a close; an input inside an association gets a DIMSE
response, an A-ABORT or a close; a well-framed data set gets a DIMSE response; nothing waits
longer than the daemon's timeouts plus a margin.
"""

import contextlib
import itertools
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fuzzgen
from support import wire
from support.procs import IDLE_WORKER, descendants
from support.wait import wait_until

# The daemon configuration every fuzz and flood test starts from: short timeouts, so a stuck
# peer costs seconds, and no fsync (durability is the crash tests' business, not speed's).
TIMEOUT = 2
FUZZ_SETTINGS: dict[str, dict[str, Any]] = {
    "network": {"acse_timeout": TIMEOUT, "dimse_timeout": TIMEOUT, "socket_timeout": TIMEOUT,
                "max_pdu": fuzzgen.MAX_PDU},
    "storage": {"fsync": False, "sort": "study-uid"},
    "logging": {"level": "info"},
    "workers": {"max_associations": 64},
}
HANG = 3 * TIMEOUT + 10  # seconds without an answer or a close that count as a hang
# Log lines that mean a bug (a crash, an unhandled exception), whatever the input.
BUG_PATTERNS = re.compile(r"internal error|unexpected error|Traceback|"
                          r"worker \d+ (killed by SIG|exited with status)")


# --- processes and resources -----------------------------------------------------------------


def children(pid: int) -> set[int]:
    """Live descendants of `pid` but idle pool workers (which serve no one): the
    configuration watcher, job processes and workers serving an association."""
    return {child for child, name in descendants(pid).items() if name != IDLE_WORKER}


def idle_workers(pid: int) -> set[int]:
    return {child for child, name in descendants(pid).items() if name == IDLE_WORKER}


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the IPv4 listener on `port` (the rx_queue
    of a LISTEN socket in /proc/net/tcp is its backlog); -1 when there is no such listener."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
            return int(queues.split(":")[1], 16)
    return -1


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Resources:
    fds: int
    rss_kib: int
    children: set[int]

    @classmethod
    def of(cls, pid: int) -> "Resources":
        return cls(fd_count(pid), rss_kib(pid), children(pid))


def settle(pid: int, baseline: Resources, timeout: float = HANG) -> Resources:
    """Wait until the master has no more children and descriptors than at the baseline,
    with its idle workers settled (pool_settled)."""
    deadline = time.monotonic() + timeout
    while True:
        now = Resources.of(pid)
        if now.children <= baseline.children and now.fds <= baseline.fds:
            pool_settled(pid, max(0.0, deadline - time.monotonic()))
            return Resources.of(pid)
        if time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def pool_settled(pid: int, timeout: float) -> None:
    """Wait until the master's idle workers are the same ones for a second: a spare taken by
    the last association is replaced, a surplus left by a burst retires one per half second
    of quiet (pool.TRIM_INTERVAL)."""
    deadline = time.monotonic() + timeout
    previous, since = idle_workers(pid), time.monotonic()
    while time.monotonic() - since < 1.0:
        if time.monotonic() > deadline:
            raise AssertionError(f"idle workers still changing after {timeout} s")
        time.sleep(0.1)
        now = idle_workers(pid)
        if now != previous:
            previous, since = now, time.monotonic()


def wait_until_no_workers(pid: int, timeout: float = HANG) -> None:
    """Wait until the master's only child but idle workers is its configuration watcher (no
    [events]), and its idle workers have settled: the same ones for a second (a surplus
    left by a burst retires one per half second of quiet, pool.TRIM_INTERVAL)."""
    wait_until(lambda: len(children(pid)) <= 1, timeout,
               lambda: f"no workers running; still running: {children(pid)}")
    pool_settled(pid, timeout)


class WorkerWatch:
    """Samples the master's children every 0.2 s and remembers the longest-lived worker."""

    def __init__(self, pid: int, ignore: set[int]) -> None:
        self.pid = pid
        self.ignore = set(ignore)
        self.first_seen: dict[int, float] = {}
        self.longest = 0.0
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            live = children(self.pid) - self.ignore
            for pid in live:
                if pid not in self.first_seen:
                    self.first_seen[pid] = now
                    self.seen += 1
            for pid, since in list(self.first_seen.items()):
                if pid not in live:
                    del self.first_seen[pid]
                else:
                    self.longest = max(self.longest, now - since)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --- the wire -----------------------------------------------------------------------------------


def connect(port: int, timeout: float = HANG) -> socket.socket:
    """A connection whose every operation waits up to `timeout` seconds."""
    return wire.connect(port, timeout)


def associate(port: int) -> socket.socket:
    """A connection with the fuzzer's valid association accepted."""
    sock = connect(port)
    sock.sendall(fuzzgen.associate_rq())
    pdu_type, _body = wire.read_pdu(sock)
    if pdu_type != wire.A_ASSOCIATE_AC:
        sock.close()
        raise AssertionError(f"valid A-ASSOCIATE-RQ answered with PDU type {pdu_type:#04x}")
    return sock


# --- the fuzz driver ---------------------------------------------------------------------------


@dataclass
class Anomaly:
    index: int
    category: str
    how: str
    problem: str
    data: bytes

    def __str__(self) -> str:
        return (f"input {self.index} ({self.category}/{self.how}, {len(self.data)} bytes): "
                f"{self.problem}; first bytes {self.data[:64].hex()}")


@dataclass
class Campaign:
    seed: int
    tried: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    anomalies: list[Anomaly] = field(default_factory=list)
    connections: int = 0
    seconds: float = 0.0
    ports: dict[int, int] = field(default_factory=dict)  # local port -> last input index

    @property
    def total(self) -> int:
        return sum(self.tried.values())

    def summary(self) -> str:
        return (f"seed {self.seed}: {self.total} inputs ({dict(self.tried)}) over "
                f"{self.connections} connections in {self.seconds:.0f} s; outcomes "
                f"{dict(self.outcomes)}; {len(self.anomalies)} anomalies")


class RateLimit:
    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second
        self.next = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            self.next = max(self.next + self.interval, now)
            delay = self.next - now
        if delay > 0:
            time.sleep(delay)


class Driver:
    """Sends inputs [start, stop) of campaign `seed` to the daemon on `port`."""

    def __init__(self, port: int, campaign: Campaign, *, rate: float = 500,
                 threads: int = 4, stall_every: int = 1000) -> None:
        self.port = port
        self.campaign = campaign
        self.rate = RateLimit(rate)
        self.threads = threads
        self.stall_every = stall_every  # one fresh input in N is left open: timeouts must end it
        self.lock = threading.Lock()

    def run(self, start: int, stop: int) -> None:
        counter = itertools.count(start)
        started = time.monotonic()

        def work() -> None:
            assoc: socket.socket | None = None
            try:
                while (index := next(counter)) < stop:
                    self.rate.wait()
                    assoc = self._one(index, assoc)
            finally:
                if assoc is not None:
                    assoc.close()

        pool = [threading.Thread(target=work, daemon=True) for _ in range(self.threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        self.campaign.seconds += time.monotonic() - started

    def _note(self, index: int, case: fuzzgen.Case, outcome: str, sock: socket.socket | None,
              problem: str = "") -> None:
        with self.lock:
            self.campaign.tried[case.category] += 1
            self.campaign.outcomes[f"{case.category}:{outcome}"] += 1
            if sock is not None:
                with contextlib.suppress(OSError):
                    self.campaign.ports[sock.getsockname()[1]] = index
            if problem:
                self.campaign.anomalies.append(Anomaly(index, case.category, case.how, problem,
                                                       case.data))

    def _connected(self) -> None:
        with self.lock:
            self.campaign.connections += 1

    def _one(self, index: int, assoc: socket.socket | None) -> socket.socket | None:
        case = fuzzgen.generate(self.campaign.seed, index)
        if case.status_expected:
            return self._in_association(index, case, assoc)
        if assoc is not None:  # a terminal input: it gets an association of its own
            assoc.close()
        try:
            if case.fresh:
                self._connected()
                sock = connect(self.port)
            else:
                self._connected()
                sock = associate(self.port)
        except (OSError, AssertionError, wire.Closed) as exc:
            self._note(index, case, "no-connection", None, f"cannot connect/associate: {exc}")
            return None
        stall = case.fresh and index % self.stall_every == self.stall_every - 1
        started = time.monotonic()
        try:
            # The daemon may have answered and closed before all of the input was sent
            # (EPIPE, ECONNRESET, ENOTCONN): its answer is still there to read.
            with contextlib.suppress(OSError):
                sock.sendall(case.data)
                if not stall:
                    sock.shutdown(socket.SHUT_WR)
            types = wire.read_all_pdus(sock)
            outcome = "+".join(f"{t:02x}" for t in types) or "closed"
            allowed = {0x02, 0x03, 0x07} if case.fresh else {0x04, 0x06, 0x07}
            problem = "" if set(types) <= allowed else f"answered with PDU types {types}"
            if stall:
                outcome = "stalled:" + outcome
            self._note(index, case, outcome, sock, problem)
        except TimeoutError:
            self._note(index, case, "hang", sock, f"no close within {HANG} s "
                       f"(stalled={stall}, {time.monotonic() - started:.1f} s)")
        except AssertionError as exc:
            self._note(index, case, "bad-answer", sock, str(exc))
        except OSError as exc:  # a reset before the answer could be read: a close
            self._note(index, case, f"reset:{exc.errno}", sock)
        finally:
            sock.close()
        return None

    def _in_association(self, index: int, case: fuzzgen.Case,
                        assoc: socket.socket | None) -> socket.socket | None:
        try:
            if assoc is None:
                self._connected()
                assoc = associate(self.port)
        except (OSError, AssertionError, wire.Closed) as exc:
            self._note(index, case, "no-connection", None, f"cannot associate: {exc}")
            return None
        try:
            with contextlib.suppress(OSError):  # closed early: read_status tells why
                assoc.sendall(case.data)
            status = wire.read_status(assoc)
        except TimeoutError:
            self._note(index, case, "hang", assoc, f"no response within {HANG} s")
            assoc.close()
            return None
        except (OSError, AssertionError) as exc:
            self._note(index, case, "bad-answer", assoc, str(exc))
            assoc.close()
            return None
        if isinstance(status, str):
            # The framing was intact: the daemon must answer with a status, not leave.
            self._note(index, case, status, assoc, f"{status} instead of a C-STORE-RSP")
            assoc.close()
            return None
        self._note(index, case, f"0x{status:04X}", assoc)
        return assoc


_LINE_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[\d+\] ")


def bug_lines(log: str) -> list[str]:
    """Lines that show a crash, and lines that are not one event each (a value from the
    network that broke a line, or output that is not a log record at all)."""
    return [line for line in log.split("\n")
            if BUG_PATTERNS.search(line) or (line and not _LINE_START.match(line))]
