"""Worker → master messages: small, typed, of bounded size.

Nothing the master must act on travels here: a stored object's event record is in the outbox
(outbox.py), durable before the object is acknowledged.  A message is only a statistic and a
wake-up ("read the outbox now"), so a full or closed channel never blocks or fails an
association, and no message grows with what a peer sends: every message is a struct whose
first byte is its type, with text fields of bounded length.  The master has two channels of
them: wake-ups (ObjectStored, AssociationEnded, CommitmentNote) and statistics
(AssociationReport, from telemetry.Reporter), so neither crowds out the other.

events.exec_sync adds a `SyncLink` per worker: the worker names the record it waits for and
the master answers once that object's jobs are finished; the worker waits a bounded time.
"""

import contextlib
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum

from dicom_ingestd.codes import Ending

# Upper bounds (seconds) of the commit latency buckets: from the ~0.5 ms fsync of a small
# object on an SSD to the seconds of a large one on a busy disk.  The last bucket is +Inf.
# A fixed histogram, so that the workers' tallies add up in the master.
COMMIT_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

KEY_BYTES = 496  # association keys ("<boot time hex>-<counter>") and request ids
PEER_BYTES = 255  # a peer's name: a DNS name is at most 253 characters
AE_BYTES = 64  # a calling AE title: 16 characters
ERROR_BYTES = 1024  # the last error's text
MAX_STATUSES = 16  # distinct DIMSE statuses in one report (Reporter sends before more)
_STORED = struct.Struct("!BQ")  # type, size in bytes; then the association key (ASCII)
_ENDED = struct.Struct("!BB")  # type, 1 if released; then the association key (ASCII)
_NOTE = struct.Struct("!BB")  # type, CommitmentStep; then "association request-id" (ASCII)
# type, outcome (0: still running, else 1 + its index in _ENDINGS), number of statuses, pid,
# bytes stored, commit seconds' sum, last success and last error times, the commit counts
# (one per bucket and +Inf), lengths of peer, calling AE title and last error; then
# (status, count) per status, then the three texts (UTF-8).
_REPORT = struct.Struct(f"!BBBIQddd{len(COMMIT_BUCKETS) + 1}IBBH")
_STATUS = struct.Struct("!HI")
_TYPE_STORED = 1
_TYPE_ENDED = 2
_TYPE_NOTE = 3
_TYPE_REPORT = 4
_ENDINGS = tuple(Ending)
MAX_MESSAGE = max(_STORED.size + KEY_BYTES,
                  _REPORT.size + MAX_STATUSES * _STATUS.size + PEER_BYTES + AE_BYTES
                  + ERROR_BYTES)


def bucket_index(seconds: float) -> int:
    """The bucket a latency falls in (len(COMMIT_BUCKETS) for +Inf)."""
    for index, bound in enumerate(COMMIT_BUCKETS):
        if seconds <= bound:
            return index
    return len(COMMIT_BUCKETS)


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


@dataclass(frozen=True, slots=True)
class AssociationReport:
    """What happened on one association since its previous report (telemetry.Reporter).

    `outcome` is None while the association runs, then how it ended.  `statuses` counts the
    C-STORE responses sent by DIMSE status (success included); `commit_counts` has one count
    per COMMIT_BUCKETS bound plus +Inf, not cumulative (empty: none).  Times are wall-clock
    seconds.
    """

    pid: int
    peer: str
    calling_ae: str
    outcome: Ending | None = None
    statuses: dict[int, int] = field(default_factory=dict)
    bytes_stored: int = 0
    commit_counts: tuple[int, ...] = ()
    commit_sum: float = 0.0
    last_success: float = 0.0
    last_error: str = ""
    last_error_time: float = 0.0


Message = ObjectStored | AssociationEnded | CommitmentNote | AssociationReport


def _key(association: str) -> bytes:
    return association.encode("ascii", "replace")[:KEY_BYTES]


def _utf8(text: str, size: int, cut_mark: str = "") -> bytes:
    """`text` in at most `size` bytes of UTF-8, cut at a character boundary; a text that was
    cut ends with `cut_mark`, so that whoever reads it knows there was more."""
    data = text.encode("utf-8", "replace")
    if len(data) <= size:
        return data
    mark = cut_mark.encode("utf-8")
    return data[:size - len(mark)].decode("utf-8", "ignore").encode("utf-8") + mark


def _encode_report(report: AssociationReport) -> bytes:
    if len(report.statuses) > MAX_STATUSES:
        raise ValueError(f"more than {MAX_STATUSES} statuses in one report")
    counts = report.commit_counts or (0,) * (len(COMMIT_BUCKETS) + 1)
    peer = _utf8(report.peer, PEER_BYTES)
    calling_ae = _utf8(report.calling_ae, AE_BYTES)
    # A hostile peer can make an error text long (a 1,500-character UID quoted in it); the
    # status shows where it was cut, the journal line has all of it.
    error = _utf8(report.last_error, ERROR_BYTES, cut_mark=" […]")
    outcome = 0 if report.outcome is None else 1 + _ENDINGS.index(report.outcome)
    return b"".join([
        _REPORT.pack(_TYPE_REPORT, outcome, len(report.statuses), report.pid,
                     report.bytes_stored, report.commit_sum, report.last_success,
                     report.last_error_time, *counts, len(peer), len(calling_ae), len(error)),
        *(_STATUS.pack(status, count) for status, count in report.statuses.items()),
        peer, calling_ae, error])


def _decode_report(data: bytes) -> AssociationReport | None:
    (_, outcome, statuses, pid, size, commit_sum, last_success, last_error_time,
     *rest) = _REPORT.unpack_from(data)
    counts, (peer_length, ae_length, error_length) = tuple(rest[:-3]), rest[-3:]
    texts = _REPORT.size + statuses * _STATUS.size
    if outcome > len(_ENDINGS) or statuses > MAX_STATUSES \
            or len(data) != texts + peer_length + ae_length + error_length:
        return None
    tally = dict(_STATUS.iter_unpack(data[_REPORT.size:texts]))
    peer = data[texts:texts + peer_length].decode("utf-8")
    calling_ae = data[texts + peer_length:texts + peer_length + ae_length].decode("utf-8")
    error = data[texts + peer_length + ae_length:].decode("utf-8")
    return AssociationReport(pid, peer, calling_ae, _ENDINGS[outcome - 1] if outcome else None,
                             tally, size, counts if any(counts) else (), commit_sum,
                             last_success, error, last_error_time)


def encode(message: Message) -> bytes:
    """The datagram of `message`; raises ValueError for a report of too many statuses."""
    if isinstance(message, AssociationReport):
        return _encode_report(message)
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
    if len(data) >= _REPORT.size and data[0] == _TYPE_REPORT:
        try:
            return _decode_report(data)
        except UnicodeDecodeError:
            return None
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
        with contextlib.suppress(OSError, ValueError, struct.error):
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

    def close_reader(self) -> None:
        """In a forked worker: only the writer is needed."""
        self.reader.close()

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
