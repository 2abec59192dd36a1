"""Run every sender × transfer syntax (and C-ECHO) and write docs/interop-matrix.md.

    scripts/interop-matrix            # regenerate docs/interop-matrix.md
    scripts/interop-matrix --check    # exit 1 if the committed table differs from a new run
    scripts/interop-matrix --print    # print the Markdown instead of writing it

(`scripts/interop-matrix` is `.venv/bin/python -m tests.interop.matrix`.)  The pytest module
tests/interop/test_interop.py runs the same cells; its last test compares the committed table
with the cells it ran.
"""

import argparse
import datetime
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.daemon import start_daemon

from .harness import (
    BATCH,
    DAEMON_SETTINGS,
    FAIL,
    NOT_SENT,
    PASS,
    REFUSED,
    SKIP,
    Cell,
    Harness,
    syntax_label,
)
from .senders import SENDERS, SYNTAXES, Sender, java_version
from .wire import WireTap

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "interop-matrix.md"
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"
COMMAND = "scripts/interop-matrix"
BATCH_LABEL = "All files, one invocation"


@contextmanager
def open_harness(directory: Path) -> Iterator[Harness]:
    """A daemon (DAEMON_SETTINGS) and a wire tap in front of it."""
    daemon = start_daemon(directory, DAEMON_SETTINGS, name="interop")
    tap = WireTap(daemon.port)
    try:
        yield Harness(daemon, tap)
    finally:
        tap.close()
        daemon.stop()


def run_all(harness: Harness) -> None:
    for sender in SENDERS:
        for syntax in SYNTAXES:
            harness.store(sender, syntax)
        harness.batch(sender)
        harness.echo(sender)


# --- rendering -----------------------------------------------------------------------------------


def _short(cell: Cell, file_syntax: str | None, notes: list[str]) -> str:
    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    if cell.outcome == FAIL:
        return f"**FAIL** {note('; '.join(cell.problems))}"
    if cell.outcome in (SKIP, NOT_SENT, REFUSED):
        return f"{cell.outcome} {note(cell.reason)}"
    if cell.syntax == BATCH:
        sent, _of, given = cell.sent_as.split()[:3]
        defect = f" ⚠ {note(cell.sent_as.split('; ', 1)[1])}" if "defect" in cell.sent_as else ""
        return f"pass ({sent}/{given})" + (f" {note(cell.reason)}" if cell.reason else "") + \
            defect
    if file_syntax is None:  # C-ECHO
        return "pass"
    text = "pass"
    if cell.sent_as.startswith("converted"):
        text += f" → {syntax_label(cell.negotiated)}"
    elif cell.sent_as.startswith(("re-encoded", "re-deflated")):
        text += f" ({cell.sent_as.split(':')[0]})"
    if "sender defect" in cell.sent_as:
        text += f" ⚠ {note(cell.sent_as)}"
    return text


def render_table(harness: Harness) -> str:
    """The part of the document a re-run must reproduce (no versions, no date)."""
    notes: list[str] = []
    header = "| Transfer syntax (pydicom test file) | " + \
        " | ".join(s.label for s in SENDERS) + " |"
    lines = [header, "|" + "---|" * (len(SENDERS) + 1)]
    for syntax in SYNTAXES:
        row = [f"{syntax.label} (`{syntax.file_name}`)"]
        row += [_short(harness.store(s, syntax), syntax.uid, notes) for s in SENDERS]
        lines.append("| " + " | ".join(row) + " |")
    row = [BATCH_LABEL] + [_short(harness.batch(s), None, notes) for s in SENDERS]
    lines.append("| " + " | ".join(row) + " |")
    row = ["C-ECHO"] + [_short(harness.echo(s), None, notes) for s in SENDERS]
    lines.append("| " + " | ".join(row) + " |")
    counts = {outcome: 0 for outcome in (PASS, FAIL, NOT_SENT, SKIP, REFUSED)}
    for cell in harness.cells.values():
        counts[cell.outcome] += 1
    lines += ["", "Totals: " + ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
              + f" (of {len(harness.cells)} cells).", ""]
    if notes:
        lines += ["Notes:", ""]
        lines += [f"{i}. {text}" for i, text in enumerate(notes, 1)]
        lines.append("")
    lines += ["### Every cell", "",
              "| Sender | Transfer syntax | Result | Accepted syntax (stored) | "
              "What the sender put on the wire |", "|---|---|---|---|---|"]
    for sender in SENDERS:
        for syntax in SYNTAXES:
            lines.append(detail_line(sender, syntax.label, harness.store(sender, syntax)))
        lines.append(detail_line(sender, BATCH_LABEL, harness.batch(sender)))
        lines.append(detail_line(sender, "C-ECHO", harness.echo(sender)))
    return "\n".join(lines) + "\n"


def detail_line(sender: Sender, what: str, cell: Cell) -> str:
    if cell.outcome == FAIL:
        detail = "; ".join(cell.problems)
    elif cell.outcome in (SKIP, NOT_SENT, REFUSED):
        detail = cell.reason
    else:
        detail = cell.sent_as or "C-ECHO-RSP 0x0000"
        if cell.reason:  # a batch the sender did not finish
            detail += f"; {cell.reason}"
    negotiated = syntax_label(cell.negotiated) if cell.negotiated else "–"
    detail = detail.replace("|", "\\|")
    return f"| {sender.label} | {what} | {cell.outcome} | {negotiated} | {detail} |"


def render(harness: Harness, today: datetime.date | None = None) -> str:
    today = today or datetime.date.today()
    versions = ["| Sender | Packages | Implementation (from its A-ASSOCIATE-RQ) |",
                "|---|---|---|"]
    for sender in SENDERS:
        versions.append(f"| {sender.label} | {sender.version()} | "
                        f"{harness.implementations.get(sender.key, '–')} |")
    notes = [f"- **{s.label}**: {note}" for s in SENDERS for note in s.notes]
    return f"""# Interoperability matrix: Storage SCUs → dicom-ingestd

Generated by `{COMMAND}` on {today.isoformat()}; do not edit by hand.
Machine: {_system()}.
`{COMMAND} --check` says whether a new run still gives this table; the test
suite runs the same cells (`tests/interop/test_interop.py`) and fails when a line here no
longer matches.

Each cell: one sender sends one of pydicom's bundled test files, as that tool's own process,
through a transparent recording relay (`tests/interop/wire.py`) to dicom-ingestd, configured
as storescp `+xa +B +uf` (`negotiation.preferred_transfer_syntax = "all"`,
`storage.bit_preserving = true`, `storage.filenames = "unique"`).  The default mode
(`bit_preserving = false`) stores the received data set unchanged as well, and gave the same
table when this was written.

Legend:

- **pass**: every association was accepted; every proposed presentation context got storescp's
  answer (the first syntax of the `+xa` list the context proposes); every C-STORE/C-ECHO was
  answered 0x0000; the object was stored once with a file meta naming its SOP class, instance
  and the accepted transfer syntax; the stored data set is **byte for byte what the sender put
  on the wire**; the log names the sender's AE title for the association and the object; the
  staging area is empty.  `pass` alone: the sender sent the file's own data set bytes in the
  file's syntax.  `→ X`: the sender converted the data set to X (the daemon accepted X because
  of what the sender proposed); `(re-encoded)`: same syntax, but the sender re-wrote the data
  set (lengths, group lengths, padding); what changed is in the per-cell table.
- **not sent**: the sender did not send this file (its own limitation; the reason is its own
  message).  The receiver's side of the association was still checked.
- **skip**: the sender cannot run on this machine, or has no C-ECHO.
- **{BATCH_LABEL}** (row): the sender is given every file at once (less those it cannot
  read at all, see its column) and sends them its own way (one association or several);
  `n/m`: it sent n of the m files.  Every object it sent is checked as above, matched to a
  stored file by its bytes.
- **FAIL**: a receiver-side check failed (listed in the notes).
- ⚠: the sender's data set does not match the transfer syntax it sent it under (a sender
  defect, stored as received, as storescp +B does).

{BEGIN}
{render_table(harness)}{END}

## Senders and versions

{chr(10).join(versions)}

{chr(10).join(notes)}
"""


def _system() -> str:
    try:
        debian = "Debian " + Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = platform.system()
    return f"{debian}, Python {platform.python_version()}, {java_version()}"


def table_of(document: str) -> str:
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < 0:
        return ""
    return document[start + len(BEGIN):end].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help=f"compare a new run with {DOC.relative_to(REPO)}; exit 1 if stale")
    mode.add_argument("--print", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="interop-") as directory, \
            open_harness(Path(directory)) as harness:
        run_all(harness)
        document = render(harness)
    failed = [c for c in harness.cells.values() if c.outcome == FAIL]
    if args.print:
        print(document, end="")
    elif args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if table_of(current) != table_of(document):
            print(f"{DOC.relative_to(REPO)} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        print(f"{DOC.relative_to(REPO)} is current")
    else:
        DOC.write_text(document)
        print(f"wrote {DOC.relative_to(REPO)}")
    for cell in failed:
        print(f"FAIL {cell.sender} × {cell.syntax or 'C-ECHO'}: {'; '.join(cell.problems)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
