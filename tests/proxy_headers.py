"""PROXY protocol headers as a proxy sends them, for tests (written from the specification,
independently of dicom_ingestd.proxy, so that the parser is checked against another reading).
"""

import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    """'PROXY TCP4|TCP6 src dst sport dport\\r\\n'."""
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n" \
        .encode("ascii")


def v1_unknown(rest: str = "") -> bytes:
    return f"PROXY UNKNOWN{rest}\r\n".encode("ascii")


def v2(source: str, destination: str, source_port: int, destination_port: int,
       tlvs: bytes = b"", *, version_command: int = 0x21, family: int | None = None) -> bytes:
    """A v2 PROXY header for TCP over IPv4 or IPv6 (family 0x11 / 0x21), TLVs appended."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if family is None:
        family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack(">HH", source_port, destination_port)
    return v2_raw(version_command, family, block + tlvs)


def v2_local(block: bytes = b"", family: int = 0x00) -> bytes:
    """A v2 LOCAL header (a proxy's health check), optionally with an address block."""
    return v2_raw(0x20, family, block)


def v2_raw(version_command: int, family: int, payload: bytes) -> bytes:
    return SIGNATURE + struct.pack(">BBH", version_command, family, len(payload)) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack(">BH", kind, len(value)) + value


class Relay:
    """A minimal PROXY protocol proxy on loopback, for tests: each connection to `port` is
    relayed to `target` from `source` (an address of 127/8), or to the Unix socket `unix`,
    after the header `header(client_address)` returns; then bytes are copied both ways."""

    def __init__(self, target: int, header: Callable[[tuple[str, int]], bytes],
                 source: str = "127.0.0.1", unix: str = "") -> None:
        self.target = target
        self.header = header
        self.source = source
        self.unix = unix
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closing = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closing:
            try:
                client, address = self.server.accept()
            except OSError:
                return
            try:
                if self.unix:
                    upstream = socket.socket(socket.AF_UNIX)
                    upstream.connect(self.unix)
                else:
                    upstream = socket.create_connection(("127.0.0.1", self.target),
                                                        timeout=10,
                                                        source_address=(self.source, 0))
                upstream.settimeout(None)
                upstream.sendall(self.header(address))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing = True
        self.server.close()


def carrying(source: str, port: int = 0) -> Callable[[tuple[str, int]], bytes]:
    """A Relay header function: v2, carrying `source` (and the client's own port, or
    `port`), to 10.0.0.100:104."""
    def header(client: tuple[str, int]) -> bytes:
        return v2(source, "10.0.0.100" if ":" not in source else "2001:db8::100",
                  port or client[1], 104)
    return header
