"""A transparent TCP relay that records what a sender and the daemon said to each other.

The interoperability matrix needs to know what a sender *put on the wire*: which contexts it
proposed, which transfer syntax the daemon accepted, the data set bytes of each C-STORE and the
status that came back.  Senders transcode, add or drop group lengths, change sequence lengths;
their command-line output does not say so.  The relay sits between the sender and the daemon
on loopback, forwards every chunk unchanged the moment it arrives (so PDU sizes, ordering and
timing stay the sender's and the daemon's), and parses a copy of both byte streams into a
transcript of Upper Layer PDUs and DIMSE messages.  Nothing is answered or altered by it.
"""

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

from support.wire import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    NO_DATA_SET,
    P_DATA_TF,
)


@dataclass
class Message:
    """One DIMSE message: its command set (a few decoded fields) and data set bytes, if any."""

    context_id: int
    command_field: int
    message_id: int | None = None
    responded_to: int | None = None
    sop_class: str = ""
    sop_instance: str = ""
    status: int | None = None
    data_set: bytes | None = None


@dataclass
class Association:
    """What one TCP connection through the relay carried."""

    calling_ae: str = ""
    called_ae: str = ""
    implementation_uid: str = ""
    implementation_version: str = ""
    proposed: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    # context id -> (result, transfer syntax); result 0 is acceptance
    accepted: dict[int, tuple[int, str]] = field(default_factory=dict)
    outcome: str = "no A-ASSOCIATE-AC"  # accepted / rejected (result, source, reason)
    sent: list[Message] = field(default_factory=list)  # sender -> daemon
    received: list[Message] = field(default_factory=list)  # daemon -> sender
    release_requested: bool = False
    released: bool = False
    aborted_by: list[str] = field(default_factory=list)  # "sender" and/or "daemon"
    errors: list[str] = field(default_factory=list)  # the relay could not parse something
    done: threading.Event = field(default_factory=threading.Event)

    def transfer_syntax(self, context_id: int) -> str | None:
        result = self.accepted.get(context_id)
        return result[1] if result and result[0] == 0 else None

    def response_to(self, request: Message) -> Message | None:
        for message in self.received:
            if message.responded_to == request.message_id and \
                    message.context_id == request.context_id:
                return message
        return None


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \0")


def _items(body: bytes) -> list[tuple[int, bytes]]:
    items, pos = [], 0
    while pos + 4 <= len(body):
        item_type, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
        items.append((item_type, body[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return items


def _command(context_id: int, raw: bytes) -> Message:
    """Decode the fields we need from a command set (always implicit VR little endian)."""
    values: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        values[group << 16 | element] = raw[pos + 8:pos + 8 + length]
        pos += 8 + length

    def us(tag: int) -> int | None:
        value = values.get(tag)
        return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None

    message = Message(context_id, us(0x0100) or 0)
    message.message_id = us(0x0110)
    message.responded_to = us(0x0120)
    message.status = us(0x0900)
    message.sop_class = _text(values.get(0x0002, b""))
    message.sop_instance = _text(values.get(0x1000, b""))
    if us(0x0800) != NO_DATA_SET:
        message.data_set = b""  # announced; filled by the data set PDVs
    return message


class _Stream:
    """Parses one direction of a connection; `feed` takes bytes exactly as they were read."""

    def __init__(self, association: Association, from_sender: bool) -> None:
        self.association = association
        self.from_sender = from_sender
        self.buffer = bytearray()
        self.command = bytearray()
        self.pending: Message | None = None  # command seen, data set still arriving
        self.data_set = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 6:
            pdu_type, length = struct.unpack_from(">BxL", self.buffer)
            if len(self.buffer) < 6 + length:
                return
            body = bytes(self.buffer[6:6 + length])
            del self.buffer[:6 + length]
            try:
                self._pdu(pdu_type, body)
            except Exception as exc:  # recording must never stop the relaying
                self.association.errors.append(f"PDU type {pdu_type:#04x}: {exc!r}")

    def _pdu(self, pdu_type: int, body: bytes) -> None:
        a = self.association
        if pdu_type == A_ASSOCIATE_RQ:
            a.called_ae, a.calling_ae = _text(body[4:20]), _text(body[20:36])
            for item_type, item in _items(body[68:]):
                if item_type == 0x20:
                    subs = _items(item[4:])
                    a.proposed[item[0]] = (
                        next((_text(v) for t, v in subs if t == 0x30), ""),
                        [_text(v) for t, v in subs if t == 0x40])
                elif item_type == 0x50:
                    for sub_type, sub in _items(item):
                        if sub_type == 0x52:
                            a.implementation_uid = _text(sub)
                        elif sub_type == 0x55:
                            a.implementation_version = _text(sub)
        elif pdu_type == A_ASSOCIATE_AC:
            a.outcome = "accepted"
            for item_type, item in _items(body[68:]):
                if item_type == 0x21:
                    subs = _items(item[4:])
                    a.accepted[item[0]] = (item[2], next(
                        (_text(v) for t, v in subs if t == 0x40), ""))
        elif pdu_type == A_ASSOCIATE_RJ:
            a.outcome = f"rejected (result {body[1]}, source {body[2]}, reason {body[3]})"
        elif pdu_type == P_DATA_TF:
            pos = 0
            while pos + 6 <= len(body):
                length = struct.unpack_from(">L", body, pos)[0]
                self._pdv(body[pos + 4], body[pos + 5], body[pos + 6:pos + 4 + length])
                pos += 4 + length
        elif pdu_type == A_RELEASE_RQ:
            a.release_requested = True
        elif pdu_type == A_RELEASE_RP:
            a.released = True
        elif pdu_type == A_ABORT:
            a.aborted_by.append("sender" if self.from_sender else "daemon")

    def _pdv(self, context_id: int, control: int, fragment: bytes) -> None:
        messages = self.association.sent if self.from_sender else self.association.received
        if control & 0x01:  # command fragment
            self.command += fragment
            if control & 0x02:
                message = _command(context_id, bytes(self.command))
                self.command.clear()
                if message.data_set is None:
                    messages.append(message)
                else:
                    self.pending = message
            return
        self.data_set += fragment
        if control & 0x02:
            if self.pending is None:
                self.association.errors.append("a data set without a command")
            else:
                self.pending.data_set = bytes(self.data_set)
                messages.append(self.pending)
                self.pending = None
            self.data_set.clear()


class WireTap:
    """Listen on a loopback port; relay each connection to `target_port`, recording it."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.server = socket.create_server((host, 0))
        self.port = int(self.server.getsockname()[1])
        self.associations: list[Association] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def __enter__(self) -> "WireTap":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()

    def take(self, timeout: float = 10.0) -> list[Association]:
        """The associations relayed since the last call, once their connections have ended."""
        with self._lock:
            taken, self.associations = self.associations, []
        for association in taken:
            if not association.done.wait(timeout):
                association.errors.append(f"connection still open after {timeout} s")
        return taken

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _address = self.server.accept()
            except OSError:
                return
            association = Association()
            with self._lock:
                self.associations.append(association)
            threading.Thread(target=self._relay, args=(client, association), daemon=True).start()

    def _relay(self, client: socket.socket, association: Association) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError as exc:
            association.errors.append(f"cannot reach the daemon: {exc}")
            client.close()
            association.done.set()
            return
        for sock in (client, upstream):
            sock.settimeout(120)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [threading.Thread(target=self._pump, args=(a, b, _Stream(association, s)),
                                  daemon=True)
                 for a, b, s in ((client, upstream, True), (upstream, client, False))]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        client.close()
        upstream.close()
        association.done.set()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, stream: _Stream) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                stream.feed(data)
        except OSError as exc:
            if not isinstance(exc, ConnectionResetError):
                stream.association.errors.append(f"relay: {exc}")
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
