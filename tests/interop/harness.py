"""Run one sender against the daemon (through the wire tap) and judge the result.

A cell of the matrix is one sender sending one file.  The daemon runs with storescp's `+xa`
preference (`negotiation.preferred_transfer_syntax = "all"`, every transfer syntax accepted) and
`+B` (`storage.bit_preserving = true`), `storage.filenames = "unique"` so that the same object
from several senders never overwrites.

What the *receiver* must get right, for every association a sender opens (any miss is a
problem, i.e. a failed test):
* the association is accepted, every proposed context gets the answer storescp's rule gives
  (the first syntax of the `+xa` list that the context proposes; refused when there is none),
  the daemon never aborts and answers a release;
* every C-STORE-RQ and C-ECHO-RQ is answered with status 0x0000;
* the object is stored once, its file meta names its SOP class, instance and the transfer
  syntax of the context it came on, and its data set is byte for byte what the sender put on the
  wire; nothing is left in the staging area;
* the log names the sender's AE title for the association and the stored object (or C-ECHO).

A last cell per sender gives it every file at once (`batch`): several objects, contexts and
syntaxes in one invocation, each object it sent checked as above.

What the *sender* did is recorded, not judged: whether it sent the file at all (if not, the
cell is "not sent" with the tool's own message: a visible skip), and whether the data set on the
wire is the file's (`as in file`), the same elements re-encoded, or converted to another syntax.
"""

import os
import re
import subprocess
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from support.data import data_set_bytes
from support.uids import DEFLATED_LE
from support.wire import C_ECHO_RQ, C_STORE_RQ

# The +xa list itself is pinned to storescp 3.6.7's by test_negotiation.py / test_differential.py.
from dicom_ingestd.dcmtk.transfer import PREFERENCES
from dicom_ingestd.worker.negotiation import STORAGE_SOP_CLASSES, VERIFICATION_SOP_CLASS

from .senders import CALLED_AE, SYNTAX_BY_UID, SYNTAXES, TEST_FILES, Sender, Syntax
from .wire import Association, WireTap

PREFERENCE = "all"
DAEMON_SETTINGS: dict[str, dict[str, Any]] = {
    "negotiation": {"preferred_transfer_syntax": PREFERENCE},
    "storage": {"bit_preserving": True, "filenames": "unique"},
    "logging": {"level": "info"},
}
ACCEPTED_ABSTRACT_SYNTAXES = frozenset((VERIFICATION_SOP_CLASS, *STORAGE_SOP_CLASSES))
TOOL_TIMEOUT = 120.0

PASS, FAIL, NOT_SENT, SKIP = "pass", "fail", "not sent", "skip"
# Sent as a data set of odd length (PS3.7 Annex F): aborted, as DCMTK storescp aborts it.
REFUSED = "refused"
BATCH = "batch"  # the cell key of "every file in one invocation"


class DaemonLike(Protocol):
    port: int
    out: Path

    def log(self) -> str: ...

    def files(self) -> list[Path]: ...

    def staging(self) -> list[Path]: ...


@dataclass
class Cell:
    """The result of one sender × one transfer syntax (or C-ECHO: syntax None)."""

    sender: str
    syntax: str | None
    outcome: str = PASS
    negotiated: str = ""  # transfer syntax UID of the context the object came on
    sent_as: str = ""  # what the sender put on the wire, relative to the file
    reason: str = ""  # why not sent / skipped
    problems: list[str] = field(default_factory=list)  # receiver-side failures
    associations: int = 0
    seconds: float = 0.0  # wall time of the tool (not rendered: it varies)

    def fail(self, problem: str) -> None:
        self.problems.append(problem)
        self.outcome = FAIL


# --- Part 10 helpers -----------------------------------------------------------------------------


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path)


def syntax_label(uid: str) -> str:
    known = SYNTAX_BY_UID.get(uid)
    return known.label if known else (UID(uid).name or uid)




def _is_big_endian(uid: str) -> bool:
    return uid == "1.2.840.10008.1.2.2"


def element_differences(sent: Dataset, original: Dataset, *, pixels: bool) -> list[str]:
    """Top-level elements added, removed or changed (group lengths ignored)."""
    differences = []
    tags = sorted(set(sent.keys()) | set(original.keys()))
    for tag in tags:
        if tag.element == 0 or (not pixels and tag == 0x7FE00010):
            continue
        if tag == 0xFFFCFFFC and tag in original and tag not in sent:
            differences.append("trailing padding (FFFC,FFFC) dropped")
        elif tag not in original:
            differences.append(f"{tag} added")
        elif tag not in sent:
            differences.append(f"{tag} removed")
        else:
            try:
                same = sent[tag].value == original[tag].value
            except Exception as exc:  # a value pydicom cannot decode: say so, don't crash
                differences.append(f"{tag} unreadable ({exc.__class__.__name__})")
                continue
            if not same:
                differences.append(f"{tag} changed")
            elif sent[tag].VR != original[tag].VR:
                differences.append(f"{tag} VR {original[tag].VR}→{sent[tag].VR}")
    return differences


def _length_forms(ds: Dataset) -> list[tuple[int, bool]]:
    """(tag, undefined length?) of every sequence and item, depth first."""
    forms = []
    for element in ds:
        if element.VR == "SQ":
            forms.append((int(element.tag), bool(element.is_undefined_length)))
            for item in element.value:
                forms.append((0xFFFEE000, bool(getattr(
                    item, "is_undefined_length_sequence_item", False))))
                forms += _length_forms(item)
    return forms


def _inflated(data: bytes) -> bytes:
    return zlib.decompress(data, -zlib.MAX_WBITS)


def _encapsulated_under_native(ds: Dataset, syntax: str) -> bool:
    """Pixel data in fragments (undefined length) under a native (uncompressed) syntax."""
    return "PixelData" in ds and not UID(syntax).is_compressed and \
        bool(ds["PixelData"].is_undefined_length)


def describe_sending(stored: Path, original: Path, negotiated: str) -> str:
    """What the sender put on the wire (the stored file, once it matched the wire) vs the file."""
    file_syntax = str(read(original).file_meta.TransferSyntaxUID)
    if negotiated == file_syntax and data_set_bytes(stored) == data_set_bytes(original):
        return "as in file"
    if negotiated == file_syntax == DEFLATED_LE:
        try:
            if _inflated(data_set_bytes(stored)) == _inflated(data_set_bytes(original)):
                return "re-deflated: the same data set, compressed differently"
        except zlib.error as exc:
            return f"deflate stream unreadable ({exc})"
    try:
        sent, source = read(stored), read(original)
    except Exception as exc:
        return f"undecodable ({exc.__class__.__name__}: {exc})"
    if _encapsulated_under_native(sent, negotiated):
        return (f"encapsulated pixel data sent as {syntax_label(negotiated)} "
                "(sender defect: not decompressed)")
    compare_pixels = negotiated == file_syntax or (
        not UID(negotiated).is_compressed and not UID(file_syntax).is_compressed
        and _is_big_endian(negotiated) == _is_big_endian(file_syntax))
    differences = element_differences(sent, source, pixels=compare_pixels)
    lengths = {e.tag for e in sent if e.tag.element == 0} ^ \
        {e.tag for e in source if e.tag.element == 0}
    what = "same elements" if not differences else \
        "elements differ: " + ", ".join(differences[:4]) + \
        (f" (+{len(differences) - 4})" if len(differences) > 4 else "")
    if lengths:
        what += ", group lengths added or removed"
    if _length_forms(sent) != _length_forms(source):
        what += ", sequence/item lengths changed (undefined ↔ explicit)"
    if not compare_pixels:
        what += " (pixel data not compared)"
    if negotiated == file_syntax:
        return f"re-encoded: {what}"
    return f"converted to {syntax_label(negotiated)}: {what}"


# --- the harness ---------------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    output: str
    associations: list[Association]
    log: str
    new_files: list[Path]
    seconds: float


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    interesting = [line for line in lines
                   if re.search(r"error|fail|cannot|unable|exception|no such|not ", line, re.I)]
    chosen = (interesting or lines or ["(no output)"])[-1]
    # no machine-specific paths: the text goes into the committed matrix
    return chosen.replace(f"{TEST_FILES}/", "").replace(str(TEST_FILES), "test_files")[:200]


class Harness:
    """Runs senders against one daemon through one wire tap; caches every cell."""

    def __init__(self, daemon: DaemonLike, tap: WireTap) -> None:
        self.daemon = daemon
        self.tap = tap
        self.cells: dict[tuple[str, str | None], Cell] = {}
        self.implementations: dict[str, str] = {}  # sender key -> implementation UID/version

    def _run(self, command: list[str], expect: str, stdin: str = "") -> Run:
        before_files = set(self.daemon.files())
        before_log = len(self.daemon.log())
        env = {**os.environ, "TCP_NODELAY": "1"}
        start = time.monotonic()
        try:
            result = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                    timeout=TOOL_TIMEOUT, env=env, input=stdin)
            returncode, output = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired as exc:
            returncode, output = -1, f"timed out after {TOOL_TIMEOUT} s: {exc}"
        seconds = time.monotonic() - start
        associations = self.tap.take()
        # The daemon logs before it answers, but give a forked worker's line a moment to land
        # (only when something was sent that it must log).
        requested = any(m.command_field in (C_STORE_RQ, C_ECHO_RQ)
                        for assoc in associations for m in assoc.sent)
        deadline = time.monotonic() + (5.0 if requested else 0.0)
        log = self.daemon.log()[before_log:]
        while expect and not re.search(expect, log) and time.monotonic() < deadline:
            time.sleep(0.05)
            log = self.daemon.log()[before_log:]
        new_files = sorted(set(self.daemon.files()) - before_files)
        return Run(returncode, output, associations, log, new_files, seconds)

    def _check_associations(self, cell: Cell, run: Run, sender: Sender) -> None:
        cell.associations = len(run.associations)
        for number, assoc in enumerate(run.associations, 1):
            where = f"association {number}"
            if assoc.implementation_uid:
                self.implementations[sender.key] = \
                    f"{assoc.implementation_uid} {assoc.implementation_version}".strip()
            for error in assoc.errors:
                cell.fail(f"{where}: wire tap: {error}")
            if assoc.outcome != "accepted":
                cell.fail(f"{where}: {assoc.outcome}")
                continue
            if assoc.calling_ae != sender.ae_title:
                cell.fail(f"{where}: calling AE {assoc.calling_ae!r}, expected "
                          f"{sender.ae_title!r}")
            for context_id, (abstract, proposed) in assoc.proposed.items():
                # storescp's rule, restated here rather than imported: the first syntax of
                # the acceptor's list that the context proposes, whatever the proposal's order
                expected = next((ts for ts in PREFERENCES[PREFERENCE] if ts in proposed),
                                None) if abstract in ACCEPTED_ABSTRACT_SYNTAXES else None
                result, syntax = assoc.accepted.get(context_id, (-1, ""))
                if expected is None and result == 0:
                    cell.fail(f"{where}: context {context_id} ({abstract}, {proposed}) accepted "
                              f"with {syntax}; storescp's rule refuses it")
                elif expected is not None and (result, syntax) != (0, expected):
                    cell.fail(f"{where}: context {context_id} ({abstract}, {proposed}): result "
                              f"{result} {syntax}, expected acceptance with {expected}")
            if "daemon" in assoc.aborted_by:
                cell.fail(f"{where}: the daemon sent A-ABORT")
            if assoc.release_requested and not assoc.released and \
                    "sender" not in assoc.aborted_by:
                cell.fail(f"{where}: release requested but never answered")
            for request in assoc.sent:
                if request.command_field not in (C_STORE_RQ, C_ECHO_RQ):
                    continue
                response = assoc.response_to(request)
                if response is None:
                    if "sender" not in assoc.aborted_by:
                        cell.fail(f"{where}: message {request.message_id} never answered")
                elif response.status != 0x0000:
                    cell.fail(f"{where}: message {request.message_id} answered with status "
                              f"{response.status:#06x}")
        # a worker discards a partial object as its association ends, a moment after the peer
        deadline = time.monotonic() + 5.0
        while (leftovers := self.daemon.staging()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if leftovers:
            cell.fail(f"left in the staging area: {[p.name for p in leftovers]}")

    def store(self, sender: Sender, syntax: Syntax) -> Cell:
        key = (sender.key, syntax.key)
        if key not in self.cells:
            self.cells[key] = self._store(sender, syntax)
        return self.cells[key]

    def _store(self, sender: Sender, syntax: Syntax) -> Cell:
        cell = Cell(sender.key, syntax.key)
        why_not = sender.unavailable()
        if why_not:
            cell.outcome, cell.reason = SKIP, why_not
            return cell
        original = read(syntax.path)
        sop_instance = str(original.SOPInstanceUID)
        uid_pattern = re.escape(sop_instance)
        who = rf"{re.escape(sender.ae_title)}->{re.escape(CALLED_AE)}"
        run = self._run(sender.store(sender, self.tap.port, syntax),
                        expect=rf"{who}: (stored|C-STORE of) {uid_pattern}")
        cell.seconds = run.seconds
        self._check_associations(cell, run, sender)
        sent = [(assoc, message) for assoc in run.associations for message in assoc.sent
                if message.command_field == C_STORE_RQ and message.sop_instance == sop_instance]
        if not sent:
            if cell.outcome == PASS:
                cell.outcome = NOT_SENT
            cell.reason = (f"{sender.label} did not send it (exit {run.returncode}"
                           f"{', no association' if not run.associations else ''}): "
                           f"{_last_line(run.output)}")
            return cell
        if len(sent) > 1:
            cell.fail(f"sent {len(sent)} times")
        assoc, message = sent[0]
        negotiated = assoc.transfer_syntax(message.context_id) or ""
        cell.negotiated = negotiated
        stored = self._stored_files(run)
        if message.data_set is not None and len(message.data_set) % 2:
            # storescp aborts such an association ("DIMSE: Odd Fragment Length"); so must we.
            if stored or not re.search(rf"{who}: aborting association: odd fragment length",
                                       run.log):
                cell.fail(f"a data set of odd length ({len(message.data_set)} bytes) was not "
                          "aborted as storescp aborts it")
                return cell
            refused = Cell(sender.key, syntax.key, REFUSED, negotiated, seconds=run.seconds,
                           associations=cell.associations)
            why = f"; {syntax.file_name}'s deflated stream lacks the padding NUL of " \
                "PS3.5 A.5" if syntax.key == "deflated" else ""
            refused.reason = (f"{sender.label} sent the data set with an odd length "
                              f"({len(message.data_set)} bytes{why}): the association is "
                              "aborted and nothing stored, as DCMTK storescp does "
                              "(\"DIMSE: Odd Fragment Length\")")
            return refused
        if len(stored) != 1:
            cell.fail(f"{len(stored)} files stored, expected 1: {[p.name for p in stored]}")
            return cell
        path = stored[0]
        meta = read(path).file_meta
        if (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                str(meta.TransferSyntaxUID)) != (message.sop_class, sop_instance, negotiated):
            cell.fail(f"file meta names {meta.MediaStorageSOPClassUID} "
                      f"{meta.MediaStorageSOPInstanceUID} {meta.TransferSyntaxUID}, expected "
                      f"{message.sop_class} {sop_instance} {negotiated}")
        if data_set_bytes(path) != message.data_set:
            cell.fail(f"stored data set ({len(data_set_bytes(path))} bytes) is not the "
                      f"{len(message.data_set or b'')} bytes sent")
        if not re.search(rf"{who}: association accepted", run.log):
            cell.fail(f"log: no '{sender.ae_title}->{CALLED_AE}: association accepted'")
        if not re.search(rf"{who}: stored {uid_pattern} ", run.log):
            cell.fail(f"log: no '{sender.ae_title}->{CALLED_AE}: stored {sop_instance}'")
        if sender.exit_code_reliable and run.returncode != 0:
            cell.fail(f"{sender.label} exited {run.returncode} although the object was stored: "
                      f"{_last_line(run.output)}")
        if cell.outcome == PASS:
            cell.sent_as = describe_sending(path, syntax.path, negotiated)
        return cell

    def _stored_files(self, run: Run) -> list[Path]:
        return [p for p in run.new_files  # not the job queue's state, if any
                if not p.relative_to(self.daemon.out).parts[0].startswith(".ingestd")]

    def batch(self, sender: Sender) -> Cell:
        key = (sender.key, BATCH)
        if key not in self.cells:
            self.cells[key] = self._batch(sender)
        return self.cells[key]

    def _batch(self, sender: Sender) -> Cell:
        """Every file (but those the tool cannot read) in one invocation of the sender."""
        cell = Cell(sender.key, BATCH)
        why_not = sender.unavailable()
        if why_not or sender.store_many is None:
            cell.outcome = SKIP
            cell.reason = why_not or f"{sender.label} takes one file per invocation"
            return cell
        directory = self.daemon.out.parent / f"batch-{sender.key}"
        directory.mkdir(exist_ok=True)
        given = [s for s in SYNTAXES if s.key not in sender.unreadable
                 and self.store(sender, s).outcome != REFUSED]  # it would abort the batch
        for number, syntax in enumerate(given, 1):
            link = directory / f"{number:02d}-{syntax.file_name}"
            if not link.exists():
                link.symlink_to(syntax.path)
        command, stdin = sender.store_many(sender, self.tap.port, directory)
        who = rf"{re.escape(sender.ae_title)}->{re.escape(CALLED_AE)}"
        run = self._run(command, expect="", stdin=stdin)
        cell.seconds = run.seconds
        self._check_associations(cell, run, sender)
        requests = [(assoc, m) for assoc in run.associations for m in assoc.sent
                    if m.command_field == C_STORE_RQ]
        succeeded = [(assoc, m) for assoc, m in requests
                     if (r := assoc.response_to(m)) is not None and r.status == 0]
        deadline = time.monotonic() + 5.0
        stored_lines = re.findall(rf"{who}: stored ", run.log)
        while len(stored_lines) < len(succeeded) and time.monotonic() < deadline:
            time.sleep(0.05)
            stored_lines = re.findall(rf"{who}: stored ", self.daemon.log())
        stored = self._stored_files(run)
        if len(stored) != len(succeeded):
            cell.fail(f"{len(stored)} files stored for {len(succeeded)} successful C-STOREs")
        by_bytes = {data_set_bytes(p): p for p in stored}
        mislabelled = 0
        for assoc, message in succeeded:
            path = by_bytes.get(message.data_set or b"")
            negotiated = assoc.transfer_syntax(message.context_id) or ""
            if path is None:
                cell.fail(f"no stored file has the data set sent for {message.sop_instance} "
                          f"(message {message.message_id}, {syntax_label(negotiated)})")
                continue
            received = read(path)
            meta = received.file_meta
            mislabelled += _encapsulated_under_native(received, negotiated)
            if (str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)) != \
                    (message.sop_instance, negotiated):
                cell.fail(f"{path.name}: file meta names {meta.MediaStorageSOPInstanceUID} "
                          f"{meta.TransferSyntaxUID}, expected {message.sop_instance} "
                          f"{negotiated}")
        if len(stored_lines) < len(succeeded):
            cell.fail(f"log: {len(stored_lines)} '{sender.ae_title}->{CALLED_AE}: stored' "
                      f"lines for {len(succeeded)} objects")
        if not requests and cell.outcome == PASS:
            cell.outcome = NOT_SENT
        cell.sent_as = (f"{len(requests)} of {len(given)} files sent in "
                        f"{len(run.associations)} association(s)")
        if mislabelled:
            cell.sent_as += (f"; {mislabelled} with encapsulated pixel data under an "
                             "uncompressed syntax (sender defect)")
        if len(requests) < len(given):
            cell.reason = f"{sender.label} (exit {run.returncode}): {_last_line(run.output)}"
        return cell

    def echo(self, sender: Sender) -> Cell:
        key = (sender.key, None)
        if key not in self.cells:
            self.cells[key] = self._echo(sender)
        return self.cells[key]

    def _echo(self, sender: Sender) -> Cell:
        cell = Cell(sender.key, None)
        why_not = sender.unavailable()
        if why_not or sender.echo is None:
            cell.outcome, cell.reason = SKIP, why_not or sender.echo_missing
            return cell
        who = rf"{re.escape(sender.ae_title)}->{re.escape(CALLED_AE)}"
        run = self._run(sender.echo(sender, self.tap.port),
                        expect=rf"{who}: C-ECHO")
        cell.seconds = run.seconds
        self._check_associations(cell, run, sender)
        echoes = [(assoc, m) for assoc in run.associations for m in assoc.sent
                  if m.command_field == C_ECHO_RQ]
        if not echoes:
            if cell.outcome == PASS:
                cell.outcome = NOT_SENT
            cell.reason = (f"{sender.label} sent no C-ECHO-RQ (exit {run.returncode}): "
                           f"{_last_line(run.output)}")
            return cell
        assoc, message = echoes[0]
        cell.negotiated = assoc.transfer_syntax(message.context_id) or ""
        if not re.search(rf"{who}: C-ECHO", run.log):
            cell.fail(f"log: no '{sender.ae_title}->{CALLED_AE}: C-ECHO'")
        if run.new_files:
            cell.fail(f"C-ECHO stored files: {[p.name for p in run.new_files]}")
        if sender.exit_code_reliable and run.returncode != 0:
            cell.fail(f"{sender.label} exited {run.returncode}: {_last_line(run.output)}")
        return cell
