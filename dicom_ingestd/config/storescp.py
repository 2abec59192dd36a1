"""Translate a DCMTK storescp command line into dicom-ingestd TOML.

`translate(argv)` reads a storescp argument list (without the program name) the way storescp
3.6.7 does and returns a `Translation`: the TOML tables to write, warnings for options that have
no meaning here, and `toml()` to render both.  What it emits is meant to be run unchanged by
`dicom-ingestd run` and to behave like the storescp command line did.

storescp's command-line rules, as implemented by DCMTK's OFCommandLine (ofstd/libsrc/ofcmdln.cc)
and storescp.cc, and mirrored here:

* Options and the single parameter (the port) may appear in any order.  An argument is an
  option when it starts with '-' or '+' and is at least two characters long, unless the second
  character is a digit ("-1" is a parameter).  Option values are taken verbatim from the
  following arguments, even when they look like options ("-aet -X" sets the AE title "-X").
* Options are matched exactly, in their short or long spelling; there are no abbreviations and
  no end-of-options marker: "--" is an unknown option, as in storescp.
* When an option is repeated, the rightmost occurrence counts.  Options that select one of
  several alternatives (storescp's "option blocks", e.g. +xe/+xb/+xa or -ss/-su/-sp) are
  mutually exclusive: the rightmost of them wins, the others have no effect at all.
* "@file" arguments are replaced by the file's content before anything else is looked at.  The
  content is split at spaces, tabs and line ends; a single or double quote starts a group that
  runs to the next quote of the same kind (quotes may produce an empty argument, there are no
  escapes).  storescp does not expand "@" inside a command file; we reject such a nested
  command file outright instead of passing "@name" on as a bogus port.
* -h/--help and --version make storescp print text and exit.  They are accepted with a
  warning, and the rest of the command line is translated, so that the result shows what the
  command line would have run; without a port there is nothing to run, and the missing port
  is reported as usual.

Each storescp option (3.6.7, plus the 3.7 options -i4/-i6/-i0, --max-associations and the 3.7
TLS options) has one row in `OPTIONS`: it sets TOML keys, is ignored with a warning, or is not
implemented yet (an error naming the option).  Conflicts that storescp itself enforces between
options we implement are enforced too, so a command line storescp refuses is refused here.

+ac (TCP wrapper access control) is the one option whose translation reads files other than
command files: hosts.allow and hosts.deny (in /etc, or in $DICOM_INGESTD_HOSTS_DIR), at
translation time; see the "+ac" section below.

Where our defaults differ from storescp's (logging.level, network.disable_host_lookup,
network.max_pdu), the translation sets storescp's value explicitly; network.port,
storage.output_directory and logging.level are always written.  Not so the limits that keep
hostile or stuck peers from holding workers forever (network.dimse_timeout,
workers.max_associations, network.min_transfer_rate): storescp has none by default, and a
command line without -td or --max-associations gets ours.
"""

import dataclasses
import difflib
import enum
import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from dicom_ingestd.config import profiles as profile_tables
from dicom_ingestd.config import schema
from dicom_ingestd.config.asconfig import AsconfigError, read_asconfig
from dicom_ingestd.errors import TranslationError

__all__ = [
    "HOSTS_DIR", "HOSTS_DIR_ENV", "OPTIONS", "Effect", "Kind", "Option", "Setter", "Translation",
    "Use", "find_option", "translate",
]

_INT_MAX = 2**31 - 1  # storescp stores these values in C ints; larger ones would wrap around


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Translation:
    """The outcome of translating one storescp command line.

    `data` maps TOML tables to keys and values, in schema order: storescp's values for every key
    an option set, every key where storescp's default differs from ours, and the keys always
    written (network.port unless --inetd, storage.output_directory, logging.level).
    `warnings` explains each option that was accepted but has no effect here.
    `argv` is the command line as given, `arguments` the same after @file expansion.
    """

    data: dict[str, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    argv: tuple[str, ...] = ()
    arguments: tuple[str, ...] = ()

    def toml(self) -> str:
        """The TOML document: a comment header (command line, one line per warning), then data."""
        argv, arguments = _masked(self.argv), _masked(self.arguments)
        lines = [_comment(f"translated from: storescp {shlex.join(argv)}".rstrip())]
        if arguments != argv:
            lines.append(_comment(f"after @file expansion: {shlex.join(arguments)}"))
        lines.extend(_comment(f"warning: {warning}") for warning in self.warnings)
        return "\n".join(lines) + "\n\n" + tomli_w.dumps(self.data)


_SECRET_OPTIONS = ("+pw", "--use-passwd")


def _masked(args: Sequence[str]) -> tuple[str, ...]:
    """The arguments with +pw's password replaced: it must not end up in a file or a log."""
    out = list(args)
    for index, arg in enumerate(out[:-1]):
        if arg in _SECRET_OPTIONS:
            out[index + 1] = "HIDDEN"
    return tuple(out)


def _comment(text: str) -> str:
    """One TOML comment line; control characters are escaped so that text cannot end it early."""
    escaped = "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
    return f"# {escaped}"


# --------------------------------------------------------------------------------------------
# The option table
# --------------------------------------------------------------------------------------------


class Kind(enum.Enum):
    """What a storescp option does in a translation."""

    SET = "set"  # sets TOML keys (possibly none, for options that select storescp's default)
    IGNORED = "ignored"  # accepted with a warning: the option has no meaning for this daemon
    UNSUPPORTED = "unsupported"  # refused: not implemented yet


@dataclass(frozen=True, slots=True)
class Use:
    """One occurrence of an option on the expanded command line."""

    option: "Option"
    spelling: str  # as written: short or long
    values: tuple[str, ...]
    position: int  # index in the expanded argument list
    origin: str  # "" on the command line itself, else the command file it came from

    def label(self) -> str:
        """The option and its values as written, for messages: `-pdu 100 (from @opts)`."""
        values = ("HIDDEN",) if self.spelling in _SECRET_OPTIONS else self.values
        text = shlex.join([self.spelling, *values])
        return f"{text} (from @{self.origin})" if self.origin else text


# A setter turns one use of an option into TOML values ({"table.key": value}); it may add
# warnings to the list it is given and raises TranslationError for an invalid value.
Setter = Callable[[Use, list[str]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Effect:
    """The translation of one option: a setter (Kind.SET) or the reason it is not translated."""

    kind: Kind
    reason: str = ""
    setter: Setter | None = None
    keys: tuple[str, ...] = ()  # the keys the setter may set, for docs and tests


@dataclass(frozen=True, slots=True)
class Option:
    """One storescp option: its spellings, how many values it takes, what it becomes here.

    `block` names storescp's group of mutually exclusive options it belongs to ("" if none):
    of the options of one block only the rightmost on the command line has any effect.
    `prevails`: its values win over other options' values for the same keys wherever it
    stands on the command line (otherwise the rightmost option setting a key wins).
    """

    long: str
    short: str
    values: int
    effect: Effect
    block: str = ""
    since: str = "3.6.7"
    prevails: bool = False
    repeatable: bool = False  # every use counts (storescp +cf, +cd, +crl, +cs): values add up

    @property
    def name(self) -> str:
        """Both spellings, for messages: `-pdu/--max-pdu`."""
        return f"{self.short}/{self.long}" if self.short else self.long


def sets(*pairs: tuple[str, Any]) -> Effect:
    """An option that sets fixed values; with no pairs, one accepted silently (a default)."""
    values = dict(pairs)
    return Effect(Kind.SET, setter=lambda use, warnings: dict(values), keys=tuple(values))


def takes(key: str, parse: Callable[[Use, str, list[str]], Any]) -> Effect:
    """An option whose single value, parsed and checked by `parse`, is the value of `key`."""
    return Effect(
        Kind.SET, setter=lambda use, warnings: {key: parse(use, use.values[0], warnings)},
        keys=(key,),
    )


def setter(keys: tuple[str, ...], function: Setter) -> Effect:
    """An option with its own setter, which may set any of `keys`."""
    return Effect(Kind.SET, setter=function, keys=keys)


def ignored(reason: str) -> Effect:
    """An option accepted with a warning saying why it has no meaning for this daemon."""
    return Effect(Kind.IGNORED, reason=reason)


def unsupported(reason: str) -> Effect:
    """An option refused as not implemented yet; `reason` says what it would have done."""
    return Effect(Kind.UNSUPPORTED, reason=reason)


# Value parsers.  Each takes the use (for messages), the value and the warning list.


def _integer(minimum: int, maximum: int, *, c_signed: bool) -> Callable[[Use, str, list[str]], int]:
    """A decimal integer in minimum..maximum.

    storescp reads signed values with sscanf("%li"), which takes "010" as octal 8 and "0x10" as
    hex; unsigned ones with "%lu".  Both ignore trailing garbage.  We accept plain decimal only
    and refuse what storescp would read differently from what a person reads.
    """

    def parse(use: Use, text: str, warnings: list[str]) -> int:
        return _parse_integer(use.label(), text, minimum, maximum, c_signed=c_signed)

    return parse


def _parse_integer(label: str, text: str, minimum: int, maximum: int, *, c_signed: bool) -> int:
    """Parse and range-check one integer value (see `_integer`); errors name `label`."""
    stripped = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", stripped):
        raise TranslationError(f"{label}: invalid value, expected a decimal integer")
    if c_signed and re.fullmatch(r"[+-]?0[0-9]+", stripped):
        raise TranslationError(
            f"{label}: leading zero: storescp would read this as an octal number; "
            "write it in decimal without leading zeros"
        )
    number = int(stripped)
    if not minimum <= number <= maximum:
        raise TranslationError(f"{label}: must be between {minimum} and {maximum}")
    return number


def _socket_timeout(use: Use, text: str, warnings: list[str]) -> int:
    """-ts: storescp accepts -1 (leave the socket's timeout alone, i.e. none), which is our 0."""
    seconds = _parse_integer(use.label(), text, -1, _INT_MAX, c_signed=True)
    return max(seconds, 0)


def _ae_title(use: Use, text: str, warnings: list[str]) -> str:
    """-aet: an AE title: 1-16 printable ASCII characters, not all spaces, no backslash.

    storescp would silently cut a longer title to 16 characters; refusing is clearer.
    """
    if not text.strip(" "):
        raise TranslationError(f"{use.label()}: the AE title must not be empty or all spaces")
    if len(text) > 16:
        raise TranslationError(f"{use.label()}: the AE title is longer than 16 characters")
    if "\\" in text or any(not " " <= ch <= "~" for ch in text):
        raise TranslationError(
            f"{use.label()}: the AE title must be printable ASCII without a backslash"
        )
    return text


def _string(use: Use, text: str, warnings: list[str]) -> str:
    """Any string a file name can hold (NUL only arrives through command files)."""
    if "\0" in text:
        raise TranslationError(f"{use.label()}: the value contains a NUL character")
    return text


def _directory(use: Use, text: str, warnings: list[str]) -> str:
    """-od: a directory, normalized as storescp does: trailing '/' dropped, empty means '.'."""
    directory = _string(use, text, warnings)
    while len(directory) > 1 and directory.endswith("/"):
        directory = directory[:-1]
    return directory or "."


def _name_part(use: Use, text: str, warnings: list[str]) -> str:
    """-fe, -ss, -su: becomes part of one file or directory name, so no '/'."""
    if "/" in text:
        raise TranslationError(f"{use.label()}: the value is part of a file name: no '/'")
    return _string(use, text, warnings)


# log4cplus level names as storescp's -ll accepts them (case-insensitive), and ours.
_LOG_LEVELS = {
    "fatal": "fatal", "error": "error", "warn": "warn", "info": "info", "debug": "debug",
    "trace": "trace", "all": "trace", "off": "fatal",
}


def _log_level(use: Use, text: str, warnings: list[str]) -> str:
    """-ll: a log4cplus level; OFF has no equivalent (we always log fatal errors)."""
    level = _LOG_LEVELS.get(text.lower())
    if level is None:
        raise TranslationError(
            f"{use.label()}: invalid log level, expected one of fatal, error, warn, info, "
            "debug, trace"
        )
    if text.lower() == "off":
        warnings.append(
            f"{use.label()}: dicom-ingestd always logs fatal errors; logging.level = \"fatal\""
        )
    return level


def _sort(mode: str) -> Effect:
    """-ss/-su p: sort into study subdirectories named with prefix p."""
    return setter(
        ("storage.sort", "storage.sort_prefix"),
        lambda use, warnings: {
            "storage.sort": mode, "storage.sort_prefix": _name_part(use, use.values[0], warnings),
        },
    )


def _preference(choice: str) -> Effect:
    """A +x… option: one of the negotiation.preferred_transfer_syntax choices."""
    return sets(("negotiation.preferred_transfer_syntax", choice))


# --------------------------------------------------------------------------------------------
# +ac: the TCP wrapper tables (hosts_access(5))
# --------------------------------------------------------------------------------------------
#
# storescp +ac asks libwrap's hosts_access() about every connection, as daemon "storescp", with
# the client's numeric address and its host name (or "unknown" with -dhl).  The translation
# reads hosts.allow and hosts.deny once, takes the rules whose daemon list matches storescp and
# turns their client lists into address networks.  hosts_access grants access when a
# hosts.allow rule matches, else refuses it when a hosts.deny rule matches, else grants it: the
# peers refused are those in D (the hosts.deny networks) and not in A (the hosts.allow ones).
# [access] refuses deny, then, if allow is not empty, everyone outside allow.  Both
#   deny = D - A, allow = []      and      allow = A + (everything - D), deny = []
# refuse exactly D - A; the shorter one is written.  Everything that cannot be decided from the
# address alone (host names, user names, EXCEPT in client lists, shell commands) is refused,
# naming the rule.  The behaviour mirrored is that of Debian's libwrap 7.6.q, the one storescp
# is linked with; the test suite checks the translation against it.

HOSTS_DIR = Path("/etc")
HOSTS_DIR_ENV = "DICOM_INGESTD_HOSTS_DIR"  # where hosts.allow and hosts.deny are read instead

_DAEMON = "storescp"  # the daemon name storescp gives hosts_access (OFFIS_CONSOLE_APPLICATION)
# Daemon-list names taken as storescp: rules written for this daemon apply too.
_DAEMON_ALIASES = frozenset({"dicom-ingestd"})
_LIST_SEPARATORS = re.compile(r"[, \t\r\n]+")  # hosts_access's list separators
_NAME_WILDCARDS = frozenset({"KNOWN", "UNKNOWN", "PARANOID", "LOCAL"})
_BLANKS = " \t\r"
_OCTET = r"(?:0|[1-9][0-9]{0,2})"  # how an address prints: decimal, no leading zeros

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_EVERYONE: tuple[_Network, ...] = (
    ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"),
)
_NO_NAMES = "dicom-ingestd decides on the peer address alone and never looks up names"


class _Untranslatable(Exception):
    """A rule that cannot be translated; the message names the form and says why."""


@dataclass(frozen=True, slots=True)
class _Rule:
    """One logical line of a table (continuation lines joined)."""

    path: Path
    first: int  # line numbers, 1-based
    last: int
    text: str

    def where(self) -> str:
        lines = f"line {self.first}" if self.first == self.last else (
            f"lines {self.first}-{self.last}")
        text = self.text.rstrip(_BLANKS)
        return f"{self.path} {lines} {text!r}"


def _access_control(use: Use, warnings: list[str]) -> dict[str, Any]:
    """+ac: access.allow and access.deny equivalent to hosts.allow and hosts.deny, read now."""
    directory = Path(os.environ.get(HOSTS_DIR_ENV) or HOSTS_DIR)
    allow_path, deny_path = directory / "hosts.allow", directory / "hosts.deny"
    warnings.append(
        f"{use.label()}: [access] was computed from {allow_path} and {deny_path} as they were "
        "at translation time; storescp reads them at every connection: after editing them, "
        "translate again or edit [access]"
    )
    problems: list[str] = []
    allowed = _table_networks(use, allow_path, warnings, problems)
    denied = _table_networks(use, deny_path, warnings, problems)
    if problems:
        raise TranslationError("\n".join(problems))
    refused = _subtract(denied, allowed)
    granted = _collapse([*allowed, *_subtract(list(_EVERYONE), denied)])
    if allowed and not denied:
        warnings.append(
            f"{use.label()}: the {allow_path} rules for storescp have no effect without a "
            f"{deny_path} rule for it: everyone may connect, as with storescp"
        )
    if granted and len(granted) < len(refused):
        allow, deny = granted, []
    else:
        allow, deny = [], refused
        if denied and refused != _collapse(denied):
            warnings.append(
                f"{use.label()}: the networks {allow_path} grants inside networks {deny_path} "
                "refuses were cut out of access.deny (in hosts_access an allow rule wins, in "
                "[access] deny wins)"
            )
    return {"access.allow": [str(n) for n in allow], "access.deny": [str(n) for n in deny]}


def _table_networks(
    use: Use, path: Path, warnings: list[str], problems: list[str],
) -> list[_Network]:
    """The client networks of the rules in `path` that apply to storescp.

    A missing table has no rules, as in hosts_access; other read errors are refused.  Each rule
    that cannot be translated adds a line to `problems`.
    """
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TranslationError(
            f"{use.label()}: cannot read {path}: {exc.strerror or exc}") from exc
    networks: list[_Network] = []
    for rule in _rules(path, text):
        try:
            networks.extend(_rule_networks(rule, use, warnings))
        except _Untranslatable as exc:
            problems.append(f"{use.label()}: {rule.where()}: {exc}")
    return networks


def _rules(path: Path, text: str) -> Iterator[_Rule]:
    """The rules of a table, as libwrap reads them.

    A backslash right before a line end joins the next line (nothing is put in between); a
    logical line that starts with '#' in its first column, or holds only blanks, is skipped.
    """
    pieces = text.split("\n")
    joined: list[str] = []
    first = 1
    for number, piece in enumerate(pieces, start=1):
        if number < len(pieces) and piece.endswith("\\"):
            joined.append(piece[:-1])
            continue
        line = "".join([*joined, piece])
        if not line.startswith("#") and line.strip(_BLANKS):
            yield _Rule(path, first, number, line)
        joined = []
        first = number + 1


def _split_at(text: str, delimiter: str) -> tuple[str, str | None]:
    """libwrap's split_at(): split at the first `delimiter` outside [brackets]."""
    depth = 0
    for index, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == delimiter and depth == 0:
            return text[:index], text[index + 1:]
    return text, None


def _tokens(text: str) -> list[str]:
    return [token for token in _LIST_SEPARATORS.split(text) if token]


def _rule_networks(rule: _Rule, use: Use, warnings: list[str]) -> list[_Network]:
    """The client networks of `rule` if its daemon list matches storescp, else none."""
    daemons, rest = _split_at(rule.text, ":")
    if rest is None:
        warnings.append(
            f"{use.label()}: {rule.where()}: no ':' separator: tcp_wrappers ignores this line, "
            "and so does the translation"
        )
        return []
    daemon_tokens = _tokens(daemons)
    if not _daemon_list_matches(daemon_tokens):
        return []
    if any(token.startswith("#") for token in daemon_tokens):
        raise _Untranslatable(
            "'#' starts a comment only in the first column of a line: tcp_wrappers reads this "
            "line as a rule for storescp; move the '#' to the first column, or remove it"
        )
    clients, options = _split_at(rest, ":")
    if options is not None and options.strip(_BLANKS):
        raise _Untranslatable(_options_problem(clients, options))
    client_tokens = _tokens(clients)
    if not client_tokens:
        warnings.append(f"{use.label()}: {rule.where()}: no client list: the rule matches "
                        "no client, in tcp_wrappers as here")
        return []
    networks: list[_Network] = []
    untranslatable: list[str] = []
    for token in client_tokens:
        try:
            networks.extend(_client_networks(token))
        except _Untranslatable as exc:
            untranslatable.append(str(exc))
    if untranslatable:
        raise _Untranslatable("; ".join(untranslatable))
    return networks


def _options_problem(clients: str, options: str) -> str:
    """Why text after a second ':' cannot be translated (often an IPv6 address unbracketed)."""
    for token in _tokens(f"{clients}:{options}"):
        try:
            network = ipaddress.IPv6Network(token, strict=False)
        except ValueError:
            continue
        bracketed = f"[{network.network_address}]" + (
            f"/{network.prefixlen}" if "/" in token else "")
        return (f"IPv6 address {token!r} without brackets: tcp_wrappers splits the rule at its "
                f"first ':' and never matches it; write {bracketed}")
    command = options.strip(_BLANKS)
    return (f"{command!r} after a second ':' (a shell command or a "
            "hosts_options(5) option) cannot be translated: dicom-ingestd runs no commands and "
            "has no per-rule options")


def _daemon_list_matches(tokens: list[str]) -> bool:
    """libwrap's list_match() on a daemon list for daemon storescp, EXCEPT included."""
    for index, token in enumerate(tokens):
        if token.upper() == "EXCEPT":
            return False
        if _daemon_matches(token):
            rest = [t.upper() for t in tokens[index + 1:]]
            if "EXCEPT" not in rest:
                return True
            return not _daemon_list_matches(tokens[index + 2 + rest.index("EXCEPT"):])
    return False


def _daemon_matches(token: str) -> bool:
    """libwrap's server_match() for storescp: a name pattern, optionally @ a server host."""
    head, host = _split_at(token[1:], "@")
    pattern = token[0] + head
    if pattern.lower() in _DAEMON_ALIASES:
        pattern = _DAEMON
    if not _string_match(pattern, _DAEMON):
        return False
    if host is not None:
        raise _Untranslatable(
            f"server endpoint pattern {token!r} (daemon@host) cannot be translated: "
            "[access] applies to every listening address alike"
        )
    return True


def _string_match(pattern: str, string: str) -> bool:
    """libwrap's string_match() (case-insensitive), with Debian's * and ? wildcards."""
    p, s = pattern.lower(), string.lower()
    if p.startswith("."):
        return len(s) > len(p) and s.endswith(p)
    if p == "all":
        return True
    if p == "known":
        return s != "unknown"
    if p.endswith("."):
        return s.startswith(p)
    if "*" in p or "?" in p:
        regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in p)
        return re.fullmatch(regex, s, re.DOTALL) is not None
    return p == s


def _client_networks(token: str) -> list[_Network]:
    """The networks one client-list pattern matches; _Untranslatable if not address-only."""
    upper = token.upper()
    if upper == "ALL":
        return list(_EVERYONE)
    if upper == "EXCEPT":
        raise _Untranslatable(
            "EXCEPT in a client list cannot be translated: list the addresses and networks "
            "that are meant")
    if upper in _NAME_WILDCARDS:
        raise _Untranslatable(
            f"the {upper} wildcard cannot be translated: it depends on the client's host "
            f"name; {_NO_NAMES}")
    if re.fullmatch(r"[0-9./]+", token):  # libwrap: a pattern that can only match addresses
        return [_ipv4_network(token)]
    if token.startswith("["):
        return [_ipv6_network(token)]
    if token.startswith("#"):
        raise _Untranslatable(
            f"{token!r}: '#' starts a comment only in the first column of a line; tcp_wrappers "
            "reads it as a host name pattern")
    if token.startswith("@"):
        raise _Untranslatable(
            f"NIS netgroup {token!r} cannot be translated: it lists host names; {_NO_NAMES}")
    if "@" in token:
        raise _Untranslatable(
            f"user pattern {token!r} (user@host) cannot be translated: dicom-ingestd does no "
            "ident (RFC 931) lookups")
    if token.startswith("/"):
        raise _Untranslatable(
            f"pattern file {token!r} cannot be translated: list its addresses in the rule")
    if "*" in token or "?" in token:
        raise _Untranslatable(
            f"wildcard pattern {token!r} (* and ?) cannot be translated: it also matches host "
            "names; write a network, e.g. 192.168.1.0/24")
    if ":" in token:
        raise _Untranslatable(f"{token!r} is neither an IPv4 address nor a bracketed IPv6 one")
    what = "domain pattern" if token.startswith(".") else "host name"
    raise _Untranslatable(
        f"{what} {token!r} cannot be translated: {_NO_NAMES}; write addresses or networks")


def _ipv4_network(token: str) -> ipaddress.IPv4Network:
    """An IPv4 pattern: n.n.n.n, n.n.n.n/m.m.m.m, n.n.n.n/len or the prefix n.n. (ending '.')."""
    if "/" in token:
        net_text, mask_text = token.split("/", 1)
        net = _ipv4_address(net_text, token)
        if "." in mask_text:
            mask = int(_ipv4_address(mask_text, token))
            if mask == 0xFFFFFFFF:
                raise _Untranslatable(
                    f"{token!r}: tcp_wrappers takes 255.255.255.255 for an invalid mask and "
                    f"matches nothing with it; write {net_text} alone")
            inverse = ~mask & 0xFFFFFFFF
            if inverse & (inverse + 1):
                raise _Untranslatable(
                    f"{token!r}: the netmask {mask_text} is not contiguous; [access] takes "
                    "networks with a prefix length only")
            length = 32 - inverse.bit_length()
        elif re.fullmatch(r"[0-9]{1,3}", mask_text) and 1 <= int(mask_text) <= 32:
            length = int(mask_text)
        elif re.fullmatch(r"0+", mask_text):
            raise _Untranslatable(
                f"{token!r}: tcp_wrappers matches nothing with prefix length 0; write ALL, or "
                "0.0.0.0/0.0.0.0 for every IPv4 address")
        else:
            raise _Untranslatable(
                f"{token!r}: {mask_text!r} is neither a netmask nor a prefix length 1-32")
        network = _network(net, length, token)
        assert isinstance(network, ipaddress.IPv4Network)
        return network
    if token.endswith("."):
        fields = token[:-1].split(".")
        if len(fields) > 3 or not all(re.fullmatch(_OCTET, f) and int(f) < 256 for f in fields):
            raise _Untranslatable(
                f"{token!r}: an address prefix is one to three numbers 0-255 without leading "
                "zeros, each followed by '.' (tcp_wrappers compares it with the address text)")
        padded = ".".join([*fields, *["0"] * (4 - len(fields))])
        return ipaddress.IPv4Network(f"{padded}/{8 * len(fields)}")
    return ipaddress.IPv4Network(_ipv4_address(token, token))


def _ipv4_address(text: str, token: str) -> ipaddress.IPv4Address:
    if not re.fullmatch(rf"{_OCTET}(?:\.{_OCTET}){{3}}", text) or any(
            int(f) > 255 for f in text.split(".")):
        raise _Untranslatable(
            f"{token!r}: {text!r} is not an IPv4 address (four numbers 0-255 without leading "
            "zeros); tcp_wrappers would match nothing, or not what it seems")
    return ipaddress.IPv4Address(text)


def _ipv6_network(token: str) -> ipaddress.IPv6Network:
    """[addr] or [net]/len.  (A [net]/mask cannot occur: its ':' would end the client list.)"""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?:/(.+))?", token)
    try:
        if match is None:
            raise ValueError
        address = ipaddress.IPv6Address(match[1])
    except ValueError:
        raise _Untranslatable(f"{token!r} is not an IPv6 address in brackets") from None
    if address.ipv4_mapped is not None:
        raise _Untranslatable(
            f"{token!r}: tcp_wrappers never matches an IPv4-mapped address; write the IPv4 "
            "address or network")
    length_text = match[2]
    if length_text is None:
        return ipaddress.IPv6Network(address)
    if not (re.fullmatch(r"[0-9]{1,3}", length_text) and int(length_text) <= 128):
        raise _Untranslatable(f"{token!r}: {length_text!r} is not a prefix length 0-128")
    network = _network(address, int(length_text), token)
    assert isinstance(network, ipaddress.IPv6Network)
    return network


def _network(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int, token: str,
) -> _Network:
    """The network address/length; refused when `address` has host bits set."""
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    if network.network_address != address:
        shown = (f"[{network.network_address}]/{length}" if network.version == 6
                 else str(network))
        raise _Untranslatable(
            f"{token!r} has host bits set (tcp_wrappers warns \"host bits not all zero\" and, "
            f"for IPv4, matches nothing with it); write {shown}")
    return network


_N = TypeVar("_N", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _collapse(networks: Iterable[_Network]) -> list[_Network]:
    """The same addresses in the fewest networks: IPv4 ones first, each family sorted."""
    items = list(networks)
    v4 = [n for n in items if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in items if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def _subtract(networks: Iterable[_Network], holes: Sequence[_Network]) -> list[_Network]:
    """The addresses of `networks` outside every network of `holes`, as networks."""
    result: list[_Network] = []
    for network in _collapse(networks):
        pieces = [network]
        for hole in holes:
            pieces = [rest for piece in pieces for rest in _minus(piece, hole)]
        result.extend(pieces)
    return _collapse(result)


def _minus(network: _Network, hole: _Network) -> list[_Network]:
    if isinstance(network, ipaddress.IPv4Network) and isinstance(hole, ipaddress.IPv4Network):
        return list(_minus_same(network, hole))
    if isinstance(network, ipaddress.IPv6Network) and isinstance(hole, ipaddress.IPv6Network):
        return list(_minus_same(network, hole))
    return [network]  # different families do not overlap


def _minus_same(network: _N, hole: _N) -> list[_N]:
    # Two networks are either disjoint or one contains the other.
    if network.subnet_of(hole):
        return []
    if hole.subnet_of(network):
        return list(network.address_exclude(hole))
    return [network]


_CONVERT_UN = "converting UN elements to the VR the data dictionary knows"


def _padding(use: Use, warnings: list[str]) -> dict[str, Any]:
    """+p f i: DCMTK refuses to write odd padding (every store would fail), so refuse it here."""
    sizes = [_parse_integer(use.label(), text, 0, 2**32 - 2, c_signed=False)
             for text in use.values]
    if any(size % 2 for size in sizes):
        raise TranslationError(f"{use.label()}: padding lengths must be even (storescp would "
                               "fail to write every object)")
    return {"storage.file_padding": sizes[0], "storage.item_padding": sizes[1]}


# storescp re-encodes every object unless +B; we store as received unless an option asks for
# another encoding.  When one does, the options left out take storescp's defaults (+e, +g=),
# so the files equal storescp's.
_ENCODING_OPTIONS = ("--write-xfer-little", "--write-xfer-big", "--write-xfer-implicit",
                     "--write-xfer-deflated", "--length-explicit", "--length-undefined",
                     "--group-length-recalc", "--group-length-create", "--group-length-remove",
                     "--padding-create", "--disable-new-vr", "--compression-level")
_REENCODING_DEFAULTS = {"storage.sequence_lengths": "explicit",
                       "storage.group_length": "recalc"}
# The output options storescp refuses with +B (checkConflict), and the transfer syntax
# preferences it refuses with +te/+tb/+ti/+td (no conversion of compressed data).
_NOT_WITH_BIT_PRESERVING = ("--write-xfer-little", "--write-xfer-big", "--write-xfer-implicit",
                            "--write-xfer-deflated", "--enable-new-vr", "--disable-new-vr",
                            "--group-length-recalc", "--group-length-create",
                            "--group-length-remove", "--length-explicit", "--length-undefined",
                            "--padding-create")
_CONVERTING = ("--write-xfer-little", "--write-xfer-big", "--write-xfer-implicit",
               "--write-xfer-deflated")
_CONVERTIBLE_PREFERENCES = ("--prefer-uncompr", "--prefer-little", "--prefer-big",
                            "--implicit", "--prefer-deflated")


def _config_file(use: Use, warnings: list[str]) -> dict[str, Any]:
    """-xf f p: profile p of the DCMTK association configuration file f, read now, as TOML.

    The whole file is checked as storescp checks it at start-up (a problem in any profile
    refuses the translation, as it refuses storescp's start); only profile p and the transfer
    syntax lists it uses are written.
    """
    path, name = use.values
    try:
        asconfig = read_asconfig(path)
        chosen = asconfig.select(name)
        lists, tables = profile_tables.from_asconfig(asconfig, [chosen])
    except (AsconfigError, ValueError) as exc:
        raise TranslationError(f"{use.label()}: {exc}") from None
    warnings.extend(f"{use.label()}: {warning}" for warning in asconfig.warnings)
    warnings.append(f"{use.label()}: [negotiation] holds profile {chosen.name!r} as {path} "
                    "was at translation time; storescp reads the file at every start: after "
                    "editing it, translate again or edit [negotiation.profiles]")
    return {"negotiation.profile": chosen.name, "negotiation.transfer_syntaxes": lists,
            "negotiation.profiles": tables}


def _command(key: str) -> Effect:
    """-xcr/-xcs c: a storescp-style command line, run through the shell form."""
    def build(use: Use, warnings: list[str]) -> dict[str, Any]:
        command = use.values[0]
        if "#r" in command:
            warnings.append(f"{use.label()}: #r is the peer's IP address here; storescp "
                            "substitutes its host name unless -dhl is given")
        return {key: [command], "events.shell": True}

    return setter((key, "events.shell"), build)


def _eostudy_timeout(use: Use, text: str, warnings: list[str]) -> int:
    """-tos t: storescp's 0 closes a study at once; our 0 means 'never by time'."""
    seconds = _parse_integer(use.label(), text, 0, 2**31 - 1, c_signed=True)
    if seconds == 0:
        warnings.append(f"{use.label()}: a study closes 1 s after its last object "
                        "(events.eostudy_timeout = 0 would mean never)")
        return 1
    return seconds
_EXITS = "storescp would only print {what} and exit; the rest of the command line is translated"
_SEED = ("no effect with a modern OpenSSL, which seeds its random generator from the operating "
         "system")
_RETIRED_3DES = "the retired Basic TLS profile's 3DES suite, which OpenSSL 3 no longer offers"
_UNENCRYPTED = "unencrypted TLS (the retired IHE ATNA NULL profile): refused on purpose"
_PROFILE_8996_MOD = "the modified RFC 8996 profile's CAMELLIA and CCM suites"
_SNI = "checking the server name a client asks for (SNI)"
# storescp's TLS options that depend on --enable-tls (DcmTLSOptions::parseArguments).
_NEEDS_TLS = ("--std-passwd", "--use-passwd", "--null-passwd", "--pem-keys", "--der-keys",
              "--add-cert-file", "--add-cert-dir", "--add-crl-file", "--enable-crl-vfy",
              "--enable-crl-all", "--profile-bcp195-nd", "--profile-bcp195",
              "--profile-bcp195-ex", "--profile-8996", "--profile-aes", "--cipher",
              "--dhparam", "--require-peer-cert", "--verify-peer-cert", "--ignore-peer-cert",
              "--seed", "--write-seed", "--write-seed-file")


def _enable_tls(use: Use, warnings: list[str]) -> dict[str, Any]:
    """+tls key cert."""
    key, certificate = (_string(use, value, warnings) for value in use.values)
    for path in (key, certificate):
        if not path.startswith("/"):
            warnings.append(f"{use.label()}: {path} is relative: the daemon resolves it "
                            "against its working directory (/ under systemd); prefer an "
                            "absolute path")
    return {"tls.enabled": True, "tls.private_key": key, "tls.certificate": certificate}


def _use_password(use: Use, warnings: list[str]) -> dict[str, Any]:
    """+pw p: a password on the command line; a daemon reads it from a file instead."""
    warnings.append(f"{use.label()}: the password is not copied into "
                    "this file: write it to a file only the daemon's user can read (chmod "
                    "600) and set tls.key_password_file to it, or pass it as a systemd "
                    "credential (LoadCredential=, then \"$CREDENTIALS_DIRECTORY/NAME\")")
    return {}


def _paths(key: str) -> Effect:
    """+cf/+cd/+crl/+cs: every use adds one value to the list `key`."""
    return setter((key,), lambda use, warnings: {key: [_string(use, v, warnings)
                                                       for v in use.values]})


OPTIONS: tuple[Option, ...] = (
    # general options
    Option("--help", "-h", 0, ignored(_EXITS.format(what="its help text"))),
    Option("--version", "", 0, ignored(_EXITS.format(what="version information"))),
    Option("--arguments", "", 0, ignored(
        "storescp logs its expanded arguments at startup; dicom-ingestd does not "
        "(the header of this file records them)")),
    Option("--quiet", "-q", 0, sets(("logging.level", "fatal")), block="verbosity"),
    Option("--verbose", "-v", 0, sets(("logging.level", "info")), block="verbosity"),
    Option("--debug", "-d", 0, sets(("logging.level", "debug")), block="verbosity"),
    Option("--log-level", "-ll", 1, takes("logging.level", _log_level)),
    Option("--log-config", "-lc", 1, ignored(
        "log4cplus configuration files are not supported: dicom-ingestd logs to stderr "
        "(the journal under systemd); logging.level is storescp's default \"warn\", adjust "
        "[logging] to what the file configured")),
    Option("--verbose-pc", "+v", 0, sets(("logging.verbose_pc", True))),
    # multi-process options
    # Without either option storescp serves one association at a time; our default (fork)
    # serves them in parallel and isolated, which changes no stored result.
    Option("--single-process", "", 0, sets(("workers.process_model", "single")),
           block="process"),
    Option("--fork", "", 0, sets(("workers.process_model", "fork")), block="process"),
    Option("--max-associations", "", 1,
           takes("workers.max_associations", _integer(1, 2**31 - 1, c_signed=True)),
           since="3.7.0"),
    # IP protocol version (3.7)
    Option("--ipv4", "-i4", 0, sets(("network.ip_version", "ipv4")), block="ip", since="3.7.0"),
    Option("--ipv6", "-i6", 0, sets(("network.ip_version", "ipv6")), block="ip", since="3.7.0"),
    Option("--ip-auto", "-i0", 0, sets(("network.ip_version", "dual")), block="ip",
           since="3.7.0"),
    # association negotiation
    Option("--config-file", "-xf", 2, setter(
        ("negotiation.profile", "negotiation.transfer_syntaxes", "negotiation.profiles"),
        lambda use, warnings: _config_file(use, warnings))),
    Option("--prefer-uncompr", "+x=", 0, _preference("uncompressed"), block="xfer"),
    Option("--prefer-little", "+xe", 0, _preference("little"), block="xfer"),
    Option("--prefer-big", "+xb", 0, _preference("big"), block="xfer"),
    Option("--prefer-lossless", "+xs", 0, _preference("lossless"), block="xfer"),
    Option("--prefer-jpeg8", "+xy", 0, _preference("jpeg8"), block="xfer"),
    Option("--prefer-jpeg12", "+xx", 0, _preference("jpeg12"), block="xfer"),
    Option("--prefer-j2k-lossless", "+xv", 0, _preference("j2k-lossless"), block="xfer"),
    Option("--prefer-j2k-lossy", "+xw", 0, _preference("j2k-lossy"), block="xfer"),
    Option("--prefer-jls-lossless", "+xt", 0, _preference("jls-lossless"), block="xfer"),
    Option("--prefer-jls-lossy", "+xu", 0, _preference("jls-lossy"), block="xfer"),
    Option("--prefer-mpeg2", "+xm", 0, _preference("mpeg2"), block="xfer"),
    Option("--prefer-mpeg2-high", "+xh", 0, _preference("mpeg2-high"), block="xfer"),
    Option("--prefer-mpeg4", "+xn", 0, _preference("mpeg4"), block="xfer"),
    Option("--prefer-mpeg4-bd", "+xl", 0, _preference("mpeg4-bd"), block="xfer"),
    Option("--prefer-mpeg4-2-2d", "+x2", 0, _preference("mpeg4-2-2d"), block="xfer"),
    Option("--prefer-mpeg4-2-3d", "+x3", 0, _preference("mpeg4-2-3d"), block="xfer"),
    Option("--prefer-mpeg4-2-st", "+xo", 0, _preference("mpeg4-2-st"), block="xfer"),
    Option("--prefer-hevc", "+x4", 0, _preference("hevc"), block="xfer"),
    Option("--prefer-hevc10", "+x5", 0, _preference("hevc10"), block="xfer"),
    Option("--prefer-rle", "+xr", 0, _preference("rle"), block="xfer"),
    Option("--prefer-deflated", "+xd", 0, _preference("deflated"), block="xfer"),
    Option("--implicit", "+xi", 0, _preference("implicit"), block="xfer"),
    Option("--accept-all", "+xa", 0, _preference("all"), block="xfer"),
    # TCP wrapper
    Option("--access-full", "-ac", 0, sets(), block="access"),  # accept all: nothing to set
    Option("--access-control", "+ac", 0,
           setter(("access.allow", "access.deny"), _access_control), block="access"),
    # other network options
    Option("--inetd", "-id", 0, sets(("network.inetd", True))),
    Option("--socket-timeout", "-ts", 1, takes("network.socket_timeout", _socket_timeout)),
    Option("--acse-timeout", "-ta", 1,
           takes("network.acse_timeout", _integer(1, _INT_MAX, c_signed=True))),
    Option("--dimse-timeout", "-td", 1,
           takes("network.dimse_timeout", _integer(1, _INT_MAX, c_signed=True))),
    Option("--aetitle", "-aet", 1, takes("network.aetitle", _ae_title)),
    Option("--max-pdu", "-pdu", 1,
           takes("network.max_pdu", _integer(4096, 131072, c_signed=False))),
    Option("--disable-host-lookup", "-dhl", 0, sets(("network.disable_host_lookup", True))),
    Option("--refuse", "", 0, sets(("association.refuse", True))),
    Option("--reject", "", 0, sets(("association.reject_without_implementation_uid", True))),
    Option("--ignore", "", 0, sets(("testing.ignore", True))),
    Option("--sleep-after", "", 1,
           takes("testing.sleep_after", _integer(0, _INT_MAX, c_signed=False))),
    Option("--sleep-during", "", 1,
           takes("testing.sleep_during", _integer(0, _INT_MAX, c_signed=False))),
    Option("--abort-after", "", 0, sets(("testing.abort_after", True))),
    Option("--abort-during", "", 0, sets(("testing.abort_during", True))),
    Option("--promiscuous", "-pm", 0, sets(("negotiation.promiscuous", True))),
    Option("--uid-padding", "-up", 0, sets(("association.uid_padding", True))),
    # TLS (3.6.7, and the 3.7 additions so that 3.7 command lines get a clear answer)
    Option("--disable-tls", "-tls", 0, sets(("tls.enabled", False)), block="tls"),
    Option("--enable-tls", "+tls", 2,
           setter(("tls.enabled", "tls.private_key", "tls.certificate"), _enable_tls),
           block="tls"),
    Option("--std-passwd", "+ps", 0, ignored(
        "prompting for the key password on a terminal is meaningless for a daemon: an "
        "encrypted key needs tls.key_password_file (a file only the daemon's user can read, "
        "or a systemd credential)"), block="passwd"),
    Option("--use-passwd", "+pw", 1, setter(("tls.key_password_file",), _use_password),
           block="passwd"),
    Option("--null-passwd", "-pw", 0, sets(("tls.key_password_file", "")), block="passwd"),
    Option("--pem-keys", "-pem", 0, sets(("tls.file_format", "pem")), block="keyformat"),
    Option("--der-keys", "-der", 0, sets(("tls.file_format", "der")), block="keyformat"),
    Option("--add-cert-file", "+cf", 1, _paths("tls.ca_files"), repeatable=True),
    Option("--add-cert-dir", "+cd", 1, _paths("tls.ca_directories"), repeatable=True),
    Option("--add-crl-file", "+crl", 1, _paths("tls.crl_files"), repeatable=True),
    Option("--enable-crl-vfy", "+crv", 0, sets(("tls.crl_check", "leaf")), block="crl"),
    Option("--enable-crl-all", "+cra", 0, sets(("tls.crl_check", "chain")), block="crl"),
    Option("--list-profiles", "+ph", 0, ignored(_EXITS.format(what="its TLS profiles")),
           since="3.7.0"),
    Option("--profile-8996", "+pg", 0, sets(("tls.profile", "rfc8996")), block="profile",
           since="3.7.0"),
    Option("--profile-8996-mod", "+pm", 0, unsupported(_PROFILE_8996_MOD), block="profile",
           since="3.7.0"),
    Option("--profile-bcp195-nd", "+py", 0, sets(("tls.profile", "bcp195-nd")),
           block="profile"),
    Option("--profile-bcp195", "+px", 0, sets(("tls.profile", "bcp195")), block="profile"),
    Option("--profile-bcp195-ex", "+pz", 0, sets(("tls.profile", "bcp195-ex")),
           block="profile"),
    Option("--profile-basic", "+pb", 0, unsupported(_RETIRED_3DES), block="profile"),
    Option("--profile-aes", "+pa", 0, sets(("tls.profile", "aes")), block="profile"),
    Option("--profile-null", "+pn", 0, unsupported(_UNENCRYPTED), block="profile"),
    Option("--list-ciphers", "+cc", 0, ignored(_EXITS.format(what="its cipher suites"))),
    Option("--cipher", "+cs", 1, _paths("tls.cipher_suites"), repeatable=True),
    Option("--dhparam", "+dp", 1, takes("tls.dh_parameters", _string)),
    Option("--no-sni", "", 0, sets(), since="3.7.0"),  # the default: SNI is not used
    Option("--expect-sni", "", 1, unsupported(_SNI), since="3.7.0"),
    Option("--seed", "+rs", 1, ignored(_SEED)),
    Option("--write-seed", "+ws", 0, ignored(_SEED), block="seed"),
    Option("--write-seed-file", "+wf", 1, ignored(_SEED), block="seed"),
    Option("--require-peer-cert", "-rc", 0, sets(("tls.peer_certificate", "require")),
           block="peercert"),
    Option("--verify-peer-cert", "-vc", 0, sets(("tls.peer_certificate", "verify")),
           block="peercert"),
    Option("--ignore-peer-cert", "-ic", 0, sets(("tls.peer_certificate", "ignore")),
           block="peercert"),
    # output options
    Option("--output-directory", "-od", 1, takes("storage.output_directory", _directory)),
    Option("--normal", "-B", 0, sets(("storage.bit_preserving", False)), block="bitpreserving"),
    Option("--bit-preserving", "+B", 0, sets(("storage.bit_preserving", True)),
           block="bitpreserving"),
    Option("--write-file", "+F", 0, sets(("storage.file_format", "file")), block="fileformat"),
    Option("--write-dataset", "-F", 0, sets(("storage.file_format", "dataset")),
           block="fileformat"),
    Option("--write-xfer-same", "+t=", 0, sets(("storage.transfer_syntax", "received")),
           block="writexfer"),
    Option("--write-xfer-little", "+te", 0,
           sets(("storage.transfer_syntax", "little-explicit")), block="writexfer"),
    Option("--write-xfer-big", "+tb", 0, sets(("storage.transfer_syntax", "big-explicit")),
           block="writexfer"),
    Option("--write-xfer-implicit", "+ti", 0, sets(("storage.transfer_syntax", "implicit")),
           block="writexfer"),
    Option("--write-xfer-deflated", "+td", 0, sets(("storage.transfer_syntax", "deflated")),
           block="writexfer"),
    Option("--enable-new-vr", "+u", 0, sets(("storage.new_vrs", True)), block="newvr"),
    Option("--disable-new-vr", "-u", 0, sets(("storage.new_vrs", False)), block="newvr"),
    Option("--group-length-recalc", "+g=", 0, sets(("storage.group_length", "recalc")),
           block="grouplength"),
    Option("--group-length-create", "+g", 0, sets(("storage.group_length", "create")),
           block="grouplength"),
    Option("--group-length-remove", "-g", 0, sets(("storage.group_length", "remove")),
           block="grouplength"),
    Option("--length-explicit", "+e", 0, sets(("storage.sequence_lengths", "explicit")),
           block="lengths"),
    Option("--length-undefined", "-e", 0, sets(("storage.sequence_lengths", "undefined")),
           block="lengths"),
    Option("--padding-off", "-p", 0,
           sets(("storage.file_padding", 0), ("storage.item_padding", 0)), block="padding"),
    Option("--padding-create", "+p", 2,
           setter(("storage.file_padding", "storage.item_padding"), _padding), block="padding"),
    Option("--retain-un", "-uc", 0, sets(), block="un"),  # what we do: UN stays UN
    Option("--convert-un", "+uc", 0, unsupported(_CONVERT_UN), block="un"),
    Option("--compression-level", "+cl", 1,
           takes("storage.deflate_level", _integer(0, 9, c_signed=False))),
    Option("--sort-conc-studies", "-ss", 1, _sort("conc-studies"), block="sort"),
    Option("--sort-on-study-uid", "-su", 1, _sort("study-uid"), block="sort"),
    Option("--sort-on-patientname", "-sp", 0, sets(("storage.sort", "patientname")),
           block="sort"),
    Option("--default-filenames", "-uf", 0, sets(("storage.filenames", "default")),
           block="unique"),
    Option("--unique-filenames", "+uf", 0, sets(("storage.filenames", "unique")),
           block="unique"),
    # -tn is no member of the -uf/+uf block in storescp: time names win over -uf wherever -tn
    # stands, and it conflicts with an effective +uf (checked in _check_conflicts).
    Option("--timenames", "-tn", 0, sets(("storage.filenames", "timenames")), prevails=True),
    Option("--filename-extension", "-fe", 1, takes("storage.filename_extension", _name_part)),
    # event options
    # storescp runs its command lines through /bin/sh; the shell form keeps that, with every
    # placeholder passed as a quoted variable reference (never parsed by the shell).
    Option("--exec-on-reception", "-xcr", 1, _command("events.exec_on_reception")),
    Option("--exec-on-eostudy", "-xcs", 1, _command("events.exec_on_eostudy")),
    Option("--rename-on-eostudy", "-rns", 0, sets(("events.rename_on_eostudy", True))),
    Option("--eostudy-timeout", "-tos", 1, takes("events.eostudy_timeout", _eostudy_timeout)),
    Option("--exec-sync", "-xs", 0, sets(("events.exec_sync", True))),
)

_BY_SPELLING: dict[str, Option] = {
    spelling: option for option in OPTIONS for spelling in (option.long, option.short) if spelling
}


def find_option(spelling: str) -> Option | None:
    """The row for an option spelling (short or long, exactly as storescp matches), or None."""
    return _BY_SPELLING.get(spelling)


# storescp's own value for every key an option can set, used where no option sets it.  The
# port has none: it is required (except with --inetd).
_STORESCP_DEFAULTS: dict[str, Any] = {
    "network.port": None,
    "network.ip_version": "ipv4",  # storescp up to 3.6.x listens on IPv4 only; 3.7 defaults to -i4
    "network.inetd": False,
    "network.aetitle": "STORESCP",
    "network.max_pdu": 16384,
    "network.acse_timeout": 30,
    "network.socket_timeout": 60,
    "network.disable_host_lookup": False,  # storescp resolves peer names unless -dhl
    "negotiation.preferred_transfer_syntax": "uncompressed",
    "negotiation.promiscuous": False,
    "association.refuse": False,
    "association.reject_without_implementation_uid": False,
    "association.uid_padding": False,
    "testing.ignore": False,
    "testing.sleep_after": 0,
    "testing.sleep_during": 0,
    "testing.abort_after": False,
    "testing.abort_during": False,
    "storage.output_directory": ".",
    "storage.bit_preserving": False,
    # storescp (without +B) writes with +e and +g=; an omitted option means "as received" here
    # (see _ENCODING_OPTIONS for when storescp's values are filled in).
    "storage.file_format": "file",
    "storage.transfer_syntax": "received",
    "storage.sequence_lengths": "received",
    "storage.group_length": "received",
    "storage.file_padding": 0,
    "storage.item_padding": 0,
    "storage.deflate_level": 6,
    "storage.new_vrs": True,
    "storage.sort": "none",
    "storage.sort_prefix": "",
    "storage.filenames": "default",
    "storage.filename_extension": "",
    "logging.level": "warn",  # storescp logs warnings and errors only
    "logging.verbose_pc": False,
    "tls.enabled": False,
    "tls.key_password_file": "",
    "tls.file_format": "pem",
    "tls.crl_check": "none",
    "tls.profile": "bcp195-nd",  # 3.6.7's default (3.7: rfc8996)
    "tls.peer_certificate": "require",
    "events.eostudy_timeout": 0,  # storescp closes studies by time only with -tos
    "jobs.retries": 0,  # storescp runs each command once and waits for it forever
    "jobs.timeout": 0,
}

# Every schema key ("table.key") with its dataclass field, in declaration order.
_SCHEMA_FIELDS: dict[str, dataclasses.Field[Any]] = dict(schema.keys())

# Keys written even when they equal our default, so the file says what storescp would do.
_ALWAYS_WRITTEN = ("network.port", "storage.output_directory", "logging.level")


# --------------------------------------------------------------------------------------------
# Parsing the command line
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Argument:
    text: str
    origin: str  # "" from the command line, else the command file it was read from


def _expand(argv: Sequence[str]) -> list[_Argument]:
    """Replace each "@file" argument by the arguments in that file (see the module docstring)."""
    expanded: list[_Argument] = []
    for arg in argv:
        if len(arg) > 1 and arg.startswith("@"):
            filename = arg[1:]
            try:
                content = Path(filename).read_bytes().decode("utf-8")
            except OSError as exc:
                raise TranslationError(
                    f"{arg}: cannot read command file: {exc.strerror or exc}"
                ) from exc
            except UnicodeDecodeError as exc:
                raise TranslationError(f"{arg}: command file is not UTF-8: {exc}") from exc
            expanded.extend(_Argument(word, filename) for word in _split_command_file(content))
        else:
            expanded.append(_Argument(arg, ""))
    return expanded


def _split_command_file(content: str) -> list[str]:
    """Split a command file's content into arguments, as DCMTK's OFCommandLine does.

    Separators are space, tab, CR and LF outside quotes.  A quote (' or ") opens a group that
    ends at the next quote of the same kind; the other kind is literal inside it.  A closing
    quote ends the argument at once, so '""' is an empty argument and '"a"b' is two arguments,
    while a quote right after other characters continues that argument ('a"b c"' is 'ab c').
    A missing closing quote keeps what was read so far, as storescp does.
    """
    words: list[str] = []
    word: list[str] = []
    quote = ""
    for ch in content:
        if ch in "\"'":
            if ch == quote:
                words.append("".join(word))
                word = []
                quote = ""
            elif not quote:
                quote = ch
            else:
                word.append(ch)
        elif ch in " \t\r\n" and not quote:
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    return words


def _is_option(text: str) -> bool:
    """storescp's test: a sign character, then at least one more character, not a digit."""
    return len(text) >= 2 and text[0] in "+-" and not text[1].isdigit()


def _parse(arguments: list[_Argument]) -> tuple[list[Use], list[_Argument]]:
    """Split the expanded arguments into option uses and parameters.

    Raises TranslationError, like storescp's parser, for an unknown option, an option whose
    values are missing, a nested command file, and more than one parameter.
    """
    uses: list[Use] = []
    parameters: list[_Argument] = []
    position = 0
    while position < len(arguments):
        arg = arguments[position]
        where = f" (from @{arg.origin})" if arg.origin else ""
        if not _is_option(arg.text):
            if arg.origin and len(arg.text) > 1 and arg.text.startswith("@"):
                raise TranslationError(
                    f"{arg.text}{where}: a command file cannot name another command file"
                )
            parameters.append(arg)
            position += 1
            continue
        option = find_option(arg.text)
        if option is None:
            raise TranslationError(f"{arg.text}{where}: unknown storescp option{_hint(arg.text)}")
        values = arguments[position + 1:position + 1 + option.values]
        if len(values) < option.values:
            wanted = "a value" if option.values == 1 else f"{option.values} values"
            raise TranslationError(
                f"{arg.text}{where}: missing value ({option.name} takes {wanted})"
            )
        uses.append(Use(option, arg.text, tuple(v.text for v in values), position, arg.origin))
        position += 1 + option.values
    if len(parameters) > 1:
        extra = parameters[1]
        where = f" (from @{extra.origin})" if extra.origin else ""
        raise TranslationError(
            f"{extra.text!r}{where}: too many parameters: storescp takes one, the port "
            f"(already given: {parameters[0].text!r})"
        )
    return uses, parameters


def _hint(text: str) -> str:
    """A ' (did you mean …?)' suffix naming the closest known spelling, if any is close."""
    if text == "--":
        return " (storescp has no end-of-options marker)"
    close = difflib.get_close_matches(text, list(_BY_SPELLING), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _effective(uses: Iterable[Use]) -> dict[str, Use]:
    """The uses that count, by long option name.

    A repeated option counts once, at its rightmost use, unless it is repeatable (then one use
    at the rightmost position carries the values of all, in order); of an option block only the
    rightmost use of any member counts (the others are dropped, as storescp never looks at them).
    """
    rightmost: dict[str, Use] = {}
    for use in uses:  # left to right: later uses replace earlier ones
        key = use.option.block or use.option.long
        earlier = rightmost.get(key)
        if use.option.repeatable and earlier is not None:
            use = dataclasses.replace(use, values=earlier.values + use.values)
        rightmost[key] = use
    return {use.option.long: use for use in sorted(rightmost.values(), key=lambda u: u.position)}


# --------------------------------------------------------------------------------------------
# Evaluating
# --------------------------------------------------------------------------------------------


def _check_conflicts(effective: dict[str, Use], level: str) -> list[str]:
    """storescp's own conflicts and dependencies that involve options we accept."""
    problems: list[str] = []

    def conflict(a: str, b: str) -> None:
        if a in effective and b in effective:
            problems.append(
                f"{effective[a].label()}: conflicts with {effective[b].label()} (as in storescp)"
            )

    conflict("--inetd", "--fork")
    for long in ("--quiet", "--verbose", "--debug"):
        conflict("--log-level", long)
        conflict("--log-config", long)
    conflict("--log-config", "--log-level")
    if "--config-file" in effective:
        # storescp: -xf cannot be combined with a transfer syntax choice other than +x=, or -pm
        pref = next((u for u in effective.values() if u.option.block == "xfer"), None)
        if pref is not None and pref.option.long != "--prefer-uncompr":
            conflict("--config-file", pref.option.long)
        conflict("--config-file", "--promiscuous")
    if "--max-associations" in effective and "--fork" not in effective:
        problems.append(
            f"{effective['--max-associations'].label()}: requires --fork (storescp 3.7)"
        )
    for long in ("--exec-on-eostudy", "--rename-on-eostudy"):
        if long in effective and not any(
                sort in effective for sort in ("--sort-conc-studies", "--sort-on-study-uid",
                                               "--sort-on-patientname")):
            problems.append(f"{effective[long].label()}: requires --sort-conc-studies, "
                            "--sort-on-study-uid or --sort-on-patientname (as in storescp)")
        conflict(long, "--inetd")
    if "--eostudy-timeout" in effective and not any(
            o in effective for o in ("--sort-conc-studies", "--sort-on-study-uid",
                                     "--sort-on-patientname", "--exec-on-eostudy",
                                     "--rename-on-eostudy")):
        problems.append(f"{effective['--eostudy-timeout'].label()}: requires a --sort option, "
                        "--exec-on-eostudy or --rename-on-eostudy (as in storescp)")
    if "--bit-preserving" in effective:
        for long in ("--sort-conc-studies", "--sort-on-study-uid", "--sort-on-patientname"):
            conflict(long, "--bit-preserving")
    conflict("--timenames", "--unique-filenames")
    if "--bit-preserving" in effective:
        for long in _NOT_WITH_BIT_PRESERVING:
            conflict(long, "--bit-preserving")
    pref = next((u for u in effective.values() if u.option.block == "xfer"), None)
    if pref is not None and pref.option.long not in _CONVERTIBLE_PREFERENCES:
        for long in _CONVERTING:
            if long in effective:
                problems.append(f"{effective[long].label()}: conflicts with {pref.label()} (as "
                                "in storescp): compressed data sets cannot be converted")
    conflict("--padding-create", "--write-dataset")
    if "--compression-level" in effective:
        xfer = next((u for u in effective.values() if u.option.block == "writexfer"), None)
        if xfer is not None and xfer.option.long not in ("--write-xfer-deflated",
                                                         "--write-xfer-same"):
            problems.append(f"{effective['--compression-level'].label()}: requires "
                            "--write-xfer-deflated or --write-xfer-same (as in storescp)")
    # +v needs verbose mode; with -lc the level comes from a file we cannot see, so let it pass.
    if ("--verbose-pc" in effective and "--log-config" not in effective
            and level not in ("info", "debug", "trace")):
        problems.append(
            f"{effective['--verbose-pc'].label()}: only allowed with verbose mode "
            "(-v, -d or -ll info/debug/trace), as in storescp"
        )
    # storescp evaluates the TLS options only with TLS enabled (checkDependence).
    for long in _NEEDS_TLS:
        if long in effective and "--enable-tls" not in effective:
            problems.append(f"{effective[long].label()}: requires --enable-tls (as in storescp)")
    conflict("--cipher", "--profile-bcp195-ex")
    if "--enable-tls" in effective and "--ignore-peer-cert" not in effective and not any(
            o in effective for o in ("--add-cert-file", "--add-cert-dir")):
        mode = "-vc" if "--verify-peer-cert" in effective else "-rc (the default)"
        problems.append(
            f"{effective['--enable-tls'].label()}: with {mode} and no +cf/+cd, storescp "
            "verifies client certificates against no CA and so refuses every client that "
            "sends one; add +cf CA-FILE (or -ic) to translate a working set-up")
    for long in ("--write-seed", "--write-seed-file"):
        if long in effective and "--seed" not in effective:
            problems.append(f"{effective[long].label()}: requires --seed (as in storescp)")
    return problems


def _check_schema(key: str, value: Any, use: Use | None) -> str | None:
    """A problem if `value` breaks the schema's declared range or choices for `key`."""
    meta = _SCHEMA_FIELDS[key].metadata
    label = use.label() if use is not None else key
    if schema.CHOICES in meta and value not in meta[schema.CHOICES]:
        return f"{label}: {value!r} is not one of {', '.join(meta[schema.CHOICES])} ({key})"
    if schema.MINIMUM in meta and value < meta[schema.MINIMUM]:
        return f"{label}: must be at least {meta[schema.MINIMUM]} ({key})"
    if schema.MAXIMUM in meta and value > meta[schema.MAXIMUM]:
        return f"{label}: must be at most {meta[schema.MAXIMUM]} ({key})"
    return None


def _schema_default(key: str) -> Any:
    """Our default for `key` (the value `dicom-ingestd run` uses when the key is absent)."""
    f = _SCHEMA_FIELDS[key]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise AssertionError(f"schema key {key} has no default")  # schema.py declares all


def translate(argv: Sequence[str]) -> Translation:
    """Translate storescp's arguments (without the program name) into a `Translation`.

    Raises TranslationError, with one line per problem each naming the option, for: an unknown
    option, a missing or invalid value, an out-of-range number, a missing port (unless
    --inetd), an extra parameter, an unreadable or nested command file, a conflict storescp
    itself refuses, and an option that is not implemented yet.
    """
    argv = tuple(argv)
    arguments = _expand(argv)
    uses, parameters = _parse(arguments)
    effective = _effective(uses)
    warnings: list[str] = []
    problems: list[str] = []

    for use in effective.values():
        effect = use.option.effect
        if effect.kind is Kind.UNSUPPORTED:
            problems.append(f"{use.label()}: not implemented yet ({effect.reason})")
        elif effect.kind is Kind.IGNORED:
            warnings.append(f"{use.label()}: ignored: {effect.reason}")

    values = dict(_STORESCP_DEFAULTS)
    explicit: dict[str, Use] = {}  # key → the option that set it, for messages
    # In command-line order, so the rightmost option setting a key wins; prevailing ones last.
    for use in sorted(effective.values(), key=lambda u: (u.option.prevails, u.position)):
        effect = use.option.effect
        if effect.kind is not Kind.SET or effect.setter is None:
            continue
        try:
            updates = effect.setter(use, warnings)
        except TranslationError as exc:
            problems.append(str(exc))
            continue
        values.update(updates)
        explicit.update(dict.fromkeys(updates, use))

    if any(long in effective for long in _ENCODING_OPTIONS):
        for key, value in _REENCODING_DEFAULTS.items():
            if key not in explicit:
                values[key] = value
                explicit[key] = effective[next(x for x in _ENCODING_OPTIONS if x in effective)]
    if not any(key.startswith("events.") for key in explicit):
        # Without event options these storescp defaults change nothing: keep the file short.
        for key in ("events.eostudy_timeout", "jobs.retries", "jobs.timeout"):
            values.pop(key, None)
    problems[:0] = _check_conflicts(effective, values["logging.level"])
    if values["network.inetd"]:
        if parameters:
            # storescp: "Parameter port not required in inetd mode" (a warning); the socket
            # comes from inetd (or systemd's Accept=yes), so the port is dropped.
            warnings.append(
                f"port {parameters[0].text}: not used with --inetd (the connection arrives on "
                "standard input); dropped"
            )
    elif not parameters:
        exits = [effective[x].spelling for x in ("--help", "--version") if x in effective]
        problems.append(
            "port: missing parameter: storescp needs the port to listen on (or --inetd)"
            + (f"; with {exits[0]} alone storescp only prints text, there is nothing to "
               "translate" if exits else "")
        )
    else:
        port = parameters[0]
        where = f" (from @{port.origin})" if port.origin else ""
        try:
            values["network.port"] = _parse_integer(
                f"port {port.text!r}{where}", port.text, 1, 65535, c_signed=False)
        except TranslationError as exc:
            problems.append(str(exc))

    data: dict[str, dict[str, Any]] = {}
    for key in _SCHEMA_FIELDS:  # schema order, so the TOML reads like the reference
        if key not in values or values[key] is None:
            continue
        value = values[key]
        if key in explicit or key in _ALWAYS_WRITTEN or value != _schema_default(key):
            problem = _check_schema(key, value, explicit.get(key))
            if problem is not None:
                problems.append(problem)
            table, name = key.split(".", 1)
            data.setdefault(table, {})[name] = value

    if problems:
        raise TranslationError("\n".join(problems))
    return Translation(data, warnings, argv, tuple(a.text for a in arguments))
