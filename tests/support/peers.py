"""DCMTK's command-line tools as peers, and DCMTK `storescp` as the reference receiver.

A missing tool fails the test, never skips it (the test command installs them).
"""

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from support.daemon import Daemon, free_port


def require_tool(name: str) -> str:
    """The path of a peer tool; fail (never skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run the README's test command, which installs it")
    return path


def run_tool(args: list[str], *, timeout: float = 60.0, nodelay: bool = True,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool; TCP_NODELAY=1 as our benchmarks do unless `nodelay` is False."""
    require_tool(args[0])
    env = dict(os.environ)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def storescu(port: int, *files: Path | str, extra: list[str] | None = None,
             check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_tool(["storescu", *(extra or []), "127.0.0.1", str(port),
                     *map(str, files)], check=check, **kw)


def echoscu(port: int, extra: list[str] | None = None, check: bool = True,
            **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_tool(["echoscu", *(extra or []), "127.0.0.1", str(port)], check=check, **kw)


def assert_serving(daemon: Daemon) -> None:
    """The daemon is alive and answers C-ECHO."""
    assert daemon.proc.poll() is None, f"daemon exited:\n{daemon.log()}"
    result = echoscu(daemon.port, check=False, timeout=30)
    assert result.returncode == 0, f"echoscu failed:\n{result.stderr}\n{daemon.log()}"


def listening(port: int) -> bool:
    """True once a socket listens on ``port`` (read from /proc, so storescp sees no probe)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@contextlib.contextmanager
def storescp(options: Sequence[str], outdir: Path) -> Iterator[int]:
    """Run a real storescp with ``options`` on a free port; always terminated on exit.

    storescp 3.6.7 has no bind-address option, so it listens on every interface for the
    test's short life; every connection the tests make goes to 127.0.0.1.  STORESCP is
    storescp's own default AE title, said here so that no test depends on the default.
    """
    require_tool("storescp")
    outdir.mkdir(parents=True, exist_ok=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):  # a free port can be taken between probe and bind: retry
            port = free_port()
            proc = subprocess.Popen(
                ["storescp", *options, "-od", str(outdir), "--aetitle", "STORESCP", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and proc.poll() is None and not listening(port):
                time.sleep(0.01)
            if proc.poll() is None and listening(port):
                yield port
                return
            proc.kill()
            proc.wait()
        pytest.fail(f"storescp {' '.join(options)} did not start")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
