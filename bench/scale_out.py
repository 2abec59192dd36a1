#!/usr/bin/env python3
"""Throughput of 1 and of N dicom-ingestd instances behind HAProxy, and how long HAProxy takes
to stop sending to an instance that died or hangs (docs/scale-out.md).

Scenarios, run alternately (the order rotates every round), each with fresh instances and
empty output directories, on loopback:

    direct     one instance, no balancer (what HAProxy costs, by difference)
    haproxy-1  one instance behind HAProxy (TCP mode, send-proxy-v2, the DICOM health check)
    haproxy-N  N instances behind HAProxy (balance leastconn)

The same K parallel DCMTK storescu senders (TCP_NODELAY=1) send the same generated set
(bench_data.py), split round-robin.  Prints per scenario the median sender wall time, its
min-max, objects/s and MB/s.  With --failover, also the seconds from SIGKILL (the whole
instance) and from SIGSTOP (the master only: the port still completes TCP handshakes) to
HAProxy's DOWN, with HAProxy's default check timing (inter 2 s, fall 3) and a faster one.

    python bench/scale_out.py                     # ct set, 8 senders, 3 instances, 3 runs
    python bench/scale_out.py --set small --runs 5 --failover
    python bench/scale_out.py --quick             # tiny, 1 run: proves the harness works

The HAProxy and instance harness is the test suite's (tests/haproxy_pool.py).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from bench_data import DataSpec, ensure_dataset, split_dataset  # noqa: E402
from bench_proc import free_port, run_senders  # noqa: E402
from haproxy_pool import Checks, HAProxy, Instance, make_instances  # noqa: E402

SETS = {"ct": DataSpec("ct", 200), "small": DataSpec("small", 2000)}
QUICK = {"ct": DataSpec("ct", 20), "small": DataSpec("small", 100)}
MB = 1e6


def say(text: str) -> None:
    print(text, flush=True)


def start_pool(work: Path, count: int, balanced: bool, checks: Checks) \
        -> tuple[list[Instance], HAProxy | None, int]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tables = {} if balanced else {"network": {"proxy_protocol": "off", "trusted_proxies": []}}
    instances = make_instances(work, [free_port() for _ in range(count)], **tables)
    for instance in instances:
        instance.start()
    if not balanced:
        return instances, None, instances[0].port
    balancer = HAProxy(work, free_port(), instances, checks)
    balancer.start()
    for instance in instances:
        balancer.wait_state(instance.name, "UP", 60)
    return instances, balancer, balancer.port


def stop_pool(instances: list[Instance], balancer: HAProxy | None) -> None:
    if balancer is not None:
        balancer.stop()
    for instance in instances:
        instance.stop()


def run_once(work: Path, scenario: str, count: int, dirs: list[Path], expected: int,
             storescu: str, timeout: float) -> float:
    balanced = scenario != "direct"
    instances, balancer, port = start_pool(work, count, balanced, Checks(inter_ms=2000))
    try:
        env = dict(os.environ, TCP_NODELAY="1")
        commands = [[storescu, "-aet", "BENCHSCU", "-aec", "STORESCP", "+sd", "127.0.0.1",
                     str(port), str(directory)] for directory in dirs]
        logs = [work / f"sender{k}.log" for k in range(len(dirs))]
        result = run_senders(commands, env, logs, timeout)
        received = sum(len(instance.stored()) for instance in instances)
        failed = [e for e in result.exits if e.code != 0]
        if failed or result.timed_out or received != expected:
            raise SystemExit(f"{scenario}: {len(failed)} sender(s) failed, {received} of "
                             f"{expected} objects received (logs in {work})")
        spread = ", ".join(f"{i.name} {len(i.stored())}" for i in instances)
        say(f"  {scenario:10s} {result.wall_seconds:7.3f} s  ({spread})")
        return result.wall_seconds
    finally:
        stop_pool(instances, balancer)


def failover(work: Path, checks: Checks, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds from SIGKILL of a whole instance, and from SIGSTOP of its master, to DOWN."""
    killed, stopped = [], []
    for _ in range(rounds):
        instances, balancer, _ = start_pool(work, 2, True, checks)
        assert balancer is not None
        try:
            victim = instances[0]
            victim.pause(True)
            started = time.monotonic()
            balancer.wait_state(victim.name, "DOWN", 120)
            stopped.append(time.monotonic() - started)
            victim.pause(False)
            balancer.wait_state(victim.name, "UP", 120)
            victim.kill()
            started = time.monotonic()
            balancer.wait_state(victim.name, "DOWN", 120)
            killed.append(time.monotonic() - started)
        finally:
            stop_pool(instances, balancer)
    return killed, stopped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), default="ct")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--failover", action="store_true",
                        help="also measure the time to DOWN after SIGKILL and SIGSTOP")
    parser.add_argument("--quick", action="store_true", help="tiny set, one run")
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".data")
    parser.add_argument("--storescu", default="storescu")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        raise SystemExit("haproxy is not installed (apt-get install haproxy)")
    spec = (QUICK if args.quick else SETS)[args.set]
    runs = 1 if args.quick else args.runs
    data = ensure_dataset(args.cache_dir, spec, say)
    dirs = split_dataset(args.cache_dir, data, args.senders)
    work = args.cache_dir / "scale-out"
    say(f"set {spec.key}: {len(data.files)} objects, {data.total_bytes / MB:.1f} MB; "
        f"{args.senders} parallel storescu senders; {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.2f}")
    scenarios = [("direct", 1), ("haproxy-1", 1), (f"haproxy-{args.instances}",
                                                   args.instances)]
    walls: dict[str, list[float]] = {name: [] for name, _ in scenarios}
    for round_ in range(runs):
        order = scenarios[round_ % len(scenarios):] + scenarios[:round_ % len(scenarios)]
        say(f"round {round_ + 1}/{runs}")
        for name, count in order:
            walls[name].append(run_once(work, name, count, dirs, len(data.files),
                                        args.storescu, args.timeout))
    say("")
    say("| scenario | median s | min-max s | objects/s | MB/s |")
    say("|---|---|---|---|---|")
    for name, _ in scenarios:
        median = statistics.median(walls[name])
        say(f"| {name} | {median:.3f} | {min(walls[name]):.3f}-{max(walls[name]):.3f} | "
            f"{len(data.files) / median:.0f} | {data.total_bytes / MB / median:.1f} |")
    if args.failover:
        rounds = 1 if args.quick else 3
        for label, checks in (("HAProxy defaults (inter 2 s, fall 3, rise 2)",
                               Checks(inter_ms=2000, fall=3, rise=2, timeout_ms=2000)),
                              ("inter 1 s, fall 2, rise 2, timeout check 1 s",
                               Checks(inter_ms=1000, fall=2, rise=2, timeout_ms=1000))):
            killed, stopped = failover(work, checks, rounds)
            say(f"time to DOWN, {label}: SIGKILL {', '.join(f'{s:.1f}' for s in killed)} s; "
                f"SIGSTOP {', '.join(f'{s:.1f}' for s in stopped)} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{exc}") from None
