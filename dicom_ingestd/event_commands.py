"""Event commands: storescp's placeholders, the argv or shell form, DICOM_* variables.

Pure functions (stdlib and the config schema only).  The master calls them when it turns a
stored object or a complete study into a job; nothing here runs a process.

storescp (3.6.7, storescp.cc executeOnReception/executeOnEndOfStudy) pastes the raw values of
#p, #f, #a, #c and #r into one string, one placeholder after the other (so a value containing
"#a" is substituted again), and hands the result to /bin/sh -c: an AE title such as
``A;reboot`` runs a command.  Here:

* substitution is a single pass over the command as written: a value is never rescanned;
* without `events.shell`, each argv element is substituted on its own, so a value is always
  (part of) exactly one argument and no shell ever sees it;
* with `events.shell`, the first element is a shell command line, and the values never enter
  its text: each placeholder becomes a quoted reference to the job's environment variable
  holding the value (#p -> "${DICOM_OUTPUT_DIR}", #f -> "${DICOM_FILENAME}", #a ->
  "${DICOM_CALLING_AE}", #c -> "${DICOM_CALLED_AE}", #r -> "${DICOM_PEER}"), quoted to suit
  where it stands (bare, inside "...", inside '...').  The shell expands a reference to the
  value as one word and never parses the value as shell code, whatever it contains and even
  inside backquotes or $(...), where pasting a quoted literal (shlex.quote) is re-parsed and
  can be escaped.  The other elements become the shell's $0, $1, ... and are substituted raw;
* NUL cannot be passed to execve: it is dropped from values;
* a placeholder the event does not define (#f at end of study) stays as written, as in storescp.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

from dicom_ingestd.config.schema import EventsConfig

SHELL = "/bin/sh"
PLACEHOLDER = re.compile(r"#[pfacr]")
# The environment variable holding each placeholder's value (shell form references it).
VARIABLES = {"#p": "DICOM_OUTPUT_DIR", "#f": "DICOM_FILENAME", "#a": "DICOM_CALLING_AE",
             "#c": "DICOM_CALLED_AE", "#r": "DICOM_PEER"}
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


def substitute(text: str, values: Mapping[str, str]) -> str:
    """`text` with every placeholder in `values` replaced by its value, in one pass."""
    def replace(match: re.Match[str]) -> str:
        value = values.get(match.group())
        return match.group() if value is None else _clean(value)

    return PLACEHOLDER.sub(replace, text)


def shell_references(line: str, values: Mapping[str, str]) -> str:
    """A shell command line with each placeholder in `values` replaced by a quoted reference
    to its variable (VARIABLES), quoted for the context it stands in.

    The context follows POSIX sh quoting: '...', "...", backslash escapes, and the nesting of
    $(...) and `...` (each starts a new quoting level).  Should the scan misjudge an exotic
    construct, the reference may end up unquoted (the value is then split into words) or
    single-quoted (it stays literal); the shell never parses a value as code either way.
    """
    out: list[str] = []
    frames: list[list[Any]] = [["", "top", 0]]  # [quote state, kind, parenthesis depth]
    index = 0
    while index < len(line):
        frame = frames[-1]
        state, kind = frame[0], frame[1]
        char = line[index]
        match = PLACEHOLDER.match(line, index)
        if match and match.group() in values:
            reference = "${" + VARIABLES[match.group()] + "}"
            if state == '"':
                out.append(reference)
            elif state == "'":
                out.append(f"'\"{reference}\"'")
            else:
                out.append(f'"{reference}"')
            index = match.end()
            continue
        step = 1
        if state == "'":
            if char == "'":
                frame[0] = ""
        elif char == "\\":
            step = 2  # an escaped character is never a placeholder, nor a quote
        elif line.startswith("$(", index):
            frames.append(["", "$(", 0])
            step = 2
        elif char == "`":
            if kind == "`":
                frames.pop()
            else:
                frames.append(["", "`", 0])
        elif state == '"':
            if char == '"':
                frame[0] = ""
        elif char in "'\"":
            frame[0] = char
        elif kind == "$(" and char == "(":
            frame[2] += 1
        elif kind == "$(" and char == ")":
            if frame[2]:
                frame[2] -= 1
            else:
                frames.pop()
        out.append(line[index:index + step])
        index += step
    return "".join(out)


def build_argv(command: Sequence[str], values: Mapping[str, str], *, shell: bool) -> list[str]:
    """The argument vector to execute for `command` (non-empty) as configured.

    Without `shell`: each element substituted on its own.  With `shell`:
    ``[/bin/sh, -c, <first element, placeholders as references>, <other elements,
    substituted>...]``; the job's environment must then hold `environment_for(values)`.
    Raises ValueError for an empty command.
    """
    if not command:
        raise ValueError("empty command")
    if shell:
        return [SHELL, "-c", shell_references(command[0], values),
                *(substitute(arg, values) for arg in command[1:])]
    return [substitute(arg, values) for arg in command]


def environment_for(values: Mapping[str, str]) -> dict[str, str]:
    """The variables that carry the placeholders' values (DICOM_OUTPUT_DIR for #p, ...)."""
    return {VARIABLES[key]: _clean(value) for key, value in values.items()}


def peer_host(peer: str) -> str:
    """The address part of a 'host:port' or '[v6]:port' peer name (storescp's #r)."""
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def environment(values: Mapping[str, object]) -> dict[str, str]:
    """DICOM_* variables from `values` (None and NUL dropped, everything else as str).

    A value longer than MAX_FILES_VARIABLE (64 KiB) is left out: one variable may not exceed
    128 KiB, or the job could never start (E2BIG); the object itself, and at end of study the
    manifest, hold every value."""
    found = {key: _clean(str(value)) for key, value in values.items() if value is not None}
    return {key: value for key, value in found.items()
            if len(value.encode("utf-8", "surrogateescape")) <= MAX_FILES_VARIABLE}


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
