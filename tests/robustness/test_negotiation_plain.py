"""The plain A-ASSOCIATE-RQ path of acceptor.py against pynetdicom's, request by request.

acceptor.py decodes, negotiates and answers a plain request itself (ten times faster: it is
on every association's critical path) and leaves every other request to pynetdicom.  Both
must give the same Request, screening outcome and A-ASSOCIATE-AC, byte for byte, or the
plain path must decline.  Inputs: requests built like real senders' (random subsets of the
storage SOP classes, transfer syntax lists, padded UIDs, AE titles and version names), and
the fuzz corpus's mutated requests, under several configurations.
"""

import random
import struct

import fuzzgen
import pytest
from support import uids, wire

from dicom_ingestd.config.load import config_from_mapping
from dicom_ingestd.config.schema import Config
from dicom_ingestd.worker import acceptor, negotiation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEED = 20261212
SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.90", "1.2.3.4.5"]
TITLES = [b"STORESCU", b"  LEADING", b"A B C", b"lower-case", b"X" * 16, b"TRAIL   ",
          b"ANY-SCP", b"STORESCP", b"Q\\Z", b" "]
VERSIONS = [b"OFFIS_DCMTK_367", b"PYNETDICOM_304", b"", b" PADDED", b"X" * 17, b"ok"]


def _config(**tables: dict[str, object]) -> Config:
    return config_from_mapping({"storage": {"output_directory": "/nonexistent"}, **tables})


CONFIGS = [
    _config(),
    _config(negotiation={"preferred_transfer_syntax": "implicit"}),
    _config(negotiation={"preferred_transfer_syntax": "lossless"}, network={"max_pdu": 4096}),
    _config(negotiation={"preferred_transfer_syntax": "all"},
            association={"require_called_aetitle": True}),
    _config(association={"allowed_calling_aetitles": ["STORESCU"],
                         "reject_without_implementation_uid": True}),
    _config(negotiation={"promiscuous": True}),
    _config(storage_commitment={"enabled": True}),
]


def _uid(uid: str, rng: random.Random) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 and rng.random() < 0.5 else raw


def sender_like(rng: random.Random) -> bytes:
    """An A-ASSOCIATE-RQ as real senders build them, with the variations they show."""
    classes = [negotiation.VERIFICATION_SOP_CLASS, *negotiation.STORAGE_SOP_CLASSES,
               "1.2.3.999", "1.2.840.10008.5.1.4.1.1.9999",
               negotiation.commitment_context()[0]]
    items = [wire.item(0x10, _uid("1.2.840.10008.3.1.1.1", rng))]
    for number in range(rng.choice([1, 1, 2, 3, 10, 64, 128])):
        syntaxes = rng.sample(SYNTAXES, rng.randint(1, 4))
        sub = wire.item(0x30, _uid(rng.choice(classes), rng)) + b"".join(
            wire.item(0x40, _uid(ts, rng)) for ts in syntaxes)
        items.append(wire.item(0x20, bytes((2 * number + 1, 0, 0, 0)) + sub))
    if rng.random() < 0.3:
        rng.shuffle(items[1:])
    user = [wire.item(0x51, struct.pack(">L", rng.choice([0, 16384, 131072, 2**32 - 1]))),
            wire.item(0x52, _uid(rng.choice(["1.2.276.0.7230010.3.0.3.6.7",
                                                "1.2.826.0.1.3680043.9.3811.3.0.4"]), rng))]
    version = rng.choice(VERSIONS)
    if version:
        user.append(wire.item(0x55, version))
    items.append(wire.item(0x50, b"".join(user)))
    fixed = (struct.pack(">HH", rng.choice([1, 1, 1, 2, 3]), 0)
             + rng.choice(TITLES).ljust(16)[:16] + rng.choice(TITLES).ljust(16)[:16] + bytes(32))
    return wire.pdu(wire.A_ASSOCIATE_RQ, fixed + b"".join(items))


def corpus() -> list[bytes]:
    rng = random.Random(SEED)
    out = [sender_like(rng) for _ in range(1500)]
    out += [fuzzgen.associate_case(rng).data for _ in range(1500)]
    return out


def outcome(data: bytes, config: Config, plain: bool) -> object:
    """What the session would act on: the request, the screening, the AC bytes."""
    try:
        request, primitive, version = (acceptor.decode_request(data) if plain
                                       else acceptor.decode_with_pynetdicom(data))
    except acceptor.RequestError:
        return "undecodable"
    rejection = acceptor.screen(request, primitive, version, config)
    if rejection is not None:
        return request, version, rejection
    acceptance = acceptor.accept(request, primitive, config)
    return request, version, acceptance.contexts, acceptance.rejected, acceptance.pdu


def test_plain_path_answers_exactly_as_pynetdicom() -> None:
    for config in CONFIGS:
        acceptor.warm_up(config)
    plain = [0, 0]  # sender-like, fuzzed
    inputs = corpus()
    for index, data in enumerate(inputs):
        if acceptor._decode_plain(data) is None:
            continue
        plain[index >= len(inputs) // 2] += 1
        config = CONFIGS[index % len(CONFIGS)]
        ours, theirs = outcome(data, config, True), outcome(data, config, False)
        assert ours == theirs, f"input {index}: {data[:120].hex()}...\n{ours}\n{theirs}"
    # A third of the variations decline (bad titles or version names): the rest, and some
    # fuzzed requests, are plain, so the path this guards is the one taken.
    assert plain[0] > 500 and plain[1] > 10, plain


def test_remembered_answers_are_fresh_answers() -> None:
    """A worker answers a repeated request from memory: each configuration, asked again and
    in turn with the others, still gets pynetdicom's answer (a memory keyed on the request
    alone would give one configuration's AC to another: their maximum PDUs differ)."""
    for config in CONFIGS:
        acceptor.warm_up(config)
    rng = random.Random(SEED)
    requests = [data for data in (sender_like(rng) for _ in range(200))
                if len(data) <= acceptor._REMEMBER_BYTES and acceptor._decode_plain(data)][:8]
    assert len(requests) == 8
    for _ in range(2):
        for config in CONFIGS:
            for data in requests:
                ours, theirs = outcome(data, config, True), outcome(data, config, False)
                assert ours == theirs, f"{data[:120].hex()}...\n{ours}\n{theirs}"
    assert set(requests) <= set(acceptor._decoded)


def test_plain_path_declines_what_it_does_not_know() -> None:
    rng = random.Random(SEED)
    base = fuzzgen.associate_rq()
    assert acceptor._decode_plain(base) is not None
    role = wire.item(0x54, struct.pack(">H", len(uids.CT_IMAGE)) + uids.CT_IMAGE.encode()
                        + b"\x01\x01")
    user = wire.item(0x50, b"".join([*fuzzgen.user_items(), role]))
    with_role = base[:base.index(b"\x50\x00")] + user
    with_role = wire.pdu(wire.A_ASSOCIATE_RQ, with_role[6:])
    assert acceptor._decode_plain(with_role) is None
    assert acceptor._decode_plain(base[:-1]) is None
    assert acceptor._decode_plain(fuzzgen.flip(rng, base)[:10]) is None
