"""+ac: storescp's TCP wrapper tables (hosts.allow, hosts.deny) as [access] networks."""

import ipaddress
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dicom_ingestd.config.storescp.options import Use
from dicom_ingestd.errors import TranslationError

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


def access_control(use: Use, warnings: list[str]) -> dict[str, Any]:
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
