"""The scale-out recipe of docs/scale-out.md, with Debian's HAProxy on loopback: three
dicom-ingestd instances behind one balancer (TCP mode, send-proxy-v2, the DICOM health
check), eight parallel senders, access control by the senders' own addresses through the
balancer, one instance killed mid-transfer, and every acknowledged object on disk, complete.

Loopback gives each sender an address of its own: 127.0.0.2 is allowed (access.allow), 127.0.0.3
is not; both reach the instances only through HAProxy at 127.0.0.1, which the instances
trust (network.trusted_proxies).
"""

import collections
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ack_sender import acknowledged
from haproxy_pool import Checks, HAProxy, Instance, make_instances
from pydicom import dcmread
from support.daemon import free_port
from support.data import ct_copies, ct_dataset
from support.peers import require_tool
from support.scu import associate, held, store_ok
from support.wait import wait_until

ALLOWED = "127.0.0.2"
DENIED = "127.0.0.3"
SENDERS = 8
PER_SENDER = 40


@contextlib.contextmanager
def started_pool(directory: Path, allow: str, balance: str = "leastconn") \
        -> Iterator[tuple[list[Instance], HAProxy]]:
    require_tool("haproxy")
    instances = make_instances(directory, [free_port() for _ in range(3)],
                               access={"allow": [allow]})
    balancer = HAProxy(directory, free_port(), instances,
                       Checks(inter_ms=300, fall=2, rise=2, timeout_ms=1000), balance)
    try:
        for instance in instances:
            instance.start()
        balancer.start()
        for instance in instances:
            balancer.wait_state(instance.name, "UP", 30)
        yield instances, balancer
    finally:
        balancer.stop()
        for instance in instances:
            instance.stop()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[list[Instance], HAProxy]]:
    with started_pool(tmp_path, f"{ALLOWED}/32") as started:
        yield started


def sender(port: int, ledger: Path, files: list[Path], bind: str,
           deadline: float = 150.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "ack_sender.py"), str(port), str(ledger),
         "--deadline", str(deadline), "--per-association", "4", "--bind", bind,
         *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def acknowledged_count(ledgers: list[Path]) -> int:
    return sum(len(acknowledged(ledger)) for ledger in ledgers)


def test_three_instances_behind_haproxy_lose_nothing_acknowledged(
        pool: tuple[list[Instance], HAProxy], tmp_path: Path) -> None:
    instances, balancer = pool
    batches = [ct_copies(tmp_path / f"send{n}", PER_SENDER, f"s{n}") for n in range(SENDERS)]
    sources = {str(dcmread(path).SOPInstanceUID): path for batch in batches for path in batch}
    ledgers = [tmp_path / f"ledger{n}.txt" for n in range(SENDERS)]
    denied_ledger = tmp_path / "denied.txt"
    victim = instances[1]

    procs = [sender(balancer.port, ledger, batch, ALLOWED)
             for ledger, batch in zip(ledgers, batches, strict=True)]
    denied = sender(balancer.port, denied_ledger, ct_copies(tmp_path / "denied", 2, "x"),
                    DENIED, deadline=5)
    try:
        # Mid-transfer: a quarter acknowledged, and the victim has stored some of it.
        wait_until(lambda: acknowledged_count(ledgers) >= SENDERS * PER_SENDER // 4
                   and ": stored " in victim.log(), 60, "a quarter acknowledged")
        victim.kill()
        killed = time.monotonic()
        balancer.wait_state(victim.name, "DOWN", 30)
        down_after = time.monotonic() - killed
        outputs = [proc.communicate(timeout=240)[0].decode(errors="replace") for proc in procs]
        denied_output = denied.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        for proc in [*procs, denied]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output  # every object acknowledged, retries included
    print(f"\nvictim marked DOWN {down_after:.2f} s after SIGKILL "
          f"(inter {balancer.checks.inter_ms} ms, fall {balancer.checks.fall})")

    # The kill cut associations short: the victim's log has more starts than ends.
    log = victim.log()
    accepted = log.count("association accepted")
    ended = len(re.findall(r": association (released|aborted)", log))
    assert accepted > ended, (accepted, ended)
    # Every instance served: the balancer spread the associations.
    for instance in instances:
        assert re.search(rf"{re.escape(ALLOWED)}:\d+ via 127\.0\.0\.1:\d+ ACKSENDER->\S+: "
                         r"stored ", instance.log()), instance.name

    # The denied sender reached the instances through the same balancer and was refused
    # by its own address; nothing of it was stored.
    assert denied.returncode == 1, denied_output
    assert acknowledged(denied_ledger) == []
    refusals = [line for instance in instances for line in instance.log().splitlines()
                if "connection refused by access control" in line]
    assert refusals and all(re.search(rf"{re.escape(DENIED)}:\d+ via 127\.0\.0\.1:\d+: "
                                      rf"connection refused by access control: "
                                      rf"{re.escape(DENIED)} is not in access\.allow", line)
                            for line in refusals), refusals

    # The victim comes back (its leftovers removed at start-up) and the check sees it.
    victim.start()
    balancer.wait_state(victim.name, "UP", 30)
    for instance in instances:
        instance.stop()
        assert instance.staging() == [], instance.name

    acked = [uid for ledger in ledgers for uid in acknowledged(ledger)]
    assert len(acked) == len(set(acked)) == SENDERS * PER_SENDER
    copies: dict[str, list[tuple[Instance, Path]]] = collections.defaultdict(list)
    for instance in instances:
        for path in instance.stored():
            copies[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)].append(
                (instance, path))
    assert set(copies) <= set(sources), "an object nobody sent"
    duplicates = 0
    for uid in acked:
        found = copies.get(uid, [])
        assert found, f"acknowledged {uid} is on no instance"
        # Once, on the instance that acknowledged it.  A second copy can only be the
        # victim's: placed durably just before the kill, its response lost, then sent again
        # by its sender and acknowledged elsewhere (what DICOM's at-least-once delivery
        # looks like); each instance holds an object at most once.
        owners = [instance.name for instance, _ in found]
        assert len(found) == len(set(owners)), found
        if len(found) > 1:
            assert len(found) == 2 and victim.name in owners, found
            duplicates += 1
        original = dcmread(sources[uid])
        for _, path in found:
            stored = dcmread(path)
            assert stored.PixelData == original.PixelData and stored == original, path
    print(f"{len(acked)} acknowledged objects on disk, complete; {duplicates} also left "
          "on the killed instance by a transfer cut after placing")


def test_health_check_speaks_dicom(pool: tuple[list[Instance], HAProxy]) -> None:
    """A stopped master still completes TCP handshakes (the listening backlog): only a check
    that waits for DICOM answers marks it down.  Back to UP when it resumes; down again and
    back when it is stopped and started."""
    instances, balancer = pool
    target = instances[2]
    target.pause(True)
    try:
        balancer.wait_state(target.name, "DOWN", 30)
    finally:
        target.pause(False)
    balancer.wait_state(target.name, "UP", 30)
    assert "is DOWN" in balancer.log_path.read_text()
    target.stop()
    balancer.wait_state(target.name, "DOWN", 30)
    target.start()
    balancer.wait_state(target.name, "UP", 30)
    # Health checks are LOCAL connections: logged at debug level only, never refused
    # although 127.0.0.1 is not in access.allow.
    for instance in instances:
        log = instance.log()
        assert not re.search(r" INFO .*\(proxy's own connection, LOCAL\)", log)
        assert "refused" not in log


def test_unix_socket_hop_is_local_and_plain_tcp_checks_are_quiet(tmp_path: Path) -> None:
    """HAProxy relays the clients of a Unix-socket frontend (an internal hop, stunnel) with
    a LOCAL header: the daemon sees the proxy's own connection, on which a sender, allowed
    or not, may only verify.  With accept-proxy on that bind (send-proxy-v2 towards it) the
    hop carries the client's address again, and access control applies.  The server's
    plain `check` (a TCP connect; behind send-proxy-v2 a LOCAL header, then a close) costs
    no line above debug level."""
    require_tool("haproxy")
    [instance] = make_instances(tmp_path, [free_port()], access={"allow": [f"{ALLOWED}/32"]})
    plain, carried = free_port(), free_port()
    balancer = HAProxy(tmp_path, plain, [instance], text=f"""\
global
    log stdout format iso local0 info
    stats socket {tmp_path / "haproxy.sock"} mode 600 level admin

defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 1s

frontend edge
    bind 127.0.0.1:{plain}
    default_backend hop
backend hop
    server internal unix@{tmp_path / "hop.sock"}
frontend internal
    bind unix@{tmp_path / "hop.sock"}
    default_backend ingest

frontend edge_carried
    bind 127.0.0.1:{carried}
    default_backend hop_carried
backend hop_carried
    server internal unix@{tmp_path / "carried.sock"} send-proxy-v2
frontend internal_carried
    bind unix@{tmp_path / "carried.sock"} accept-proxy
    default_backend ingest

backend ingest
    server {instance.name} 127.0.0.1:{instance.port} send-proxy-v2 check inter 200 fall 2 rise 2
""")
    try:
        instance.start()
        balancer.start()
        balancer.wait_state(instance.name, "UP", 30)
        for bind in (ALLOWED, DENIED):
            assoc = associate(plain, bind=bind)
            with held(assoc):
                assert assoc.is_established
                assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == \
                    ["1.2.840.10008.1.1"]
                with pytest.raises(ValueError, match="No presentation context"):
                    assoc.send_c_store(ct_dataset())
                assoc.release()
        assoc = associate(carried, bind=ALLOWED)
        with held(assoc):
            store_ok(assoc, ct_dataset())
            assoc.release()
        assert not associate(carried, bind=DENIED).is_established
        wait_until(lambda: "127.0.0.3 is not in access.allow" in instance.log(), 10,
                   "the denied sender refused")
        time.sleep(1)  # a few more checks
    finally:
        balancer.stop()
        instance.stop()
    log = instance.log()
    assert len(instance.stored()) == 1
    assert re.search(rf"{ALLOWED}:\d+ via 127\.0\.0\.1:\d+ PMTEST->STORESCP: stored", log)
    assert len(re.findall(r"WARNING .*\(proxy's own connection, LOCAL\) PMTEST->STORESCP: 1 "
                          r"context\(s\) rejected: a PROXY protocol LOCAL connection", log)) == 2
    # The checks: a LOCAL header, then a close; nothing about them at info level.
    assert not re.search(r"INFO .*\(proxy's own connection, LOCAL\) \?->\?", log), log
    assert "Connection reset" not in log and "peer closed the connection" not in log, log


@pytest.mark.parametrize("balance", ["source", "source-stick", "calling-ae"])
def test_study_affinity_keeps_each_sender_on_one_instance(tmp_path: Path,
                                                          balance: str) -> None:
    """docs/scale-out.md's affinity methods: every association of a sender (an address with
    `balance source` or `stick on src`, a calling AE title with `stick on
    req.payload(26,16)`) reaches the same instance; when that instance dies only its senders
    move, to one instance each."""
    if balance.startswith("source"):
        senders = [(f"127.0.0.{n}", "MODALITY") for n in range(2, 8)]
    else:
        senders = [("127.0.0.2", f"MODALITY{n}") for n in range(6)]
    with started_pool(tmp_path, "127.0.0.0/8", balance) as (instances, balancer):
        def homes(since: dict[str, int]) -> dict[tuple[str, str], set[str]]:
            """Per sender, the instances that accepted its associations since `since`."""
            found: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
            for instance in instances:
                log = instance.log()[since.get(instance.name, 0):]
                for bind, title in senders:
                    if re.search(rf"{re.escape(bind)}:\d+ via 127\.0\.0\.1:\d+ "
                                 rf"{title}->STORESCP: association accepted", log):
                        found[(bind, title)].add(instance.name)
            return found

        def send_round() -> None:
            for bind, title in senders:
                for _ in range(3):
                    assoc = associate(balancer.port, bind=bind, title=title)
                    with held(assoc):
                        store_ok(assoc, ct_dataset())
                        assoc.release()

        send_round()
        before = homes({})
        assert all(len(before[sender]) == 1 for sender in senders), before
        victim_name = next(iter(before[senders[0]]))
        victim = next(i for i in instances if i.name == victim_name)
        marks = {i.name: len(i.log()) for i in instances}
        victim.kill()
        balancer.wait_state(victim.name, "DOWN", 30)
        send_round()
        after = homes(marks)
        for sender in senders:
            assert len(after[sender]) == 1, after
            if before[sender] == {victim.name}:
                assert after[sender] != {victim.name}
            else:  # consistent hashing, or their stick entry: the others stay put
                assert after[sender] == before[sender], (sender, before, after)
