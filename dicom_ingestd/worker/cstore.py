"""The C-STORE service of one association: receive, place, record, answer, log.

`Session` (the upper layer and DIMSE dispatch) hands each C-STORE-RQ to `StorageSCP.begin`,
streams the data set's fragments into the `IncomingObject` it returns (`write`), and calls
`finish` at the last fragment; `finish` answers the C-STORE through the session's `respond`.
The order follows the durability promise: the data set streams into a temporary file; at its
last fragment the file is fsynced, checked, placed and its directory fsynced, its event
record is made durable (recorder.py), and only then is the success response sent.

No staging file outlives its C-STORE: `finish` drops the object's file whatever happened
(placing hands it to the store, which removes it either way), and `close` drops the object
still being received and the spare file when the association ends, however it ends.
"""

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from dicom_ingestd.codes import Status, status_name
from dicom_ingestd.config.schema import Config
from dicom_ingestd.dicom import dimse
from dicom_ingestd.dicom.pdu import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    Channel,
    UserAbort,
)
from dicom_ingestd.errors import StorageError
from dicom_ingestd.outbox import StoredObject
from dicom_ingestd.peer import Peer
from dicom_ingestd.telemetry import Reporter
from dicom_ingestd.worker import acceptor, encode, header
from dicom_ingestd.worker.identify import (
    DataSetTooLarge,
    Identity,
    UnreadableDataSet,
    identify,
    identify_prefix,
)
from dicom_ingestd.worker.layout import Layout
from dicom_ingestd.worker.naming import MissingStudyUID
from dicom_ingestd.worker.recorder import Recorder
from dicom_ingestd.worker.store import Placed, Store, TempFile, sort_holder

log = logging.getLogger("dicom_ingestd.association")

HEAD_BYTES = 1 << 16  # identifying attributes sit in the first few KiB of a data set
SPARE_WAIT = 0.001  # seconds: a peer's next PDU this quick after a response needs no spare

# Sends a DIMSE response: (context id, command field, message id, status, SOP class,
# SOP instance, error comment).
Respond = Callable[[int, int, int, int, str, str, str], None]


def journal_extra(journal: dict[str, object], more: dict[str, object]) -> dict[str, object]:
    """A log call's `extra`: the association's journal fields and those of `more` that have
    a value."""
    fields = dict(journal)
    fields.update({k: v for k, v in more.items() if v not in (None, "")})
    return {"journal": fields}


class Counts(Protocol):
    """The association's C-STORE counters (the session's Outcome)."""

    stored: int
    failed: int
    bytes_stored: int


class IncomingObject:
    """The C-STORE whose data set is being received: its request, its staging file (None:
    the data set is drained, as the request was ignored or failed up front) and the status
    decided so far."""

    __slots__ = ("bytes", "command", "context", "head", "status", "temp", "why")

    def __init__(self, command: dimse.Command, context: acceptor.AcceptedContext,
                 temp: TempFile | None, status: int, why: str) -> None:
        self.command = command
        self.context = context
        self.temp = temp
        self.status = status
        self.why = why
        self.bytes = 0
        self.head = bytearray()  # the data set's first bytes, to identify it without a reparse

    def write(self, chunk: memoryview) -> None:
        assert self.temp is not None
        self.temp.write(chunk)
        room = HEAD_BYTES - len(self.head)
        if room > 0:
            self.head += chunk[:room]

    def discard(self) -> None:
        """Remove its staging file, unless it was handed on (never raises)."""
        if self.temp is not None:
            self.temp.discard()
            self.temp = None


class StorageSCP:
    """The Storage service class (SCP) of one association, made at its first C-STORE.

    `who` and `journal` name the association in log lines; `counts` is the session's
    Outcome (stored, failed, bytes_stored), kept up to date here.
    """

    def __init__(self, config: Config, store: Store, recorder: Recorder | None,
                 reporter: Reporter | None, channel: Channel, respond: Respond, *,
                 peer: Peer, calling_ae: str, called_ae: str, who: str,
                 journal: dict[str, object], counts: Counts) -> None:
        self.config = config
        self.store = store
        self.recorder = recorder
        self.reporter = reporter
        self.channel = channel
        self.respond = respond
        self.peer = peer
        self.calling_ae = calling_ae
        self.called_ae = called_ae
        self.who = who
        self.journal = journal
        self.counts = counts
        self.layout = Layout(config.storage, functools.partial(
            store.study_directory, idle=float(config.events.eostudy_timeout)),
            store.release_studies, sort_holder())
        self._rewrite = encode.wanted(config.storage)  # storescp's output options (encode.py)
        self._incoming: IncomingObject | None = None
        # The next object's temporary file, created while the peer prepares that object
        # (the first one right after the A-ASSOCIATE-AC, `prepare`): creating an inode costs
        # 0.1-0.5 ms of kernel time on ext4, taken off the critical path as far as the
        # peer's own time allows (a fast sender of one small object outruns it).
        self._spare = ""  # its name (Store.reserve): nothing is held open meanwhile

    def _fields(self, **more: object) -> dict[str, object]:
        return journal_extra(self.journal, more)

    def prepare(self) -> None:
        """Create the first object's temporary file now, while the peer sends the object
        (the association has just accepted a storage context); `close` removes it if no
        C-STORE comes.  A failure is left for the C-STORE to meet and answer."""
        if not self._spare and not self.config.testing.ignore \
                and not self.peer.verification_only and self.store.has_free_space():
            with contextlib.suppress(StorageError):
                self._spare = self.store.reserve()

    # -- the association's end ---------------------------------------------------------------
    def close(self) -> None:
        """Drop the object being received and the spare file (idempotent; the one place
        where a C-STORE's staging files are given up at an association's end)."""
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None
        if self._spare:
            self.store.unreserve(self._spare)
            self._spare = ""

    def release_studies(self) -> None:
        """The association is over: its studies are no longer held open by it."""
        with contextlib.suppress(OSError):  # a process that died is noticed without it
            self.layout.finish()

    # -- one C-STORE ---------------------------------------------------------------------
    def begin(self, command: dimse.Command,
              context: acceptor.AcceptedContext) -> IncomingObject:
        """A C-STORE-RQ whose data set follows: where its fragments go."""
        status: int = Status.SUCCESS
        why = ""
        temp: TempFile | None = None
        if self.peer.verification_only:
            # Nothing but Verification is accepted on it; this guards the Verification
            # context itself (a C-STORE "of" SOP class 1.2.840.10008.1.1 on it).
            status = Status.NOT_AUTHORIZED
            why = ("refused on a PROXY protocol LOCAL connection: the proxy's own "
                   "connection may only use Verification")
        elif command.sop_class_uid != context.abstract_syntax:
            status = Status.SOP_CLASS_NOT_SUPPORTED
            why = (f"SOP class {command.sop_class_uid} sent on a context for "
                   f"{context.abstract_syntax}")
        elif self.config.testing.ignore:
            why = "ignored (testing.ignore)"
        elif not self.store.has_free_space():
            status = Status.OUT_OF_RESOURCES
            why = (f"free space below storage.min_free_space "
                   f"({self.config.storage.min_free_space} bytes)")
        else:
            try:
                temp, self._spare = self.store.temp_file(self._spare), ""
                temp.write(self._file_meta(command, context.transfer_syntax))
            except StorageError as exc:
                status, why = exc.status, str(exc)
        self._incoming = IncomingObject(command, context, temp, status, why)
        return self._incoming

    def _file_meta(self, command: dimse.Command, transfer_syntax: str) -> bytes:
        return header.file_meta(command.sop_class_uid, command.sop_instance_uid,
                                transfer_syntax, IMPLEMENTATION_CLASS_UID,
                                IMPLEMENTATION_VERSION, self.calling_ae)

    def finish(self, current: IncomingObject) -> None:
        """The data set is complete: place it, answer the C-STORE, log it."""
        command = current.command
        streamed = current.temp is not None
        status, why = current.status, current.why
        ident: Identity | None = None
        path = ""
        stored: StoredObject | None = None
        commit: float | None = None  # seconds from the last byte to durable in place
        testing = self.config.testing
        try:
            if testing.abort_during or testing.abort_after:
                raise UserAbort("testing.abort_during" if testing.abort_during
                                else "testing.abort_after")
            if streamed and status == Status.SUCCESS:
                started = time.monotonic()
                try:
                    placed, ident = self._place(current)
                    path = placed.path
                    commit = time.monotonic() - started
                    stored = self._record(command, ident, placed, current.bytes)
                except StorageError as exc:
                    status, why = exc.status, str(exc)
        finally:
            current.discard()  # placed: already handed on; otherwise its file goes now
            self._incoming = None
        counts = self.counts
        if status == Status.SUCCESS:
            counts.stored += 1
            counts.bytes_stored += current.bytes
        else:
            counts.failed += 1
        try:
            self.respond(current.context.context_id, dimse.C_STORE_RSP, command.message_id,
                         status, command.sop_class_uid, command.sop_instance_uid,
                         why if status != Status.SUCCESS else "")
        finally:
            # Counted and logged once the response is out: the sender goes on with its next
            # object while we format and write the line (~0.1 ms), and both happen even when
            # the response cannot be sent.  They still precede the next PDU's processing.
            if self.reporter is not None:
                self.reporter.store(status, current.bytes, commit, why, self.peer.name,
                                    self.calling_ae)
            # The journal fields only for a line that is written (logging.level = warn
            # writes no success line).
            if status == Status.SUCCESS:
                if log.isEnabledFor(logging.INFO):
                    log.info("%s: stored %s (study %s, %d bytes) %s", self.who,
                             command.sop_instance_uid, ident.study_uid if ident else "-",
                             current.bytes, path or why, extra=self._store_fields(
                                 command, status, ident, path))
            else:
                log.error("%s: C-STORE of %s failed with %s: %s", self.who,
                          command.sop_instance_uid, status_name(status), why,
                          extra=self._store_fields(command, status, ident, path))
        if stored is not None and self.recorder is not None:
            self.recorder.after_response(stored)
        if streamed and not self._spare and self._spare_wanted():
            with contextlib.suppress(StorageError):  # the next C-STORE will report it
                self._spare = self.store.reserve()
        if testing.sleep_after:
            time.sleep(testing.sleep_after)

    def _store_fields(self, command: dimse.Command, status: int, ident: Identity | None,
                      path: str) -> dict[str, object]:
        return self._fields(DICOM_SOP_INSTANCE_UID=command.sop_instance_uid,
                            DICOM_SOP_CLASS_UID=command.sop_class_uid,
                            DICOM_STUDY_UID=ident.study_uid if ident else "",
                            DICOM_STATUS=f"0x{status:04X}", DICOM_FILE=path)

    def _spare_wanted(self) -> bool:
        """Create the next object's temporary file now, while the peer prepares that object?

        After an association's first object only when the peer's next PDU is not here within
        SPARE_WAIT: a sender of one object per association releases at once, and its spare
        would be created and removed while it waits for the A-RELEASE-RP.
        """
        return self.counts.stored + self.counts.failed > 1 \
            or not self.channel.has_data(SPARE_WAIT)

    def _record(self, command: dimse.Command, ident: Identity, placed: Placed,
                size: int) -> StoredObject | None:
        """The object's durable event record, before its response (recorder.py); when it
        cannot be made, the object just placed is withdrawn and StorageError raised."""
        if self.recorder is None:
            return None
        sop_class = command.sop_class_uid
        if placed.kept_existing:
            sop_class = self._kept_class(placed.path, command.sop_instance_uid)
        stored = StoredObject(placed.path, sop_class, command.sop_instance_uid,
                              ident.study_uid, ident.series_uid, ident.patient_id,
                              ident.patient_name, self.calling_ae, self.called_ae,
                              self.peer.name, size)
        try:
            self.recorder.record(stored)
        except StorageError:
            if not placed.kept_existing:
                self.store.withdraw(placed)
            raise
        return stored

    def _kept_class(self, path: str, sop_instance_uid: str) -> str:
        """The SOP class of the file storage.duplicates = keep-first kept in place of the
        object just received (an object of another class may have the same name): what its
        record says, so that storage commitment answers for the file that is there.  '' when
        the file cannot be read or holds another SOP instance (never committed then)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as kept:
                ident = identify(kept, fix_uid_padding=self.config.association.uid_padding,
                                 max_decoded_size=self.config.storage.max_decoded_size)
        except (OSError, UnreadableDataSet, DataSetTooLarge) as exc:
            log.warning("%s: cannot read the SOP class of %s, kept in place of %s: %s; its "
                        "record has none", self.who, path, sop_instance_uid, exc)
            return ""
        return ident.sop_class_uid if ident.sop_instance_uid == sop_instance_uid else ""

    def _place(self, current: IncomingObject) -> tuple[Placed, Identity]:
        """fsync, verify and move the received object into place; raise StorageError.

        Its staging file is not removed here: `finish` does, whatever is raised; the store
        (and encode.rewrite) remove the files handed to them themselves.
        """
        temp = current.temp
        assert temp is not None
        command = current.command
        fix = self.config.association.uid_padding
        try:
            temp.finish(self.config.storage.fsync and not self._rewrite)
            ident = identify_prefix(bytes(current.head), current.context.transfer_syntax,
                                    complete=current.bytes <= len(current.head),
                                    fix_uid_padding=fix)
            if ident is None:  # bounded: a streaming walk of the file (identify.py)
                with temp.open_read() as staged:
                    ident = identify(staged, fix_uid_padding=fix, max_decoded_size=self
                                     .config.storage.max_decoded_size)
        except OSError as exc:
            raise StorageError(f"cannot read {temp.path}: {exc.strerror or exc}",
                               Status.OUT_OF_RESOURCES) from None
        except DataSetTooLarge as exc:
            raise StorageError(f"refused: {exc}", Status.OUT_OF_RESOURCES) from None
        except UnreadableDataSet as exc:
            raise StorageError(f"cannot parse the data set ({exc})",
                               Status.CANNOT_UNDERSTAND) from None
        if not ident.sop_class_uid or not ident.sop_instance_uid:
            raise StorageError("data set has no SOP Class UID or SOP Instance UID",
                               Status.CANNOT_UNDERSTAND)
        if (ident.sop_class_uid, ident.sop_instance_uid) != (command.sop_class_uid,
                                                            command.sop_instance_uid):
            raise StorageError(
                f"data set ({ident.sop_class_uid}, {ident.sop_instance_uid}) does not match "
                f"the request ({command.sop_class_uid}, {command.sop_instance_uid})",
                Status.DATASET_DOES_NOT_MATCH)
        if self._rewrite:
            current.temp = None  # rewrite removes it either way
            temp = current.temp = encode.rewrite(
                self.config.storage, self.store, temp, current.context.transfer_syntax,
                functools.partial(self._file_meta, command))
        try:
            target = self.layout.target(command.sop_class_uid, command.sop_instance_uid,
                                        ident, datetime.now())
        except MissingStudyUID:
            raise StorageError("no Study Instance UID to sort by (storage.sort = "
                               f"{self.config.storage.sort})", Status.CANNOT_UNDERSTAND) \
                from None
        except OSError as exc:  # the shared study directory state (Store.study_directory)
            raise StorageError(f"cannot choose the study directory: {exc.strerror or exc}",
                               Status.OUT_OF_RESOURCES) from None
        current.temp = None  # the store removes it either way
        placed = self.store.commit(temp, target.directories, target.candidates,
                                   replace=target.replace, when_taken=target.when_taken)
        if placed.kept_existing:
            log.info("%s: %s exists, kept the first copy (storage.duplicates = keep-first)",
                     self.who, placed.path)
        return placed, ident
