#!/usr/bin/env python3
"""Memory of dicom-ingestd's warm workers: idle, and per open association (PSS).

    python bench/pool_memory.py [--spares 8] [--connections 16]

PSS (/proc/PID/smaps_rollup) shares each page out among the processes mapping it, so the
sum over the master, its workers and helpers counts the pages fork() shares once.  Prints:

- the settled tree with no spare worker (workers.spare_workers = 0), and with `--spares`:
  the difference per idle worker;
- the tree holding `--connections` established associations (each served by a worker of
  its own, while the pool keeps its spares), with the default spares: the difference per
  open association.

Each daemon runs with the default configuration on 127.0.0.1 (output in a temporary
directory); stdlib and the bench modules only.
"""

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from assoc_client import associate_rq, read_pdu
from bench_proc import Receiver, free_port, process_tree, pss_kib, wait_idle
from run import default_ingestd, write_ingestd_config

CT_IMAGE = b"1.2.840.10008.5.1.4.1.1.2"


def tree_pss_kib(root: int, samples: int = 5) -> float:
    """The median over `samples` of the summed PSS of the tree under `root`."""
    values = []
    for _ in range(samples):
        values.append(sum(pss_kib(pid) for pid in process_tree(root)))
        time.sleep(0.1)
    return statistics.median(values)


def settled(receiver: Receiver) -> None:
    """Spares forked, surplus trimmed, CPU quiet."""
    time.sleep(1.5)
    wait_idle(receiver.pid, quiet=0.3)


def start(work: Path, name: str, spares: int) -> Receiver:
    out = work / name
    out.mkdir()
    port = free_port()
    config = work / f"{name}.toml"
    write_ingestd_config(config, port, out, [("workers", "spare_workers", spares)])
    receiver = Receiver([default_ingestd(), "run", "-c", str(config)], {}, work / f"{name}.log")
    receiver.wait_listening(port, timeout=30)
    receiver.port = port  # type: ignore[attr-defined]
    settled(receiver)
    return receiver


def open_associations(port: int, count: int) -> list[socket.socket]:
    rq = associate_rq(CT_IMAGE, b"MEMSCU", b"STORESCP")
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(rq)
        pdu_type, _ = read_pdu(sock)
        if pdu_type != 0x02:
            raise SystemExit(f"association not accepted (PDU type 0x{pdu_type:02X})")
        held.append(sock)
    return held


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spares", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pool-memory-") as tmp:
        work = Path(tmp)
        none = start(work, "none", 0)
        base = tree_pss_kib(none.pid)
        processes = len(process_tree(none.pid))
        none.stop()
        many = start(work, "spares", args.spares)
        with_spares = tree_pss_kib(many.pid)
        many.stop()
        print(f"tree PSS, no spare worker: {base / 1024:.1f} MiB ({processes} processes: "
              "the master and its configuration watcher)")
        print(f"tree PSS, {args.spares} spare workers: {with_spares / 1024:.1f} MiB; "
              f"{(with_spares - base) / args.spares / 1024:.2f} MiB per idle worker")

        default = start(work, "default", 4)
        idle = tree_pss_kib(default.pid)
        held = open_associations(default.port, args.connections)  # type: ignore[attr-defined]
        try:
            settled(default)
            busy = tree_pss_kib(default.pid)
        finally:
            for sock in held:
                sock.close()
        default.stop()
        print(f"tree PSS, 4 spares: {idle / 1024:.1f} MiB; holding {args.connections} "
              f"associations: {busy / 1024:.1f} MiB; "
              f"{(busy - idle) / args.connections / 1024:.2f} MiB per open association")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
