"""Between accept() and admission when network.proxy_protocol is on: who may send a PROXY
protocol header, and reading it off the socket without taking a byte of what follows.

Two readers share `HeaderReader`:

* `PendingHeaders`, the master's stage: a connection from a trusted proxy waits in the
  master's selector, non-blocking, until its header is complete, at most
  network.acse_timeout, and at most MAX_PENDING connections at once; then it goes on to
  access control, the limits and a worker with the peer the header carried.  A malformed,
  truncated or slow header is dropped here with one line: it never costs a worker.
* `read_peer`, for one connection served per process (systemd Accept=yes, inetd): the same
  reads, blocking, within the same timeout.

The reader peeks at what has arrived, lets proxy.parse() decide how much of it is header, and
then reads exactly that much: the DICOM bytes after the header (often in the same segment)
stay in the socket for the association.  Everything it reads is header, so a socket it has
read is not readable again until more bytes arrive: the selector never spins on it.
"""

import contextlib
import ipaddress
import logging
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicom_ingestd import proxy
from dicom_ingestd.config.schema import NetworkConfig
from dicom_ingestd.peer import Peer

log = logging.getLogger("dicom_ingestd.proxy")

# Connections from trusted proxies whose header is not complete yet.  A proxy sends its
# header with the connection, so this stage is normally empty; the bound is for a proxy gone
# wrong (or an untrusted host inside a trusted network) opening connections and sending
# nothing, each of which costs the master a descriptor until network.acse_timeout.
MAX_PENDING = 128
FULL_LOG_INTERVAL = 10.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Dropped(Exception):
    """The connection is not admitted.  `outcome` is how it is counted: refused (not a
    trusted proxy), dropped (bad or cut-short header) or timeout; the message says why."""

    def __init__(self, outcome: str, why: str) -> None:
        super().__init__(why)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """network.proxy_protocol and network.trusted_proxies, ready to apply."""

    versions: frozenset[proxy.Version]
    trusted: tuple[Network, ...]
    timeout: float  # network.acse_timeout: the whole header must be in by then
    setting: str = "off"

    @classmethod
    def from_config(cls, network: NetworkConfig) -> "ProxyPolicy":
        return cls(proxy.VERSIONS[network.proxy_protocol],
                   tuple(ipaddress.ip_network(entry.strip(), strict=False)
                         for entry in network.trusted_proxies),
                   float(network.acse_timeout), network.proxy_protocol)

    @property
    def enabled(self) -> bool:
        return bool(self.versions)

    def describe(self) -> str:
        """' behind a proxy (PROXY protocol v2 from 10.0.0.5/32)' for the ready line."""
        if not self.enabled:
            return ""
        return f" behind a proxy (PROXY protocol {self.setting} from " \
               f"{', '.join(map(str, self.trusted))})"

    def check_trusted(self, tcp_peer: Peer) -> None:
        """Raise Dropped("refused") unless `tcp_peer` is one of the trusted proxies."""
        key = tcp_peer.key
        if key:
            ip = ipaddress.ip_address(key)
            if any(ip.version == n.version and ip in n for n in self.trusted):
                return
        raise Dropped("refused", f"connection refused: not one of network.trusted_proxies "
                      f"(network.proxy_protocol = {self.setting}: only a load balancer "
                      "may connect, and must send a PROXY protocol header)")


def peer_of(tcp_peer: Peer, header: proxy.ProxyHeader) -> Peer:
    """The peer a header makes of a connection from the proxy `tcp_peer`."""
    if header.command is proxy.Command.LOCAL:
        return tcp_peer.relayed(None, local=True)
    if header.source is None:
        return tcp_peer.relayed(None)
    return tcp_peer.relayed((header.source.address, header.source.port))


class HeaderReader:
    """One connection's header, read in steps, never a byte past it."""

    def __init__(self, sock: socket.socket, versions: frozenset[proxy.Version]) -> None:
        self.sock = sock
        self.versions = versions
        self._data = bytearray()

    @property
    def received(self) -> int:
        return len(self._data)

    def step(self) -> proxy.ProxyHeader | None:
        """Take what has arrived; the header once complete, else None.

        On a non-blocking socket it never waits; on a blocking one with a timeout it waits
        for the next bytes and lets TimeoutError through.  Raises Dropped for a bad header
        or a connection that ends first.
        """
        try:
            chunk = self.sock.recv(proxy.MAX_HEADER - len(self._data), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except TimeoutError:
            raise
        except OSError as exc:
            raise Dropped("dropped", f"connection lost during the PROXY protocol header: "
                          f"{exc.strerror or exc}") from None
        if not chunk:
            raise Dropped("dropped", "connection closed after "
                          f"{len(self._data)} byte(s) of a PROXY protocol header"
                          if self._data else "connection closed before a PROXY protocol "
                          "header")
        try:
            header = proxy.parse(bytes(self._data) + chunk, self.versions)
        except proxy.HeaderError as exc:
            raise Dropped("dropped", f"PROXY protocol header refused: {exc}") from None
        # Incomplete: every byte seen is header.  Complete: exactly the rest of it.
        self._consume(len(chunk) if header is None else header.length - len(self._data))
        return header

    def _consume(self, count: int) -> None:
        while count:
            try:
                data = self.sock.recv(count)  # already queued: returns at once
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise Dropped("dropped", f"connection lost during the PROXY protocol "
                              f"header: {exc.strerror or exc}") from None
            if not data:
                raise Dropped("dropped", "connection closed during the PROXY protocol header")
            self._data += data
            count -= len(data)


def _timed_out(policy: ProxyPolicy, received: int) -> Dropped:
    return Dropped("timeout", f"no complete PROXY protocol header within "
                   f"{policy.timeout:g} s (network.acse_timeout; {received} byte(s) "
                   "received); connection closed")


def read_peer(conn: socket.socket, tcp_peer: Peer, policy: ProxyPolicy) -> Peer:
    """The peer of `conn` (one connection per process: Accept=yes, inetd), reading its
    header first when `policy` asks for one; blocks at most policy.timeout.  Raises
    Dropped."""
    if not policy.enabled:
        return tcp_peer
    policy.check_trusted(tcp_peer)
    reader = HeaderReader(conn, policy.versions)
    deadline = time.monotonic() + policy.timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timed_out(policy, reader.received)
            conn.settimeout(remaining)
            header = reader.step()
            if header is not None:
                return peer_of(tcp_peer, header)
    except TimeoutError:
        raise _timed_out(policy, reader.received) from None
    finally:
        with contextlib.suppress(OSError):
            conn.settimeout(None)


def _journal(peer: Peer, outcome: str) -> dict[str, object]:
    return {"journal": {**peer.fields(), "DICOM_OUTCOME": outcome}}


def log_dropped(tcp_peer: Peer, exc: Dropped) -> None:
    """The one line for a connection that never reached admission."""
    who = f"proxy {tcp_peer}" if exc.outcome != "refused" else str(tcp_peer)
    log.warning("%s: %s", who, exc, extra=_journal(tcp_peer, exc.outcome))


@dataclass(slots=True)
class _Pending:
    conn: socket.socket
    tcp_peer: Peer
    reader: HeaderReader
    policy: ProxyPolicy
    deadline: float


class PendingHeaders:
    """The master's stage for connections whose PROXY protocol header is not in yet.

    `admit(conn, peer)` receives each connection whose header is complete (the socket
    still non-blocking, positioned at the first byte after the header); `count(outcome)`
    is told of each connection dropped here.  Single-threaded: driven by the master's
    selector and its tick.
    """

    def __init__(self, selector: selectors.BaseSelector,
                 admit: Callable[[socket.socket, Peer], None],
                 count: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._selector = selector
        self._admit = admit
        self._count = count
        self._clock = clock
        self._pending: dict[socket.socket, _Pending] = {}
        self._full_closed = 0
        self._next_full_log = 0.0

    def __len__(self) -> int:
        return len(self._pending)

    def take(self, conn: socket.socket, tcp_peer: Peer, policy: ProxyPolicy) -> None:
        """An accepted connection: refuse it, or hold it until its header is complete."""
        try:
            policy.check_trusted(tcp_peer)
        except Dropped as exc:
            self._close(conn, tcp_peer, exc)
            return
        if len(self._pending) >= MAX_PENDING:
            self._close_when_full(conn, tcp_peer)
            return
        conn.setblocking(False)
        entry = _Pending(conn, tcp_peer, HeaderReader(conn, policy.versions), policy,
                         self._clock() + policy.timeout)
        self._pending[conn] = entry
        self._selector.register(conn, selectors.EVENT_READ, self._readable)
        self._readable(conn)  # the header usually came with the connection

    def _readable(self, conn: object) -> None:
        assert isinstance(conn, socket.socket)
        entry = self._pending.get(conn)
        if entry is None:
            return
        try:
            header = entry.reader.step()
        except Dropped as exc:
            self._forget(entry)
            self._close(conn, entry.tcp_peer, exc)
            return
        if header is None:
            return
        self._forget(entry)
        self._admit(conn, peer_of(entry.tcp_peer, header))

    def expire(self) -> None:
        """Drop the connections whose header is overdue (call from the master's tick)."""
        now = self._clock()
        for entry in [e for e in self._pending.values() if now >= e.deadline]:
            self._forget(entry)
            self._close(entry.conn, entry.tcp_peer,
                        _timed_out(entry.policy, entry.reader.received))

    def timeout(self) -> float | None:
        """Seconds until the next deadline (for the selector's wait), None when idle."""
        if not self._pending:
            return None
        return max(0.0, min(e.deadline for e in self._pending.values()) - self._clock())

    def close(self) -> None:
        """Stopping: the waiting connections are closed unanswered."""
        for entry in list(self._pending.values()):
            self._forget(entry)
            with contextlib.suppress(OSError):
                entry.conn.close()

    def close_in_child(self) -> None:
        """In a forked worker: only the descriptors (the selector is the master's)."""
        for conn in self._pending:
            with contextlib.suppress(OSError):
                conn.close()
        self._pending.clear()

    def _forget(self, entry: _Pending) -> None:
        del self._pending[entry.conn]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(entry.conn)

    def _close(self, conn: socket.socket, tcp_peer: Peer, exc: Dropped) -> None:
        with contextlib.suppress(OSError):
            conn.close()
        log_dropped(tcp_peer, exc)
        self._count(exc.outcome)

    def _close_when_full(self, conn: socket.socket, tcp_peer: Peer) -> None:
        """Past MAX_PENDING: close at once; one line per FULL_LOG_INTERVAL."""
        with contextlib.suppress(OSError):
            conn.close()
        self._count("dropped")
        self._full_closed += 1
        now = self._clock()
        if now >= self._next_full_log:
            log.warning("proxy %s: %d connections already wait for their PROXY protocol "
                        "header; closing the connection unanswered (%d closed this way "
                        "since the last such line)", tcp_peer, MAX_PENDING, self._full_closed,
                        extra=_journal(tcp_peer, "dropped"))
            self._next_full_log = now + FULL_LOG_INTERVAL
            self._full_closed = 0
