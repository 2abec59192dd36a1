"""The status document: what `dicom-ingestd status` prints, the metrics say and STATUS= sums up.

One JSON-able dict, made by the running master (live: uptime, active associations, the last
reload) or, when no daemon answers, from what is on disk (the saved counters, the job
database, the free space).  `render` turns it into the text an administrator reads.
"""

import contextlib
import os
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from dicom_ingestd import __version__
from dicom_ingestd.config.schema import Config
from dicom_ingestd.control import SOCKET_NAME
from dicom_ingestd.ipc import COMMIT_BUCKETS
from dicom_ingestd.jobs.queue import DATABASE as JOB_DATABASE
from dicom_ingestd.jobs.queue import Counter, JobQueue
from dicom_ingestd.jobs.service import state_directory
from dicom_ingestd.log import escape_controls
from dicom_ingestd.stats import FILE_NAME, Stats, status_class
from dicom_ingestd.worker.store import STAGING_DIR

JOB_STATES = ("pending", "running", "done", "dead")


def output_directory(config: Config) -> Path:
    return Path(config.storage.output_directory).resolve()


def stats_path(config: Config) -> Path:
    """Where the counters of this configuration's output directory are kept."""
    return output_directory(config) / STAGING_DIR / FILE_NAME


def control_socket(config: Config) -> Path:
    """Where the daemon serving this configuration answers `status` and `reload`."""
    return output_directory(config) / STAGING_DIR / SOCKET_NAME


def free_space(path: Path) -> dict[str, Any]:
    """Free and total bytes of the file system holding `path` (free: for unprivileged use)."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return {"path": str(path), "error": exc.strerror or str(exc)}
    return {"path": str(path), "free_bytes": st.f_bavail * st.f_frsize,
            "total_bytes": st.f_blocks * st.f_frsize}


def disk(config: Config) -> dict[str, Any]:
    """Free space on the output and state file systems, with the thresholds: `low` is true
    while either is below storage.min_free_space + monitoring.low_space_margin."""
    refuse = config.storage.min_free_space
    margin = config.monitoring.low_space_margin
    result: dict[str, Any] = {"refusing_below": refuse,
                              "warning_below": refuse + margin if margin else 0}
    low: list[str] = []
    state = state_directory(config)
    places = [("output", output_directory(config))]
    if state.exists():
        places.append(("state", state))
    for name, path in places:
        entry = free_space(path)
        result[name] = entry
        free = entry.get("free_bytes")
        if margin and free is not None and free < refuse + margin:
            low.append(name)
    result["low"] = low
    return result


def _read_database(path: Path, live: bool, read: Callable[[JobQueue], dict[str, int]],
                   sql: str) -> dict[str, int]:
    """Name -> count from the job database at `path`: live (the daemon, as the service user)
    through the queue's own connection settings and `read`; otherwise `sql` (rows of name
    and count), read-only and without creating or locking anything (`immutable`), so that
    root running `dicom-ingestd status` leaves no file the service could not open.  Raises
    OSError or sqlite3.Error."""
    if live:
        queue = JobQueue(path.parent, create=False, durable=False, busy_timeout=0.2)
        try:
            return read(queue)
        finally:
            queue.close()
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
        return {str(name): int(n) for name, n in db.execute(sql)}


def job_counts(config: Config, live: bool) -> dict[str, int] | None:
    """Jobs by state, or None when there is no job database."""
    path = state_directory(config) / JOB_DATABASE
    if not path.exists():
        return None
    counts = dict.fromkeys(JOB_STATES, 0)
    try:
        counts.update(_read_database(path, live, JobQueue.counts,
                                     "SELECT state, COUNT(*) FROM jobs GROUP BY state"))
    except (OSError, sqlite3.Error, FileNotFoundError) as exc:
        return {**counts, "error": str(exc)}  # type: ignore[dict-item]
    return counts


def commitment_counts(config: Config, live: bool) -> dict[str, int] | None:
    """The storage commitment counters (jobs/queue.py Counter, without their common prefix),
    kept in the job database since it was made; None while storage commitment is off and
    has never counted anything."""
    path = state_directory(config) / JOB_DATABASE
    values = dict.fromkeys(map(str, Counter), 0)
    if path.exists():
        with contextlib.suppress(OSError, sqlite3.Error):  # a version 3 database has none
            values.update(_read_database(path, live, JobQueue.counters,
                                         "SELECT name, value FROM counters"))
    if not config.storage_commitment.enabled and not any(values.values()):
        return None
    return {name.removeprefix("commitment_"): n for name, n in values.items()}


def document(config: Config, config_path: str, stats: Stats, daemon: dict[str, Any],
             live: bool) -> dict[str, Any]:
    """The whole status; `daemon` is the master's part ({"running": False} offline)."""
    counters = stats.to_dict()
    counters["stored"] = stats.stored
    counters["failed"] = stats.failed
    return {
        "version": __version__,
        "config_file": config_path,
        "daemon": daemon,
        "counters": counters,
        "jobs": job_counts(config, live),
        "storage_commitment": commitment_counts(config, live),
        "disk": disk(config),
    }


def offline(config: Config, config_path: str) -> dict[str, Any]:
    """The status from disk alone: no daemon answered."""
    return document(config, config_path, Stats.load(stats_path(config)), {"running": False},
                    live=False)


# -- text -----------------------------------------------------------------------------------
def when(wall: float) -> str:
    if not wall:
        return "never"
    return datetime.fromtimestamp(wall).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def status_name(code: str) -> str:
    from dicom_ingestd.codes import status_name as name

    try:
        return str(name(int(code, 16)))
    except ValueError:
        return code


def commit_quantile(commit: dict[str, Any], q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile of the commit latency."""
    counts = commit["counts"]
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for bound, count in zip([*COMMIT_BUCKETS, float("inf")], counts, strict=True):
        seen += count
        if seen >= q * total:
            return bound
    return float("inf")


def render(doc: dict[str, Any]) -> str:
    """The status as lines of text (values from the network, such as calling AE titles,
    with their control characters escaped: they reach a terminal)."""
    return "".join(escape_controls(line) + "\n" for line in _render(doc).splitlines())


def _render(doc: dict[str, Any]) -> str:
    lines = []
    d = doc["daemon"]
    if d.get("running"):
        state = "stopping" if d.get("state") == "stopping" else "running"
        lines.append(f"dicom-ingestd {doc['version']}: {state}, pid {d['pid']}, up "
                     f"{duration(d['uptime_seconds'])} (since {when(d['started'])})")
    else:
        lines.append(f"dicom-ingestd {doc['version']}: not running (socket activation starts "
                     "it on the next connection); figures saved on disk")
    lines.append(f"configuration: {doc['config_file']}")
    reload = d.get("last_reload")
    if reload:
        text = f"last reload: {when(reload['time'])} ({reload['source']}), {reload['outcome']}"
        if reload["problems"]:
            text += ": " + escape_controls("; ".join(reload["problems"]))
        lines.append(text)
    c = doc["counters"]
    lines.append(f"counting since {when(c['since'])}")
    by_outcome: dict[str, int] = {}
    by_ae: dict[str, dict[str, int]] = {}
    for row in c["associations"]:
        by_outcome[row["outcome"]] = by_outcome.get(row["outcome"], 0) + row["count"]
        by_ae.setdefault(escape_controls(row["calling_ae"]), {})[row["outcome"]] = row["count"]
    active = f"{d['active_associations']} active; " if d.get("running") else ""
    lines.append("associations: " + active + (", ".join(
        f"{n} {o}" for o, n in sorted(by_outcome.items())) or "none yet"))
    for ae, outcomes in sorted(by_ae.items()):
        lines.append(f"  {ae}: " + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())))
    failures = [(code, n) for code, n in c["objects"].items() if code != "0x0000"]
    lines.append(f"objects: {c['stored']} stored ({size(c['bytes_stored'])}), "
                 f"{sum(n for _, n in failures)} not stored")
    for code, n in failures:
        kind = status_class(int(code, 16))
        lines.append(f"  {code} {status_name(code)} ({kind}): {n}")
    commit = c["commit_seconds"]
    median, p99 = commit_quantile(commit, 0.5), commit_quantile(commit, 0.99)
    if median is not None and p99 is not None:
        lines.append(f"  fsync/commit: median <= {median * 1000:g} ms, 99 % <= "
                     f"{p99 * 1000:g} ms ({sum(commit['counts'])} objects)")
    lines.append(f"last successful store: {when(c['last_success'])}")
    error = c["last_error"]
    lines.append(f"last error: {when(error['time'])}: {escape_controls(error['text'])}"
                 if error["text"]
                 else "last error: none")
    jobs = doc["jobs"]
    if jobs is None:
        lines.append("jobs: none (no job database)")
    else:
        lines.append("jobs: " + ", ".join(f"{jobs.get(s, 0)} {s}" for s in JOB_STATES)
                     + (f" (error: {jobs['error']})" if "error" in jobs else ""))
    commitment = doc.get("storage_commitment")
    if commitment is not None:
        lines.append(f"storage commitment: {commitment['requests']} request(s), "
                     f"{commitment['objects_committed']} object(s) committed, "
                     f"{commitment['objects_failed']} failed; reports: "
                     f"{commitment['reports_delivered']} delivered, "
                     f"{commitment['delivery_attempts_failed']} failed attempt(s), "
                     f"{commitment['reports_dead']} dead")
    disk_ = doc["disk"]
    for name in ("output", "state"):
        entry = disk_.get(name)
        if entry is None:
            continue
        if "error" in entry:
            lines.append(f"free space ({name}, {entry['path']}): unknown: {entry['error']}")
            continue
        text = f"free space ({name}, {entry['path']}): {size(entry['free_bytes'])} of " \
               f"{size(entry['total_bytes'])}"
        if name in disk_["low"]:
            text += f": LOW, below {size(disk_['warning_below'])}"
            if disk_["refusing_below"]:
                text += f"; objects refused below {size(disk_['refusing_below'])}"
        lines.append(text)
    return "\n".join(lines) + "\n"
