"""Host access control, decided from the peer address alone, before a byte is read."""

import ipaddress
import logging
from collections.abc import Sequence

from dicom_ingestd.codes import Ending
from dicom_ingestd.peer import Peer

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("dicom_ingestd.access")


def parse_network(entry: str) -> Network:
    """'10.0.0.0/8', '192.168.1.7', '::1', 'fd00::/8' → a network; raises ValueError.

    IPv4-mapped IPv6 ('::ffff:10.0.0.5', '::ffff:10.0.0.0/104', as a dual-stack socket shows
    an IPv4 peer) is the IPv4 network: peers are compared as IPv4 (`normalize`), so the
    mapped form as written would never match.
    """
    network = ipaddress.ip_network(entry.strip(), strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and \
            network.network_address.ipv4_mapped is not None:
        return ipaddress.IPv4Network((network.network_address.ipv4_mapped,
                                      network.prefixlen - 96))
    return network


def parse_networks(entries: Sequence[str]) -> list[Network]:
    """parse_network() of each entry; raises ValueError."""
    return [parse_network(entry) for entry in entries]


def normalize(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The peer's address, with IPv4-mapped IPv6 (dual-stack sockets) turned back into IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AccessPolicy:
    """deny wins; then an empty allow list admits everyone, a non-empty one only its members."""

    def __init__(self, allow: Sequence[str], deny: Sequence[str]) -> None:
        self.allow = parse_networks(allow)
        self.deny = parse_networks(deny)

    def check(self, address: str) -> str | None:
        """None when the peer may connect, else the reason it may not."""
        if not self.allow and not self.deny:
            return None  # no policy: nothing to parse for each connection
        try:
            ip = normalize(address)
        except ValueError:
            return None if not self.allow else f"address {address!r} is not an IP address"
        for network in self.deny:
            if ip.version == network.version and ip in network:
                return f"{ip} matches access.deny {network}"
        if self.allow and not any(ip.version == n.version and ip in n for n in self.allow):
            return f"{ip} is not in access.allow"
        return None

    def check_peer(self, peer: Peer) -> str | None:
        """check() for a connection's peer: behind a proxy, the address its header carried
        (UNKNOWN: the proxy's).  The proxy's own LOCAL connections pass: the proxy is
        admitted by network.trusted_proxies, and Verification is all such a connection may
        use (Peer.verification_only); so does a Unix socket's peer."""
        if not self.allow and not self.deny:
            return None  # no policy: no address to parse for each connection
        if not peer.key or peer.verification_only:
            return None
        return self.check(peer.key)

    def refuses(self, peer: Peer) -> bool:
        """check_peer(), and the one line a refused connection gets, the same whether the
        master or a per-connection instance (systemd Accept=yes, inetd) admits it: True when
        the caller must close the connection unanswered."""
        refusal = self.check_peer(peer)
        if refusal:
            log.warning("%s: connection refused by access control: %s", peer, refusal,
                        extra={"journal": {**peer.fields(), "DICOM_OUTCOME": Ending.REFUSED}})
        return bool(refusal)
