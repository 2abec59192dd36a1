"""Study tracking: stored objects in, complete studies out.  Pure: no I/O, clock injected.

storescp 3.6.7 keeps one "current study" per process: the study ends when the next object
stored belongs to another study, or when nothing arrives for -tos seconds (storescp.cc,
storeSCPCallback and the DUL_NOASSOCIATIONREQUEST / DIMSE_NODATAAVAILABLE branches); the end of
an association ends nothing.  That is only meaningful with one association at a time.  Here
every study has its own state, and "the next object belongs to another study" is read per
association:

* an open study A is complete on the arrival of an object of another study through
  association X when every association that stored objects of A is done with it: it has since
  stored an object of another study, or it has ended -- and, when X itself never stored
  objects of A, ended before X stored its first object.  So a single association sending study
  after study, and a sender opening one association per study, behave as in storescp, while
  parallel associations interleaving studies never complete each other's;
* an association that did not end with a release (aborted, cut, its worker killed) or that
  this master does not know (it served an earlier master, or the study was restored after a
  restart) may still have objects of its study to send -- a sender retries what it could
  not send -- so with a timeout its study is complete only by the timeout or by that
  association's own next study: a crash never splits a study into batches;
* an open study is complete `timeout` seconds after its last object (0: never);
* a complete study is never reopened: a later object of it opens a new batch (2, 3, ...);
* only successfully stored objects are fed in, so failed stores never count;
* the same file arriving again in a batch (a sender's retry) is listed once.

`StudyTracker` only decides.  Its caller persists, renames and runs commands.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class CloseReason(StrEnum):
    """Why a study (batch) was considered complete."""

    NEXT_STUDY = "next-study"  # an object of another study arrived (storescp's rule)
    TIMEOUT = "timeout"  # no object for events.eostudy_timeout seconds (storescp -tos)
    STOP = "stop"  # the daemon stopped with events.on_stop = close
    DISABLED = "disabled"  # a reload turned end-of-study events off


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One stored object of a study, as listed in the study's manifest."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str = ""
    patient_id: str = ""
    size: int = 0


@dataclass(frozen=True, slots=True)
class Arrival:
    """A successfully stored object and the association that stored it."""

    study_uid: str
    file: StoredFile
    association: str  # any key unique among running associations
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""


@dataclass(slots=True)
class OpenStudy:
    """A batch of a study still receiving objects."""

    study_uid: str
    batch: int
    opened: float  # clock time of the first object
    last: float  # clock time of the latest object
    files: list[StoredFile] = field(default_factory=list)
    associations: set[str] = field(default_factory=set)
    calling_ae: str = ""  # of the latest object's association (storescp's #a/#c/#r)
    called_ae: str = ""
    peer: str = ""
    # Whether the latest arrival added a file; False for the same file again (a sender
    # sending again an object whose response it never got), which is listed once.
    last_added: bool = True
    _keys: set[tuple[str, str]] = field(default_factory=set)

    def add(self, file: StoredFile) -> None:
        if not self._keys and self.files:
            self._keys = {(f.path, f.sop_instance_uid) for f in self.files}
        key = (file.path, file.sop_instance_uid)
        self.last_added = key not in self._keys
        if self.last_added:
            self._keys.add(key)
            self.files.append(file)


@dataclass(frozen=True, slots=True)
class ClosedStudy:
    """A complete batch of a study: what end-of-study events act on."""

    study_uid: str
    batch: int
    reason: CloseReason
    files: tuple[StoredFile, ...]
    calling_ae: str
    called_ae: str
    peer: str

    @property
    def directory(self) -> str:
        """storescp's #p at end of study: the directory of the study's last object."""
        path = self.files[-1].path if self.files else ""
        return path.rsplit("/", 1)[0] if "/" in path else "."


@dataclass(slots=True)
class _Association:
    first_seen: float
    current: str  # study UID of its latest object
    ended_at: float | None = None
    lost: bool = False  # ended without a release, or unknown: may still be sending


class StudyTracker:
    """Per-study state machine: open → closed, driven by arrivals, association ends and time.

    `clock` returns monotonic seconds.  `previous_batches(study_uid)` returns how many batches
    of the study were already closed (the caller may keep them in a database); by default the
    tracker counts the batches it closed itself.
    """

    def __init__(self, timeout: float, clock: Callable[[], float],
                 previous_batches: Callable[[str], int] | None = None) -> None:
        self.timeout = timeout
        self._clock = clock
        self._studies: dict[str, OpenStudy] = {}
        self._associations: dict[str, _Association] = {}
        self._closed_batches: dict[str, int] = {}
        self._previous = previous_batches or (lambda uid: self._closed_batches.get(uid, 0))

    # -- inputs ----------------------------------------------------------------------------
    def arrive(self, arrival: Arrival) -> tuple[OpenStudy, list[ClosedStudy]]:
        """Record a stored object; return its (possibly new) open study and the studies that
        this arrival completed (in the order they were opened)."""
        now = self._clock()
        uid = arrival.study_uid
        assoc = self._associations.get(arrival.association)
        if assoc is None or assoc.ended_at is not None:
            # An unknown key, or a key reused after its association ended (thread ids): a
            # new association.
            assoc = _Association(first_seen=now, current=uid)
            self._associations[arrival.association] = assoc
        assoc.current = uid
        study = self._studies.get(uid)
        if study is None:
            study = OpenStudy(uid, self._previous(uid) + 1, opened=now, last=now)
            self._studies[uid] = study
        study.add(arrival.file)
        study.associations.add(arrival.association)
        study.last = now
        study.calling_ae, study.called_ae = arrival.calling_ae, arrival.called_ae
        study.peer = arrival.peer
        closed = [self._close(other, CloseReason.NEXT_STUDY)
                  for other in list(self._studies.values())
                  if other.study_uid != uid and self._done_with(other, arrival.association)]
        self._forget_associations()
        return study, closed

    def association_ended(self, key: str, released: bool = True) -> None:
        """An association ended (this alone completes nothing, as in storescp); without
        `released` it may still have objects of its study to send (see the docstring)."""
        assoc = self._associations.get(key)
        if assoc is not None and assoc.ended_at is None:
            assoc.ended_at = self._clock()
            assoc.lost = not released
        self._forget_associations()

    def restore(self, study: OpenStudy) -> None:
        """Adopt a study persisted by an earlier run: its associations are unknown (lost),
        and its timeout counts from now."""
        now = self._clock()
        key = f"restored {study.study_uid}"
        self._associations[key] = _Association(now, study.study_uid, now, lost=True)
        study.associations = {key}
        study.last = now
        self._studies[study.study_uid] = study

    # -- time and stop ---------------------------------------------------------------------
    def expire(self) -> list[ClosedStudy]:
        """Close the studies whose timeout has passed."""
        if not self.timeout:
            return []
        now = self._clock()
        return [self._close(study, CloseReason.TIMEOUT) for study in list(self._studies.values())
                if now >= study.last + self.timeout]

    def next_deadline(self) -> float | None:
        """Clock time of the next timeout, or None."""
        if not self.timeout or not self._studies:
            return None
        return min(study.last for study in self._studies.values()) + self.timeout

    def close_all(self, reason: CloseReason) -> list[ClosedStudy]:
        """Close every open study (daemon stop with on_stop = close, events disabled)."""
        return [self._close(study, reason) for study in list(self._studies.values())]

    def open_studies(self) -> list[OpenStudy]:
        return list(self._studies.values())

    # -- rules -----------------------------------------------------------------------------
    def _done_with(self, study: OpenStudy, trigger: str) -> bool:
        trigger_assoc = self._associations[trigger]
        inside = trigger in study.associations
        for key in study.associations:
            assoc = self._associations.get(key)
            if assoc is None:
                continue  # forgotten: ended long ago
            if assoc.lost and self.timeout and assoc.current == study.study_uid:
                return False  # may still send this study: the timeout decides
            if assoc.ended_at is None:
                if assoc.current == study.study_uid:
                    return False  # still sending this study
            elif not inside and assoc.ended_at > trigger_assoc.first_seen:
                return False  # a parallel association, not a later one
        return True

    def _close(self, study: OpenStudy, reason: CloseReason) -> ClosedStudy:
        del self._studies[study.study_uid]
        self._closed_batches[study.study_uid] = study.batch
        return ClosedStudy(study.study_uid, study.batch, reason, tuple(study.files),
                           study.calling_ae, study.called_ae, study.peer)

    def _forget_associations(self) -> None:
        """Drop ended associations no open study refers to (bounded memory)."""
        referenced: set[str] = set()
        for study in self._studies.values():
            referenced.update(study.associations)
        for key in [k for k, a in self._associations.items()
                    if a.ended_at is not None and k not in referenced]:
            del self._associations[key]
        if len(self._closed_batches) > 100_000:
            self._closed_batches.clear()


def batch_label(study_uid: str, batch: int) -> str:
    """'study 1.2.3' or 'study 1.2.3 (batch 2)', for log lines."""
    return f"study {study_uid}" + (f" (batch {batch})" if batch > 1 else "")
