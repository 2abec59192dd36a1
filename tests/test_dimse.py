"""The direct command-set decoder agrees with pydicom's, and hands odd input to pydicom."""

import random
import struct

import pytest

from dicom_ingestd.dicom import dimse


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _store_rq(sop_class: bytes = b"1.2.840.10008.5.1.4.1.1.2\x00",
              sop_instance: bytes = b"1.2.3.4.5", message_id: int = 7,
              data_set_type: int = 0x0000, originator: bytes | None = None) -> bytes:
    body = _element(0x0002, sop_class) + _element(0x0100, _us(dimse.C_STORE_RQ))
    body += _element(0x0110, _us(message_id)) + _element(0x0700, _us(0))
    body += _element(0x0800, _us(data_set_type)) + _element(0x1000, sop_instance)
    if originator is not None:
        body += _element(0x1030, originator)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _both(data: bytes, fix: bool) -> tuple[object, object]:
    def run(decode: object) -> object:
        try:
            return decode(data, fix)  # type: ignore[operator]
        except dimse.CommandError:
            return "CommandError"
    return run(dimse._decode_plain), run(dimse._decode_with_pydicom)


@pytest.mark.parametrize("fix", [False, True])
@pytest.mark.parametrize("data", [
    _store_rq(),
    _store_rq(sop_instance=b"1.2.3.4.5 "),
    _store_rq(sop_instance=b"1.2.3.4.5\x00\x00"),
    _store_rq(sop_instance=b" 1.2.3 \x00"),
    _store_rq(sop_class=b""),
    _store_rq(message_id=0xFFFF, data_set_type=0x0101),
    _store_rq(originator=b" MOVESCU  "),
    _store_rq(originator=b""),
    _element(0x0100, _us(dimse.C_ECHO_RQ)) + _element(0x0110, _us(1)),
    _element(0x0100, _us(dimse.C_ECHO_RQ)) + _element(0x0120, _us(9)),
])
def test_plain_command_sets_decode_as_pydicom_does(data: bytes, fix: bool) -> None:
    fast, slow = _both(data, fix)
    assert fast is not None
    assert fast == slow


@pytest.mark.parametrize("data", [
    b"",
    b"\x00\x00",
    _store_rq()[:-3],  # truncated value
    _store_rq() + b"\x00\x00\x00",  # trailing bytes
    _element(0x0110, _us(1)),  # no CommandField
    _element(0x0100, b"\x01"),  # odd-sized US
    _element(0x0100, _us(1) * 2),  # multi-valued US
    _element(0x0100, _us(1)) + _element(0x0100, _us(0x30)),  # repeated tag
    _store_rq(sop_instance=b"1.2\\3.4"),  # multi-valued UID
    _store_rq(sop_instance=b"1.2.\xe9"),  # not ASCII
    _element(0x0100, _us(1)) + struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00",
    _element(0x0100, _us(1)) + struct.pack("<HHL", 0x0000, 0x0002, 0xFFFFFFFF),
])
def test_odd_command_sets_go_to_pydicom(data: bytes) -> None:
    assert dimse._decode_plain(data, False) is None


def test_random_corruptions_never_decode_differently() -> None:
    rng = random.Random(8)
    base = _store_rq(originator=b"ORIG")
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        fast, slow = _both(bytes(data), rng.random() < 0.5)
        if fast is not None:
            assert fast == slow, bytes(data)
