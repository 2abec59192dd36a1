"""The data sets of Storage Commitment (PS3.4 J.3, PS3.3 C.14): read an N-ACTION's Action
Information, write an N-EVENT-REPORT's Event Information.

Stdlib only.  Both are little endian, implicit or explicit VR: the only transfer syntaxes we
accept for the SOP class.  Reading walks the bytes once and yields the references as it finds
them, so the caller can write them out without holding a parsed list; the bytes themselves
are bounded by the caller (storage_commitment.max_references).
"""

import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

from dicom_ingestd.dcmtk.transfer import EXPLICIT_LE, IMPLICIT_LE
from dicom_ingestd.dicom import elements

SOP_CLASS = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP instance
ACTION_REQUEST = 1  # Action Type ID: request storage commitment
TRANSFER_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE)  # our preference, for the context

TRANSACTION_UID = 0x00081195
FAILURE_REASON = 0x00081197
FAILED_SOP_SEQUENCE = 0x00081198
REFERENCED_SOP_SEQUENCE = 0x00081199
REFERENCED_SOP_CLASS = 0x00081150
REFERENCED_SOP_INSTANCE = 0x00081155
_ITEM = elements.ITEM
_ITEM_END = elements.ITEM_END
_SEQUENCE_END = elements.SEQUENCE_END
_UNDEFINED = elements.UNDEFINED
_LONG_VRS = frozenset(vr.encode() for vr in elements.LONG_VRS)
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_MAX_DEPTH = 8  # nested sequences we walk through when skipping what we do not use


class EventType(IntEnum):
    """N-EVENT-REPORT Event Type ID of a storage commitment result."""

    ALL_COMMITTED = 1
    FAILURES = 2


class Reason(IntEnum):
    """Failure Reason (0008,1197) values we send (PS3.3 C.14.1.1)."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT = 0x0112
    CLASS_INSTANCE_CONFLICT = 0x0119
    DUPLICATE_TRANSACTION = 0x0131


class InvalidAction(ValueError):
    """The Action Information cannot be used (answer 0x0115, invalid argument value)."""


@dataclass(frozen=True, slots=True)
class Reference:
    """One referenced SOP instance."""

    sop_class_uid: str
    sop_instance_uid: str


def valid_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


class _Reader:
    def __init__(self, data: bytes | bytearray | memoryview, explicit: bool) -> None:
        self.data = memoryview(data)
        self.explicit = explicit
        self.pos = 0

    def header(self) -> tuple[int, bytes, int]:
        """(tag, VR or b"", length) of the element at pos; moves past the header."""
        data, pos = self.data, self.pos
        if len(data) - pos < 8:
            raise InvalidAction(f"data set cut short at byte {pos}")
        group, element = struct.unpack_from("<HH", data, pos)
        tag = group << 16 | element
        if group == 0xFFFE or not self.explicit:
            length = struct.unpack_from("<L", data, pos + 4)[0]
            self.pos = pos + 8
            return tag, b"", length
        vr = bytes(data[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if len(data) - pos < 12:
                raise InvalidAction(f"data set cut short at byte {pos}")
            length = struct.unpack_from("<L", data, pos + 8)[0]
            self.pos = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            self.pos = pos + 8
        return tag, vr, length

    def value(self, length: int) -> memoryview:
        if length == _UNDEFINED or length > len(self.data) - self.pos:
            raise InvalidAction(f"an element at byte {self.pos} runs past the data set's end")
        start = self.pos
        self.pos += length
        return self.data[start:self.pos]

    def skip_undefined(self, depth: int) -> None:
        """Skip the items of an undefined-length sequence, up to its delimiter."""
        if depth > _MAX_DEPTH:
            raise InvalidAction("sequences nested too deep")
        while True:
            tag, _, length = self.header()
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise InvalidAction(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) inside a sequence")
            if length == _UNDEFINED:
                self.skip_item(depth + 1)
            else:
                self.value(length)

    def skip_item(self, depth: int) -> None:
        """Skip the elements of an undefined-length item, up to its delimiter."""
        while True:
            tag, _, length = self.header()
            if tag == _ITEM_END:
                return
            if length == _UNDEFINED:
                self.skip_undefined(depth + 1)
            else:
                self.value(length)


def _text(raw: memoryview) -> str:
    try:
        return bytes(raw).decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        raise InvalidAction("a UID that is not ASCII") from None


def _item_reference(reader: _Reader, end: int | None, index: int) -> Reference:
    """The Referenced SOP Class/Instance UIDs of one item (ending at `end`, or at its
    delimiter when None)."""
    values: dict[int, str] = {}
    while end is None or reader.pos < end:
        tag, _, length = reader.header()
        if tag == _ITEM_END and end is None:
            break
        if length == _UNDEFINED:
            reader.skip_undefined(1)
            continue
        raw = reader.value(length)
        if tag in (REFERENCED_SOP_CLASS, REFERENCED_SOP_INSTANCE):
            values[tag] = _text(raw)
    if end is not None and reader.pos != end:
        raise InvalidAction(f"item {index + 1} of the Referenced SOP Sequence overruns its "
                            "length")
    sop_class = values.get(REFERENCED_SOP_CLASS, "")
    sop_instance = values.get(REFERENCED_SOP_INSTANCE, "")
    if not valid_uid(sop_class) or not valid_uid(sop_instance):
        raise InvalidAction(f"item {index + 1} of the Referenced SOP Sequence has no valid "
                            f"Referenced SOP Class UID and Instance UID ({sop_class!r}, "
                            f"{sop_instance!r})")
    return Reference(sop_class, sop_instance)


def _references(reader: _Reader, length: int) -> Iterator[Reference]:
    end = None if length == _UNDEFINED else reader.pos + length
    if end is not None and end > len(reader.data):
        raise InvalidAction("the Referenced SOP Sequence runs past the data set's end")
    index = 0
    while end is None or reader.pos < end:
        tag, _, item_length = reader.header()
        if tag == _SEQUENCE_END and end is None:
            break
        if tag != _ITEM:
            raise InvalidAction(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) inside the Referenced "
                                "SOP Sequence")
        item_end = None if item_length == _UNDEFINED else reader.pos + item_length
        if item_end is not None and item_end > len(reader.data):
            raise InvalidAction(f"item {index + 1} runs past the data set's end")
        yield _item_reference(reader, item_end, index)
        index += 1
    if end is not None and reader.pos != end:
        raise InvalidAction("the Referenced SOP Sequence overruns its length")
    if index == 0:
        raise InvalidAction("the Referenced SOP Sequence (0008,1199) is empty")


def read_action_information(data: bytes | bytearray | memoryview, transfer_syntax: str) \
        -> tuple[str, Iterator[Reference]]:
    """(Transaction UID, the references) of an N-ACTION-RQ's data set.

    The references are yielded as they are read; InvalidAction is raised, at once or while
    iterating, for what makes the request unusable: no or an invalid Transaction UID, no or
    an empty Referenced SOP Sequence, an item without valid UIDs, a malformed data set.
    """
    reader = _Reader(data, transfer_syntax != IMPLICIT_LE)
    transaction = ""
    while reader.pos < len(reader.data):
        tag, _, length = reader.header()
        if tag == REFERENCED_SOP_SEQUENCE:
            if not valid_uid(transaction):
                break
            return transaction, _references(reader, length)
        if tag > REFERENCED_SOP_SEQUENCE:
            break
        if length == _UNDEFINED:
            reader.skip_undefined(1)
            continue
        raw = reader.value(length)
        if tag == TRANSACTION_UID:
            transaction = _text(raw)
    if not transaction:
        raise InvalidAction("no Transaction UID (0008,1195)")
    if not valid_uid(transaction):
        raise InvalidAction(f"Transaction UID {transaction!r} is not a valid UID")
    raise InvalidAction("no Referenced SOP Sequence (0008,1199)")


# -- writing ----------------------------------------------------------------------------------
def _element(tag: int, vr: bytes, value: bytes, explicit: bool) -> bytes:
    if explicit:
        if vr in _LONG_VRS:
            return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(body: bytes) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


def encode_event_information(transaction_uid: str,
                             results: Iterable[tuple[Reference, int]],
                             transfer_syntax: str) -> tuple[EventType, bytes]:
    """The event type and Event Information data set of a result: each reference with 0
    (committed) or its failure reason.  Failed SOP Sequence only with failures, Referenced
    SOP Sequence only with successes (both conditional, PS3.4 Table J.3-2)."""
    explicit = transfer_syntax != IMPLICIT_LE
    committed: list[bytes] = []
    failed: list[bytes] = []
    for ref, reason in results:
        body = _element(REFERENCED_SOP_CLASS, b"UI", _uid(ref.sop_class_uid), explicit) \
            + _element(REFERENCED_SOP_INSTANCE, b"UI", _uid(ref.sop_instance_uid), explicit)
        if reason:
            failed.append(_item(body + _element(FAILURE_REASON, b"US",
                                                struct.pack("<H", reason), explicit)))
        else:
            committed.append(_item(body))
    out = _element(TRANSACTION_UID, b"UI", _uid(transaction_uid), explicit)
    if failed:
        out += _element(FAILED_SOP_SEQUENCE, b"SQ", b"".join(failed), explicit)
    if committed:
        out += _element(REFERENCED_SOP_SEQUENCE, b"SQ", b"".join(committed), explicit)
    return (EventType.FAILURES if failed else EventType.ALL_COMMITTED), out
