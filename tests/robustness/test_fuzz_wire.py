"""Fuzzing the running daemon over loopback: fuzzgen's malformed inputs, a few threads, a
bounded rate, short daemon timeouts (harness.FUZZ_SETTINGS).

After a campaign: the master is alive and still serves C-ECHO and C-STORE; every worker
ended within the timeouts plus a margin (sampled from /proc while the campaign runs); the
master's open descriptors are back to their baseline and its RSS is within a small margin of
it; the log holds no internal error, traceback or worker death; nothing is left in the
staging area and nothing was created outside the output directory.

The normal run sends a seeded sample (FAST inputs); `--run-slow` sends SLOW (100,000) with
another seed and checks the resources at every tenth as well (a leak shows as a trend).
"""

import sys
import time
from pathlib import Path
from typing import Any

import harness
import pytest
from support.daemon import Daemon
from support.data import testdata as bundled
from support.peers import echoscu, storescu

SEED = 9
FAST = 2000
SLOW = 100_000
RSS_MARGIN_KIB = 8 * 1024  # allocator slack; a per-input leak of even 100 bytes exceeds it


def campaign(daemon: Daemon, seed: int, count: int, checkpoints: int = 1) -> harness.Campaign:
    pid = daemon.proc.pid
    result = harness.Campaign(seed)
    idle = harness.Resources.of(pid)  # its only child is the configuration watcher
    # Warm up (first fork, lazy imports, log buffers), then take the baseline.
    harness.Driver(daemon.port, harness.Campaign(seed + 1)).run(0, 200)
    baseline = harness.settle(pid, idle)
    assert baseline.children <= idle.children and baseline.fds == idle.fds, (idle, baseline)
    ignore = idle.children
    watch = harness.WorkerWatch(pid, ignore)
    driver = harness.Driver(daemon.port, result)
    samples = []
    try:
        step = count // checkpoints
        for part in range(checkpoints):
            driver.run(part * step, count if part == checkpoints - 1 else (part + 1) * step)
            assert daemon.proc.poll() is None, f"the master died:\n{daemon.log()[-5000:]}"
            now = harness.settle(pid, baseline)
            samples.append((result.total, now.fds, now.rss_kib))
            print(f"after {result.total}: {now.fds} fds, {now.rss_kib} KiB, "
                  f"{len(now.children - ignore)} workers", file=sys.stderr)
    finally:
        watch.stop()
    log = daemon.log()
    report = "\n".join(str(a) for a in result.anomalies[:20])
    print(result.summary(), file=sys.stderr)
    print(f"workers seen {watch.seen}, longest-lived {watch.longest:.1f} s; baseline "
          f"{baseline.fds} fds {baseline.rss_kib} KiB; samples {samples}", file=sys.stderr)
    assert not result.anomalies, f"{result.summary()}\n{report}"
    bugs = harness.bug_lines(log)
    assert not bugs, "\n".join(bugs[:20]) + "\n" + _inputs_for(bugs, result)
    assert watch.longest < harness.HANG, f"a worker lived {watch.longest:.1f} s"
    final = harness.settle(pid, baseline)
    assert final.children <= baseline.children, f"workers still running: {final.children}"
    assert final.fds == baseline.fds, f"master fds {baseline.fds} -> {final.fds}"
    assert final.rss_kib <= baseline.rss_kib + RSS_MARGIN_KIB, \
        f"master RSS {baseline.rss_kib} -> {final.rss_kib} KiB"
    assert daemon.staging() == [], daemon.staging()
    return result


def _inputs_for(bugs: list[str], result: harness.Campaign) -> str:
    """The inputs whose connections the bug lines name (by the peer's port)."""
    import re
    lines = []
    for bug in bugs[:10]:
        match = re.search(r"127\.0\.0\.1:(\d+)", bug)
        if match and int(match.group(1)) in result.ports:
            lines.append(f"{bug[:120]} <- input {result.ports[int(match.group(1))]} of seed "
                         f"{result.seed}")
    return "\n".join(lines)


def still_serving(daemon: Daemon) -> None:
    assert daemon.proc.poll() is None
    echoscu(daemon.port, timeout=30)
    storescu(daemon.port, bundled("CT_small.dcm"), timeout=60)
    assert any(p.name.startswith("CT.") for p in daemon.files())


def outside(base: Path, before: set[Path], daemon: Daemon) -> list[Path]:
    created = set(base.rglob("*")) - before
    ours = {daemon.config_path, daemon.log_path}
    return sorted(p for p in created if p not in ours and not p.is_relative_to(daemon.out))


def test_fuzz_sample_over_loopback(tmp_path: Path, daemon_factory: Any) -> None:
    before = set(tmp_path.rglob("*"))
    daemon = daemon_factory(harness.FUZZ_SETTINGS)
    started = time.monotonic()
    result = campaign(daemon, SEED, FAST)
    assert result.total == FAST
    assert set(result.tried) == {"random", "associate", "pdata", "command", "dataset"}
    # The inputs reach the parsers' every outcome: accepted and refused associations,
    # stored, refused and unparsable data sets.
    outcomes = " ".join(result.outcomes)
    for expected in ("associate:02", "associate:07", "dataset:0x0000", "dataset:0xC"):
        assert expected in outcomes, result.outcomes
    still_serving(daemon)
    assert outside(tmp_path, before, daemon) == []
    print(f"{FAST} inputs in {time.monotonic() - started:.1f} s", file=sys.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("process_model", ["fork", "single"])
def test_fuzz_100k_over_loopback(tmp_path: Path, daemon_factory: Any,
                                 process_model: str) -> None:
    before = set(tmp_path.rglob("*"))
    settings = {k: dict(v) for k, v in harness.FUZZ_SETTINGS.items()}
    settings["workers"]["process_model"] = process_model
    daemon = daemon_factory(settings)
    count = SLOW if process_model == "fork" else SLOW // 5
    result = campaign(daemon, SEED * 1000 + len(process_model), count, checkpoints=10)
    assert result.total == count
    still_serving(daemon)
    assert outside(tmp_path, before, daemon) == []
