"""dicom_ingestd.processes: one reading of /proc/PID/stat and of exit statuses, on real
processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dicom_ingestd.processes import describe_exit, describe_returncode, start_ticks, started_at


def test_exit_statuses_read_alike_from_waitpid_and_from_subprocess() -> None:
    cases = [("import sys; sys.exit(3)", "exit status 3"),
             ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "killed by SIGTERM"),
             ("import os, signal; os.kill(os.getpid(), signal.SIGRTMIN + 2)",
              f"killed by signal {int(signal.SIGRTMIN) + 2}"),
             ("pass", "exit status 0")]
    for code, said in cases:
        popen = subprocess.Popen([sys.executable, "-c", code])
        _, status = os.waitpid(popen.pid, 0)
        assert describe_exit(status) == said
        returncode = os.waitstatus_to_exitcode(status)
        assert describe_returncode(returncode) == said


def test_a_core_dump_is_said(tmp_path: Path) -> None:
    # SIG_DFL first: a disposition inherited as ignored (from whatever started the suite)
    # would make the kill a no-op; the core, if any, lands in tmp_path.
    popen = subprocess.Popen([sys.executable, "-c",
                              "import os, resource, signal\n"
                              "resource.setrlimit(resource.RLIMIT_CORE, (1 << 30, 1 << 30))\n"
                              "signal.signal(signal.SIGQUIT, signal.SIG_DFL)\n"
                              "os.kill(os.getpid(), signal.SIGQUIT)"], cwd=tmp_path)
    _, status = os.waitpid(popen.pid, 0)
    said = describe_exit(status)
    assert said.startswith("killed by SIGQUIT")
    assert said.endswith(" (core dumped)") == os.WCOREDUMP(status)


def test_start_time_names_a_process_until_it_is_reaped() -> None:
    popen = subprocess.Popen(["sleep", "30"])
    try:
        ticks = start_ticks(popen.pid)
        assert _just_started(popen.pid) and ticks == start_ticks(popen.pid)
        popen.kill()
        while _state(popen.pid) not in ("Z", ""):
            time.sleep(0.01)
        assert started_at(popen.pid) is None  # a zombie writes nothing more
        assert start_ticks(popen.pid) == ticks  # but is still the same process
    finally:
        popen.kill()
        popen.wait()
    assert start_ticks(popen.pid) == "" and started_at(popen.pid) is None


def test_a_command_name_with_spaces_and_parentheses_is_skipped() -> None:
    popen = subprocess.Popen([sys.executable, "-c",
                              "import ctypes, time\n"
                              "ctypes.CDLL(None).prctl(15, b'a) b (c', 0, 0, 0)\n"  # PR_SET_NAME
                              "time.sleep(30)"])
    try:
        while "a) b" not in _comm(popen.pid):
            time.sleep(0.01)
        assert _just_started(popen.pid)
    finally:
        popen.kill()
        popen.wait()


def _just_started(pid: int) -> bool:
    """Both readings place the process's start within the last minute (a misread field does
    not)."""
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    ticks = start_ticks(pid)
    wall = started_at(pid)
    return (ticks.isdigit() and 0 <= uptime - int(ticks) / os.sysconf("SC_CLK_TCK") < 60
            and wall is not None and 0 <= time.time() - wall < 60)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read()
    except OSError:
        return ""
