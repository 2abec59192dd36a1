"""Between accept() and admission when network.proxy_protocol is on: who may send a PROXY
protocol header, and reading it off the socket without taking a byte of what follows.

Two readers share `HeaderReader`:

* `PendingHeaders`, the master's stage: what a connection from a trusted proxy has sent is
  read as soon as it is accepted, so a connection whose header came with it (a proxy sends
  it at once) goes on at once; one whose header is not complete waits in the master's
  selector, non-blocking, until it is, at most network.acse_timeout; then it goes on to
  access control, the limits and a worker with the peer the header carried.  A malformed,
  truncated or slow header is dropped here with one line: it never costs a worker.  At most
  MAX_PENDING connections wait at once, shared fairly between the sources: when the stage
  is full, the source holding the most gives up its oldest.
* `read_peer`, for one connection served per process (systemd Accept=yes, inetd): the same
  reads, blocking, within the same timeout.

The reader peeks at what has arrived, lets proxy.parse() decide how much of it is header, and
then reads exactly that much: the DICOM bytes after the header (often in the same segment)
stay in the socket for the association.  Everything it reads is header, so a socket it has
read is not readable again until more bytes arrive: the selector never spins on it.
"""

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicom_ingestd import proxy
from dicom_ingestd.access import Network, normalize, parse_networks
from dicom_ingestd.codes import Ending
from dicom_ingestd.config.schema import NetworkConfig
from dicom_ingestd.peer import Peer

log = logging.getLogger("dicom_ingestd.proxy")

# Connections from trusted proxies whose header is not complete yet.  A proxy sends its
# header with the connection, so this stage is normally empty; the bound is for a proxy gone
# wrong (or an untrusted host inside a trusted network) opening connections and sending
# nothing, each of which costs the master a descriptor until network.acse_timeout.  Such a
# source only ever pushes out its own connections (PendingHeaders._make_room), never those
# of the others, and never a connection whose header is in.
MAX_PENDING = 128
FULL_LOG_INTERVAL = 10.0


class Dropped(Exception):
    """The connection is not admitted.  `outcome` is how it is counted: refused (not a
    trusted proxy), dropped (bad or cut-short header) or timeout; the message says why."""

    def __init__(self, outcome: Ending, why: str) -> None:
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
        # parse_networks: an IPv4-mapped entry (::ffff:10.0.0.5) is the IPv4 address it maps.
        return cls(proxy.VERSIONS[network.proxy_protocol],
                   tuple(parse_networks(network.trusted_proxies)),
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

    def warnings(self) -> list[str]:
        """What an administrator should know about network.trusted_proxies (logged at start,
        printed by check-config): a trusted network that is the whole address space."""
        if not self.enabled:
            return []
        return [f"network.trusted_proxies: {network} trusts every IPv{network.version} "
                "address: any host that reaches the port may send a PROXY protocol header "
                "and claim any client address, which access control and the per-peer limit "
                "then believe; list the load balancers' addresses instead"
                for network in self.trusted if network.prefixlen == 0]

    def check_trusted(self, tcp_peer: Peer) -> None:
        """Raise Dropped(Ending.REFUSED) unless `tcp_peer` is one of the trusted proxies."""
        key = tcp_peer.key
        if key:
            ip = normalize(key)
            if any(ip.version == n.version and ip in n for n in self.trusted):
                return
        what = "not one of network.trusted_proxies" if key else \
            "a Unix socket's peer has no address to match network.trusted_proxies against"
        raise Dropped(Ending.REFUSED, f"connection refused: {what} "
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
            raise Dropped(Ending.DROPPED, f"connection lost during the PROXY protocol header: "
                          f"{exc.strerror or exc}") from None
        if not chunk:
            raise Dropped(Ending.DROPPED, "connection closed after "
                          f"{len(self._data)} byte(s) of a PROXY protocol header"
                          if self._data else "connection closed before a PROXY protocol "
                          "header")
        try:
            header = proxy.parse(bytes(self._data) + chunk, self.versions)
        except proxy.HeaderError as exc:
            raise Dropped(Ending.DROPPED, f"PROXY protocol header refused: {exc}") from None
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
                raise Dropped(Ending.DROPPED, f"connection lost during the PROXY protocol "
                              f"header: {exc.strerror or exc}") from None
            if not data:
                raise Dropped(Ending.DROPPED, "connection closed during the PROXY protocol header")
            self._data += data
            count -= len(data)


def _timed_out(policy: ProxyPolicy, received: int) -> Dropped:
    return Dropped(Ending.TIMEOUT, f"no complete PROXY protocol header within "
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


def _journal(peer: Peer, outcome: Ending) -> dict[str, object]:
    return {"journal": {**peer.fields(), "DICOM_OUTCOME": outcome}}


def log_dropped(tcp_peer: Peer, exc: Dropped) -> None:
    """The one line for a connection that never reached admission."""
    who = f"proxy {tcp_peer}" if exc.outcome is not Ending.REFUSED else str(tcp_peer)
    log.warning("%s: %s", who, exc, extra=_journal(tcp_peer, exc.outcome))


@dataclass(slots=True)
class _Pending:
    conn: socket.socket
    tcp_peer: Peer
    reader: HeaderReader
    policy: ProxyPolicy
    since: float  # accepted (the clock's time)

    @property
    def deadline(self) -> float:
        return self.since + self.policy.timeout


class PendingHeaders:
    """The master's stage for connections whose PROXY protocol header is not in yet.

    `admit(conn, peer)` receives each connection whose header is complete (the socket
    still non-blocking, positioned at the first byte after the header); `count(outcome)`
    is told of each connection dropped here.  Single-threaded: driven by the master's
    selector and its tick.
    """

    def __init__(self, selector: selectors.BaseSelector,
                 admit: Callable[[socket.socket, Peer], None],
                 count: Callable[[Ending], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._selector = selector
        self._admit = admit
        self._count = count
        self._clock = clock
        self._pending: dict[socket.socket, _Pending] = {}  # oldest first
        self._full_closed = 0
        self._next_full_log = 0.0

    def __len__(self) -> int:
        return len(self._pending)

    def take(self, conn: socket.socket, tcp_peer: Peer, policy: ProxyPolicy) -> None:
        """An accepted connection: refuse it, or read what it sent and hold it until its
        header is complete."""
        try:
            policy.check_trusted(tcp_peer)
        except Dropped as exc:
            self._close(conn, tcp_peer, exc)
            return
        conn.setblocking(False)
        entry = _Pending(conn, tcp_peer, HeaderReader(conn, policy.versions), policy,
                         self._clock())
        # Read first: the header usually came with the connection, and a connection whose
        # header is in never waits here, so it is never refused for want of room.
        outcome = self._read(entry)
        if outcome is not None:
            self._leave(entry, outcome)
            return
        if len(self._pending) >= MAX_PENDING:
            self._make_room()
        self._pending[conn] = entry
        self._selector.register(conn, selectors.EVENT_READ, self._readable)

    def _readable(self, conn: object) -> None:
        assert isinstance(conn, socket.socket)
        entry = self._pending.get(conn)
        if entry is None:
            return
        outcome = self._read(entry)
        if outcome is not None:
            self._forget(entry)
            self._leave(entry, outcome)

    @staticmethod
    def _read(entry: _Pending) -> proxy.ProxyHeader | Dropped | None:
        """What has arrived: the complete header, the reason to drop, or None to wait."""
        try:
            return entry.reader.step()
        except Dropped as exc:
            return exc

    def _leave(self, entry: _Pending, outcome: proxy.ProxyHeader | Dropped) -> None:
        if isinstance(outcome, Dropped):
            self._close(entry.conn, entry.tcp_peer, outcome)
        else:
            self._admit(entry.conn, peer_of(entry.tcp_peer, outcome))

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

    def _make_room(self) -> None:
        """The stage is full: the source (address) holding the most waiting connections
        gives up its oldest, closed unanswered; one line per FULL_LOG_INTERVAL, naming it.

        A source can thus only push out its own connections once it holds more than any
        other: a proxy gone wrong (or a host inside a trusted network) holding every slot
        costs the others nothing.  Ties: the source with the oldest connection."""
        by_source: dict[str, list[_Pending]] = {}
        for entry in self._pending.values():  # oldest first
            by_source.setdefault(entry.tcp_peer.key or entry.tcp_peer.host, []).append(entry)
        source, held = max(by_source.items(), key=lambda item: len(item[1]))
        victim = held[0]
        self._forget(victim)
        with contextlib.suppress(OSError):
            victim.conn.close()
        self._count(Ending.DROPPED)
        self._full_closed += 1
        now = self._clock()
        if now >= self._next_full_log:
            log.warning("proxy %s holds %d of the %d connections waiting for their PROXY "
                        "protocol header, the most: closing its oldest (%s, waiting %.1f s, "
                        "%d byte(s) received) unanswered to make room (%d closed this way "
                        "since the last such line)", source, len(held), MAX_PENDING,
                        victim.tcp_peer.name, now - victim.since, victim.reader.received,
                        self._full_closed, extra=_journal(victim.tcp_peer, Ending.DROPPED))
            self._next_full_log = now + FULL_LOG_INTERVAL
            self._full_closed = 0
