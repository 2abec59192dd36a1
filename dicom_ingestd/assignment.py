"""What crosses the fork: everything one association needs, and the Session made from it.

The master builds an `Assignment` for each admitted connection; a warm worker (warm.py)
rebuilds it in its own process from the hand-off (handoff.py), a thread of the master
(process_model = single, running.py) takes it as it is; either turns it into the association's
`Session` with `session_for`.  Nothing else of the master's state reaches an association.
"""

import os
import socket
import ssl
from dataclasses import dataclass

from dicom_ingestd import ipc, outbox, telemetry
from dicom_ingestd.config.schema import Config
from dicom_ingestd.peer import Peer
from dicom_ingestd.worker.recorder import Recorder
from dicom_ingestd.worker.session import Session
from dicom_ingestd.worker.store import Store


@dataclass(frozen=True, slots=True)
class Assignment:
    """Everything one association needs; nothing else of the master's state reaches it."""

    conn: socket.socket
    peer: Peer  # the client; behind a PROXY protocol balancer, the address it carried
    config: Config
    store: Store
    reject_over_limit: str  # non-empty: the limit that was hit; answer A-ASSOCIATE-RJ
    tls_context: ssl.SSLContext | None = None  # [tls]: the worker does the handshake
    association: str = ""  # unique key of the association (outbox records, study tracking)
    outbox_fd: int = -1  # the outbox directory when [events] are on (outbox.py)
    counters: ipc.Channel | None = None  # per-association figures for the master


def session_for(assignment: Assignment, channel: ipc.Channel,
                link: ipc.SyncWait | None = None) -> Session:
    """The association handler.  Each stored object's event record goes to the outbox before
    its response (worker/recorder.py), and a datagram to the master over `channel`; with
    events.exec_sync, over its own `link`, the association waits after each object's response
    (as storescp -xs) until the master says the object's jobs are finished."""
    config = assignment.config
    writer = None
    if assignment.outbox_fd >= 0:
        writer = outbox.Writer(assignment.outbox_fd, config.storage.fsync)
    # The datagrams only wake the master's outbox consumer (and tell it about storage
    # commitment requests): without an outbox they would cost the master two wake-ups per
    # association for nothing.
    recorder = Recorder(channel if assignment.outbox_fd >= 0 else None,
                        assignment.association, writer, link,
                        float(config.events.exec_sync_timeout))
    return Session(assignment.conn, assignment.peer, config, assignment.store,
                   recorder=recorder, over_limit=assignment.reject_over_limit,
                   tls_context=assignment.tls_context,
                   reporter=telemetry.Reporter(assignment.counters.send, os.getpid())
                   if assignment.counters is not None else None)
