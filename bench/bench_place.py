"""The durability stall alone: dicom-ingestd's own storage code, without the network.

The sender waits for each response, and dicom-ingestd answers only once the object is
durable, so with one sender no receiver can be faster than the time the sender and the wire
take (the floor receiver, storescp --ignore) plus, for each object, the time from its last
byte to its durability: the stall.  This measures the stall on the receivers' file system.
Each file of a set goes through `Store.temp_file` and `TempFile.write` (in PDU-sized pieces,
as received; not timed, since that overlaps with the transfer), then `TempFile.finish` and
`Store.commit`, exactly the worker's calls, which are timed.

Objects of WRITEBACK_STEP bytes or more have their writeback started while they arrive, so
their stall in a transfer is shorter than here: no floor is derived for them.
"""

import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from dicom_ingestd.config.load import config_from_mapping
from dicom_ingestd.config.schema import Config
from dicom_ingestd.worker.store import Store, WhenTaken


def ingestd_config(settings: Sequence[tuple[str, str, object]], output: Path) -> Config:
    """dicom-ingestd's configuration for the benchmark's --set values, output in `output`."""
    tables: dict[str, dict[str, object]] = {}
    for table, key, value in settings:
        tables.setdefault(table, {})[key] = value
    tables.setdefault("storage", {})["output_directory"] = str(output)
    return config_from_mapping(tables, "bench --set")


def recipe(settings: Sequence[tuple[str, str, object]], work: Path) -> tuple[bool, bool]:
    """(fsync, one journal commit per object) as dicom-ingestd's storage code decides them for
    an output directory under `work`: python_floor.py makes objects durable the same way."""
    output = work / "placement"
    config = ingestd_config(settings, output)
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    store = Store(config.storage)
    store.open()
    one_commit = store.one_commit
    store.close()
    shutil.rmtree(output, ignore_errors=True)
    return config.storage.fsync, one_commit


def place_once(files: Sequence[Path], config: Config) -> float:
    """Seconds of stall (finish and commit) placing `files` one after the other into config's
    (empty) output directory."""
    piece = config.network.max_pdu - 6  # a PDV's worth, as the worker receives it
    store = Store(config.storage)
    store.open()
    total = 0.0
    try:
        for number, path in enumerate(files):
            data = memoryview(path.read_bytes())
            temp = store.temp_file()
            for offset in range(0, len(data), piece):
                temp.write(data[offset:offset + piece])
            start = time.perf_counter()
            temp.finish(config.storage.fsync)
            store.commit(temp, [], [f"{number:06d}.dcm"], replace=False, when_taken=WhenTaken.ERROR)
            total += time.perf_counter() - start
    finally:
        store.close()
    return total


def stall(files: Sequence[Path], settings: Sequence[tuple[str, str, object]], work: Path,
          runs: int) -> tuple[float, str]:
    """(median seconds over `runs`, the start-up line's durability text) for placing `files`
    under `work`/placement, emptied before each run."""
    output = work / "placement"
    config = ingestd_config(settings, output)
    times = []
    for _ in range(runs):
        shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True)
        os.sync()  # as before each transfer: no earlier dirty pages flushed meanwhile
        times.append(place_once(files, config))
    store = Store(config.storage)
    store.open()
    durability = store.durability
    store.close()
    shutil.rmtree(output, ignore_errors=True)
    return statistics.median(times), durability
