"""Read the identifying attributes of a received object, in bounded memory whatever it holds.

Two paths.  `identify_prefix` reads them from the data set's first bytes, kept while the
data set streamed to disk (header.py walks them; a deflated data set's head is inflated up to
HEAD_BYTES first).  `identify` reads them from the staging file when the prefix is not enough:
it walks the top-level elements up to (0020,000E) from the file, skipping values and
sequences by seeking (or, for a deflated data set, by inflating and discarding), so it never
holds more than one identifying value and a fixed buffer, whatever the peer sent: a value of
4 GiB, an unterminated sequence, or a deflate stream that inflates to 1 GiB from 1 MB.
Inflation stops at `max_decoded_size` bytes (storage.max_decoded_size): DataSetTooLarge.

Like pydicom, which this replaces on the slow path, a data set whose first element shows the
other VR encoding than the one negotiated (explicit VR declared, implicit VR sent, or the
reverse) is read in the encoding it shows.
"""

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicom_ingestd.dcmtk.transfer import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from dicom_ingestd.dicom import elements
from dicom_ingestd.errors import IngestError
from dicom_ingestd.worker import header

HEAD_BYTES = 1 << 16  # identifying attributes sit in the first few KiB of a data set
DEFAULT_MAX_DECODED = 512 << 20  # storage.max_decoded_size's default
MAX_VALUE = 1 << 20  # longest identifying value read (a UID is 64 bytes, a name 324)
MAX_DEPTH = 512  # nested undefined-length sequences walked before (0020,000E)
_CHUNK = 1 << 16
_UNDEFINED = elements.UNDEFINED
_ITEM = elements.ITEM
_ITEM_END = elements.ITEM_END
_SEQUENCE_END = elements.SEQUENCE_END
_LONG_VRS = frozenset(vr.encode() for vr in elements.LONG_VRS)
_WANTED = frozenset(header.WANTED)
_LAST_WANTED = max(header.WANTED)


class UnreadableDataSet(IngestError):
    """The data set could not be parsed far enough to identify it."""


class DataSetTooLarge(IngestError):
    """A deflated data set inflates beyond the limit before its identifying attributes."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who and what an object is; empty strings for absent attributes."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_name: str
    patient_name_raw: bytes  # as received: storescp's -sp names fold these bytes
    patient_id: str
    modality: str


def clean_uid(value: bytes | None, fix_padding: bool = False) -> str:
    """A UI value without its padding: trailing NULs and spaces (PS3.5 pads with NUL, many
    senders with a space).  Nothing else is removed: white space inside or in front of a
    UID, a trailing tab or newline, are part of the value, so two values that differ in
    them never name one file (naming.py).  `fix_padding` (storescp -up) also drops
    leading spaces."""
    text = (value or b"").decode("ascii", "replace").rstrip("\x00 ")
    return text.lstrip(" \x00") if fix_padding else text


def _identity(found: dict[int, bytes], fix_uid_padding: bool) -> Identity:
    name_raw = found.get(0x00100010, b"").rstrip(b" \x00")
    return Identity(
        sop_class_uid=clean_uid(found.get(0x00080016), fix_uid_padding),
        sop_instance_uid=clean_uid(found.get(0x00080018), fix_uid_padding),
        study_uid=clean_uid(found.get(0x0020000D), fix_uid_padding),
        series_uid=clean_uid(found.get(0x0020000E), fix_uid_padding),
        patient_name=name_raw.decode("latin-1"),
        patient_name_raw=name_raw,
        patient_id=found.get(0x00100020, b"").decode("latin-1").strip(" \x00"),
        modality=found.get(0x00080060, b"").decode("latin-1").strip(" \x00"),
    )


def identify_prefix(prefix: bytes, transfer_syntax: str, *, complete: bool,
                    fix_uid_padding: bool = False) -> Identity | None:
    """Identify from the data set's first bytes (header.py); None: use identify().

    A deflated prefix is inflated to at most HEAD_BYTES first.
    """
    if transfer_syntax == DEFLATED_LE:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            prefix = inflater.decompress(prefix, HEAD_BYTES)
        except zlib.error:
            return None  # identify() says why
        complete = complete and inflater.eof
        transfer_syntax = EXPLICIT_LE
    found = header.read_identifiers(prefix, transfer_syntax, complete)
    return None if found is None else _identity(found, fix_uid_padding)


# -- the slow path: a streaming walk of the staging file ------------------------------------


class _End(Exception):
    """The data set ended (at `clean` = an element boundary, else inside an element)."""


class _Source:
    """The data set's bytes, read in order: exact reads and skips."""

    def read(self, n: int) -> bytes:
        raise NotImplementedError

    def skip(self, n: int) -> None:
        raise NotImplementedError

    def at_end(self) -> bool:
        raise NotImplementedError


class _FileSource(_Source):
    def __init__(self, file: BinaryIO, start: int) -> None:
        self._file = file
        self._pos = start
        self._size = file.seek(0, io.SEEK_END)

    def read(self, n: int) -> bytes:
        if self._pos + n > self._size:
            raise _End
        self._file.seek(self._pos)
        data = self._file.read(n)
        if len(data) != n:
            raise _End
        self._pos += n
        return data

    def skip(self, n: int) -> None:
        if self._pos + n > self._size:
            raise _End
        self._pos += n

    def at_end(self) -> bool:
        return self._pos >= self._size


class _InflateSource(_Source):
    """A deflated data set, inflated as it is read; skipping inflates and discards."""

    def __init__(self, file: BinaryIO, start: int, limit: int) -> None:
        file.seek(start)
        self._file = file
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._limit = limit
        self.inflated = 0
        self._done = False

    def _more(self) -> bool:
        """Inflate up to one more chunk into the buffer; False at the end of the stream."""
        while not self._done:
            data = self._inflater.unconsumed_tail or self._file.read(_CHUNK)
            try:
                if data:
                    out = self._inflater.decompress(data, _CHUNK)
                else:  # the input is used up: what inflate still holds back, if anything
                    out = self._inflater.flush()
                    self._done = True
            except zlib.error as exc:
                raise UnreadableDataSet(f"the deflated data set does not inflate ({exc})") \
                    from None
            if self._inflater.eof:
                self._done = True
            if out:
                self.inflated += len(out)
                if self.inflated > self._limit:
                    raise DataSetTooLarge(
                        f"the deflated data set inflates to more than {self._limit} bytes "
                        "before its identifying attributes (storage.max_decoded_size)")
                self._buf += out
                return True
        return False

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._more():
                raise _End
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def skip(self, n: int) -> None:
        while n > len(self._buf):
            n -= len(self._buf)
            self._buf.clear()
            if not self._more():
                raise _End
        del self._buf[:n]

    def at_end(self) -> bool:
        return not self._buf and not self._more()


def _valid_vr(vr: bytes) -> bool:
    return len(vr) == 2 and 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90


class _Walk:
    """The element walk of one byte order, over a _Source."""

    def __init__(self, source: _Source, little: bool) -> None:
        self.source = source
        e = "<" if little else ">"
        self._tag = struct.Struct(e + "HH")
        self._u32 = struct.Struct(e + "L")
        self._u16 = struct.Struct(e + "H")
        self.little = little

    def header(self, implicit: bool) -> tuple[int, bytes, int]:
        """(tag, VR, length) of the next element (VR b"" for implicit, items, delimiters)."""
        head = self.source.read(8)
        group, element = self._tag.unpack_from(head)
        tag = (group << 16) | element
        if implicit or group == 0xFFFE:
            return tag, b"", self._u32.unpack_from(head, 4)[0]
        vr = head[4:6]
        if not _valid_vr(vr):
            raise UnreadableDataSet(f"element ({group:04X},{element:04X}) has no valid VR "
                                    f"(bytes {vr.hex()})")
        if vr in _LONG_VRS:
            return tag, vr, self._u32.unpack(self.source.read(4))[0]
        return tag, vr, self._u16.unpack_from(head, 6)[0]

    def skip_undefined(self, vr: bytes, implicit: bool) -> None:
        """Skip an undefined-length value: a sequence, or encapsulated data (items of
        fragments), up to its sequence delimiter; iterative, so depth costs no stack."""
        if vr == b"UN":
            if not self.little:
                raise UnreadableDataSet("undefined-length UN in big endian")
            implicit = True  # PS3.5 6.2.2: its items are implicit VR little endian
        elif vr not in (b"SQ", b"OB", b"OW", b""):
            raise UnreadableDataSet(f"undefined length for VR {vr.decode('latin-1')}")
        stack = [("sequence", implicit)]
        while stack:
            if len(stack) > MAX_DEPTH:
                raise UnreadableDataSet(f"sequences nested deeper than {MAX_DEPTH}")
            kind, implicit = stack[-1]
            if kind == "sequence":
                tag, _vr, length = self.header(True)
                if tag == _SEQUENCE_END:
                    stack.pop()
                elif tag != _ITEM:
                    raise UnreadableDataSet(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where a "
                                            "sequence item was expected")
                elif length == _UNDEFINED:
                    stack.append(("item", implicit))
                else:
                    self.source.skip(length)
                continue
            tag, vr, length = self.header(implicit)
            if tag == _ITEM_END:
                stack.pop()
            elif length == _UNDEFINED:
                if vr == b"UN":
                    if not self.little:
                        raise UnreadableDataSet("undefined-length UN in big endian")
                    stack.append(("sequence", True))
                else:
                    stack.append(("sequence", implicit))
            else:
                self.source.skip(length)


def _data_set_start(file: BinaryIO) -> tuple[int, str]:
    """(offset of the data set, transfer syntax) from the staging file's File Meta."""
    head = file.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise UnreadableDataSet("the staging file has no File Meta Information")
    meta_length = struct.unpack_from("<L", head, 140)[0]
    meta = file.read(min(meta_length, 1 << 16))
    pos = 0
    syntax = ""
    while pos + 8 <= len(meta):
        group, element = struct.unpack_from("<HH", meta, pos)
        vr = meta[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length, value = struct.unpack_from("<L", meta, pos + 8)[0], pos + 12
        else:
            length, value = struct.unpack_from("<H", meta, pos + 6)[0], pos + 8
        if (group, element) == (0x0002, 0x0010):
            syntax = meta[value:value + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value + length
    if not syntax:
        raise UnreadableDataSet("the staging file's File Meta has no transfer syntax")
    return 144 + meta_length, syntax


def _implicit_shown(source: _Source, declared_implicit: bool) -> bool:
    """The VR encoding the first element shows (pydicom's check): its bytes 4-5 are a VR or
    not.  Consumes nothing: the caller re-creates the source."""
    try:
        head = source.read(6)
    except _End:
        return declared_implicit
    return not _valid_vr(head[4:6])


def identify(path: Path | BinaryIO, *, fix_uid_padding: bool = False,
             max_decoded_size: int = DEFAULT_MAX_DECODED) -> Identity:
    """Identify the object in a staging file (File Meta, then the data set as received).

    Raises UnreadableDataSet on malformed data, DataSetTooLarge when a deflated data set
    inflates beyond `max_decoded_size` bytes before its identifying attributes.
    """
    if isinstance(path, Path):
        with open(path, "rb") as file:
            return _identify_file(file, fix_uid_padding, max_decoded_size)
    return _identify_file(path, fix_uid_padding, max_decoded_size)


def _identify_file(file: BinaryIO, fix_uid_padding: bool, limit: int) -> Identity:
    file.seek(0)
    start, syntax = _data_set_start(file)

    def source() -> _Source:
        if syntax == DEFLATED_LE:
            return _InflateSource(file, start, limit)
        return _FileSource(file, start)

    little = syntax != EXPLICIT_BE
    implicit = _implicit_shown(source(), syntax == IMPLICIT_LE)
    walk = _Walk(source(), little)
    found: dict[int, bytes] = {}
    try:
        while not walk.source.at_end():
            tag, vr, length = walk.header(implicit)
            if tag > _LAST_WANTED:
                break
            if length == _UNDEFINED:
                walk.skip_undefined(vr, implicit)
            elif tag in _WANTED:
                if length > MAX_VALUE:
                    raise UnreadableDataSet(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has a value "
                                            f"of {length} bytes")
                found[tag] = walk.source.read(length)
            else:
                walk.source.skip(length)
    except _End:
        pass  # a truncated data set: what was found before the end is all there is
    except struct.error as exc:  # pragma: no cover - reads are exact
        raise UnreadableDataSet(str(exc)) from None
    return _identity(found, fix_uid_padding)
