"""Association negotiation as acceptor: screen the A-ASSOCIATE-RQ, choose contexts, answer.

The A-ASSOCIATE-RQ is decoded and the A-ASSOCIATE-AC encoded by pynetdicom, and presentation
contexts are negotiated by pynetdicom's `negotiate_as_acceptor` (our transfer-syntax list order
is the preference, as in DCMTK), or with a negotiation profile by `worker.profile` (storescp
-xf), whose role and extended negotiation replies are added to the AC here.  What is ours:
the screening policy (storescp's --refuse and --reject, called/calling AE title checks) and
promiscuous mode done per association so that our preference order still decides
(pynetdicom's UNRESTRICTED_STORAGE_SERVICE would take the requestor's first proposal).
"""

import functools
from dataclasses import dataclass, field
from typing import Any

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
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

from dicom_ingestd import __version__
from dicom_ingestd.config.schema import Config
from dicom_ingestd.worker import negotiation, profile
from dicom_ingestd.worker.pdu import A_ASSOCIATE_RJ, encode_pdu

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
# A fixed UUID-derived UID (PS3.5 B.2): ours, registered to nobody else.
IMPLEMENTATION_CLASS_UID = "2.25.58257340867816946478277521733648859219"
IMPLEMENTATION_VERSION = ("INGESTD_" + __version__.replace(".", ""))[:16]

# Presentation context results, PS3.8 9.3.3.2.
CONTEXT_ACCEPTED = 0
CONTEXT_USER_REJECTION = 1

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


@dataclass(slots=True)
class Request:
    """What the peer asked for, for logging and policy."""

    calling_ae: str
    called_ae: str
    max_pdu: int  # the peer's Maximum Length Received; 0 = unlimited
    implementation_class_uid: str
    implementation_version: str
    proposed: list[PresentationContext] = field(default_factory=list)


@dataclass(slots=True)
class Rejection:
    """A decided A-ASSOCIATE-RJ, with the reason for the log line."""

    result: int
    source: int
    reason: int
    why: str

    def encode(self) -> bytes:
        return encode_pdu(A_ASSOCIATE_RJ, bytes((0, self.result, self.source, self.reason)))


@dataclass(slots=True)
class Acceptance:
    """A decided A-ASSOCIATE-AC."""

    contexts: dict[int, AcceptedContext]
    rejected: list[PresentationContext]
    pdu: bytes


class RequestError(Exception):
    """The A-ASSOCIATE-RQ PDU could not be decoded."""


def decode_request(pdu: bytes) -> tuple[Request, A_ASSOCIATE, int]:
    """Decode a whole A-ASSOCIATE-RQ PDU into (Request, primitive, protocol version)."""
    try:
        rq = A_ASSOCIATE_RQ()
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
            proposed=list(primitive.presentation_context_definition_list),
        )
        version = int(rq.protocol_version)
    except Exception as exc:  # pynetdicom raises many types on malformed input
        raise RequestError(f"undecodable A-ASSOCIATE-RQ ({exc.__class__.__name__}: {exc})") \
            from None
    for context in request.proposed:
        # PS3.8 9.3.2.2: one abstract syntax and at least one transfer syntax.  pynetdicom
        # decodes context items without them, and its negotiation then raises TypeError or
        # accepts a context with no transfer syntax (found by tests/robustness fuzzing).
        if context.abstract_syntax is None or context.context_id is None:
            raise RequestError(f"presentation context {context.context_id} has no abstract "
                               "syntax")
        if not context.transfer_syntax:
            raise RequestError(f"presentation context {context.context_id} has no transfer "
                               "syntax")
    return request, primitive, version


def screen(request: Request, primitive: A_ASSOCIATE, version: int, config: Config) \
        -> Rejection | None:
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


@functools.lru_cache(maxsize=1)
def _commitment_context() -> PresentationContext:
    uid, syntaxes = negotiation.commitment_context()
    context = build_context(uid, list(syntaxes))
    context.scu_role, context.scp_role = True, False  # the requestor is SCU, never SCP
    return context


def warm_up(config: Config) -> None:
    """Build the acceptor contexts now, in the master, so every forked worker inherits them
    (building ~200 contexts costs ~40 ms, once per association otherwise)."""
    _supported(config.negotiation.preferred_transfer_syntax)


def accept(request: Request, primitive: A_ASSOCIATE, config: Config,
           verification_only: bool = False) -> Acceptance:
    """Negotiate the presentation contexts and encode the A-ASSOCIATE-AC.

    With negotiation.profile set the profile alone decides (`worker.profile`, storescp -xf);
    otherwise storescp's preference list (and promiscuous mode) does, through pynetdicom.
    `verification_only` (the proxy's own LOCAL connection): whatever the configuration
    accepts, every context but Verification is rejected (result 1, user rejection), with
    no role or extended negotiation reply for it.
    """
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
    results, role_replies = negotiate_as_acceptor(request.proposed, supported, roles or None)
    if verification_only:
        _reject_all_but_verification(results)
        role_replies = [r for r in role_replies if str(r.sop_class_uid) == VERIFICATION]
    ac = _encode_ac(primitive, config, results, [*role_replies])

    accepted = {
        cx.context_id: AcceptedContext(cx.context_id, str(cx.abstract_syntax),
                                       str(cx.transfer_syntax[0]))
        for cx in results if cx.result == 0x00 and cx.context_id is not None
    }
    rejected = [cx for cx in results if cx.result != 0x00]
    return Acceptance(accepted, rejected, ac.encode())


def _reject_all_but_verification(results: list[PresentationContext]) -> None:
    for cx in results:
        if cx.result == CONTEXT_ACCEPTED and str(cx.abstract_syntax) != VERIFICATION:
            cx.result = CONTEXT_USER_REJECTION


def _encode_ac(primitive: A_ASSOCIATE, config: Config, results: list[PresentationContext],
               extra: list[Any]) -> A_ASSOCIATE_AC:
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
    ac = A_ASSOCIATE_AC()
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
    rejected = [cx for cx in results if cx.result != profile.ACCEPTED]
    return Acceptance(accepted, rejected, ac.encode())
