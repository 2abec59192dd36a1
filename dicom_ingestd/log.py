"""Logging for an operator: one event per line on stderr, journal-aware.

Under systemd (stderr is the journal, `JOURNAL_STREAM` matches it) each line is prefixed with
its syslog priority as `<N>` so journald files it at the right level, and the timestamp is
left to the journal.  Elsewhere lines carry a timestamp, level and pid.
"""

import logging
import os
import sys

from dicom_ingestd.config.schema import LoggingConfig
from dicom_ingestd.systemd import JOURNAL_SOCKET, JournalHandler

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LEVELS = {
    "fatal": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING,
    "info": logging.INFO, "debug": logging.DEBUG, "trace": TRACE,
}

_SYSLOG = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal (JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        dev, inode = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


class JournalFormatter(logging.Formatter):
    """`<N>[pid] message`: journald reads the priority, adds the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG.get(record.levelno, 7)
        text = super().format(record).replace("\n", "\n" + f"<{priority}>")
        return f"<{priority}>{text}"


def setup(config: LoggingConfig) -> None:
    """(Re)configure the root logger from the [logging] table."""
    journal = stderr_is_journal()
    use_prefix = config.journal_prefix == "always" or (
        config.journal_prefix == "auto" and journal)
    stream = logging.StreamHandler(sys.stderr)
    if use_prefix:
        stream.setFormatter(JournalFormatter("[%(process)d] %(message)s"))
    else:
        stream.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s [%(process)d] %(message)s"))
    handler: logging.Handler = stream
    if journal and config.journal_prefix != "never" and os.path.exists(JOURNAL_SOCKET):
        # Native protocol: the same lines plus DICOM_* fields to filter on.
        handler = JournalHandler("dicom-ingestd", fallback=stream)
        # journald records each sender's pid itself (_PID, shown as dicom-ingestd[PID]).
        handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[config.level])
    # pydicom warns about every odd element of every peer's data; that is not our log.
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, LEVELS[config.level]))
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, LEVELS[config.level]))
    # watchdog logs every inotify event at debug: a log file next to the config would feed it.
    logging.getLogger("watchdog").setLevel(logging.WARNING)
