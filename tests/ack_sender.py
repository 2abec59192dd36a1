"""A sender that writes down what it was told: pynetdicom's Storage SCU as a subprocess.

    python ack_sender.py PORT LEDGER [--deadline SECONDS] [--per-association N] [--by-study]
                         [--bind ADDRESS] FILE...

Sends the files in order, N per association (default: all) or, with --by-study, one study per
association (as storescu sending a study; the rest of a study whose association broke goes
on a new association of its own), and appends one line per C-STORE
response to LEDGER: "<status hex> <SOP Instance UID>".  Like a modality, it retries an object
whose association broke (aborted, refused, timed out) on a new association until the deadline;
an object answered with any status is not sent again.  --bind sends from that local address
(e.g. 127.0.0.2: a sender of its own on loopback).  The ledger is flushed per line, so a
test knows exactly which objects were acknowledged, whatever happened to the receiver.
"""

import argparse
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

_CONTEXTS = 16


def acknowledged(ledger: Path) -> list[str]:
    """SOP Instance UIDs answered 0x0000 in a ledger."""
    if not ledger.exists():
        return []
    return [line.split()[1] for line in ledger.read_text().splitlines()
            if line.startswith("0000 ")]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("ledger")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--per-association", type=int, default=0)
    parser.add_argument("--by-study", action="store_true")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="pynetdicom's ACSE, DIMSE and network timeouts")
    parser.add_argument("--bind", default="", help="local address to connect from")
    args = parser.parse_args()
    datasets = [dcmread(path) for path in args.files]
    ae = AE(ae_title="ACKSENDER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    for uid in sorted({str(ds.SOPClassUID) for ds in datasets})[:_CONTEXTS]:
        ae.add_requested_context(uid)
    pending = list(datasets)
    deadline = time.monotonic() + args.deadline
    with open(args.ledger, "a", buffering=1) as ledger:
        while pending and time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", args.port,
                                 bind_address=(args.bind, 0) if args.bind else None)
            if not assoc.is_established:
                time.sleep(0.2)
                continue
            sent, last_study = 0, ""
            while pending and assoc.is_established:
                ds = pending[0]
                if args.by_study and sent and ds.StudyInstanceUID != last_study:
                    break
                status = assoc.send_c_store(ds)
                if not status or "Status" not in status:
                    break  # no response: the association broke; send it again
                ledger.write(f"{int(status.Status):04x} {ds.SOPInstanceUID}\n")
                last_study = pending.pop(0).StudyInstanceUID
                sent += 1
                if args.per_association and sent >= args.per_association:
                    break
            if assoc.is_established:
                assoc.release()
            else:
                time.sleep(0.1)
    return 0 if not pending else 1


if __name__ == "__main__":
    raise SystemExit(main())

