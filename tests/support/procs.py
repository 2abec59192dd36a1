"""The daemon's processes as /proc shows them (never as the daemon reports them)."""

import contextlib
import os
from pathlib import Path

# warm.py's process names: a worker waiting for a connection, and one serving an association.
IDLE_WORKER = "ingestd-idle"
BUSY_WORKER = "ingestd-assoc"


def child_pids(pid: int) -> set[int]:
    """The pids of pid's children (zombies included until reaped)."""
    result: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                result.update(int(x) for x in text.split())
    return result


def process_name(pid: int) -> str:
    """/proc/PID/comm, "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def workers_of(master: int, name: str) -> set[int]:
    """The master's worker processes named `name` (IDLE_WORKER or BUSY_WORKER)."""
    return {pid for pid in child_pids(master) if process_name(pid) == name}


def helpers_of(master: int) -> set[int]:
    """The master's children that are not idle workers: the configuration watcher, job
    processes and workers serving (or just done with) an association."""
    return {pid for pid in child_pids(master) if process_name(pid) != IDLE_WORKER}


def descendants(pid: int) -> dict[int, str]:
    """Live (non-zombie) descendants of `pid`, with their names."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
            fields = tail.split()
        except (OSError, IndexError, ValueError):
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(
                (int(stat.parent.name), head.split("(", 1)[-1]))
    found: dict[int, str] = {}
    queue = [pid]
    while queue:
        for child, name in parents.get(queue.pop(), []):
            found[child] = name
            queue.append(child)
    return found
