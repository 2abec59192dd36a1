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
from array import array
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, private_dictionary_VR

from dicom_ingestd.dcmtk.transfer import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE

UNCOMPRESSED = frozenset({EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED_LE})

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


Value = bytes | memoryview


class DataSetError(Exception):
    """The data set cannot be parsed (truncated, or a structure we cannot follow)."""


class DataSetTooLarge(DataSetError):
    """The data set (once inflated) is larger than the caller allows in memory."""


@dataclass(slots=True)
class Item:
    """A sequence item; `undefined` records the length form it was received in."""

    elements: list["Element"]
    undefined: bool = False


@dataclass(slots=True)
class Element:
    """One element.  `value` is the value's bytes (little endian; a view into the received
    data where no byte swap was needed), items (SQ) or fragments (encapsulated pixel data,
    the basic offset table first)."""

    tag: int
    vr: str
    value: "Value | list[Item] | list[Value]"
    undefined: bool = False  # sequences: the received length form
    fragments: bool = False


# -- VRs of implicit-VR elements ----------------------------------------------------------------


def _private_creator(elements: list[Element], tag: int) -> str | None:
    group, elem = tag >> 16, tag & 0xFFFF
    block = elem >> 8
    if block < 0x10:
        return None
    creator_tag = (group << 16) | block
    for element in elements:
        if element.tag == creator_tag and isinstance(element.value, (bytes, memoryview)):
            return bytes(element.value).rstrip(b" \x00").decode("latin-1")
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
        value = element.value
        if element.tag == tag and isinstance(value, (bytes, memoryview)) and len(value) >= 2:
            return int.from_bytes(value[:2], "little")
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


_ARRAY_CODES = {array(code).itemsize: code for code in ("H", "I", "L", "Q")}


def swap(value: Value, width: int) -> Value:
    """Reverse the byte order of each `width`-byte unit (a no-op for widths below 2)."""
    if width < 2 or len(value) % width:
        return value
    units = array(_ARRAY_CODES[width])
    units.frombytes(value)
    units.byteswap()
    return memoryview(units).cast("B")


class _Parser:
    """Walks a data set; values are views into `data`, swapped to little endian as read."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.structs = {little: (struct.Struct(e + "HHL"), struct.Struct(e + "HH2sH"),
                                 struct.Struct(e + "L"))
                        for little, e in ((True, "<"), (False, ">"))}

    def need(self, pos: int, size: int) -> None:
        if size < 0 or pos + size > len(self.data):
            raise DataSetError(f"data set ends inside an element at offset {pos}")

    def elements(self, pos: int, end: int, scopes: list[list[Element]], implicit: bool,
                 little: bool, in_undefined_item: bool) -> tuple[list[Element], int]:
        elements: list[Element] = []
        scopes = [*scopes, elements]
        tag_len = self.structs[little][0]
        while pos < end:
            if in_undefined_item:
                self.need(pos, 8)
                group, elem, _length = tag_len.unpack_from(self.data, pos)
                if (group << 16) | elem == ITEM_END:
                    return elements, pos + 8
            element, pos = self.element(pos, scopes, implicit, little)
            elements.append(element)
        if in_undefined_item:
            raise DataSetError("item without an item delimiter")
        if pos != end:
            raise DataSetError(f"element overruns its item or sequence at offset {pos}")
        return elements, pos

    def element(self, pos: int, scopes: list[list[Element]], implicit: bool,
                little: bool) -> tuple[Element, int]:
        tag_len, explicit, long = self.structs[little]
        self.need(pos, 8)
        if implicit:
            group, elem, length = tag_len.unpack_from(self.data, pos)
            tag = (group << 16) | elem
            vr = _implicit_vr(tag, scopes[-1])
            value_pos = pos + 8
        else:
            group, elem, raw_vr, length = explicit.unpack_from(self.data, pos)
            tag = (group << 16) | elem
            vr = raw_vr.decode("latin-1")
            value_pos = pos + 8
            if vr in LONG_VRS:
                self.need(pos, 12)
                length = long.unpack_from(self.data, pos + 8)[0]
                value_pos = pos + 12
        if group == 0xFFFE:
            raise DataSetError(f"unexpected delimiter ({group:04X},{elem:04X}) at offset {pos}")
        if length == UNDEFINED:
            if tag == PIXEL_DATA and vr != "SQ":
                fragments, end = self.fragments(value_pos, little)
                return Element(tag, "OB", fragments, undefined=True, fragments=True), end
            if vr == "UN":  # an undefined-length UN holds a sequence in implicit VR LE
                items, end = self.items(value_pos, None, scopes, True, True)
                return Element(tag, "SQ", items, undefined=True), end
            if vr != "SQ" and not implicit:
                raise DataSetError(f"undefined length for VR {vr} at offset {pos}")
            items, end = self.items(value_pos, None, scopes, implicit, little)
            return Element(tag, "SQ", items, undefined=True), end
        self.need(value_pos, length)
        if vr == "SQ":
            items, end = self.items(value_pos, value_pos + length, scopes, implicit, little)
            return Element(tag, "SQ", items), end
        element = Element(tag, vr, self.data[value_pos:value_pos + length])
        if implicit:
            _resolve(element, scopes)
        if not little:
            element.value = swap(self.data[value_pos:value_pos + length],
                                 SWAP_WIDTH.get(element.vr, 0))
        return element, value_pos + length

    def items(self, pos: int, end: int | None, scopes: list[list[Element]], implicit: bool,
              little: bool) -> tuple[list[Item], int]:
        tag_len = self.structs[little][0]
        items: list[Item] = []
        while end is None or pos < end:
            self.need(pos, 8)
            group, elem, length = tag_len.unpack_from(self.data, pos)
            tag = (group << 16) | elem
            pos += 8
            if tag == SEQUENCE_END:
                if end is None:
                    return items, pos
                continue  # a stray delimiter in a defined-length sequence: skipped
            if tag != ITEM:
                raise DataSetError(f"expected an item, found ({group:04X},{elem:04X})")
            if length == UNDEFINED:
                elements, pos = self.elements(pos, len(self.data), scopes, implicit, little,
                                              in_undefined_item=True)
                items.append(Item(elements, undefined=True))
            else:
                self.need(pos, length)
                elements, pos = self.elements(pos, pos + length, scopes, implicit, little,
                                              in_undefined_item=False)
                items.append(Item(elements))
        if end is None:
            raise DataSetError("sequence without a sequence delimiter")
        return items, pos

    def fragments(self, pos: int, little: bool) -> tuple[list[Value], int]:
        tag_len = self.structs[little][0]
        fragments: list[Value] = []
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


def inflated_size(data: Value, stop_after: int) -> int:
    """How many bytes a raw deflate stream inflates to, counted in 64 KiB pieces; counting
    stops once past `stop_after`.  Raises zlib.error."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    pending: Value = data
    while pending and size <= stop_after:
        size += len(inflater.decompress(pending, 1 << 16))
        pending = inflater.unconsumed_tail
        if inflater.eof:
            return size
    if size <= stop_after:
        size += len(inflater.flush())  # output still held back for want of output space
    return size


def parse(data: Value, transfer_syntax: str, max_size: int | None = None) -> list[Element]:
    """The elements of a data set encoded in `transfer_syntax` (a deflated one is inflated).

    Values are views into `data`, which must stay unchanged while the tree is used.  With
    `max_size`, a data set larger than that (a deflated one: once inflated; inflation stops
    there) raises DataSetTooLarge.
    """
    if max_size is not None and len(data) > max_size:
        raise DataSetTooLarge(f"the data set has {len(data)} bytes, more than {max_size}")
    if transfer_syntax == DEFLATED_LE:
        try:
            if max_size is not None:
                # Measured first, in 64 KiB pieces: a deflate bomb is refused without
                # ever holding more than that.
                size = inflated_size(data, max_size)
                if size > max_size:
                    raise DataSetTooLarge(f"the deflated data set inflates to more than "
                                          f"{max_size} bytes")
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
        except zlib.error as exc:
            raise DataSetError(f"cannot inflate the data set: {exc}") from None
    view = memoryview(data)
    try:
        elements, _ = _Parser(view).elements(0, len(view), [], transfer_syntax == IMPLICIT_LE,
                                             transfer_syntax != EXPLICIT_BE, False)
    except (struct.error, UnicodeDecodeError) as exc:
        raise DataSetError(str(exc)) from None
    except RecursionError:
        raise DataSetError("sequences nested too deeply") from None
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


def normalise(vr: str, value: Value) -> Value:
    """The value as DCMTK writes it: an even length; strings re-padded (see _STRING_VRS)."""
    if len(value) % 2:
        value = bytes(value) + b"\x00"  # DCMTK's read makes an odd length even with a zero
    if vr not in _STRING_VRS:
        return value
    text = bytes(value)
    if vr == "UI":
        text = _WHITE_SPACE.sub(b"", text).rstrip(b"\x00")
        return text + b"\x00" if len(text) % 2 else text
    text = text.rstrip(b" ")
    return text + b" " if len(text) % 2 else text


# Encoded output: a list of chunks (views of the received values where possible), so that
# a large value is never copied just to be concatenated.
Chunks = list[Value]


def _size(chunks: Chunks) -> int:
    return sum(len(chunk) for chunk in chunks)


class _Writer:
    def __init__(self, encoding: Encoding) -> None:
        self.enc = encoding
        e = "<" if encoding.little else ">"
        self.tag_len = struct.Struct(e + "HHL")
        self.short = struct.Struct(e + "HH2sH")
        self.long = struct.Struct(e + "HH2sxxL")
        self.ul = struct.Struct(e + "L")

    def header(self, tag: int, vr: str, length: int) -> bytes:
        group, elem = tag >> 16, tag & 0xFFFF
        if self.enc.implicit:
            return self.tag_len.pack(group, elem, length)
        if not self.enc.new_vrs and vr in NEW_VRS:
            vr = "OB"
        if vr in LONG_VRS:
            return self.long.pack(group, elem, vr.encode(), length)
        if length > 0xFFFF:  # too long for a 2-byte length: DCMTK writes UN (OB with -u)
            return self.long.pack(group, elem, b"UN" if self.enc.new_vrs else b"OB", length)
        return self.short.pack(group, elem, vr.encode(), length)

    def undefined(self, received: bool) -> bool:
        mode = self.enc.sequence_lengths
        return received if mode == "received" else mode == "undefined"

    def element(self, element: Element) -> Chunks:
        tag, value = element.tag, element.value
        if element.fragments:
            assert isinstance(value, list)
            chunks: Chunks = [self.header(tag, "OB", UNDEFINED)]
            for fragment in value:
                assert isinstance(fragment, (bytes, memoryview))
                fragment = normalise("OB", fragment)
                chunks += [self.tag_len.pack(0xFFFE, 0xE000, len(fragment)), fragment]
            chunks.append(self.tag_len.pack(0xFFFE, 0xE0DD, 0))
            return chunks
        if element.vr == "SQ":
            assert isinstance(value, list)
            body: Chunks = []
            for item in value:
                assert isinstance(item, Item)
                body += self.item(item)
            if self.undefined(element.undefined):
                return [self.header(tag, "SQ", UNDEFINED), *body,
                        self.tag_len.pack(0xFFFE, 0xE0DD, 0)]
            return [self.header(tag, "SQ", _size(body)), *body]
        assert isinstance(value, (bytes, memoryview))
        value = normalise(element.vr, value)
        if not self.enc.little and self.written_as_is(element.vr, len(value)):
            value = swap(value, SWAP_WIDTH.get(element.vr, 0))
        return [self.header(tag, element.vr, len(value)), value]

    def written_as_is(self, vr: str, length: int) -> bool:
        """False when DCMTK writes the value as OB or UN (explicit VR): the bytes then keep
        their little-endian order, as DCMTK chooses the byte order by the VR it writes."""
        if not self.enc.new_vrs and vr in NEW_VRS:
            return False
        return vr in LONG_VRS or length <= 0xFFFF

    def item(self, item: Item) -> Chunks:
        body = self.elements(item.elements, self.enc.item_padding, None)
        if self.undefined(item.undefined):
            return [self.tag_len.pack(0xFFFE, 0xE000, UNDEFINED), *body,
                    self.tag_len.pack(0xFFFE, 0xE00D, 0)]
        return [self.tag_len.pack(0xFFFE, 0xE000, _size(body)), *body]

    def elements(self, elements: list[Element], padding: int,
                 prefix_length: int | None) -> Chunks:
        """Encode one level (the data set when prefix_length is given, else an item's
        content) as DCMTK's computeGroupLengthAndPadding leaves it: group lengths as the mode
        says, received trailing padding dropped, new padding added."""
        mode = self.enc.group_length
        present = {e.tag >> 16 for e in elements if e.tag & 0xFFFF == 0}
        groups: list[tuple[int, Chunks]] = []
        for element in elements:
            if element.tag & 0xFFFF == 0 or element.tag == TRAILING_PADDING:
                continue  # group lengths are recomputed below (or dropped)
            group = element.tag >> 16
            if not groups or groups[-1][0] != group:
                groups.append((group, []))
            groups[-1][1].extend(self.element(element))
        out: Chunks = []
        for group, chunks in groups:
            if mode == "create" or (mode == "recalc" and group in present):
                out += [self.header(group << 16, "UL", 4), self.ul.pack(_size(chunks))]
            out += chunks
        if padding:
            total = _size(out) + (prefix_length or 0)
            wanted = padding - total % padding
            if wanted != padding:
                header_size = 8 if self.enc.implicit else 12
                while header_size > wanted:
                    wanted += padding
                out += [self.header(TRAILING_PADDING, "OB", wanted - header_size),
                        bytes(wanted - header_size)]
        return out


def write(elements: list[Element], encoding: Encoding, prefix_length: int = 0) -> Chunks:
    """The data set encoded as `encoding` says, as chunks to write in order (deflated when
    the transfer syntax is).

    `prefix_length` is the size of what precedes the data set in the file (preamble and
    meta header): file padding makes the whole file a multiple of encoding.file_padding.
    """
    chunks = _Writer(encoding).elements(elements, encoding.file_padding, prefix_length)
    if encoding.transfer_syntax != DEFLATED_LE:
        return chunks
    compressor = zlib.compressobj(encoding.deflate_level, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated: Chunks = [compressor.compress(chunk) for chunk in chunks]
    deflated.append(compressor.flush())
    return deflated
