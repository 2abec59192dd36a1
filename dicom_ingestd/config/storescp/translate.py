"""`translate(argv)`: a storescp command line to a `Translation` (the TOML and its warnings)."""

import dataclasses
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from dicom_ingestd.config import schema
from dicom_ingestd.config.storescp import conflicts
from dicom_ingestd.config.storescp.command_line import effective_uses, expand, parse
from dicom_ingestd.config.storescp.options import SECRET_OPTIONS, Kind, Use, parse_integer
from dicom_ingestd.config.storescp.table import (
    ENCODING_OPTIONS,
    REENCODING_DEFAULTS,
    STORESCP_DEFAULTS,
)
from dicom_ingestd.errors import TranslationError

# Every schema key ("table.key") with its dataclass field, in declaration order.
_SCHEMA_FIELDS: dict[str, dataclasses.Field[Any]] = dict(schema.keys())

# Keys written even when they equal our default, so the file says what storescp would do.
_ALWAYS_WRITTEN = ("network.port", "storage.output_directory", "logging.level")


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



def _masked(args: Sequence[str]) -> tuple[str, ...]:
    """The arguments with +pw's password replaced: it must not end up in a file or a log."""
    out = list(args)
    for index, arg in enumerate(out[:-1]):
        if arg in SECRET_OPTIONS:
            out[index + 1] = "HIDDEN"
    return tuple(out)


def _comment(text: str) -> str:
    """One TOML comment line; control characters are escaped so that text cannot end it early."""
    escaped = "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
    return f"# {escaped}"


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
    arguments = expand(argv)
    uses, parameters = parse(arguments)
    effective = effective_uses(uses)
    warnings: list[str] = []
    problems: list[str] = []

    for use in effective.values():
        effect = use.option.effect
        if effect.kind is Kind.UNSUPPORTED:
            problems.append(f"{use.label()}: not implemented yet ({effect.reason})")
        elif effect.kind is Kind.IGNORED:
            warnings.append(f"{use.label()}: ignored: {effect.reason}")

    values = dict(STORESCP_DEFAULTS)
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

    if any(long in effective for long in ENCODING_OPTIONS):
        for key, value in REENCODING_DEFAULTS.items():
            if key not in explicit:
                values[key] = value
                explicit[key] = effective[next(x for x in ENCODING_OPTIONS if x in effective)]
    if not any(key.startswith("events.") for key in explicit):
        # Without event options these storescp defaults change nothing: keep the file short.
        for key in ("events.eostudy_timeout", "jobs.retries", "jobs.timeout"):
            values.pop(key, None)
    problems[:0] = conflicts.check(effective, values["logging.level"])
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
            values["network.port"] = parse_integer(
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
