"""The status document as Prometheus metrics (text exposition format, via prometheus_client).

prometheus_client writes the format (escaping, histogram buckets, HELP/TYPE lines); the
values come from a status document (status.py), so `dicom-ingestd metrics`, the textfile the
master writes for node_exporter (monitoring.metrics_file) and `dicom-ingestd status` agree.
Nothing here starts a thread or a server: the master stays single-threaded while it forks.
"""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from dicom_ingestd.ipc import COMMIT_BUCKETS
from dicom_ingestd.stats import status_class
from dicom_ingestd.status import JOB_STATES

PREFIX = "dicom_ingestd"


class _StatusCollector:
    """A prometheus_client collector over one status document."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def collect(self) -> Iterator[Metric]:
        doc = self.doc
        daemon, c = doc["daemon"], doc["counters"]
        info = GaugeMetricFamily(f"{PREFIX}_info", "Version and configuration file.",
                                 labels=["version", "config_file"])
        info.add_metric([doc["version"], doc["config_file"]], 1)
        yield info
        yield GaugeMetricFamily(f"{PREFIX}_up", "1 while the daemon runs (0: the figures "
                                "come from disk, the daemon is not running).",
                                value=1 if daemon.get("running") else 0)
        if daemon.get("running"):
            yield GaugeMetricFamily(f"{PREFIX}_start_time_seconds", "When the daemon started "
                                    "(Unix time).", value=daemon["started"])
            yield GaugeMetricFamily(f"{PREFIX}_active_associations",
                                    "Associations being served now.",
                                    value=daemon["active_associations"])
            reload = daemon.get("last_reload")
            if reload:
                yield GaugeMetricFamily(f"{PREFIX}_last_reload_success", "1 if the last "
                                        "reload was applied, 0 if it was rejected.",
                                        value=1 if reload["outcome"] == "applied" else 0)
                yield GaugeMetricFamily(f"{PREFIX}_last_reload_timestamp_seconds",
                                        "When the configuration was last reloaded.",
                                        value=reload["time"])
        yield GaugeMetricFamily(f"{PREFIX}_counters_since_timestamp_seconds",
                                "Since when the counters count (they survive restarts).",
                                value=c["since"])
        associations = CounterMetricFamily(
            f"{PREFIX}_associations", "Associations (and refused connections) by how they "
            "ended and by calling AE title.", labels=["outcome", "calling_ae"])
        for row in c["associations"]:
            associations.add_metric([row["outcome"], row["calling_ae"]], row["count"])
        yield associations
        objects = CounterMetricFamily(
            f"{PREFIX}_objects", "C-STORE requests answered, by DIMSE status (0x0000: "
            "stored).", labels=["status", "result"])
        for code, count in c["objects"].items():
            objects.add_metric([code, status_class(int(code, 16))], count)
        yield objects
        yield CounterMetricFamily(f"{PREFIX}_stored_bytes", "Bytes of data sets stored.",
                                  value=c["bytes_stored"])
        commit = c["commit_seconds"]
        cumulative, buckets = 0, []
        for bound, count in zip([*COMMIT_BUCKETS, float("inf")], commit["counts"],
                                strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            f"{PREFIX}_store_commit_seconds", "Time from an object's last byte to its file "
            "being durable in place (fsync, link, directory sync): what the sender waits "
            "for before the success response.", buckets=buckets, sum_value=commit["sum"])
        yield GaugeMetricFamily(f"{PREFIX}_last_success_timestamp_seconds",
                                "When an object was last stored (0: never).",
                                value=c["last_success"])
        yield GaugeMetricFamily(f"{PREFIX}_last_error_timestamp_seconds",
                                "When the last error happened (0: never).",
                                value=c["last_error"]["time"])
        jobs = doc["jobs"]
        if jobs is not None:
            gauge = GaugeMetricFamily(f"{PREFIX}_jobs", "Event jobs by state (dead: failed "
                                      "for good, waiting for dicom-ingestd jobs retry).",
                                      labels=["state"])
            for state in JOB_STATES:
                gauge.add_metric([state], jobs.get(state, 0))
            yield gauge
        commitment = doc.get("storage_commitment")
        if commitment is not None:
            yield CounterMetricFamily(
                f"{PREFIX}_storage_commitment_requests", "Storage commitment requests "
                "evaluated (since the job database was made).", value=commitment["requests"])
            objects = CounterMetricFamily(
                f"{PREFIX}_storage_commitment_objects", "Objects named in storage commitment "
                "requests, by what the report said.", labels=["result"])
            objects.add_metric(["committed"], commitment["objects_committed"])
            objects.add_metric(["failed"], commitment["objects_failed"])
            yield objects
            reports = CounterMetricFamily(
                f"{PREFIX}_storage_commitment_reports", "Storage commitment report "
                "deliveries: delivered (on the requesting association or a new one), "
                "attempt_failed (each failed attempt), dead (given up).", labels=["outcome"])
            reports.add_metric(["delivered"], commitment["reports_delivered"])
            reports.add_metric(["attempt_failed"], commitment["delivery_attempts_failed"])
            reports.add_metric(["dead"], commitment["reports_dead"])
            yield reports
        disk = doc["disk"]
        free = GaugeMetricFamily(f"{PREFIX}_free_bytes", "Free bytes on the file system of "
                                 "the output and of the state directory.",
                                 labels=["filesystem", "path"])
        for name in ("output", "state"):
            entry = disk.get(name)
            if entry is not None and "free_bytes" in entry:
                free.add_metric([name, entry["path"]], entry["free_bytes"])
        yield free
        yield GaugeMetricFamily(f"{PREFIX}_free_space_low", "1 while free space is below "
                                "storage.min_free_space + monitoring.low_space_margin.",
                                value=1 if disk["low"] else 0)
        yield GaugeMetricFamily(f"{PREFIX}_min_free_space_bytes", "storage.min_free_space: "
                                "objects are refused below it (0: never).",
                                value=disk["refusing_below"])


def exposition(doc: dict[str, Any]) -> bytes:
    """The metrics of a status document, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(doc))
    return bytes(generate_latest(registry))


def write_textfile(path: Path, doc: dict[str, Any]) -> None:
    """Replace `path` atomically (node_exporter must never read half a file); raises OSError."""
    data = exposition(doc)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)  # node_exporter runs as another user; the umask is 0027
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temp, path)
