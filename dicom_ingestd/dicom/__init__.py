"""The DICOM network protocol as bytes: Upper Layer PDUs (pdu.py), DIMSE command sets
(dimse.py) and data element encoding (elements.py).  Shared by the receiving side (worker/)
and the storage commitment delivery, which is an SCU (commitment/): below both, importing
neither."""
