#!/usr/bin/env python3
"""The CPython durable floor: the least receiver that answers only once an object is durable.

    python bench/python_floor.py [--no-fsync] [--one-commit] [--fork] [--max-pdu N] PORT OUTDIR

NOT A DICOM RECEIVER.  A deliberately minimal C-STORE SCP for exactly the benchmark's traffic
(DCMTK storescu and bench/assoc_client.py on 127.0.0.1), written so that bench/run.py can
tell what CPython itself costs from what dicom-ingestd's design costs.  It accepts every
proposed presentation context, checks nothing a real receiver must check (AE titles, PDU
lengths against its maximum, the data set, the peer's state machine), has no timeouts, logs
nothing, and a malformed PDU kills it.  Never use it to receive anything else.

Stdlib only, one process, one thread, blocking sockets, TCP_NODELAY, one connection at a
time (the accept loop): parallel senders wait in the listen backlog, so on the sets with 4
senders it serializes them (``--fork`` forks a child per connection instead).  Per
association: read the A-ASSOCIATE-RQ, answer an A-ASSOCIATE-AC that accepts each context with
Explicit VR Little Endian (or its first proposed transfer syntax) and a maximum PDU of
131072 (``--max-pdu``); then P-DATA-TF: the command set is scanned for its Command Field,
Message ID and Affected SOP Class/Instance UID; the data set's fragments are written as they
come to OUTDIR/.tmp/PID-N.part after a minimal Part 10 file meta header.  On the last
fragment the object is made durable, renamed to OUTDIR/<SOP Instance UID>, and only then is
the C-STORE-RSP (status 0) sent.  C-ECHO is answered; A-RELEASE-RQ gets its RP; A-ABORT closes.

Durability, as dicom-ingestd's storage code does it (dicom_ingestd/worker/store.py): the file
is fsynced, renamed, and the directory fsynced; with ``--one-commit`` (what dicom-ingestd does
on ext4 with a journal) its data is written out with sync_file_range before the rename and
the file fsynced after it, one journal commit instead of two.  Either way the writeback of a
large object starts every 8 MiB while it arrives.  ``--no-fsync``: write, close, rename.
"""

import argparse
import ctypes
import os
import re
import signal
import socket
import struct
import sys
from collections.abc import Callable

MAX_PDU = 131072
EXPLICIT_LE = b"1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.7433.1.2"
IMPLEMENTATION_VERSION = b"PYTHON_FLOOR"
WRITEBACK_STEP = 8 << 20  # dicom-ingestd's: start a large object's writeback while it arrives
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
UID = re.compile(rb"[0-9][0-9.]{0,63}")  # the file name: never a path, never hidden

C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATA_SET = 0x0101


def _load_sync_file_range() -> Callable[[int, int, int, int], None] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int

    def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
        if func(fd, offset, nbytes, flags) != 0:
            raise OSError(ctypes.get_errno(), "sync_file_range")

    return sync_file_range


sync_file_range = _load_sync_file_range()


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


def even(value: bytes, pad: bytes = b"\0") -> bytes:
    return value + pad if len(value) % 2 else value


def element(tag_element: int, value: bytes) -> bytes:
    """A command element: group 0000, implicit VR little endian."""
    return struct.pack("<HHL", 0, tag_element, len(value)) + value


def meta_element(tag_element: int, vr: bytes, value: bytes) -> bytes:
    """A file meta element: group 0002, explicit VR little endian."""
    if vr == b"OB":
        return struct.pack("<HH2sxxL", 2, tag_element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, tag_element, vr, len(value)) + value


def associate_ac(rq: memoryview, max_pdu: int) -> tuple[bytes, dict[int, bytes]]:
    """The A-ASSOCIATE-AC for an RQ body, and the accepted transfer syntax per context ID."""
    accepted: dict[int, bytes] = {}
    offset = 68
    while offset + 4 <= len(rq):
        item_type, length = struct.unpack_from(">BxH", rq, offset)
        if item_type == 0x20:
            value = bytes(rq[offset + 4:offset + 4 + length])
            syntaxes = []
            sub = 4
            while sub + 4 <= len(value):
                sub_type, sub_length = struct.unpack_from(">BxH", value, sub)
                if sub_type == 0x40:
                    syntaxes.append(value[sub + 4:sub + 4 + sub_length].rstrip(b"\0 "))
                sub += 4 + sub_length
            if syntaxes:
                accepted[value[0]] = EXPLICIT_LE if EXPLICIT_LE in syntaxes else syntaxes[0]
        offset += 4 + length
    contexts = b"".join(item(0x21, bytes((cid, 0, 0, 0)) + item(0x40, syntax))
                        for cid, syntax in accepted.items())
    user = (item(0x51, struct.pack(">L", max_pdu)) + item(0x52, IMPLEMENTATION_UID)
            + item(0x55, IMPLEMENTATION_VERSION))
    # Called and calling AE titles and the reserved field are echoed, as the standard asks.
    body = (struct.pack(">HH", 1, 0) + bytes(rq[4:68]) + item(0x10, APPLICATION_CONTEXT)
            + contexts + item(0x50, user))
    return pdu(0x02, body), accepted


def command_fields(command: bytes) -> dict[int, bytes]:
    """Element number -> value of a command set (group 0000, implicit VR little endian)."""
    fields = {}
    offset = 0
    while offset + 8 <= len(command):
        _group, number, length = struct.unpack_from("<HHL", command, offset)
        fields[number] = command[offset + 8:offset + 8 + length]
        offset += 8 + length
    return fields


def response(command_field: int, message_id: bytes, sop_class: bytes,
             sop_instance: bytes | None, status: int) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP as one P-DATA-TF PDU of one last command fragment."""
    rest = (element(0x0002, even(sop_class)) + element(0x0100, struct.pack("<H", command_field))
            + element(0x0120, message_id) + element(0x0800, struct.pack("<H", NO_DATA_SET))
            + element(0x0900, struct.pack("<H", status)))
    if sop_instance is not None:
        rest += element(0x1000, even(sop_instance))
    command = element(0x0000, struct.pack("<L", len(rest))) + rest
    return pdu(0x04, struct.pack(">LBB", len(command) + 2, 1, 0x03) + command)


def file_meta(sop_class: bytes, sop_instance: bytes, syntax: bytes, calling_ae: bytes) -> bytes:
    rest = (meta_element(0x0001, b"OB", b"\0\1")
            + meta_element(0x0002, b"UI", even(sop_class))
            + meta_element(0x0003, b"UI", even(sop_instance))
            + meta_element(0x0010, b"UI", even(syntax))
            + meta_element(0x0012, b"UI", even(IMPLEMENTATION_UID))
            + meta_element(0x0013, b"SH", even(IMPLEMENTATION_VERSION, b" "))
            + meta_element(0x0016, b"AE", even(calling_ae, b" ")))
    return (bytes(128) + b"DICM" + meta_element(0x0000, b"UL", struct.pack("<L", len(rest)))
            + rest)


def write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Receiver:
    """The output directory and how objects are made durable there."""

    def __init__(self, output: str, max_pdu: int, fsync: bool, one_commit: bool) -> None:
        os.makedirs(os.path.join(output, ".tmp"), exist_ok=True)
        self.root_fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
        self.tmp_fd = os.open(".tmp", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root_fd)
        self.fsync = fsync
        self.one_commit = one_commit and fsync and sync_file_range is not None
        self.writeback = fsync and sync_file_range is not None
        self.counter = 0
        self.max_pdu = max_pdu

    def serve(self, sock: socket.socket) -> None:
        """One association, until release, abort or the peer closes."""
        buffer = bytearray(self.max_pdu)
        header = memoryview(buffer)[:6]
        if not recv_exact(sock, header):
            return
        pdu_type, length = struct.unpack(">BxL", header)
        rq = memoryview(bytearray(length))
        if pdu_type != 0x01 or not recv_exact(sock, rq):
            return
        ac, syntaxes = associate_ac(rq, self.max_pdu)
        calling_ae = bytes(rq[20:36]).strip()
        sock.sendall(ac)
        command = bytearray()
        fd = -1
        name = ""
        written = synced = 0
        fields: dict[int, bytes] = {}
        while True:
            if not recv_exact(sock, header):
                return
            pdu_type, length = struct.unpack(">BxL", header)
            if length > len(buffer):
                buffer = bytearray(length)
            body = memoryview(buffer)[:length]
            if not recv_exact(sock, body):
                return
            if pdu_type == 0x05:
                sock.sendall(pdu(0x06, bytes(4)))
                return
            if pdu_type != 0x04:
                return  # A-ABORT, or anything this floor does not do
            offset = 0
            while offset + 6 <= length:
                pdv_length, context_id, control = struct.unpack_from(">LBB", body, offset)
                fragment = body[offset + 6:offset + 4 + pdv_length]
                offset += 4 + pdv_length
                if control & 1:
                    command += fragment
                    if not control & 2:
                        continue
                    fields = command_fields(bytes(command))
                    command.clear()
                    field = struct.unpack("<H", fields[0x0100])[0]
                    if field == C_ECHO_RQ:
                        sock.sendall(response(0x8030, fields[0x0110],
                                              fields[0x0002].rstrip(b"\0"), None, 0))
                    elif field == C_STORE_RQ:
                        self.counter += 1
                        name = f"{os.getpid()}-{self.counter}.part"
                        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
                                     dir_fd=self.tmp_fd)
                        meta = file_meta(fields[0x0002].rstrip(b"\0"),
                                         fields[0x1000].rstrip(b"\0"),
                                         syntaxes[context_id], calling_ae)
                        write_all(fd, meta)
                        written, synced = len(meta), 0
                    continue
                write_all(fd, fragment)
                written += len(fragment)
                if self.writeback and written - synced >= WRITEBACK_STEP:
                    assert sync_file_range is not None
                    sync_file_range(fd, synced, written - synced, SYNC_FILE_RANGE_WRITE)
                    synced = written
                if control & 2:
                    instance = fields[0x1000].rstrip(b"\0")
                    status = self.place(fd, name, instance)
                    fd = -1
                    sock.sendall(response(0x8001, fields[0x0110],
                                          fields[0x0002].rstrip(b"\0"), instance, status))

    def place(self, fd: int, name: str, instance: bytes) -> int:
        """Make the object durable under its SOP Instance UID; the C-STORE status."""
        if not UID.fullmatch(instance):
            os.close(fd)
            os.unlink(name, dir_fd=self.tmp_fd)
            return 0xC000  # cannot understand: no file name from it
        final = instance.decode()
        if self.one_commit:
            assert sync_file_range is not None
            sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_ALL)
            os.rename(name, final, src_dir_fd=self.tmp_fd, dst_dir_fd=self.root_fd)
            os.fsync(fd)
            os.close(fd)
            return 0
        if self.fsync:
            os.fsync(fd)
        os.close(fd)
        os.rename(name, final, src_dir_fd=self.tmp_fd, dst_dir_fd=self.root_fd)
        if self.fsync:
            os.fsync(self.root_fd)
        return 0


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view`; False if the peer closed first."""
    while view:
        count = sock.recv_into(view)
        if not count:
            return False
        view = view[count:]
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description="The benchmark's CPython durable floor; not a DICOM receiver (see the "
                    "module's docstring).")
    parser.add_argument("port", type=int)
    parser.add_argument("output", help="output directory (OUTDIR/.tmp is the staging area)")
    parser.add_argument("--no-fsync", action="store_true", help="write, close, rename")
    parser.add_argument("--one-commit", action="store_true",
                        help="sync_file_range, rename, fsync (dicom-ingestd's ext4 recipe)")
    parser.add_argument("--fork", action="store_true", help="a child per connection")
    parser.add_argument("--max-pdu", type=int, default=MAX_PDU,
                        help=f"maximum PDU length announced (default {MAX_PDU})")
    args = parser.parse_args(argv[1:])
    receiver = Receiver(args.output, args.max_pdu, fsync=not args.no_fsync,
                        one_commit=args.one_commit)
    fork = args.fork
    if fork:
        # Children are reaped by the kernel; SIGTERM to the parent (the bench's stop) leaves
        # no running association behind in the bench, which stops it only after the senders.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    listener = socket.create_server(("127.0.0.1", args.port), backlog=64)
    while True:
        sock, _ = listener.accept()
        if fork and os.fork():
            sock.close()
            continue
        try:
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                receiver.serve(sock)
        except OSError as exc:
            print(f"association failed: {exc}", file=sys.stderr, flush=True)
        if fork:
            os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
