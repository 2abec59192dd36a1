"""Deliver one storage commitment report on a new association (PS3.4 J.3.3.1.2).

The job's own process (deliver_job.py): open an association to the requester's address
(DICOM_DELIVERY, from [remote_aes] and [network] when the run started), proposing the Storage
Commitment Push Model SOP class with the SCP role for us (SCP/SCU role selection, PS3.7
D.3.3.4: the peer accepts an association where the SCP role is proposed, PS3.4 J.3.3.1.3),
send the N-EVENT-REPORT-RQ, wait for its response, release.  One line on stdout when the
report was answered with success (exit 0); one line on stderr saying why not (exit 1: the job
is retried with backoff, then dead-lettered).

The association requestor is ours, as the acceptor is: A-ASSOCIATE-RQ encoded and the
A-ASSOCIATE-AC read here (PS3.8 9.3), PDUs through dicom/pdu.py's Channel, command sets by
dicom/dimse.py.
"""

import contextlib
import json
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicom_ingestd.commitment.dataset import (
    SOP_CLASS,
    SOP_INSTANCE,
    TRANSFER_SYNTAXES,
    encode_event_information,
)
from dicom_ingestd.commitment.spool import read_report_file
from dicom_ingestd.config.schema import TLSConfig
from dicom_ingestd.dicom import dimse
from dicom_ingestd.dicom.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    ABORT_REASON_NOT_SIGNIFICANT,
    ABORT_SOURCE_SERVICE_USER,
    APPLICATION_CONTEXT,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    ITEM_ABSTRACT_SYNTAX,
    ITEM_APPLICATION_CONTEXT,
    ITEM_IMPLEMENTATION_CLASS_UID,
    ITEM_IMPLEMENTATION_VERSION,
    ITEM_MAX_LENGTH,
    ITEM_PRESENTATION_CONTEXT_AC,
    ITEM_PRESENTATION_CONTEXT_RQ,
    ITEM_ROLE_SELECTION,
    ITEM_TRANSFER_SYNTAX,
    ITEM_USER_INFORMATION,
    P_DATA_TF,
    PDV_COMMAND,
    PDV_LAST,
    Channel,
    PeerClosed,
    PeerTimeout,
    ProtocolError,
    encode_abort,
    encode_item,
    encode_p_data,
    encode_pdu,
)
from dicom_ingestd.tls_context import client_context

CONTEXT_ID = 1
MESSAGE_ID = 1
MAX_AC = 1 << 16  # the largest PDU other than P-DATA-TF we read
MAX_ANSWER = 1 << 16  # bytes of P-DATA-TF PDUs read for the N-EVENT-REPORT-RSP at most


class DeliveryError(Exception):
    """The report was not delivered; the text says why (one line)."""


@dataclass(frozen=True, slots=True)
class Settings:
    host: str
    port: int
    tls: bool
    calling_ae: str  # ours
    called_ae: str  # the requester's
    acse_timeout: float
    dimse_timeout: float
    max_pdu: int
    tls_config: dict[str, Any]


# -- A-ASSOCIATE ---------------------------------------------------------------------------
def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16)


def associate_rq(settings: Settings) -> bytes:
    """The A-ASSOCIATE-RQ: one context (our transfer syntaxes), the SCP role proposed."""
    uid = SOP_CLASS.encode("ascii")
    context = struct.pack(">B3x", CONTEXT_ID) + encode_item(ITEM_ABSTRACT_SYNTAX, uid) + b"".join(
        encode_item(ITEM_TRANSFER_SYNTAX, ts.encode("ascii")) for ts in TRANSFER_SYNTAXES)
    role = struct.pack(">H", len(uid)) + uid + bytes((0, 1))  # SCU role no, SCP role yes
    user = (encode_item(ITEM_MAX_LENGTH, struct.pack(">L", settings.max_pdu))
            + encode_item(ITEM_IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_CLASS_UID.encode("ascii"))
            + encode_item(ITEM_ROLE_SELECTION, role)
            + encode_item(ITEM_IMPLEMENTATION_VERSION, IMPLEMENTATION_VERSION.encode("ascii")))
    body = (struct.pack(">H2x", 1) + _ae(settings.called_ae) + _ae(settings.calling_ae)
            + bytes(32) + encode_item(ITEM_APPLICATION_CONTEXT, APPLICATION_CONTEXT.encode("ascii"))
            + encode_item(ITEM_PRESENTATION_CONTEXT_RQ, context)
            + encode_item(ITEM_USER_INFORMATION, user))
    return encode_pdu(A_ASSOCIATE_RQ, body)


@dataclass(frozen=True, slots=True)
class Accepted:
    transfer_syntax: str
    max_pdu: int


def read_ac(body: bytes) -> Accepted:
    """Our context's outcome in an A-ASSOCIATE-AC body; DeliveryError when it cannot
    serve (context refused, SCP role not granted)."""
    pos, result, syntax, max_pdu, scp_role = 68, -1, "", 0, None
    while pos + 4 <= len(body):
        item_type, length = struct.unpack_from(">BxH", body, pos)
        value = body[pos + 4:pos + 4 + length]
        pos += 4 + length
        if item_type == ITEM_PRESENTATION_CONTEXT_AC and len(value) >= 4 and value[0] == CONTEXT_ID:
            result = value[2]
            if len(value) >= 8:
                syntax = value[8:].decode("ascii", "replace").rstrip("\0 ")
        elif item_type == ITEM_USER_INFORMATION:
            sub = 0
            while sub + 4 <= len(value):
                sub_type, sub_length = struct.unpack_from(">BxH", value, sub)
                data = value[sub + 4:sub + 4 + sub_length]
                sub += 4 + sub_length
                if sub_type == ITEM_MAX_LENGTH and len(data) == 4:
                    max_pdu = struct.unpack(">L", data)[0]
                elif sub_type == ITEM_ROLE_SELECTION and len(data) >= 2:
                    uid_length = struct.unpack_from(">H", data)[0]
                    uid = data[2:2 + uid_length].decode("ascii", "replace").rstrip("\0 ")
                    if uid == SOP_CLASS and len(data) >= 4 + uid_length:
                        scp_role = data[3 + uid_length]
    if result != 0:
        reasons = {1: "rejected by the user", 2: "no reason", 3: "abstract syntax not "
                   "supported", 4: "transfer syntaxes not supported"}
        raise DeliveryError("the peer refused the Storage Commitment context ("
                            f"{reasons.get(result, f'result {result}')})")
    if syntax not in TRANSFER_SYNTAXES:
        raise DeliveryError(f"the peer accepted transfer syntax {syntax!r}, which was not "
                            "proposed")
    if scp_role != 1:
        raise DeliveryError("the peer did not accept the SCP role for Storage Commitment "
                            "(SCP/SCU role selection): it cannot receive the report on an "
                            "association we open")
    return Accepted(syntax, max_pdu)


# -- the run -------------------------------------------------------------------------------
def _connect(settings: Settings) -> socket.socket:
    try:
        sock = socket.create_connection((settings.host, settings.port),
                                        timeout=settings.acse_timeout)
    except OSError as exc:
        raise DeliveryError(f"cannot connect: {exc.strerror or exc}") from None
    if settings.tls:
        context = client_context(TLSConfig(**settings.tls_config))
        try:
            sock = context.wrap_socket(sock)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise DeliveryError(f"TLS handshake failed: {exc}") from None
    return sock


def _read_pdu(channel: Channel, deadline: float, limit: int) -> tuple[int, bytes]:
    """The next PDU whole, by `deadline`; a P-DATA-TF longer than `limit` (the largest PDU we
    advertised) or any other PDU longer than MAX_AC is refused unread."""
    pdu_type, length = channel.read_pdu_header(deadline)
    most = limit if pdu_type == P_DATA_TF else MAX_AC
    if length > most:
        raise DeliveryError(f"the peer sent a PDU of {length} bytes (type 0x{pdu_type:02X}), "
                            f"more than the {most} we accept")
    return pdu_type, channel.read_exact(length, deadline)


def _read_command(channel: Channel, timeout: float, limit: int) -> dimse.Command:
    """The next command set (PDVs of P-DATA-TF PDUs), whole within `timeout` seconds; data
    set fragments before it are dropped, and the command plus what is dropped may take
    MAX_ANSWER bytes, so a peer that streams data or never ends a command cannot hold the
    run (its memory, its time) longer."""
    deadline = time.monotonic() + timeout
    command = bytearray()
    received = 0
    while True:
        pdu_type, body = _read_pdu(channel, deadline, limit)
        if pdu_type == A_ABORT:
            raise DeliveryError("the peer aborted the association")
        if pdu_type != P_DATA_TF:
            raise DeliveryError(f"unexpected PDU type 0x{pdu_type:02X} from the peer")
        received += len(body)
        if received > MAX_ANSWER:
            raise DeliveryError(f"the peer sent more than {MAX_ANSWER} bytes without a "
                                "complete N-EVENT-REPORT-RSP command")
        pos = 0
        while pos + 6 <= len(body):
            length, _context, control = struct.unpack_from(">LBB", body, pos)
            if control & PDV_COMMAND:
                command += body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if control & PDV_COMMAND and control & PDV_LAST:
                return dimse.decode_command(bytes(command))


def deliver(settings: Settings, report_path: str) -> str:
    """Send the report; the line to print.  Raises DeliveryError (its text: why, one line)."""
    try:
        report, results = read_report_file(report_path)
    except (OSError, ValueError) as exc:
        raise DeliveryError(f"cannot read the report {report_path}: {exc}") from None
    sock = _connect(settings)
    channel = Channel(sock, settings.dimse_timeout, False)
    try:
        channel.send(associate_rq(settings))
        pdu_type, body = _read_pdu(channel, time.monotonic() + settings.acse_timeout, MAX_AC)
        if pdu_type == A_ASSOCIATE_RJ:
            raise DeliveryError(f"the association was rejected (result {body[1]}, source "
                                f"{body[2]}, reason {body[3]})" if len(body) >= 4 else
                                "the association was rejected")
        if pdu_type != A_ASSOCIATE_AC:
            raise DeliveryError(f"the A-ASSOCIATE-RQ was answered with PDU type "
                                f"0x{pdu_type:02X}")
        try:
            accepted = read_ac(body)
        except DeliveryError:
            channel.send(encode_pdu(A_RELEASE_RQ, bytes(4)))  # release what we cannot use
            raise
        event_type, data = encode_event_information(report.transaction_uid, results,
                                                    accepted.transfer_syntax)
        command = dimse.encode_event_report(MESSAGE_ID, SOP_CLASS, SOP_INSTANCE, event_type)
        channel.send(encode_p_data(CONTEXT_ID, command, accepted.max_pdu))
        channel.send(encode_p_data(CONTEXT_ID, data, accepted.max_pdu, is_command=False))
        answer = _read_command(channel, settings.dimse_timeout, settings.max_pdu)
        if answer.field != dimse.N_EVENT_REPORT_RSP:
            raise DeliveryError(f"the report was answered with {answer.name} instead of "
                                "N-EVENT-REPORT-RSP")
        if answer.message_id != MESSAGE_ID:
            raise DeliveryError(f"the N-EVENT-REPORT-RSP answers message ID "
                                f"{answer.message_id}, not the report's message ID "
                                f"{MESSAGE_ID}: not an answer to the report")
        if answer.status != 0:
            status = "none" if answer.status is None else f"0x{answer.status:04X}"
            raise DeliveryError(f"the report was answered with status {status}")
        channel.send(encode_pdu(A_RELEASE_RQ, bytes(4)))  # A-RELEASE-RQ
        # Delivered whatever comes now (A-RELEASE-RP, or the peer just closing): the
        # response said so.
        with contextlib.suppress(PeerClosed, PeerTimeout, ProtocolError, DeliveryError):
            _read_pdu(channel, time.monotonic() + settings.acse_timeout, settings.max_pdu)
    except (PeerClosed, PeerTimeout, ProtocolError, dimse.CommandError, OSError) as exc:
        with_abort(channel)
        raise DeliveryError(str(exc) or type(exc).__name__) from None
    except DeliveryError:
        with_abort(channel)
        raise
    finally:
        sock.close()
    return (f"storage commitment report of transaction {report.transaction_uid} sent to "
            f"{settings.called_ae}@{settings.host}:{settings.port}: {report.committed} "
            f"committed, {report.failed} failed (event type {int(event_type)}); calling AE "
            f"title {settings.calling_ae}")


def with_abort(channel: Channel) -> None:
    with contextlib.suppress(PeerClosed, PeerTimeout, OSError):
        channel.send(encode_abort(ABORT_SOURCE_SERVICE_USER, ABORT_REASON_NOT_SIGNIFICANT))


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: deliver_job.py REPORT", file=sys.stderr)
        return 2
    try:
        settings = Settings(**json.loads(os.environ["DICOM_DELIVERY"]))
        path = os.path.join(os.environ["DICOM_COMMITMENT_REPORTS"], os.path.basename(argv[0]))
    except (KeyError, TypeError, ValueError) as exc:
        print(f"no delivery settings in the environment ({exc})", file=sys.stderr)
        return 2
    where = f"AE {settings.called_ae} at {settings.host}:{settings.port}"
    try:
        print(deliver(settings, path), flush=True)
    except DeliveryError as exc:
        print(f"report not delivered: {exc} ({where})", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # a bug: still one line for the journal, like any failure
        print(f"report not delivered: internal error: {type(exc).__name__}: {exc} ({where})",
              file=sys.stderr, flush=True)
        return 1
    return 0
