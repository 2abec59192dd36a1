"""Where an object goes: subdirectory (sorting policy) and file name candidates.

Pure policy on top of naming.py (which holds DCMTK's exact name formats).  One Layout lives per
association, because storescp's "concurrent studies" sorting is a per-process state that
starts a new directory whenever the study changes, and per association is what storescp
--fork gives every association.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast, overload

from pydicom.uid import generate_uid

from dicom_ingestd.config.schema import StorageConfig
from dicom_ingestd.worker import naming
from dicom_ingestd.worker.identify import Identity
from dicom_ingestd.worker.store import WhenTaken

_SERIALS = 10000  # storescp's 4-digit serial (0000-9999)


class NameSeries(Sequence[str]):
    """`first`, then make(0), make(1), ... computed only when tried."""

    def __init__(self, first: str, make: Callable[[int], str], count: int) -> None:
        self._first = first
        self._make = make
        self._count = count

    def __len__(self) -> int:
        return 1 + self._count

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._first if index == 0 else self._make(index - 1)


@dataclass(frozen=True, slots=True)
class Target:
    """Subdirectories and file names to try, with the policy for an existing name."""

    directories: list[str]
    candidates: Sequence[str]
    replace: bool
    when_taken: WhenTaken


class Layout:
    """Computes targets for one association under one storage configuration."""

    def __init__(self, config: StorageConfig,
                 current_study: Callable[[str, str, Callable[[int], str], str], str]
                 | None = None,
                 release: Callable[[str, str], None] | None = None,
                 holder: str = "") -> None:
        """`current_study(key, study_uid, new_name, holder)` shares the study directories
        of conc-studies and patientname sorting between associations
        (Store.study_directory: one directory per study, never two studies in one);
        `new_name(n)` is the name for the object's time plus n milliseconds, `holder` names
        this association, and `release(key, holder)` is called by finish().  Without them
        the state is ours alone, as in one storescp process."""
        self.config = config
        self._current_study = current_study
        self._release = release
        self._holder = holder
        self._key = f"{config.sort}:{config.sort_prefix}"
        self._holding = False
        self._study_uid: str | None = None
        self._study_dir = ""

    def finish(self) -> None:
        """The association is over: its studies are no longer held open by it."""
        if self._holding and self._release is not None:
            self._holding = False
            self._release(self._key, self._holder)

    def _subdirectory(self, ident: Identity, now: datetime) -> list[str]:
        sort = self.config.sort
        if sort == "none":
            return []
        mode = cast(naming.SortMode, sort)
        if mode == "study-uid":
            return [naming.study_subdirectory(mode, self.config.sort_prefix,
                                              study_uid=ident.study_uid,
                                              patient_name=ident.patient_name_raw, when=now)]
        def new_name(later: int = 0) -> str:
            return naming.study_subdirectory(mode, self.config.sort_prefix,
                                             study_uid=ident.study_uid,
                                             patient_name=ident.patient_name_raw,
                                             when=now + timedelta(milliseconds=later))

        if self._current_study is not None:
            # Raises MissingStudyUID first, as storescp refuses such objects in every mode.
            naming.study_subdirectory("study-uid", "", study_uid=ident.study_uid,
                                      patient_name=None, when=now)
            self._holding = True
            return [self._current_study(self._key, ident.study_uid, new_name, self._holder)]
        if ident.study_uid != self._study_uid or not self._study_dir:
            self._study_uid = ident.study_uid
            self._study_dir = new_name()
        return [self._study_dir]

    def target(self, sop_class_uid: str, sop_instance_uid: str, ident: Identity,
               now: datetime | None = None) -> Target:
        """The target for one object; `sop_*` come from the C-STORE-RQ, as in storescp."""
        now = now or datetime.now()
        directories = self._subdirectory(ident, now)
        ext = self.config.filename_extension
        mode = self.config.filenames
        if mode == "timenames":
            # storescp appends a serial only when a name is taken; link() makes "taken" true
            # across concurrent writers too, so no two objects can share a name.
            names = NameSeries(naming.time_filename(now, None, sop_class_uid, ext),
                               lambda n: naming.time_filename(now, n, sop_class_uid, ext),
                               _SERIALS)
            return Target(directories, names, replace=False, when_taken=WhenTaken.ERROR)
        if mode == "unique":
            name = naming.unique_filename(sop_class_uid, str(generate_uid()), ext)
            return Target(directories, [name], replace=False, when_taken=WhenTaken.ERROR)
        name = naming.default_filename(sop_class_uid, sop_instance_uid, ext)
        policy = self.config.duplicates
        if policy == "overwrite":
            return Target(directories, [name], replace=True, when_taken=WhenTaken.ERROR)
        if policy == "keep-both":
            stem = name[: len(name) - len(ext)] if ext else name
            names = NameSeries(name, lambda n: f"{stem}_{n + 1}{ext}", _SERIALS - 1)
            return Target(directories, names, replace=False, when_taken=WhenTaken.ERROR)
        return Target(directories, [name], replace=False,
                      when_taken=WhenTaken.KEEP if policy == "keep-first"
                      else WhenTaken.REJECT)
