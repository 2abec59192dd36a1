#!/usr/bin/env python3
"""A minimal C-STORE SCU: one association per object, over raw sockets, no threads.

    python bench/assoc_client.py [--phases] HOST PORT DIRECTORY

Sends every DICOM file of DIRECTORY (sorted by name) in an association of its own: connect,
A-ASSOCIATE-RQ with one presentation context (the file's SOP class, Explicit VR Little
Endian), the C-STORE-RQ and its data set, the C-STORE-RSP, A-RELEASE-RQ/RP, close.  Each
file's PDUs are encoded once, up front, for the receiver's advertised maximum PDU, so the
client's own cost per association is a few system calls: what is measured is the receiver's
association set-up and its handling of one object.  TCP_NODELAY is set.

Prints one line per failure (``E: ...``, as DCMTK does) and exits 1 on the first failure;
prints ``associations N, seconds S`` and exits 0 otherwise.  With ``--phases`` it also prints
where an association's time goes, as the sender sees it: the median microseconds from
connect() to the A-ASSOCIATE-AC, from the C-STORE-RQ to its response, from the A-RELEASE-RQ
to its RP, and the close.  Stdlib only: it runs with any Python, without the project
installed.
"""

import itertools
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

EXPLICIT_LE = b"1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.7433.1.1"  # any syntactically valid UID
PROPOSED_MAX_PDU = 16384  # what we receive; responses are tiny
CONTEXT_ID = 1


def _even(uid: bytes) -> bytes:
    return uid + b"\0" if len(uid) % 2 else uid


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


def _element(group: int, element: int, value: bytes) -> bytes:
    """An implicit VR little endian element (command sets are always implicit LE)."""
    return struct.pack("<HHL", group, element, len(value)) + value


def associate_rq(sop_class: bytes, calling: bytes, called: bytes) -> bytes:
    context = (bytes((CONTEXT_ID, 0, 0, 0)) + _item(0x30, sop_class)
               + _item(0x40, EXPLICIT_LE))
    user = (_item(0x51, struct.pack(">L", PROPOSED_MAX_PDU)) + _item(0x52, IMPLEMENTATION_UID)
            + _item(0x55, b"BENCH_ASSOC"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT) + _item(0x20, context) + _item(0x50, user))
    return _pdu(0x01, body)


def c_store_rq(sop_class: bytes, sop_instance: bytes, message_id: int) -> bytes:
    rest = (_element(0, 0x0002, _even(sop_class)) + _element(0, 0x0100, struct.pack("<H", 1))
            + _element(0, 0x0110, struct.pack("<H", message_id))
            + _element(0, 0x0700, struct.pack("<H", 0))
            + _element(0, 0x0800, struct.pack("<H", 0)) + _element(0, 0x1000, _even(sop_instance)))
    return _element(0, 0x0000, struct.pack("<L", len(rest))) + rest


def p_data(payload: bytes, command: bool, max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying `payload`, each within the peer's maximum length."""
    room = (max_pdu or 1 << 20) - 6
    out = []
    for start in range(0, max(len(payload), 1), room):
        piece = payload[start:start + room]
        last = start + room >= len(payload)
        control = (1 if command else 0) | (2 if last else 0)
        out.append(_pdu(0x04, struct.pack(">LBB", len(piece) + 2, CONTEXT_ID, control) + piece))
    return b"".join(out)


RELEASE_RQ = _pdu(0x05, bytes(4))


class DicomFile:
    """A Part 10 file split into what the wire needs: SOP class and instance, the data set."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        if data[128:132] != b"DICM":
            raise ValueError(f"{path}: not a DICOM Part 10 file")
        offset = 132
        meta: dict[int, bytes] = {}
        while offset < len(data):
            group, element, vr = struct.unpack_from("<HH2s", data, offset)
            if group != 2:
                break
            if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"):
                length = struct.unpack_from("<L", data, offset + 8)[0]
                start = offset + 12
            else:
                length = struct.unpack_from("<H", data, offset + 6)[0]
                start = offset + 8
            meta[element] = data[start:start + length]
            offset = start + length
        if meta.get(0x0010, b"").rstrip(b"\0 ") != EXPLICIT_LE:
            raise ValueError(f"{path}: not Explicit VR Little Endian")
        self.sop_class = meta[0x0002].rstrip(b"\0 ")
        self.sop_instance = meta[0x0003].rstrip(b"\0 ")
        self.data_set = data[offset:]
        self._encoded: dict[int, bytes] = {}

    def store_pdus(self, max_pdu: int) -> bytes:
        if max_pdu not in self._encoded:
            command = c_store_rq(self.sop_class, self.sop_instance, 1)
            self._encoded[max_pdu] = (p_data(command, True, max_pdu)
                                      + p_data(self.data_set, False, max_pdu))
        return self._encoded[max_pdu]


class Failure(Exception):
    pass


def _read_exact(sock: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = sock.recv(count)
        if not chunk:
            raise Failure("connection closed by the receiver")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    pdu_type, length = struct.unpack(">BxL", _read_exact(sock, 6))
    return pdu_type, _read_exact(sock, length)


def parse_ac(body: bytes) -> int:
    """The receiver's maximum PDU length; Failure unless our context was accepted."""
    offset = 68
    accepted = False
    max_pdu = 0
    while offset + 4 <= len(body):
        item_type, length = struct.unpack_from(">BxH", body, offset)
        value = body[offset + 4:offset + 4 + length]
        if item_type == 0x21 and value[0] == CONTEXT_ID:
            accepted = value[2] == 0
        elif item_type == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                sub_type, sub_length = struct.unpack_from(">BxH", value, sub)
                if sub_type == 0x51:
                    max_pdu = struct.unpack_from(">L", value, sub + 4)[0]
                sub += 4 + sub_length
        offset += 4 + length
    if not accepted:
        raise Failure("presentation context rejected")
    return max_pdu


def response_status(sock: socket.socket) -> int:
    """Read P-DATA-TF PDUs until the last command fragment; its (0000,0900) Status."""
    command = b""
    while True:
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x04:
            raise Failure(f"expected P-DATA-TF, got PDU type 0x{pdu_type:02X}")
        offset = 0
        while offset + 6 <= len(body):
            length, _context, control = struct.unpack_from(">LBB", body, offset)
            command += body[offset + 6:offset + 4 + length]
            offset += 4 + length
            if control & 0x03 == 0x03:
                return _status(command)


def _status(command: bytes) -> int:
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        if (group, element) == (0, 0x0900):
            status: int = struct.unpack_from("<H", command, offset + 8)[0]
            return status
        offset += 8 + length
    raise Failure("C-STORE-RSP without a status")


PHASES = ("associate", "store", "release", "close")
PHASES_PREFIX = "median us: "  # bench/run.py reads this line back


def send_one(host: str, port: int, dicom: DicomFile, rq: bytes) -> list[float]:
    """One association; the seconds each of PHASES took."""
    marks = [time.perf_counter()]
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(rq)
        pdu_type, body = read_pdu(sock)
        if pdu_type != 0x02:
            raise Failure(f"association not accepted (PDU type 0x{pdu_type:02X})")
        max_pdu = parse_ac(body)
        marks.append(time.perf_counter())
        sock.sendall(dicom.store_pdus(max_pdu))
        status = response_status(sock)
        if status != 0:
            raise Failure(f"C-STORE of {dicom.sop_instance.decode()} answered 0x{status:04X}")
        marks.append(time.perf_counter())
        sock.sendall(RELEASE_RQ)
        pdu_type, _ = read_pdu(sock)
        if pdu_type != 0x06:
            raise Failure(f"expected A-RELEASE-RP, got PDU type 0x{pdu_type:02X}")
        marks.append(time.perf_counter())
    marks.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(marks)]


def main(argv: list[str]) -> int:
    phases = "--phases" in argv
    argv = [a for a in argv if a != "--phases"]
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, directory = argv[1], int(argv[2]), Path(argv[3])
    files = [DicomFile(p) for p in sorted(directory.iterdir()) if p.is_file()]
    requests = {f.sop_class: associate_rq(f.sop_class, b"BENCHSCU", b"STORESCP") for f in files}
    times: list[list[float]] = []
    started = time.perf_counter()
    for number, dicom in enumerate(files, 1):
        try:
            times.append(send_one(host, port, dicom, requests[dicom.sop_class]))
        except (Failure, OSError) as exc:
            print(f"E: association {number} ({dicom.sop_instance.decode()}): {exc}", flush=True)
            return 1
    print(f"associations {len(files)}, seconds {time.perf_counter() - started:.3f}", flush=True)
    if phases and times:
        medians = [statistics.median(t[k] for t in times) * 1e6 for k in range(len(PHASES))]
        named = zip(PHASES, medians, strict=True)
        print(PHASES_PREFIX + ", ".join(f"{name} {value:.0f}" for name, value in named),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
