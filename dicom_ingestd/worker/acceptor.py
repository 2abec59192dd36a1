"""Association negotiation as acceptor: screen the A-ASSOCIATE-RQ, choose contexts, answer.

The A-ASSOCIATE-RQ is decoded and the A-ASSOCIATE-AC encoded by pynetdicom, and presentation
contexts are negotiated by pynetdicom's `negotiate_as_acceptor` (our transfer-syntax list order
is the preference, as in DCMTK), or with a negotiation profile by `worker.profile` (storescp
-xf), whose role and extended negotiation replies are added to the AC here.  What is ours:
the screening policy (storescp's --refuse and --reject, called/calling AE title checks) and
promiscuous mode done per association so that our preference order still decides
(pynetdicom's UNRESTRICTED_STORAGE_SERVICE would take the requestor's first proposal).

The plain request, which is nearly every one (AE titles, conformant UIDs, presentation
contexts, and only the maximum length, implementation class UID and version name in the user
information, in the standard's order), is decoded, negotiated and answered here directly:
the same answer, byte for byte, as the pynetdicom path gives it (tests/test_negotiation.py
compares the two on every request of the fuzz corpus), in about a tenth of the time (~40 us
instead of ~450 us, per association).  Anything else, and any request under a negotiation
profile or promiscuous mode, takes the pynetdicom path.
"""

import functools
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRQ
from pynetdicom.pdu_items import SCP_SCU_RoleSelectionSubItem
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from dicom_ingestd.config.schema import Config
from dicom_ingestd.dicom.pdu import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
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
    ITEM_TRANSFER_SYNTAX,
    ITEM_USER_INFORMATION,
    encode_item,
    encode_pdu,
)
from dicom_ingestd.worker import negotiation, profile

VERIFICATION = "1.2.840.10008.1.1"

# Presentation context results, PS3.8 9.3.3.2.
CONTEXT_ACCEPTED = 0
CONTEXT_USER_REJECTION = 1
CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ASSOCIATE-RJ result / source / reason values, PS3.8 9.3.4.
REJECTED_PERMANENT = 1
REJECTED_TRANSIENT = 2
SOURCE_SERVICE_USER = 1
SOURCE_PROVIDER_ACSE = 2
SOURCE_PROVIDER_PRESENTATION = 3
REASON_NO_REASON = 1
REASON_APP_CONTEXT = 2
REASON_CALLING_AE = 3
REASON_CALLED_AE = 7
REASON_PROTOCOL_VERSION = 2
REASON_LOCAL_LIMIT = 2


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    """One accepted presentation context."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """One proposed presentation context, as decoded (a rejected one also has its result)."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: tuple[str, ...]
    result: int = 0


@dataclass(frozen=True, slots=True)
class Request:
    """What the peer asked for, for logging and policy."""

    calling_ae: str
    called_ae: str
    max_pdu: int  # the peer's Maximum Length Received; 0 = unlimited
    implementation_class_uid: str
    implementation_version: str
    proposed: list[ProposedContext] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PlainRequest:
    """A plain A-ASSOCIATE-RQ decoded here (the module docstring): what screening and the
    answer need, named as on pynetdicom's primitive; `pdu` for the pynetdicom path when the
    configuration needs it."""

    application_context_name: str
    called_ae_title: str
    calling_ae_title: str
    pdu: bytes
    user_information: tuple[()] = ()  # no role selection or extended negotiation items


@dataclass(slots=True)
class Rejection:
    """A decided A-ASSOCIATE-RJ, with the reason for the log line."""

    result: int
    source: int
    reason: int
    why: str

    def encode(self) -> bytes:
        return encode_pdu(A_ASSOCIATE_RJ, bytes((0, self.result, self.source, self.reason)))


@dataclass(frozen=True, slots=True)
class Acceptance:
    """A decided A-ASSOCIATE-AC."""

    contexts: dict[int, AcceptedContext]
    rejected: list[ProposedContext]
    pdu: bytes


class RequestError(Exception):
    """The A-ASSOCIATE-RQ PDU could not be decoded."""


# A sender sends the same A-ASSOCIATE-RQ bytes association after association (its AE titles,
# its contexts, its implementation), and a warm worker serves one configuration: the plain
# path's decoding and answer are remembered per request bytes (the answer also per
# configuration, by identity) and a repeated request costs a dictionary lookup.  Both are
# pure functions of those inputs, so a remembered answer is the one a fresh decode would
# give; the values are shared between associations and never changed by them.
_REMEMBER_MOST = 16  # distinct requests (senders) per process
_REMEMBER_BYTES = 4096  # larger requests (dozens of contexts) are decoded every time
_decoded: dict[bytes, tuple["Request", "PlainRequest", int]] = {}
_answered: dict[bytes, tuple[Config, "Acceptance"]] = {}


def _remember(memo: dict[bytes, Any], pdu: bytes, value: object) -> None:
    if len(pdu) <= _REMEMBER_BYTES:
        if len(memo) >= _REMEMBER_MOST:
            memo.clear()  # atomic, unlike evicting one (single-process mode's threads)
        memo[pdu] = value


def decode_request(pdu: bytes) -> tuple[Request, A_ASSOCIATE | PlainRequest, int]:
    """Decode a whole A-ASSOCIATE-RQ PDU into (Request, primitive, protocol version)."""
    plain = _decoded.get(pdu)
    if plain is None:
        plain = _decode_plain(pdu)
        if plain is None:
            return decode_with_pynetdicom(pdu)
        _remember(_decoded, pdu, plain)
    return plain


def decode_with_pynetdicom(pdu: bytes) -> tuple[Request, A_ASSOCIATE, int]:
    """decode_request by pynetdicom alone, for any request (RequestError when malformed)."""
    try:
        rq = AssociateRQ()
        rq.decode(pdu)
        primitive = rq.to_primitive()
        request = Request(
            calling_ae=str(primitive.calling_ae_title or "").strip(),
            called_ae=str(primitive.called_ae_title or "").strip(),
            # Read from the items: pynetdicom's properties raise when an item is absent, and
            # an absent implementation class UID is for the policy to judge (--reject).
            max_pdu=next((int(item.maximum_length_received or 0) for item in
                          primitive.user_information
                          if isinstance(item, MaximumLengthNotification)), 0),
            implementation_class_uid=next(
                (str(item.implementation_class_uid or "") for item in
                 primitive.user_information
                 if isinstance(item, ImplementationClassUIDNotification)), ""),
            implementation_version=next(
                (str(item.implementation_version_name or "") for item in
                 primitive.user_information
                 if isinstance(item, ImplementationVersionNameNotification)), ""),
        )
        version = int(rq.protocol_version)
    except Exception as exc:  # pynetdicom raises many types on malformed input
        raise RequestError(f"undecodable A-ASSOCIATE-RQ ({exc.__class__.__name__}: {exc})") \
            from None
    for context in primitive.presentation_context_definition_list:
        # PS3.8 9.3.2.2: one abstract syntax and at least one transfer syntax.  pynetdicom
        # decodes context items without them, and its negotiation then raises TypeError or
        # accepts a context with no transfer syntax (found by tests/robustness fuzzing).
        if context.abstract_syntax is None or context.context_id is None:
            raise RequestError(f"presentation context {context.context_id} has no abstract "
                               "syntax")
        if not context.transfer_syntax:
            raise RequestError(f"presentation context {context.context_id} has no transfer "
                               "syntax")
        request.proposed.append(ProposedContext(
            int(context.context_id), str(context.abstract_syntax),
            tuple(str(ts) for ts in context.transfer_syntax)))
    return request, primitive, version


# -- the plain request -------------------------------------------------------------------------
_ITEM = struct.Struct(">BxH")
_FIXED = 74  # PDU header, protocol version, reserved, called and calling AE, reserved
# A conformant UID (PS3.5 9.1), optionally with the one trailing NUL pynetdicom drops.
_UID = re.compile(rb"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\x00?")
# An AE title field or version name: printable ASCII without backslash (PS3.5 AE).
_TEXT = re.compile(rb"[ -\[\]-~]*")


def _uid(value: bytes) -> str | None:
    if len(value) > 65 or not _UID.fullmatch(value):
        return None
    uid = value.rstrip(b"\0").decode("ascii")
    return uid if len(uid) <= 64 else None


def _items(data: bytes, start: int, end: int) -> list[tuple[int, bytes]] | None:
    """(type, value) of the items filling data[start:end] exactly, or None."""
    items = []
    while start < end:
        if start + 4 > end:
            return None
        kind, length = _ITEM.unpack_from(data, start)
        start += 4
        if start + length > end:
            return None
        items.append((kind, data[start:start + length]))
        start += length
    return items


def _ae_title(field: bytes) -> str | None:
    title = field.strip(b" ")
    return title.decode("ascii") if title and _TEXT.fullmatch(field) else None


_OUR_APPLICATION_CONTEXT = APPLICATION_CONTEXT.encode("ascii")
_OUR_CLASS_UID = IMPLEMENTATION_CLASS_UID.encode("ascii")
_OUR_VERSION = IMPLEMENTATION_VERSION.encode("ascii")
# The user information of a plain request: maximum length, implementation class UID and
# optionally its version name, in that order (anything else goes the pynetdicom way).
_PLAIN_USER_ITEMS = (
    [ITEM_MAX_LENGTH, ITEM_IMPLEMENTATION_CLASS_UID],
    [ITEM_MAX_LENGTH, ITEM_IMPLEMENTATION_CLASS_UID, ITEM_IMPLEMENTATION_VERSION],
)


def _decode_plain(pdu: bytes) -> tuple[Request, PlainRequest, int] | None:
    """The plain request of the module docstring, or None for the pynetdicom path."""
    if len(pdu) < _FIXED or pdu[0] != A_ASSOCIATE_RQ or struct.unpack_from(">L", pdu, 2)[0] != \
            len(pdu) - 6:
        return None
    called, calling = _ae_title(pdu[10:26]), _ae_title(pdu[26:42])
    items = _items(pdu, _FIXED, len(pdu))
    if called is None or calling is None or items is None or len(items) < 3 \
            or items[0][0] != ITEM_APPLICATION_CONTEXT or items[-1][0] != ITEM_USER_INFORMATION \
            or any(kind != ITEM_PRESENTATION_CONTEXT_RQ for kind, _ in items[1:-1]):
        return None
    application_context = _uid(items[0][1])
    user = _items(items[-1][1], 0, len(items[-1][1]))
    if application_context is None or user is None \
            or [kind for kind, _ in user] not in _PLAIN_USER_ITEMS \
            or len(user[0][1]) != 4:
        return None
    implementation_uid = _uid(user[1][1])
    version = user[2][1] if len(user) == 3 else b""
    if implementation_uid is None or len(version) > 16 or not _TEXT.fullmatch(version) \
            or version != version.strip(b" ") or (len(user) == 3 and not version):
        return None
    proposed: list[ProposedContext] = []
    seen: set[int] = set()
    for _, value in items[1:-1]:
        context_id = value[0] if value else 0
        sub = _items(value, 4, len(value)) if len(value) >= 4 else None
        if not context_id & 1 or context_id in seen or not sub or len(sub) < 2 \
                or sub[0][0] != ITEM_ABSTRACT_SYNTAX \
                or any(kind != ITEM_TRANSFER_SYNTAX for kind, _ in sub[1:]):
            return None
        uids = [_uid(uid) for _, uid in sub]
        if None in uids:
            return None
        seen.add(context_id)
        proposed.append(ProposedContext(context_id, uids[0] or "",
                                        tuple(uid or "" for uid in uids[1:])))
    request = Request(calling, called, struct.unpack(">L", user[0][1])[0], implementation_uid,
                      version.decode("ascii"), proposed)
    return (request, PlainRequest(application_context, called, calling, pdu),
            struct.unpack_from(">H", pdu, 6)[0])


def screen(request: Request, primitive: A_ASSOCIATE | PlainRequest, version: int,
           config: Config) -> Rejection | None:
    """Apply the association policy; return the rejection to send, or None to go on."""
    policy = config.association
    if not version & 1:
        return Rejection(REJECTED_PERMANENT, SOURCE_PROVIDER_ACSE, REASON_PROTOCOL_VERSION,
                         f"protocol version 0x{version:04X} not supported")
    if str(primitive.application_context_name or "") != APPLICATION_CONTEXT:
        return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_APP_CONTEXT,
                         f"application context {primitive.application_context_name!s} "
                         "not supported")
    if policy.refuse:
        return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_NO_REASON,
                         "refusing every association (association.refuse)")
    if policy.reject_without_implementation_uid and not request.implementation_class_uid:
        return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_NO_REASON,
                         "no implementation class UID "
                         "(association.reject_without_implementation_uid)")
    if policy.require_called_aetitle and request.called_ae != config.network.aetitle:
        return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLED_AE,
                         f"called AE title {request.called_ae!r} is not ours "
                         f"({config.network.aetitle!r})")
    allowed = policy.allowed_calling_aetitles
    if allowed and request.calling_ae not in allowed:
        return Rejection(REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE,
                         f"calling AE title {request.calling_ae!r} is not allowed")
    return None


def answer(pdu: bytes, config: Config) -> Rejection | Acceptance:
    """What `config` answers to the A-ASSOCIATE-RQ `pdu` from a peer that may use every
    service (the screening, then the negotiation); for `config haproxy-check`."""
    request, primitive, version = decode_request(pdu)
    return screen(request, primitive, version, config) or accept(request, primitive, config)


@functools.lru_cache(maxsize=8)
def _supported(preference: str) -> tuple[PresentationContext, ...]:
    """Our acceptor contexts for a preference (built once per process: ~200 SOP classes)."""
    contexts = []
    for abstract_syntax, transfer_syntaxes in negotiation.acceptor_contexts(
            preference, promiscuous=False):
        contexts.append(build_context(abstract_syntax, list(transfer_syntaxes)))
    return tuple(contexts)


@functools.lru_cache(maxsize=8)
def _supported_syntaxes(preference: str) -> dict[str, tuple[str, ...]]:
    """The same contexts for the plain path: abstract syntax -> our transfer syntaxes."""
    return {str(cx.abstract_syntax): tuple(str(ts) for ts in cx.transfer_syntax)
            for cx in _supported(preference)}


@functools.lru_cache(maxsize=1)
def _commitment_context() -> PresentationContext:
    uid, syntaxes = negotiation.commitment_context()
    context = build_context(uid, list(syntaxes))
    context.scu_role, context.scp_role = True, False  # the requestor is SCU, never SCP
    return context


def warm_up(config: Config) -> None:
    """Build the acceptor contexts now, in the master, so every forked worker inherits them
    (building ~200 contexts costs ~40 ms, once per association otherwise)."""
    _supported_syntaxes(config.negotiation.preferred_transfer_syntax)


def accept(request: Request, primitive: A_ASSOCIATE | PlainRequest, config: Config,
           verification_only: bool = False) -> Acceptance:
    """Negotiate the presentation contexts and encode the A-ASSOCIATE-AC.

    With negotiation.profile set the profile alone decides (`worker.profile`, storescp -xf);
    otherwise storescp's preference list (and promiscuous mode) does, through pynetdicom, or
    for a plain request here.  `verification_only` (the proxy's own LOCAL connection):
    whatever the configuration accepts, every context but Verification is rejected (result
    1, user rejection), with no role or extended negotiation reply for it.
    """
    if isinstance(primitive, PlainRequest):
        if not config.negotiation.profile and not config.negotiation.promiscuous \
                and not verification_only and not _proposes_commitment(request, config):
            answered = _answered.get(primitive.pdu)
            if answered is not None and answered[0] is config:
                return answered[1]
            acceptance = _accept_plain(request, primitive, config)
            _remember(_answered, primitive.pdu, (config, acceptance))
            return acceptance
        request, primitive, _ = decode_with_pynetdicom(primitive.pdu)
    if config.negotiation.profile:
        return _accept_by_profile(request, primitive, config, verification_only)
    preference = config.negotiation.preferred_transfer_syntax
    supported = list(_supported(preference))
    if config.negotiation.promiscuous:
        for abstract_syntax, transfer_syntaxes in negotiation.promiscuous_contexts_for(
                request.proposed, preference):
            supported.append(build_context(abstract_syntax, list(transfer_syntaxes)))
    if config.storage_commitment.enabled:
        supported.append(_commitment_context())
    roles: dict[UID, tuple[bool | None, bool | None]] = {}
    for item in primitive.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
    results, role_replies = negotiate_as_acceptor(
        primitive.presentation_context_definition_list, supported, roles or None)
    if verification_only:
        _reject_all_but_verification(results)
        role_replies = [r for r in role_replies if str(r.sop_class_uid) == VERIFICATION]
    ac = _encode_ac(primitive, config, results, [*role_replies])

    accepted = {
        cx.context_id: AcceptedContext(cx.context_id, str(cx.abstract_syntax),
                                       str(cx.transfer_syntax[0]))
        for cx in results if cx.result == 0x00 and cx.context_id is not None
    }
    return Acceptance(accepted, _rejected(results), ac.encode())


def _proposes_commitment(request: Request, config: Config) -> bool:
    """Storage commitment's context has roles of its own: pynetdicom negotiates it."""
    if not config.storage_commitment.enabled:
        return False
    uid = negotiation.commitment_context()[0]
    return any(cx.abstract_syntax == uid for cx in request.proposed)


def _rejected(results: list[PresentationContext]) -> list[ProposedContext]:
    return [ProposedContext(int(cx.context_id or 0), str(cx.abstract_syntax),
                            tuple(str(ts) for ts in cx.transfer_syntax), int(cx.result or 0))
            for cx in results if cx.result != 0x00]


def _accept_plain(request: Request, plain: PlainRequest, config: Config) -> Acceptance:
    """negotiate_as_acceptor's answer for a plain request without roles: per proposed
    context, the first of our transfer syntaxes it offers, else 0x04; 0x03 for an abstract
    syntax we do not support; answers in context ID order."""
    supported = _supported_syntaxes(config.negotiation.preferred_transfer_syntax)
    accepted: dict[int, AcceptedContext] = {}
    rejected: list[ProposedContext] = []
    answers = []
    for cx in sorted(request.proposed, key=lambda c: c.context_id):
        ours = supported.get(cx.abstract_syntax)
        chosen = negotiation.choose_transfer_syntax(ours, cx.transfer_syntax) if ours else None
        if chosen is not None:
            accepted[cx.context_id] = AcceptedContext(cx.context_id, cx.abstract_syntax, chosen)
            result = CONTEXT_ACCEPTED
        else:
            result = CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED if ours \
                else CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED
            rejected.append(ProposedContext(cx.context_id, cx.abstract_syntax,
                                            cx.transfer_syntax[:1], result))
        syntax = (chosen or cx.transfer_syntax[0]).encode("ascii")
        answers.append(encode_item(ITEM_PRESENTATION_CONTEXT_AC,
                                   bytes((cx.context_id, 0, result, 0))
                                   + encode_item(ITEM_TRANSFER_SYNTAX, syntax)))
    user = (encode_item(ITEM_MAX_LENGTH, struct.pack(">L", config.network.max_pdu))
            + encode_item(ITEM_IMPLEMENTATION_CLASS_UID, _OUR_CLASS_UID)
            + encode_item(ITEM_IMPLEMENTATION_VERSION, _OUR_VERSION))
    body = b"".join((struct.pack(">HH", 1, 0), plain.called_ae_title.ljust(16).encode("ascii"),
                     plain.calling_ae_title.ljust(16).encode("ascii"), bytes(32),
                     encode_item(ITEM_APPLICATION_CONTEXT, _OUR_APPLICATION_CONTEXT), *answers,
                     encode_item(ITEM_USER_INFORMATION, user)))
    return Acceptance(accepted, rejected, struct.pack(">BxL", A_ASSOCIATE_AC, len(body)) + body)


def _reject_all_but_verification(results: list[PresentationContext]) -> None:
    for cx in results:
        if cx.result == CONTEXT_ACCEPTED and str(cx.abstract_syntax) != VERIFICATION:
            cx.result = CONTEXT_USER_REJECTION


def _encode_ac(primitive: A_ASSOCIATE, config: Config, results: list[PresentationContext],
               extra: list[Any]) -> AssociateAC:
    """The A-ASSOCIATE-AC PDU for `results`, with `extra` user information primitives."""
    reply = A_ASSOCIATE()
    reply.application_context_name = APPLICATION_CONTEXT
    reply.calling_ae_title = primitive.calling_ae_title
    reply.called_ae_title = primitive.called_ae_title
    reply.result = 0x00
    reply.result_source = 0x01
    reply.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = config.network.max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_version = ImplementationVersionNameNotification()
    impl_version.implementation_version_name = IMPLEMENTATION_VERSION
    reply.user_information = [max_length, impl_uid, impl_version, *extra]
    ac = AssociateAC()
    ac.from_primitive(reply)
    return ac


def _accept_by_profile(request: Request, primitive: A_ASSOCIATE, config: Config,
                       verification_only: bool) -> Acceptance:
    """storescp -xf: the profile's contexts, role replies and extended negotiation replies."""
    chosen = config.negotiation.profiles[config.negotiation.profile]
    requested_roles: dict[str, tuple[bool, bool]] = {}
    for sub_item in primitive.user_information:
        if isinstance(sub_item, SCP_SCU_RoleSelectionNegotiation) and sub_item.sop_class_uid:
            # DCMTK takes the first item for a SOP class.
            requested_roles.setdefault(str(sub_item.sop_class_uid),
                                       (bool(sub_item.scu_role), bool(sub_item.scp_role)))
    answer = profile.negotiate(
        ((int(cx.context_id or 0), str(cx.abstract_syntax or ""),
          [str(ts) for ts in cx.transfer_syntax]) for cx in request.proposed),
        requested_roles, chosen)
    results: list[PresentationContext] = []
    role_items: list[SCP_SCU_RoleSelectionSubItem] = []
    for item in answer.contexts:
        cx = PresentationContext()
        cx.context_id = item.context_id
        cx.abstract_syntax = UID(item.abstract_syntax, validation_mode=pydicom_config.IGNORE)
        cx.transfer_syntax = [UID(item.transfer_syntax, validation_mode=pydicom_config.IGNORE)]
        cx.result = item.result
        results.append(cx)
        if verification_only and item.abstract_syntax != VERIFICATION:
            cx.result = CONTEXT_USER_REJECTION
            continue
        if item.role is not None:
            # Built as the PDU sub-item: pynetdicom's primitive refuses both flags 0, which
            # DCMTK sends (peer proposes scu only, we allow scp only).
            role = SCP_SCU_RoleSelectionSubItem()
            role.sop_class_uid = cx.abstract_syntax
            role.scu_role, role.scp_role = item.role
            role_items.append(role)
    extended = []
    for uid, data in answer.extended_negotiation:
        if verification_only and uid != VERIFICATION:
            continue
        extneg = SOPClassExtendedNegotiation()
        extneg.sop_class_uid = UID(uid, validation_mode=pydicom_config.IGNORE)
        extneg.service_class_application_information = data
        extended.append(extneg)
    ac = _encode_ac(primitive, config, results, extended)
    user_information = ac.user_information
    assert user_information is not None
    # Sub-items in ascending type order, as DCMTK sends them (PS3.8 CP 280): 51H maximum
    # length, 52H implementation UID, 54H roles, 55H implementation version, 56H extended.
    user_information.user_data[2:2] = role_items
    accepted = {
        cx.context_id: AcceptedContext(cx.context_id, str(cx.abstract_syntax),
                                       str(cx.transfer_syntax[0]))
        for cx in results if cx.result == profile.ACCEPTED and cx.context_id is not None
    }
    return Acceptance(accepted, _rejected(results), ac.encode())
