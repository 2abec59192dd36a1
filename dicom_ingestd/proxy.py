"""The PROXY protocol header (HAProxy's specification, versions 1 and 2), parsed from bytes.

A leaf module (stdlib only, no I/O): `parse()` looks at the bytes received so far on a
connection and answers with the complete header, None while more bytes are needed, or a
`HeaderError`.  It never needs a byte beyond the header, and `ProxyHeader.length` says
exactly how many bytes the header took, so a reader can consume the header and leave the
DICOM bytes after it where they are (proxy_reader.py peeks, then reads exactly that many).

What the receiver must do, from the specification, and how it is done here:

* never guess: only the versions the configuration accepts are recognised; any other first
  byte (a DICOM A-ASSOCIATE-RQ starts with 0x01) is an error at once;
* v1 is one US-ASCII line "PROXY TCP4|TCP6|UNKNOWN ... CRLF" of at most 107 bytes: single
  spaces, canonical addresses of the announced family, decimal ports without leading zeros,
  CRLF only (a lone CR or LF is an error); with UNKNOWN the rest of the line is ignored;
* v2 is a 16-byte block (12-byte signature, version 2, command LOCAL or PROXY, family and
  transport, length) and `length` more bytes: the addresses, then TLVs, which are walked for
  consistency and otherwise skipped (this receiver implements none of them, CRC32C
  included, which the specification allows).  A length above MAX_V2_PAYLOAD is refused as
  soon as the 16 bytes are in, never waited for.  Valid family/transport pairs this receiver
  does not use (UDP, AF_UNIX, AF_UNSPEC) fall back to "unspecified", as specified;
* LOCAL (v2) is the proxy's own connection, typically a health check: no addresses.
  UNKNOWN (v1) and unspecified (v2) carry no usable address: the connection's own endpoints
  stand in for them, as the specification says.
"""

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107  # the specification's worst case, CRLF included
V2_FIXED = 16
# The specification allows 65535 bytes of addresses and TLVs; proxies send a few hundred at
# most (HAProxy with every TLV option: well under 1 KiB).  Ours is the bound on what one
# pending connection can make the master hold.
MAX_V2_PAYLOAD = 4096
MAX_HEADER = V2_FIXED + MAX_V2_PAYLOAD  # more than any header we accept

_V2_ADDRESS_LENGTHS = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_V2_VALID_FAMILIES = frozenset({0x00, *_V2_ADDRESS_LENGTHS})


class Version(Enum):
    V1 = 1
    V2 = 2


class Command(Enum):
    PROXY = "proxy"  # relayed on behalf of a client
    LOCAL = "local"  # the proxy's own connection (health checks)


# network.proxy_protocol → the versions accepted
VERSIONS: dict[str, frozenset[Version]] = {
    "off": frozenset(),
    "v1": frozenset({Version.V1}),
    "v2": frozenset({Version.V2}),
    "any": frozenset({Version.V1, Version.V2}),
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete, valid header.

    `source` is the client's address and port (None for LOCAL, v1 UNKNOWN and v2
    unspecified, where the connection's own endpoints stand in); `destination` the address
    the client connected to on the proxy.  `length` is the size of the header on the wire.
    """

    version: Version
    command: Command
    source: Endpoint | None
    destination: Endpoint | None
    length: int


class HeaderError(ValueError):
    """The bytes are not an acceptable PROXY protocol header; the connection must be dropped."""


class NotProxyProtocol(HeaderError):
    """The first bytes match no accepted header signature (or a DICOM peer spoke first)."""


class VersionNotAccepted(HeaderError):
    """A valid signature of a version network.proxy_protocol does not accept."""


class MalformedHeader(HeaderError):
    """The signature matched, the rest does not follow the specification."""


class OversizedHeader(HeaderError):
    """Longer than the specification (v1) or MAX_V2_PAYLOAD (v2) allows."""


def parse(data: bytes, versions: frozenset[Version]) -> ProxyHeader | None:
    """The header at the start of `data`; None if `data` is a proper prefix of one.

    Bytes after the header are ignored (they belong to the application).  Raises a
    HeaderError subclass as soon as `data` cannot be the start of an accepted header.
    """
    if not data:
        return None
    if data[:1] == V2_SIGNATURE[:1]:
        if Version.V2 not in versions:
            raise VersionNotAccepted(
                "a PROXY protocol v2 header, but network.proxy_protocol accepts v1 only")
        return _parse_v2(data)
    if data[:1] == V1_PREFIX[:1]:
        if Version.V1 not in versions:
            raise VersionNotAccepted(
                "a PROXY protocol v1 header (\"PROXY ...\"), but network.proxy_protocol "
                "accepts v2 only")
        return _parse_v1(data)
    raise NotProxyProtocol(_not_a_header(data))


def _not_a_header(data: bytes) -> str:
    first = data[:8].hex(" ")
    if data[0] == 0x01:  # A-ASSOCIATE-RQ
        return (f"no PROXY protocol header: the connection starts with a DICOM "
                f"A-ASSOCIATE-RQ ({first} ...): the proxy does not send the header "
                "(HAProxy: send-proxy-v2 on the server line)")
    return f"no PROXY protocol header (first bytes {first})"


# -- version 1 ---------------------------------------------------------------------------------
def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:len(V1_PREFIX)]
    if head != V1_PREFIX[:len(head)]:
        raise NotProxyProtocol(_not_a_header(data))
    window = data[:V1_MAX_LINE]
    end = window.find(b"\r\n")
    stray = _stray_line_end(window if end < 0 else window[:end], complete=end >= 0)
    if stray:
        raise MalformedHeader(f"PROXY v1 line with a {stray} (CRLF must end the line)")
    if end < 0:
        if len(data) >= V1_MAX_LINE:
            raise OversizedHeader(f"PROXY v1 line without CRLF in its first {V1_MAX_LINE} "
                                  "bytes")
        return None
    try:
        line = window[:end].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedHeader("PROXY v1 line with non-ASCII bytes") from None
    if not line.isprintable():
        raise MalformedHeader(f"PROXY v1 line with control characters: {line!r}")
    length = end + 2
    fields = line.split(" ")
    protocol = fields[1] if len(fields) > 1 else ""
    if protocol == "UNKNOWN":  # anything may follow: it is ignored
        return ProxyHeader(Version.V1, Command.PROXY, None, None, length)
    if protocol not in ("TCP4", "TCP6"):
        raise MalformedHeader(f"PROXY v1 protocol {protocol!r} (TCP4, TCP6 or UNKNOWN "
                              f"expected): {line!r}")
    if len(fields) != 6:
        raise MalformedHeader(f"PROXY v1 line needs 6 fields separated by single spaces: "
                              f"{line!r}")
    version = 4 if protocol == "TCP4" else 6
    source = Endpoint(_v1_address(fields[2], version), _v1_port(fields[4]))
    destination = Endpoint(_v1_address(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(Version.V1, Command.PROXY, source, destination, length)


def _stray_line_end(text: bytes, complete: bool) -> str:
    """'lone CR' / 'lone LF' if `text` (the line before its CRLF, or all of it so far)
    holds one, else ''."""
    if b"\n" in text:
        return "lone LF"
    cr = text.find(b"\r")
    # Before the CRLF is in, a CR as the very last byte may still be followed by its LF.
    if cr >= 0 and (complete or cr != len(text) - 1):
        return "lone CR"
    return ""


def _v1_address(text: str, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        if "%" in text:  # a scope is meaningless across hosts
            raise ValueError(text)
        address = ipaddress.ip_address(text)  # refuses IPv4 leading zeros (octal confusion)
    except ValueError:
        raise MalformedHeader(f"PROXY v1 address {text!r} is not a canonical IPv{version} "
                              "address") from None
    if address.version != version:
        raise MalformedHeader(f"PROXY v1 address {text!r} is not an IPv{version} address "
                              f"(TCP{version})")
    return address


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") \
            or int(text) > 65535:
        raise MalformedHeader(f"PROXY v1 port {text!r} is not a decimal 0-65535 without "
                              "leading zeros")
    return int(text)


# -- version 2 ---------------------------------------------------------------------------------
def _parse_v2(data: bytes) -> ProxyHeader | None:
    signature = data[:len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[:len(signature)]:
        raise NotProxyProtocol(_not_a_header(data))
    if len(data) < V2_FIXED:
        if len(data) > len(V2_SIGNATURE):
            _v2_version_and_command(data[12])  # fail early on a wrong version
        return None
    command = _v2_version_and_command(data[12])
    family = data[13]
    (payload,) = struct.unpack_from(">H", data, 14)
    if payload > MAX_V2_PAYLOAD:
        raise OversizedHeader(f"PROXY v2 header announces {payload} bytes of addresses and "
                              f"TLVs (at most {MAX_V2_PAYLOAD} accepted)")
    length = V2_FIXED + payload
    if len(data) < length:
        return None
    body = data[V2_FIXED:length]
    if command is Command.LOCAL:
        # The family and the address block are to be ignored: the connection is the proxy's.
        return ProxyHeader(Version.V2, Command.LOCAL, None, None, length)
    if family not in _V2_VALID_FAMILIES:
        raise MalformedHeader(f"PROXY v2 address family/transport 0x{family:02X} is not "
                              "defined")
    needed = _V2_ADDRESS_LENGTHS.get(family, 0)
    if payload < needed:
        raise MalformedHeader(f"PROXY v2 address block of {payload} bytes for family "
                              f"0x{family:02X}, which needs {needed}")
    if family == 0x11:
        source = Endpoint(ipaddress.IPv4Address(body[0:4]), _port(body, 8))
        destination = Endpoint(ipaddress.IPv4Address(body[4:8]), _port(body, 10))
    elif family == 0x21:
        source = Endpoint(ipaddress.IPv6Address(body[0:16]), _port(body, 32))
        destination = Endpoint(ipaddress.IPv6Address(body[16:32]), _port(body, 34))
    else:
        # Unspecified, or a valid pair we do not use (UDP, AF_UNIX): "unspecified", whose
        # address block is opaque (no TLV walk: its extent is unknown).
        return ProxyHeader(Version.V2, Command.PROXY, None, None, length)
    _walk_tlvs(body[needed:])
    return ProxyHeader(Version.V2, Command.PROXY, source, destination, length)


def _v2_version_and_command(byte: int) -> Command:
    if byte >> 4 != 2:
        raise MalformedHeader(f"PROXY v2 signature with version {byte >> 4} (2 expected)")
    if byte & 0x0F == 0:
        return Command.LOCAL
    if byte & 0x0F == 1:
        return Command.PROXY
    raise MalformedHeader(f"PROXY v2 command {byte & 0x0F} (0 LOCAL or 1 PROXY expected)")


def _port(body: bytes, offset: int) -> int:
    return int(struct.unpack_from(">H", body, offset)[0])


def _walk_tlvs(tlvs: bytes) -> None:
    """Check that the TLVs tile the rest of the header exactly; their values are skipped."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise MalformedHeader(f"PROXY v2 TLV truncated at byte {offset} of "
                                  f"{len(tlvs)}")
        (size,) = struct.unpack_from(">H", tlvs, offset + 1)
        offset += 3 + size
        if offset > len(tlvs):
            raise MalformedHeader(f"PROXY v2 TLV type 0x{tlvs[offset - 3 - size]:02X} of "
                                  f"{size} bytes runs past the header")
