"""Worker → master messages: small, typed, fixed in size.

Nothing the master must act on travels here: a stored object's event record is in the outbox
(outbox.py), durable before the object is acknowledged.  A message is only a statistic and a
wake-up ("read the outbox now"), so a full or closed channel never blocks or fails an
association, and no message grows with what a peer sends.

events.exec_sync adds a `SyncLink` per worker: the worker names the record it waits for and
the master answers once that object's jobs are finished; the worker waits a bounded time.
"""

import contextlib
import select
import socket
import struct
import time
from dataclasses import dataclass
from enum import IntEnum

MAX_MESSAGE = 512
_STORED = struct.Struct("!BQ")  # type, size in bytes; then the association key (ASCII)
_ENDED = struct.Struct("!BB")  # type, 1 if released; then the association key (ASCII)
_NOTE = struct.Struct("!BB")  # type, CommitmentStep; then "association request-id" (ASCII)
_TYPE_STORED = 1
_TYPE_ENDED = 2
_TYPE_NOTE = 3


@dataclass(frozen=True, slots=True)
class ObjectStored:
    """A worker stored an object (and its event record, when events are on)."""

    association: str
    size: int


@dataclass(frozen=True, slots=True)
class AssociationEnded:
    """A worker's association is over; `released` when it ended with A-RELEASE (a study it
    was sending is then finished, as far as this association goes)."""

    association: str
    released: bool


class CommitmentStep(IntEnum):
    """What a worker did with a storage commitment request (commitment spool)."""

    REQUESTED = 1  # a request file is durable: evaluate it now
    DELIVERED = 2  # its report was answered with success on the requesting association
    UNDELIVERED = 3  # it will not be: deliver it on a new association now


@dataclass(frozen=True, slots=True)
class CommitmentNote:
    """A wake-up about a storage commitment request.  Losing one costs time, never a report:
    the master also polls the spool, and releases a report's job when its association ends
    (a lost DELIVERED note means the report is delivered once more)."""

    association: str
    request_id: str
    step: CommitmentStep


Message = ObjectStored | AssociationEnded | CommitmentNote


def _key(association: str) -> bytes:
    return association.encode("ascii", "replace")[:MAX_MESSAGE - 16]


def encode(message: Message) -> bytes:
    if isinstance(message, ObjectStored):
        return _STORED.pack(_TYPE_STORED, message.size) + _key(message.association)
    if isinstance(message, CommitmentNote):
        return _NOTE.pack(_TYPE_NOTE, message.step) + _key(
            f"{message.association} {message.request_id}")
    return _ENDED.pack(_TYPE_ENDED, int(message.released)) + _key(message.association)


def decode(data: bytes) -> Message | None:
    """The message in `data`, or None for a malformed one."""
    if len(data) >= _STORED.size and data[0] == _TYPE_STORED:
        _, size = _STORED.unpack_from(data)
        return ObjectStored(data[_STORED.size:].decode("ascii", "replace"), size)
    if len(data) >= _ENDED.size and data[0] == _TYPE_ENDED:
        _, released = _ENDED.unpack_from(data)
        return AssociationEnded(data[_ENDED.size:].decode("ascii", "replace"), bool(released))
    if len(data) >= _NOTE.size and data[0] == _TYPE_NOTE:
        _, step = _NOTE.unpack_from(data)
        association, _, request_id = data[_NOTE.size:].decode("ascii", "replace").partition(" ")
        if step in iter(CommitmentStep) and request_id:
            return CommitmentNote(association, request_id, CommitmentStep(step))
    return None


class Channel:
    """Both ends: workers `send`, the master `receive`s (non-blocking)."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def send(self, message: Message) -> None:
        # A full channel loses a statistic and a wake-up (the master polls), never an event.
        with contextlib.suppress(OSError):
            self.writer.send(encode(message))

    def receive(self) -> list[Message]:
        messages: list[Message] = []
        while True:
            try:
                data = self.reader.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return messages
            message = decode(data)
            if message is not None:
                messages.append(message)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class SyncWait:
    """The worker's side of a SyncLink (a warm worker gets its end handed over, pool.py)."""

    def __init__(self, worker_end: socket.socket) -> None:
        self.worker_end = worker_end

    def wait_for(self, record_id: str, timeout: float) -> str:
        """Ask for the jobs of `record_id` and wait: 'done', 'gone' (the master closed the
        link: it stopped or died) or 'timeout'."""
        wanted = record_id.encode("ascii")
        try:
            self.worker_end.send(wanted)
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                ready, _, _ = select.select([self.worker_end], [], [], remaining)
                if ready:
                    answer = self.worker_end.recv(MAX_MESSAGE)
                    if not answer:
                        return "gone"
                    if answer == wanted:
                        return "done"
        except OSError:
            return "gone"


class SyncLink(SyncWait):
    """events.exec_sync: one association's wait-for-my-jobs link to the master.

    A SOCK_SEQPACKET pair made before the association starts.  The worker sends the id of a
    durable outbox record and waits for the master to send the same id back; the master reads
    `master_end` in its selector.  An answer that comes after its wait timed out is skipped.
    """

    def __init__(self) -> None:
        worker_end, self.master_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        super().__init__(worker_end)

    def close(self) -> None:
        self.worker_end.close()
        self.master_end.close()
