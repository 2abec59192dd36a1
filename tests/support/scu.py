"""pynetdicom as a Storage SCU, for tests that want a conforming peer other than DCMTK."""

from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE


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
