"""pynetdicom as the SCU, for tests that want a conforming peer other than DCMTK's tools."""

import contextlib
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import CTImageStorage, Verification


def park_reactor(assoc: Association, settle: float = 0.01) -> None:
    """Before a send_*() right after another exchange: park pynetdicom's reactor thread.

    pynetdicom (3.0) pauses its reactor for a send_*() by clearing a checkpoint and waiting
    for `_is_paused`, which the reactor sets *before* its wait on that checkpoint.  A reactor
    that had just passed the wait (the checkpoint still set) is taken for paused, goes on
    to take the response off the queue as an "unexpected" message, and the send_*() waits
    out its DIMSE timeout: a 30 s failure that only a loaded machine shows.  Cleared here
    first, the checkpoint stops the reactor at its next turn (it sleeps 1 ms per turn);
    `settle` gives it that turn before send_*() looks."""
    if not assoc.is_established:
        return  # send_*() refuses on its own; a reactor that ended never parks
    assoc._reactor_checkpoint.clear()
    deadline = time.monotonic() + 5.0
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0005)
    time.sleep(settle)


def park_before_every_send() -> None:
    """Make every pynetdicom send_*() the tests use park the reactor first (park_reactor):
    the race is the client library's, in every send after an exchange, so it is closed once
    here rather than at each call (called from conftest.py)."""
    for name in ("send_c_echo", "send_c_store", "send_n_action"):
        original = getattr(Association, name)
        if getattr(original, "parks_reactor", False):
            continue

        def parked(self: Association, *args: Any, _send: Any = original,
                   **kwargs: Any) -> Any:
            park_reactor(self)
            return _send(self, *args, **kwargs)

        parked.parks_reactor = True  # type: ignore[attr-defined]
        setattr(Association, name, parked)


def pynetdicom_store(port: int, path: Path) -> int:
    """Send one file with a pynetdicom SCU; return the C-STORE-RSP status."""
    ae = AE(ae_title="FAULTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ds = dcmread(path)
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established, "association not established"
    try:
        status = assoc.send_c_store(ds)
        assert "Status" in status, "no C-STORE-RSP received"
        return int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()


def scu(title: str = "PMTEST") -> AE:
    ae = AE(ae_title=title)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    ae.dimse_timeout = 20
    ae.network_timeout = 20
    return ae


# The A-ASSOCIATE-RJ each association received, as seen on the wire.  pynetdicom 3.0 has a
# requestor race: when the RJ arrives before its main thread checks the connection, its
# reactor has already closed the socket and the association reports "aborted", not
# "rejected" (about 1 in 500 fast local rejections).  Its PDU event still fires.
rejections: "weakref.WeakKeyDictionary[Association, A_ASSOCIATE_RJ]" = \
    weakref.WeakKeyDictionary()


def associate(port: int, host: str = "127.0.0.1", bind: str | None = None,
              title: str = "PMTEST") -> Association:
    kw: dict[str, Any] = {}
    if bind is not None:
        kw["bind_address"] = (bind, 0)
    received: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            received.append(event.pdu)

    assoc = scu(title).associate(host, port, ae_title="STORESCP",
                                 evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)], **kw)
    if received:
        rejections[assoc] = received[0]
    return assoc


@contextlib.contextmanager
def held(assoc: Association) -> Iterator[Association]:
    """Make sure an association never outlives the test (a held one blocks daemon stop)."""
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.abort()


def store_ok(assoc: Association, ds: Dataset) -> None:
    status = assoc.send_c_store(ds)
    assert status and status.Status == 0x0000, status


def echo_ok(assoc: Association) -> None:
    status = assoc.send_c_echo()
    assert status and status.Status == 0x0000, status


def assert_rejected_local_limit(assoc: Association) -> None:
    """A-ASSOCIATE-RJ: rejected-transient (2), provider presentation (3), local limit (2)."""
    rj = rejections.get(assoc)
    assert rj is not None, f"no A-ASSOCIATE-RJ received (established {assoc.is_established}, " \
        f"aborted {assoc.is_aborted})"
    assert (rj.result, rj.source, rj.reason_diagnostic) == (2, 3, 2), \
        (rj.result, rj.source, rj.reason_diagnostic)
