"""PROXY protocol headers as a proxy sends them, for tests (written from the specification,
independently of dicom_ingestd.proxy, so that the parser is checked against another reading).
"""

import ipaddress
import struct

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
