"""Helpers shared by the test files, each declared once (conftest.py keeps the fixtures).

- `wait`: `wait_until`, the one way a test waits for something.
- `daemon`: the one runner of a real `dicom-ingestd run` process (`Daemon`, `start_daemon`,
  `launch` for a daemon under a wrapper such as systemd-socket-activate), free ports.
- `peers`: DCMTK's command-line tools as peers, and DCMTK `storescp` as the reference.
- `scu`: pynetdicom as an SCU (an association that keeps the A-ASSOCIATE-RJ it got).
- `wire`: the one raw-socket DICOM Upper Layer client, for PDUs no library would send, and
  the PDU and DIMSE constants the tests state independently of the daemon's own.
- `uids`: the UIDs the tests name.
- `data`: test objects (pydicom's bundled files, copies with new UIDs, studies, data sets
  built byte by byte) and the data set bytes of a Part 10 file.
- `procs`: the daemon's processes as /proc shows them.
- `mounts`: file systems of their own (tmpfs, ext4 on a loop device) for tests that need them.
- `recorder`: a command that writes down how the daemon ran it (events and jobs).
"""
