"""Listening sockets: created from the configuration (or, later, inherited from systemd)."""

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
