"""Accepting an association by a negotiation profile, as storescp 3.6.7 -xf FILE PROFILE does.

Contract (DCMTK's DcmAssociationConfiguration::evaluateAssociationParameters together with
ASC_acceptPresentationContext and the A-ASSOCIATE-AC construction; pure, no I/O):

* Each proposed presentation context, in proposal order: a SOP class the profile does not list
  is refused with "abstract syntax not supported" (0x03).  Otherwise the first transfer syntax
  of the profile's list for it that the peer proposed is accepted; none: "transfer syntaxes
  not supported" (0x04).  Refused contexts name implicit VR little endian as their transfer
  syntax, as DCMTK does.
* Roles.  The peer's proposed role for a SOP class is its first SCP/SCU role selection item
  for it (SCU and SCP flags equal, even both 0: both; else the one set), or the default role
  without an item.  Ours is the profile's ``roles`` entry, or the default role.  A context
  proposed with the default role for a SOP class we set to ``scp`` is refused (0x02, no
  reason); other combinations are accepted, and when both sides name a role the context gets a
  role selection item in the reply: SCU flag set if we allow scu (scu or both) and the peer
  did not propose scp only, SCP flag set if we allow scp and the peer did not propose scu only
  (both 0 is possible and sent, as DCMTK does).  One item per accepted context.
* Extended negotiation: each item of the profile's ``extended_negotiation`` (profile order)
  whose SOP class has an accepted context is sent, whether or not the peer proposed extended
  negotiation for it -- DCMTK's behaviour, kept so peers see the same reply.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from dicom_ingestd.config.schema import NegotiationProfile
from dicom_ingestd.dcmtk.transfer import IMPLICIT_LE

__all__ = ["ContextAnswer", "ProfileAnswer", "negotiate", "proposed_role"]

ACCEPTED, NO_REASON, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 2, 3, 4
DEFAULT: Final = "default"


@dataclass(frozen=True, slots=True)
class ContextAnswer:
    """The answer to one proposed presentation context."""

    context_id: int
    abstract_syntax: str
    result: int
    transfer_syntax: str  # the accepted one; IMPLICIT_LE when refused
    role: tuple[int, int] | None = None  # (SCU flag, SCP flag) of its role selection item


@dataclass(slots=True)
class ProfileAnswer:
    """Every context answered, in proposal order, and the extended negotiation items."""

    contexts: list[ContextAnswer] = field(default_factory=list)
    extended_negotiation: list[tuple[str, bytes]] = field(default_factory=list)


def proposed_role(scu: bool, scp: bool) -> str:
    """The role a peer proposes with one role selection item, as DCMTK reads it."""
    if scu == scp:
        return "both"
    return "scu" if scu else "scp"


def _role_item(proposed: str, ours: str) -> tuple[int, int] | None:
    if proposed == DEFAULT or ours == DEFAULT:
        return None
    scu = int(ours in ("scu", "both") and proposed != "scp")
    scp = int(ours in ("scp", "both") and proposed != "scu")
    return scu, scp


def negotiate(proposed: Iterable[tuple[int, str, Sequence[str]]],
              requested_roles: Mapping[str, tuple[bool, bool]],
              profile: NegotiationProfile) -> ProfileAnswer:
    """Answer `proposed` ((context ID, abstract syntax, transfer syntaxes) in proposal order).

    `requested_roles` holds the peer's first role selection item per SOP class UID as
    (SCU flag, SCP flag).
    """
    answer = ProfileAnswer()
    accepted: set[str] = set()
    for context_id, abstract_syntax, syntaxes in proposed:
        ours = profile.contexts.get(abstract_syntax)
        if ours is None:
            answer.contexts.append(ContextAnswer(
                context_id, abstract_syntax, ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT_LE))
            continue
        offered = set(syntaxes)
        chosen = next((ts for ts in ours if ts in offered), None)
        if chosen is None:
            answer.contexts.append(ContextAnswer(
                context_id, abstract_syntax, TRANSFER_SYNTAXES_NOT_SUPPORTED, IMPLICIT_LE))
            continue
        flags = requested_roles.get(abstract_syntax)
        their_role = DEFAULT if flags is None else proposed_role(*flags)
        our_role = profile.roles.get(abstract_syntax, DEFAULT)
        if their_role == DEFAULT and our_role == "scp":
            answer.contexts.append(ContextAnswer(
                context_id, abstract_syntax, NO_REASON, IMPLICIT_LE))
            continue
        answer.contexts.append(ContextAnswer(context_id, abstract_syntax, ACCEPTED, chosen,
                                             _role_item(their_role, our_role)))
        accepted.add(abstract_syntax)
    answer.extended_negotiation = [(uid, data) for uid, data
                                   in profile.extended_negotiation.items() if uid in accepted]
    return answer
