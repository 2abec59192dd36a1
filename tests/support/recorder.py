"""A command for [events] and jobs that writes down how the daemon ran it."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.wait import wait_until

RECORDER_SOURCE = '''\
import json, os, sys
record = {"argv": sys.argv[2:], "pid": os.getpid(),
          "env": {k: v for k, v in os.environ.items() if k.startswith("DICOM_")}}
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (json.dumps(record) + "\\n").encode())
os.close(fd)
'''


def complete_lines(path: Path) -> list[str]:
    """The lines of a file other processes append to, without a last one still being
    written (a reader can see part of an append: only a newline ends a line)."""
    return path.read_text().split("\n")[:-1]


@dataclass
class Recorder:
    """A command that appends its arguments and DICOM_* variables to a JSON-lines file."""

    script: Path
    path: Path

    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(self.script), str(self.path), *args]

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in complete_lines(self.path) if line]

    def wait(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        def enough() -> tuple[list[dict[str, Any]]] | None:
            records = self.records()
            return (records,) if len(records) >= count else None  # a tuple: [] may be enough
        return wait_until(enough, timeout,
                          lambda: f"{count} record(s) expected, got {self.records()}")[0]
