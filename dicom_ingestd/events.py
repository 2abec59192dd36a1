"""Event commands: storescp's placeholders, the argv or quoted shell form, DICOM_* variables.

Pure functions (stdlib and the config schema only).  The master calls them when it turns a
stored object or a complete study into a job; nothing here runs a process.

storescp (3.6.7, storescp.cc executeOnReception/executeOnEndOfStudy) pastes the raw values of
#p, #f, #a, #c and #r into one string, one placeholder after the other (so a value containing
"#a" is substituted again), and hands the result to /bin/sh -c.  Here:

* substitution is a single pass over the command as written: a value is never rescanned;
* without `events.shell` each argv element is substituted on its own, so a value is always
  (part of) exactly one argument and no shell ever sees it;
* with `events.shell` the first element is a shell command line in which every value is
  inserted single-quoted (shlex.quote), so a value is always one shell word, whatever it
  contains; the other elements become the shell's $0, $1, ... and are substituted raw;
* NUL cannot be passed to execve: it is dropped from values;
* a placeholder the event does not define (#f at end of study) stays as written, as in storescp.
"""

import re
import shlex
from collections.abc import Mapping, Sequence

from dicom_ingestd.config.schema import EventsConfig

SHELL = "/bin/sh"
PLACEHOLDER = re.compile(r"#[pfacr]")
# One environment string may not exceed MAX_ARG_STRLEN (128 KiB) on Linux; DICOM_FILES is
# left out above this size (DICOM_MANIFEST always lists every file).
MAX_FILES_VARIABLE = 64 * 1024


def placeholder_values(directory: str, calling_ae: str, called_ae: str, peer_host: str,
                       filename: str | None = None) -> dict[str, str]:
    """The placeholder table of one event: #p, #a, #c, #r and, for reception, #f."""
    values = {"#p": directory, "#a": calling_ae, "#c": called_ae, "#r": peer_host}
    if filename is not None:
        values["#f"] = filename
    return values


def _clean(value: str) -> str:
    return value.replace("\0", "")


def substitute(text: str, values: Mapping[str, str], *, quote: bool = False) -> str:
    """`text` with every placeholder in `values` replaced, in one pass (never rescanned).

    With `quote`, each value is inserted as one single-quoted shell word (shlex.quote).
    """
    def replace(match: re.Match[str]) -> str:
        value = values.get(match.group())
        if value is None:
            return match.group()
        value = _clean(value)
        return shlex.quote(value) if quote else value

    return PLACEHOLDER.sub(replace, text)


def build_argv(command: Sequence[str], values: Mapping[str, str], *, shell: bool) -> list[str]:
    """The argument vector to execute for `command` (non-empty) as configured.

    Without `shell`: each element substituted on its own.  With `shell`:
    ``[/bin/sh, -c, <first element, values quoted>, <other elements, substituted>...]``.
    Raises ValueError for an empty command.
    """
    if not command:
        raise ValueError("empty command")
    if shell:
        return [SHELL, "-c", substitute(command[0], values, quote=True),
                *(substitute(arg, values) for arg in command[1:])]
    return [substitute(arg, values) for arg in command]


def peer_host(peer: str) -> str:
    """The address part of a 'host:port' or '[v6]:port' peer name (storescp's #r)."""
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def environment(values: Mapping[str, object]) -> dict[str, str]:
    """DICOM_* variables from `values` (None and NUL dropped, everything else as str)."""
    return {key: _clean(str(value)) for key, value in values.items() if value is not None}


def files_variable(paths: Sequence[str]) -> str | None:
    """DICOM_FILES: the paths one per line, or None when too long for one variable."""
    text = "\n".join(_clean(p) for p in paths)
    return text if len(text.encode("utf-8", "surrogateescape")) <= MAX_FILES_VARIABLE else None


def tracking_enabled(events: EventsConfig) -> bool:
    """Whether studies are tracked: something happens at end of study."""
    return bool(events.exec_on_eostudy or events.rename_on_eostudy)


def events_enabled(events: EventsConfig) -> bool:
    """Whether any event is configured (the job queue is needed)."""
    return bool(events.exec_on_reception) or tracking_enabled(events)


def sync_enabled(events: EventsConfig) -> bool:
    """Whether associations wait for their jobs (events.exec_sync with a command)."""
    return events.exec_sync and bool(events.exec_on_reception or events.exec_on_eostudy)
