"""A data set as a tree of raw elements: parse one transfer syntax, write another.

This is the re-encoding path's model (see encode.py).  It keeps every value as bytes, in
little-endian order, and never interprets a value beyond what an encoding needs: byte order
(swapped per VR, pixel data and other OW/OF/OL/OD/OV values included), the VR of implicit-VR
elements (from the data dictionary, resolving "US or SS" and "OB or OW" as DCMTK does), the
length form of sequences and items, group lengths and padding.  The whole data set is held in
memory.
"""

import re
import struct
import zlib
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, private_dictionary_VR

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
UNCOMPRESSED = frozenset({EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED})

PIXEL_DATA = 0x7FE00010
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
TRAILING_PADDING = 0xFFFCFFFC
UNDEFINED = 0xFFFFFFFF

# Explicit VR: these have 2 reserved bytes and a 4-byte length.
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT",
                      "UV"})
# Bytes per swapped unit when the byte order changes (AT is a pair of 2-byte numbers).
SWAP_WIDTH = {"US": 2, "SS": 2, "OW": 2, "AT": 2, "UL": 4, "SL": 4, "FL": 4, "OF": 4,
              "OL": 4, "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8}
# VRs that storescp -u (dcmDisableGenerationOfNewVRs) writes as OB in explicit VR.
NEW_VRS = frozenset({"UN", "UT", "OF", "OD", "OL", "UR", "UC", "OV", "SV", "UV"})
# String VRs: DCMTK (with its default automatic input data correction) drops trailing
# padding from these and pads to an even length again when it writes them; UIDs also lose
# every white-space character.
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
                         "ST", "TM", "UC", "UR", "UT", "UI"})
_WHITE_SPACE = re.compile(rb"[ \t\n\v\f\r]")


class DataSetError(Exception):
    """The data set cannot be parsed (truncated, or a structure we cannot follow)."""


@dataclass(slots=True)
class Item:
    """A sequence item; `undefined` records the length form it was received in."""

    elements: list["Element"]
    undefined: bool = False


@dataclass(slots=True)
class Element:
    """One element.  `value` is bytes (little endian), items (SQ) or fragments (encapsulated
    pixel data, the basic offset table first)."""

    tag: int
    vr: str
    value: bytes | list[Item] | list[bytes]
    undefined: bool = False  # sequences: the received length form
    fragments: bool = False
    extra: dict[str, object] = field(default_factory=dict)


# -- VRs of implicit-VR elements ----------------------------------------------------------------


def _private_creator(elements: list[Element], tag: int) -> str | None:
    group, elem = tag >> 16, tag & 0xFFFF
    block = elem >> 8
    if block < 0x10:
        return None
    creator_tag = (group << 16) | block
    for element in elements:
        if element.tag == creator_tag and isinstance(element.value, bytes):
            return element.value.rstrip(b" \x00").decode("latin-1")
    return None


def _implicit_vr(tag: int, elements: list[Element]) -> str:
    """The VR DCMTK gives an implicit-VR element; ambiguous ones are resolved later."""
    group, elem = tag >> 16, tag & 0xFFFF
    if elem == 0:
        return "UL"
    if group & 1:
        if 0x0010 <= elem <= 0x00FF:
            return "LO"
        creator = _private_creator(elements, tag)
        if creator is not None:
            try:
                return private_dictionary_VR(tag, creator)
            except KeyError:
                pass
        return "UN"
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _find_us(elements: list[Element], tag: int) -> int | None:
    for element in elements:
        if element.tag == tag and isinstance(element.value, bytes) and len(element.value) >= 2:
            return int.from_bytes(element.value[:2], "little")
    return None


def _resolve(element: Element, scopes: list[list[Element]]) -> None:
    """Settle "US or SS" and "OB or OW" (and friends) as DCMTK does before writing."""
    vr = element.vr
    if " or " not in vr:
        return
    if vr in ("OB or OW", "US or OW", "US or SS or OW"):  # DCMTK reads these as OW
        element.vr = "OW"
        return
    if vr == "US or SS":
        representation = None
        for scope in reversed(scopes):
            representation = _find_us(scope, 0x00280103)
            if representation is not None:
                break
        element.vr = "SS" if representation == 1 else "US"
        return
    element.vr = vr.split(" or ")[0]


# -- parsing ------------------------------------------------------------------------------------


def _swap(value: bytes, width: int) -> bytes:
    if width < 2 or len(value) % width:
        return value
    code = {2: "H", 4: "L", 8: "Q"}[width]
    count = len(value) // width
    return struct.pack(f"<{count}{code}", *struct.unpack(f">{count}{code}", value))


class _Parser:
    def __init__(self, data: bytes, implicit: bool, little: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.little = little
        e = "<" if little else ">"
        self.tag_len = struct.Struct(e + "HHL")
        self.explicit = struct.Struct(e + "HH2sH")
        self.long = struct.Struct(e + "L")

    def need(self, pos: int, size: int) -> None:
        if pos + size > len(self.data):
            raise DataSetError(f"data set ends inside an element at offset {pos}")

    def elements(self, pos: int, end: int, scopes: list[list[Element]],
                 implicit: bool, little: bool, stop_at_item_end: bool) -> tuple[list[Element], int]:
        elements: list[Element] = []
        scopes = [*scopes, elements]
        while pos < end:
            if stop_at_item_end:
                self.need(pos, 8)
                group, elem, _length = self._tag_len(implicit, little).unpack_from(self.data, pos)
                if (group << 16) | elem == ITEM_END:
                    return elements, pos + 8
            element, pos = self.element(pos, scopes, implicit, little)
            elements.append(element)
        if stop_at_item_end:
            raise DataSetError("item without an item delimiter")
        return elements, pos

    def _tag_len(self, implicit: bool, little: bool) -> struct.Struct:
        return struct.Struct(("<" if little else ">") + "HHL")

    def element(self, pos: int, scopes: list[list[Element]], implicit: bool,
                little: bool) -> tuple[Element, int]:
        e = "<" if little else ">"
        self.need(pos, 8)
        if implicit:
            group, elem, length = struct.unpack_from(e + "HHL", self.data, pos)
            tag = (group << 16) | elem
            vr = _implicit_vr(tag, scopes[-1])
            value_pos = pos + 8
        else:
            group, elem, raw_vr, short = struct.unpack_from(e + "HH2sH", self.data, pos)
            tag = (group << 16) | elem
            vr = raw_vr.decode("latin-1")
            if vr in LONG_VRS:
                self.need(pos, 12)
                length = struct.unpack_from(e + "L", self.data, pos + 8)[0]
                value_pos = pos + 12
            else:
                length = short
                value_pos = pos + 8
        if tag >> 16 == 0xFFFE:
            raise DataSetError(f"unexpected delimiter ({group:04X},{elem:04X}) at offset {pos}")
        if length == UNDEFINED:
            if tag == PIXEL_DATA and vr != "SQ":
                fragments, end = self.fragments(value_pos, little)
                return Element(tag, "OB", fragments, undefined=True, fragments=True), end
            if vr == "UN":  # an undefined-length UN holds a sequence in implicit VR LE
                items, end = self.items(value_pos, None, scopes, True, True)
                return Element(tag, "SQ", items, undefined=True), end
            if vr not in ("SQ",) and not implicit and " or " not in vr and vr != "UN":
                raise DataSetError(f"undefined length for VR {vr} at offset {pos}")
            items, end = self.items(value_pos, None, scopes, implicit, little)
            return Element(tag, "SQ", items, undefined=True), end
        if vr == "SQ":
            self.need(value_pos, length)
            items, end = self.items(value_pos, value_pos + length, scopes, implicit, little)
            return Element(tag, "SQ", items), end
        self.need(value_pos, length)
        value = self.data[value_pos:value_pos + length]
        element = Element(tag, vr, value)
        if implicit:
            _resolve(element, scopes)
        if not little:
            element.value = _swap(value, SWAP_WIDTH.get(element.vr, 0))
        return element, value_pos + length

    def items(self, pos: int, end: int | None, scopes: list[list[Element]], implicit: bool,
              little: bool) -> tuple[list[Item], int]:
        tag_len = self._tag_len(implicit, little)
        items: list[Item] = []
        while end is None or pos < end:
            self.need(pos, 8)
            group, elem, length = tag_len.unpack_from(self.data, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == SEQUENCE_END:
                if end is None:
                    return items, pos
                continue  # a stray delimiter in a defined-length sequence: DCMTK drops it
            if tag != ITEM:
                raise DataSetError(f"expected an item, found ({group:04X},{elem:04X})")
            if length == UNDEFINED:
                elements, pos = self.elements(pos, len(self.data), scopes, implicit, little,
                                              stop_at_item_end=True)
                items.append(Item(elements, undefined=True))
            else:
                self.need(pos, length)
                elements, pos = self.elements(pos, pos + length, scopes, implicit, little,
                                              stop_at_item_end=False)
                items.append(Item(elements))
        if end is None:
            raise DataSetError("sequence without a sequence delimiter")
        return items, pos

    def fragments(self, pos: int, little: bool) -> tuple[list[bytes], int]:
        tag_len = self._tag_len(False, little)
        fragments: list[bytes] = []
        while True:
            self.need(pos, 8)
            group, elem, length = tag_len.unpack_from(self.data, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == SEQUENCE_END:
                return fragments, pos
            if tag != ITEM or length == UNDEFINED:
                raise DataSetError("malformed encapsulated pixel data")
            self.need(pos, length)
            fragments.append(self.data[pos:pos + length])
            pos += length


def parse(data: bytes, transfer_syntax: str) -> list[Element]:
    """The elements of a data set encoded in `transfer_syntax` (a deflated one is inflated)."""
    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    if transfer_syntax == DEFLATED:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
        except zlib.error as exc:
            raise DataSetError(f"cannot inflate the data set: {exc}") from None
    try:
        elements, _ = _Parser(data, implicit, little).elements(0, len(data), [], implicit,
                                                              little, False)
    except (struct.error, UnicodeDecodeError) as exc:
        raise DataSetError(str(exc)) from None
    return elements


# -- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Encoding:
    """How to write: the target transfer syntax and storescp's encoding options."""

    transfer_syntax: str
    sequence_lengths: str = "explicit"  # explicit | undefined | received
    group_length: str = "recalc"  # recalc | create | remove
    new_vrs: bool = True
    file_padding: int = 0  # storescp +p f i: pad the file to a multiple of f bytes...
    item_padding: int = 0  # ...and each item's content to a multiple of i
    deflate_level: int = 6

    @property
    def implicit(self) -> bool:
        return self.transfer_syntax == IMPLICIT_LE

    @property
    def little(self) -> bool:
        return self.transfer_syntax != EXPLICIT_BE


def normalise(vr: str, value: bytes) -> bytes:
    """The value as DCMTK writes it: an even length; strings re-padded (see _STRING_VRS)."""
    if len(value) % 2:
        value += b"\x00"  # DCMTK's read makes an odd length even with a zero byte
    if vr not in _STRING_VRS:
        return value
    if vr == "UI":
        value = _WHITE_SPACE.sub(b"", value).rstrip(b"\x00")
        return value + b"\x00" if len(value) % 2 else value
    value = value.rstrip(b" ")
    return value + b" " if len(value) % 2 else value


class _Writer:
    def __init__(self, encoding: Encoding) -> None:
        self.enc = encoding
        e = "<" if encoding.little else ">"
        self.tag_len = struct.Struct(e + "HHL")
        self.short = struct.Struct(e + "HH2sH")
        self.long = struct.Struct(e + "HH2sxxL")

    def vr(self, vr: str) -> str:
        if not self.enc.new_vrs and vr in NEW_VRS:
            return "OB"
        return vr

    def header(self, tag: int, vr: str, length: int) -> bytes:
        group, elem = tag >> 16, tag & 0xFFFF
        if self.enc.implicit:
            return self.tag_len.pack(group, elem, length)
        vr = self.vr(vr)
        if vr in LONG_VRS:
            return self.long.pack(group, elem, vr.encode(), length)
        if length > 0xFFFF:  # cannot be written with a 2-byte length: DCMTK writes UN
            return self.long.pack(group, elem, b"UN", length)
        return self.short.pack(group, elem, vr.encode(), length)

    def undefined_sequence(self, element: Element) -> bool:
        mode = self.enc.sequence_lengths
        return element.undefined if mode == "received" else mode == "undefined"

    def undefined_item(self, item: Item) -> bool:
        mode = self.enc.sequence_lengths
        return item.undefined if mode == "received" else mode == "undefined"

    def element(self, element: Element) -> bytes:
        tag = element.tag
        value = element.value
        if element.fragments:
            assert isinstance(value, list)
            parts = [self.header(tag, "OB", UNDEFINED)]
            for fragment in value:
                assert isinstance(fragment, bytes)
                fragment = normalise("OB", fragment)
                parts.append(self.tag_len.pack(0xFFFE, 0xE000, len(fragment)))
                parts.append(fragment)
            parts.append(self.tag_len.pack(0xFFFE, 0xE0DD, 0))
            return b"".join(parts)
        if element.vr == "SQ":
            assert isinstance(value, list)
            body = b"".join(self.item(item) for item in value)  # type: ignore[arg-type]
            if self.undefined_sequence(element):
                return (self.header(tag, "SQ", UNDEFINED) + body
                        + self.tag_len.pack(0xFFFE, 0xE0DD, 0))
            return self.header(tag, "SQ", len(body)) + body
        assert isinstance(value, bytes)
        value = normalise(element.vr, value)
        if not self.enc.little:
            value = _swap_out(value, SWAP_WIDTH.get(element.vr, 0))
        return self.header(tag, element.vr, len(value)) + value

    def item(self, item: Item) -> bytes:
        body = self.elements(item.elements, self.enc.item_padding, None)
        if self.undefined_item(item):
            return (self.tag_len.pack(0xFFFE, 0xE000, UNDEFINED) + body
                    + self.tag_len.pack(0xFFFE, 0xE00D, 0))
        return self.tag_len.pack(0xFFFE, 0xE000, len(body)) + body

    def elements(self, elements: list[Element], padding: int,
                 prefix_length: int | None) -> bytes:
        """Encode one level (the data set when prefix_length is given, else an item's
        content): group lengths as the mode says, old trailing padding dropped, new padding
        added as DCMTK's computeGroupLengthAndPadding does."""
        mode = self.enc.group_length
        present = {e.tag >> 16 for e in elements if e.tag & 0xFFFF == 0}
        encoded: list[tuple[int, bytes]] = []
        for element in elements:
            if element.tag & 0xFFFF == 0 or element.tag == TRAILING_PADDING:
                continue  # group lengths are recomputed below (or dropped)
            if prefix_length is not None and element.tag >> 16 == 0x0002:
                continue  # file meta elements in a data set: the meta header has its own
            encoded.append((element.tag >> 16, self.element(element)))
        out: list[bytes] = []
        index = 0
        while index < len(encoded):
            group = encoded[index][0]
            end = index
            while end < len(encoded) and encoded[end][0] == group:
                end += 1
            chunk = [data for _g, data in encoded[index:end]]
            if mode == "create" or (mode == "recalc" and group in present):
                length = sum(len(data) for data in chunk)
                out.append(self.header(group << 16, "UL", 4)
                           + struct.pack("<L" if self.enc.little else ">L", length))
            out.extend(chunk)
            index = end
        body = b"".join(out)
        if padding:
            total = len(body) + (prefix_length or 0)
            wanted = padding - total % padding
            if wanted != padding:
                header_size = 8 if self.enc.implicit else 12
                while header_size > wanted:
                    wanted += padding
                body += self.header(TRAILING_PADDING, "OB", wanted - header_size) \
                    + bytes(wanted - header_size)
        return body


def _swap_out(value: bytes, width: int) -> bytes:
    if width < 2 or len(value) % width:
        return value
    code = {2: "H", 4: "L", 8: "Q"}[width]
    count = len(value) // width
    return struct.pack(f">{count}{code}", *struct.unpack(f"<{count}{code}", value))


def write(elements: list[Element], encoding: Encoding, prefix_length: int = 0) -> bytes:
    """The data set encoded as `encoding` says (deflated when its transfer syntax is).

    `prefix_length` is the size of what precedes the data set in the file (preamble and
    meta header): file padding makes the whole file a multiple of encoding.file_padding.
    """
    data = _Writer(encoding).elements(elements, encoding.file_padding, prefix_length)
    if encoding.transfer_syntax == DEFLATED:
        compressor = zlib.compressobj(encoding.deflate_level, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data
