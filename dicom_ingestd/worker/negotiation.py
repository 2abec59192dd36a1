"""Presentation-context negotiation policy, as storescp 3.6.7 does it.

Contract
--------
* ``preference_list(key)`` is the ordered transfer-syntax list storescp 3.6.7 builds for one of
  its "preferred network transfer syntaxes" options (the lists are data taken from DCMTK, in
  ``dcmtk/transfer.py``).  The order *is* the preference: DCMTK's
  ``ASC_acceptContextsWithPreferredTransferSyntaxes`` and pynetdicom's ``negotiate_as_acceptor``
  both accept, per proposed presentation context, the first transfer syntax of the *acceptor's*
  list that the requestor proposed; the requestor's order never matters
  (``choose_transfer_syntax`` is that rule).
* storescp uses one list for everything it accepts: Verification, every SOP class in
  ``dcmAllStorageSOPClassUIDs`` (``dcmtk/storage.py``) and, with ``-pm``, unknown SOP
  classes.  ``acceptor_contexts`` returns Verification plus the union of DCMTK 3.6.7's list
  and pynetdicom's storage SOP classes, each with the chosen list.
* ``-pm`` (promiscuous) in storescp accepts a proposed abstract syntax only if DCMTK has no name
  for the UID (``dcmFindNameOfUID() == NULL``), with the same preference list; known
  non-storage SOP classes (worklist, storage commitment, hanging protocol, ...) are still
  refused.  The set of unknown UIDs can only be known per association, so
  ``promiscuous_contexts_for`` turns the A-ASSOCIATE-RQ's proposals into extra acceptor contexts.

Deliberate differences from storescp 3.6.7 (all about *which* SOP classes, never the order):

* The pynetdicom-only storage SOP classes (newer than DCMTK 3.6.7, e.g. Photoacoustic Image
  Storage) are accepted without ``-pm`` too; storescp accepts them only with ``-pm``.
* In promiscuous mode "known" means named by pydicom's UID dictionary *or* by DCMTK 3.6.7, so a
  UID from a newer edition of the standard (a new query SOP class, a newer transfer syntax UID
  used as an abstract syntax) is refused where storescp would accept it; and a proposed abstract
  syntax that is not a UID at all (empty, letters, longer than 64) is refused, not accepted.
"""

import re
from collections.abc import Collection, Iterable, Sequence
from typing import Final, Protocol

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_ingestd.commitment.dataset import SOP_CLASS as COMMITMENT_UID
from dicom_ingestd.commitment.dataset import TRANSFER_SYNTAXES as COMMITMENT_SYNTAXES
from dicom_ingestd.dcmtk.storage import DCMTK_STORAGE_SOP_CLASSES
from dicom_ingestd.dcmtk.transfer import PREFERENCES, STORESCP_FLAG_TO_PREFERENCE
from dicom_ingestd.dcmtk.uids import DCMTK_UID_NAMES

__all__ = [
    "STORAGE_SOP_CLASSES",
    "VERIFICATION_SOP_CLASS",
    "acceptor_contexts",
    "choose_transfer_syntax",
    "is_unknown_sop_class",
    "preference_list",
    "promiscuous_contexts_for",
]

VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"
COMMITMENT_SOP_CLASS: Final = COMMITMENT_UID
COMMITMENT_TRANSFER_SYNTAXES: Final = COMMITMENT_SYNTAXES


def _unique(uids: Iterable[str]) -> tuple[str, ...]:
    """Deduplicate, keeping the first occurrence (a stable order keeps logs and tests stable)."""
    return tuple(dict.fromkeys(uids))


_PYNETDICOM_STORAGE_SOP_CLASSES: Final = _unique(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax
)

STORAGE_SOP_CLASSES: Final[tuple[str, ...]] = _unique(
    (*DCMTK_STORAGE_SOP_CLASSES, *_PYNETDICOM_STORAGE_SOP_CLASSES)
)

_STATIC_ABSTRACT_SYNTAXES: Final = frozenset((VERIFICATION_SOP_CLASS, *STORAGE_SOP_CLASSES))

# storescp -pm refuses every UID DCMTK can name, so "known" covers DCMTK's names as well as
# pydicom's (a few, such as GE's private big-endian syntax, are DCMTK's only).
_DCMTK_NAMED_UIDS: Final = frozenset(DCMTK_UID_NAMES.values())

# Lenient on purpose: private SOP classes in the field often carry leading zeros in a component
# ("1.2.840.113619.4.030"), which PS3.5 forbids but storescp -pm accepts; refusing them would
# defeat the point of promiscuous mode.  Anything that is not digits and dots is refused.
_UID_SHAPE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def preference_list(preference: str) -> tuple[str, ...]:
    """Return the ordered transfer syntaxes for a preference key ("uncompressed", "all", ...).

    Raises ValueError for an unknown key, naming the key a storescp flag maps to if a flag was
    passed by mistake.
    """
    try:
        return PREFERENCES[preference]
    except KeyError:
        hint = ""
        if preference in STORESCP_FLAG_TO_PREFERENCE:
            hint = f" (storescp {preference} is {STORESCP_FLAG_TO_PREFERENCE[preference]!r})"
        choices = ", ".join(PREFERENCES)
        raise ValueError(
            f"unknown transfer syntax preference {preference!r}{hint}; one of {choices}"
        ) from None


def acceptor_contexts(
    preference: str, *, promiscuous: bool
) -> list[tuple[str, tuple[str, ...]]]:
    """Return the static acceptor contexts: (abstract syntax, transfer syntaxes in preference).

    Verification first, then every storage SOP class of ``STORAGE_SOP_CLASSES``; all share the
    one list of ``preference``, as in storescp (Verification included, even for +xa or +xs).

    ``promiscuous`` does not change the result, by design: storescp's -pm never changes how it
    negotiates SOP classes it knows, it only adds a pass for the ones it cannot name, which are
    known per association only -- use ``promiscuous_contexts_for`` for those.  The keyword is
    required so call sites state the mode they run in.
    """
    del promiscuous  # see docstring: the static table is the same in both modes
    syntaxes = preference_list(preference)
    return [(VERIFICATION_SOP_CLASS, syntaxes)] + [(uid, syntaxes) for uid in STORAGE_SOP_CLASSES]


def commitment_context() -> tuple[str, tuple[str, ...]]:
    """The Storage Commitment Push Model context we accept with [storage_commitment]:
    explicit, then implicit VR little endian (its data sets are read by our own reader,
    commitment/dataset.py, which knows these two only).  The requestor may act as SCU only:
    we never send N-ACTION (role selection, PS3.7 D.3.3.4)."""
    return COMMITMENT_SOP_CLASS, COMMITMENT_TRANSFER_SYNTAXES


def choose_transfer_syntax(
    preference_list: Sequence[str], proposed: Sequence[str]
) -> str | None:
    """Return the transfer syntax an acceptor picks for one proposed presentation context.

    The rule of both DCMTK and pynetdicom: the first syntax of *our* list that the requestor
    proposed; the requestor's order is irrelevant.  None means the context is refused with
    "transfer syntaxes not supported" (0x04).  UIDs are compared exactly, as decoded.
    """
    offered = set(proposed)
    return next((syntax for syntax in preference_list if syntax in offered), None)


def is_unknown_sop_class(uid: str) -> bool:
    """True if storescp -pm would accept ``uid`` as an unknown (typically private) SOP class.

    storescp accepts an abstract syntax in promiscuous mode exactly when DCMTK cannot name the
    UID.  "Named" here is pydicom's UID dictionary plus DCMTK 3.6.7's extra names, a superset of
    DCMTK's, so this never accepts what storescp refuses.  Values that are not digits and dots
    (or are longer than 64 characters) are refused too.
    """
    if len(uid) > 64 or _UID_SHAPE.fullmatch(uid) is None:
        return False
    if uid in _STATIC_ABSTRACT_SYNTAXES or uid in _DCMTK_NAMED_UIDS:
        return False
    # UID.type is the dictionary's UID type ("SOP Class", "Transfer Syntax", ...), "" if unknown.
    # No validation: a leading-zero private UID must neither warn nor (in RAISE mode) raise.
    return not UID(uid, validation_mode=pydicom_config.IGNORE).type


class ProposedContext(Protocol):
    """What ``promiscuous_contexts_for`` reads from a proposed presentation context."""

    @property
    def abstract_syntax(self) -> str | None: ...


def promiscuous_contexts_for(
    requested_contexts: Iterable[ProposedContext],
    preference: str,
    *,
    supported: Collection[str] | None = None,
) -> list[tuple[str, tuple[str, ...]]]:
    """Return the acceptor contexts promiscuous mode adds for one A-ASSOCIATE-RQ.

    ``requested_contexts`` are the proposed presentation contexts (pynetdicom
    ``PresentationContext`` items, or anything with ``.abstract_syntax``).  For each distinct
    abstract syntax that is not in ``supported`` (default: the abstract syntaxes of
    ``acceptor_contexts``) and is unknown (``is_unknown_sop_class``), one context with *our*
    whole preference list is returned, in order of first proposal.  The list is not narrowed to
    what was proposed: negotiation picks per proposed context, and an unknown SOP class proposed
    with none of our syntaxes must be refused with "transfer syntaxes not supported" (0x04), as
    storescp does, not with "abstract syntax not supported" (0x03).
    """
    syntaxes = preference_list(preference)
    have = _STATIC_ABSTRACT_SYNTAXES if supported is None else supported
    added: dict[str, tuple[str, ...]] = {}
    for context in requested_contexts:
        uid = context.abstract_syntax
        if uid is None:
            continue
        uid = str(uid)
        if uid not in added and uid not in have and is_unknown_sop_class(uid):
            added[uid] = syntaxes
    return list(added.items())
