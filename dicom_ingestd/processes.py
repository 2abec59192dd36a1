"""What the master, the job runner and the store know about other processes, declared once:
how long a process has between SIGTERM and SIGKILL, how its end reads in a log line, and its
start time, which together with its pid names one process across pid reuse.

A leaf: standard library only, no state.
"""

import os
import signal
from typing import Final

KILL_GRACE: Final = 5.0
"""Seconds between SIGTERM and SIGKILL, for workers at the stop deadline and for jobs."""


def start_ticks(pid: int) -> str:
    """The start time of process `pid` as /proc/PID/stat says it (field 22, clock ticks since
    boot), or '' when there is no such process.  Compare it, never compute with it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and ')': the fields start after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else ""


def started_at(pid: int) -> float | None:
    """The wall-clock start time of process `pid`; None when it does not exist or is a zombie
    (it will write nothing more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return None
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal other than SIGRTMIN/SIGRTMAX has no name
        return f"signal {number}"


def describe_exit(status: int) -> str:
    """A wait status (os.waitpid) as a log line says it: 'killed by SIGKILL (core dumped)',
    'exit status 3'."""
    if os.WIFSIGNALED(status):
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by {_signal_name(os.WTERMSIG(status))}{core}"
    return f"exit status {os.WEXITSTATUS(status)}"


def describe_returncode(returncode: int) -> str:
    """subprocess's returncode (negative: killed by that signal) as `describe_exit` says it."""
    # The wait status the returncode was made from (less the core-dump bit it drops).
    return describe_exit(-returncode if returncode < 0 else returncode << 8)
