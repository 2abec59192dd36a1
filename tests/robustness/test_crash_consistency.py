"""Crash consistency: SIGKILL at random instants while objects are being sent.

A raw Upper Layer sender (transfer.py) sends objects over short associations and records
every object answered with success.  At a random instant one of three things is killed with
SIGKILL:
  worker  one association worker (the master goes on serving);
  master  the master alone (its workers are orphans that finish their association);
  all     the master and every worker at once.
After a master kill the daemon is started again on the same output directory.  Then, for
every instant: each acknowledged object is on disk, bit-exact; every file in the output tree
is a complete object that was sent (no partial file is ever visible); once the orphans are
gone the staging directory holds no temporary file.  The normal run kills at 3 instants (one
of each kind), `--run-slow` at 120.
"""

import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import harness
import pytest
from support.daemon import Daemon, start_daemon
from support.procs import alive
from support.wait import wait_until
from transfer import Sender, check_tree, restart


def kill_worker(daemon: Daemon, ignore: set[int], rng: random.Random) -> bool:
    """SIGKILL a worker in the middle of its association; False when none was caught (a
    worker can finish between being listed and killed: a few tries)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        workers = sorted(harness.children(daemon.proc.pid) - ignore)
        if not workers:
            time.sleep(0.005)  # between two associations: the next one starts in a moment
            continue
        victim = rng.choice(workers)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        # The master reaps every worker and says how it ended: only its line proves the
        # kill struck a running worker, not one that had just finished.
        line = f"worker {victim} killed by SIGKILL"
        with contextlib.suppress(AssertionError):
            return wait_until(lambda line=line: line in daemon.log(), 3, line)
    return False


def kill_one(daemon: Daemon, mode: str, ignore: set[int], rng: random.Random) \
        -> tuple[bool, list[int]]:
    """SIGKILL per `mode`; return whether it killed what `mode` names (a running worker, or
    the master) and the workers left orphaned (mode "master")."""
    if mode == "worker":
        return kill_worker(daemon, ignore, rng), []
    master = daemon.proc.pid
    workers = sorted(harness.children(master) - ignore)
    daemon.proc.kill()
    daemon.proc.wait(10)
    killed = daemon.proc.returncode == -signal.SIGKILL
    if mode == "all":
        for pid in workers + sorted(harness.children(master) - ignore):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return killed, []
    return killed, workers


def run_instants(tmp_path: Path, count: int, seed: int,
                 modes: list[str] | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    settings: dict[str, dict[str, Any]] = {"logging": {"level": "info"},
                                           "network": {"dimse_timeout": 10}}
    daemon = start_daemon(tmp_path, settings, name="crash")
    out = daemon.out
    settings["storage"] = {"output_directory": str(out)}
    settings["network"]["port"] = daemon.port
    ignore = harness.children(daemon.proc.pid)  # the configuration watcher
    sent: dict[str, bytes] = {}
    acked: set[str] = set()
    figures = {"worker": 0, "master": 0, "all": 0, "missed": 0, "sent": 0, "acked": 0,
               "restarts": 0}
    orphans: list[int] = []
    started = time.monotonic()
    try:
        for instant in range(count):
            mode = modes[instant] if modes else rng.choice(["worker", "worker", "master", "all"])
            sender = Sender(daemon.port, seed * 1000 + instant)
            sender.start()
            time.sleep(rng.uniform(0.02, 0.8))
            killed, orphaned = kill_one(daemon, mode, ignore, rng)
            orphans += orphaned
            figures[mode] += killed
            figures["missed"] += not killed
            if mode != "worker":
                # A new master at once, as systemd would (Restart=on-failure); in "master"
                # mode the orphans may still be finishing their association meanwhile.
                daemon = restart(tmp_path, settings, f"crash-{instant}")
                ignore = harness.children(daemon.proc.pid)
                figures["restarts"] += 1
            sender.stop.set()
            sender.join(60)
            assert not sender.is_alive(), "sender hung"
            sent.update(sender.sent)
            acked |= sender.acked
            orphans = [pid for pid in orphans if alive(pid)]
            check_tree(daemon, sent, acked)
            if mode == "worker" and not orphans:
                # The master removes a killed worker's temporary file itself, no restart.
                wait_until(lambda d=daemon: d.staging() == [], 10,
                           lambda d=daemon: f"an empty staging area: {d.staging()}")
        # The end: orphans finish, the last daemon stops; a fresh start cleans up.
        wait_until(lambda: not any(alive(pid) for pid in orphans), 30,
                   f"the orphaned workers {orphans} ended")
        daemon.stop()
        daemon = restart(tmp_path, settings, f"crash-{count}")
        assert daemon.staging() == [], f"temporary files after restart: {daemon.staging()}"
        figures["files"] = check_tree(daemon, sent, acked)
        assert daemon.proc.poll() is None
        bugs = harness.bug_lines(daemon.log())
        assert not bugs, bugs[:5]
    finally:
        daemon.stop()
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    figures["sent"], figures["acked"] = len(sent), len(acked)
    figures["seconds"] = round(time.monotonic() - started)
    print(f"crash consistency: {figures}", file=sys.stderr)
    return figures


def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    figures = run_instants(tmp_path, 3, seed=9, modes=["worker", "master", "all"])
    assert (figures["worker"], figures["master"], figures["all"]) == (1, 1, 1), figures
    assert figures["acked"] > 0


@pytest.mark.slow
def test_sigkill_at_120_random_instants(tmp_path: Path) -> None:
    figures = run_instants(tmp_path, 120, seed=90)
    # A worker kill can miss (no association running at that instant); the rest must not.
    assert figures["worker"] + figures["master"] + figures["all"] + figures["missed"] == 120
    assert figures["missed"] < 12, figures
    assert figures["acked"] > 100
