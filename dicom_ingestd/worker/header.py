"""Fast paths for the per-object bookkeeping: the File Meta Information we write, and the
identifying attributes read from the first bytes of a received data set.

Both run once per stored object, and pydicom's general machinery costs more than the rest of
the receive path for small objects (~0.6 ms to write a meta header, ~1.5 ms to read the
identifying attributes).  The reader here only walks top-level elements up to (0020,000E),
skipping values and sequences; anything it does not understand returns None, and the caller
falls back to pydicom on the whole file.
"""

import struct

from dicom_ingestd.dcmtk.transfer import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from dicom_ingestd.dicom import elements

# The encoding's constants as this reader compares them (VRs as they come off the wire: bytes).
_LONG_VRS = frozenset(vr.encode() for vr in elements.LONG_VRS)
_UNDEFINED = elements.UNDEFINED
_ITEM = elements.ITEM
_ITEM_END = elements.ITEM_END
_SEQUENCE_END = elements.SEQUENCE_END
WANTED = (0x00080016, 0x00080018, 0x00080060, 0x00100010, 0x00100020, 0x0020000D, 0x0020000E)
_WANTED_SET = frozenset(WANTED)
_LAST_WANTED = max(WANTED)
_MAX_DEPTH = 16


def _meta_element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr in _LONG_VRS:
        return tag + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              implementation_uid: str, implementation_version: str,
              source_ae: str = "") -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1), ready to write."""
    body = _meta_element(0x00020001, b"OB", b"\x00\x01")
    body += _meta_element(0x00020002, b"UI", _even(sop_class_uid, b"\x00"))
    body += _meta_element(0x00020003, b"UI", _even(sop_instance_uid, b"\x00"))
    body += _meta_element(0x00020010, b"UI", _even(transfer_syntax, b"\x00"))
    body += _meta_element(0x00020012, b"UI", _even(implementation_uid, b"\x00"))
    body += _meta_element(0x00020013, b"SH", _even(implementation_version, b" "))
    if source_ae:
        body += _meta_element(0x00020016, b"AE", _even(source_ae, b" "))
    group_length = _meta_element(0x00020000, b"UL", struct.pack("<L", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


class _Incomplete(Exception):
    """The prefix ended, or held something this walker does not handle."""


# Per byte order: tag + 4-byte length (implicit VR, items), tag + VR + 2-byte length, length.
_STRUCTS = {little: (struct.Struct(e + "HHL"), struct.Struct(e + "HH2sH"), struct.Struct(e + "L"))
            for little, e in ((True, "<"), (False, ">"))}


class _Walker:
    """Element headers of one byte order; struct.error means 'ran past the prefix'."""

    def __init__(self, data: bytes, implicit: bool, little: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.little = little
        self._tag_len, self._explicit, self._long = _STRUCTS[little]

    def header(self, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
        """(tag, vr, length, value offset) of the element at pos."""
        if implicit:
            group, element, length = self._tag_len.unpack_from(self.data, pos)
            return (group << 16) | element, b"", length, pos + 8
        group, element, vr, short = self._explicit.unpack_from(self.data, pos)
        if group == 0xFFFE:
            return (group << 16) | element, b"", self._long.unpack_from(self.data, pos + 4)[0], \
                pos + 8
        if vr in _LONG_VRS:
            return (group << 16) | element, vr, self._long.unpack_from(self.data, pos + 8)[0], \
                pos + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Incomplete
        return (group << 16) | element, vr, short, pos + 8

    def skip_sequence(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip an undefined-length sequence's items; return the offset after its end."""
        if depth > _MAX_DEPTH:
            raise _Incomplete
        while True:
            group, element, length = self._tag_len.unpack_from(self.data, pos)
            tag = (group << 16) | element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise _Incomplete
            if length != _UNDEFINED:
                pos += length
                continue
            while True:  # an undefined-length item: walk its elements to the delimiter
                group, element = self._tag_len.unpack_from(self.data, pos)[:2]
                if (group << 16) | element == _ITEM_END:
                    pos += 8
                    break
                pos = self.skip_element(pos, implicit, depth + 1)

    def skip_element(self, pos: int, implicit: bool, depth: int) -> int:
        _tag, vr, length, value = self.header(pos, implicit)
        if length != _UNDEFINED:
            return value + length
        # Undefined length: a sequence (UN with undefined length holds implicit VR LE items).
        if vr == b"UN":
            if not self.little:
                raise _Incomplete
            return self.skip_sequence(value, True, depth + 1)
        if vr in (b"SQ", b"") or implicit:
            return self.skip_sequence(value, implicit, depth + 1)
        raise _Incomplete  # e.g. encapsulated pixel data: not before (0020,000E)


def read_identifiers(prefix: bytes, transfer_syntax: str,
                     complete: bool) -> dict[int, bytes] | None:
    """The WANTED elements' raw values from the data set's first bytes, or None.

    `complete` tells whether `prefix` is the whole data set (then a missing element is
    absent rather than beyond the prefix).  None means "use the slow path".
    """
    if transfer_syntax == EXPLICIT_LE:
        walker = _Walker(prefix, implicit=False, little=True)
    elif transfer_syntax == IMPLICIT_LE:
        walker = _Walker(prefix, implicit=True, little=True)
    elif transfer_syntax == EXPLICIT_BE:
        walker = _Walker(prefix, implicit=False, little=False)
    elif transfer_syntax == DEFLATED_LE:
        return None
    else:  # every other (compressed) transfer syntax encodes the data set as explicit VR LE
        walker = _Walker(prefix, implicit=False, little=True)
    found: dict[int, bytes] = {}
    pos = 0
    size = len(prefix)
    implicit = walker.implicit
    header = walker.header
    try:
        while pos < size:
            tag, _vr, length, value = header(pos, implicit)
            if tag > _LAST_WANTED:
                return found
            if length == _UNDEFINED:
                pos = walker.skip_element(pos, implicit, 0)
                continue
            if tag in _WANTED_SET:
                if value + length > size:
                    return None
                found[tag] = prefix[value:value + length]
            pos = value + length
    except (_Incomplete, struct.error):
        return None
    return found if complete and pos == size else None
