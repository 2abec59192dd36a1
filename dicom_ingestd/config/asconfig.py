"""Read DCMTK association negotiation profile files, as storescp 3.6.7 does for -xf FILE PROFILE.

A leaf (stdlib only).  The format is described in DCMTK's dcmnet/docs/asconfig.txt; this module
reproduces how DCMTK 3.6.7 actually reads it, because the translation must accept exactly the
files storescp accepts and mean the same by them:

* The reader (DCMTK's OFConfigFile, two levels): ``[[Supersection]]`` and ``[Section]``
  headers and ``Key = Value`` entries.  Keys and section names are upper-cased and keep only
  A-Z, 0-9, '-' and '_' (so ``[Any Transfer.Syntax]`` is ``ANYTRANSFERSYNTAX``); blanks and
  line ends between a key's characters are skipped.  A '#' in the first column starts a
  comment line.  A value starts at its first non-blank character and keeps trailing blanks;
  a following line that starts with a blank continues it (joined with a line feed).  Entries
  outside a section are dropped.  Of two supersections with one name only the first counts;
  sections with one name are merged; of two entries with one key in a section the first
  counts.  Lines end with LF, CR or CR LF; NUL bytes read as spaces.
* The meaning (DcmAssociationConfigurationFile): entries are read as ``TransferSyntax1``,
  ``TransferSyntax2``, ... up to the first missing number (later ones are ignored, we warn);
  UIDs may be written as DCMTK symbolic names (``dcmtk.uids``, looked up exactly, with
  an optional leading '='; ``LocalEndianExplicit``/``OppositeEndianExplicit`` are explicit
  little/big endian on the little-endian hosts we run on) and must then consist of digits and
  dots.  References between sections are compared after removing blanks and upper-casing.
  The first problem anywhere in the file is fatal, even in a profile that is not used: storescp
  refuses to start on such a file.

`read_asconfig(path)` returns an `Asconfig`; `Asconfig.select(name)` applies storescp's checks
for the profile it is told to use (known name, no SOP class twice).  Every failure raises
`AsconfigError` with one line naming the file and, in DCMTK's words where it has any, the
problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from dicom_ingestd.dcmtk.transfer import EXPLICIT_BE, EXPLICIT_LE
from dicom_ingestd.dcmtk.uids import DCMTK_UID_NAMES

__all__ = ["Asconfig", "AsconfigError", "AsconfigProfile", "mangle", "read_asconfig"]

ROLES: Final = {"SCU": "scu", "SCP": "scp", "BOTH": "both"}
MAX_CONTEXTS: Final = 128  # DCMTK refuses longer presentation context lists
MAX_EXTNEG_HEX: Final = 2047  # DCMTK: "cannot handle > 1024 bytes" (value minus the separator)


class AsconfigError(Exception):
    """The file cannot be used, as storescp would refuse it; the message is one line."""


@dataclass(frozen=True, slots=True)
class AsconfigProfile:
    """One profile, resolved: UIDs only, in file order.

    `contexts` pairs each SOP class UID with the key of its transfer syntax list (see
    `Asconfig.transfer_syntaxes`); `roles` and `extended_negotiation` come from the lists the
    profile names, or are empty.
    """

    name: str  # the section name as written in the file
    contexts: tuple[tuple[str, str], ...]
    roles: tuple[tuple[str, str], ...] = ()  # (SOP class UID, "scu" | "scp" | "both")
    extended_negotiation: tuple[tuple[str, bytes], ...] = ()


@dataclass(slots=True)
class Asconfig:
    """A whole association configuration file as DCMTK holds it after reading."""

    source: str
    transfer_syntaxes: dict[str, tuple[str, ...]]  # list key -> UIDs in preference order
    transfer_syntax_names: dict[str, str]  # list key -> its name as written in the file
    profiles: dict[str, AsconfigProfile]  # profile key -> profile
    warnings: list[str] = field(default_factory=list)

    def select(self, name: str) -> AsconfigProfile:
        """The profile storescp uses for ``-xf FILE name``; AsconfigError as storescp refuses."""
        key = mangle(name)
        profile = self.profiles.get(key)
        if profile is None:
            known = ", ".join(p.name for p in self.profiles.values()) or "none"
            raise AsconfigError(f"{self.source}: unknown configuration profile name: {key} "
                                f"(profiles in the file: {known})")
        seen: set[str] = set()
        for uid, _ in profile.contexts:
            if uid in seen:
                raise AsconfigError(
                    f"{self.source}: profile '{key}' is not valid for SCP use, duplicate "
                    f"abstract syntaxes found ({uid})")
            seen.add(uid)
        return profile


def mangle(text: str) -> str:
    """DCMTK's name mangling for references: blanks removed, ASCII letters upper-cased."""
    return _ascii_upper("".join(ch for ch in text if ch not in " \t\n\v\f\r"))


def _ascii_upper(text: str) -> str:
    """toupper() in the C locale: only a-z change."""
    return "".join(chr(ord(ch) - 32) if "a" <= ch <= "z" else ch for ch in text)


def read_asconfig(path: str | Path) -> Asconfig:
    """Read and check the file at `path` as storescp does; AsconfigError if it cannot."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AsconfigError(f"{source}: unable to open configuration file: "
                            f"{exc.strerror or exc}") from None
    return parse_asconfig(data, source)


def parse_asconfig(data: bytes, source: str = "<asconfig>") -> Asconfig:
    """Interpret the content of an association configuration file (see the module doc)."""
    warnings: list[str] = []
    tree = _read_tree(data, warnings, source)
    interpreter = _Interpreter(tree, source)
    interpreter.warnings = warnings
    return interpreter.run()


# ------------------------------------------------------------------------------------------
# The reader: DCMTK's OFConfigFile with two levels, unordered mode, '#' comments


@dataclass(slots=True)
class _Node:
    keyword: str
    written: str = ""  # section headers: the name as written, for messages and output
    value: str = ""
    children: list[_Node] = field(default_factory=list)

    def child(self, keyword: str) -> _Node | None:
        return next((c for c in self.children if c.keyword == keyword), None)


_NEWLINE, _BLANK, _TAB = 10, 32, 9


class _Reader:
    """A byte stream with getc/ungetc and the comment and line-end rules of OFConfigFile."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.eof = False
        self.at_line_start = True
        self.after_cr = False

    def getc(self) -> int:
        if self.pos >= len(self.data):
            self.eof = True
            return -1
        self.pos += 1
        return self.data[self.pos - 1]

    def ungetc(self) -> None:
        self.pos -= 1

    def read_char(self) -> int:
        """The next character with comments removed and every line end as one LF."""
        in_comment = False
        while True:
            c = self.getc()
            if self.eof:
                return c
            if c == 10 and self.after_cr and self.at_line_start:
                self.after_cr = False
                continue
            if c in (10, 13):
                self.at_line_start = True
                self.after_cr = c == 13
                if in_comment:
                    in_comment = False
                    continue
                return _NEWLINE
            if c == ord("#") and self.at_line_start:
                in_comment = True
                self.at_line_start = False
                continue
            if not in_comment:
                self.at_line_start = False
                return _BLANK if c == 0 else c

    def read_keyword_char(self) -> int:
        """The next character that is not blank or a line end, upper-cased."""
        c = 0
        while not self.eof:
            c = self.read_char()
            if c not in (_BLANK, _TAB, _NEWLINE):
                break
        return c - 32 if 96 < c < 123 else c


def _is_name_char(c: int) -> bool:
    return 65 <= c <= 90 or 48 <= c <= 57 or c in (45, 95)  # A-Z 0-9 - _


def _read_tree(data: bytes, warnings: list[str], source: str) -> list[_Node]:
    """The supersections of the file, each with its sections, each with its entries.

    What the reader drops (entries outside a section, sections outside a supersection) is
    reported in `warnings`.
    """
    reader = _Reader(data)
    top: list[_Node] = []
    current: list[_Node | None] = [None, None, None]  # the last node read at levels 0, 1, 2
    while not reader.eof:
        c = reader.read_keyword_char()
        if reader.eof:
            break
        name: list[int] = []
        level = 0
        written = ""
        if c == ord("["):
            level = 1
            while True:
                c = reader.read_keyword_char()
                valid = not reader.eof
                if valid and c == ord("["):
                    level += 1
                else:
                    break
            if valid:
                reader.ungetc()
                start = reader.pos
                while True:
                    c = reader.read_keyword_char()
                    valid = not reader.eof
                    if not valid:
                        break
                    if _is_name_char(c):
                        name.append(c)
                    elif c == ord("]"):
                        written = data[start:reader.pos - 1].decode("latin-1").strip()
                        break
            if valid:
                remaining = level - 1
                while remaining > 0:
                    c = reader.read_keyword_char()
                    if reader.eof:
                        break
                    if c == ord("]"):
                        remaining -= 1
            level = min(level, 2)
        else:
            reader.ungetc()
            while True:
                c = reader.read_keyword_char()
                if reader.eof:
                    break
                if _is_name_char(c):
                    name.append(c)
                elif c == ord("="):
                    break
        node = _Node(bytes(name).decode("ascii"), written)
        parent = current[level + 1] if level < 2 else None
        if level == 2:
            top.append(node)
            current = [None, None, node]
        elif parent is not None:
            parent.children.append(node)
            current[level] = node
            if level == 1:
                current[0] = None
        else:
            what = f"entry {node.keyword}" if level == 0 else f"section [{node.written}]"
            where = "section" if level == 0 else "[[supersection]]"
            warnings.append(f"{source}: {what} outside any {where} is ignored, as by storescp")
        if level == 0:
            node.value = _read_value(reader)
    return top


def _read_value(reader: _Reader) -> str:
    value = bytearray()
    skip_blanks, just_after_newline = True, False
    while True:
        c = reader.read_char()
        if reader.eof:
            break
        if c == _NEWLINE:
            if not skip_blanks:
                value.append(c)
            skip_blanks, just_after_newline = True, True
        elif c in (_BLANK, _TAB):
            just_after_newline = False
            if not skip_blanks:
                value.append(c)
        elif just_after_newline:
            reader.ungetc()
            break
        else:
            value.append(c)
            skip_blanks = False
    return bytes(value).rstrip(b"\n\0").decode("latin-1")


# ------------------------------------------------------------------------------------------
# The meaning: DcmAssociationConfigurationFile and DcmAssociationConfiguration


def resolve_uid(text: str) -> str:
    """DcmUIDHandler: a symbolic name (optionally after '=') becomes its UID; else unchanged."""
    if not text or "0" <= text[0] <= "9":
        return text
    name = text[1:] if text[0] == "=" else text
    if name == "LocalEndianExplicit":
        return EXPLICIT_LE
    if name == "OppositeEndianExplicit":
        return EXPLICIT_BE
    return DCMTK_UID_NAMES.get(name, text)


_SUPERSECTIONS: Final = ("TRANSFERSYNTAXES", "PRESENTATIONCONTEXTS", "SCPSCUROLESELECTION",
                         "EXTENDEDNEGOTIATION", "PROFILES")


def _valid_uid(uid: str) -> bool:
    return bool(uid) and all(ch in "0123456789." for ch in uid)


class _Interpreter:
    def __init__(self, tree: list[_Node], source: str) -> None:
        self.tree = tree
        self.source = source
        self.warnings: list[str] = []
        self.ts: dict[str, list[str]] = {}
        self.ts_names: dict[str, str] = {}
        self.contexts: dict[str, list[tuple[str, str]]] = {}
        self.roles: dict[str, list[tuple[str, str]]] = {}
        self.extneg: dict[str, list[tuple[str, bytes]]] = {}

    def fail(self, message: str) -> AsconfigError:
        return AsconfigError(f"{self.source}: {message}")

    def supersection(self, keyword: str, *, required: bool) -> _Node | None:
        nodes = [n for n in self.tree if n.keyword == keyword]
        for extra in nodes[1:]:
            self.warnings.append(f"{self.source}: a second [[{extra.written}]] is ignored, as "
                                 "by storescp (only the first supersection of a name is read)")
        node = nodes[0] if nodes else None
        if node is None and required:
            raise self.fail(f"cannot find section [[{keyword}]] in config file")
        return node

    def numbered(self, section: _Node, prefix: str) -> list[tuple[str, str]]:
        """(entry key, value) for PREFIX1, PREFIX2, ... up to the first missing number."""
        found: list[tuple[str, str]] = []
        keywords = [entry.keyword for entry in section.children]
        for keyword in sorted({k for k in keywords if keywords.count(k) > 1}):
            self.warnings.append(f"{self.source}: entry {keyword} appears more than once in "
                                 f"section [{section.written}]; the first counts, as in "
                                 "storescp")
        while True:
            key = f"{prefix}{len(found) + 1}"
            entry = section.child(key)
            if entry is None:
                break
            found.append((key, entry.value))
        used = {key for key, _ in found}
        for entry in section.children:
            if entry.keyword not in used:
                self.warnings.append(
                    f"{self.source}: entry {entry.keyword} in section [{section.written}] is "
                    f"ignored, as by storescp (entries are read as {prefix}1, {prefix}2, ... "
                    "up to the first missing number)")
                used.add(entry.keyword)
        return found

    def split(self, key: str, value: str) -> tuple[str, str]:
        """(abstract syntax, rest) of a value written ABSTRACT\\REST."""
        head, sep, tail = value.partition("\\")
        if not sep:
            raise self.fail(f"syntax error: missing '\\' in entry {key} in config file")
        return head, tail

    def run(self) -> Asconfig:
        for node in self.tree:
            if node.keyword not in _SUPERSECTIONS:
                self.warnings.append(
                    f"{self.source}: supersection [[{node.written}]] is ignored, as by storescp "
                    f"(it reads {', '.join(f'[[{k}]]' for k in _SUPERSECTIONS)})")
        self.read_transfer_syntaxes()
        self.read_contexts()
        self.read_roles()
        self.read_extended_negotiation()
        profiles = self.read_profiles()
        return Asconfig(self.source, {k: tuple(v) for k, v in self.ts.items()}, self.ts_names,
                        profiles, self.warnings)

    def read_transfer_syntaxes(self) -> None:
        node = self.supersection("TRANSFERSYNTAXES", required=True)
        assert node is not None
        for section in node.children:
            for _, value in self.numbered(section, "TRANSFERSYNTAX"):
                uid = resolve_uid(value)
                if not _valid_uid(uid):
                    raise self.fail(f"not a valid transfer syntax UID: {value}")
                self.ts.setdefault(section.keyword, []).append(uid)
                self.ts_names.setdefault(section.keyword, section.written)

    def read_contexts(self) -> None:
        node = self.supersection("PRESENTATIONCONTEXTS", required=True)
        assert node is not None
        for section in node.children:
            for key, value in self.numbered(section, "PRESENTATIONCONTEXT"):
                abstract, rest = self.split(key, value)
                ts_key = mangle(rest)
                if ts_key not in self.ts:
                    raise self.fail(f"transfer syntax key undefined: {ts_key} (entry {key} in "
                                    f"section [{section.written}])")
                uid = resolve_uid(abstract)
                if not _valid_uid(uid):
                    raise self.fail(f"not a valid abstract syntax UID: {abstract} (entry {key} "
                                    f"in section [{section.written}])")
                entries = self.contexts.setdefault(section.keyword, [])
                if len(entries) >= MAX_CONTEXTS:
                    raise self.fail("presentation context list too long (> 128 entries): "
                                    f"{section.keyword}")
                entries.append((uid, ts_key))

    def read_roles(self) -> None:
        node = self.supersection("SCPSCUROLESELECTION", required=False)
        for section in node.children if node is not None else []:
            for key, value in self.numbered(section, "ROLE"):
                abstract, rest = self.split(key, value)
                role = ROLES.get(_ascii_upper(rest))
                if role is None:
                    raise self.fail(f"syntax error: unknown role key in entry {key} in config "
                                    f"file ({rest!r}; SCU, SCP or BOTH)")
                uid = resolve_uid(abstract)
                if not _valid_uid(uid):
                    raise self.fail(f"not a valid abstract syntax UID: {abstract} (entry {key} "
                                    f"in section [{section.written}])")
                entries = self.roles.setdefault(section.keyword, [])
                if any(u == uid for u, _ in entries):
                    raise self.fail(
                        f"role selection defined twice for abstract syntax UID: {abstract}")
                entries.append((uid, role))

    def read_extended_negotiation(self) -> None:
        node = self.supersection("EXTENDEDNEGOTIATION", required=False)
        for section in node.children if node is not None else []:
            for key, value in self.numbered(section, "EXTENDEDNEGOTIATION"):
                abstract, rest = self.split(key, value)
                if len(rest) > MAX_EXTNEG_HEX:
                    raise self.fail("extended negotiation data too long, cannot handle > 1024 "
                                    f"bytes in entry {key} in config file")
                if len(rest) % 2 or any(ch not in "0123456789abcdefABCDEF" for ch in rest):
                    raise self.fail(f"parse error in extended negotiation data in entry {key} "
                                    "in config file (pairs of hexadecimal digits expected)")
                if not rest:
                    raise self.fail(f"no extended negotiation data in entry {key} in config "
                                    "file")
                uid = resolve_uid(abstract)
                if not _valid_uid(uid):
                    raise self.fail(f"not a valid abstract syntax UID: {abstract} (entry {key} "
                                    f"in section [{section.written}])")
                entries = self.extneg.setdefault(section.keyword, [])
                if any(u == uid for u, _ in entries):
                    raise self.fail("extended negotiation defined twice for abstract syntax "
                                    f"UID: {abstract}")
                entries.append((uid, bytes.fromhex(rest)))

    def read_profiles(self) -> dict[str, AsconfigProfile]:
        node = self.supersection("PROFILES", required=True)
        assert node is not None
        profiles: dict[str, AsconfigProfile] = {}
        for section in node.children:
            entry = section.child("PRESENTATIONCONTEXTS")
            if entry is None:
                raise self.fail(f"no PRESENTATIONCONTEXTS entry in section {section.keyword} "
                                "in config file")
            pc_key = mangle(entry.value)
            if pc_key not in self.contexts:
                raise self.fail(f"presentation context key undefined: {pc_key} (profile "
                                f"[{section.written}])")
            known = {uid for uid, _ in self.contexts[pc_key]}
            roles: list[tuple[str, str]] = []
            role_entry = section.child("SCPSCUROLESELECTION")
            if role_entry is not None:
                role_key = mangle(role_entry.value)
                if role_key not in self.roles:
                    raise self.fail(f"role selection key undefined: {role_key} (profile "
                                    f"[{section.written}])")
                roles = self.roles[role_key]
                self.require_known(roles, known, "role selection", role_key, pc_key)
            extneg: list[tuple[str, bytes]] = []
            extneg_entry = section.child("EXTENDEDNEGOTIATION")
            if extneg_entry is not None:
                extneg_key = mangle(extneg_entry.value)
                if extneg_key not in self.extneg:
                    raise self.fail(f"extended negotiation key undefined: {extneg_key} "
                                    f"(profile [{section.written}])")
                extneg = self.extneg[extneg_key]
                self.require_known(extneg, known, "extended negotiation", extneg_key, pc_key)
            if section.keyword in profiles:
                raise self.fail(f"two profiles defined for key: {section.keyword}")
            profiles[section.keyword] = AsconfigProfile(
                section.written, tuple(self.contexts[pc_key]), tuple(roles), tuple(extneg))
        return profiles

    def require_known(self, items: list[tuple[str, str]] | list[tuple[str, bytes]],
                      known: set[str], what: str, key: str, pc_key: str) -> None:
        for uid, _ in items:
            if uid not in known:
                raise self.fail(f"abstract syntax defined in {what} list '{key}' but not in "
                                f"presentation context list '{pc_key}': {uid}")
