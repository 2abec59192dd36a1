"""Output names for received objects: storescp 3.6.7's rules, made safe for hostile peers.

Every name storescp (DCMTK 3.6.7, ``dcmnet/apps/storescp.cc``) gives a received object or a
study subdirectory is reproduced here byte for byte for well-formed input, so that scripts
written against storescp's output tree keep working:

========================  ==================================================================
storescp option           name
========================  ==================================================================
``-uf`` (default)         ``<MOD>.<SOPInstanceUID><ext>``
``+uf``                   ``<MOD>.X.<new UID><ext>``
``-tn``                   ``YYYYMMDDHHMMSSmmm[_NNNN].<MOD><ext>``
``-ss PFX``               ``PFX_YYYYMMDD_HHMMSSmmm`` (no ``_`` when PFX is empty)
``-su PFX``               ``PFX_<StudyInstanceUID>`` (no ``_`` when PFX is empty)
``-sp``                   ``<PatientName mapped to ASCII>_YYYYMMDD_HHMMSSmmm``
``-rns``                  ``<first 2 characters of MOD><6-digit counter>`` (no extension)
========================  ==================================================================

``<MOD>`` is DCMTK's short code for the SOP class (``dcmSOPClassUIDToModality``), ``UNKNOWN``
for a class DCMTK does not list; ``<ext>`` is the ``-fe`` value appended verbatim.

Where we differ on purpose: storescp 3.6.7 as tagged pastes network values (UIDs) into paths
unchecked, so a peer can send ``../x`` or ``a/b`` (DCMTK issue #1021).  Later DCMTK and distro
backports only turn ``/`` into ``_``, which still lets through ``..``, hidden names, control
characters and option-like names.  Here every value that came from the network passes through
:func:`safe_component`, and every public name builder returns exactly one safe path component.
Values DCMTK would accept as UIDs come out unchanged.  Where storescp cleans a UID further
(white space, a second value) and so lets distinct objects share one file, we do not: see
:func:`_clean_uid`.

Everything is pure: no clock (times are parameters), no filesystem.
"""

import hashlib
import re
from datetime import datetime
from typing import Final, Literal

from dicom_ingestd.codes import Status
from dicom_ingestd.dcmtk.modalities import UNKNOWN_MODALITY, modality_prefix

__all__ = [
    "ANONYMOUS",
    "DEFAULT_MAX_LEN",
    "NAME_MAX",
    "PLACEHOLDER",
    "MissingStudyUID",
    "SortMode",
    "default_filename",
    "patient_name_component",
    "safe_component",
    "study_subdirectory",
    "time_filename",
    "unique_filename",
]

PLACEHOLDER: Final = "UNKNOWN"
"""What :func:`safe_component` returns for a value with nothing usable left."""

ANONYMOUS: Final = "ANONYMOUS"
"""storescp's ``-sp`` directory stem when PatientName is absent or empty."""

NAME_MAX: Final = 255
"""Linux's limit on one path component, in bytes; every built name stays within it."""

DEFAULT_MAX_LEN: Final = 200
"""Default byte cap for one network value: leaves room for modality, timestamp, extension."""

SortMode = Literal["conc-studies", "study-uid", "patientname"]
"""storescp's ``-ss``, ``-su`` and ``-sp``."""

# ---------------------------------------------------------------------------------------------
# Network values
# ---------------------------------------------------------------------------------------------

def _clean_uid(value: str) -> str:
    """A UID from the network as it names a file or directory: without its padding only.

    Trailing NULs (PS3.5's UI padding) and trailing spaces (many senders pad with one) are
    padding; nothing else is removed.  storescp goes further, as DCMTK's input correction
    drops every white-space character from a UI (dcvrui.cc) and findAndGetOFString() keeps
    only the first of several backslash-separated values, so "1.2.3.85.1", "1.2.3.85. 1",
    "1.2.3.85.\\t1" and "1.2.3.85.1\\n" all name "CT.1.2.3.85.1" there and overwrite each
    other.  Here they are four values: a valid UID names its file unchanged, any other value
    goes through safe_component, whose hash suffix keeps it apart from every other value.
    Embedded NULs are not terminators either ("1.2\\0junk" cannot overwrite "1.2").
    """
    return value.rstrip("\0 ")


# POSIX portable filename character set (POSIX.1-2017, 3.282).  An allow-list rather than a
# deny-list: no separators, controls, shell metacharacters, bidi overrides, zero-width or
# look-alike code points can survive, and every UID character (digits, '.') does.
_NOT_PORTABLE: Final = re.compile(r"[^A-Za-z0-9._-]")
# A leading '.' hides the file (and '.'/'..' are the directory links); a leading '-' turns the
# name into an option for the rm/find/tar an operator runs later.
_BAD_START: Final = re.compile(r"[.-]+")
_HASH_HEX_DIGITS: Final = 16  # 64 bits: accidental collisions of distinct long values ~never
_MIN_MAX_LEN: Final = 2 * (_HASH_HEX_DIGITS + 1)


def safe_component(value: str, *, max_len: int = DEFAULT_MAX_LEN) -> str:
    """Turn an untrusted string into one harmless path component, deterministically.

    Guarantees, for any ``str`` input (including NULs and lone surrogates):

    * only ``A-Z a-z 0-9 . _ -`` (the POSIX portable filename set); every other code point,
      which includes ``/``, ``\\``, NUL, control characters, spaces and non-ASCII, becomes
      ``_`` (one ``_`` per code point);
    * a leading run of ``.`` or ``-`` becomes ``_`` (no hidden files, no ``.``/``..``, no
      option-like names);
    * never empty: a value with nothing left is :data:`PLACEHOLDER`;
    * at most ``max_len`` bytes of UTF-8.  A longer value is cut and gets ``_`` plus 16 hex
      digits of the SHA-256 of the *original* value, so distinct long values stay distinct;
    * injective in practice: whenever a character had to be replaced, the same hash suffix is
      appended, so ``a/b`` and ``a_b`` (or ``..`` and ``__``) never share a file name and a
      peer cannot overwrite another object by sending a mangled UID;
    * idempotent for the same ``max_len``; a value that already satisfies all of the above
      (e.g. any UID of digits and dots) is returned unchanged.

    Raises ValueError if ``max_len`` is too small to hold the hash suffix (< 34).
    """
    if max_len < _MIN_MAX_LEN:
        raise ValueError(f"max_len must be at least {_MIN_MAX_LEN}, got {max_len}")
    text = _NOT_PORTABLE.sub("_", value)
    start = _BAD_START.match(text)
    if start:
        text = "_" * start.end() + text[start.end() :]
    if not text:
        return PLACEHOLDER
    if text == value and len(text.encode()) <= max_len:
        return text
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    suffix = "_" + digest[:_HASH_HEX_DIGITS]
    # The alphabet is ASCII, so a byte cut cannot split a code point; decoding with "ignore"
    # keeps that true should the alphabet ever widen.
    head = text.encode()[: max_len - len(suffix)].decode("utf-8", "ignore")
    return head + suffix


def _one_component(name: str) -> str:
    """Final guard on an assembled name: operator-set parts (prefix, extension) are checked too."""
    return safe_component(name, max_len=NAME_MAX)


# ---------------------------------------------------------------------------------------------
# Modality codes
# ---------------------------------------------------------------------------------------------


def _modality(sop_class_uid: str) -> str:
    return modality_prefix(sop_class_uid, default=UNKNOWN_MODALITY)


# ---------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------


def default_filename(sop_class_uid: str, sop_instance_uid: str, extension: str = "") -> str:
    """storescp ``-uf``: ``<MOD>.<SOPInstanceUID><extension>`` (storescp.cc 2069).

    Both UIDs are the C-STORE-RQ's Affected SOP Class/Instance UID, as storescp uses them
    (not the data set's).  ``extension`` is appended verbatim as ``-fe`` does: pass ``.dcm``,
    not ``dcm``.  The result is always a single component of at most :data:`NAME_MAX` bytes.
    """
    instance = safe_component(_clean_uid(sop_instance_uid))
    return _one_component(f"{_modality(sop_class_uid)}.{instance}{extension}")


def unique_filename(sop_class_uid: str, new_uid: str, extension: str = "") -> str:
    """storescp ``+uf``: ``<MOD>.X.<new_uid><extension>`` (storescp.cc 2012-2018).

    storescp generates ``new_uid`` per object with dcmGenerateUniqueIdentifier (its own UID
    root); the caller generates it here, e.g. with ``pydicom.uid.generate_uid()``.
    """
    uid = safe_component(_clean_uid(new_uid))
    return _one_component(f"{_modality(sop_class_uid)}.X.{uid}{extension}")


def _dcmtk_millisecond(when: datetime) -> int:
    """The milliseconds DCMTK prints for ``when``, float truncation included.

    OFTime keeps seconds as a double ``tm_sec + tv_usec / 1e6`` and truncates
    ``(Second - (int)Second) * 1000`` (oftime.cc getMilliSecond).  That is *not* always
    ``microsecond // 1000``: for a microsecond count that is an exact multiple of 1000 the
    subtraction lands just below, and e.g. 1.001 s prints as ``000``.  Same IEEE doubles here,
    same digits.
    """
    second = float(when.second) + float(when.microsecond) / 1000000.0
    return int((second - float(int(second))) * 1000.0)


def _date_time_digits(when: datetime) -> tuple[str, str]:
    """("YYYYMMDD", "HHMMSSmmm") the way storescp's sprintf formats OFDateTime."""
    return (
        f"{when.year:04d}{when.month:02d}{when.day:02d}",
        f"{when.hour:02d}{when.minute:02d}{when.second:02d}{_dcmtk_millisecond(when):03d}",
    )


def time_filename(
    when: datetime, serial: int | None, sop_class_uid: str, extension: str = ""
) -> str:
    """storescp ``-tn``: ``YYYYMMDDHHMMSSmmm[_NNNN].<MOD><extension>`` (storescp.cc 2020-2064).

    The extension follows the modality code, after a ``.`` that is always there.  ``when`` is
    read by its wall-clock fields: pass local time, as storescp uses localtime(); a tz-aware
    value is not converted.  ``serial`` is ``None`` for the first file of a millisecond, then
    0, 1, 2... printed as at least 4 digits (worker/layout.py tries them in turn).  Raises
    ValueError for a negative serial.
    """
    if serial is not None and serial < 0:
        raise ValueError(f"serial must be >= 0, got {serial}")
    date, time = _date_time_digits(when)
    tail = "" if serial is None else f"_{serial:04d}"
    return _one_component(f"{date}{time}{tail}.{_modality(sop_class_uid)}{extension}")


# ---------------------------------------------------------------------------------------------
# Study subdirectories
# ---------------------------------------------------------------------------------------------


class MissingStudyUID(ValueError):
    """The object has no (or an empty) StudyInstanceUID: storescp refuses it when sorting.

    storescp.cc 1773-1779 answers 0xC000 for every sort mode, not just ``-su``; ``status`` is
    that code for the caller's C-STORE-RSP.
    """

    status: Final = Status.CANNOT_UNDERSTAND


# DCMTK's ASCII folding of ISO 8859-1 letters 0xC0-0xFF for -sp (storescp.cc
# mapCharacterAndAppendToString).  Quirks kept: Æ->A but Ä->Ae, × ÷ Þ þ -> _, ß->ss.
# fmt: off
_FOLD_C0_FF: Final = (
    # À    Á    Â    Ã    Ä     Å    Æ    Ç    È    É    Ê    Ë    Ì    Í    Î    Ï
    "A", "A", "A", "A", "Ae", "A", "A", "C", "E", "E", "E", "E", "I", "I", "I", "I",
    # Ð    Ñ    Ò    Ó    Ô    Õ    Ö     ×    Ø    Ù    Ú    Û    Ü     Ý    Þ    ß
    "D", "N", "O", "O", "O", "O", "Oe", "_", "O", "U", "U", "U", "Ue", "Y", "_", "ss",
    # à    á    â    ã    ä     å    æ    ç    è    é    ê    ë    ì    í    î    ï
    "a", "a", "a", "a", "ae", "a", "a", "c", "e", "e", "e", "e", "i", "i", "i", "i",
    # ð    ñ    ò    ó    ô    õ    ö     ÷    ø    ù    ú    û    ü     ý    þ    ÿ
    "d", "n", "o", "o", "o", "o", "oe", "_", "o", "u", "u", "u", "ue", "y", "_", "y",
)
# fmt: on
_ASCII_ALNUM: Final = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Every other byte (controls, space, punctuation, '^', '=', 0x80-0xBF) becomes '_'.
_PN_FOLD: Final[tuple[str, ...]] = tuple(
    chr(b) if chr(b) in _ASCII_ALNUM else "_" if b < 0xC0 else _FOLD_C0_FF[b - 0xC0]
    for b in range(256)
)


def patient_name_component(patient_name: str | bytes | None) -> str:
    """storescp ``-sp``'s directory stem for a PatientName value (storescp.cc 1781-1809).

    Like DCMTK: only the first value (up to the first ``\\``) counts, trailing spaces are
    dropped (leading ones are kept and become ``_``), and an absent or then-empty value is
    :data:`ANONYMOUS`.  Each byte is folded to ASCII: letters and digits stay, accented
    Latin-1 letters lose their accent (``ü`` -> ``ue``, ``ß`` -> ``ss``), anything else is
    ``_`` -- so ``Doe^John`` -> ``Doe_John``.

    Pass the raw value bytes for storescp parity whatever the character set (storescp folds
    bytes: UTF-8 ``ü`` gives ``A_``).  A ``str`` is read as ISO 8859-1, so a decoded UTF-8
    name folds more nicely than storescp's; code points above U+00FF become ``_``.  The
    result is capped like any network value (:func:`safe_component`).
    """
    if patient_name is None:
        return ANONYMOUS
    if isinstance(patient_name, bytes):
        first = patient_name.split(b"\\", 1)[0].rstrip(b" ")
        folded = "".join(_PN_FOLD[b] for b in first)
    else:
        text = patient_name.split("\\", 1)[0].rstrip(" ")
        folded = "".join(_PN_FOLD[ord(c)] if ord(c) < 256 else "_" for c in text)
    return safe_component(folded) if folded else ANONYMOUS


def study_subdirectory(
    mode: SortMode,
    prefix: str,
    *,
    study_uid: str | None,
    patient_name: str | bytes | None,
    when: datetime,
) -> str:
    """The study subdirectory storescp ``-ss``/``-su``/``-sp`` creates (storescp.cc 1830-1865).

    * ``"conc-studies"`` (``-ss PFX``): ``PFX_YYYYMMDD_HHMMSSmmm``
    * ``"study-uid"`` (``-su PFX``): ``PFX_<StudyInstanceUID>`` (without its padding; a
      value that is not a plain UID gets a hash suffix, see _clean_uid)
    * ``"patientname"`` (``-sp``): ``<patient_name_component()>_YYYYMMDD_HHMMSSmmm``; ``prefix``
      is ignored, as ``-sp`` takes none

    The ``_`` after the prefix is left out when ``prefix`` is empty.  ``when`` is the time the
    first object of the study arrived (storescp names the directory once, when the study UID
    changes), in local wall-clock time.  The result is one safe component; an odd prefix is
    sanitised like network data.  Raises :class:`MissingStudyUID` (whatever the mode) when
    ``study_uid`` is None or empty after cleaning, and ValueError for an unknown ``mode``.
    """
    study = _clean_uid(study_uid) if study_uid is not None else ""
    if not study:
        raise MissingStudyUID("StudyInstanceUID absent or empty in data set")
    date, time = _date_time_digits(when)
    lead = f"{prefix}_" if prefix else ""
    if mode == "conc-studies":
        name = f"{lead}{date}_{time}"
    elif mode == "study-uid":
        name = f"{lead}{safe_component(study)}"
    elif mode == "patientname":
        name = f"{patient_name_component(patient_name)}_{date}_{time}"
    else:
        raise ValueError(f"unknown sort mode {mode!r}")
    return _one_component(name)
