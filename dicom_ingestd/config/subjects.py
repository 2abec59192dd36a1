"""Certificate subjects as [tls] writes them and as a peer's certificate carries them.

One grammar for the loader's checks of `tls.allowed_subjects` (and the per-subject AE titles)
and for the worker's comparison with the verified peer certificate: RFC 4514 text or OpenSSL's
way of printing a subject, compared by attribute and value (order, case and the spaces around
separators do not matter).  A leaf: standard library only.
"""

# Attribute names as OpenSSL's long names (getpeercert) and the usual short forms, to one
# spelling, so an allow list can be written either way.
_ATTRIBUTES = {
    "commonname": "CN", "cn": "CN", "organizationname": "O", "o": "O",
    "organizationalunitname": "OU", "ou": "OU", "countryname": "C", "c": "C",
    "stateorprovincename": "ST", "st": "ST", "s": "ST", "localityname": "L", "l": "L",
    "emailaddress": "emailAddress", "e": "emailAddress", "domaincomponent": "DC", "dc": "DC",
    "serialnumber": "serialNumber", "streetaddress": "street", "street": "street",
    "title": "title", "givenname": "GN", "gn": "GN", "surname": "SN", "sn": "SN",
    "userid": "UID", "uid": "UID", "pseudonym": "pseudonym",
}


def _attribute(name: str) -> str:
    name = name.strip()
    return _ATTRIBUTES.get(name.lower(), name)


def _escape(value: str) -> str:
    out = "".join("\\" + ch if ch in ',+"\\<>;=' else ch for ch in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def subject_text(subject: object) -> str:
    """getpeercert()'s subject as RFC 4514 text, most specific first: 'CN=ct1,O=Hospital'."""
    if not isinstance(subject, tuple):
        return ""
    rdns = []
    for rdn in subject:
        rdns.append("+".join(f"{_attribute(str(k))}={_escape(str(v))}" for k, v in rdn))
    return ",".join(reversed(rdns))


SubjectKey = tuple[tuple[str, str], ...]


def parse_subject(text: str) -> SubjectKey:
    """A subject written as RFC 4514 ('CN=ct1,O=Hospital') or as OpenSSL prints it
    ('C = DE, O = Hospital, CN = ct1'), as a comparable key: attribute order, case and the
    spaces around separators do not matter.  Raises ValueError for text that is no subject."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(ch + next(chars, ""))
        elif ch in ",+;":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    pairs = []
    for part in parts:
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"{part.strip()!r} is not ATTRIBUTE=value")
        unescaped = []
        escaped = iter(value.strip())
        for ch in escaped:
            unescaped.append(next(escaped, "") if ch == "\\" else ch)
        pairs.append((_attribute(name).lower(), " ".join("".join(unescaped).split()).casefold()))
    return tuple(sorted(pairs))
