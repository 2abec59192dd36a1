"""Facts read from the installed DCMTK (Debian's libdcmtk17, installed by scripts/test).

Our tables copied from DCMTK (storage SOP classes, UID names, modality prefixes) are checked
against the library storescp itself runs, through ctypes: never a source tree on one machine.
A missing or unloadable libdcmdata fails the test, it never skips it.

The few functions used are C++ but take and return plain pointers, so their mangled names
can be called directly (`nm -D --defined-only libdcmdata.so.17` lists them); the arrays are
plain C data (`dcmAllStorageSOPClassUIDs`, `numberOfDcmAllStorageSOPClassUIDs`).
"""

import ctypes
import ctypes.util
import functools
import re
from pathlib import Path
from typing import Any

import pytest

LIBRARY = "dcmdata"  # libdcmdata.so.17 in Debian 12's libdcmtk17


@functools.cache
def libdcmdata() -> ctypes.CDLL:
    """The installed libdcmdata; fail (never skip) naming the package when it is missing."""
    name = ctypes.util.find_library(LIBRARY) or "libdcmdata.so.17"
    try:
        return ctypes.CDLL(name)
    except OSError as exc:
        pytest.fail(f"DCMTK's shared libdcmdata is not loadable ({exc}): install Debian's "
                    "dcmtk (libdcmtk17), as scripts/test does")


def library_path() -> Path:
    """The file the loaded libdcmdata was mapped from."""
    libdcmdata()
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and "libdcmdata" in fields[-1]:
                return Path(fields[-1])
    pytest.fail("libdcmdata is loaded but not found in /proc/self/maps")


def _function(symbol: str, restype: Any, *argtypes: Any) -> Any:
    func = getattr(libdcmdata(), symbol)
    func.restype = restype
    func.argtypes = list(argtypes)
    return func


def name_of_uid(uid: str) -> str | None:
    """DCMTK's dcmFindNameOfUID(uid, NULL): its symbolic name, None when it has none."""
    find = _function("_Z16dcmFindNameOfUIDPKcS0_", ctypes.c_char_p, ctypes.c_char_p,
                     ctypes.c_char_p)
    name = find(uid.encode(), None)
    return None if name is None else bytes(name).decode()


def uid_of_name(name: str) -> str | None:
    """DCMTK's dcmFindUIDFromName(name): the UID, None for a name it does not know."""
    find = _function("_Z18dcmFindUIDFromNamePKc", ctypes.c_char_p, ctypes.c_char_p)
    uid = find(name.encode())
    return None if uid is None else bytes(uid).decode()


def modality_of(uid: str, default: str = "UNKNOWN") -> str:
    """DCMTK's dcmSOPClassUIDToModality(uid, default): storescp's file name prefix."""
    lookup = _function("_Z24dcmSOPClassUIDToModalityPKcS0_", ctypes.c_char_p, ctypes.c_char_p,
                       ctypes.c_char_p)
    return bytes(lookup(uid.encode(), default.encode())).decode()


@functools.cache
def storage_sop_classes() -> tuple[str, ...]:
    """dcmAllStorageSOPClassUIDs in its order: the storage SOP classes storescp accepts."""
    lib = libdcmdata()
    count = ctypes.c_int.in_dll(lib, "numberOfDcmAllStorageSOPClassUIDs").value
    array = (ctypes.c_char_p * count).in_dll(lib, "dcmAllStorageSOPClassUIDs")
    uids = tuple(bytes(uid).decode() for uid in array if uid is not None)
    assert len(uids) == count > 150, (count, len(uids))
    return uids


@functools.cache
def named_uids() -> dict[str, str]:
    """Every UID DCMTK names ({name: UID}, its whole uidNameMap), read from the library.

    The map itself is not exported, but each of its UIDs is a string literal in the library:
    every string of digits and dots in the file, and every suffix of one that starts at a
    component (the linker may store "1.2.3" as the tail of "9.1.2.3"), is asked for its
    name.  The result is the map, complete.
    """
    data = library_path().read_bytes()
    candidates: set[bytes] = set()
    for match in re.finditer(rb"[0-9][0-9.]*\x00", data):
        text = match.group()[:-1]
        starts = [0] + [i + 1 for i, char in enumerate(text) if char == ord(".")]
        candidates.update(text[start:] for start in starts if start < len(text))
    names: dict[str, str] = {}
    for candidate in candidates:
        uid = candidate.decode()
        name = name_of_uid(uid)
        if name is not None:
            assert names.setdefault(name, uid) == uid, (name, uid, names[name])
    assert len(names) > 400, len(names)
    return names
