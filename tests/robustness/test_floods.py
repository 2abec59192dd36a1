"""Connection floods: 500 connections at once and held, half-open and reset connections, and
slowloris peers (one byte a second), each from its own loopback address while a legitimate
sender uses 127.0.0.1.

What the daemon documents and these tests hold it to (master.py, workers.max_associations*):
a connection over a limit is answered by a short-lived rejecting worker with A-ASSOCIATE-RJ
(result 2 transient, source 3 service provider (presentation), reason 2 local limit exceeded)
once its A-ASSOCIATE-RQ has arrived; when MAX_REJECTING (16) rejections are already running,
further connections are closed unanswered.  So every flood peer sees an A-ASSOCIATE-AC, that
A-ASSOCIATE-RJ, an A-ABORT (after a timeout) or a close; never more than the limit's worth of
associations at once; the legitimate sender is served during the flood; and afterwards the
master's children and descriptors are back to their baseline.
"""

import contextlib
import re
import resource
import selectors
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import fuzzgen
import harness
from support import wire
from support.daemon import Daemon
from support.data import testdata as bundled
from support.peers import echoscu, storescu

PER_PEER = 20
MAX_ASSOCIATIONS = 70  # more than three flooding addresses can take (3 x PER_PEER)
MAX_REJECTING = 16  # master.MAX_REJECTING
TIMEOUT = 2


def flood_settings() -> dict[str, dict[str, Any]]:
    return {
        "network": {"acse_timeout": TIMEOUT, "dimse_timeout": TIMEOUT,
                    "socket_timeout": TIMEOUT},
        "storage": {"fsync": False},
        "logging": {"level": "info"},
        "workers": {"max_associations": MAX_ASSOCIATIONS,
                    "max_associations_per_peer": PER_PEER},
    }


@dataclass
class Peer:
    sock: socket.socket
    kind: str
    received: bytearray = field(default_factory=bytearray)
    accepted_at: float | None = None  # A-ASSOCIATE-AC received
    closed_at: float | None = None
    pending: bytes = b""  # still to send (slowloris: one byte a second)

    def pdu_types(self) -> list[int]:
        types, pos = [], 0
        data = bytes(self.received)
        while pos + 6 <= len(data):
            pdu_type, _r, length = struct.unpack_from(">BBL", data, pos)
            types.append(pdu_type)
            pos += 6 + length
        return types


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def open_peers(port: int, source: str, kinds: list[str]) -> list[Peer]:
    peers = []
    for kind in kinds:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        peer = Peer(sock, kind)
        if kind == "associate":
            sock.send(fuzzgen.associate_rq())
        elif kind == "half-rq":
            sock.send(fuzzgen.associate_rq()[:40])
        elif kind == "shut-wr":
            sock.shutdown(socket.SHUT_WR)
        elif kind == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            peer.closed_at = time.monotonic()
        elif kind.startswith("slowloris"):
            peer.pending = fuzzgen.associate_rq()
        peers.append(peer)
    return peers


def pump(peers: list[Peer], until: float, *, legit: Any = None) -> None:
    """Read every peer's answers (and dribble slowloris bytes) until all are closed or
    `until`; `legit()` runs once, in the middle of the flood."""
    selector = selectors.DefaultSelector()
    for peer in peers:
        if peer.closed_at is None:
            selector.register(peer.sock, selectors.EVENT_READ, peer)
    next_byte = time.monotonic()
    while selector.get_map() and time.monotonic() < until:
        now = time.monotonic()
        if now >= next_byte:  # slowloris: one byte per second per peer
            next_byte = now + 1.0
            for peer in peers:
                if peer.pending and peer.closed_at is None:
                    with contextlib.suppress(OSError):
                        peer.sock.send(peer.pending[:1])
                        peer.pending = peer.pending[1:]
        if legit is not None:
            legit()
            legit = None
        for key, _ in selector.select(0.2):
            peer = key.data
            try:
                chunk = peer.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if chunk:
                peer.received += chunk
                if peer.accepted_at is None and peer.received[:1] == b"\x02":
                    peer.accepted_at = time.monotonic()
                    if peer.kind == "slowloris-pdata":  # now dribble a command set
                        pdu = wire.p_data(1, 0x03, wire.command_set(
                            wire.store_elements(b"1.2.3")))
                        peer.sock.send(pdu[:12])  # PDU and PDV headers at once
                        peer.pending = pdu[12:]
            else:
                peer.closed_at = time.monotonic()
                selector.unregister(peer.sock)
    selector.close()


def close_all(peers: list[Peer]) -> None:
    for peer in peers:
        with contextlib.suppress(OSError):
            peer.sock.close()


def most_accepted_in_log(log: str, host: str) -> int:
    """The most associations from `host` the daemon had accepted at one time, by its log.

    Each worker's interval runs from its "association accepted" line to its last line: inside
    the time the master counts it against the limits, so this never overstates (the client's
    clock would: it sees a close only when it gets round to reading it).
    """
    from datetime import datetime
    line = re.compile(r"(\S+ \S+) \S+ \[(\d+)\] " + re.escape(host) + r":\d+ (.*)")
    start: dict[str, datetime] = {}
    end: dict[str, datetime] = {}
    for match in line.finditer(log):
        when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        pid = match.group(2)
        if "association accepted" in match.group(3):
            start[pid] = when
        end[pid] = when
    events = sorted([(start[p], 1) for p in start] + [(end[p], -1) for p in start],
                    key=lambda e: (e[0], -e[1]))
    level = best = 0
    for _when, step in events:
        level += step
        best = max(best, level)
    return best


def check_answers(peers: list[Peer]) -> dict[str, int]:
    """Every answer is a legal one; return how many of each."""
    counts: dict[str, int] = {}
    for peer in peers:
        types = peer.pdu_types()
        if not types:
            what = "closed"
        elif types[0] == wire.A_ASSOCIATE_RJ:
            rj = bytes(peer.received[6:10])
            assert rj == bytes((0, 2, 3, 2)), f"{peer.kind}: A-ASSOCIATE-RJ {rj.hex()}"
            what = "rejected"
        elif types[0] == wire.A_ASSOCIATE_AC:
            assert set(types[1:]) <= {wire.A_ABORT}, f"{peer.kind}: {types}"
            what = "accepted"
        else:
            assert types == [wire.A_ABORT], f"{peer.kind}: {types}"
            what = "aborted"
        counts[f"{peer.kind}:{what}"] = counts.get(f"{peer.kind}:{what}", 0) + 1
    return counts


def legit_sender(daemon: Daemon, results: dict[str, Any]) -> Any:
    def run() -> None:
        result = storescu(daemon.port, bundled("CT_small.dcm"), check=False, timeout=60)
        results["storescu"] = result.returncode
        results["storescu_output"] = result.stdout + result.stderr
    return run


def baseline_of(daemon: Daemon) -> harness.Resources:
    echoscu(daemon.port, timeout=30)  # warm up: the first worker, lazy imports
    # The echo's worker may have exited but not yet been reaped (its pidfd still open in
    # the master): the baseline is the settled state, the fewest descriptors seen.
    pid = daemon.proc.pid
    harness.wait_until_no_workers(pid, timeout=15)
    samples = []
    for _ in range(10):
        samples.append(harness.Resources.of(pid))
        time.sleep(0.05)
    return min(samples, key=lambda r: r.fds)


def released(daemon: Daemon, baseline: harness.Resources) -> None:
    final = harness.settle(daemon.proc.pid, baseline, timeout=3 * TIMEOUT + 10)
    assert final.children <= baseline.children, f"workers left: {final.children}"
    assert final.fds == baseline.fds, f"master fds {baseline.fds} -> {final.fds}"
    assert final.rss_kib <= baseline.rss_kib + 8 * 1024, (baseline.rss_kib, final.rss_kib)
    assert daemon.proc.poll() is None
    echoscu(daemon.port, timeout=30)
    assert not harness.bug_lines(daemon.log()), harness.bug_lines(daemon.log())[:10]


def test_500_connections_at_once_and_held(daemon_factory: Any) -> None:
    raise_fd_limit(4096)
    daemon = daemon_factory(flood_settings())
    baseline = baseline_of(daemon)
    watch = harness.WorkerWatch(daemon.proc.pid, baseline.children)
    most_workers = 0
    results: dict[str, Any] = {}
    peers = open_peers(daemon.port, "127.0.0.2", ["associate", "silent"] * 250)
    try:
        started = time.monotonic()
        pump(peers, started + 0.5)
        most_workers = len(harness.children(daemon.proc.pid) - baseline.children)
        pump(peers, started + 3 * TIMEOUT + 10, legit=legit_sender(daemon, results))
        open_left = [p.kind for p in peers if p.closed_at is None]
    finally:
        watch.stop()
        close_all(peers)
    assert results["storescu"] == 0, results["storescu_output"]
    assert open_left == [], f"{len(open_left)} flood connections never answered or closed"
    counts = check_answers(peers)
    assert most_accepted_in_log(daemon.log(), "127.0.0.2") <= PER_PEER, counts
    assert counts.get("associate:accepted", 0) >= PER_PEER // 2, counts
    assert counts.get("associate:rejected", 0) > 0, counts
    # Silent peers: admitted ones time out (A-ABORT), the others are closed.
    assert set(k for k in counts if k.startswith("silent")) <= {"silent:aborted",
                                                                  "silent:closed"}, counts
    assert most_workers <= MAX_ASSOCIATIONS + MAX_REJECTING, most_workers
    assert watch.longest < 3 * TIMEOUT + 5, watch.longest
    log = daemon.log()
    assert "rejections already in progress; closing the connection unanswered" in log
    released(daemon, baseline)
    print(counts, f"most workers at once {most_workers}")


def test_slowloris_half_open_and_reset_peers(daemon_factory: Any) -> None:
    """30 peers dribble an A-ASSOCIATE-RQ and 30 a command set at one byte a second, while
    90 more connect and half-close at once, reset at once, or send half an A-ASSOCIATE-RQ.

    ARTIM (acse_timeout) bounds the whole A-ASSOCIATE-RQ, and dimse_timeout a PDU header, so
    the first kind is dropped after it.  Inside a message socket_timeout bounds each read,
    and network.min_transfer_rate (1024 bytes/s over each socket_timeout of waiting) the
    pace: the second kind is dropped within two such windows (storescp would let it hold
    its workers as long as it keeps dribbling).  Meanwhile the per-peer limit keeps them
    from taking the daemon, and the legitimate sender still gets through.  The half-open
    and reset ones are all gone within ARTIM.
    """
    daemon = daemon_factory(flood_settings())
    baseline = baseline_of(daemon)
    results: dict[str, Any] = {}
    rq_peers = open_peers(daemon.port, "127.0.0.3", ["slowloris-rq"] * 30)
    data_peers = []
    for _ in range(30):
        peer = open_peers(daemon.port, "127.0.0.5", ["associate"])[0]
        peer.kind = "slowloris-pdata"
        data_peers.append(peer)
    half_open = open_peers(daemon.port, "127.0.0.4", ["shut-wr", "reset", "half-rq"] * 30)
    peers = rq_peers + data_peers + half_open
    watch = harness.WorkerWatch(daemon.proc.pid, baseline.children)
    try:
        pump(peers, time.monotonic() + 2 * TIMEOUT + 2, legit=legit_sender(daemon, results))
        rq_open = [p for p in rq_peers + half_open if p.closed_at is None]
        holding = [p for p in data_peers if p.closed_at is None and p.accepted_at]
    finally:
        watch.stop()
        close_all(peers)
    assert results["storescu"] == 0, results["storescu_output"]
    assert rq_open == [], f"{[p.kind for p in rq_open]} outlived ARTIM"
    assert holding == [], f"{len(holding)} dribbling peers outlived two rate windows"
    assert most_accepted_in_log(daemon.log(), "127.0.0.5") <= PER_PEER
    assert "less than network.min_transfer_rate (1024 bytes/s)" in daemon.log()
    counts = check_answers(half_open)
    assert set(counts) <= {"shut-wr:closed", "shut-wr:aborted", "reset:closed",
                           "half-rq:aborted", "half-rq:closed"}, counts
    check_answers(peers)
    released(daemon, baseline)
