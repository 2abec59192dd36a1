"""Who is at the other end of a connection: the `Peer` value every component uses.

A leaf module (stdlib only).  Directly connected, the peer is the TCP peer.  Behind a load
balancer speaking the PROXY protocol (proxy.py), it is the client address the header
carries, and the balancer's own address travels with it: access control, the per-peer
limit, log lines, journal fields, `#r`, job variables and the counters all see the client,
and the log lines and journal say which proxy relayed it.  A connection whose header carries
no client (LOCAL: the proxy's own connection; UNKNOWN) has the proxy itself for its peer, as
the specification says: keyed, limited and logged by the proxy's address.
"""

import ipaddress
import socket
from dataclasses import dataclass, replace
from enum import Enum


class Via(Enum):
    """How the peer's address was learnt."""

    DIRECT = "direct"  # the TCP peer itself
    PROXY = "proxy"  # carried in a PROXY protocol header from `proxy`
    # The proxy's own connection (v2 LOCAL): its peer is the proxy.  HAProxy's health checks
    # are LOCAL, but so is every client HAProxy relays from a Unix-socket frontend, and any
    # host in network.trusted_proxies can write one: it may only use Verification.
    PROXY_LOCAL = "proxy-local"
    PROXY_UNKNOWN = "proxy-unknown"  # the proxy could not say (UNKNOWN): its address stands in


@dataclass(frozen=True, slots=True)
class Peer:
    """A connection's peer: `host` (an address, a host name after a lookup, or "local" for a
    Unix socket) and `port`, and the proxy ("address:port") that relayed it, if any.

    `name` ("10.1.2.3:5000", "[2001:db8::1]:5000") is what records, `#r` and the counters
    keep; `str()` is what log lines show, the proxy included.
    """

    host: str
    port: int | None = None
    via: Via = Via.DIRECT
    proxy: str = ""

    @classmethod
    def from_address(cls, address: object) -> "Peer":
        """The peer of an accept()/getpeername() address (IPv4-mapped IPv6 as plain IPv4,
        as storescp and every IPv4 tool write it: `journalctl DICOM_PEER=10.1.2.3` and #r
        then find and show the address an administrator knows)."""
        if isinstance(address, tuple) and len(address) >= 2:
            host = str(address[0])
            if host.lower().startswith("::ffff:") and "." in host:
                host = host[7:]
            return cls(host, int(address[1]))
        return cls(str(address) or "local")

    def relayed(self, source: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
                | None, local: bool = False) -> "Peer":
        """The peer of a connection from this proxy whose header carried `source` (None:
        no usable address; `local`: the proxy's own connection).  Without a source the
        proxy is the peer: its address is the key for access control and the limits."""
        if local:
            return replace(self, via=Via.PROXY_LOCAL, proxy=self.name)
        if source is None:
            return replace(self, via=Via.PROXY_UNKNOWN, proxy=self.name)
        address, port = source
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return Peer(str(address), port, Via.PROXY, self.name)

    @property
    def name(self) -> str:
        """'host:port' ('[v6]:port'), or the host alone without a port."""
        if self.port is None:
            return self.host
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def verification_only(self) -> bool:
        """The proxy's own connection (LOCAL): Verification is all it may use (every other
        presentation context is rejected, a C-STORE refused); its key is the proxy's."""
        return self.via is Via.PROXY_LOCAL

    @property
    def key(self) -> str:
        """The address that access control and workers.max_associations_per_peer see
        ('' for a Unix socket or a host name)."""
        try:
            ip = ipaddress.ip_address(self.host.split("%", 1)[0])
        except ValueError:
            return ""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return str(ip)

    def __str__(self) -> str:
        if self.via is Via.PROXY:
            return f"{self.name} via {self.proxy}"
        if self.via is Via.PROXY_LOCAL:
            return f"{self.name} (proxy's own connection, LOCAL)"
        if self.via is Via.PROXY_UNKNOWN:
            return f"{self.name} (proxy, client address unknown)"
        return self.name

    def fields(self) -> dict[str, object]:
        """Journal fields: DICOM_PEER is the address alone (what an administrator filters
        on), DICOM_PEER_PORT the port, DICOM_PROXY the proxy that relayed the connection."""
        fields: dict[str, object] = {"DICOM_PEER": self.host}
        if self.port is not None:
            fields["DICOM_PEER_PORT"] = str(self.port)
        if self.proxy:
            fields["DICOM_PROXY"] = self.proxy
        return fields


def resolve(peer: Peer) -> Peer:
    """The peer with its host name for its address, as storescp names peers without -dhl;
    unchanged when there is none.

    Run in the association's own worker, so a slow resolver delays only that peer.
    """
    if not peer.key:
        return peer
    try:
        name = socket.gethostbyaddr(peer.host)[0]
    except (OSError, UnicodeError):
        return peer
    return replace(peer, host=name)
