"""Load, validate, dump and compare the daemon configuration (TOML, e.g. /etc/ingestd.toml).

Everything here is driven by `config.schema`: the loader walks `tables()` and the section
dataclasses' fields, so a key declared in the schema is loadable, checked, dumped and diffed
without any code in this module naming it.  The only per-key code is `_VALUE_CHECKS`, for rules
the metadata cannot express (AE title syntax, file-name parts); a test keeps its keys honest.

Contract of every validation failure: one `ConfigError` carrying *all* problems, one line each,
of the form ``{file}: {table}.{key} = {value!r}: {what is allowed}`` (unknown keys:
``{file}: unknown key {table}.{key} (did you mean ...?)``), so an operator fixes the whole file
in one pass instead of one error per restart.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import tomli_w

from dicom_ingestd.config import profile_tables
from dicom_ingestd.config.schema import (
    CHOICES,
    MAXIMUM,
    MINIMUM,
    RELOAD,
    WHOLE_TABLE,
    Config,
    RemoteAE,
    keys,
    tables,
)
from dicom_ingestd.config.subjects import parse_subject
from dicom_ingestd.errors import ConfigError

__all__ = ["config_from_mapping", "diff_configs", "dump_config", "load_config"]

# (label, bad value, what is allowed): formatted into a problem line by `_line`.
_Problem = tuple[str, object, str]


# What each configuration file held when it last loaded, by absolute path: a reload compares
# the new content with it (see load_config).  Only the master reloads; in any other process
# this holds the one load of the file.
_LOADED: dict[str, tuple[bytes, bool]] = {}  # path -> (content, storage.output_directory set)


def _under_systemd() -> bool:
    """Run by systemd as a service (INVOCATION_ID is set for every unit's processes)."""
    return bool(os.environ.get("INVOCATION_ID"))


def load_config(path: str | Path) -> Config:
    """Read and validate the TOML file at `path`.

    Returns the complete `Config` (keys absent from the file keep their schema defaults).
    Raises `ConfigError` when the file is missing or unreadable, is not UTF-8, is not valid
    TOML (the problem names line and column), or fails validation (every problem listed);
    and, because a configuration that loses its keys silently opens the daemon up (no AE
    title restriction, output into the working directory), when it looks cut short:

    * it is empty (or white space only): a file being written, or truncated, far more
      often than an intent (a file of comments only, as etc/ingestd.toml, is fine);
    * its content is a proper prefix of what this path held at its last load (a reload of
      a file cut short; to drop the end of the file on purpose, change anything else too);
    * storage.output_directory is missing though this path set it at its last load, or
      the daemon runs under systemd: a daemon never falls back to its working directory
      for received objects by omission.
    """
    source = str(path)
    key = os.path.abspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{source}: cannot read: no such file"]) from None
    except OSError as exc:
        # Permission denied, a directory, an I/O error: strerror is the human part.
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        # TOML is UTF-8 only; point at the line, as a Latin-1 AE title or comment is typical.
        line = exc.object[: exc.start].count(b"\n") + 1
        bad = exc.object[exc.start]
        raise ConfigError([f"{source}:{line}: not UTF-8 text (byte 0x{bad:02x})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(source, exc)]) from None
    storage = data.get("storage")
    has_output = isinstance(storage, Mapping) and "output_directory" in storage
    problems = list(_truncation_problems(source, raw, has_output, _LOADED.get(key)))
    if problems:
        raise ConfigError(problems)
    config = config_from_mapping(data, source)
    _LOADED[key] = (raw, has_output)
    return config


def _truncation_problems(source: str, raw: bytes, has_output: bool,
                         previous: tuple[bytes, bool] | None) -> Iterator[str]:
    if not raw.strip():
        yield (f"{source}: the file is empty: refused, as an empty configuration file is "
               "almost always one being written or cut short (write at least "
               "storage.output_directory)")
        return
    if previous is not None:
        before, had_output = previous
        if len(raw) < len(before) and before.startswith(raw):
            yield (f"{source}: looks cut short: its {len(raw)} bytes are the first "
                   f"{len(raw)} of the {len(before)} it held at the last load; refused (to "
                   "drop the end of the file on purpose, change anything else too)")
        if had_output and not has_output:
            yield (f"{source}: storage.output_directory is no longer set, though the file "
                   "set it at the last load: refused, as the objects would go to the "
                   f"working directory ({os.getcwd()})")
            return
    if not has_output and _under_systemd():
        yield (f"{source}: storage.output_directory is not set: under systemd the daemon "
               f"does not fall back to its working directory ({os.getcwd()}); set it")


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate an already-parsed TOML document (table name -> {key: value}) into a `Config`.

    `source` is the name problem lines start with (a file path, or e.g. "<storescp>").
    Values must have exactly the TOML type the schema declares: no coercion, so `port = "104"`
    and `fsync = 1` are errors rather than guesses.  Raises one `ConfigError` with every problem.
    """
    problems: list[str] = []
    known_tables = dict(tables())

    for name, value in data.items():
        if name in known_tables:
            if not isinstance(value, Mapping):
                problems.append(_line(source, (name, value, f"must be a table ([{name}])")))
        elif isinstance(value, Mapping):
            close = difflib.get_close_matches(name, list(known_tables), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            problems.append(f"{source}: unknown table [{name}]{hint}")
        else:
            # A key above the first [table] header; usually a forgotten header.
            problems.append(f"{source}: unknown key {name}{_did_you_mean(None, name)}")

    sections: dict[str, Any] = {}
    for table, cls in known_tables.items():
        raw = data.get(table, {})
        if not isinstance(raw, Mapping):
            continue  # reported above
        fields = {f.name: f for f in dataclasses.fields(cls)}
        whole = next((f for f in fields.values() if f.metadata.get(WHOLE_TABLE)), None)
        if whole is not None:
            # Every key of the table is an entry (an AE title, ...), parsed as one value.
            parsed, found = _STRUCTURED[f"{table}.{whole.name}"](table, raw, raw)
            problems.extend(_line(source, p) for p in found)
            sections[table] = cls(**{whole.name: parsed})
            continue
        hints = _hints(cls)
        problems.extend(
            f"{source}: unknown key {table}.{key}{_did_you_mean(table, key)}"
            for key in raw
            if key not in fields
        )
        values: dict[str, Any] = {}
        for key, f in fields.items():
            if key not in raw:
                continue
            value, full = raw[key], f"{table}.{key}"
            structured = _STRUCTURED.get(full)
            if structured is not None:
                # Kept even with problems (the error is raised anyway), so cross checks
                # naming e.g. a profile do not report it missing as well.
                values[key], found = structured(full, value, raw)
                problems.extend(_line(source, p) for p in found)
                continue
            if not _acceptable(f, hints[key], value):
                problems.append(_line(source, (full, value, _allowed(f, hints[key]))))
                continue
            check = _VALUE_CHECKS.get(full)
            extra = list(check(full, value)) if check else []
            problems.extend(_line(source, p) for p in extra)
            if not extra:
                values[key] = value
        sections[table] = cls(**values)

    problems.extend(_line(source, p) for p in _cross_checks(sections))
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def dump_config(config: Config) -> str:
    """The effective configuration as TOML: every table (declaration order) and every key.

    For any valid `config`, `config_from_mapping(tomllib.loads(dump_config(config)))` equals
    `config`; the dump pins every value, defaults included (unlike etc/ingestd.toml).
    """
    document = {
        table: {f.name: getattr(getattr(config, table), f.name) for f in dataclasses.fields(cls)}
        for table, cls in tables()
    }
    negotiation = document["negotiation"]
    negotiation["transfer_syntaxes"], negotiation["profiles"] = profile_tables.to_toml(
        config.negotiation.transfer_syntaxes, config.negotiation.profiles)
    document["remote_aes"] = {title: dataclasses.asdict(remote)
                              for title, remote in config.remote_aes.aetitles.items()}
    return tomli_w.dumps(document)


def diff_configs(old: Config, new: Config) -> list[tuple[str, bool]]:
    """Keys whose value differs, as ("table.key", reloadable), in declaration order.

    `reloadable` is the key's RELOAD metadata: False means a running daemon cannot apply the
    change and a reload should report it as needing a restart.
    """
    changed: list[tuple[str, bool]] = []
    for full, f in keys():
        table, key = full.split(".", 1)
        if getattr(getattr(old, table), key) != getattr(getattr(new, table), key):
            changed.append((full, bool(f.metadata.get(RELOAD, True))))
    return changed


# ---------------------------------------------------------------------------------------------
# Generic, metadata-driven checks


@cache
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints rather than Field.type, so the schema may adopt
    # `from __future__ import annotations` (string annotations) without breaking the loader.
    return typing.get_type_hints(cls)


def _acceptable(f: dataclasses.Field[Any], hint: Any, value: object) -> bool:
    """Whether `value` has the declared type and satisfies CHOICES / MINIMUM / MAXIMUM."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        # bool is a subclass of int in Python; `port = true` must not load as port 1.
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif typing.get_origin(hint) is dict and typing.get_args(hint) == (str, list[str]):
        ok = isinstance(value, Mapping) and all(
            isinstance(v, list) and all(isinstance(item, str) for item in v)
            for v in value.values())
    else:
        # A new annotation in the schema needs a rule here; fail loudly, not permissively.
        raise TypeError(f"config loader cannot check type {hint!r} of {f.name}")
    if not ok:
        return False
    meta = f.metadata
    if CHOICES in meta and value not in meta[CHOICES]:
        return False
    if MINIMUM in meta and value < meta[MINIMUM]:
        return False
    return not (MAXIMUM in meta and value > meta[MAXIMUM])


def _allowed(f: dataclasses.Field[Any], hint: Any) -> str:
    """What the key accepts, worded for the tail of a problem line (type and bounds at once)."""
    meta = f.metadata
    if CHOICES in meta:
        return "must be one of " + ", ".join(meta[CHOICES])
    if hint is bool:
        return "must be true or false"
    if hint is int:
        low, high = meta.get(MINIMUM), meta.get(MAXIMUM)
        if low is not None and high is not None:
            return f"must be an integer from {low} to {high}"
        if low is not None:
            return f"must be an integer >= {low}"
        if high is not None:
            return f"must be an integer <= {high}"
        return "must be an integer"
    if hint is str:
        return "must be a string"
    if typing.get_origin(hint) is dict:
        return "must be a table whose values are arrays of strings"
    return "must be an array of strings"


def _did_you_mean(table: str | None, key: str) -> str:
    """' (did you mean table.key?)' for the likeliest intended key, or ''."""
    names = [full for full, _ in keys()]
    # The same key under another table is the commonest slip (wrong or missing [header]).
    for full in names:
        if full.split(".", 1)[1] == key and full.split(".", 1)[0] != table:
            return f" (did you mean {full}?)"
    if table is not None:
        own = [full.split(".", 1)[1] for full in names if full.startswith(table + ".")]
        close = difflib.get_close_matches(key, own, n=1)
        if close:
            return f" (did you mean {table}.{close[0]}?)"
    close = difflib.get_close_matches(key, [full.split(".", 1)[1] for full in names], n=1)
    if close:
        return f" (did you mean {next(n for n in names if n.endswith('.' + close[0]))}?)"
    return ""


def _line(source: str, problem: _Problem) -> str:
    label, value, allowed = problem
    return f"{source}: {label} = {value!r}: {allowed}"


_TOML_POSITION = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)


def _syntax_problem(source: str, exc: tomllib.TOMLDecodeError) -> str:
    """'{file}:{line}:{col}: TOML syntax error: {message}' (compiler style, editors jump there)."""
    # Python >= 3.14 exposes msg/lineno/colno; 3.11-3.13 only have them inside the message.
    lineno, colno = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    msg = getattr(exc, "msg", None)
    if lineno is None or colno is None or msg is None:
        match = _TOML_POSITION.match(str(exc))
        if match is None:
            return f"{source}: TOML syntax error: {exc}"
        msg, lineno, colno = match["msg"], match["line"], match["col"]
    return f"{source}:{lineno}:{colno}: TOML syntax error: {msg}"


# ---------------------------------------------------------------------------------------------
# Rules the metadata cannot express.  Each check receives ("table.key", value) only after the
# value passed the type/choice/range checks, and yields problems; the key is then left at its
# default so collection can continue.

_AE_RULE = "1 to 16 printable ASCII characters, not all spaces, no backslash"


def _bad_ae_title(title: str) -> bool:
    # AE is a DICOM default-character-repertoire VR: ASCII 0x20-0x7E, backslash is the value
    # separator, and an all-space title is empty once padding is stripped.
    return (
        not 1 <= len(title) <= 16
        or not title.strip(" ")
        or "\\" in title
        or any(not " " <= c <= "~" for c in title)
    )


def _check_aetitle(full: str, value: str) -> Iterator[_Problem]:
    if _bad_ae_title(value):
        yield full, value, f"an AE title must be {_AE_RULE}"


def _check_aetitle_list(full: str, value: list[str]) -> Iterator[_Problem]:
    for index, title in enumerate(value):
        if _bad_ae_title(title):
            yield f"{full}[{index}]", title, f"each AE title must be {_AE_RULE}"


def _check_name_part(full: str, value: str) -> Iterator[_Problem]:
    # Becomes part of a single file or directory name: '/' would escape into (or require)
    # other directories, NUL cannot be passed to the OS at all.
    if "/" in value or "\0" in value:
        yield full, value, "must not contain '/' or NUL (it is part of a file name)"


def _check_directory(full: str, value: str) -> Iterator[_Problem]:
    if not value:
        yield full, value, "must name a directory (use '.' for the working directory)"
    elif "\0" in value:
        yield full, value, "must not contain NUL"


def _check_networks(full: str, value: list[str]) -> Iterator[_Problem]:
    for index, entry in enumerate(value):
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            yield (f"{full}[{index}]", entry,
                   "must be an IPv4 or IPv6 address or network, e.g. 10.0.0.0/8 or fd00::/8")


def _check_command(full: str, value: list[str]) -> Iterator[_Problem]:
    # An argv list (or with events.shell, a command line and $0, $1, ...): execve takes no
    # NUL, and an empty program name cannot run.
    if value and not value[0].strip():
        yield full, value, "the first element (the program, or the shell command line) " \
                           "must not be empty; use [] for no command"
    for index, arg in enumerate(value):
        if "\0" in arg:
            yield f"{full}[{index}]", arg, "must not contain NUL"


def _check_no_nul(full: str, value: str) -> Iterator[_Problem]:
    if "\0" in value:
        yield full, value, "must not contain NUL"


def _check_subjects(full: str, value: list[str]) -> Iterator[_Problem]:
    for index, subject in enumerate(value):
        try:
            parse_subject(subject)
        except ValueError as exc:
            yield (f"{full}[{index}]", subject,
                   f"must be a certificate subject such as \"CN=ct1,O=Hospital\" ({exc})")


def _check_subject_aetitles(full: str, value: Mapping[str, list[str]]) -> Iterator[_Problem]:
    for subject, titles in value.items():
        yield from _check_subjects(full, [subject])
        yield from _check_aetitle_list(f"{full}.{subject!r}", titles)


def _cross_checks(sections: Mapping[str, Any]) -> Iterator[_Problem]:
    """Rules between keys of different tables, checked once every key has a value."""
    negotiation = sections["negotiation"]
    if negotiation.profile:
        if negotiation.profile not in negotiation.profiles:
            defined = ", ".join(negotiation.profiles) or "none"
            close = [name for name in negotiation.profiles
                     if name.lower() == negotiation.profile.lower()] or \
                difflib.get_close_matches(negotiation.profile, list(negotiation.profiles), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            yield ("negotiation.profile", negotiation.profile,
                   "must name a table [negotiation.profiles.NAME] (defined: "
                   f"{defined}){hint}")
        if negotiation.preferred_transfer_syntax != "uncompressed":
            yield ("negotiation.preferred_transfer_syntax", negotiation.preferred_transfer_syntax,
                   "cannot be combined with negotiation.profile (the profile's transfer syntax "
                   "lists decide; storescp refuses -xf with +x... options too); remove one")
        if negotiation.promiscuous:
            yield ("negotiation.promiscuous", True,
                   "cannot be combined with negotiation.profile (SOP classes the profile does "
                   "not list are refused; storescp refuses -xf with -pm too); remove one")
    events, storage = sections["events"], sections["storage"]
    if events.rename_on_eostudy and storage.sort == "none":
        yield ("events.rename_on_eostudy", True,
               "requires storage.sort other than none (as storescp -rns requires -ss, -su or "
               "-sp): files are renamed within their study's directory")
    network = sections.get("network")  # absent when [network] is not a table (reported)
    if network is not None and network.proxy_protocol != "off" and \
            not network.trusted_proxies:
        yield ("network.proxy_protocol", network.proxy_protocol,
               "needs network.trusted_proxies, the addresses of the load balancers that "
               "send the header (every other address is refused)")
    yield from _encoding_checks(sections["storage"], sections["negotiation"])
    yield from _tls_checks(sections["tls"])
    tls = sections["tls"]
    for title, remote in sections["remote_aes"].aetitles.items():
        if remote.tls and not (tls.ca_files or tls.ca_directories):
            yield (f"remote_aes.{title}.tls", True,
                   "needs tls.ca_files or tls.ca_directories to verify the peer's "
                   "certificate against")


def _tls_checks(tls: Any) -> Iterator[_Problem]:
    if not tls.enabled:
        return  # the other [tls] keys may stay in the file while TLS is off
    for key in ("private_key", "certificate"):
        if not getattr(tls, key):
            yield f"tls.{key}", "", "required with tls.enabled = true (storescp +tls KEY CERT)"
    if tls.peer_certificate != "ignore" and not (tls.ca_files or tls.ca_directories):
        yield ("tls.peer_certificate", tls.peer_certificate,
               "needs tls.ca_files or tls.ca_directories to verify client certificates "
               "against (or peer_certificate = \"ignore\")")
    if tls.peer_certificate == "ignore" and (tls.allowed_subjects or tls.subject_aetitles):
        yield ("tls.peer_certificate", "ignore",
               "tls.allowed_subjects and tls.subject_aetitles need verified certificates: "
               "use require or verify")
    if tls.profile == "bcp195-ex" and tls.cipher_suites:
        yield ("tls.cipher_suites", tls.cipher_suites,
               "no suites can be added to the bcp195-ex profile (as in storescp)")
    if tls.profile in ("bcp195-ex", "aes") and tls.minimum_version == "1.3":
        yield ("tls.minimum_version", "1.3",
               f"the {tls.profile} profile allows TLS 1.2 only")


# storescp refuses +te/+tb/+ti/+td with the preferences that let compressed data in: there is
# no transfer syntax conversion of compressed pixel data.
_CONVERTIBLE = ("uncompressed", "little", "big", "implicit", "deflated")


def _encoding_checks(storage: Any, negotiation: Any) -> Iterator[_Problem]:
    """storescp's conflicts between its output options (checkConflict/checkDependence)."""
    if storage.bit_preserving:
        for key in storage.reencoding_keys():
            yield (f"storage.{key}", getattr(storage, key),
                   "re-encodes the data set, which storage.bit_preserving = true forbids "
                   "(storescp refuses it with +B); use its default or drop bit_preserving")
    if storage.file_format == "dataset":
        for key in ("file_padding", "item_padding"):
            if getattr(storage, key):
                yield (f"storage.{key}", getattr(storage, key),
                       "padding needs storage.file_format = \"file\" (storescp refuses +p "
                       "with -F)")
    if storage.transfer_syntax != "received" and \
            negotiation.preferred_transfer_syntax not in _CONVERTIBLE:
        yield ("storage.transfer_syntax", storage.transfer_syntax,
               "cannot be combined with negotiation.preferred_transfer_syntax = "
               f"\"{negotiation.preferred_transfer_syntax}\", which accepts compressed data: "
               "compressed data sets cannot be converted (use received, or one of "
               + ", ".join(_CONVERTIBLE) + " as preference)")
    if storage.deflate_level != 6 and storage.transfer_syntax not in ("received", "deflated"):
        yield ("storage.deflate_level", storage.deflate_level,
               "only applies to deflated output: requires storage.transfer_syntax = "
               "\"deflated\" or \"received\" (as storescp +cl requires +td or +t=)")


def _check_even(full: str, value: int) -> Iterator[_Problem]:
    if value % 2:
        yield full, value, "must be even (DCMTK refuses to write odd padding)"


_REMOTE_AE_KEYS = {"host": str, "port": int, "tls": bool}


def _parse_remote_aes(table: str, value: Any, raw: Mapping[str, Any]) \
        -> tuple[dict[str, RemoteAE], list[_Problem]]:
    """[remote_aes]: AE title -> {host, port, tls}."""
    entries: dict[str, RemoteAE] = {}
    problems: list[_Problem] = []
    for title, entry in value.items():
        label = f"{table}.{title}"
        if _bad_ae_title(title):
            problems.append((label, title, f"each key must be an AE title: {_AE_RULE}"))
            continue
        if not isinstance(entry, Mapping):
            problems.append((label, entry, "must be a table with host, port and optionally "
                                           "tls ([remote_aes.TITLE])"))
            continue
        bad = False
        for key in entry:
            if key not in _REMOTE_AE_KEYS:
                problems.append((f"{label}.{key}", entry[key], "unknown key; a remote AE has "
                                                               "host, port and tls"))
                bad = True
        host, port, tls = entry.get("host"), entry.get("port"), entry.get("tls", False)
        if not isinstance(host, str) or not host.strip() or "\0" in host or "/" in host:
            problems.append((f"{label}.host", host, "must be a host name or address"))
            bad = True
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            problems.append((f"{label}.port", port, "must be an integer from 1 to 65535"))
            bad = True
        if not isinstance(tls, bool):
            problems.append((f"{label}.tls", tls, "must be true or false"))
            bad = True
        if not bad:
            assert isinstance(host, str) and isinstance(port, int)
            entries[title] = RemoteAE(host.strip(), port, tls)
    return entries, problems


# Keys whose value is a table of their own, validated by their parser: (key, value, the raw
# table the key is in) -> (validated value, problems).
_STRUCTURED: dict[str, Callable[[str, Any, Mapping[str, Any]], tuple[Any, list[_Problem]]]] = {
    "negotiation.transfer_syntaxes":
        lambda full, value, raw: profile_tables.parse_transfer_syntaxes(full, value),
    "negotiation.profiles":
        lambda full, value, raw: profile_tables.parse_profiles(
            full, value, raw.get("transfer_syntaxes", {})),
    "remote_aes.aetitles": _parse_remote_aes,
}

_VALUE_CHECKS: dict[str, Callable[[str, Any], Iterator[_Problem]]] = {
    "events.exec_on_reception": _check_command,
    "events.exec_on_eostudy": _check_command,
    "jobs.state_directory": _check_no_nul,
    "access.allow": _check_networks,
    "access.deny": _check_networks,
    "network.trusted_proxies": _check_networks,
    "network.aetitle": _check_aetitle,
    "association.allowed_calling_aetitles": _check_aetitle_list,
    "storage_commitment.allowed_calling_aetitles": _check_aetitle_list,
    "storage.output_directory": _check_directory,
    "storage.filename_extension": _check_name_part,
    "storage.file_padding": _check_even,
    "storage.item_padding": _check_even,
    # storescp names study subdirectories prefix_...; the prefix is accepted with any sort
    # mode (it is simply unused without conc-studies/study-uid) but must stay one name.
    "storage.sort_prefix": _check_name_part,
    "tls.private_key": _check_no_nul,
    "tls.certificate": _check_no_nul,
    "tls.key_password_file": _check_no_nul,
    "tls.dh_parameters": _check_no_nul,
    "tls.allowed_subjects": _check_subjects,
    "tls.subject_aetitles": _check_subject_aetitles,
}
