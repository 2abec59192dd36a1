"""Render the configuration's documentation from the schema metadata alone.

Three artefacts, all generated and committed so they can be read without running code:

* ``etc/ingestd.toml``: the commented default configuration file (`example_toml`);
* ``man/ingestd.toml.5``: the ingestd.toml(5) man page (`man_page`);
* ``docs/storescp-options.md``: which config key replaces each storescp option
  (`storescp_table_md`).

``python -m dicom_ingestd.config.docs --write`` regenerates them; ``--check`` exits 1 naming
each stale file, and tests/test_config.py fails on a stale file, so the schema, the example
configuration and the man page cannot drift apart.  Output must be deterministic (no dates,
no versions): it is compared byte for byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from dicom_ingestd.config.schema import (
    CHOICES,
    DEFAULT_NOTE,
    DOC,
    EXAMPLE,
    MAXIMUM,
    MINIMUM,
    RELOAD,
    STORESCP,
    WHOLE_TABLE,
    tables,
)

__all__ = ["example_toml", "main", "man_page", "rendered_files", "storescp_table_md"]

WIDTH = 79
# dicom_ingestd/config/docs.py -> the repository root holding etc/, man/ and docs/.
REPO_ROOT = Path(__file__).resolve().parents[2]
_REGENERATE = "python -m dicom_ingestd.config.docs --write"


@dataclasses.dataclass(frozen=True)
class _Key:
    """One setting as the renderers need it: schema field plus derived presentation facts."""

    table: str
    name: str
    hint: Any
    default: Any
    meta: Mapping[str, Any]

    @property
    def full(self) -> str:
        return f"{self.table}.{self.name}"

    @property
    def doc(self) -> str:
        return str(self.meta[DOC])

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(self.meta.get(STORESCP, ()))

    @property
    def note(self) -> str:
        return str(self.meta.get(DEFAULT_NOTE, ""))

    @property
    def restart_only(self) -> bool:
        return not self.meta.get(RELOAD, True)

    @property
    def example(self) -> str:
        """A TOML example, for keys whose value is a table of its own ("" for others)."""
        return str(self.meta.get(EXAMPLE, ""))

    @property
    def type_name(self) -> str:
        if self.example:
            return "table"
        if self.hint is bool:
            return "boolean"
        if self.hint is int:
            return "integer"
        if self.hint is str:
            return "string"
        if typing.get_origin(self.hint) is dict:
            return "table of arrays of strings"
        return "array of strings"

    @property
    def allowed(self) -> str:
        """The accepted values, e.g. "1 to 65535", "one of ipv4, ipv6, dual", or ""."""
        if CHOICES in self.meta:
            return "one of " + ", ".join(self.meta[CHOICES])
        low, high = self.meta.get(MINIMUM), self.meta.get(MAXIMUM)
        if low is not None and high is not None:
            return f"{low} to {high}"
        if low is not None:
            return f"at least {low}"
        if high is not None:
            return f"at most {high}"
        return ""

    @property
    def toml_default(self) -> str:
        """The default as a TOML value (tomli_w's spelling, so it parses back identically)."""
        if self.example or self.default == {}:
            return "{}"  # tomli_w writes an empty table as a [header]
        return tomli_w.dumps({"x": self.default}).strip().removeprefix("x = ")


def _sections() -> Iterator[tuple[str, str, list[_Key]]]:
    """(table, one-sentence description, keys) for every table in declaration order."""
    for table, cls in tables():
        hints = typing.get_type_hints(cls)
        summary = (cls.__doc__ or "").strip().split("\n\n")[0]
        # Section docstrings read "[table]: what it is"; the renderers show the table anyway.
        summary = " ".join(summary.removeprefix(f"[{table}]:").split())
        if not summary.startswith("storescp"):  # a command name keeps its lower case
            summary = summary[:1].upper() + summary[1:]
        keys = []
        for f in dataclasses.fields(cls):
            default = f.default
            if f.default_factory is not dataclasses.MISSING:  # e.g. lists (mutable defaults)
                default = f.default_factory()
            keys.append(_Key(table, f.name, hints[f.name], default, f.metadata))
        yield table, summary, keys


def _flag_text(flag: str) -> str:
    # storescp's positional arguments (e.g. "port") are listed without a dash.
    return flag if flag[:1] in "-+" else f"{flag} (argument)"


# ---------------------------------------------------------------------------------------------
# etc/ingestd.toml

_TOML_HEADER = """\
ingestd.toml: configuration of dicom-ingestd, the DICOM C-STORE receiver daemon.

dicom-ingestd reads /etc/ingestd.toml.  Every setting below is commented out and shows its \
default: uncomment a line and change the value to override it; a setting left commented \
follows the default of the installed version.  Unknown tables or keys, values of the wrong \
type and values out of range are errors, each reported with the file, key, value and what \
is allowed.

Check the file after editing:    dicom-ingestd check-config
Apply it to the running daemon:  systemctl reload dicom-ingestd
Settings marked "takes effect on restart only" need a restart instead:
                                 systemctl restart dicom-ingestd

Reference: man 5 ingestd.toml
Generated from dicom_ingestd/config/schema.py; regenerate, do not edit the original."""


def _comment(text: str, indent: str = "") -> list[str]:
    """`text` as '# ' comment lines wrapped at WIDTH; blank lines in `text` stay paragraphs."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        if not paragraph.strip():
            lines.append("#")
            continue
        # A paragraph whose lines are short on purpose (aligned commands) is kept as is.
        if len(paragraph) + 2 <= WIDTH:
            lines.append(f"# {paragraph}".rstrip())
            continue
        lines.extend(
            textwrap.wrap(
                paragraph, WIDTH, initial_indent="# ", subsequent_indent="# " + indent,
                break_long_words=False, break_on_hyphens=False,
            )
        )
    return lines


def example_toml() -> str:
    """The commented default configuration file (etc/ingestd.toml).

    Every key appears commented out with its default (``#port = 104``), preceded by its doc,
    its storescp options, why the default differs from storescp and whether it needs a
    restart.  Loading the file gives the defaults; uncommenting every key line gives the same.
    """
    out = _comment(_TOML_HEADER)
    for table, summary, keys in _sections():
        out += ["", "", *_comment(summary), f"[{table}]"]
        for key in keys:
            out.append("")
            out += _comment(key.doc)
            if key.flags:
                out += _comment("storescp: " + ", ".join(map(_flag_text, key.flags)), "  ")
            if key.note:
                out += _comment(f"default differs from storescp: {key.note}", "  ")
            if key.restart_only:
                out += _comment("takes effect on restart only")
            if key.example:
                out += _comment("Written as tables of their own, for example:")
                out += [f"#  {line}".rstrip() for line in key.example.splitlines()]
            if not key.meta.get(WHOLE_TABLE):  # its entries are the table's own keys
                out.append(f"#{key.name} = {key.toml_default}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# man/ingestd.toml.5


def _roff(text: str) -> str:
    """Escape running text for roff: backslashes, and control characters at line start."""
    text = text.replace("\\", "\\e")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def _roff_literal(text: str) -> str:
    """Escape a literal (key, option, value): also '-' becomes a real minus, so that options
    copied from the rendered page work in a shell."""
    return _roff(text).replace("-", "\\-")


def _man_key(key: _Key) -> list[str]:
    name = f"\\fB{_roff_literal(key.name)}\\fR"
    if key.meta.get(WHOLE_TABLE):  # its entries are the table's own keys
        name = f"\\fB[{_roff_literal(key.table)}.\\fR\\fITITLE\\fR\\fB]\\fR"
    lines = [".TP", f"{name} ({key.type_name})", _roff(key.doc)]
    facts = [f"Default: \\fB{_roff_literal(key.toml_default)}\\fR."]
    if key.allowed:
        allowed = key.allowed
        if CHOICES in key.meta:
            allowed = "one of " + ", ".join(
                f"\\fB{_roff_literal(c)}\\fR" for c in key.meta[CHOICES]
            )
        facts.append(f"Allowed: {allowed}.")
    if key.flags:
        flags = ", ".join(
            f"\\fB{_roff_literal(f)}\\fR"
            if f[:1] in "-+"
            else f"\\fI{_roff_literal(f)}\\fR argument"  # a positional argument
            for f in key.flags
        )
        facts.append(f"storescp: {flags}.")
    if key.note:
        facts.append(f"Default differs from storescp: {_roff(key.note)}")
    if key.restart_only:
        facts.append("Takes effect on restart only.")
    for fact in facts:
        lines += [".br", fact]
    if key.example:
        lines += [".br", "For example:", ".RS", ".nf",
                  *(_roff_literal(line) for line in key.example.splitlines()), ".fi", ".RE"]
    return lines


def man_page() -> str:
    """groff man(7) source of ingestd.toml(5): every table and key with type, default,
    allowed values, storescp equivalent and doc.  Renders cleanly with ``groff -man -ww -z``."""
    out = [
        '.\\" ingestd.toml(5); generated from dicom_ingestd/config/schema.py by',
        f'.\\" {_REGENERATE}; do not edit.',
        '.TH INGESTD.TOML 5 "" "dicom\\-ingestd" "File Formats Manual"',
        ".SH NAME",
        "ingestd.toml \\- configuration file of the dicom\\-ingestd DICOM receiver",
        ".SH SYNOPSIS",
        ".I /etc/ingestd.toml",
        ".SH DESCRIPTION",
        ".B dicom\\-ingestd",
        "receives DICOM objects (C\\-STORE) and replaces DCMTK's",
        ".BR storescp (1).",
        "Its configuration is a TOML file made of the tables below.",
        "Every key is optional: a key that is absent takes the default shown.",
        "Unknown tables or keys, values of the wrong type and values out of range",
        "are errors; each is reported on one line naming the file, the key,",
        "the value and what is allowed.",
        ".PP",
        "Check a file with",
        ".BR \"dicom\\-ingestd check\\-config\" .",
        "A running daemon rereads the file on",
        ".BR \"systemctl reload dicom\\-ingestd\" ;",
        "keys marked \\(lqtakes effect on restart only\\(rq are reported as changed but",
        "not applied until the daemon is restarted.",
        ".PP",
        "The installed example",
        ".I /etc/ingestd.toml",
        "lists every key, commented out, with its default and this documentation.",
        ".SH TABLES",
    ]
    for table, summary, keys in _sections():
        out += [f".SS [{_roff_literal(table)}]", _roff(summary)]
        for key in keys:
            out += _man_key(key)
    out += [
        ".SH FILES",
        ".TP",
        ".I /etc/ingestd.toml",
        "The configuration file.",
        ".SH EXAMPLE",
        "Listen on port 11112 as PACS1, accept only two modalities, and sort",
        "received objects into one directory per study:",
        ".PP",
        ".RS",
        ".nf",
        "[network]",
        "port = 11112",
        'aetitle = "PACS1"',
        "",
        "[association]",
        'allowed_calling_aetitles = ["CT01", "MR01"]',
        "",
        "[storage]",
        'output_directory = "/srv/dicom/incoming"',
        'sort = "study\\-uid"',
        ".fi",
        ".RE",
        ".SH SEE ALSO",
        ".BR dicom\\-ingestd (8),",
        ".BR storescp (1)",
    ]
    # An empty line in roff is a blank output line: fine inside .nf, not elsewhere.
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# docs/storescp-options.md


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_default(key: _Key) -> str:
    return f"`{key.toml_default}`"


def storescp_table_md() -> str:
    """Markdown: each storescp option -> the ingestd.toml key that replaces it, followed by the
    defaults that differ from storescp and the keys storescp has no option for (so that every
    key appears in the document)."""
    rows, notes, ours = [], [], []
    for _table, _summary, keys in _sections():
        for key in keys:
            values = _md(key.allowed or key.type_name)
            if key.flags:
                options = ", ".join(
                    f"`{_md(f)}`" if f[:1] in "-+" else f"`{_md(f)}` (argument)"
                    for f in key.flags
                )
                rows.append(f"| {options} | `{key.full}` | {values} | {_md_default(key)} |")
            else:
                ours.append(f"| `{key.full}` | {values} | {_md_default(key)} | {_md(key.doc)} |")
            if key.note:
                notes.append(f"| `{key.full}` | {_md_default(key)} | {_md(key.note)} |")
    out = [
        "# storescp options and their ingestd.toml keys",
        "",
        f"<!-- Generated from dicom_ingestd/config/schema.py by `{_REGENERATE}`;",
        "     do not edit. -->",
        "",
        "dicom-ingestd replaces DCMTK's `storescp`: every storescp option below is a key of",
        "`/etc/ingestd.toml` instead (see `man 5 ingestd.toml`).  Options that choose one",
        "value of a key (for example `-ss`, `-su`, `-sp` for `storage.sort`) share a row;",
        "an option that sets two keys appears in both rows.",
        "",
        "| storescp option | config key | values | default |",
        "|---|---|---|---|",
        *rows,
        "",
        "## Defaults that differ from storescp",
        "",
        "| config key | default | why |",
        "|---|---|---|",
        *notes,
        "",
        "## Settings storescp has no option for",
        "",
        "`dicom-ingestd config from-storescp` leaves these at their defaults.  Among them,",
        "`[storage_commitment]` and `[remote_aes]`: storescp has no Storage Commitment",
        "service, so no storescp command line turns it on.",
        "",
        "| config key | values | default | meaning |",
        "|---|---|---|---|",
        *ours,
    ]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Entry point


def rendered_files(root: Path = REPO_ROOT) -> dict[Path, str]:
    """Each generated file's path under `root` and the content it must have."""
    return {
        root / "etc" / "ingestd.toml": example_toml(),
        root / "man" / "ingestd.toml.5": man_page(),
        root / "docs" / "storescp-options.md": storescp_table_md(),
    }


def main(argv: Sequence[str] | None = None, root: Path = REPO_ROOT) -> int:
    """``--write``: regenerate the files (only those that changed); ``--check``: return 1 and
    name every missing or stale file on stderr.  Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dicom_ingestd.config.docs",
        description="Generate etc/ingestd.toml, man/ingestd.toml.5 and "
        "docs/storescp-options.md from the configuration schema.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the generated files")
    mode.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)

    stale = []
    for path, content in rendered_files(root).items():
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current == content:
            continue
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8", newline="\n")
            print(f"wrote {path}")
        else:
            stale.append(path)
    for path in stale:
        print(f"{path}: out of date; run {_REGENERATE}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
