"""The worker → master wire (ipc.py) over a real socket pair: every message arrives as it was
sent, a malformed datagram is dropped (the messages around it still arrive), and no text a
peer controls can make a message outgrow its bound."""

import struct
from collections.abc import Iterator

import pytest

from dicom_ingestd import ipc
from dicom_ingestd.codes import Ending
from dicom_ingestd.telemetry import Reporter

REPORT = ipc.AssociationReport(
    4242, "modality.example.org", "CT01", Ending.RELEASED, {0x0000: 7, 0xA700: 2}, 123456,
    tuple(range(len(ipc.COMMIT_BUCKETS) + 1)), 0.25, 1700000000.5,
    "C-STORE 0xA700: free space below storage.min_free_space", 1700000001.25)


@pytest.fixture
def channel() -> Iterator[ipc.Channel]:
    channel = ipc.Channel()
    yield channel
    channel.close()


@pytest.mark.parametrize("message", [
    REPORT,
    ipc.AssociationReport(1, "", ""),  # a progress report of nothing: outcome None, no counts
    ipc.AssociationReport(2, "10.0.0.1", "SCU", Ending.HEALTH_CHECK),
    *(ipc.AssociationReport(3, "h", "AE", ending) for ending in Ending),
    ipc.ObjectStored("18c-1", 1024),
    ipc.AssociationEnded("18c-1", True),
    ipc.CommitmentNote("18c-1", "r1", ipc.CommitmentStep.DELIVERED),
], ids=repr)
def test_every_message_arrives_as_sent(channel: ipc.Channel, message: ipc.Message) -> None:
    channel.send(message)
    assert channel.receive() == [message]


def _report_with(**fields: object) -> bytes:
    """REPORT's datagram with some header fields replaced (by name)."""
    data = bytearray(ipc.encode(REPORT))
    names = ["type", "outcome", "statuses", "pid", "bytes", "sum", "success", "error_time",
             *(f"count{i}" for i in range(len(ipc.COMMIT_BUCKETS) + 1)),
             "peer_length", "ae_length", "error_length"]
    header = dict(zip(names, ipc._REPORT.unpack_from(data), strict=True))
    header.update(fields)
    ipc._REPORT.pack_into(data, 0, *header.values())
    return bytes(data)


MALFORMED = {
    "empty": b"",
    "unknown type": b"\x09" + bytes(40),
    "report header cut short": ipc.encode(REPORT)[:20],
    "report cut short": ipc.encode(REPORT)[:-1],
    "report with a byte more": ipc.encode(REPORT) + b"x",
    "unknown ending": _report_with(outcome=len(Ending) + 1),
    "too many statuses": _report_with(statuses=ipc.MAX_STATUSES + 1),
    "lengths past the end": _report_with(error_length=0xFFFF),
    "text not UTF-8": ipc.encode(ipc.AssociationReport(1, "p", "a", last_error="x"))[:-1]
    + b"\xff",
    "unknown commitment step": struct.pack("!BB", 3, 9) + b"18c-1 r1",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_datagram_is_dropped(channel: ipc.Channel, data: bytes) -> None:
    assert ipc.decode(data) is None
    channel.send(ipc.ObjectStored("a-1", 1))
    channel.writer.send(data)
    channel.send(REPORT)
    assert channel.receive() == [ipc.ObjectStored("a-1", 1), REPORT]


def test_texts_are_cut_to_their_bounds_at_a_character_boundary(channel: ipc.Channel) -> None:
    report = ipc.AssociationReport(1, "p" * 300, "Ä" * 40, Ending.ABORTED,
                                   {status: 1 for status in range(ipc.MAX_STATUSES)},
                                   last_error="é" * 2000)
    data = ipc.encode(report)
    assert len(data) <= ipc.MAX_MESSAGE
    channel.send(report)
    [received] = channel.receive()
    assert isinstance(received, ipc.AssociationReport)
    assert received.peer == "p" * ipc.PEER_BYTES
    assert received.calling_ae == "Ä" * (ipc.AE_BYTES // 2)
    mark = " […]"  # 5 bytes of UTF-8: one é fewer fits
    assert received.last_error == "é" * ((ipc.ERROR_BYTES - 5) // 2) + mark
    assert received.statuses == report.statuses


def test_the_reporter_never_puts_more_statuses_in_a_report_than_fit() -> None:
    reports: list[ipc.AssociationReport] = []
    reporter = Reporter(reports.append, 1, clock=lambda: 0.0)
    for status in range(ipc.MAX_STATUSES + 3):
        reporter.store(status, 10, None, "", "peer", "AE")
    reporter.ended(Ending.RELEASED, "peer", "AE")
    assert [len(r.statuses) for r in reports] == [ipc.MAX_STATUSES, 3]
    assert all(ipc.decode(ipc.encode(r)) == r for r in reports)
    assert sum(sum(r.statuses.values()) for r in reports) == ipc.MAX_STATUSES + 3
