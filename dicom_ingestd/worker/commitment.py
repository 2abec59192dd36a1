"""The Storage Commitment Push Model SCP on one association (PS3.4 J.3): N-ACTION in,
N-ACTION-RSP out, and the report on this association when the sender waits for it.

A request is validated, then recorded durably in the commitment spool (commitment/spool.py)
before its success response, exactly as an object is stored before its C-STORE response:
the master evaluates it, in order after every object record written before it, and writes
the report.  The association then waits, at most storage_commitment.same_association_wait
seconds and only while the sender sends nothing else, for that report, and sends it as an
N-EVENT-REPORT-RQ; the sender's success answer, within answer_wait() seconds, makes it
delivered.  Whatever else happens (the sender releases, goes on, answers with a failure,
answers too late or never, the wait ends), the master's job delivers the report on a new
association: at least once, never lost.  The master holds the job back only as long
(jobs/commitment.py), so a sender that keeps the association busy without answering cannot
keep its report waiting.

A malformed request is answered with its failure status and nothing else is done: nothing is
recorded and the association goes on.
"""

import contextlib
import itertools
import logging
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dicom_ingestd import ipc
from dicom_ingestd.codes import status_name
from dicom_ingestd.commitment.dataset import (
    ACTION_REQUEST,
    SOP_CLASS,
    SOP_INSTANCE,
    InvalidAction,
    Reference,
    encode_event_information,
    read_action_information,
    valid_uid,
)
from dicom_ingestd.commitment.spool import RequestHeader, Spool, SpoolError, new_request_id
from dicom_ingestd.commitment.waits import answer_wait
from dicom_ingestd.config.schema import Config
from dicom_ingestd.dicom import dimse
from dicom_ingestd.dicom.pdu import Channel, encode_p_data
from dicom_ingestd.worker.acceptor import AcceptedContext

log = logging.getLogger("dicom_ingestd.association")

BYTES_PER_REFERENCE = 160  # an item with two 64-character UIDs takes 152 bytes explicit VR
DATA_SET_SLACK = 1 << 16
POLL = 0.02  # seconds between two looks for the report while the sender waits

# N-ACTION-RSP statuses (PS3.4 J.3.2.1.1, PS3.7 C).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ARGUMENT = 0x0115
NO_SUCH_SOP_CLASS = 0x0118
NO_SUCH_ACTION = 0x0123
NOT_AUTHORIZED = 0x0124
RESOURCE_LIMITATION = 0x0213


def data_set_limit(config: Config) -> int:
    """The most bytes of an N-ACTION data set held in memory."""
    return config.storage_commitment.max_references * BYTES_PER_REFERENCE + DATA_SET_SLACK


class Action:
    """An N-ACTION-RQ whose data set is being received: held up to `limit` bytes; beyond,
    the rest is read and dropped (the request is then refused, memory stays bounded)."""

    def __init__(self, command: dimse.Command, context: AcceptedContext, limit: int) -> None:
        self.command = command
        self.context = context
        self.limit = limit
        self.data = bytearray()
        self.bytes = 0
        self.too_large = False

    def write(self, chunk: memoryview) -> None:
        if self.too_large:
            return
        if len(self.data) + len(chunk) > self.limit:
            self.too_large = True
            self.data = bytearray()
            return
        self.data += chunk


@dataclass(frozen=True, slots=True)
class _Sent:
    """A report sent on this association, waiting for its N-EVENT-REPORT-RSP."""

    request_id: str
    transaction_uid: str
    committed: int
    failed: int
    deadline: float  # time.monotonic()


@dataclass(frozen=True, slots=True)
class Answer:
    """The N-ACTION-RSP to send, and the recorded request (success only)."""

    status: int
    why: str
    request_id: str = ""
    transaction_uid: str = ""
    count: int = 0


class _TooMany(Exception):
    pass


class CommitmentSCP:
    """One association's Storage Commitment SCP (see the module docstring).

    `outbox_fd` is the outbox directory the worker was handed (-1: the master keeps no
    state directory); the spool is beside it.  `notes` tells the master (ipc).
    """

    def __init__(self, config: Config, outbox_fd: int, association: str,
                 notes: Callable[[ipc.CommitmentNote], None] | None) -> None:
        self.config = config
        self.settings = config.storage_commitment
        self.association = association
        self.notes = notes
        self._outbox_fd = outbox_fd
        self._spool: Spool | None = None
        self._numbers = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._sent: dict[int, _Sent] = {}  # by message ID
        self._expired: dict[int, str] = {}  # message ID -> transaction (no answer in time)

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _open_spool(self) -> Spool:
        if self._spool is None:
            if self._outbox_fd < 0:
                raise OSError("the daemon keeps no state directory (restart it after "
                              "enabling storage_commitment)")
            self._spool = Spool.beside_outbox(self._outbox_fd, self.config.storage.fsync)
        return self._spool

    def _note(self, request_id: str, step: ipc.CommitmentStep) -> None:
        if self.notes is not None:
            self.notes(ipc.CommitmentNote(self.association, request_id, step))

    # -- the request ---------------------------------------------------------------------
    def begin(self, command: dimse.Command, context: AcceptedContext) -> Action:
        return Action(command, context, data_set_limit(self.config))

    def answer(self, action: Action, calling_ae: str, called_ae: str, peer: str) -> Answer:
        """Validate the request and record it (see the module docstring)."""
        command, settings = action.command, self.settings
        if not settings.enabled:
            return Answer(PROCESSING_FAILURE, "storage commitment is not enabled "
                          "(storage_commitment.enabled)")
        if command.sop_class_uid != SOP_CLASS:
            return Answer(NO_SUCH_SOP_CLASS, f"Requested SOP Class UID "
                          f"{command.sop_class_uid!r} is not {SOP_CLASS}")
        if command.sop_instance_uid != SOP_INSTANCE:
            return Answer(NO_SUCH_SOP_INSTANCE if valid_uid(command.sop_instance_uid)
                          else INVALID_ARGUMENT, f"Requested SOP Instance UID "
                          f"{command.sop_instance_uid!r} is not the well-known {SOP_INSTANCE}")
        if command.action_type != ACTION_REQUEST:
            return Answer(NO_SUCH_ACTION, f"Action Type ID {command.action_type} is not 1 "
                          "(request storage commitment)")
        if settings.allowed_calling_aetitles and \
                calling_ae not in settings.allowed_calling_aetitles:
            return Answer(NOT_AUTHORIZED, f"calling AE title {calling_ae!r} may not request "
                          "storage commitment (storage_commitment.allowed_calling_aetitles)")
        if not command.has_data_set:
            return Answer(INVALID_ARGUMENT, "no Action Information (the N-ACTION has no data "
                          "set)")
        if action.too_large:
            return Answer(RESOURCE_LIMITATION, f"the request's data set exceeds {action.limit} "
                          f"bytes (storage_commitment.max_references = "
                          f"{settings.max_references})")
        try:
            transaction, references = read_action_information(
                action.data, action.context.transfer_syntax)
        except InvalidAction as exc:
            return Answer(INVALID_ARGUMENT, str(exc))
        count = 0

        def counted() -> Iterator[Reference]:
            nonlocal count
            for ref in references:
                count += 1
                if count > settings.max_references:
                    raise _TooMany
                yield ref

        request_id = new_request_id(self.association, next(self._numbers))
        try:
            spool = self._open_spool()
            used = spool.size()
            if used > settings.max_spool_size:
                return Answer(RESOURCE_LIMITATION, f"the state directory holds {used} bytes "
                              "of storage commitment requests and undelivered reports, more "
                              "than storage_commitment.max_spool_size = "
                              f"{settings.max_spool_size}")
            header = RequestHeader(request_id, transaction, calling_ae, called_ae, peer,
                                   self.association, time.time())
            spool.write_request(header, counted())
        except InvalidAction as exc:
            return Answer(INVALID_ARGUMENT, str(exc))
        except _TooMany:
            return Answer(RESOURCE_LIMITATION, f"more than {settings.max_references} "
                          "references (storage_commitment.max_references)")
        except OSError as exc:
            return Answer(RESOURCE_LIMITATION, "cannot record the request in the state "
                          f"directory: {exc.strerror or exc}")
        self._note(request_id, ipc.CommitmentStep.REQUESTED)
        return Answer(SUCCESS, "", request_id, transaction, count)

    # -- the report on this association ----------------------------------------------------
    def report_here(self, answer: Answer, context: AcceptedContext, channel: Channel,
                    peer_max_pdu: int, who: str) -> None:
        """Wait (bounded, see the module docstring) for the report of `answer` and send it
        on this association; otherwise leave it to the master's job."""
        wait = self.settings.same_association_wait
        spool = self._spool
        if spool is None or not wait:
            self._note(answer.request_id, ipc.CommitmentStep.UNDELIVERED)
            return
        deadline = time.monotonic() + wait
        while not spool.report_exists(answer.request_id):
            left = deadline - time.monotonic()
            if left <= 0 or channel.pending():
                log.info("%s: storage commitment report of transaction %s not sent on this "
                         "association (%s); it goes on a new association", who,
                         answer.transaction_uid, "the sender went on" if left > 0 else
                         f"not ready within {wait} s")
                self._note(answer.request_id, ipc.CommitmentStep.UNDELIVERED)
                return
            with contextlib.suppress(OSError, ValueError):
                select.select([channel.sock], [], [], min(POLL, left))
        try:
            report, results = spool.read_report(answer.request_id)
        except (OSError, SpoolError) as exc:
            log.error("%s: cannot read the storage commitment report of transaction %s: %s; "
                      "it goes on a new association", who, answer.transaction_uid, exc)
            self._note(answer.request_id, ipc.CommitmentStep.UNDELIVERED)
            return
        event_type, data = encode_event_information(report.transaction_uid, results,
                                                    context.transfer_syntax)
        message_id = next(self._message_ids) & 0xFFFF
        command = dimse.encode_event_report(message_id, SOP_CLASS, SOP_INSTANCE, event_type)
        self._sent[message_id] = _Sent(answer.request_id, report.transaction_uid,
                                       report.committed, report.failed,
                                       time.monotonic() + answer_wait(self.config))
        channel.send(encode_p_data(context.context_id, command, peer_max_pdu))
        channel.send(encode_p_data(context.context_id, data, peer_max_pdu, is_command=False))
        log.debug("%s: storage commitment report of transaction %s sent on this association "
                  "(event type %d), waiting for its answer", who, report.transaction_uid,
                  event_type)

    def overdue(self, who: str) -> None:
        """Give up on the reports whose answer did not come in time (see answer_wait): they
        go on a new association (the master would release them by itself)."""
        if not self._sent:
            return
        now = time.monotonic()
        for message_id, sent in list(self._sent.items()):
            if now >= sent.deadline:
                del self._sent[message_id]
                self._expired[message_id] = sent.transaction_uid
                if len(self._expired) > 100:  # a sender that never answers: bounded
                    self._expired.pop(next(iter(self._expired)))
                log.warning("%s: no answer to the storage commitment report of transaction %s "
                            "(message ID %d) within %g s on the requesting association; it "
                            "goes on a new association", who, sent.transaction_uid, message_id,
                            answer_wait(self.config))
                self._note(sent.request_id, ipc.CommitmentStep.UNDELIVERED)

    def answered(self, command: dimse.Command, who: str,
                 fields: Callable[..., dict[str, object]]) -> None:
        """An N-EVENT-REPORT-RSP: the answer to one of our reports, or one that answers none
        (logged and ignored: the report it may have meant goes on a new association)."""
        self.overdue(who)
        sent = self._sent.pop(command.message_id, None)
        status = command.status if command.status is not None else -1
        if sent is None:
            late = self._expired.pop(command.message_id, None)
            if late is not None:
                log.info("%s: the answer to the storage commitment report of transaction %s "
                         "(message ID %d) came too late; the report goes on a new association "
                         "anyway", who, late, command.message_id,
                         extra=fields(DICOM_TRANSACTION_UID=late))
                return
            waiting = ", ".join(f"{n} (transaction {s.transaction_uid})"
                                for n, s in self._sent.items()) or "none"
            log.warning("%s: ignoring an N-EVENT-REPORT-RSP for message ID %d: no storage "
                        "commitment report sent on this association has that message ID "
                        "(reports waiting for an answer: %s)", who, command.message_id,
                        waiting, extra=fields(DICOM_STATUS=f"0x{status:04X}"))
            return
        extra = fields(DICOM_TRANSACTION_UID=sent.transaction_uid,
                       DICOM_STATUS=f"0x{status:04X}")
        if status == SUCCESS:
            log.info("%s: storage commitment report sent for transaction %s on the requesting "
                     "association: %d committed, %d failed", who, sent.transaction_uid,
                     sent.committed, sent.failed, extra=extra)
            self._note(sent.request_id, ipc.CommitmentStep.DELIVERED)
        else:
            log.warning("%s: the sender answered the storage commitment report of transaction "
                        "%s with %s; it goes again on a new association", who,
                        sent.transaction_uid,
                        status_name(status) if status >= 0 else "no status", extra=extra)
            self._note(sent.request_id, ipc.CommitmentStep.UNDELIVERED)


