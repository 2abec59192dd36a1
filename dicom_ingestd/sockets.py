"""Listening sockets: created from the configuration (or, later, inherited from systemd),
and the TCP options of the connections they accept.

An inherited listener need not be TCP: systemd's ListenStream=/run/x.sock (or HAProxy's
`server x unix@...` in front of it) hands over a Unix socket, whose connections refuse TCP
options with EOPNOTSUPP.  Every TCP-only option goes through `set_tcp_option`.
"""

import contextlib
import socket

from dicom_ingestd.config.schema import NetworkConfig

BACKLOG = 128


def _family_and_address(config: NetworkConfig) -> tuple[socket.AddressFamily, str]:
    if config.ip_version == "ipv4":
        return socket.AF_INET, config.bind_address or "0.0.0.0"
    return socket.AF_INET6, config.bind_address or "::"


def create_listener(config: NetworkConfig) -> socket.socket:
    """Bind and listen on [network] port/bind_address/ip_version; raises OSError."""
    family, address = _family_and_address(config)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # dual: one IPv6 socket that also takes IPv4 (mapped) peers; ipv6: IPv6 only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                            0 if config.ip_version == "dual" else 1)
        sock.bind((address, config.port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def describe(sock: socket.socket) -> str:
    """'0.0.0.0:104' / '[::]:104' for log lines."""
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(name, tuple):
        host = name[0]
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return str(name)


def is_tcp(sock: socket.socket) -> bool:
    """Whether `sock` is a TCP socket (IPv4 or IPv6 stream), whose TCP options apply."""
    try:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and \
            sock.type == socket.SOCK_STREAM
    except OSError:  # pragma: no cover - a closed socket object
        return False


def set_tcp_option(sock: socket.socket, option: int, value: int) -> bool:
    """Set the IPPROTO_TCP `option` on `sock` when it is a TCP socket; whether it was set.

    A tuning option never ends a connection: a Unix socket, or a connection the peer
    already reset, is served without it."""
    if not is_tcp(sock):
        return False
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
        return True
    return False
