"""Master ⇄ warm worker: handing over an accepted connection, and hearing back.

A warm worker (pool.py, warm.py) is forked before any connection arrives and waits on its
end of a SOCK_SEQPACKET socket pair.  For each association the master sends one `Assignment`:
a fixed-size record with the connection's descriptor attached (SCM_RIGHTS), and the exec_sync
link's second when events.exec_sync is on.  The worker answers `Finished` when the
association is over, saying whether it can serve another.  It does not say when it took the
connection: the master keeps a descriptor of the worker's end, so an assignment a worker
died without receiving is still there to take back and hand on (pool.py).

Every message is a fixed-size struct whose first byte is its type; text fields are ASCII of
bounded length (peer addresses, as accept() or a trusted proxy's header gave them, and
association keys made from counters), so nothing a peer sends can grow or shape a message.
A leaf module: stdlib only.
"""

import array
import contextlib
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum

from dicom_ingestd.codes import Ending
from dicom_ingestd.peer import Peer, Via


class Kind(IntEnum):
    ASSIGNMENT = 1
    # 2 was TAKEN (the worker holds the connection), which the master no longer needs.
    FINISHED = 3


class Verdict(IntEnum):
    """Whether the worker may serve another association, and if not, why (for the log)."""

    REUSABLE = 0
    LAST = 1  # workers.max_associations_per_worker reached
    NOT_RELEASED = 2  # aborted, rejected, timed out, closed or refused: never reused
    FAILED_STORE = 3  # a C-STORE answered with a failure status
    TLS = 4  # served a TLS peer (its session state stays in the process)
    DESCRIPTORS = 5  # a descriptor more or less than when it was warm
    THREADS = 6  # a thread is still running
    MEMORY = 7  # grew beyond warm.MEMORY_GROWTH since it was warm

    def describe(self) -> str:
        return _VERDICT_TEXT[self]


_VERDICT_TEXT = {
    Verdict.REUSABLE: "clean, reusable",
    Verdict.LAST: "served workers.max_associations_per_worker associations",
    Verdict.NOT_RELEASED: "its association did not end with A-RELEASE",
    Verdict.FAILED_STORE: "a C-STORE failed",
    Verdict.TLS: "it served a TLS peer",
    Verdict.DESCRIPTORS: "its open descriptors differ from when it was warm",
    Verdict.THREADS: "a thread is still running in it",
    Verdict.MEMORY: "its memory grew too much",
}

KEY_BYTES = 64  # association keys: "<boot time hex>-<counter>", ~25 characters
HOST_BYTES = 64  # an IPv6 address with a zone is at most 45 characters
PEER_BYTES = 128  # "[IPv6 address]:port" is at most 54 characters
REASON_BYTES = 256  # the limit that was hit, for the A-ASSOCIATE-RJ log line
OUTCOME_BYTES = 16  # an Ending's text: released, aborted-by-peer, tls-refused ...
_VIAS = tuple(Via)

# type, generation, peer port (-1: none), how the peer was learnt (index in _VIAS),
# association key, peer host, proxy ("address:port" or empty), the limit hit
_ASSIGNMENT = struct.Struct(f"!BxxxIiBxxx{KEY_BYTES}s{HOST_BYTES}s{PEER_BYTES}s"
                            f"{REASON_BYTES}s")
_FINISHED = struct.Struct(f"!BBxxI{KEY_BYTES}s{OUTCOME_BYTES}s")
MAX_MESSAGE = max(_ASSIGNMENT.size, _FINISHED.size)
MAX_FDS = 2
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def _text(value: str, size: int) -> bytes:
    return value.encode("ascii", "replace")[:size]


def _untext(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class Assignment:
    """Serve the association on the attached connection.

    `generation` is the configuration generation the master hands it under (a worker forked
    under another one refuses it); `over_limit` non-empty: answer A-ASSOCIATE-RJ, that limit
    was hit.  `with_link`: a second descriptor, the exec_sync link, is attached.
    """

    generation: int
    association: str
    peer: Peer
    over_limit: str = ""

    def encode(self) -> bytes:
        peer = self.peer
        return _ASSIGNMENT.pack(Kind.ASSIGNMENT, self.generation,
                                -1 if peer.port is None else peer.port, _VIAS.index(peer.via),
                                _text(self.association, KEY_BYTES), _text(peer.host, HOST_BYTES),
                                _text(peer.proxy, PEER_BYTES),
                                _text(self.over_limit, REASON_BYTES))


@dataclass(frozen=True, slots=True)
class Finished:
    """The association is over (`outcome`: how it ended); `verdict`: may the worker serve
    another one; `served`: associations it has served."""

    association: str
    outcome: Ending
    verdict: Verdict
    served: int

    def encode(self) -> bytes:
        return _FINISHED.pack(Kind.FINISHED, self.verdict, self.served,
                              _text(self.association, KEY_BYTES),
                              _text(self.outcome, OUTCOME_BYTES))


Message = Assignment | Finished


def decode(data: bytes) -> Message | None:
    """The message in `data`, or None for anything malformed."""
    try:
        if len(data) == _ASSIGNMENT.size and data[0] == Kind.ASSIGNMENT:
            _, generation, port, via, key, host, proxy, reason = _ASSIGNMENT.unpack(data)
            if via >= len(_VIAS):
                return None
            peer = Peer(_untext(host), None if port < 0 else port, _VIAS[via], _untext(proxy))
            return Assignment(generation, _untext(key), peer, _untext(reason))
        if len(data) == _FINISHED.size and data[0] == Kind.FINISHED:
            _, verdict, served, key, outcome = _FINISHED.unpack(data)
            return Finished(_untext(key), Ending(_untext(outcome)), Verdict(verdict), served)
    except ValueError:  # an unknown verdict or ending
        return None
    return None


def pair() -> tuple[socket.socket, socket.socket]:
    """(master end, worker end) of a new control channel."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return master_end, worker_end


def send(sock: socket.socket, message: Message, fds: list[int] | None = None) -> None:
    """Send one message (with `fds` attached); raises OSError (EPIPE: the other end is gone,
    EAGAIN: never for our one-message-at-a-time exchange)."""
    data = message.encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def receive(sock: socket.socket, flags: int = 0) -> tuple[Message | None, list[int], bool]:
    """One message: (message or None when malformed, attached descriptors, end of stream).

    Raises BlockingIOError on a non-blocking socket (or with MSG_DONTWAIT in `flags`) with
    nothing to read.  Descriptors that came with a malformed or truncated message are
    closed, never returned half.
    """
    fds = array.array("i")
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, _ANCILLARY, flags)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not data and not fds:
        return None, [], True
    message = decode(data)
    if message is None or flags & _TRUNCATED:
        for fd in fds:
            with contextlib.suppress(OSError):
                socket.close(fd)
        return None, [], False
    return message, list(fds), False
