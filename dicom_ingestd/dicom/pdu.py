"""DICOM Upper Layer PDUs on a blocking socket: the hot path of the receive side.

Why our own code instead of pynetdicom's DUL: pynetdicom reads the socket 4 KiB at a time from a
polling thread with 1 ms sleeps and hands every PDU over queues.  Here one thread reads large
chunks with `recv_into` into one reused buffer, and a data set fragment is passed to its sink
(the temporary file) as a memoryview of that buffer, so a PDV of any size costs no extra copy and
no memory beyond the buffer.  Association PDUs (A-ASSOCIATE-RQ/AC/RJ) are still decoded and
encoded by pynetdicom, see `acceptor.py`.
"""

import select
import socket
import ssl
import struct
import time
from collections.abc import Callable

from dicom_ingestd import __version__
from dicom_ingestd.errors import IngestError
from dicom_ingestd.sockets import is_tcp

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# Who we are on the wire, in every A-ASSOCIATE-RQ/AC we send (receiving and delivering
# storage commitment reports alike) and in the file meta information of what we store.
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# A fixed UUID-derived UID (PS3.5 B.2): ours, registered to nobody else.
IMPLEMENTATION_CLASS_UID = "2.25.58257340867816946478277521733648859219"
IMPLEMENTATION_VERSION = ("INGESTD_" + __version__.replace(".", ""))[:16]

# A-ASSOCIATE item and sub-item types, PS3.8 9.3.2-9.3.4 and Annex D.
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_PRESENTATION_CONTEXT_AC = 0x21
ITEM_ABSTRACT_SYNTAX = 0x30
ITEM_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
ITEM_MAX_LENGTH = 0x51
ITEM_IMPLEMENTATION_CLASS_UID = 0x52
ITEM_ROLE_SELECTION = 0x54
ITEM_IMPLEMENTATION_VERSION = 0x55
_ITEM = struct.Struct(">BxH")


def encode_item(item_type: int, value: bytes) -> bytes:
    """One A-ASSOCIATE item or sub-item: type, reserved byte, 16-bit length, value."""
    return _ITEM.pack(item_type, len(value)) + value


PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}

# A-ABORT sources, PS3.8 9.3.8: the service user (us, deliberately: test aids, requests we
# cannot serve) or the service provider (the Upper Layer itself: protocol errors, timeouts).
ABORT_SOURCE_SERVICE_USER = 0x00
ABORT_SOURCE_SERVICE_PROVIDER = 0x02
# A-ABORT reasons: a service user's is "not significant"; the service provider's are the rest.
ABORT_REASON_NOT_SIGNIFICANT = 0x00
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PARAMETER = 0x04
ABORT_UNEXPECTED_PARAMETER = 0x05
ABORT_INVALID_PARAMETER = 0x06

# The message control header of a PDV item, PS3.8 E.2: bit 0 set for a command fragment
# (clear: data set), bit 1 set for a message's last fragment.
PDV_COMMAND = 0x01
PDV_LAST = 0x02

_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_BUFFER_SIZE = 1 << 18  # larger than the largest PDU we advertise, so a PDU header never wraps
RATE_WINDOW = 60.0  # seconds: the longest stretch over which the minimum rate is measured

# Read buffers given back by finished channels (Channel.release), for the next one: a fresh
# 256 KiB buffer costs an mmap, 64 page faults to zero it and a munmap, every association.  At
# most one is kept: a warm worker serves one association at a time (single-process mode's
# threads allocate the rest).  list.append/pop are atomic, so threads may share it.
_SPARE: list[bytearray] = []
_SPARE_MOST = 1


def reserve_buffer() -> None:
    """Have a read buffer ready for the next channel (a warm worker, before it serves: its
    memory baseline then includes the buffer, and its first association finds it)."""
    if len(_SPARE) < _SPARE_MOST:
        _SPARE.append(bytearray(_BUFFER_SIZE))


def _take_buffer() -> bytearray:
    try:
        return _SPARE.pop()
    except IndexError:
        return bytearray(_BUFFER_SIZE)


class PeerClosed(IngestError):
    """The peer closed the TCP connection."""


class PeerTimeout(IngestError):
    """The peer sent nothing within the allowed time."""


class ProtocolError(IngestError):
    """The peer broke the Upper Layer protocol; `reason` is the A-ABORT reason to send."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class UserAbort(IngestError):
    """Leave the association with an A-ABORT we send as its service user, deliberately (test
    aids, requests we cannot serve, as storescp does); protocol errors are ProtocolError."""


class Channel:
    """Buffered, deadline-aware reads and whole-PDU writes on one connected socket.

    `io_timeout` bounds every single read or write (storescp's socket timeout); callers pass a
    further absolute `deadline` (time.monotonic()) for "the next message must start by then"
    (ARTIM / DIMSE timeouts).  `quickack` re-arms TCP_QUICKACK before each read that has to
    wait: Linux clears it after use, and a sender with Nagle on otherwise stalls ~40 ms per
    object on our delayed ACK (TCP only: a Unix socket from socket activation has no such
    option).

    A plain socket is switched to non-blocking mode once, and each read waits with poll()
    only when the peer's bytes are not there yet: the deadlines change with every read, and
    socket timeouts would cost an ioctl per change plus a poll before every recv.  A TLS
    socket keeps socket timeouts (its reads may need writes, and the reverse).

    The read buffer is reused across channels (`release`, `_SPARE`).  No byte of an earlier
    peer can be read through it: every read takes bytes from buffer[_start:_end] only, a
    channel starts with _start = _end = 0, and _end moves past exactly the bytes recv_into
    wrote in this channel (compaction copies only [_start:_end] down), so what lies beyond
    _end is never returned.  The buffer is not zeroed: no read goes past what was received.
    """

    def __init__(self, sock: socket.socket, io_timeout: float | None, quickack: bool,
                 min_rate: int = 0) -> None:
        self.sock = sock
        self.io_timeout = io_timeout
        self.quickack = quickack and hasattr(socket, "TCP_QUICKACK") and is_tcp(sock)
        self._buf = _take_buffer()
        self._view = memoryview(self._buf)
        self._start = 0  # the unread bytes are _buf[_start:_end] (see the class docstring)
        self._end = 0
        self._timeout: float | None = -1.0  # never a real value: the first call sets it
        self._timed_sock: socket.socket | None = None  # whose timeout/mode was set last
        self._poll: select.poll | None = None  # set: a plain socket in non-blocking mode
        self._sent = False  # sent since the last read: the peer's answer is not here yet
        # The minimum transfer rate (network.min_transfer_rate) while armed: each `window`
        # seconds spent blocked in recv must bring min_rate * window bytes.  Only time spent
        # waiting for the peer counts, so our own disk stalls never count against it.
        self.min_rate = min_rate
        self.window = min(io_timeout or RATE_WINDOW, RATE_WINDOW)
        self._armed = False
        self._waited = 0.0
        self._received = 0
        self.received = 0  # bytes read from the peer so far

    def arm(self) -> None:
        """A message is on its way: from now on, the peer must keep up the minimum rate."""
        if self.min_rate and not self._armed:
            self._armed, self._waited, self._received = True, 0.0, 0

    def disarm(self) -> None:
        """Between messages: the DIMSE timeout applies instead."""
        self._armed = False

    def _check_rate(self) -> None:
        """At the end of a window: enough bytes, or PeerTimeout.  Starts the next window."""
        needed = int(self.min_rate * self.window)
        if self._received < needed:
            raise PeerTimeout(
                f"the peer sent {self._received} bytes in {self.window:.0f} s of a message, "
                f"less than network.min_transfer_rate ({self.min_rate} bytes/s)")
        self._waited, self._received = 0.0, 0

    def release(self) -> None:
        """The association is over: give the read buffer back for the next channel; this
        one reads nothing more."""
        buf = self._buf
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        if len(buf) == _BUFFER_SIZE and len(_SPARE) < _SPARE_MOST:
            _SPARE.append(buf)

    def _plain(self) -> "select.poll | None":
        """The poll object of a plain socket, switched to non-blocking mode at its first use
        (None: a TLS socket, which keeps socket timeouts)."""
        if self.sock is not self._timed_sock:
            self._timed_sock, self._timeout = self.sock, -1.0
            self._poll = None
            if not isinstance(self.sock, ssl.SSLSocket):
                self.sock.setblocking(False)
                self._poll = select.poll()
                self._poll.register(self.sock, select.POLLIN)
        return self._poll

    def _set_timeout(self, timeout: float | None) -> None:
        # settimeout() costs an ioctl each call; most calls repeat the previous value.
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def _quickack(self) -> None:
        if self.quickack:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:  # a tuning option never ends a connection
                self.quickack = False

    def _recv(self, timeout: float | None) -> int | None:
        """recv_into the free part of the buffer within `timeout`: the byte count (0: the
        peer closed), None when poll() said readable but nothing came (wait again).  Raises
        TimeoutError and OSError as a blocking socket's recv_into does."""
        free = self._view[self._end:]
        poll = self._plain()
        if poll is None:
            self._set_timeout(timeout)
            self._quickack()
            return self.sock.recv_into(free)
        if not self._sent:  # what the peer sent may well be here: one system call then
            try:
                return self.sock.recv_into(free)
            except BlockingIOError:
                pass
        self._sent = False
        # About to wait: ACK now what came so far (a Nagle sender holds its tail until then).
        self._quickack()
        if not poll.poll(None if timeout is None else timeout * 1000):
            raise TimeoutError
        try:
            return self.sock.recv_into(free)
        except BlockingIOError:
            return None

    # -- reading -------------------------------------------------------------------------
    def _fill(self, deadline: float | None) -> None:
        """Read at least one more byte into the buffer (compacting it when full)."""
        if self._end == len(self._buf):
            if self._start == 0:  # pragma: no cover - callers never ask for more than the buffer
                raise ProtocolError("internal: read buffer overflow")
            remaining = self._end - self._start
            self._buf[:remaining] = self._view[self._start:self._end]
            self._start, self._end = 0, remaining
        while True:
            timeout = self.io_timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout("timed out waiting for the peer")
                timeout = left if timeout is None else min(timeout, left)
            window_ends = False
            if self._armed:
                left = self.window - self._waited
                if timeout is None or left < timeout:
                    timeout, window_ends = max(left, 0.001), True
            started = time.monotonic()
            try:
                n = self._recv(timeout)
            except TimeoutError:
                if not window_ends:
                    raise PeerTimeout("timed out waiting for the peer") from None
                self._waited = self.window
                self._check_rate()  # raises, or the next window begins: wait on
                continue
            except OSError as exc:
                raise PeerClosed(f"connection lost: {exc.strerror or exc}") from None
            if n is None:  # a readiness without data: count the wait, wait again
                if self._armed:
                    self._waited += time.monotonic() - started
                continue
            if n == 0:
                raise PeerClosed("peer closed the connection")
            self._end += n
            self.received += n
            if self._armed:
                self._waited += time.monotonic() - started
                self._received += n
                if self._waited >= self.window:
                    self._check_rate()
            return

    def pending(self) -> bool:
        """Whether the peer has sent bytes not read yet (buffered here, in TLS, or in the
        socket), without blocking."""
        if self._end > self._start:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        poll = self._plain()
        if poll is not None:
            return bool(poll.poll(0))
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def read_exact(self, n: int, deadline: float | None = None) -> bytes:
        """Return exactly n bytes (n must not exceed the buffer size)."""
        while self._end - self._start < n:
            if len(self._buf) - self._start < n:
                remaining = self._end - self._start
                self._buf[:remaining] = self._view[self._start:self._end]
                self._start, self._end = 0, remaining
            self._fill(deadline)
        data = bytes(self._view[self._start:self._start + n])
        self._start += n
        return data

    def stream(self, n: int, sink: Callable[[memoryview], object]) -> None:
        """Pass the next n bytes to `sink` in pieces, without holding them all in memory."""
        while n > 0:
            if self._start == self._end:
                self._start = self._end = 0
                self._fill(None)
            take = min(n, self._end - self._start)
            sink(self._view[self._start:self._start + take])
            self._start += take
            n -= take

    def skip(self, n: int) -> None:
        """Discard the next n bytes."""
        self.stream(n, lambda _chunk: None)

    def has_data(self, timeout: float) -> bool:
        """Is the peer's next byte here, or within `timeout` seconds?  Only a look: nothing
        is read (and an error is left for the next read to report)."""
        if self._end > self._start:
            return True
        pending = getattr(self.sock, "pending", None)  # TLS: bytes already decrypted
        if pending is not None and pending():
            return True
        try:
            poll = self._plain()
            if poll is not None:
                return bool(poll.poll(timeout * 1000))
            readable, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def read_pdu_header(self, deadline: float | None = None) -> tuple[int, int]:
        """Wait (until `deadline`) for the next PDU and return (type, length).

        Once its first byte is here, the rest is on its way: the minimum rate applies (arm).
        """
        if self._end == self._start:
            self._fill(deadline)
        self.arm()
        pdu_type, length = _HEADER.unpack(self.read_exact(_HEADER.size, deadline))
        return pdu_type, length

    def read_pdv_header(self) -> tuple[int, int, int]:
        """Return (item length, presentation context ID, message control header)."""
        length, context_id, control = _PDV_HEADER.unpack(self.read_exact(_PDV_HEADER.size))
        return length, context_id, control

    # -- writing -------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Send one whole PDU, bounded by the I/O timeout."""
        self._sent = True
        try:
            if self._plain() is None:
                self._set_timeout(self.io_timeout)
                self.sock.sendall(data)
            else:
                self._send_plain(data)
        except TimeoutError:
            raise PeerTimeout("timed out sending to the peer") from None
        except OSError as exc:
            raise PeerClosed(f"connection lost: {exc.strerror or exc}") from None

    def _send_plain(self, data: bytes) -> None:
        """sendall on the non-blocking socket: the I/O timeout bounds the whole PDU, as it
        bounds a blocking sendall."""
        view = memoryview(data)
        deadline: float | None = None
        writable: select.poll | None = None
        while view:
            try:
                view = view[self.sock.send(view):]
                continue
            except BlockingIOError:
                pass
            if writable is None:  # the peer is not reading: rare, set up the wait now
                writable = select.poll()
                writable.register(self.sock, select.POLLOUT)
                if self.io_timeout is not None:
                    deadline = time.monotonic() + self.io_timeout
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not writable.poll(
                    None if left is None else left * 1000):
                raise TimeoutError


def encode_pdu(pdu_type: int, body: bytes) -> bytes:
    """Wrap a PDU body in its 6-byte header."""
    return _HEADER.pack(pdu_type, len(body)) + body


def encode_p_data(context_id: int, command: bytes, max_pdu: int, *,
                  is_command: bool = True) -> bytes:
    """A command set (or with `is_command` False a data set) as one or more P-DATA-TF PDUs,
    each within the peer's maximum length.

    `max_pdu` is the peer's Maximum Length Received (0 means unlimited).
    """
    limit = max_pdu if max_pdu else len(command) + 6
    chunk = max(limit - 6, 1)  # PDV item: 4-byte length, context ID, control header
    kind = PDV_COMMAND if is_command else 0x00
    out = bytearray()
    for offset in range(0, len(command), chunk):
        piece = command[offset:offset + chunk]
        last = offset + chunk >= len(command)
        pdv = _PDV_HEADER.pack(len(piece) + 2, context_id,
                               kind | (PDV_LAST if last else 0)) + piece
        out += encode_pdu(P_DATA_TF, pdv)
    return bytes(out)


def encode_release_rp() -> bytes:
    """An A-RELEASE-RP PDU."""
    return encode_pdu(A_RELEASE_RP, b"\x00\x00\x00\x00")


def encode_abort(source: int, reason: int) -> bytes:
    """An A-ABORT PDU from `source` (ABORT_SOURCE_*) for `reason` (ABORT_REASON_* and the
    other ABORT_* reasons; ABORT_REASON_NOT_SIGNIFICANT from the service user)."""
    return encode_pdu(A_ABORT, bytes((0, 0, source, reason)))
