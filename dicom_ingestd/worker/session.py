"""One association, start to end, on one connected socket: the acceptor's whole life cycle.

Synchronous and free of global state, so the same code runs in a thread (single-process mode)
or in a forked worker.  Here: the upper layer (association, release, abort, PDUs) and the
DIMSE dispatch; each service is a class of its own: C-STORE in cstore.py, storage commitment's
N-ACTION in commitment.py, C-ECHO (one response) here.
"""

import contextlib
import logging
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any

from dicom_ingestd.codes import Ending, Status
from dicom_ingestd.commitment.dataset import SOP_CLASS as COMMITMENT
from dicom_ingestd.commitment.dataset import SOP_INSTANCE as COMMITMENT_INSTANCE
from dicom_ingestd.config.schema import Config
from dicom_ingestd.dicom import dimse
from dicom_ingestd.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    ABORT_REASON_NOT_SIGNIFICANT,
    ABORT_REASON_NOT_SPECIFIED,
    ABORT_SOURCE_SERVICE_PROVIDER,
    ABORT_SOURCE_SERVICE_USER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU,
    P_DATA_TF,
    PDU_NAMES,
    PDV_COMMAND,
    PDV_LAST,
    Channel,
    PeerClosed,
    PeerTimeout,
    ProtocolError,
    UserAbort,
    encode_abort,
    encode_p_data,
    encode_release_rp,
)
from dicom_ingestd.peer import Peer, resolve
from dicom_ingestd.sockets import set_tcp_option
from dicom_ingestd.telemetry import Reporter
from dicom_ingestd.worker import acceptor, commitment, tls
from dicom_ingestd.worker.cstore import IncomingObject, StorageSCP, journal_extra
from dicom_ingestd.worker.recorder import Recorder
from dicom_ingestd.worker.store import Store

log = logging.getLogger("dicom_ingestd.association")

MAX_ASSOCIATE_RQ = 1 << 17  # 128 contexts of long UIDs fit in ~40 KiB; more is abuse
MAX_SMALL_PDU = 64  # A-RELEASE-RQ and A-ABORT bodies are 4 bytes; longer ones are not read
VERIFICATION = "1.2.840.10008.1.1"


@dataclass(slots=True)
class Outcome:
    """How the association ended, for the caller's bookkeeping."""

    how: Ending = Ending.CLOSED
    stored: int = 0
    failed: int = 0
    bytes_stored: int = 0


class Session:
    """Serve one association on `sock`, then close it.  `run()` never raises."""

    def __init__(self, sock: socket.socket, peer: Peer, config: Config, store: Store,
                 recorder: Recorder | None = None,
                 over_limit: str = "", tls_context: ssl.SSLContext | None = None,
                 reporter: Reporter | None = None) -> None:
        self.sock = sock
        self.reporter = reporter  # counters for the master (telemetry)
        self.tls_context = tls_context  # set: handshake first ([tls] enabled)
        self.tls_peer: tls.Peer | None = None
        self.over_limit = over_limit  # non-empty: reject as transient, local limit exceeded
        self.peer = peer
        # The proxy's own connection (PROXY protocol LOCAL) may only verify.  A clean health
        # check (connect and close, or associate for Verification, echo, release) comes
        # every few seconds: its lines are debug, its outcome is counted as a health check.
        # Anything else on it is at info or above (the first thing that is not drops this).
        self._quiet = peer.verification_only
        self.config = config
        self.store = store
        self.recorder = recorder
        net = config.network
        self.channel = Channel(sock, float(net.socket_timeout) or None, net.tcp_nodelay,
                               net.min_transfer_rate)
        self.calling_ae = "?"
        self.called_ae = "?"
        self.peer_max_pdu = 0
        self.contexts: dict[int, acceptor.AcceptedContext] = {}
        self.outcome = Outcome()
        self._command = bytearray()
        self._rejected = ""  # the rejected presentation contexts, for the peer-abort line
        self._any_command = False
        self._current: IncomingObject | commitment.Action | None = None
        self._storage: StorageSCP | None = None  # at its first C-STORE
        self._commitment: commitment.CommitmentSCP | None = None  # at its first N-ACTION

    # -- logging -------------------------------------------------------------------------
    @property
    def _info(self) -> int:
        return logging.DEBUG if self._quiet else logging.INFO

    def _who(self) -> str:
        return f"{self.peer} {self.calling_ae}->{self.called_ae}"

    def _journal(self) -> dict[str, object]:
        """The journal fields naming the association."""
        fields: dict[str, object] = {**self.peer.fields(),
                                     "DICOM_CALLING_AE": self.calling_ae,
                                     "DICOM_CALLED_AE": self.called_ae}
        if self.tls_peer is not None:
            fields["DICOM_TLS_SUBJECT"] = self.tls_peer.subject or "-"
        return fields

    def _fields(self, **more: object) -> dict[str, object]:
        return journal_extra(self._journal(), more)

    def _log(self, level: int, message: str, *args: object, **more: object) -> None:
        """One line about this association, `message` prefixed with who it is; the prefix
        and the journal fields (`more` added) are built only when the line is emitted: most
        per-association lines are below logging.level on a busy receiver."""
        if log.isEnabledFor(level):
            log.log(level, "%s: " + message, self._who(), *args, extra=self._fields(**more))

    # -- life cycle ----------------------------------------------------------------------
    def run(self) -> Outcome:
        try:
            if not self.config.network.disable_host_lookup:
                self.peer = resolve(self.peer)
            self._configure_socket()
            if self.tls_context is not None:
                self.sock, self.tls_peer = tls.handshake(
                    self.sock, self.tls_context, self.config.tls,
                    float(self.config.network.acse_timeout))
                self.channel.sock = self.sock
            if self._associate():
                try:
                    self._serve()
                finally:  # before the outcome is logged: tests watch the log, then staging
                    self._close_storage()
        except tls.TLSRefused as exc:
            log.warning("%s: %s; connection closed", self.peer, exc,
                        extra=self._fields(DICOM_OUTCOME=Ending.TLS_REFUSED))
            self.outcome.how = Ending.TLS_REFUSED
        except UserAbort as exc:
            self._log(logging.WARNING, "aborting association: %s", exc)
            self._send_quietly(encode_abort(ABORT_SOURCE_SERVICE_USER,
                                            ABORT_REASON_NOT_SIGNIFICANT))
            self.outcome.how = Ending.ABORTED
        except ProtocolError as exc:
            self._log(logging.WARNING, "protocol error, sending A-ABORT: %s", exc)
            self._send_quietly(encode_abort(ABORT_SOURCE_SERVICE_PROVIDER, exc.reason))
            self.outcome.how = Ending.ABORTED
        except PeerTimeout as exc:
            self._log(logging.WARNING, "%s; dropping the association", exc)
            self._send_quietly(encode_abort(ABORT_SOURCE_SERVICE_PROVIDER,
                                            ABORT_REASON_NOT_SPECIFIED))
            self.outcome.how = Ending.TIMEOUT
        except PeerClosed as exc:
            level = logging.WARNING if self._current or self.contexts else logging.INFO
            if self._quiet and not self.channel.received:
                # HAProxy's plain TCP check behind send-proxy-v2: the header, then close.
                level = logging.DEBUG
            else:
                self._quiet = False
            self._log(level, "%s%s", exc, " during a C-STORE; the partial object was discarded"
                      if self._current else "")
            self.outcome.how = Ending.CLOSED
        except Exception:  # a bug: log it with its traceback, keep the daemon serving
            log.exception("%s: internal error; aborting the association", self._who())
            self._send_quietly(encode_abort(ABORT_SOURCE_SERVICE_PROVIDER,
                                            ABORT_REASON_NOT_SPECIFIED))
            self.outcome.how = Ending.ABORTED
        finally:
            self._current = None
            self._close_storage()
            if self._commitment is not None:
                self._commitment.close()
            if self.recorder is not None:
                self.recorder.close(self.outcome.how)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.channel.release()
            if self.reporter is not None:
                how = self.outcome.how
                if self._quiet and how in (Ending.RELEASED, Ending.CLOSED):
                    how = Ending.HEALTH_CHECK
                self.reporter.ended(how, self.peer.name, self.calling_ae)
            if self._storage is not None:
                self._storage.release_studies()
        return self.outcome

    def _configure_socket(self) -> None:
        # set_tcp_option: a Unix socket (socket activation, inetd) has no TCP options.
        if self.config.network.tcp_nodelay:
            set_tcp_option(self.sock, socket.TCP_NODELAY, 1)

    def _tls_note(self) -> str:
        peer = self.tls_peer
        if peer is None:
            return ""
        return f" over {peer.version} {peer.cipher}, peer certificate " + (
            repr(peer.subject) if peer.subject else "none")

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(PeerClosed, PeerTimeout):
            self.channel.send(data)

    def _close_storage(self) -> None:
        if self._storage is not None:
            self._storage.close()

    # -- association establishment ---------------------------------------------------------
    def _associate(self) -> bool:
        deadline = time.monotonic() + self.config.network.acse_timeout
        try:
            pdu_type, length = self.channel.read_pdu_header(deadline)
        except PeerTimeout:
            raise PeerTimeout(
                f"no A-ASSOCIATE-RQ within {self.config.network.acse_timeout} s") from None
        if pdu_type != A_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                                ABORT_UNEXPECTED_PDU)
        if length > MAX_ASSOCIATE_RQ:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes exceeds {MAX_ASSOCIATE_RQ}")
        body = self.channel.read_exact(length, deadline)
        try:
            request, primitive, version = acceptor.decode_request(
                struct.pack(">BxL", pdu_type, length) + body)
        except acceptor.RequestError as exc:
            raise ProtocolError(str(exc)) from None
        self.calling_ae, self.called_ae = request.calling_ae, request.called_ae
        self.peer_max_pdu = request.max_pdu
        if any(str(cx.abstract_syntax) != VERIFICATION for cx in request.proposed):
            self._quiet = False  # not a health check: this association is worth a line
        self._log(self._info, "association requested (%d contexts, implementation %s %s)",
                  len(request.proposed), request.implementation_class_uid or "-",
                  request.implementation_version or "-")
        rejection = acceptor.screen(request, primitive, version, self.config)
        if rejection is None and self.tls_peer is not None:
            titles = tls.allowed_calling_aetitles(self.config.tls, self.tls_peer.subject)
            if titles is not None and request.calling_ae.strip() not in titles:
                rejection = acceptor.Rejection(
                    acceptor.REJECTED_PERMANENT, acceptor.SOURCE_SERVICE_USER,
                    acceptor.REASON_CALLING_AE,
                    f"calling AE title {request.calling_ae!r} is not one of "
                    f"{', '.join(titles)} allowed for TLS peer {self.tls_peer.subject!r} "
                    "(tls.subject_aetitles)")
        if rejection is None and self.over_limit:
            rejection = acceptor.Rejection(acceptor.REJECTED_TRANSIENT,
                                           acceptor.SOURCE_PROVIDER_PRESENTATION,
                                           acceptor.REASON_LOCAL_LIMIT, self.over_limit)
        if rejection is not None:
            self._quiet = False
            self._log(logging.WARNING, "association rejected: %s", rejection.why,
                      DICOM_OUTCOME=Ending.REJECTED)
            self.channel.send(rejection.encode())
            self.outcome.how = Ending.REJECTED
            return False
        acceptance = acceptor.accept(request, primitive, self.config,
                                     verification_only=self.peer.verification_only)
        self.contexts = acceptance.contexts
        self.channel.send(acceptance.pdu)
        profile = self.config.negotiation.profile
        self._log(self._info, "association accepted (%d of %d contexts, max PDU %d%s)%s",
                  len(acceptance.contexts), len(request.proposed), request.max_pdu,
                  f", profile {profile}" if profile else "", self._tls_note(),
                  DICOM_OUTCOME="accepted")
        if acceptance.rejected:
            # Always said (not only with verbose_pc): a sender whose data fits no accepted
            # context aborts right after this, and this line is then the only clue.
            self._quiet = False
            self._rejected = rejected_summary(acceptance.rejected)
            if self.peer.verification_only:
                self._log(logging.WARNING, "%d context(s) rejected: a PROXY protocol LOCAL "
                          "connection is the proxy's own and may only use Verification "
                          "(HAProxy also relays the clients of a Unix-socket frontend as "
                          "LOCAL: carry their addresses with accept-proxy on that bind and "
                          "send-proxy-v2 towards it); rejected: %s",
                          len(acceptance.rejected), self._rejected)
            else:
                self._log(self._info, "%d context(s) rejected: %s", len(acceptance.rejected),
                          self._rejected)
        pc_level = logging.INFO if self.config.logging.verbose_pc else logging.DEBUG
        if log.isEnabledFor(pc_level):
            for cx in acceptance.contexts.values():
                log.log(pc_level, "%s:   context %d accepted: %s with %s", self._who(),
                        cx.context_id, cx.abstract_syntax, cx.transfer_syntax)
            for rcx in acceptance.rejected:
                log.log(pc_level, "%s:   context %s rejected (result %s): %s", self._who(),
                        rcx.context_id, rcx.result, rcx.abstract_syntax)
        if any(cx.abstract_syntax not in (VERIFICATION, COMMITMENT)
               for cx in self.contexts.values()):
            # Storage was accepted: the first object's file is made while the peer sends it.
            self._storage_scp().prepare()
        return True

    # -- data transfer ---------------------------------------------------------------------
    def _serve(self) -> None:
        dimse_timeout = self.config.network.dimse_timeout
        acse_timeout = self.config.network.acse_timeout
        while True:
            deadline = None
            if self._current is None and not self._command:
                # Idle between messages: the DIMSE timeout bounds the wait.
                self.channel.disarm()
                if dimse_timeout:
                    deadline = time.monotonic() + dimse_timeout
            else:  # inside a message: the peer must keep up network.min_transfer_rate
                self.channel.arm()
            pdu_type, length = self.channel.read_pdu_header(deadline)
            self.channel.arm()  # whatever the PDU, its body is on its way
            if pdu_type == P_DATA_TF:
                self._p_data(length)
            elif pdu_type == A_RELEASE_RQ:
                # Its body is 4 reserved bytes (PS3.8 9.3.6): a longer one is not read (a
                # length of 4 GiB fed one byte at a time held a worker for ever).
                if length > MAX_SMALL_PDU:
                    raise ProtocolError(f"A-RELEASE-RQ of {length} bytes (4 expected)")
                self.channel.read_exact(length, time.monotonic() + acse_timeout)
                if self._current:
                    self._log(logging.WARNING, "release requested during a C-STORE; partial "
                              "object discarded")
                self._close_storage()  # a peer that saw the release sees no temporary file
                self.channel.send(encode_release_rp())
                self.outcome.how = Ending.RELEASED
                self._log_end()
                return
            elif pdu_type == A_ABORT:
                body = b""
                if length <= MAX_SMALL_PDU:  # the peer is leaving: a short wait at most
                    with contextlib.suppress(PeerTimeout):
                        body = self.channel.read_exact(length, time.monotonic() + acse_timeout)
                source = body[2] if len(body) >= 4 else -1
                reason = body[3] if len(body) >= 4 else -1
                self.outcome.how = Ending.ABORTED_BY_PEER
                self._close_storage()
                hint = ""
                if not self._any_command and self.contexts:
                    # Typically a sender whose data (a compressed file) fits none of the
                    # accepted contexts: say what was accepted, and what was not.
                    from pydicom.uid import UID

                    accepted = sorted({UID(cx.transfer_syntax).name
                                       for cx in self.contexts.values()})
                    hint = (f"; before any request: its data may fit none of the accepted "
                            f"transfer syntaxes ({', '.join(accepted[:5])})"
                            + (f"; rejected: {self._rejected}" if self._rejected else ""))
                self._log(logging.WARNING, "association aborted by the peer (source %d, reason "
                          "%d)%s%s", source, reason,
                          "; partial object discarded" if self._current else "", hint,
                          DICOM_OUTCOME=Ending.ABORTED)
                return
            elif pdu_type in PDU_NAMES:
                raise ProtocolError(f"unexpected {PDU_NAMES[pdu_type]} during the association",
                                    ABORT_UNEXPECTED_PDU)
            else:
                raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02X}",
                                    ABORT_UNRECOGNIZED_PDU)

    def _log_end(self) -> None:
        o = self.outcome
        self._log(self._info, "association %s: %d stored, %d failed, %d bytes", o.how,
                  o.stored, o.failed, o.bytes_stored, DICOM_OUTCOME=o.how)

    def _p_data(self, length: int) -> None:
        max_pdu = self.config.network.max_pdu
        if length > max_pdu:
            raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds our maximum PDU "
                                f"length {max_pdu}")
        if self._current is not None:
            self._during_data_pdu()
        remaining = length
        while remaining:
            if remaining < 6:
                raise ProtocolError("truncated PDV item in P-DATA-TF")
            item_length, context_id, control = self.channel.read_pdv_header()
            remaining -= 4 + item_length
            if item_length < 2 or remaining < 0:
                raise ProtocolError(f"PDV item length {item_length} does not fit its P-DATA-TF")
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV for presentation context {context_id}, "
                                    "which was not accepted")
            payload = item_length - 2
            if payload % 2:
                # PS3.7 Annex F: every fragment is even.  storescp aborts the association
                # ("DIMSE: Odd Fragment Length") and keeps nothing; so do we.
                kind = "command" if control & PDV_COMMAND else "data set"
                raise UserAbort(f"odd fragment length {payload} in a {kind} PDV "
                                "(PS3.7 Annex F; storescp aborts too: \"DIMSE: Odd Fragment "
                                "Length\")" + ("; the partial object was discarded"
                                               if self._current else ""))
            if control & PDV_COMMAND:
                self._command_fragment(context_id, control, payload)
            else:
                self._data_fragment(context_id, control, payload)

    def _during_data_pdu(self) -> None:
        """Test aids that act on each P-DATA PDU of a data set, as storescp's callback does."""
        testing = self.config.testing
        if testing.abort_during:
            raise UserAbort("testing.abort_during")
        if testing.sleep_during:
            time.sleep(testing.sleep_during)

    def _command_fragment(self, context_id: int, control: int, payload: int) -> None:
        if self._current is not None:
            raise ProtocolError("command fragment while a data set is being received",
                                ABORT_UNEXPECTED_PDU)
        if len(self._command) + payload > dimse.MAX_COMMAND_SET:
            raise ProtocolError(f"command set larger than {dimse.MAX_COMMAND_SET} bytes")
        self._command += self.channel.read_exact(payload)
        if control & PDV_LAST:
            data = bytes(self._command)
            self._command.clear()
            self._dispatch(context_id, data)

    def _data_fragment(self, context_id: int, control: int, payload: int) -> None:
        current = self._current
        if current is None:
            raise ProtocolError("data set fragment without a command", ABORT_UNEXPECTED_PDU)
        if context_id != current.context.context_id:
            raise ProtocolError("data set fragment on another presentation context")
        current.bytes += payload
        if isinstance(current, commitment.Action) or current.temp is not None:
            self.channel.stream(payload, current.write)
        else:
            self.channel.skip(payload)
        if control & PDV_LAST:
            self._current = None
            if isinstance(current, commitment.Action):
                self._finish_action(current)
            else:
                self._storage_scp().finish(current)

    def _dispatch(self, context_id: int, data: bytes) -> None:
        self._any_command = True
        if self._commitment is not None:
            self._commitment.overdue(self._who())
        try:
            command = dimse.decode_command(
                data, fix_uid_padding=self.config.association.uid_padding)
        except dimse.CommandError as exc:
            raise ProtocolError(str(exc)) from None
        context = self.contexts[context_id]
        if command.field != dimse.C_ECHO_RQ:
            self._quiet = False
        if command.field == dimse.C_ECHO_RQ and context.abstract_syntax == VERIFICATION:
            self._log(self._info, "C-ECHO (message %d)", command.message_id,
                      DICOM_STATUS="0x0000")
            self._respond(context_id, dimse.C_ECHO_RSP, command.message_id, Status.SUCCESS,
                          VERIFICATION)
        elif command.field == dimse.C_STORE_RQ and command.has_data_set:
            self._current = self._storage_scp().begin(command, context)
        elif command.field == dimse.N_ACTION_RQ and context.abstract_syntax == COMMITMENT:
            action = self._commitment_scp().begin(command, context)
            if command.has_data_set:
                self._current = action
            else:
                self._finish_action(action)
        elif command.field == dimse.N_EVENT_REPORT_RSP and self._commitment is not None:
            self._commitment.answered(command, self._who(), self._fields)
        else:
            raise UserAbort(f"cannot handle {command.name} on context {context_id} "
                            f"({context.abstract_syntax})")

    def _respond(self, context_id: int, field: int, message_id: int, status: int,
                 sop_class: str, sop_instance: str = "", comment: str = "",
                 action_type: int | None = None) -> None:
        command = dimse.encode_response(field, message_id, status, sop_class, sop_instance,
                                        comment, action_type=action_type)
        self.channel.send(encode_p_data(context_id, command, self.peer_max_pdu))

    # -- C-STORE (worker/cstore.py) ----------------------------------------------------------
    def _storage_scp(self) -> StorageSCP:
        if self._storage is None:
            self._storage = StorageSCP(
                self.config, self.store, self.recorder, self.reporter, self.channel,
                self._respond, peer=self.peer, calling_ae=self.calling_ae,
                called_ae=self.called_ae, who=self._who(),
                journal=self._journal(), counts=self.outcome)
        return self._storage

    # -- N-ACTION (storage commitment, worker/commitment.py) ---------------------------------
    def _commitment_scp(self) -> commitment.CommitmentSCP:
        if self._commitment is None:
            recorder = self.recorder
            self._commitment = commitment.CommitmentSCP(
                self.config, recorder.outbox_fd if recorder is not None else -1,
                recorder.association if recorder is not None else "",
                recorder.note if recorder is not None else None)
        return self._commitment

    def _finish_action(self, action: commitment.Action) -> None:
        scp = self._commitment_scp()
        answer = scp.answer(action, self.calling_ae, self.called_ae, self.peer.name)
        command = action.command
        self._respond(action.context.context_id, dimse.N_ACTION_RSP, command.message_id,
                      answer.status, COMMITMENT, COMMITMENT_INSTANCE, answer.why,
                      action_type=command.action_type)
        fields = {"DICOM_TRANSACTION_UID": answer.transaction_uid,
                  "DICOM_STATUS": f"0x{answer.status:04X}",
                  "DICOM_COMMITMENT_COUNT": answer.count or None}
        if answer.status != commitment.SUCCESS:
            self._log(logging.WARNING, "storage commitment request refused with 0x%04X: %s; "
                      "nothing recorded", answer.status, answer.why, **fields)
            return
        self._log(logging.INFO, "storage commitment request received: transaction %s, %d "
                  "object(s) (request %s)", answer.transaction_uid, answer.count,
                  answer.request_id, **fields)
        scp.report_here(answer, action.context, self.channel, self.peer_max_pdu, self._who())


_CONTEXT_RESULTS = {1: "rejected by us", 2: "no reason given",
                    3: "abstract syntax not supported", 4: "transfer syntaxes not supported"}


def rejected_summary(rejected: list[Any], most: int = 3) -> str:
    """'CT Image Storage with JPEG Baseline (8-bit) (transfer syntaxes not supported), ...'
    for the first `most` rejected presentation contexts."""
    from pydicom.uid import UID

    parts = []
    for cx in rejected[:most]:
        syntaxes = ", ".join(UID(ts).name for ts in cx.transfer_syntax) or "-"
        parts.append(f"{UID(cx.abstract_syntax).name} with {syntaxes} "
                     f"({_CONTEXT_RESULTS.get(cx.result, f'result {cx.result}')})")
    if len(rejected) > most:
        parts.append(f"{len(rejected) - most} more")
    return "; ".join(parts)
