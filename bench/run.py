#!/usr/bin/env python3
"""Benchmark dicom-ingestd against DCMTK storescp on the same data with the same sender.

For each set, runs the two receivers alternately (ABBA order: the receiver that goes first
swaps every round), each run with a fresh receiver and an empty output directory, and sends
with DCMTK storescu (TCP_NODELAY=1 in its environment unless the set says otherwise).  Prints
per set the median sender wall time, its min-max, objects/s, MB/s, the ratio
dicom-ingestd/storescp, receiver CPU and peak RSS, and a Markdown table at the end.

    python bench/run.py                 # full sets, 5 runs each
    python bench/run.py --quick         # CI: tiny sets, 1 run, only proves the harness works
    python bench/run.py --sets ct,small --runs 7

Exit status 1 if any transfer failed (wrong number of files received, sender error,
receiver crash or unclean exit).  See bench/README.md.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from assoc_client import PHASES, PHASES_PREFIX
from bench_data import DataSet, DataSpec, ensure_dataset, split_dataset
from bench_place import ingestd_config, recipe, stall
from bench_proc import (
    Exit,
    MemorySampler,
    Receiver,
    free_port,
    run_senders,
    tree_cpu_seconds,
    wait_idle,
)

from dicom_ingestd.worker.store import WRITEBACK_STEP

BENCH_DIR = Path(__file__).resolve().parent
STORESCP = "storescp"
STORESCP_FORK = "storescp-fork"  # storescp --fork: a process per association
INGESTD = "dicom-ingestd"
INGESTD_NO_FSYNC = "ingestd-nofsync"  # dicom-ingestd with storage.fsync = false
PYNETDICOM = "pynetdicom"  # pynetdicom's own storescp app, the issue's second column
# storescp --ignore with dicom-ingestd's max PDU: receives every object and writes nothing,
# so its time is what the sender and the wire alone cost (the floor of any receiver).
FLOOR = "floor"
# bench/python_floor.py: the least CPython receiver that answers only once an object is
# durable (the same durability recipe as dicom-ingestd's), so what CPython alone costs.
PYTHON_FLOOR = "python-floor"
RECEIVERS = (STORESCP, STORESCP_FORK, INGESTD, INGESTD_NO_FSYNC, PYNETDICOM, FLOOR,
             PYTHON_FLOOR)
OURS = (INGESTD, INGESTD_NO_FSYNC)
MB = 1e6  # MB/s and data sizes are decimal megabytes, as in "262 MB"
MIB = 1024  # RSS: KiB -> MiB


class Measure(Enum):
    """What a target bounds (dicom-ingestd's figure on the left, the reference on the right)."""

    STORESCP = "× storescp"  # median wall time / storescp's
    DURABLE_FLOOR = "× durable floor"  # median / (floor's median + durability stall)
    NO_FSYNC = "× storescp with fsync off"  # ingestd-nofsync's median / storescp's
    TREE_PSS = "MiB PSS"  # the largest PSS summed over the receiver's process tree
    CPU_PER_OBJECT = "× storescp's CPU per object"  # receiver CPU during the transfer


@dataclass(frozen=True)
class Target:
    measure: Measure
    bound: float

    def describe(self) -> str:
        if self.measure is Measure.TREE_PSS:
            return f"≤ {self.bound:g} {self.measure.value}"
        return f"≤ {self.bound:g}{self.measure.value}"


# ingestd-nofsync on the association sets too: its ratio is what the Python set-up costs
# alone, the rest of dicom-ingestd's is the durability stall.
BY_ASSOCIATION = (STORESCP, STORESCP_FORK, INGESTD, INGESTD_NO_FSYNC, FLOOR, PYTHON_FLOOR)
BY_SENDER = (STORESCP, INGESTD, PYNETDICOM, FLOOR, PYTHON_FLOOR)


@dataclass(frozen=True)
class BenchSet:
    """One row of the table: which data, how many parallel senders, Nagle on or off, one
    association per sender (storescu +sd) or per object (assoc_client.py).

    `targets` are issue 18's goals for dicom-ingestd; `receivers` run on this set.
    """

    name: str
    data: DataSpec
    senders: int = 1
    nodelay: bool = True
    per_object: bool = False
    targets: tuple[Target, ...] = ()
    receivers: tuple[str, ...] = BY_SENDER

    def describe(self) -> str:
        senders = "1 sender" if self.senders == 1 else f"{self.senders} parallel senders"
        if self.per_object:
            return f"{senders}, one association per object"
        env = "TCP_NODELAY=1" if self.nodelay else "stock sender (Nagle on)"
        return f"{senders}, {env}"


def _ratio(bound: float) -> Target:
    return Target(Measure.STORESCP, bound)


FULL_SETS = (
    BenchSet("ct", DataSpec("ct", 200), targets=(
        Target(Measure.DURABLE_FLOOR, 1.10), Target(Measure.NO_FSYNC, 1.0)),
        receivers=(*BY_SENDER, INGESTD_NO_FSYNC)),
    BenchSet("small", DataSpec("small", 2000), targets=(
        Target(Measure.DURABLE_FLOOR, 1.10), _ratio(1.5))),
    BenchSet("large", DataSpec("large", 2, frames=500), targets=(
        _ratio(0.7), Target(Measure.TREE_PSS, 64))),
    BenchSet("parallel", DataSpec("ct", 200), senders=4, targets=(
        _ratio(0.9), Target(Measure.CPU_PER_OBJECT, 1.5))),
    # (not the floor here: storescp --ignore would stall on delayed ACKs as storescp does)
    BenchSet("nagle", DataSpec("ct", 200), nodelay=False, targets=(_ratio(0.1),),
             receivers=(STORESCP, INGESTD, PYNETDICOM, PYTHON_FLOOR)),
    BenchSet("assoc", DataSpec("ct38k", 300), per_object=True, targets=(_ratio(1.0),),
             receivers=BY_ASSOCIATION),
    BenchSet("assoc4", DataSpec("ct38k", 400), senders=4, per_object=True,
             targets=(_ratio(0.8),), receivers=BY_ASSOCIATION),
)
QUICK_SETS = (
    BenchSet("ct", DataSpec("ct", 20), receivers=(*BY_SENDER, INGESTD_NO_FSYNC)),
    BenchSet("small", DataSpec("small", 100)),
    BenchSet("large", DataSpec("large", 1, frames=40)),
    BenchSet("parallel", DataSpec("ct", 20), senders=4),
    BenchSet("nagle", DataSpec("ct", 20), nodelay=False,
             receivers=(STORESCP, INGESTD, PYNETDICOM, PYTHON_FLOOR)),
    BenchSet("assoc", DataSpec("ct38k", 20), per_object=True, receivers=BY_ASSOCIATION),
    BenchSet("assoc4", DataSpec("ct38k", 20), senders=4, per_object=True,
             receivers=BY_ASSOCIATION),
)


@dataclass
class Run:
    """One transfer of one set to one receiver."""

    receiver: str
    index: int
    wall: float = 0.0
    cpu_transfer: float = 0.0  # receiver tree CPU from the first send to the last response
    receiver_exit: Exit | None = None
    tree_rss_kib: int = 0  # largest summed VmRSS of the receiver's process tree
    tree_pss_kib: int = 0  # largest summed PSS of the receiver's process tree
    process_hwm_kib: int = 0  # largest VmHWM of one process in the tree
    received: int = 0
    problems: list[str] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)
    # One association per object: the first sender's median microseconds per phase of an
    # association as it saw them (assoc_client.py --phases), by phase name.
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Summary:
    """The statistics of one receiver on one set, over its successful runs."""

    runs: int
    ok: int
    median: float
    low: float
    high: float
    cpu: float
    cpu_life: float
    hwm_mib: float
    tree_rss_mib: float
    tree_pss_mib: float


def summarize(runs: Sequence[Run]) -> Summary | None:
    good = [r for r in runs if r.ok]
    if not good:
        return None
    walls = [r.wall for r in good]
    return Summary(
        runs=len(runs), ok=len(good), median=statistics.median(walls), low=min(walls),
        high=max(walls), cpu=statistics.median(r.cpu_transfer for r in good),
        cpu_life=statistics.median(r.receiver_exit.cpu_seconds if r.receiver_exit else 0.0
                                   for r in good),
        hwm_mib=max(r.process_hwm_kib for r in good) / MIB,
        tree_rss_mib=max(r.tree_rss_kib for r in good) / MIB,
        tree_pss_mib=max(r.tree_pss_kib for r in good) / MIB)


def say(message: str = "") -> None:
    print(message, flush=True)


# --- configuration -------------------------------------------------------------------------


def parse_setting(text: str) -> tuple[str, str, object]:
    """``table.key=value`` (value in TOML syntax; a bare word is taken as a string)."""
    name, sep, raw = text.partition("=")
    table, dot, key = name.strip().partition(".")
    if not sep or not dot or not table or not key:
        raise argparse.ArgumentTypeError(f"expected table.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return table, key, value


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as TOML")


def write_ingestd_config(path: Path, port: int, output: Path,
                         extra: Sequence[tuple[str, str, object]]) -> None:
    """The default configuration except port, bind address, output directory and log level."""
    tables: dict[str, dict[str, object]] = {
        "network": {"port": port, "bind_address": "127.0.0.1"},
        "storage": {"output_directory": str(output)},
        "logging": {"level": "warn"},
    }
    for table, key, value in extra:
        tables.setdefault(table, {})[key] = value
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Harness:
    """Settings shared by every run."""

    storescp: list[str]
    storescp_args: list[str]
    storescu: list[str]
    ingestd: list[str]
    ingestd_settings: list[tuple[str, str, object]]
    work: Path
    timeout: float
    max_pdu: int  # dicom-ingestd's, given to the floor receiver too
    floor_options: list[str]  # python_floor.py's durability: dicom-ingestd's recipe

    @property
    def output(self) -> Path:
        return self.work / "received"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def receiver_argv(self, receiver: str, port: int) -> list[str]:
        if receiver == STORESCP:
            return [*self.storescp, *self.storescp_args, "-od", str(self.output), str(port)]
        if receiver == STORESCP_FORK:
            return [*self.storescp, *self.storescp_args, "--fork", "-od", str(self.output),
                    str(port)]
        if receiver == FLOOR:
            return [*self.storescp, "--ignore", "--max-pdu", str(self.max_pdu),
                    "-od", str(self.output), str(port)]
        if receiver == PYTHON_FLOOR:
            return [sys.executable, str(BENCH_DIR / "python_floor.py"), *self.floor_options,
                    str(port), str(self.output)]
        if receiver == PYNETDICOM:
            return [sys.executable, "-m", "pynetdicom", "storescp", "-q", "-ba", "127.0.0.1",
                    "-od", str(self.output), str(port)]
        config = self.work / "ingestd.toml"
        settings = self.ingestd_settings
        if receiver == INGESTD_NO_FSYNC:
            settings = [*settings, ("storage", "fsync", False)]
        write_ingestd_config(config, port, self.output, settings)
        return [*self.ingestd, "run", "-c", str(config)]

    def sender_argv(self, bench: BenchSet, port: int, directory: Path) -> list[str]:
        if bench.per_object:
            return [sys.executable, str(BENCH_DIR / "assoc_client.py"), "--phases",
                    "127.0.0.1", str(port), str(directory)]
        return [*self.storescu, "-aet", "BENCHSCU", "-aec", "STORESCP", "+sd",
                "127.0.0.1", str(port), str(directory)]

    def run_once(self, bench: BenchSet, data: DataSet, dirs: Sequence[Path], receiver: str,
                 index: int) -> Run:
        run = Run(receiver, index)
        shutil.rmtree(self.output, ignore_errors=True)
        self.output.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        os.sync()  # the previous run's dirty pages must not be flushed during this one
        env = dict(os.environ)
        env.pop("TCP_NODELAY", None)
        if bench.nodelay:
            env["TCP_NODELAY"] = "1"  # storescp gets the sender's setting too
        stem = f"{bench.name}-{receiver}-{index}"
        port = free_port()
        log_path = self.logs / f"{stem}.log"
        try:
            proc = Receiver(self.receiver_argv(receiver, port), env, log_path)
        except OSError as exc:
            run.problems.append(f"cannot start {receiver}: {exc}")
            return run
        try:
            proc.wait_listening(port, timeout=30.0)
            wait_idle(proc.pid)
            sampler = MemorySampler(proc.pid).start()
            cpu_before = tree_cpu_seconds(proc.pid)
            try:
                sent = run_senders(
                    [self.sender_argv(bench, port, d) for d in dirs], env,
                    [self.logs / f"{stem}.sender{k}.log" for k in range(len(dirs))],
                    self.timeout)
            finally:
                run.cpu_transfer = tree_cpu_seconds(proc.pid) - cpu_before
                sampler.stop()
            run.tree_rss_kib, run.tree_pss_kib = sampler.tree_rss_kib, sampler.tree_pss_kib
            run.process_hwm_kib = sampler.process_hwm_kib
            run.wall = sent.wall_seconds
            if sent.timed_out:
                run.problems.append(f"senders killed after {self.timeout:g} s")
            for k, exit_ in enumerate(sent.exits):
                sender_log = self.logs / f"{stem}.sender{k}.log"
                errors = [line for line in sender_log.read_text(errors="replace").splitlines()
                          if line.startswith(("E:", "F:"))]
                if exit_.code != 0 or errors:
                    run.problems.append(f"sender {k} exited with {exit_.code}: "
                                        + ("; ".join(errors[:3]) or f"see {sender_log}"))
            if bench.per_object:
                run.phases = read_phases(self.logs / f"{stem}.sender0.log")
        except (RuntimeError, OSError) as exc:
            run.problems.append(str(exc))
        finally:
            stopped_by_us = proc.exit is None
            run.receiver_exit = proc.stop()
        self.check(run, receiver, 0 if receiver == FLOOR else len(data.files), log_path,
                   stopped_by_us)
        return run

    def check(self, run: Run, receiver: str, expected: int, log_path: Path,
              stopped_by_us: bool) -> None:
        """Count what arrived; note an unclean receiver exit and anything it logged."""
        visible, hidden, empty = 0, 0, 0
        for root, dirnames, filenames in os.walk(self.output):
            in_hidden = any(part.startswith(".") for part in Path(root)
                            .relative_to(self.output).parts)
            for name in filenames:
                if in_hidden or name.startswith("."):
                    # The daemon's own state (counters, outbox, job database) lives there
                    # too; only a partial object left behind is a problem.
                    hidden += name.endswith(".part")
                else:
                    visible += 1
                    empty += os.path.getsize(os.path.join(root, name)) == 0
            dirnames.sort()
        run.received = visible
        if visible != expected:
            run.problems.append(f"received {visible} files, sent {expected}")
        if empty:
            run.problems.append(f"{empty} received files are empty")
        if hidden:
            run.problems.append(f"{hidden} partial objects left in the staging directory")
        code = run.receiver_exit.code if run.receiver_exit else None
        # storescp (and pynetdicom's, and python_floor.py) have no SIGTERM handler, so they
        # die of the signal; we must exit 0.
        expected_codes = (0,) if receiver in OURS else (-15,)
        if stopped_by_us and code not in expected_codes:
            run.problems.append(f"receiver exit status {code} after SIGTERM "
                                f"(expected {expected_codes[0]}), log: {log_path}")
        run.log_lines = log_path.read_text(errors="replace").splitlines()


# --- reporting -------------------------------------------------------------------------------


def read_phases(sender_log: Path) -> dict[str, float]:
    """The "median us: associate 634, store 753, ..." line of assoc_client.py --phases."""
    for line in sender_log.read_text(errors="replace").splitlines():
        if line.startswith(PHASES_PREFIX):
            pairs = (item.rsplit(" ", 1) for item in line[len(PHASES_PREFIX):].split(", "))
            return {name: float(value) for name, value in pairs}
    return {}


def phases_table(rows: Sequence[tuple[BenchSet, DataSet, dict[str, list[Run]]]]) -> str:
    """Where an association's time goes, as the (first) sender sees it: per set with one
    association per object and receiver, the median over the runs of each phase's median."""
    head = "| set | receiver | " + " | ".join(f"{p} µs" for p in PHASES) + " | sum µs |"
    table = [head, "|" + "---|" * (head.count("|") - 1)]
    for bench, _data, results in rows:
        if not bench.per_object:
            continue
        for receiver in bench.receivers:
            measured_runs = [r.phases for r in results[receiver] if r.ok and r.phases]
            if not measured_runs:
                continue
            medians = [statistics.median(p.get(name, 0.0) for p in measured_runs)
                       for name in PHASES]
            table.append(f"| {bench.name} | {receiver} | "
                         + " | ".join(f"{m:.0f}" for m in medians)
                         + f" | {sum(medians):.0f} |")
    return "\n".join(table)


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def ratio(ours: Summary | None, theirs: Summary | None) -> str:
    """dicom-ingestd's median wall time over storescp's (> 1: dicom-ingestd is slower)."""
    if ours is None or theirs is None:
        return "n/a"
    return f"{ours.median / theirs.median:.2f}"


@dataclass(frozen=True)
class Line:
    """One receiver's results on one set, formatted for the block and the table."""

    receiver: str
    ok: str
    summary: Summary | None
    ratio: str


def lines_of(results: dict[str, list[Run]]) -> list[Line]:
    theirs = summarize(results[STORESCP])
    out = []
    for receiver in RECEIVERS:
        runs = results[receiver]
        if not runs:
            continue  # not selected (--receivers)
        summary = summarize(runs)
        out.append(Line(receiver, f"{sum(r.ok for r in runs)}/{len(runs)}", summary,
                        "1.00" if receiver == STORESCP else ratio(summary, theirs)))
    return out


def print_set_block(bench: BenchSet, data: DataSet, results: dict[str, list[Run]]) -> None:
    size_mb = data.total_bytes / MB
    say(f"  {'receiver':<14}{'ok':>5}{'median s':>10}{'min–max s':>16}{'obj/s':>9}"
        f"{'MB/s':>8}{'ratio':>7}{'CPU s':>7}{'CPU life':>10}{'RSS MiB':>9}{'tree RSS':>10}"
        f"{'tree PSS':>10}")
    for line in lines_of(results):
        s = line.summary
        if s is None:
            say(f"  {line.receiver:<14}{line.ok:>5}  every run failed")
            continue
        say(f"  {line.receiver:<14}{line.ok:>5}{s.median:>10.3f}{f'{s.low:.3f}–{s.high:.3f}':>16}"
            f"{rate(len(data.files), s.median):>9.1f}{rate(size_mb, s.median):>8.1f}"
            f"{line.ratio:>7}{s.cpu:>7.2f}{s.cpu_life:>10.2f}{s.hwm_mib:>9.1f}"
            f"{s.tree_rss_mib:>10.1f}{s.tree_pss_mib:>10.1f}")


def markdown_table(rows: Sequence[tuple[BenchSet, DataSet, dict[str, list[Run]]]]) -> str:
    head = ("| set | objects | MB | receiver | ok runs | median s | min–max s | objects/s "
            "| MB/s | ratio | CPU s | peak RSS MiB | tree RSS MiB | tree PSS MiB |")
    table = [head, "|" + "---|" * (head.count("|") - 1)]
    for bench, data, results in rows:
        size_mb = data.total_bytes / MB
        for line in lines_of(results):
            cells = [f"{bench.name} ({bench.describe()})", str(len(data.files)), f"{size_mb:.1f}",
                     line.receiver, line.ok]
            s = line.summary
            if s is None:
                cells += ["failed", *[""] * 8]
            else:
                cells += [f"{s.median:.3f}", f"{s.low:.3f}–{s.high:.3f}",
                          f"{rate(len(data.files), s.median):.1f}",
                          f"{rate(size_mb, s.median):.1f}", line.ratio, f"{s.cpu:.2f}",
                          f"{s.hwm_mib:.1f}", f"{s.tree_rss_mib:.1f}", f"{s.tree_pss_mib:.1f}"]
            table.append("| " + " | ".join(cells) + " |")
    return "\n".join(table)


def _timing(s: Summary | None) -> str:
    return "n/a" if s is None else f"{s.median:.3f} ({s.low:.3f}–{s.high:.3f})"


def measured(measure: Measure, bench: BenchSet, data: DataSet, results: dict[str, list[Run]],
             stalls: dict[str, float]) -> float | None:
    """dicom-ingestd's figure for `measure` in this run, None when it was not measured."""
    ours = summarize(results[INGESTD])
    theirs = summarize(results[STORESCP])
    if ours is None:
        return None
    if measure is Measure.TREE_PSS:
        return ours.tree_pss_mib
    if theirs is None:
        return None
    if measure is Measure.STORESCP:
        return ours.median / theirs.median
    if measure is Measure.NO_FSYNC:
        no_fsync = summarize(results[INGESTD_NO_FSYNC])
        return None if no_fsync is None else no_fsync.median / theirs.median
    if measure is Measure.CPU_PER_OBJECT:
        return ours.cpu / theirs.cpu if theirs.cpu > 0 else None
    floor = summarize(results[FLOOR])
    if floor is None or bench.name not in stalls:
        return None
    return ours.median / (floor.median + stalls[bench.name])


def issue_table(rows: Sequence[tuple[BenchSet, DataSet, dict[str, list[Run]]]],
                stalls: dict[str, float]) -> str:
    """Issue 18's table: storescp's time, each receiver's ratio to it, dicom-ingestd's
    memory (PSS summed over its process tree) and CPU, the targets, met?

    Then the floors: the floor receiver's ratio (sender and wire alone), and with one
    sender that time plus the durability stall of every object (bench_place.py), the least
    any receiver that answers only once an object is durable can take; and python-floor's
    ratio, the least a CPython receiver that does so takes (python_floor.py).
    """
    head = ("| set | storescp median s (min–max) | storescp --fork ratio | pynetdicom storescp "
            "ratio | dicom-ingestd median s (min–max) | dicom-ingestd ratio | fsync off ratio "
            "| tree PSS MiB | CPU s (storescp's) | target | met | floor ratio "
            "| durable floor ratio | CPython durable floor ratio |")
    table = [head, "|" + "---|" * (head.count("|") - 1)]
    for bench, data, results in rows:
        theirs = summarize(results[STORESCP])
        ours = summarize(results[INGESTD])
        floor = summarize(results[FLOOR])
        durable_floor = "n/a"
        if floor is not None and theirs is not None and bench.name in stalls:
            durable_floor = f"{(floor.median + stalls[bench.name]) / theirs.median:.2f}"
        met = []
        for target in bench.targets:
            value = measured(target.measure, bench, data, results, stalls)
            met.append("n/a" if value is None else
                       f"{'yes' if value <= target.bound else 'no'} ({value:.2f})")
        cpu = "n/a" if ours is None or theirs is None else f"{ours.cpu:.2f} ({theirs.cpu:.2f})"
        table.append(
            f"| {bench.name} ({bench.describe()}) | {_timing(theirs)} "
            f"| {ratio(summarize(results[STORESCP_FORK]), theirs)} "
            f"| {ratio(summarize(results[PYNETDICOM]), theirs)} | {_timing(ours)} "
            f"| {ratio(ours, theirs)} | {ratio(summarize(results[INGESTD_NO_FSYNC]), theirs)} "
            f"| {'n/a' if ours is None else f'{ours.tree_pss_mib:.1f}'} | {cpu} "
            f"| {'; '.join(t.describe() for t in bench.targets) or '–'} "
            f"| {'; '.join(met) or 'n/a'} | {ratio(floor, theirs)} | {durable_floor} "
            f"| {ratio(summarize(results[PYTHON_FLOOR]), theirs)} |")
    return "\n".join(table)


def filesystem_of(path: Path) -> str:
    """"mount point (fstype, source)" of the file system holding `path`, from mountinfo."""
    target = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                mount = left.split()[4]
                fstype, source = right.split()[:2]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[0])):
                    best = (mount, fstype, source)
    except OSError:
        pass
    return f"{best[0]} ({best[1]}, {best[2]})" if best else "unknown file system"


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unavailable ({exc.strerror or exc})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else f"exit {out.returncode}"


def machine_description() -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name")), "?")
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [f"machine: {os.cpu_count()} CPUs ({cpu}), {mem_gib:.1f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}"]


def machine_load() -> str:
    """Load average, available memory and pressure stall figures: how noisy this run was."""
    parts = []
    loadavg = read_text("/proc/loadavg")
    if loadavg:
        parts.append("load average " + " ".join(loadavg.split()[:3]))
    meminfo = read_text("/proc/meminfo") or ""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            parts.append(f"memory available {int(line.split()[1]) / 2**20:.1f} GiB")
    for resource in ("cpu", "memory", "io"):
        pressure = read_text(f"/proc/pressure/{resource}") or ""
        some = pressure.split("\n", 1)[0].split()
        if len(some) > 1 and some[0] == "some":
            parts.append(f"{resource} pressure {some[1].replace('avg10=', '')}%")
    return ", ".join(parts) or "unknown"


def read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


# --- main ------------------------------------------------------------------------------------


def default_ingestd() -> str:
    """The dicom-ingestd next to this Python (the venv's), else the one on PATH."""
    sibling = Path(sys.executable).parent / "dicom-ingestd"
    return str(sibling) if sibling.exists() else "dicom-ingestd"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark dicom-ingestd against DCMTK storescp (see bench/README.md).")
    names = ", ".join(b.name for b in FULL_SETS)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sets, 1 run each: proves the harness works (CI)")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per receiver and set (default 5; 1 with --quick)")
    parser.add_argument("--sets", default=None, help=f"comma-separated subset of: {names}")
    parser.add_argument("--receivers", default=",".join(RECEIVERS),
                        help="comma-separated subset of: " + ", ".join(RECEIVERS)
                        + " (each set runs those of them it names)")
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".data",
                        help="generated data sets, reused across runs (default bench/.data)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="receiver output directory and logs (default CACHE_DIR/run)")
    parser.add_argument("--ingestd", default=default_ingestd(),
                        help="dicom-ingestd command (split like a shell would)")
    parser.add_argument("--storescp", default="storescp", help="storescp command")
    parser.add_argument("--storescu", default="storescu", help="storescu command")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        type=parse_setting, metavar="TABLE.KEY=VALUE",
                        help="extra dicom-ingestd setting, e.g. storage.fsync=false "
                             "(repeatable)")
    parser.add_argument("--storescp-args", default="",
                        help="extra storescp options, e.g. '--fork' (one shell-quoted string)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one transfer may take before it counts as failed "
                             "(default 600; 60 with --quick)")
    args = parser.parse_args(argv)
    args.runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.timeout = args.timeout or (60.0 if args.quick else 600.0)
    available = {b.name: b for b in (QUICK_SETS if args.quick else FULL_SETS)}
    wanted = args.sets.split(",") if args.sets else list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; choose from {names}")
    args.bench_sets = [available[w] for w in wanted]
    args.receiver_list = [r.strip() for r in args.receivers.split(",") if r.strip()]
    if not args.receiver_list or any(r not in RECEIVERS for r in args.receiver_list):
        parser.error(f"--receivers takes a subset of {', '.join(RECEIVERS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    cache: Path = args.cache_dir.resolve()
    work: Path = (args.work_dir or cache / "run").resolve()
    max_pdu = ingestd_config(args.settings, work).network.max_pdu
    fsync, one_commit = recipe(args.settings, work)
    harness = Harness(
        storescp=shlex.split(args.storescp), storescp_args=shlex.split(args.storescp_args),
        storescu=shlex.split(args.storescu), ingestd=shlex.split(args.ingestd),
        ingestd_settings=args.settings, work=work, timeout=args.timeout,
        max_pdu=max_pdu, floor_options=["--max-pdu", str(max_pdu)]
        + (["--one-commit"] if one_commit else []) + ([] if fsync else ["--no-fsync"]))
    for line in machine_description():
        say(line)
    say(f"storescp: {tool_version(harness.storescp)}; storescu: {tool_version(harness.storescu)}")
    say(f"dicom-ingestd: {tool_version(harness.ingestd)} ({args.ingestd})")
    say(f"machine load at start: {machine_load()}")
    say(f"data: {cache}, on {filesystem_of(cache)}")
    work.mkdir(parents=True, exist_ok=True)
    say(f"receiver output: {harness.output}, on {filesystem_of(work)}")
    extra = "".join(f", {t}.{k} = {toml_value(v)}" for t, k, v in args.settings)
    say(f"receivers: storescp {args.storescp_args + ' ' if args.storescp_args else ''}"
        "-od DIR PORT (default options; TCP_NODELAY as the sender's); dicom-ingestd run -c "
        f"CONFIG (defaults except network.port, network.bind_address, "
        f"storage.output_directory, logging.level = warn{extra}); floor: storescp --ignore "
        f"--max-pdu {harness.max_pdu} (not on the nagle set); python-floor: "
        f"python_floor.py {' '.join(harness.floor_options)}")
    say(f"mode: {'quick' if args.quick else 'full'}, {args.runs} run(s) per receiver and set, "
        "receivers alternating (ABBA), fresh receiver and empty output directory per run")
    say()

    rows: list[tuple[BenchSet, DataSet, dict[str, list[Run]]]] = []
    stalls: dict[str, float] = {}  # set name -> median seconds of durability stall
    failures = 0
    for bench in args.bench_sets:
        data = ensure_dataset(cache, bench.data, log=lambda m: say(f"[data] {m}"))
        dirs = split_dataset(cache, data, bench.senders) if bench.senders > 1 else [data.directory]
        prewarm(data)
        say(f"== {bench.name}: {len(data.files)} objects, {data.total_bytes / MB:.1f} MB, "
            f"{bench.describe()}")
        results: dict[str, list[Run]] = {r: [] for r in RECEIVERS}
        for index in range(args.runs):
            order = args.receiver_list if index % 2 == 0 else args.receiver_list[::-1]
            for receiver in order:
                if receiver not in bench.receivers:
                    continue
                run = harness.run_once(bench, data, dirs, receiver, index)
                results[receiver].append(run)
                report_run(bench, data, run)
                failures += not run.ok
        print_set_block(bench, data, results)
        if INGESTD in args.receiver_list and FLOOR in bench.receivers and bench.senders == 1 \
                and max(p.stat().st_size for p in data.files) < WRITEBACK_STEP:
            seconds, durability = stall(data.files, args.settings, work, args.runs)
            stalls[bench.name] = seconds
            say(f"  durability stall alone (dicom-ingestd's storage code, no network, finish "
                f"and commit of each object in turn; {durability}): {seconds:.3f} s median "
                f"of {args.runs}, {seconds / len(data.files) * 1000:.3f} ms per object")
        say()
        rows.append((bench, data, results))
    shutil.rmtree(harness.output, ignore_errors=True)

    say("## Results")
    say()
    say("Wall time: sender(s) start to end; ratio: dicom-ingestd median / storescp median "
        "(> 1 is slower); CPU: receiver user+sys during the transfer (median); peak RSS: "
        "VmHWM of the largest receiver process; tree RSS/PSS: sampled sums of VmRSS and PSS "
        "over the receiver's process tree (RSS counts pages shared by forked processes once "
        "per process, PSS splits them); memory is the max over runs. "
        "MB = 10^6 bytes of DICOM files.")
    say()
    say(markdown_table(rows))
    say()
    say("Issue 18's table (ratio: median wall time / storescp's median in the same run; "
        "min–max: the spread over the runs, i.e. the machine's noise; tree PSS: the largest "
        "PSS summed over dicom-ingestd's master, workers and helpers, so pages shared by fork "
        "count once; CPU s: receiver CPU during the transfer, dicom-ingestd's (storescp's); "
        "met: each target in turn, with dicom-ingestd's figure; floor ratio: storescp "
        "--ignore with dicom-ingestd's max PDU, which receives and writes nothing; durable "
        "floor ratio, one sender and objects below the early-writeback step only: the "
        "floor's time plus the durability stall of each object in turn, the least a "
        "receiver answering only after fsync can take; CPython durable floor ratio: "
        "bench/python_floor.py, a minimal single-threaded CPython receiver with dicom-ingestd's "
        "durability recipe, the least a Python receiver answering only after fsync takes):")
    say()
    say(issue_table(rows, stalls))
    say()
    if any(bench.per_object for bench, _, _ in rows):
        say("Where an association's time goes, as the sender sees it (assoc_client.py "
            "--phases; median µs per phase of one association of the first sender, median "
            "over the runs): associate = connect() to the A-ASSOCIATE-AC, store = the "
            "C-STORE-RQ and its data set to the C-STORE-RSP, release = A-RELEASE-RQ to RP, "
            "close = close().  With 4 senders the receiver is shared, so phases include "
            "waiting for it.")
        say()
        say(phases_table(rows))
        say()
    report_logs(rows)
    say(f"machine load at end: {machine_load()}")
    say(f"total time: {time.monotonic() - started:.1f} s")
    if failures:
        say(f"FAILED: {failures} transfer(s) failed (see above)")
        return 1
    return 0


def prewarm(data: DataSet) -> None:
    """Read the set once so that every run finds it in the page cache."""
    for path in data.files:
        with open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass


def report_run(bench: BenchSet, data: DataSet, run: Run) -> None:
    status = "ok" if run.ok else "FAILED"
    life = run.receiver_exit.cpu_seconds if run.receiver_exit else 0.0
    size_mb = data.total_bytes / MB
    say(f"  run {run.index + 1} {run.receiver:<14}{status:<7}{run.wall:8.3f} s"
        f"{rate(len(data.files), run.wall):9.1f} obj/s{rate(size_mb, run.wall):8.1f} MB/s"
        f"  CPU {run.cpu_transfer:.2f} s (life {life:.2f} s)"
        f"  tree RSS/PSS {run.tree_rss_kib / MIB:.0f}/{run.tree_pss_kib / MIB:.0f} MiB"
        f"  files {run.received}/{len(data.files)}")
    for problem in run.problems:
        say(f"    !! {bench.name}/{run.receiver}: {problem}")
    if run.log_lines:
        say(f"    receiver logged {len(run.log_lines)} line(s), first: {run.log_lines[0]}")


def report_logs(rows: Sequence[tuple[BenchSet, DataSet, dict[str, list[Run]]]]) -> None:
    """Every distinct line the receivers logged (level warn), with how often it appeared."""
    for receiver in RECEIVERS:
        counts: dict[str, int] = {}
        for _, _, results in rows:
            for run in results[receiver]:
                for line in run.log_lines:
                    counts[line] = counts.get(line, 0) + 1
        if not counts:
            continue
        say(f"{receiver} logged {sum(counts.values())} line(s), {len(counts)} distinct:")
        for line, count in list(counts.items())[:30]:
            say(f"  {count:>5} x {line}")
        say()


if __name__ == "__main__":
    sys.exit(main())
