"""A health check that speaks DICOM, for a load balancer in front of dicom-ingestd instances.

A TCP connect only proves that the kernel accepts connections: a stopped (SIGSTOP), wedged
or refusing daemon still passes it, because the listening socket's backlog completes the
handshake.  The check here is a whole Verification association, as a modality's "DICOM echo"
button does: A-ASSOCIATE-RQ (Verification, Implicit VR Little Endian, or another transfer
syntax the configuration accepts) -> A-ASSOCIATE-AC that accepts it -> C-ECHO-RQ ->
C-ECHO-RSP with status 0 -> A-RELEASE-RQ -> A-RELEASE-RP.  Only a daemon whose master admits
connections and whose worker answers DIMSE passes.

`haproxy_rules()` writes it as HAProxy `tcp-check` rules (binary sends, hexadecimal regular
expressions anchored on whole bytes); `dicom-ingestd config haproxy-check` prints them for
a configuration's AE title and negotiation.  Behind `send-proxy-v2`, HAProxy opens its
checks with a LOCAL header: the proxy's own connection, which may only use Verification; a
clean check is logged at debug level (docs/scale-out.md).

The PDUs are written out byte by byte (PS3.8 9.3, PS3.7 9.3.5, 9.1.5); which transfer syntax
the check proposes is asked of the worker's own acceptor (`accepted_syntax`).
"""

import struct

from dicom_ingestd.config.schema import Config
from dicom_ingestd.dicom.pdu import (
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    ITEM_ABSTRACT_SYNTAX,
    ITEM_APPLICATION_CONTEXT,
    ITEM_IMPLEMENTATION_CLASS_UID,
    ITEM_IMPLEMENTATION_VERSION,
    ITEM_MAX_LENGTH,
    ITEM_PRESENTATION_CONTEXT_AC,
    ITEM_PRESENTATION_CONTEXT_RQ,
    ITEM_TRANSFER_SYNTAX,
    ITEM_USER_INFORMATION,
    P_DATA_TF,
    encode_item,
    encode_pdu,
)
from dicom_ingestd.worker import acceptor

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = b"1.2.840.10008.1.2"
# What the check may propose, in order of preference: the uncompressed transfer syntaxes
# (the C-ECHO has no data set, so any will do; the command set is Implicit VR Little
# Endian whatever the context's transfer syntax, PS3.7 6.3.1).
TRANSFER_SYNTAXES = (IMPLICIT_VR_LITTLE_ENDIAN, b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.2")
# The check's own implementation identity (a UUID-derived UID of its own, not the daemon's).
IMPLEMENTATION_CLASS_UID = b"2.25.190318812338931496212340178120315962137"
IMPLEMENTATION_VERSION = b"INGESTD_CHECK"
MAX_PDU = 16384
CALLING_AE = "HEALTHCHECK"
CONTEXT_ID = 1


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")[:16]


def associate_rq(called_ae: str, calling_ae: str = CALLING_AE,
                 transfer_syntax: bytes = IMPLICIT_VR_LITTLE_ENDIAN) -> bytes:
    """A-ASSOCIATE-RQ proposing Verification with `transfer_syntax` only."""
    context = (struct.pack(">B3x", CONTEXT_ID) + encode_item(ITEM_ABSTRACT_SYNTAX, VERIFICATION)
               + encode_item(ITEM_TRANSFER_SYNTAX, transfer_syntax))
    user = (encode_item(ITEM_MAX_LENGTH, struct.pack(">L", MAX_PDU))
            + encode_item(ITEM_IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_CLASS_UID)
            + encode_item(ITEM_IMPLEMENTATION_VERSION, IMPLEMENTATION_VERSION))
    body = (struct.pack(">H2x", 1) + _ae(called_ae) + _ae(calling_ae) + bytes(32)
            + encode_item(ITEM_APPLICATION_CONTEXT, APPLICATION_CONTEXT)
            + encode_item(ITEM_PRESENTATION_CONTEXT_RQ, context)
            + encode_item(ITEM_USER_INFORMATION, user))
    return encode_pdu(A_ASSOCIATE_RQ, body)


def _element(element: int, value: bytes) -> bytes:
    """A group 0000 element in Implicit VR Little Endian."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def echo_rq(message_id: int = 1) -> bytes:
    """P-DATA-TF carrying a C-ECHO-RQ command set (the last fragment) on the context."""
    uid = VERIFICATION + (b"\0" if len(VERIFICATION) % 2 else b"")
    elements = _element(0x0002, uid) + _element(0x0100, struct.pack("<H", 0x0030)) + \
        _element(0x0110, struct.pack("<H", message_id)) + \
        _element(0x0800, struct.pack("<H", 0x0101))
    command = _element(0x0000, struct.pack("<L", len(elements))) + elements
    pdv = struct.pack(">LBB", len(command) + 2, CONTEXT_ID, 0x03) + command
    return encode_pdu(P_DATA_TF, pdv)


def release_rq() -> bytes:
    return encode_pdu(A_RELEASE_RQ, bytes(4))


# What the answers must match, as HAProxy `rbinary` expressions: the response in hexadecimal,
# "(..)*" skipping whole bytes so that no match can straddle two of them.
def accepted(transfer_syntax: bytes = IMPLICIT_VR_LITTLE_ENDIAN) -> str:
    """The A-ASSOCIATE-AC's presentation context item for ours: result 0 (acceptance), with
    its one transfer syntax sub-item."""
    return "^0200(..)*" + struct.pack(">BxHBxBx", ITEM_PRESENTATION_CONTEXT_AC,
                                      4 + 4 + len(transfer_syntax), CONTEXT_ID, 0).hex()


ACCEPTED = accepted()
ECHO_SUCCESS = ("^04(..)*" + _element(0x0100, struct.pack("<H", 0x8030)).hex()
                + "(..)*" + _element(0x0900, struct.pack("<H", 0)).hex())
RELEASED = "^" + encode_pdu(A_RELEASE_RP, bytes(4)).hex()


def haproxy_rules(called_ae: str, calling_ae: str = CALLING_AE,
                  transfer_syntax: bytes = IMPLICIT_VR_LITTLE_ENDIAN) -> str:
    """The `option tcp-check` block of a HAProxy backend for the check."""
    def comment(text: str) -> str:
        return " comment " + text.replace(" ", "\\ ")

    lines = [
        "option tcp-check",
        # "default": the server line's options, send-proxy-v2 included (a bare connect
        # rule would open checks without the PROXY header, and the daemon drops them).
        "tcp-check connect default",
        f"tcp-check send-binary {associate_rq(called_ae, calling_ae, transfer_syntax).hex()}"
        + comment("A-ASSOCIATE-RQ for Verification"),
        f"tcp-check expect rbinary {accepted(transfer_syntax)}"
        + comment("A-ASSOCIATE-AC accepting it"),
        f"tcp-check send-binary {echo_rq().hex()}" + comment("C-ECHO-RQ"),
        f"tcp-check expect rbinary {ECHO_SUCCESS}" + comment("C-ECHO-RSP, status 0"),
        f"tcp-check send-binary {release_rq().hex()}" + comment("A-RELEASE-RQ"),
        f"tcp-check expect rbinary {RELEASED}" + comment("A-RELEASE-RP"),
    ]
    return "\n".join(lines) + "\n"


class Rejected(Exception):
    """The check's association would be rejected (the reason): it could never pass."""


def accepted_syntax(config: Config, calling: str) -> bytes | None:
    """The first of TRANSFER_SYNTAXES this configuration accepts Verification with, as the
    daemon would negotiate it (negotiation.profile may accept Verification with Explicit VR
    Little Endian only); None when it accepts none.  Raises Rejected when the association
    itself would be."""
    for syntax in TRANSFER_SYNTAXES:
        answer = acceptor.answer(associate_rq(config.network.aetitle, calling, syntax), config)
        if isinstance(answer, acceptor.Rejection):
            raise Rejected(answer.why)
        if CONTEXT_ID in answer.contexts:
            return syntax
    return None
