"""The inputs that found bugs, kept as they were found (hex) next to a readable rebuild.

1. A presentation context item without an abstract syntax sub-item (fuzz input 217 of the
   parser campaign, seed 20261128): pynetdicom's negotiation raised TypeError, logged as an
   internal error with a traceback.  Now: A-ABORT, one line naming the context.
2. A presentation context without a transfer syntax (input 280, same campaign): accepted,
   then IndexError.  Now: A-ABORT.
3. An A-ASSOCIATE-RQ with a non-ASCII byte in a UID: pynetdicom logged an ERROR line and a
   traceback on top of our own one-line A-ABORT message.
4. A data set whose SOP Instance UID holds a newline and a fake log line: the mismatch
   message wrote it verbatim, so a peer could forge log lines.  Now escaped (\\x0a).
5. A data set that makes pydicom fall back from explicit to implicit VR: pydicom's warning
   reached the log (its logger level was reset by its own import) and stderr (warnings).
"""

import socket
import struct
from typing import Any

import fuzzgen
import harness
from support import uids, wire
from support.daemon import Daemon

from dicom_ingestd.worker import acceptor

NO_ABSTRACT_SYNTAX = bytes.fromhex(
    "010000000134000100004141414141414141414141414141414146555a5a5343552020202020202020200000"
    "00000000000000000000000000000000000000000000000000000000000010000015312e322e3834302e3130"
    "3030382e332e312e312e31200000040100000030000019312e322e3834302e31303030382e352e312e342e31"
    "2e312e3240000013312e322e3834302e31303030382e312e322e31200000360300000030000019312e322e38"
    "34302e31303030382e352e312e342e312e312e3240000011312e322e3834302e31303030382e312e32200000"
    "2e0500000030000011312e322e3834302e31303030382e312e3140000011312e322e3834302e31303030382e"
    "312e325000002b510000040000400052000017312e322e3832362e302e312e333638303034332e392e375500"
    "000446555a5a")
NO_TRANSFER_SYNTAX = bytes.fromhex(
    "01000000015900010000414e592d534350202020202020202020312e312e312e312e312e312e312e312e0000"
    "00000000000000000000000000000000000000000000000000000000000010000015312e322e3834302e3130"
    "3030382e332e312e312e31200000380100000030000019312e322e3834302e31303030382e352e312e342e31"
    "2e312e3240000013312e322e3834302e31303030382e312e322e31200000210100000030000019312e322e38"
    "34302e31303030382e352e312e342e312e312e32200000360300000030000019312e322e3834302e31303030"
    "382e352e312e342e312e312e3240000011312e322e3834302e31303030382e312e322000002e050000003000"
    "0011312e322e3834302e31303030382e312e3140000011312e322e3834302e31303030382e312e325000002b"
    "510000040000400052000017312e322e3832362e302e312e333638303034332e392e375500000446555a5a")


def rebuilt_associate_rq(context: bytes) -> bytes:
    items = [wire.item(0x10, fuzzgen.APPLICATION_CONTEXT), context,
             wire.context_item(3, uids.CT_IMAGE, [uids.EXPLICIT_LE]),
             wire.item(0x50, b"".join(fuzzgen.user_items()))]
    return wire.pdu(wire.A_ASSOCIATE_RQ, fuzzgen.associate_fixed() + b"".join(items))


REBUILT_NO_ABSTRACT = rebuilt_associate_rq(
    wire.item(0x20, bytes((1, 0, 0, 0)) + wire.item(0x40, uids.EXPLICIT_LE.encode())))
REBUILT_NO_TRANSFER = rebuilt_associate_rq(
    wire.item(0x20, bytes((1, 0, 0, 0)) + wire.item(0x30, uids.CT_IMAGE.encode())))
NON_ASCII_UID = rebuilt_associate_rq(wire.context_item(1, "1.2.\xab5", [uids.EXPLICIT_LE])
                                     .replace("1.2.\xab5".encode(), b"1.2.\xab5"))
BAD_ASSOCIATE_RQS = {
    "no-abstract-syntax (as found)": NO_ABSTRACT_SYNTAX,
    "no-abstract-syntax": REBUILT_NO_ABSTRACT,
    "no-transfer-syntax (as found)": NO_TRANSFER_SYNTAX,
    "no-transfer-syntax": REBUILT_NO_TRANSFER,
    "non-ascii-uid": NON_ASCII_UID,
}
FORGED = b"1.2.3\n2026-01-01 00:00:00,000 ERROR [1] forged line"


def test_bad_contexts_are_refused_by_the_decoder() -> None:
    for name, data in BAD_ASSOCIATE_RQS.items():
        try:
            acceptor.decode_request(data)
        except acceptor.RequestError:
            continue
        raise AssertionError(f"{name}: decoded")


def send_rq(port: int, data: bytes) -> list[int]:
    sock = harness.connect(port, timeout=15)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return wire.read_all_pdus(sock)
    finally:
        sock.close()


def store(port: int, sop_instance: bytes, data_set: bytes, context_id: int = 1) -> int | str:
    sock = harness.associate(port)
    try:
        command = wire.command_set(wire.store_elements(sop_instance))
        sock.sendall(wire.fragments(context_id, command, command=True)
                     + wire.fragments(context_id, data_set, command=False))
        return wire.read_status(sock)
    finally:
        sock.close()


def test_regression_inputs_over_the_wire(daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory({"logging": {"level": "info"}})
    for name, data in BAD_ASSOCIATE_RQS.items():
        assert send_rq(daemon.port, data) == [wire.A_ABORT], name
    # 4: a newline in a UID from the network, in a message the daemon logs.
    rng = __import__("random").Random(4)
    elements = fuzzgen.data_elements(b"1.2.3", rng)
    elements[2] = (0x0008, 0x0018, b"UI", wire.even(FORGED))
    assert store(daemon.port, b"1.2.3", fuzzgen.encode_data_set(elements, False)) == 0xA900
    # 5: explicit VR declared (context 1), implicit VR sent: pydicom's fallback warns.
    elements = fuzzgen.data_elements(b"1.2.3.5", rng)
    implicit = fuzzgen.encode_data_set(elements, implicit_vr=True) + \
        struct.pack("<HHL", 0x0040, 0x0275, 0xFFFFFFFF)  # and an unterminated sequence
    assert isinstance(store(daemon.port, b"1.2.3.5", implicit), int)
    daemon.stop()
    log = daemon.log()
    assert log.count("has no abstract syntax") == 2, log
    assert log.count("has no transfer syntax") == 2, log
    assert "\\x0a2026-01-01 00:00:00,000 ERROR [1] forged line" in log
    assert not harness.bug_lines(log), harness.bug_lines(log)
    assert "pynetdicom" not in log and "UserWarning" not in log
