"""Logging for an operator: one event per line on stderr, journal-aware.

Under systemd (stderr is the journal, `JOURNAL_STREAM` matches it) each line is prefixed with
its syslog priority as `<N>` so journald files it at the right level, and the timestamp is
left to the journal.  Elsewhere lines carry a timestamp, level and pid.
"""

import logging
import os
import re
import sys
import warnings

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


def to_stderr(line: str, level: int = logging.ERROR) -> None:
    """`line` on stderr for an operator, from a command or before logging is set up (a
    message, not a log record: no time, no pid).  Under systemd it carries its syslog
    priority: `journalctl -p err` is where an operator looks for why the service exited 78."""
    prefix = f"<{_SYSLOG.get(level, 7)}>" if stderr_is_journal() else ""
    print(prefix + line, file=sys.stderr)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Control characters as \\xNN: a value from the network (a UID or patient name with a
    newline, an escape sequence) can neither start a forged log line nor drive a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class EscapingFormatter(logging.Formatter):
    """One event per line: the message's control characters are escaped (tracebacks, which
    are ours, keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JournalFormatter(EscapingFormatter):
    """`<N>[pid] message`: journald reads the priority, adds the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG.get(record.levelno, 7)
        text = super().format(record).replace("\n", "\n" + f"<{priority}>")
        return f"<{priority}>{text}"


class _QuietLibraries(logging.Filter):
    """Drop pydicom's and pynetdicom's complaints about a peer's data: pydicom warns about
    every odd element, and pynetdicom logs a traceback for every undecodable A-ASSOCIATE-RQ,
    while the session logs the outcome of both in one line.  A filter on our handler, because
    a level on their loggers does not stick: importing pydicom (after this setup) resets it.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.level <= TRACE:
            return True
        if record.name.startswith("pynetdicom"):
            return record.levelno >= logging.CRITICAL
        if record.name.startswith("pydicom"):
            return record.levelno >= logging.ERROR
        return True


def setup(config: LoggingConfig) -> None:
    """(Re)configure the root logger from the [logging] table."""
    journal = stderr_is_journal()
    use_prefix = config.journal_prefix == "always" or (
        config.journal_prefix == "auto" and journal)
    stream = logging.StreamHandler(sys.stderr)
    if use_prefix:
        stream.setFormatter(JournalFormatter("[%(process)d] %(message)s"))
    else:
        stream.setFormatter(EscapingFormatter(
            "%(asctime)s %(levelname)s [%(process)d] %(message)s"))
    handler: logging.Handler = stream
    if journal and config.journal_prefix != "never" and os.path.exists(JOURNAL_SOCKET):
        # Native protocol: the same lines plus DICOM_* fields to filter on.
        handler = JournalHandler("dicom-ingestd", fallback=stream)
        # journald records each sender's pid itself (_PID, shown as dicom-ingestd[PID]).
        handler.setFormatter(EscapingFormatter("%(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.addFilter(_QuietLibraries(LEVELS[config.level]))
    root.addHandler(handler)
    root.setLevel(LEVELS[config.level])
    # Levels too, so that they do not even format what the filter would drop.
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, LEVELS[config.level]))
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, LEVELS[config.level]))
    # pydicom also passes those warnings to `warnings`, which would print them (two lines
    # each, with a source path) on stderr, i.e. in the journal.
    warnings.filterwarnings("ignore", module="pydicom")
    # watchdog logs every inotify event at debug: a log file next to the config would feed it.
    logging.getLogger("watchdog").setLevel(logging.WARNING)
