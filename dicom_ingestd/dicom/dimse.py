"""DIMSE command sets: decoding requests and encoding our few responses.

Command sets are always Implicit VR Little Endian (PS3.7 6.3.1).  A well-formed request is
decoded by a direct walk over its elements (pydicom's Dataset machinery cost ~0.3 ms per
object, more than the rest of a small C-STORE's Python work); anything unusual (a truncated or
undefined-length element, a multi-valued or odd-sized field, a repeated tag, non-ASCII) goes
to pydicom, so odd input is judged exactly as before.  The responses we send (C-STORE-RSP,
C-ECHO-RSP, N-ACTION-RSP, and the N-EVENT-REPORT-RQ of storage commitment) are a few fixed
elements, encoded here directly for the same reason.
"""

import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import config as pydicom_config
from pydicom.filereader import read_dataset

from dicom_ingestd.errors import IngestError

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
NO_DATA_SET = 0x0101
DATA_SET_PRESENT = 0x0000  # any other value than NO_DATA_SET; 0x0000 as DCMTK sends

COMMAND_NAMES = {
    0x0001: "C-STORE-RQ", 0x0010: "C-GET-RQ", 0x0020: "C-FIND-RQ", 0x0021: "C-MOVE-RQ",
    0x0030: "C-ECHO-RQ", 0x0FFF: "C-CANCEL-RQ", 0x0100: "N-EVENT-REPORT-RQ", 0x0110: "N-GET-RQ",
    0x0120: "N-SET-RQ", 0x0130: "N-ACTION-RQ", 0x0140: "N-CREATE-RQ", 0x0150: "N-DELETE-RQ",
    0x8100: "N-EVENT-REPORT-RSP",
}

MAX_COMMAND_SET = 1 << 16  # command sets are a few hundred bytes; more is an attack

# We read what peers send and judge it ourselves (the status we answer); pydicom's per-value
# validation on read only costs time (a regex per UID) and logs peers' quirks as warnings.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


class CommandError(IngestError):
    """A command set that cannot be decoded or lacks a required element."""


@dataclass(frozen=True, slots=True)
class Command:
    """The parts of a request command set we act on."""

    field: int
    message_id: int
    has_data_set: bool
    sop_class_uid: str  # Affected SOP Class UID, or the Requested one (N-ACTION, N-SET ...)
    sop_instance_uid: str  # Affected SOP Instance UID, or the Requested one
    move_originator_aetitle: str
    action_type: int | None = None  # N-ACTION: Action Type ID
    event_type: int | None = None  # N-EVENT-REPORT: Event Type ID
    status: int | None = None  # responses: Status

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.field, f"command 0x{self.field:04X}")


def _clean_uid(value: object, fix_padding: bool) -> str:
    """A UID without its padding: trailing NULs and spaces, and with storescp -up
    (fix_padding) leading spaces too.  Other white space stays part of the value, so UIDs
    that differ in it never name one file (naming.py)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = "" if value is None else str(value)
    text = text.rstrip("\x00 ")
    return text.lstrip(" \x00") if fix_padding else text


_ELEMENT_HEADER = struct.Struct("<HHL")
_US = struct.Struct("<H")
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
_DATA_SET_TYPE = 0x0800
_AFFECTED_SOP_CLASS = 0x0002
_REQUESTED_SOP_CLASS = 0x0003
_STATUS = 0x0900
_AFFECTED_SOP_INSTANCE = 0x1000
_REQUESTED_SOP_INSTANCE = 0x1001
_EVENT_TYPE = 0x1002
_ACTION_TYPE = 0x1008
_MOVE_ORIGINATOR_AE = 0x1030
_US_FIELDS = (_COMMAND_FIELD, _MESSAGE_ID, _MESSAGE_ID_BEING_RESPONDED_TO, _DATA_SET_TYPE,
              _STATUS, _EVENT_TYPE, _ACTION_TYPE)
_TEXT_FIELDS = (_AFFECTED_SOP_CLASS, _REQUESTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE,
                _REQUESTED_SOP_INSTANCE, _MOVE_ORIGINATOR_AE)


def _decode_plain(data: bytes, fix_uid_padding: bool) -> Command | None:
    """The Command of a plain, well-formed command set; None: let pydicom judge it."""
    values: dict[int, bytes] = {}
    pos, size = 0, len(data)
    unpack = _ELEMENT_HEADER.unpack_from
    while pos < size:
        if size - pos < 8:
            return None
        group, element, length = unpack(data, pos)
        pos += 8
        if length > size - pos:  # includes undefined length (0xFFFFFFFF)
            return None
        if group != 0x0000 or element in values:
            return None
        values[element] = data[pos:pos + length]
        pos += length
    numbers: dict[int, int] = {}
    for element in _US_FIELDS:
        raw = values.get(element)
        if raw is not None:
            if len(raw) != 2:
                return None
            numbers[element] = _US.unpack(raw)[0]
    texts: dict[int, str] = {}
    for element in _TEXT_FIELDS:
        raw = values.get(element)
        if raw is not None:
            if b"\\" in raw or not raw.isascii():
                return None
            texts[element] = raw.decode("ascii")
    if _COMMAND_FIELD not in numbers:
        return None
    message_id = numbers.get(_MESSAGE_ID, numbers.get(_MESSAGE_ID_BEING_RESPONDED_TO, 0))
    # UIDs without their padding only (_clean_uid), AE without outer spaces.
    return Command(numbers[_COMMAND_FIELD], message_id & 0xFFFF,
                   numbers.get(_DATA_SET_TYPE, NO_DATA_SET) != NO_DATA_SET,
                   _clean_uid(texts.get(_AFFECTED_SOP_CLASS,
                                        texts.get(_REQUESTED_SOP_CLASS, "")), fix_uid_padding),
                   _clean_uid(texts.get(_AFFECTED_SOP_INSTANCE,
                                        texts.get(_REQUESTED_SOP_INSTANCE, "")),
                              fix_uid_padding),
                   texts.get(_MOVE_ORIGINATOR_AE, "").strip(), numbers.get(_ACTION_TYPE),
                   numbers.get(_EVENT_TYPE), numbers.get(_STATUS))


def decode_command(data: bytes, *, fix_uid_padding: bool = False) -> Command:
    """Decode a request command set; raise CommandError when it is unusable."""
    command = _decode_plain(data, fix_uid_padding)
    if command is not None:
        return command
    return _decode_with_pydicom(data, fix_uid_padding)


def _decode_with_pydicom(data: bytes, fix_uid_padding: bool) -> Command:
    try:
        ds = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
        field = int(ds.CommandField)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise CommandError(f"undecodable command set ({exc.__class__.__name__}: {exc})") from None
    try:
        message_id = int(ds.get("MessageID", ds.get("MessageIDBeingRespondedTo", 0)) or 0)
        data_set_type = int(ds.get("CommandDataSetType", NO_DATA_SET))
        # The raw values: pydicom's UID class would strip outer white space.
        sop_class = _clean_uid(_raw_value(ds, 0x00000002) or _raw_value(ds, 0x00000003),
                               fix_uid_padding)
        sop_instance = _clean_uid(_raw_value(ds, 0x00001000) or _raw_value(ds, 0x00001001),
                                  fix_uid_padding)
        originator = str(ds.get("MoveOriginatorApplicationEntityTitle", "") or "").strip()
        numbers = [_optional_int(ds, tag) for tag in (0x00001008, 0x00001002, 0x00000900)]
    except Exception as exc:
        raise CommandError(f"bad element in command set ({exc})") from None
    return Command(field, message_id & 0xFFFF, data_set_type != NO_DATA_SET, sop_class,
                   sop_instance, originator, *numbers)


def _optional_int(ds: Any, tag: int) -> int | None:
    element = ds.get_item(tag)
    if element is None or element.value in (None, b"", ""):
        return None
    value = ds[tag].value
    return int(value) & 0xFFFF


def _raw_value(ds: Any, tag: int) -> bytes | None:
    element = ds.get_item(tag)
    if element is None:
        return None
    value = element.value
    return value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")[:64]
    return raw + b" " if len(raw) % 2 else raw


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str,
    sop_instance_uid: str = "",
    error_comment: str = "",
    *,
    action_type: int | None = None,
) -> bytes:
    """Encode a response command set (C-STORE-RSP, C-ECHO-RSP, N-ACTION-RSP) with its group
    length; `action_type` is the N-ACTION-RSP's Action Type ID."""
    body = _element(0x0002, _uid(sop_class_uid))
    body += _element(0x0100, struct.pack("<H", command_field))
    body += _element(0x0120, struct.pack("<H", message_id))
    body += _element(0x0800, struct.pack("<H", NO_DATA_SET))
    body += _element(0x0900, struct.pack("<H", status))
    if error_comment:
        body += _element(0x0902, _text(error_comment))
    if sop_instance_uid:
        body += _element(0x1000, _uid(sop_instance_uid))
    if action_type is not None:
        body += _element(0x1008, struct.pack("<H", action_type))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def encode_event_report(message_id: int, sop_class_uid: str, sop_instance_uid: str,
                        event_type: int) -> bytes:
    """An N-EVENT-REPORT-RQ command set whose event information data set follows."""
    body = _element(0x0002, _uid(sop_class_uid))
    body += _element(0x0100, struct.pack("<H", N_EVENT_REPORT_RQ))
    body += _element(0x0110, struct.pack("<H", message_id))
    body += _element(0x0800, struct.pack("<H", DATA_SET_PRESENT))
    body += _element(0x1000, _uid(sop_instance_uid))
    body += _element(0x1002, struct.pack("<H", event_type))
    return _element(0x0000, struct.pack("<L", len(body))) + body
