"""network.proxy_protocol against the running daemon: raw sockets sending headers, and a
minimal relay (proxy_headers.Relay) putting real senders behind a header that carries any
address.  HAProxy itself is in test_scale_out.py.

What is checked for each bad input: what the sender sees, the one log line, that no worker
was started for it, and that the daemon keeps serving.
"""

import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy_headers import Relay, carrying, v1, v1_unknown, v2, v2_local, v2_raw
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from support import wire
from support.daemon import REPO, Daemon, log_lines, socket_activated
from support.data import ct_copies, ct_dataset
from support.peers import storescu
from support.recorder import Recorder
from support.scu import assert_rejected_local_limit, associate, echo_ok, held, store_ok
from support.wait import wait_until
from support.wire import connect_from, recv_until_closed

from dicom_ingestd import healthcheck
from dicom_ingestd.proxy_reader import MAX_PENDING

Factory = Callable[..., Daemon]
WORKER_STARTED = re.compile(r"DEBUG \[\d+\] (.*): association \S+ handed to (?:worker|thread)")


def proxied(**tables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings behind a proxy on 127.0.0.1 (v2 unless said), logging at debug level (the
    master's "association K handed to worker N" lines show what cost a worker)."""
    result = {name: dict(values) for name, values in tables.items()}
    network = result.setdefault("network", {})
    network.setdefault("proxy_protocol", "v2")
    network.setdefault("trusted_proxies", ["127.0.0.1"])
    network.setdefault("bind_address", "127.0.0.1")
    result.setdefault("logging", {})["level"] = "debug"
    return result


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    made: list[Relay] = []
    yield made
    for relay in made:
        relay.close()


def relay(relays: list[Relay], daemon: Daemon, header: Callable[[tuple[str, int]], bytes],
          source: str = "127.0.0.1") -> int:
    made = Relay(daemon.port, header, source)
    relays.append(made)
    return made.port


def workers_for(daemon: Daemon) -> list[str]:
    """The peers the master started a worker for, in order."""
    return WORKER_STARTED.findall(daemon.log())


def health_check(port: int, header: bytes, called: str = "STORESCP",
                 source: str = "127.0.0.1") -> None:
    """The whole DICOM health check (healthcheck.py) on a raw socket, as HAProxy runs it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        for request, expected in ((header + healthcheck.associate_rq(called),
                                   healthcheck.ACCEPTED),
                                  (healthcheck.echo_rq(), healthcheck.ECHO_SUCCESS),
                                  (healthcheck.release_rq(), healthcheck.RELEASED)):
            sock.sendall(request)
            answer = b""
            while not re.search(expected, answer.hex()):
                chunk = sock.recv(65536)
                assert chunk, f"closed; got {answer.hex()}, expected {expected}"
                answer += chunk


def assert_still_serving(daemon: Daemon, relays: list[Relay]) -> None:
    assoc = associate(relay(relays, daemon, carrying("192.0.2.200")))
    with held(assoc):
        assert assoc.is_established
        echo_ok(assoc)
        assoc.release()


def passes(check: Callable[[], None]) -> bool:
    try:
        check()
    except AssertionError:
        return False
    return True


def associate_when_room(port: int) -> Any:
    """An established association, once the per-peer limit has room (the master counts a
    worker until it has reaped it, a moment after its association ended)."""
    def attempt() -> Any:
        assoc = associate(port)
        return assoc if assoc.is_established else None
    return wait_until(attempt, 10, "room under the per-peer limit")


def stats_of(daemon: Daemon) -> dict[str, int]:
    """Association counts by outcome from the counters file (after the daemon stopped)."""
    document = json.loads((daemon.out / ".ingestd-tmp" / "stats.json").read_text())
    counts: dict[str, int] = {}
    for entry in document["associations"]:
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + entry["count"]
    return counts


# -- the carried address is the peer -----------------------------------------------------------
def test_carried_address_is_the_peer_for_access_logs_records_and_jobs(
        daemon_factory: Factory, relays: list[Relay], recorder: Recorder,
        tmp_path: Path) -> None:
    daemon = daemon_factory(proxied(
        access={"allow": ["192.0.2.0/24"]},
        events={"exec_on_reception": recorder.command("--", "#r", "#a")}))
    allowed = relay(relays, daemon, carrying("192.0.2.7", 5555))
    storescu(allowed, *ct_copies(tmp_path / "in", 1, "a"))
    record = recorder.wait(1)[0]
    assert record["argv"] == ["--", "192.0.2.7", "STORESCU"]  # #r
    assert record["env"]["DICOM_PEER"] == "192.0.2.7"
    stored = daemon.wait_log("association released")
    assert re.search(r"192\.0\.2\.7:5555 via 127\.0\.0\.1:\d+ STORESCU->ANY-SCP: stored ",
                     stored), stored
    assert workers_for(daemon)[0].startswith("192.0.2.7:5555 via 127.0.0.1:")

    # The relay itself (127.0.0.1) is allowed nothing: only the carried address counts.
    denied = relay(relays, daemon, carrying("198.51.100.9", 4444))
    assert not associate(denied).is_established
    line = daemon.wait_log("refused by access control")
    assert re.search(r"198\.51\.100\.9:4444 via 127\.0\.0\.1:\d+: connection refused by "
                     r"access control: 198\.51\.100\.9 is not in access\.allow", line), line
    assert not any(w.startswith("198.51.100.9") for w in workers_for(daemon))
    assert len([p for p in daemon.files() if p.name.startswith("CT.")]) == 1
    daemon.stop()
    assert stats_of(daemon) == {"released": 1, "refused": 1}


def test_per_peer_limit_counts_carried_addresses_not_the_proxy(
        daemon_factory: Factory, relays: list[Relay]) -> None:
    daemon = daemon_factory(proxied(workers={"max_associations_per_peer": 1}))
    first_peer = relay(relays, daemon, carrying("192.0.2.7"))
    one = associate(first_peer)
    with held(one):
        assert one.is_established
        same = associate(first_peer)
        with held(same):
            assert_rejected_local_limit(same)
        daemon.wait_log("from 192.0.2.7 (workers.max_associations_per_peer = 1)")
        # Everyone comes from the proxy's address; another carried address is another peer,
        other = associate(relay(relays, daemon, carrying("192.0.2.8")))
        with held(other):
            assert other.is_established
            store_ok(other, ct_dataset())
            other.release()
        echo_ok(one)
        one.release()
    # The proxy's own LOCAL connections have the proxy for their peer: they count, keyed by
    # its address, with a sender on the balancer's host (a trusted proxy holding LOCAL
    # connections open is one peer, not unlimited).
    own = associate(relay(relays, daemon, carrying("127.0.0.1")))
    with held(own):
        assert own.is_established
        assert_rejected_local_limit(associate(relay(relays, daemon, carrying("127.0.0.1"))))
        assert_rejected_local_limit(associate(relay(relays, daemon, lambda _c: v2_local())))
        own.release()
    local = associate_when_room(relay(relays, daemon, lambda _c: v2_local()))
    with held(local):
        assert_rejected_local_limit(associate(relay(relays, daemon, carrying("127.0.0.1"))))
        local.release()
    wait_until(lambda: passes(lambda: health_check(daemon.port, v2_local())), 10,
               "a health check once the LOCAL association is gone")


def test_unknown_is_the_proxy_for_access_control_and_the_limit(
        daemon_factory: Factory, relays: list[Relay]) -> None:
    """v1 UNKNOWN and v2 "unspecified" carry no client: the proxy's own address stands in,
    for access control and the per-peer limit alike."""
    daemon = daemon_factory(proxied(
        network={"proxy_protocol": "any", "trusted_proxies": ["127.0.0.1", "127.0.0.2"]},
        access={"deny": ["127.0.0.2"]}, workers={"max_associations_per_peer": 1}))
    unknowns = (lambda _c: v1_unknown(), lambda _c: v2_raw(0x21, 0x00, b""))
    for header in unknowns:  # from the denied proxy: refused by access control
        assert not associate(relay(relays, daemon, header, source="127.0.0.2")).is_established
    wait_until(lambda: len(log_lines(daemon, "matches access.deny 127.0.0.2/32")) == 2, 10,
               "two refusals")
    assert re.search(r"127\.0\.0\.2:\d+ \(proxy, client address unknown\): connection "
                     r"refused by access control", daemon.log())
    own = associate(relay(relays, daemon, carrying("127.0.0.1")))
    with held(own):
        for header in unknowns:  # from 127.0.0.1, at its limit
            assert_rejected_local_limit(associate(relay(relays, daemon, header)))
        own.release()
    daemon.wait_log("associations in progress from 127.0.0.1 "
                    "(workers.max_associations_per_peer = 1)")
    for header in unknowns:
        assoc = associate_when_room(relay(relays, daemon, header))
        with held(assoc):
            store_ok(assoc, ct_dataset())
            assoc.release()
    assert len([p for p in daemon.files() if p.name.startswith("CT.")]) == 2


def test_ipv6_client_behind_an_ipv4_proxy(daemon_factory: Factory,
                                          relays: list[Relay]) -> None:
    daemon = daemon_factory(proxied(access={"deny": ["2001:db8::bad"]}))
    assoc = associate(relay(relays, daemon, carrying("2001:db8::7", 6000)))
    with held(assoc):
        assert assoc.is_established
        assoc.release()
    assert re.search(r"\[2001:db8::7\]:6000 via 127\.0\.0\.1:\d+ PMTEST->STORESCP: "
                     r"association released", daemon.wait_log("association released"))
    assert not associate(relay(relays, daemon, carrying("2001:db8::bad"))).is_established
    daemon.wait_log("2001:db8::bad matches access.deny 2001:db8::bad/128")


def test_ipv4_mapped_entries_match_on_a_dual_stack_listener(daemon_factory: Factory,
                                                            relays: list[Relay]) -> None:
    """trusted_proxies and access entries written as ::ffff:a.b.c.d (how a dual-stack socket
    shows an IPv4 balancer) are their IPv4 addresses: the balancer is trusted, the denied
    sender refused."""
    daemon = daemon_factory(proxied(network={"ip_version": "dual", "bind_address": "::",
                                             "trusted_proxies": ["::ffff:127.0.0.1"]},
                                    access={"deny": ["::ffff:192.0.2.66"]}))
    daemon.wait_log("behind a proxy (PROXY protocol v2 from 127.0.0.1/32)")
    assert_still_serving(daemon, relays)
    assert not associate(relay(relays, daemon, carrying("192.0.2.66"))).is_established
    daemon.wait_log("192.0.2.66 matches access.deny 192.0.2.66/32")
    assert not log_lines(daemon, "not one of network.trusted_proxies")


# -- who may send a header ---------------------------------------------------------------------
def test_untrusted_address_is_refused_unread_with_one_line(
        daemon_factory: Factory, relays: list[Relay]) -> None:
    daemon = daemon_factory(proxied())
    # A sender connecting directly, even with a header of its own, is never believed.
    with connect_from("127.0.0.2", daemon.port) as sock:
        sock.sendall(v2("192.0.2.7", "10.0.0.100", 1, 104) + healthcheck.associate_rq("X"))
        data, _ = recv_until_closed(sock, 5)
    assert data == b""
    daemon.wait_log("not one of network.trusted_proxies")
    lines = log_lines(daemon, "not one of network.trusted_proxies")
    assert len(lines) == 1 and "127.0.0.2:" in lines[0] and "192.0.2.7" not in lines[0], lines
    # A relay from an untrusted address is refused the same way.
    assert not associate(relay(relays, daemon, carrying("192.0.2.7"), source="127.0.0.3"))\
        .is_established
    wait_until(lambda: len(log_lines(daemon, "not one of network.trusted_proxies")) == 2, 5,
               "second refusal")
    assert workers_for(daemon) == []
    assert_still_serving(daemon, relays)


@pytest.mark.parametrize(("sent", "words"), [
    (healthcheck.associate_rq("STORESCP"),
     "PROXY protocol header refused: no PROXY protocol header: the connection starts with a "
     "DICOM A-ASSOCIATE-RQ (01 00 00 00 00 dc 00 01 ...): the proxy does not send the header "
     "(HAProxy: send-proxy-v2 on the server line)"),
    (b"GET / HTTP/1.1\r\n\r\n", "no PROXY protocol header (first bytes 47 45 54 20"),
    (v1("192.0.2.7", "10.0.0.100", 1, 104), "a PROXY protocol v1 header (\"PROXY ...\"), but "
     "network.proxy_protocol accepts v2 only"),
    (v2("192.0.2.7", "10.0.0.100", 1, 104)[:13] + b"\x13\x00\x00" + bytes(100),
     "PROXY v2 address family/transport 0x13 is not defined"),
    (v2("192.0.2.7", "10.0.0.100", 1, 104)[:14] + b"\xff\xff" + bytes(100),
     "announces 65535 bytes of addresses and TLVs (at most 4096 accepted)"),
    (v2("192.0.2.7", "10.0.0.100", 1, 104)[:20], "connection closed after 20 byte(s) of a "
     "PROXY protocol header"),
    (b"", "connection closed before a PROXY protocol header"),
])
def test_bad_header_is_dropped_with_one_line_and_no_worker(
        daemon_factory: Factory, relays: list[Relay], sent: bytes, words: str) -> None:
    daemon = daemon_factory(proxied())
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        data, _ = recv_until_closed(sock, 5)
    assert data == b""  # nothing is answered: there is no association to answer
    line = daemon.wait_log(words)
    assert re.search(r"WARNING \[\d+\] proxy 127\.0\.0\.1:\d+: ", line)
    assert len(log_lines(daemon, "proxy 127.0.0.1:")) == 1
    assert workers_for(daemon) == []
    assert_still_serving(daemon, relays)


def test_slow_header_is_dropped_at_the_acse_timeout_while_others_are_served(
        daemon_factory: Factory, relays: list[Relay]) -> None:
    """A byte of header every 0.5 s: each read is quick, the header never completes; the
    deadline covers the whole header.  Meanwhile associations go on."""
    daemon = daemon_factory(proxied(network={"acse_timeout": 3}))
    header = v2("192.0.2.7", "10.0.0.100", 1, 104)
    with socket.create_connection(("127.0.0.1", daemon.port)) as slow:
        slow.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = 0
        try:
            for byte in header[:-1]:
                slow.sendall(bytes([byte]))
                sent += 1
                if sent == 2:
                    assert_still_serving(daemon, relays)
                time.sleep(0.5)
        except OSError:
            pass  # closed by the daemon
        data, _ = recv_until_closed(slow, 10)
    assert data == b""
    assert sent < len(header) - 1, "not dropped before the header could complete"
    line = daemon.wait_log("no complete PROXY protocol header within 3 s")
    assert re.search(r"proxy 127\.0\.0\.1:\d+: no complete PROXY protocol header within 3 s "
                     r"\(network\.acse_timeout; \d+ byte\(s\) received\); connection closed",
                     line), line
    assert all(w.startswith("192.0.2.200") for w in workers_for(daemon))
    assert_still_serving(daemon, relays)


def test_pending_headers_are_capped_fairly(daemon_factory: Factory,
                                          relays: list[Relay]) -> None:
    """Silent connections from a trusted address hold a descriptor each, until the ACSE
    timeout and at most MAX_PENDING at once: past that, the source holding the most loses
    its oldest (one line, naming it).  Meanwhile another proxy's connections are served:
    a header that came with its connection never waits, so never meets the cap, and a
    balancer's health check still passes (HAProxy would otherwise mark the instance DOWN)."""
    daemon = daemon_factory(proxied(network={"acse_timeout": 3,
                                             "trusted_proxies": ["127.0.0.1", "127.0.0.3"]}))
    silent = [connect_from("127.0.0.3", daemon.port) for _ in range(MAX_PENDING + 5)]
    try:
        # Accepted after the silent ones (the backlog is in order): the stage is full.
        health_check(daemon.port, v2_local())
        assert_still_serving(daemon, relays)
        line = daemon.wait_log(f"proxy 127.0.0.3 holds {MAX_PENDING} of the {MAX_PENDING} "
                               "connections waiting for their PROXY protocol header, the "
                               "most: closing its oldest (127.0.0.3:")
        assert line.count("closing its oldest") == 1
        closed = 0
        for sock in silent[:5]:
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                closed += sock.recv(1) == b""
        assert closed == 5  # the oldest ones
        # One that must wait (its header split) takes a slot from 127.0.0.3, not its own.
        with socket.create_connection(("127.0.0.1", daemon.port)) as slow:
            slow.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            header = v2("192.0.2.9", "10.0.0.100", 1, 104)
            slow.sendall(header[:10])
            time.sleep(0.5)  # in the stage by now (the unit test checks who makes room)
            slow.sendall(header[10:] + healthcheck.associate_rq("STORESCP"))
            slow.settimeout(10)
            answer = slow.recv(65536)
            assert answer[:1] == b"\x02", answer[:16]  # A-ASSOCIATE-AC
        wait_until(lambda: len(log_lines(daemon, "no complete PROXY protocol header")) >=
                   MAX_PENDING - 1, 15, "the pending connections timed out")
    finally:
        for sock in silent:
            sock.close()
    assert all(not w.startswith("127.0.0.3") for w in workers_for(daemon))
    assert not log_lines(daemon, "proxy 127.0.0.1:")  # nothing of 127.0.0.1's was dropped


# -- LOCAL: the proxy's own connection (its health checks) --------------------------------------
LOCAL = "(proxy's own connection, LOCAL)"


def c_store_rq(context_id: int, ds: Dataset) -> bytes:
    """A C-STORE-RQ and its data set (Implicit VR Little Endian) as two P-DATA-TF PDUs, made
    by hand: pynetdicom sends nothing on a context that was not accepted for the SOP class."""
    command = wire.c_store_rq(str(ds.SOPClassUID), str(ds.SOPInstanceUID), message_id=7)
    data = DicomBytesIO()
    write_dataset(data, ds, "<")  # implicit VR little endian: no VR argument
    return wire.p_data(context_id, 0x03, command) + wire.p_data(context_id, 0x02, data.getvalue())


def test_local_connection_may_only_verify(daemon_factory: Factory, relays: list[Relay],
                                          tmp_path: Path) -> None:
    """The proxy's own connection (HAProxy also relays every client of a Unix-socket
    frontend as LOCAL; any trusted host can write the header) gets Verification and
    nothing else, whatever it proposes; and its lines are not hidden at debug level."""
    daemon = daemon_factory(proxied(access={"allow": ["192.0.2.0/24"]}))
    local = relay(relays, daemon, lambda _client: v2_local())
    result = storescu(local, *ct_copies(tmp_path / "in", 2, "a"), check=False)
    assert result.returncode != 0
    line = daemon.wait_log("may only use Verification")
    assert re.search(r"WARNING \[\d+\] 127\.0\.0\.1:\d+ \(proxy's own connection, LOCAL\) "
                     r"STORESCU->ANY-SCP: 128 context\(s\) rejected: a PROXY protocol LOCAL "
                     r"connection is the proxy's own and may only use Verification .*; "
                     r"rejected: .* Storage with .*\(rejected by us\)", line), line
    assert re.search(r"INFO .* STORESCU->ANY-SCP: association requested", daemon.log())

    # Proposing storage and Verification: Verification alone is accepted, with result 1.
    assoc = associate(local)
    with held(assoc):
        assert assoc.is_established
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == \
            ["1.2.840.10008.1.1"]
        assert [(str(cx.abstract_syntax), cx.result) for cx in assoc.rejected_contexts] == \
            [("1.2.840.10008.5.1.4.1.1.2", 1)]
        echo_ok(assoc)
        assoc.release()
    daemon.wait_log("PMTEST->STORESCP: association released")
    assert log_lines(daemon, "PMTEST->STORESCP: association released")[0].split()[2] == "INFO"

    # A C-STORE on the Verification context itself (SOP class "Verification", which the
    # context's abstract syntax matches) is refused: 0x0124, Not Authorized.
    ds = ct_dataset()
    ds.SOPClassUID = "1.2.840.10008.1.1"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(v2_local() + healthcheck.associate_rq("STORESCP", "FORGER"))
        answer = b""
        while not re.search(healthcheck.ACCEPTED, answer.hex()):
            chunk = sock.recv(65536)
            assert chunk, answer.hex()
            answer += chunk
        sock.sendall(c_store_rq(healthcheck.CONTEXT_ID, ds))
        answer = b""
        status = r"^04(..)*00000009020000002401"  # (0000,0900) = 0x0124
        while not re.search(status, answer.hex()):
            chunk = sock.recv(65536)
            assert chunk, answer.hex()
            answer += chunk
        sock.sendall(healthcheck.release_rq())
        recv_until_closed(sock, 5)
    line = daemon.wait_log("FORGER->STORESCP: association released")
    assert re.search(rf"ERROR .*FORGER->STORESCP: C-STORE of {ds.SOPInstanceUID} failed with "
                     r"0x0124 NOT_AUTHORIZED: refused on a PROXY protocol LOCAL connection",
                     line), line
    assert not [p for p in daemon.files() if ds.SOPInstanceUID in p.name]
    assert [p for p in daemon.files()] == []
    daemon.stop()
    assert "health-check" not in stats_of(daemon)


def test_health_check_is_a_clean_local_association_logged_at_debug(
        daemon_factory: Factory, relays: list[Relay]) -> None:
    daemon = daemon_factory(proxied(access={"allow": ["192.0.2.0/24"]},
                                    association={"require_called_aetitle": True}))
    health_check(daemon.port, v2_local())
    health_check(daemon.port, v2_local(bytes(12), family=0x11))
    # HAProxy's plain `check` behind send-proxy-v2: the header, then a close (or a reset).
    for linger in (False, True):
        with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
            if linger:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(v2_local())
            time.sleep(0.2)
    wait_until(lambda: len(log_lines(daemon, f"{LOCAL} ?->?: ")) == 2, 10, "TCP checks")
    log = daemon.wait_log(f"{LOCAL} HEALTHCHECK->STORESCP: association released")
    # Every line of it at debug level: one every few seconds would drown the log.
    assert not [line for line in log.splitlines()
                if "LOCAL" in line and " DEBUG " not in line], log
    # The proxy itself is not in access.allow: a PROXY connection "from" it is refused.
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(v2("127.0.0.1", "127.0.0.1", 1, 104) + healthcheck.associate_rq("X"))
        assert recv_until_closed(sock, 5)[0] == b""
    daemon.wait_log("127.0.0.1:1 via 127.0.0.1:")
    # A health check that fails (wrong called AE) fails: the check is a real association,
    # and its failure is a warning.
    with pytest.raises(AssertionError, match="closed"):
        health_check(daemon.port, v2_local(), called="WRONG")
    line = daemon.wait_log("association rejected: called AE title 'WRONG'")
    assert re.search(rf"WARNING .*{re.escape(LOCAL)} HEALTHCHECK->WRONG: association rejected",
                     line)
    daemon.stop()
    counts = stats_of(daemon)
    assert counts["health-check"] == 4 and "released" not in counts, counts


def run_printed_check(port: int, rules: str, header: bytes, timeout: float = 10) -> None:
    """The tcp-check rules `config haproxy-check` printed, run as HAProxy runs them: each
    send-binary sent, each expect rbinary matched on the hexadecimal answer (HAProxy's
    `timeout check`: TimeoutError)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(header)
        for line in rules.splitlines():
            words = line.split()
            if words[:2] == ["tcp-check", "send-binary"]:
                sock.sendall(bytes.fromhex(words[2]))
            elif words[:3] == ["tcp-check", "expect", "rbinary"]:
                answer = b""
                while not re.search(words[3], answer.hex()):
                    chunk = sock.recv(65536)
                    assert chunk, f"closed; got {answer.hex()}, expected {words[3]}"
                    answer += chunk


def test_the_printed_health_check_passes_under_a_negotiation_profile(
        daemon_factory: Factory) -> None:
    daemon = daemon_factory(proxied(negotiation={
        "profile": "P", "transfer_syntaxes": {"Explicit": ["ExplicitVRLittleEndian"]},
        "profiles": {"P": {"contexts": {"Verification": "Explicit",
                                        "CTImageStorage": "Explicit"}}}}))
    printed = subprocess.run([sys.executable, "-m", "dicom_ingestd", "config", "haproxy-check",
                              "-c", str(daemon.config_path)], capture_output=True, text=True,
                             timeout=60, cwd=REPO, check=True).stdout
    run_printed_check(daemon.port, printed, v2_local())
    daemon.wait_log(f"{LOCAL} HEALTHCHECK->STORESCP: association released")
    # The default rules (Implicit VR Little Endian) could never pass here: the context is
    # rejected, the expected acceptance never comes.
    with pytest.raises(TimeoutError):
        run_printed_check(daemon.port, healthcheck.haproxy_rules("STORESCP"), v2_local(), 2)


# -- versions ----------------------------------------------------------------------------------
def test_v1_mode(daemon_factory: Factory, relays: list[Relay], tmp_path: Path) -> None:
    daemon = daemon_factory(proxied(network={"proxy_protocol": "v1"}))
    port = relay(relays, daemon, lambda client: v1("192.0.2.9", "10.0.0.100", client[1], 104))
    storescu(port, *ct_copies(tmp_path / "in", 2, "a"))
    assert re.search(r"192\.0\.2\.9:\d+ via 127\.0\.0\.1:\d+ STORESCU->ANY-SCP: association "
                     r"released: 2 stored", daemon.wait_log("association released"))
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(v2_local())
        assert recv_until_closed(sock, 5)[0] == b""
    daemon.wait_log("network.proxy_protocol accepts v1 only")


def test_any_mode_takes_both_versions(daemon_factory: Factory, relays: list[Relay]) -> None:
    daemon = daemon_factory(proxied(network={"proxy_protocol": "any"}))
    for header in (lambda c: v1("192.0.2.1", "10.0.0.100", c[1], 104),
                   lambda c: v2("192.0.2.2", "10.0.0.100", c[1], 104)):
        assoc = associate(relay(relays, daemon, header))
        with held(assoc):
            echo_ok(assoc)
            assoc.release()
    log = daemon.wait_log("192.0.2.2")
    assert "192.0.2.1:" in log and "192.0.2.2:" in log


# -- process models, TLS, reload ---------------------------------------------------------------
def test_single_process_model(daemon_factory: Factory, relays: list[Relay]) -> None:
    daemon = daemon_factory(proxied(workers={"process_model": "single"}))
    assoc = associate(relay(relays, daemon, carrying("192.0.2.7")))
    with held(assoc):
        store_ok(assoc, ct_dataset())
        assoc.release()
    health_check(daemon.port, v2_local())
    assert re.search(r"192\.0\.2\.7:\d+ via 127\.0\.0\.1:\d+ PMTEST->STORESCP: stored",
                     daemon.wait_log("stored"))


def test_header_comes_before_tls(daemon_factory: Factory, relays: list[Relay],
                                 tmp_path: Path) -> None:
    import tls_certs
    from test_tls import client, tls_table

    certs = tls_certs.make(tmp_path / "certs")
    daemon = daemon_factory(proxied(tls=tls_table(certs)))
    port = relay(relays, daemon, carrying("192.0.2.7"))
    storescu(port, *ct_copies(tmp_path / "in", 1, "a"), extra=client(certs, certs.client))
    line = daemon.wait_log("association accepted")
    assert re.search(r"192\.0\.2\.7:\d+ via 127\.0\.0\.1:\d+ STORESCU->ANY-SCP: association "
                     r"accepted .* over TLSv1\.\d", line), line


def test_reload_turns_the_proxy_protocol_on(daemon_factory: Factory,
                                            relays: list[Relay]) -> None:
    daemon = daemon_factory(proxied(network={"proxy_protocol": "off", "trusted_proxies": []}))
    direct = associate(daemon.port)
    with held(direct):
        echo_ok(direct)
        direct.release()
    config = daemon.config_path.read_text().replace('proxy_protocol = "off"',
                                                    'proxy_protocol = "v2"')
    config = config.replace("trusted_proxies = []", 'trusted_proxies = ["127.0.0.1"]')
    daemon.config_path.write_text(config)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("network.proxy_protocol, network.trusted_proxies")
    assert not associate(daemon.port).is_established
    daemon.wait_log("the connection starts with a DICOM A-ASSOCIATE-RQ")
    assert_still_serving(daemon, relays)


# -- socket activation: Accept=no (the master) and Accept=yes / inetd (one process each) --------
def activated(tmp_path: Path, options: list[str], **tables: dict[str, Any]) -> Daemon:
    return socket_activated(tmp_path, options, proxied(**tables))


@pytest.mark.parametrize("options", [[], ["--accept"], ["--accept", "--inetd"]],
                         ids=["accept-no", "accept-yes", "inetd"])
def test_socket_activation(tmp_path: Path, relays: list[Relay], options: list[str]) -> None:
    tables: dict[str, dict[str, Any]] = {"access": {"deny": ["192.0.2.66"]},
                                         "network": {"acse_timeout": 3}}
    if "--inetd" in options:
        tables["network"]["inetd"] = True
    run = activated(tmp_path, options, **tables)
    proc, port, log_path = run.proc, run.port, run.log_path
    try:
        relay_port = Relay(port, carrying("192.0.2.7"))
        relays.append(relay_port)
        assoc = associate(relay_port.port)
        with held(assoc):
            store_ok(assoc, ct_dataset())
            assoc.release()
        health_check(port, v2_local())
        denied = Relay(port, carrying("192.0.2.66"))
        relays.append(denied)
        assert not associate(denied.port).is_established
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"\r\n\r\n")
            assert recv_until_closed(slow, 10)[0] == b""
        with connect_from("127.0.0.2", port) as untrusted:
            assert recv_until_closed(untrusted, 10)[0] == b""

        def logged(text: str) -> bool:
            return text in log_path.read_text()
        for text in ("192.0.2.7", "PMTEST->STORESCP: stored",
                     "192.0.2.66 matches access.deny",
                     "no complete PROXY protocol header within 3 s",
                     "not one of network.trusted_proxies"):
            wait_until(lambda t=text: logged(t), 15, text)
        log = log_path.read_text()
        assert re.search(r"192\.0\.2\.7:\d+ via 127\.0\.0\.1:\d+ PMTEST->STORESCP: stored", log)
        assert re.search(r"127\.0\.0\.1:\d+ \(proxy's own connection, LOCAL\) "
                         r"HEALTHCHECK->STORESCP: association released", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
