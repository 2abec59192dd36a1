"""Structure-aware generator of malformed DICOM Upper Layer / DIMSE inputs (seeded, pure).

Inputs are built from valid messages (an A-ASSOCIATE-RQ, P-DATA-TF PDUs, C-STORE-RQ and
C-ECHO-RQ command sets, small data sets) and then mutated where parsers make decisions: item
types and lengths, PDV headers and fragment order, element tags, VRs and lengths, plus bit
flips, truncation and random bytes.  Everything derives from one `random.Random`, so a seed
and an index reproduce an input exactly; `Case.data` is what goes on the wire.

Categories (each a function `rng -> Case`):
  random       random bytes to a fresh connection (sometimes behind a valid PDU header)
  associate    a mutated A-ASSOCIATE-RQ to a fresh connection
  pdata        a valid association, then one P-DATA-TF with lying lengths, PDV headers or
               fragment order (or another PDU type)
  command      a valid association, then a mutated DIMSE command set in well-formed PDVs
  dataset      a valid association, a valid C-STORE-RQ, then a data set that lies about its
               element lengths / VRs / contents in well-formed PDVs (answered with a status,
               so many of these go over one association)
"""

import random
import struct
from dataclasses import dataclass

from support import uids, wire
from support.uids import CT_IMAGE, EXPLICIT_LE, IMPLICIT_LE, VERIFICATION
from support.wire import (
    MAX_PDU,
    command_set,
    context_item,
    echo_elements,
    even,
    explicit,
    fragments,
    implicit,
    item,
    p_data,
    pdu,
    pdv,
    store_elements,
)

APPLICATION_CONTEXT = uids.APPLICATION_CONTEXT.encode()
# The contexts of the fuzzer's "valid" association and what the daemon accepts for them.
CONTEXTS = [(1, CT_IMAGE, [EXPLICIT_LE]), (3, CT_IMAGE, [IMPLICIT_LE]),
            (5, VERIFICATION, [IMPLICIT_LE])]

INTERESTING_32 = [0, 1, 2, 3, 4, 5, 6, 7, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0x4000, 0x4001,
                  0x7FFF, 0xFFFF, 0x10000, 0x20000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
                  0xFFFFFFFF]
INTERESTING_16 = [0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]
HOSTILE_TEXT = [b"../../etc/passwd", b"/abs", b"\x00", b"\xff\xfe", b"$(id)", b"`id`", b"\n",
                b"\\", b"%s%n", b"A" * 65, b"1." * 40, "\u2215..".encode(), b"\x1b[2J", b" "]


@dataclass(frozen=True, slots=True)
class Case:
    """One fuzz input: its category, how it was made, and the bytes to send.

    `fresh` cases go to a new connection as the first bytes; the others follow a valid
    A-ASSOCIATE-RQ/AC exchange.  `status_expected`: the daemon should answer with a DIMSE
    response (not an A-ABORT) if the framing is intact (data set mutations), so the
    association can carry the next input.
    """

    category: str
    how: str
    data: bytes
    fresh: bool
    status_expected: bool = False


# --- valid messages (the raw client's, as a fuzzer that signs its requests "FUZZ") ----------


def user_items(max_pdu: int = MAX_PDU) -> list[bytes]:
    return wire.user_items(max_pdu, version_name=b"FUZZ")


def associate_fixed(called: bytes = b"ANY-SCP", calling: bytes = b"FUZZSCU",
                    version: int = 1) -> bytes:
    return wire.associate_fixed(called, calling, version)


def associate_rq(contexts: list[tuple[int, str, list[str]]] = CONTEXTS) -> bytes:
    return wire.associate_rq(contexts, calling=b"FUZZSCU", version_name=b"FUZZ")


def data_elements(sop_instance: bytes, rng: random.Random) -> list[tuple[int, int, bytes, bytes]]:
    """(group, element, VR, value) of a small CT data set, in tag order."""
    elements = [
        (0x0008, 0x0005, b"CS", b"ISO_IR 192"),
        (0x0008, 0x0016, b"UI", even(CT_IMAGE.encode())),
        (0x0008, 0x0018, b"UI", even(sop_instance)),
        (0x0008, 0x0060, b"CS", b"CT"),
        (0x0010, 0x0010, b"PN", even(b"Fuzz^" + rng.choice(HOSTILE_TEXT), b" ")),
        (0x0010, 0x0020, b"LO", b"FUZZ"),
        (0x0020, 0x000D, b"UI", even(b"1.2.3." + str(rng.randrange(1000)).encode())),
        (0x0020, 0x000E, b"UI", b"1.2.3.4."),
        (0x0028, 0x0010, b"US", struct.pack("<H", 2)),
        (0x0028, 0x0011, b"US", struct.pack("<H", 2)),
        (0x7FE0, 0x0010, b"OW", bytes(8)),
    ]
    return elements


def encode_data_set(elements: list[tuple[int, int, bytes, bytes]], implicit_vr: bool) -> bytes:
    if implicit_vr:
        return b"".join(implicit(g, e, v) for g, e, _vr, v in elements)
    return b"".join(explicit(g, e, vr, v) for g, e, vr, v in elements)


# --- generic byte mutations --------------------------------------------------------------


def flip(rng: random.Random, data: bytes, count: int | None = None) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(count or rng.randint(1, 8)):
        i = rng.randrange(len(out))
        if rng.random() < 0.5:
            out[i] ^= 1 << rng.randrange(8)
        else:
            out[i] = rng.randrange(256)
    return bytes(out)


def havoc(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One generic mutation of a byte string."""
    choice = rng.randrange(7)
    if choice == 0:
        return "bitflip", flip(rng, data)
    if choice == 1 and data:
        return "truncate", data[:rng.randrange(len(data))]
    if choice == 2:
        return "append", data + rng.randbytes(rng.randint(1, 64))
    if choice == 3 and len(data) > 4:
        i = rng.randrange(len(data) - 4)
        return "set32", data[:i] + struct.pack(rng.choice([">L", "<L"]),
                                               rng.choice(INTERESTING_32)) + data[i + 4:]
    if choice == 4 and len(data) > 2:
        i = rng.randrange(len(data) - 2)
        return "set16", data[:i] + struct.pack(rng.choice([">H", "<H"]),
                                               rng.choice(INTERESTING_16)) + data[i + 2:]
    if choice == 5 and len(data) > 2:
        i, j = sorted(rng.sample(range(len(data)), 2))
        return "duplicate", data[:j] + data[i:j] + data[j:]
    return "insert", (lambda i: data[:i] + rng.randbytes(rng.randint(1, 16)) + data[i:])(
        rng.randrange(len(data) + 1))


# --- categories --------------------------------------------------------------------------


def random_case(rng: random.Random) -> Case:
    n = rng.choice([1, 2, 5, 6, 10, 64, 300, 2000])
    data = rng.randbytes(rng.randint(1, n))
    if rng.random() < 0.4:  # behind a plausible PDU header, so the body parser sees it
        pdu_type = rng.choice([1, 1, 1, 2, 3, 4, 5, 6, 7, rng.randrange(256)])
        return Case("random", f"pdu-0x{pdu_type:02x}+random", pdu(pdu_type, data), True)
    return Case("random", "random", data, True)


def _mutate_items(rng: random.Random, items: list[bytes]) -> tuple[str, list[bytes]]:
    items = list(items)
    op = rng.randrange(14)
    i = rng.randrange(len(items))
    if op == 0:
        del items[i]
        return "drop-item", items
    if op == 1:
        items.insert(i, items[i])
        return "duplicate-item", items
    if op == 2:
        rng.shuffle(items)
        return "shuffle-items", items
    if op == 3:
        body = items[i][4:]
        items[i] = item(rng.randrange(256), body)
        return "item-type", items
    if op == 4:
        body = items[i][4:]
        lie = rng.choice([*INTERESTING_16, len(body) + 1, max(len(body) - 1, 0)])
        items[i] = item(items[i][0] if items[i] else 0x20, body, lie)  # may be truncated
        return "item-length", items
    if op == 5:
        items[i] = items[i][:rng.randrange(len(items[i]) + 1)]
        return "truncate-item", items
    if op == 6:
        items.insert(i, item(rng.randrange(256), rng.randbytes(rng.randint(0, 40))))
        return "random-item", items
    if op == 7:  # very long abstract syntax / UIDs
        length = rng.choice([65, 1000, 16000, 65000])
        uid = (b"1." * (length // 2 + 1))[:length]
        items.insert(i, item(0x20, bytes((rng.randrange(1, 256, 2), 0, 0, 0))
                             + item(0x30, uid) + item(0x40, IMPLICIT_LE.encode())))
        return "long-uid", items
    if op == 8:  # many contexts
        count = rng.choice([129, 300, 1000, 2500])
        extra = [context_item((2 * k + 1) & 0xFF, rng.choice([CT_IMAGE, VERIFICATION, "1.2.3"]),
                              [EXPLICIT_LE, IMPLICIT_LE]) for k in range(count)]
        return f"{count}-contexts", items[:1] + extra + items[1:]
    if op == 9:  # context sub-items: zero transfer syntaxes, odd IDs, nested junk
        cid = rng.choice([0, 2, 255, 1, 1])
        subs = [item(0x30, rng.choice([CT_IMAGE, "", "x" * 70]).encode())]
        subs += [item(rng.choice([0x40, 0x40, 0x30, 0x41]), rng.choice(
            [EXPLICIT_LE.encode(), b"", b"\0" * 3, rng.randbytes(8)]))
                 for _ in range(rng.randint(0, 3))]
        items.insert(i, item(rng.choice([0x20, 0x20, 0x21]),
                             bytes((cid, 0, 0, 0)) + b"".join(subs)))
        return "context-subitems", items
    if op == 10:  # user information sub-items
        subs = user_items(rng.choice(INTERESTING_32))
        extra_type = rng.choice([0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A,
                                 rng.randrange(256)])
        subs.insert(rng.randrange(len(subs) + 1),
                    item(extra_type, rng.choice([b"", rng.randbytes(rng.randint(1, 40)),
                                                 struct.pack(">H", 200) + b"1.2" + bytes(3)])))
        if rng.random() < 0.3:
            subs = [flip(rng, s) for s in subs]
        items = [it for it in items if it[:1] != b"\x50"] + [item(0x50, b"".join(subs))]
        return "user-info", items
    if op == 11:  # application context
        items[0] = item(0x10, rng.choice([b"", b"1.2.3", APPLICATION_CONTEXT + b"\0",
                                          rng.randbytes(10), APPLICATION_CONTEXT * 50]))
        return "app-context", items
    if op == 12:
        items[i] = flip(rng, items[i])
        return "flip-item", items
    items = items[:i]
    return "cut-items", items


def associate_case(rng: random.Random) -> Case:
    items = [item(0x10, APPLICATION_CONTEXT)] + [context_item(*c) for c in CONTEXTS]
    items.append(item(0x50, b"".join(user_items())))
    hows = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        how, items = _mutate_items(rng, items) if items else ("empty", items)
        hows.append(how)
    fixed = associate_fixed(
        called=rng.choice([b"ANY-SCP", b"ANY-SCP", rng.choice(HOSTILE_TEXT)]),
        calling=rng.choice([b"FUZZSCU", b"FUZZSCU", rng.choice(HOSTILE_TEXT), b""]),
        version=rng.choice([1, 1, 1, 0, 2, 3, 0xFFFF]))
    if rng.random() < 0.15:
        fixed = flip(rng, fixed)
        hows.append("fixed-fields")
    body = fixed + b"".join(items)
    length: int | None = None
    r = rng.random()
    if r < 0.1:
        length = rng.choice([*INTERESTING_32, len(body) - 1, len(body) + 1])
        hows.append("pdu-length")
    elif r < 0.2:
        how, body = havoc(rng, body)
        hows.append(how)
    return Case("associate", "+".join(hows), pdu(0x01, body, length), True)


def pdata_case(rng: random.Random) -> Case:
    command = command_set(store_elements(b"1.2.3.4.5"))
    ds = encode_data_set(data_elements(b"1.2.3.4.5", rng), False)
    op = rng.randrange(14)
    if op == 0:  # PDU length lies about its PDVs
        body = pdv(1, 0x03, command)
        length = rng.choice([0, 1, 5, 6, len(body) - 1, len(body) + 1, MAX_PDU + 1,
                             0xFFFFFFFF, len(body) + 100])
        return Case("pdata", "pdu-length", pdu(0x04, body, length), False)
    if op == 1:  # PDV length lies
        lie = rng.choice([*INTERESTING_32, len(command) + 1, len(command) + 3])
        body = pdv(1, 0x03, command, lie)
        return Case("pdata", "pdv-length", pdu(0x04, body), False)
    if op == 2:  # PDV control header
        control = rng.randrange(256)
        return Case("pdata", f"control-0x{control:02x}", p_data(1, control, command), False)
    if op == 3:  # context ID
        cid = rng.choice([0, 2, 4, 7, 255, rng.randrange(256)])
        return Case("pdata", f"context-{cid}", p_data(cid, 0x03, command), False)
    if op == 4:  # data before its command
        return Case("pdata", "data-first", fragments(1, ds, command=False)
                    + fragments(1, command, command=True), False)
    if op == 5:  # command fragments out of order / interleaved with data
        half = len(command) // 2
        return Case("pdata", "command-split-data-between",
                    p_data(1, 0x01, command[:half]) + p_data(1, 0x00, ds[:20])
                    + p_data(1, 0x03, command[half:]), False)
    if op == 6:  # last-fragment bit set twice, then more
        return Case("pdata", "fragments-after-last",
                    fragments(1, command, command=True) + p_data(1, 0x02, ds[:30])
                    + p_data(1, 0x00, ds[30:]) + p_data(1, 0x02, ds), False)
    if op == 7:  # data set on another context mid-stream
        return Case("pdata", "data-context-switch",
                    fragments(1, command, command=True) + p_data(1, 0x00, ds[:30])
                    + p_data(3, 0x02, ds[30:]), False)
    if op == 8:  # PDU over our max PDU
        big = rng.randbytes(MAX_PDU + rng.choice([1, 100, 10000]))
        return Case("pdata", "pdu-over-max", pdu(0x04, pdv(1, 0x00, big)), False)
    if op == 9:  # many tiny PDVs in one PDU
        body = b"".join(pdv(1, 0x01, command[k:k + 1]) for k in range(len(command) - 1))
        body += pdv(1, 0x03, command[-1:])
        return Case("pdata", "one-byte-pdvs", pdu(0x04, body), False)
    if op == 10:  # another PDU type where P-DATA is expected
        pdu_type = rng.choice([1, 2, 3, 6, 8, 0, 0xFF, rng.randrange(256)])
        return Case("pdata", f"pdu-type-0x{pdu_type:02x}",
                    pdu(pdu_type, rng.randbytes(rng.randint(0, 64))), False)
    if op == 11:  # A-RELEASE-RQ / A-ABORT with odd bodies, mid-command
        tail = rng.choice([pdu(5, b""), pdu(5, bytes(40)), pdu(7, b""), pdu(7, bytes(2)),
                           pdu(7, bytes(100)), pdu(5, bytes(4), 0xFFFFFFFF)])
        return Case("pdata", "release-abort-bodies", p_data(1, 0x01, command[:10]) + tail,
                    False)
    if op == 12:  # command set larger than allowed
        size = rng.choice([70000, 200000])
        body = bytearray()
        sent = 0
        while sent < size:
            body += p_data(1, 0x01, bytes(MAX_PDU - 6))
            sent += MAX_PDU - 6
        return Case("pdata", "huge-command", bytes(body), False)
    how, data = havoc(rng, fragments(1, command, command=True) + fragments(1, ds, command=False))
    return Case("pdata", f"stream-{how}", data, False)


def _command_mutation(rng: random.Random) -> tuple[str, bytes]:
    elements = store_elements(b"1.2.3.4.5") if rng.random() < 0.7 else echo_elements()
    op = rng.randrange(11)
    how = ""
    group_length: int | None = None
    if op == 0:
        del elements[rng.randrange(len(elements))]
        how = "missing-element"
    elif op == 1:
        k = rng.randrange(len(elements))
        elements[k] = (elements[k][0], rng.randbytes(rng.randint(0, 12)))
        how = f"bad-value-{elements[k][0]:04x}"
    elif op == 2:
        k = rng.randrange(len(elements))
        elements[k] = (rng.choice([0x0000, 0x0001, 0x0120, 0x0900, 0x1030, 0xFFFF,
                                   rng.randrange(0x10000)]), elements[k][1])
        how = "tag"
    elif op == 3:
        field = rng.choice([0x0010, 0x0020, 0x0021, 0x0FFF, 0x0100, 0x8001, 0x8030, 0xFFFF,
                            0x0001, 0x0030])
        elements = [(t, struct.pack("<H", field) if t == 0x0100 else v) for t, v in elements]
        how = f"command-field-0x{field:04x}"
    elif op == 4:
        dst = rng.choice([0x0000, 0x0101, 0x0102, 0xFFFF, 0x0001])
        elements = [(t, struct.pack("<H", dst) if t == 0x0800 else v) for t, v in elements]
        how = f"data-set-type-0x{dst:04x}"
    elif op == 5:
        group_length = rng.choice(INTERESTING_32)
        how = "group-length"
    elif op == 6:
        elements.insert(rng.randrange(len(elements) + 1),
                        (rng.randrange(0x10000), rng.randbytes(rng.randint(0, 300))))
        how = "extra-element"
    elif op == 7:
        elements = [(t, even(b"1." * rng.choice([40, 500, 5000])) if t in (0x0002, 0x1000)
                     else v) for t, v in elements]
        how = "long-uids"
    elif op == 8:
        elements = [(t, rng.choice(HOSTILE_TEXT) if t == 0x1000 else v) for t, v in elements]
        how = "hostile-instance-uid"
    encoded = command_set(elements, group_length)
    if op == 9:  # an element length that lies
        k = rng.randrange(12, len(encoded) - 4)
        encoded = encoded[:k] + struct.pack("<L", rng.choice(INTERESTING_32)) + encoded[k + 4:]
        how = "element-length"
    elif op == 10:
        how, encoded = havoc(rng, encoded)
        how = f"command-{how}"
    return how, encoded


def command_case(rng: random.Random) -> Case:
    how, encoded = _command_mutation(rng)
    data = fragments(rng.choice([1, 3, 5]), encoded, command=True)
    if b"\x01\x00" in encoded and rng.random() < 0.5:  # maybe a C-STORE: a data set follows
        data += fragments(1, encode_data_set(data_elements(b"1.2.3.4.5", rng), False),
                          command=False)
    return Case("command", how, data, False)


def dataset_case(rng: random.Random, message_id: int = 1) -> Case:
    """A valid C-STORE-RQ on context 1 (explicit) or 3 (implicit), then a lying data set."""
    sop_instance = f"1.2.826.0.1.3680043.9.7.{rng.randrange(1 << 30)}".encode()
    implicit_vr = rng.random() < 0.3
    elements = data_elements(sop_instance, rng)
    op = rng.randrange(10)
    how = ""
    encoded: bytes
    if op == 0:  # an element that claims more bytes than follow
        k = rng.randrange(len(elements))
        claim = rng.choice([*INTERESTING_32, len(elements[k][3]) + 1, 65535])
        encoded = b"".join(
            (implicit(gg, ee, vv, claim if j == k else None) if implicit_vr
             else explicit(gg, ee, vrr, vv, claim if j == k else None))
            for j, (gg, ee, vrr, vv) in enumerate(elements))
        how = f"element-length-{claim}"
    elif op == 1:  # undefined length where it is not allowed, or an unterminated sequence
        encoded = encode_data_set(elements[:4], implicit_vr)
        if implicit_vr:
            encoded += implicit(0x0008, 0x1140, b"", 0xFFFFFFFF) + implicit(0xFFFE, 0xE000, b"",
                                                                              0xFFFFFFFF)
        else:
            encoded += explicit(0x0008, 0x1140, b"SQ", b"", 0xFFFFFFFF) + \
                implicit(0xFFFE, 0xE000, b"", 0xFFFFFFFF)
        encoded += encode_data_set(elements[4:], implicit_vr)
        how = "unterminated-sequence"
    elif op == 2:  # deeply nested sequences
        depth = rng.choice([10, 100, 1000])
        inner = explicit(0x0010, 0x0020, b"LO", b"DEEP")
        for _ in range(depth):
            inner = explicit(0x0008, 0x1140, b"SQ", implicit(0xFFFE, 0xE000, inner))
        encoded = encode_data_set(elements[:3], False) + inner + \
            encode_data_set(elements[3:], False)
        implicit_vr = False
        how = f"nested-{depth}"
    elif op == 3:  # garbage VR
        k = rng.randrange(len(elements))
        g, e, _vr, v = elements[k]
        elements[k] = (g, e, rng.choice([b"XX", b"\0\0", b"UN", b"SQ", b"OB", b"US"]), v)
        encoded = encode_data_set(elements, False)
        implicit_vr = False
        how = "vr"
    elif op == 4:  # missing or mismatching identifying attributes
        k = rng.choice([1, 2, 6])
        if rng.random() < 0.5:
            del elements[k]
            how = f"missing-{k}"
        else:
            g, e, vr, _v = elements[k]
            elements[k] = (g, e, vr, even(rng.choice(HOSTILE_TEXT)))
            how = f"hostile-{k}"
        encoded = encode_data_set(elements, implicit_vr)
    elif op == 5:  # tags out of order / duplicated
        rng.shuffle(elements)
        encoded = encode_data_set(elements + elements[:2], implicit_vr)
        how = "tag-order"
    elif op == 6:  # file meta group inside the data set, or a preamble
        encoded = rng.choice([bytes(128) + b"DICM", explicit(0x0002, 0x0010, b"UI",
                                                              b"1.2.840.10008.1.2\0")])
        encoded += encode_data_set(elements, implicit_vr)
        how = "meta-in-data-set"
    elif op == 7:
        encoded = rng.randbytes(rng.randint(0, 400))
        how = "random-data-set"
    elif op == 8:
        how, encoded = havoc(rng, encode_data_set(elements, implicit_vr))
        how = f"data-{how}"
    else:
        encoded = encode_data_set(elements, implicit_vr)
        how = "valid"
    # A data set of odd length is a framing error (PS3.7 Annex F), answered with an A-ABORT
    # as storescp does (test_regressions.py); the lies here are about its content.
    encoded = even(encoded)
    context_id = 3 if implicit_vr else 1
    command = command_set(store_elements(sop_instance, message_id))
    data = fragments(context_id, command, command=True) + \
        fragments(context_id, encoded, command=False)
    return Case("dataset", how, data, False, status_expected=True)


GENERATORS = {
    "random": random_case,
    "associate": associate_case,
    "pdata": pdata_case,
    "command": command_case,
    "dataset": dataset_case,
}
# How often each category is drawn; data set cases are cheap (many per association).
WEIGHTS = {"random": 10, "associate": 25, "pdata": 20, "command": 15, "dataset": 30}


def generate(seed: int, index: int) -> Case:
    """Input number `index` of the campaign `seed` (reproducible on its own)."""
    rng = random.Random(seed * 1_000_003 + index)
    category = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    return GENERATORS[category](rng)
