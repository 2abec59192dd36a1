"""The one raw-socket DICOM Upper Layer client of the tests: PDUs, command sets and data set
elements built byte by byte (every length can be made to lie), and a blocking reader.

It is for what no conforming library sends (a missing implementation UID, lying lengths, a
stalled PDU, 1,800 presentation contexts); a test that needs an ordinary SCU uses DCMTK's
tools or pynetdicom.  The wire values are stated here, from PS3.7 and PS3.8, rather than
imported from dicom_ingestd.dicom.pdu or .dimse: the tests check the daemon's bytes against
the standard, so a wrong constant in the daemon must make them fail.
"""

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.filereader import read_dataset

from support.uids import APPLICATION_CONTEXT, CT_IMAGE, EXPLICIT_LE, IMPLICIT_LE, VERIFICATION

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
ABORT_PDU = bytes.fromhex("07 00 00000004 00 00 00 00")  # A-ABORT, source 0, reason 0

# DIMSE command fields and the Command Data Set Type without a data set (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101

IO_TIMEOUT = 10.0  # seconds, for every socket operation of the raw client
MAX_PDU = 16384  # the raw client's maximum PDU length (and the fuzzed daemon's)
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.7"
MAX_READ_PDU = 1 << 20  # no PDU the daemon sends is larger; a longer one is a bug


# --- building -------------------------------------------------------------------------------


def item(item_type: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return struct.pack(">BBH", item_type, 0, n & 0xFFFF) + body  # wraps (lies) past 64 KiB


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def pdv(context_id: int, control: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">LBB", len(payload) + 2 if length is None else length, context_id,
                       control) + payload


def p_data(context_id: int, control: int, payload: bytes) -> bytes:
    """One P-DATA-TF of one PDV; control 0x01 is a command, 0x02 the last fragment."""
    return pdu(P_DATA_TF, pdv(context_id, control, payload))


def fragment_pdus(context_id: int, data: bytes, *, command: bool,
                  max_pdu: int = MAX_PDU) -> Iterator[bytes]:
    """A command or data set as well-formed P-DATA-TF PDUs of at most `max_pdu` bytes."""
    chunk = max(max_pdu - 6, 1)
    offsets = list(range(0, len(data), chunk)) or [0]
    for offset in offsets:
        control = (0x01 if command else 0x00) | (0x02 if offset == offsets[-1] else 0x00)
        yield p_data(context_id, control, data[offset:offset + chunk])


def fragments(context_id: int, data: bytes, *, command: bool, max_pdu: int = MAX_PDU) -> bytes:
    return b"".join(fragment_pdus(context_id, data, command=command, max_pdu=max_pdu))


def even(value: bytes, pad: bytes = b"\0") -> bytes:
    return value + pad if len(value) % 2 else value


def user_items(max_pdu: int = MAX_PDU, *, implementation_uid: bytes | None = IMPLEMENTATION_UID,
               version_name: bytes | None = b"RAWSCU") -> list[bytes]:
    """The User Information sub-items; None leaves the implementation UID or name out."""
    items = [item(0x51, struct.pack(">L", max_pdu))]
    if implementation_uid is not None:
        items.append(item(0x52, implementation_uid))
    if version_name is not None:
        items.append(item(0x55, version_name))
    return items


def context_item(context_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, bytes((context_id & 0xFF, 0, 0, 0)) + sub)


def associate_fixed(called: bytes = b"ANY-SCP", calling: bytes = b"RAWSCU",
                    version: int = 1) -> bytes:
    """The fixed fields of an A-ASSOCIATE-RQ; AE titles are raw bytes, padded or cut to 16."""
    return (struct.pack(">HH", version, 0) + called.ljust(16, b" ")[:16]
            + calling.ljust(16, b" ")[:16] + bytes(32))


def associate_rq(contexts: list[tuple[int, str, list[str]]], *, calling: bytes = b"RAWSCU",
                 called: bytes = b"ANY-SCP", max_pdu: int = MAX_PDU,
                 implementation_uid: bytes | None = IMPLEMENTATION_UID,
                 version_name: bytes | None = b"RAWSCU") -> bytes:
    """An A-ASSOCIATE-RQ of (context ID, abstract syntax, transfer syntaxes), taken as given."""
    items = [item(0x10, APPLICATION_CONTEXT.encode())]
    items += [context_item(*c) for c in contexts]
    items.append(item(0x50, b"".join(user_items(max_pdu, implementation_uid=implementation_uid,
                                                version_name=version_name))))
    return pdu(A_ASSOCIATE_RQ, associate_fixed(called, calling) + b"".join(items))


def command_set(elements: list[tuple[int, bytes]], group_length: int | None = None) -> bytes:
    """A command set (implicit VR little endian) of (element, value) in group 0000."""
    body = b"".join(struct.pack("<HHL", 0, tag, len(value)) + value for tag, value in elements)
    length = len(body) if group_length is None else group_length
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", length) + body


def store_elements(sop_instance: bytes, message_id: int = 1,
                   sop_class: bytes | str = CT_IMAGE) -> list[tuple[int, bytes]]:
    """A C-STORE-RQ's elements; UIDs given as bytes go on the wire as they are."""
    if isinstance(sop_class, str):
        sop_class = sop_class.encode()
    return [(0x0002, even(sop_class)), (0x0100, struct.pack("<H", C_STORE_RQ)),
            (0x0110, struct.pack("<H", message_id)), (0x0700, b"\0\0"),
            (0x0800, struct.pack("<H", 0x0000)), (0x1000, even(sop_instance))]


def echo_elements(message_id: int = 1) -> list[tuple[int, bytes]]:
    return [(0x0002, even(VERIFICATION.encode())), (0x0100, struct.pack("<H", C_ECHO_RQ)),
            (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", NO_DATA_SET))]


def c_store_rq(sop_class: bytes | str, sop_instance: bytes | str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set announcing a data set."""
    if isinstance(sop_instance, str):
        sop_instance = sop_instance.encode()
    return command_set(store_elements(sop_instance, message_id, sop_class))


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set(echo_elements(message_id))


# Explicit VR elements whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
            b"UV"}


def explicit(group: int, elem: int, vr: bytes, value: bytes,
             length: int | None = None) -> bytes:
    """One explicit VR little endian element, the value as given."""
    n = len(value) if length is None else length
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n & 0xFFFF) + value


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element, padded to even length as its VR wants."""
    return explicit(group, elem, vr, even(value, b"\0" if vr in (b"UI", b"OB", b"UN") else b" "))


def implicit(group: int, elem: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHL", group, elem, len(value) if length is None else length) + value


# --- reading --------------------------------------------------------------------------------


class Closed(Exception):
    """The daemon closed (or reset) the connection."""


def connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise Closed(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and body."""
    pdu_type, _reserved, length = struct.unpack(">BBL", recv_exact(sock, 6))
    if length > MAX_READ_PDU:
        raise AssertionError(f"PDU type {pdu_type:#04x} of {length} bytes from the daemon")
    return pdu_type, recv_exact(sock, length)


def read_all_pdus(sock: socket.socket) -> list[int]:
    """The types of the PDUs the daemon sends until it closes the connection."""
    types: list[int] = []
    while True:
        try:
            pdu_type, _body = read_pdu(sock)
        except Closed as exc:
            if "after 0 of" not in str(exc):
                raise AssertionError(f"the daemon closed mid-PDU: {exc}") from None
            return types
        types.append(pdu_type)


def read_until_closed(sock: socket.socket, limit: float = IO_TIMEOUT) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed)."""
    data = bytearray()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"connection still open after {limit} s; got {bytes(data)!r}")\
                from None
        if not chunk:
            break
        data += chunk
    else:
        raise AssertionError(f"connection still open after {limit} s; got {bytes(data)!r}")
    return bytes(data)


class Aborted(Exception):
    """The acceptor sent A-ABORT (the message is its body in hex)."""


def recv_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Read until the peer closes; return what was read and how long it took."""
    start = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def connect_from(source: str, port: int, target: str = "127.0.0.1") -> socket.socket:
    """A TCP connection from the loopback address `source` (127.0.0.2: another host)."""
    sock = socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET)
    sock.bind((source, 0))
    sock.connect((target, port))
    return sock


def _command(sock: socket.socket) -> bytes:
    """The next command set the daemon sends."""
    command = bytearray()
    while True:
        pdu_type, body = read_pdu(sock)
        if pdu_type == A_ABORT:
            raise Aborted(body.hex())
        if pdu_type != P_DATA_TF:
            raise AssertionError(f"PDU type {pdu_type:#04x} where a response was expected")
        pos = 0
        while pos < len(body):
            length, _context, control = struct.unpack_from(">LBB", body, pos)
            command += body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if control & 0x02:
                return bytes(command)


def read_status(sock: socket.socket) -> int | str:
    """The Status of the next DIMSE response, or "abort"/"closed"."""
    try:
        command = _command(sock)
    except Closed:
        return "closed"
    except Aborted:
        return "abort"
    offset = 0
    while offset + 8 <= len(command):
        _group, elem, size = struct.unpack_from("<HHL", command, offset)
        if elem == 0x0900:
            return int(struct.unpack_from("<H", command, offset + 8)[0])
        offset += 8 + size
    raise AssertionError(f"response without a Status: {command.hex()}")


# --- an association -------------------------------------------------------------------------


@dataclass
class Association:
    sock: socket.socket
    accepted: dict[int, str]  # context ID -> transfer syntax
    peer_max_pdu: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def parse_ac(body: bytes) -> tuple[dict[int, str], int]:
    """(accepted context ID -> transfer syntax, the acceptor's maximum PDU length)."""
    accepted: dict[int, str] = {}
    max_pdu = 0
    offset = 68
    while offset < len(body):
        item_type, _reserved, length = struct.unpack_from(">BBH", body, offset)
        value = body[offset + 4:offset + 4 + length]
        if item_type == 0x21:
            context_id, result = value[0], value[2]
            ts_type, _r, ts_length = struct.unpack_from(">BBH", value, 4)
            if result == 0 and ts_type == 0x40:
                accepted[context_id] = value[8:8 + ts_length].decode().rstrip("\0")
        elif item_type == 0x50:
            sub = 0
            while sub < len(value):
                sub_type, _r, sub_length = struct.unpack_from(">BBH", value, sub)
                if sub_type == 0x51:
                    (max_pdu,) = struct.unpack_from(">L", value, sub + 4)
                sub += 4 + sub_length
        offset += 4 + length
    return accepted, max_pdu


def request_association(port: int, contexts: list[tuple[int, str, list[str]]],
                        timeout: float = IO_TIMEOUT, **kw: Any) -> tuple[socket.socket, int, bytes]:
    """Send an A-ASSOCIATE-RQ (associate_rq's keywords); the socket and the answer PDU."""
    sock = connect(port, timeout)
    sock.sendall(associate_rq(contexts, **kw))
    pdu_type, body = read_pdu(sock)
    return sock, pdu_type, body


DEFAULT_CONTEXTS = [(1, CT_IMAGE, [EXPLICIT_LE]), (3, VERIFICATION, [IMPLICIT_LE])]


def associate(port: int, contexts: list[tuple[int, str, list[str]]] | None = None,
              **kw: Any) -> Association:
    """An accepted association (AssertionError for anything but an A-ASSOCIATE-AC)."""
    sock, pdu_type, body = request_association(port, contexts or DEFAULT_CONTEXTS, **kw)
    if pdu_type != A_ASSOCIATE_AC:
        sock.close()
        raise AssertionError(f"expected A-ASSOCIATE-AC, got PDU type {pdu_type:#04x} {body!r}")
    accepted, max_pdu = parse_ac(body)
    return Association(sock, accepted, max_pdu)


def send_fragments(assoc: Association, context_id: int, data: bytes, *, command: bool) -> None:
    """Send a command or data set in P-DATA-TF PDUs within the acceptor's maximum length."""
    for one in fragment_pdus(context_id, data, command=command,
                             max_pdu=assoc.peer_max_pdu or MAX_PDU):
        assoc.sock.sendall(one)


def read_response(assoc: Association) -> int:
    """Read one response command set; return its Status (Aborted on an A-ABORT)."""
    ds = read_dataset(BytesIO(_command(assoc.sock)), is_implicit_VR=True, is_little_endian=True)
    return int(ds.Status)


def c_store(assoc: Association, context_id: int, sop_class: bytes, sop_instance: bytes,
            data_set: bytes, message_id: int = 1) -> int:
    send_fragments(assoc, context_id, c_store_rq(sop_class, sop_instance, message_id),
                   command=True)
    send_fragments(assoc, context_id, data_set, command=False)
    return read_response(assoc)


def release(assoc: Association) -> None:
    assoc.sock.sendall(pdu(A_RELEASE_RQ, bytes(4)))
    pdu_type, _body = read_pdu(assoc.sock)
    assert pdu_type == A_RELEASE_RP, f"expected A-RELEASE-RP, got {pdu_type:#04x}"
    assoc.close()
