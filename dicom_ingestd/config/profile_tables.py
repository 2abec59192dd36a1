"""Negotiation profiles in TOML: [negotiation.transfer_syntaxes] and [negotiation.profiles.NAME].

The content of a DCMTK association configuration file (storescp -xf), written the way the
rest of ingestd.toml is::

    [negotiation.transfer_syntaxes]
    Uncompressed = ["ExplicitVRLittleEndian", "ExplicitVRBigEndian", "ImplicitVRLittleEndian"]

    [negotiation.profiles.CT.contexts]        # SOP class = list name, or an inline list
    Verification = "Uncompressed"
    CTImageStorage = ["JPEGBaseline8Bit", "ExplicitVRLittleEndian"]

    [negotiation.profiles.CT.roles]           # optional: scu, scp or both
    CTImageStorage = "both"

    [negotiation.profiles.CT.extended_negotiation]   # optional: hexadecimal bytes
    CTImageStorage = "020003000000"

UIDs are written numerically or by their DICOM keyword (pydicom's UID dictionary, i.e. PS3.6
Table A-1); after loading, everything is numeric.  `parse_transfer_syntaxes` and
`parse_profiles` validate the raw TOML values for the loader (every problem as a
``(key, value, what is allowed)`` triple, so a file is fixed in one pass); `to_toml` turns the
validated values back into TOML values; `uid_text` is the spelling the translators write.

Rules beyond DCMTK's (which accepts any digits-and-dots string): a UID is 1-64 characters of
digits separated by dots; a transfer syntax list holds no UID the dictionary knows as something
other than a transfer syntax, and a SOP class is no known transfer syntax.  Unlike storescp a
profile may list more than 128 SOP classes (the limit only matters for a requestor).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from pydicom._uid_dict import UID_dictionary

from dicom_ingestd.config.asconfig import Asconfig, AsconfigProfile
from dicom_ingestd.config.schema import ROLE_CHOICES, NegotiationProfile

__all__ = [
    "from_asconfig", "parse_profiles", "parse_transfer_syntaxes", "resolve_uid", "to_toml",
    "uid_text",
]

Problem = tuple[str, object, str]

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
TRANSFER_SYNTAX = "Transfer Syntax"
MAX_EXTNEG_BYTES = 1023  # DCMTK's limit for one extended negotiation item
PROFILE_KEYS = ("contexts", "roles", "extended_negotiation")


@cache
def _keywords() -> dict[str, tuple[str, str]]:
    """DICOM keyword -> (UID, UID type), from pydicom's UID dictionary."""
    return {entry[4]: (uid, entry[1]) for uid, entry in UID_dictionary.items() if entry[4]}


def _kind(uid: str) -> str:
    entry = UID_dictionary.get(uid)
    return entry[1] if entry else ""


def resolve_uid(text: str, *, transfer_syntax: bool) -> str:
    """The numeric UID for `text` (a UID or a DICOM keyword); ValueError says what is wrong."""
    what = "a transfer syntax" if transfer_syntax else "a SOP class"
    if _UID.fullmatch(text):
        if len(text) > 64:
            raise ValueError("a UID has at most 64 characters")
        uid = text
    else:
        entry = _keywords().get(text)
        if entry is None:
            wanted = [k for k, (_, kind) in _keywords().items()
                      if (kind == TRANSFER_SYNTAX) == transfer_syntax]
            close = difflib.get_close_matches(text, wanted, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"must be {what} UID or DICOM keyword{hint}")
        uid = entry[0]
    kind = _kind(uid)
    if transfer_syntax and kind and kind != TRANSFER_SYNTAX:
        raise ValueError(f"{uid} is a {kind} ({UID_dictionary[uid][0]}), not a transfer syntax")
    if not transfer_syntax and kind == TRANSFER_SYNTAX:
        raise ValueError(f"{uid} is a transfer syntax ({UID_dictionary[uid][0]}), not a SOP "
                         "class")
    return uid


def uid_text(uid: str) -> str:
    """How a translation writes `uid`: its DICOM keyword when it has one, else the UID."""
    entry = UID_dictionary.get(uid)
    keyword = entry[4] if entry else ""
    return keyword if keyword and _keywords().get(keyword, ("",))[0] == uid else uid


def key_label(key: str) -> str:
    """A TOML key as written in a dotted path (quoted unless it is a bare key)."""
    return key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'


def _syntaxes(label: str, value: object, problems: list[Problem]) -> tuple[str, ...]:
    """A non-empty array of transfer syntaxes -> UIDs (problems appended; bad ones dropped)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        problems.append((label, value, "must be a non-empty array of transfer syntax UIDs or "
                                       "keywords, in our order of preference"))
        return ()
    uids: list[str] = []
    for index, text in enumerate(value):
        try:
            uids.append(resolve_uid(text, transfer_syntax=True))
        except ValueError as exc:
            problems.append((f"{label}[{index}]", text, str(exc)))
    return tuple(uids)


def parse_transfer_syntaxes(full: str, value: object) -> tuple[dict[str, list[str]],
                                                                list[Problem]]:
    """[negotiation.transfer_syntaxes]: NAME = [transfer syntaxes] -> {NAME: [UIDs]}."""
    problems: list[Problem] = []
    if not isinstance(value, Mapping):
        return {}, [(full, value, "must be a table: NAME = [transfer syntaxes]")]
    lists = {str(name): list(_syntaxes(f"{full}.{key_label(str(name))}", raw, problems))
             for name, raw in value.items()}
    return lists, problems


def parse_profiles(full: str, value: object, lists: Mapping[str, Any]) \
        -> tuple[dict[str, NegotiationProfile], list[Problem]]:
    """[negotiation.profiles.NAME] tables -> {NAME: NegotiationProfile}.

    `lists` is the raw [negotiation.transfer_syntaxes] table (its own problems are reported
    by `parse_transfer_syntaxes`; here only a reference to a missing list is one).
    """
    problems: list[Problem] = []
    if not isinstance(value, Mapping):
        return {}, [(full, value, "must be a table of profiles: [negotiation.profiles.NAME]")]
    resolved, _ = parse_transfer_syntaxes("", lists if isinstance(lists, Mapping) else {})
    profiles: dict[str, NegotiationProfile] = {}
    for name, body in value.items():
        label = f"{full}.{key_label(str(name))}"
        if not isinstance(body, Mapping):
            problems.append((label, body, "must be a table with contexts (and optionally roles "
                                          "and extended_negotiation)"))
            continue
        for key in body:
            if key not in PROFILE_KEYS:
                close = difflib.get_close_matches(str(key), PROFILE_KEYS, n=1)
                hint = f" (did you mean {label}.{close[0]}?)" if close else ""
                problems.append((f"{label}.{key_label(str(key))}", body[key],
                                 f"unknown key{hint}; a profile has contexts, roles and "
                                 "extended_negotiation"))
        profiles[str(name)] = _profile(label, body, resolved, problems)
    return profiles, problems


def _sop_classes(label: str, table: object, problems: list[Problem], what: str) \
        -> list[tuple[str, str, object]]:
    """(key as written, UID, value) of a table keyed by SOP class; duplicates are problems."""
    if not isinstance(table, Mapping):
        problems.append((label, table, f"must be a table: SOP class = {what}"))
        return []
    found: list[tuple[str, str, object]] = []
    first: dict[str, str] = {}
    for key, item in table.items():
        item_label = f"{label}.{key_label(str(key))}"
        try:
            uid = resolve_uid(str(key), transfer_syntax=False)
        except ValueError as exc:
            problems.append((item_label, item, f"the key {exc}"))
            continue
        if uid in first:
            problems.append((item_label, item, f"the SOP class {uid} is already listed as "
                                               f"{first[uid]}; each SOP class once"))
            continue
        first[uid] = str(key)
        found.append((str(key), uid, item))
    return found


def _profile(label: str, body: Mapping[str, Any], lists: Mapping[str, list[str]],
             problems: list[Problem]) -> NegotiationProfile:
    contexts: dict[str, tuple[str, ...]] = {}
    context_lists: dict[str, str] = {}
    raw_contexts = body.get("contexts")
    if raw_contexts is None or (isinstance(raw_contexts, Mapping) and not raw_contexts):
        problems.append((f"{label}.contexts", raw_contexts or {}, "a profile needs a contexts "
                         "table with at least one SOP class = transfer syntaxes"))
        raw_contexts = {}
    for key, uid, item in _sop_classes(f"{label}.contexts", raw_contexts, problems,
                                       "transfer syntax list name or array"):
        item_label = f"{label}.contexts.{key_label(key)}"
        if isinstance(item, str):
            if item not in lists:
                defined = ", ".join(lists) or "none"
                problems.append((item_label, item, "must name a list of "
                                 f"[negotiation.transfer_syntaxes] (defined: {defined}) or be "
                                 "an array of transfer syntaxes"))
                continue
            contexts[uid] = tuple(lists[item])
            context_lists[uid] = item
        else:
            contexts[uid] = _syntaxes(item_label, item, problems)
    roles: dict[str, str] = {}
    for key, uid, item in _sop_classes(f"{label}.roles", body.get("roles", {}), problems,
                                       "scu, scp or both"):
        item_label = f"{label}.roles.{key_label(key)}"
        if item not in ROLE_CHOICES:
            problems.append((item_label, item, "must be one of " + ", ".join(ROLE_CHOICES)))
        elif uid not in contexts:
            problems.append((item_label, item, f"{key} is not in {label}.contexts (as in "
                                               "storescp, only SOP classes of the profile)"))
        else:
            roles[uid] = str(item)
    extneg: dict[str, bytes] = {}
    for key, uid, item in _sop_classes(f"{label}.extended_negotiation",
                                       body.get("extended_negotiation", {}), problems,
                                       "hexadecimal bytes"):
        item_label = f"{label}.extended_negotiation.{key_label(key)}"
        if (not isinstance(item, str) or not re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", item)
                or len(item) > 2 * MAX_EXTNEG_BYTES):
            problems.append((item_label, item, "must be 1 to 1023 bytes as pairs of "
                                               "hexadecimal digits, e.g. \"020003000000\""))
        elif uid not in contexts:
            problems.append((item_label, item, f"{key} is not in {label}.contexts (as in "
                                               "storescp, only SOP classes of the profile)"))
        else:
            extneg[uid] = bytes.fromhex(item)
    return NegotiationProfile(contexts, context_lists, roles, extneg)


def to_toml(lists: Mapping[str, list[str]], profiles: Mapping[str, NegotiationProfile], *,
            names: bool = False) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The TOML values of [negotiation.transfer_syntaxes] and [negotiation.profiles].

    With `names`, UIDs are written as DICOM keywords where they have one (`uid_text`).
    """
    def text(uid: str) -> str:
        return uid_text(uid) if names else uid

    toml_lists = {name: [text(uid) for uid in uids] for name, uids in lists.items()}
    toml_profiles: dict[str, Any] = {}
    for name, profile in profiles.items():
        body: dict[str, Any] = {"contexts": {
            text(uid): profile.context_lists.get(uid) or [text(ts) for ts in syntaxes]
            for uid, syntaxes in profile.contexts.items()}}
        if profile.roles:
            body["roles"] = {text(uid): role for uid, role in profile.roles.items()}
        if profile.extended_negotiation:
            body["extended_negotiation"] = {
                text(uid): data.hex().upper() for uid, data in profile.extended_negotiation.items()}
        toml_profiles[name] = body
    return toml_lists, toml_profiles


def from_asconfig(asconfig: Asconfig, chosen: Sequence[AsconfigProfile]) \
        -> tuple[dict[str, list[str]], dict[str, Any]]:
    """TOML values of [negotiation.transfer_syntaxes] and [negotiation.profiles] for the
    `chosen` profiles of a DCMTK file, named as written there, UIDs as DICOM keywords.

    Only the transfer syntax lists the profiles use are written, in file order.  Raises
    ValueError (one line per problem) if the result would not load, e.g. a SOP class that is
    a transfer syntax: storescp takes any digits and dots, we check more (see module doc).
    """
    used = {key for profile in chosen for _, key in profile.contexts}
    names = asconfig.transfer_syntax_names
    lists = {names[key]: [uid_text(uid) for uid in uids]
             for key, uids in asconfig.transfer_syntaxes.items() if key in used}
    tables: dict[str, Any] = {}
    for profile in chosen:
        body: dict[str, Any] = {
            "contexts": {uid_text(uid): names[key] for uid, key in profile.contexts}}
        if profile.roles:
            body["roles"] = {uid_text(uid): role for uid, role in profile.roles}
        if profile.extended_negotiation:
            body["extended_negotiation"] = {uid_text(uid): data.hex().upper()
                                            for uid, data in profile.extended_negotiation}
        tables[profile.name] = body
    problems = parse_transfer_syntaxes("negotiation.transfer_syntaxes", lists)[1]
    problems += parse_profiles("negotiation.profiles", tables, lists)[1]
    if problems:
        raise ValueError("\n".join(f"{asconfig.source}: {label} = {value!r}: {allowed}"
                                   for label, value, allowed in problems))
    return lists, tables
