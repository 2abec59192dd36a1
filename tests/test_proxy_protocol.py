"""The PROXY protocol parser (dicom_ingestd/proxy.py), its reader on real sockets
(proxy_reader.py), the Peer it makes, and the configuration keys.

The headers come from tests/proxy_headers.py, written from the specification separately from
the parser.  The daemon-level behaviour (trusted proxies, slow and bad headers, health
checks, every process model and socket activation) is in test_proxy_daemon.py; HAProxy
itself in test_scale_out.py.
"""

import ipaddress
import logging
import random
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_headers import SIGNATURE, tlv, v1, v1_unknown, v2, v2_local, v2_raw
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context
from support.daemon import REPO

from dicom_ingestd import healthcheck, proxy
from dicom_ingestd.access import AccessPolicy, parse_network, parse_networks
from dicom_ingestd.config.load import load_config
from dicom_ingestd.config.schema import Config
from dicom_ingestd.errors import ConfigError
from dicom_ingestd.peer import Peer, Via
from dicom_ingestd.proxy import (
    Command,
    Endpoint,
    MalformedHeader,
    NotProxyProtocol,
    OversizedHeader,
    ProxyHeader,
    Version,
    VersionNotAccepted,
    parse,
)
from dicom_ingestd.proxy_reader import (
    MAX_PENDING,
    Dropped,
    HeaderReader,
    PendingHeaders,
    ProxyPolicy,
    peer_of,
    read_peer,
)
from dicom_ingestd.worker import acceptor

ANY = proxy.VERSIONS["any"]
V1 = proxy.VERSIONS["v1"]
V2 = proxy.VERSIONS["v2"]
A_ASSOCIATE_RQ_START = bytes.fromhex("01000000 00cd 0001 0000".replace(" ", ""))


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# -- valid headers -----------------------------------------------------------------------------
VALID = [
    (v1("192.168.0.1", "192.168.0.11", 56324, 443), V1,
     ProxyHeader(Version.V1, Command.PROXY, Endpoint(ip("192.168.0.1"), 56324),
                 Endpoint(ip("192.168.0.11"), 443), 47)),
    (v1("255.255.255.255", "255.255.255.255", 65535, 65535), V1,  # the longest TCP4 line
     ProxyHeader(Version.V1, Command.PROXY, Endpoint(ip("255.255.255.255"), 65535),
                 Endpoint(ip("255.255.255.255"), 65535), 56)),
    (v1("0.0.0.0", "10.0.0.1", 0, 104), V1,
     ProxyHeader(Version.V1, Command.PROXY, Endpoint(ip("0.0.0.0"), 0),
                 Endpoint(ip("10.0.0.1"), 104), 35)),
    (v1("2001:db8::1", "2001:db8::2", 4242, 104), V1,
     ProxyHeader(Version.V1, Command.PROXY, Endpoint(ip("2001:db8::1"), 4242),
                 Endpoint(ip("2001:db8::2"), 104), 45)),
    (v1(":".join(["ffff"] * 8), ":".join(["FFFF"] * 8), 65535, 65535), V1,  # 104 bytes
     ProxyHeader(Version.V1, Command.PROXY, Endpoint(ip(":".join(["ffff"] * 8)), 65535),
                 Endpoint(ip(":".join(["ffff"] * 8)), 65535), 104)),
    (v1("::ffff:10.1.2.3", "::1", 1, 2), V1,  # inet_ntop's form of a mapped address
     ProxyHeader(Version.V1, Command.PROXY, Endpoint(ip("::ffff:10.1.2.3"), 1),
                 Endpoint(ip("::1"), 2), 36)),
    (v1_unknown(), V1, ProxyHeader(Version.V1, Command.PROXY, None, None, 15)),
    (v1_unknown(" " + ":".join(["ffff"] * 8) + " " + ":".join(["ffff"] * 8) + " 65535 65535"),
     V1, ProxyHeader(Version.V1, Command.PROXY, None, None, 107)),  # the worst case
    (v1_unknown(" anything at all"), V1,
     ProxyHeader(Version.V1, Command.PROXY, None, None, 31)),
    (v2("10.1.2.3", "10.0.0.1", 52000, 104), V2,
     ProxyHeader(Version.V2, Command.PROXY, Endpoint(ip("10.1.2.3"), 52000),
                 Endpoint(ip("10.0.0.1"), 104), 28)),
    (v2("2001:db8::7", "2001:db8::1", 52000, 11112), V2,
     ProxyHeader(Version.V2, Command.PROXY, Endpoint(ip("2001:db8::7"), 52000),
                 Endpoint(ip("2001:db8::1"), 11112), 52)),
    (v2_local(), V2, ProxyHeader(Version.V2, Command.LOCAL, None, None, 16)),
    # LOCAL with an address block (allowed; the block and the family are ignored)
    (v2_local(bytes(12), family=0x11), V2, ProxyHeader(Version.V2, Command.LOCAL, None, None,
                                                       28)),
    (v2_local(b"\xff" * 5, family=0xFF), V2, ProxyHeader(Version.V2, Command.LOCAL, None,
                                                         None, 21)),
    # PROXY with AF_UNSPEC, UDP and AF_UNIX: "unspecified", the connection's endpoints apply
    (v2_raw(0x21, 0x00, b""), V2, ProxyHeader(Version.V2, Command.PROXY, None, None, 16)),
    (v2_raw(0x21, 0x00, b"opaque"), V2, ProxyHeader(Version.V2, Command.PROXY, None, None, 22)),
    (v2("10.1.2.3", "10.0.0.1", 53, 53, family=0x12), V2,
     ProxyHeader(Version.V2, Command.PROXY, None, None, 28)),
    (v2_raw(0x21, 0x31, bytes(216)), V2, ProxyHeader(Version.V2, Command.PROXY, None, None,
                                                     232)),
    # TLVs are skipped: NOOP, UNIQUE_ID, SSL with sub-TLVs, CRC32C (not verified), custom
    (v2("10.1.2.3", "10.0.0.1", 1, 2, tlv(0x04, b"") + tlv(0x05, b"x" * 128)
        + tlv(0x20, b"\x01" + bytes(4) + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"ct1"))
        + tlv(0x03, b"\xde\xad\xbe\xef") + tlv(0xE0, b"local")), V2,
     ProxyHeader(Version.V2, Command.PROXY, Endpoint(ip("10.1.2.3"), 1),
                 Endpoint(ip("10.0.0.1"), 2), 28 + 3 + 131 + 3 + 5 + 10 + 6 + 7 + 8)),
    # the largest payload we accept
    (v2("10.1.2.3", "10.0.0.1", 1, 2, tlv(0x04, bytes(proxy.MAX_V2_PAYLOAD - 12 - 3))), V2,
     ProxyHeader(Version.V2, Command.PROXY, Endpoint(ip("10.1.2.3"), 1),
                 Endpoint(ip("10.0.0.1"), 2), proxy.MAX_HEADER)),
]


@pytest.mark.parametrize(("data", "versions", "expected"), VALID)
def test_valid_headers(data: bytes, versions: frozenset[Version], expected: ProxyHeader) -> None:
    assert len(data) == expected.length
    assert parse(data, versions) == expected
    assert parse(data, ANY) == expected
    # What follows the header is the application's, whatever it is.
    for after in (A_ASSOCIATE_RQ_START, b"\r\n", b"PROXY ", SIGNATURE, bytes(proxy.MAX_HEADER)):
        assert parse(data + after, versions) == expected


@pytest.mark.parametrize(("data", "versions", "expected"), VALID)
def test_every_proper_prefix_is_incomplete(data: bytes, versions: frozenset[Version],
                                           expected: ProxyHeader) -> None:
    """Truncated headers never yield a result, and never an error either: a header cut by
    TCP segmentation (or sent a byte at a time) is just not complete yet."""
    for end in range(len(data)):
        assert parse(data[:end], versions) is None, end


def test_v2_ipv4_mapped_source_is_the_ipv4_peer() -> None:
    header = parse(v2("::ffff:10.1.2.3", "::ffff:10.0.0.1", 5000, 104), V2)
    assert header is not None and header.source is not None
    peer = peer_of(Peer("127.0.0.1", 40000), header)
    assert (peer.host, peer.port, peer.key) == ("10.1.2.3", 5000, "10.1.2.3")


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "error", "words"), [
    # v1 syntax
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", MalformedHeader, "protocol ''"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", MalformedHeader, "6 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", MalformedHeader, "6 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", MalformedHeader, "6 fields"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", MalformedHeader, "'TCP5'"),
    (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", MalformedHeader, "'tcp4'"),
    (b"PROXY \r\n", MalformedHeader, "protocol ''"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", MalformedHeader, "'01.2.3.4'"),
    (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", MalformedHeader, "'1.2.3.256'"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", MalformedHeader, "'1.2.3'"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", MalformedHeader, "not an IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", MalformedHeader, "not an IPv6"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", MalformedHeader, "fe80::1%eth0"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", MalformedHeader, "port '01'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", MalformedHeader, "port '65536'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", MalformedHeader, "port '-1'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", MalformedHeader, "non-ASCII"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\t2\r\n", MalformedHeader, "control"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", MalformedHeader, "lone LF"),
    (b"PROXY TCP4 1.2.3.4\n", MalformedHeader, "lone LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", MalformedHeader, "lone CR"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", MalformedHeader, "lone CR"),
    (b"PROXY UNKNOWN\n", MalformedHeader, "lone LF"),
    (b"PROXY UNKNOWN" + b" " * 93 + b"\r\n", OversizedHeader, "107"),  # 108 bytes
    (b"PROXY " + b"A" * 200, OversizedHeader, "107"),
    (b"PROXYTCP4", NotProxyProtocol, "50 52 4f 58 59 54"),
    (b"PROX\r\n", NotProxyProtocol, "first bytes"),
    # v2 fixed part
    (SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), MalformedHeader, "version 1"),
    (SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), MalformedHeader, "version 3"),
    (SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), MalformedHeader, "command 2"),
    (SIGNATURE + b"\x2f", MalformedHeader, "command 15"),  # found before the rest
    (SIGNATURE[:11] + b"X", NotProxyProtocol, "first bytes"),
    # v2 family and lengths
    (v2_raw(0x21, 0x13, bytes(12)), MalformedHeader, "0x13"),
    (v2_raw(0x21, 0x40, bytes(12)), MalformedHeader, "0x40"),
    (v2_raw(0x21, 0x01, bytes(12)), MalformedHeader, "0x01"),
    (v2_raw(0x21, 0x11, bytes(11)), MalformedHeader, "11 bytes"),
    (v2_raw(0x21, 0x21, bytes(35)), MalformedHeader, "35 bytes"),
    (v2_raw(0x21, 0x31, bytes(215)), MalformedHeader, "215 bytes"),
    (v2("10.1.2.3", "10.0.0.1", 1, 2, b"\x04\x00"), MalformedHeader, "truncated"),
    (v2("10.1.2.3", "10.0.0.1", 1, 2, b"\x05\x00\x10" + bytes(15)), MalformedHeader,
     "runs past"),
    (v2("10.1.2.3", "10.0.0.1", 1, 2, tlv(0x04, b"") + b"\x20\xff\xff"), MalformedHeader,
     "type 0x20"),
    # announced too long: refused from the 16 fixed bytes alone, never waited for
    (SIGNATURE + b"\x21\x11" + struct.pack(">H", proxy.MAX_V2_PAYLOAD + 1), OversizedHeader,
     f"{proxy.MAX_V2_PAYLOAD + 1} bytes"),
    (SIGNATURE + b"\x21\x11\xff\xff", OversizedHeader, "65535 bytes"),
    (SIGNATURE + b"\x20\x00\xff\xff", OversizedHeader, "65535 bytes"),  # LOCAL too
    # not the protocol at all
    (A_ASSOCIATE_RQ_START, NotProxyProtocol, "A-ASSOCIATE-RQ"),
    (b"GET / HTTP/1.1\r\n", NotProxyProtocol, "47 45 54 20"),
    (b"\x16\x03\x01\x02\x00\x01", NotProxyProtocol, "16 03 01"),  # a TLS ClientHello
    (b"\x00", NotProxyProtocol, "00"),
    (b"\r\n\r\n\r\n", NotProxyProtocol, "0d 0a 0d 0a 0d"),
])
def test_bad_headers(data: bytes, error: type[proxy.HeaderError], words: str) -> None:
    with pytest.raises(error) as info:
        parse(data, ANY)
    assert words in str(info.value)
    assert isinstance(info.value, proxy.HeaderError)


def test_a_version_not_configured_is_refused_not_guessed() -> None:
    with pytest.raises(VersionNotAccepted, match="accepts v2 only"):
        parse(b"P", V2)
    with pytest.raises(VersionNotAccepted, match="accepts v1 only"):
        parse(b"\r", V1)
    with pytest.raises(NotProxyProtocol):
        parse(A_ASSOCIATE_RQ_START, V2)


def test_random_input_never_escapes_the_error_types_or_the_bounds() -> None:
    """Garbage and mutated headers: a header, None (only while shorter than the largest
    header: the reader can always consume what it peeked), or a HeaderError; a header's
    length never exceeds the data, and the bytes after it never change the answer."""
    rng = random.Random(20)
    seeds = [data for data, _, _ in VALID]
    for _ in range(20000):
        if rng.random() < 0.3:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                position = rng.randrange(len(data))
                action = rng.randrange(3)
                if action == 0:
                    data[position] = rng.randrange(256)
                elif action == 1:
                    del data[position]
                else:
                    data.insert(position, rng.randrange(256))
            data = bytes(data)
        try:
            header = parse(data, ANY)
        except proxy.HeaderError:
            continue
        if header is None:
            assert len(data) < proxy.MAX_HEADER
            continue
        assert header.length <= len(data)
        assert parse(data[:header.length] + b"\x01\x00tail", ANY) == header


# -- the reader: real sockets, never a byte past the header ------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(proxy end, daemon end) of a TCP connection on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
    with client, conn:
        yield client, conn


def drain(sock: socket.socket, count: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


@pytest.mark.parametrize("header", [v1("10.1.2.3", "10.0.0.1", 5000, 104),
                                    v1_unknown(" x"), v2("10.1.2.3", "10.0.0.1", 5000, 104),
                                    v2_local(), v2("2001:db8::1", "::1", 1, 2,
                                                   tlv(0x05, b"id"))])
def test_header_and_dicom_in_one_segment_leaves_the_dicom_bytes(
        pair: tuple[socket.socket, socket.socket], header: bytes) -> None:
    client, conn = pair
    after = A_ASSOCIATE_RQ_START + b"\r\n\r\nPROXY " + bytes(3000)
    client.sendall(header + after)
    time.sleep(0.05)  # all of it queued: the reader must still stop at the header
    conn.setblocking(False)
    reader = HeaderReader(conn, ANY)
    result = reader.step()
    assert result is not None and result.length == len(header)
    assert reader.received == len(header)
    conn.setblocking(True)
    assert drain(conn, len(after)) == after


@pytest.mark.parametrize("header", [v1("2001:db8::1", "2001:db8::2", 65535, 104),
                                    v2("10.1.2.3", "10.0.0.1", 5000, 104, tlv(0x04, b"pad"))])
def test_header_a_byte_at_a_time(pair: tuple[socket.socket, socket.socket],
                                 header: bytes) -> None:
    """Non-blocking steps take every byte that arrived (so the socket stops being readable:
    the master's selector cannot spin), answer None until the last, then stop exactly."""
    client, conn = pair
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(False)
    reader = HeaderReader(conn, ANY)
    assert reader.step() is None  # nothing yet
    for index, byte in enumerate(header):
        client.sendall(bytes([byte]) + (A_ASSOCIATE_RQ_START if index == len(header) - 1
                                        else b""))
        deadline = time.monotonic() + 5
        while reader.received <= index:
            result = reader.step()
            assert time.monotonic() < deadline
        assert reader.received == index + 1
        assert (result is not None) == (index == len(header) - 1)
    conn.setblocking(True)
    assert drain(conn, len(A_ASSOCIATE_RQ_START)) == A_ASSOCIATE_RQ_START


@pytest.mark.parametrize(("sent", "words"), [
    (b"", "closed before a PROXY protocol header"),
    (v2("10.1.2.3", "10.0.0.1", 1, 2)[:20], "closed after 20 byte(s)"),
    (b"PROXY TCP4 1.2", "closed after 14 byte(s)"),
])
def test_connection_closed_during_the_header(pair: tuple[socket.socket, socket.socket],
                                             sent: bytes, words: str) -> None:
    client, conn = pair
    client.sendall(sent)
    client.shutdown(socket.SHUT_WR)
    reader = HeaderReader(conn, ANY)
    with pytest.raises(Dropped) as info:
        while reader.step() is None:
            pass
    assert info.value.outcome == "dropped" and words in str(info.value)


def test_blocking_read_of_a_slow_header_ends_at_the_deadline(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Accept=yes / inetd: a header trickling a byte at a time past the timeout is dropped
    (the deadline covers the whole header, not each read)."""
    client, conn = pair
    header = v2("10.1.2.3", "10.0.0.1", 1, 2)
    stop = threading.Event()

    def trickle() -> None:
        for byte in header:
            if stop.wait(0.3):
                return
            try:
                client.sendall(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=trickle)
    thread.start()
    policy = ProxyPolicy(V2, (ipaddress.ip_network("127.0.0.1/32"),), 1.0, "v2")
    try:
        with pytest.raises(Dropped) as info:
            read_peer(conn, Peer("127.0.0.1", 40000), policy)
    finally:
        stop.set()
        thread.join()
    assert info.value.outcome == "timeout"
    assert "no complete PROXY protocol header within 1 s" in str(info.value)
    assert "byte(s) received" in str(info.value)


def test_blocking_read_refuses_an_untrusted_peer_unread(
        pair: tuple[socket.socket, socket.socket]) -> None:
    client, conn = pair
    client.sendall(v2("10.1.2.3", "10.0.0.1", 1, 2))
    policy = ProxyPolicy(V2, (ipaddress.ip_network("10.0.0.0/8"),), 1.0, "v2")
    with pytest.raises(Dropped) as info:
        read_peer(conn, Peer("127.0.0.1", 40000), policy)
    assert info.value.outcome == "refused"
    assert "not one of network.trusted_proxies" in str(info.value)
    conn.setblocking(False)
    assert len(conn.recv(100, socket.MSG_PEEK)) == 28  # not a byte taken


def test_proxy_off_reads_nothing(pair: tuple[socket.socket, socket.socket]) -> None:
    client, conn = pair
    client.sendall(v2("10.1.2.3", "10.0.0.1", 1, 2))
    tcp_peer = Peer("127.0.0.1", 40000)
    assert read_peer(conn, tcp_peer, ProxyPolicy.from_config(Config().network)) is tcp_peer


# -- the master's stage: read first, and a fair share of MAX_PENDING -----------------------------
def test_pending_stage_reads_first_and_makes_room_fairly(
        caplog: pytest.LogCaptureFixture) -> None:
    """One source holding every slot costs the others nothing: a connection whose header
    is in never waits (so never meets the cap), and one that must wait pushes out the
    oldest connection of the source holding the most; the line names that source."""
    selector = selectors.DefaultSelector()
    admitted: list[tuple[socket.socket, Peer]] = []
    dropped: list[str] = []
    stage = PendingHeaders(selector, lambda conn, peer: admitted.append((conn, peer)),
                           dropped.append)
    policy = ProxyPolicy(V2, (ipaddress.ip_network("127.0.0.0/8"),), 30.0, "v2")
    ends: list[socket.socket] = []

    def connect(source: str, sent: bytes = b"") -> tuple[socket.socket, socket.socket]:
        proxy_end, daemon_end = socket.socketpair()
        ends.extend((proxy_end, daemon_end))
        proxy_end.sendall(sent)
        stage.take(daemon_end, Peer(source, 40000 + len(ends)), policy)
        return proxy_end, daemon_end

    def closed(proxy_end: socket.socket) -> bool:
        proxy_end.setblocking(False)
        try:
            return proxy_end.recv(1) == b""
        except BlockingIOError:
            return False

    try:
        hogs = [connect("127.0.0.3")[0] for _ in range(MAX_PENDING)]
        assert len(stage) == MAX_PENDING and not dropped
        header = v2("192.0.2.7", "10.0.0.100", 5555, 104)
        _, complete = connect("127.0.0.2", header + A_ASSOCIATE_RQ_START)
        assert admitted[0][0] is complete and admitted[0][1].name == "192.0.2.7:5555"
        assert len(stage) == MAX_PENDING and not dropped  # nobody paid for it

        caplog.set_level(logging.WARNING, "dicom_ingestd.proxy")
        slow, _ = connect("127.0.0.2", header[:10])  # must wait: room is made
        assert dropped == ["dropped"] and closed(hogs[0])
        assert not any(closed(hog) for hog in hogs[1:])
        assert "proxy 127.0.0.3 holds 128 of the 128 connections waiting for their PROXY " \
               "protocol header, the most: closing its oldest (127.0.0.3:" in caplog.text
        for index in range(1, 6):  # the heaviest source only ever pushes out its own
            connect("127.0.0.3")
            assert closed(hogs[index]) and len(stage) == MAX_PENDING
        assert caplog.text.count("closing its oldest") == 1  # one line per interval
        slow.sendall(header[10:])
        for key, _ in selector.select(1):
            key.data(key.fileobj)
        assert [peer.name for _, peer in admitted] == ["192.0.2.7:5555", "192.0.2.7:5555"]
        assert len(stage) == MAX_PENDING - 1 and len(dropped) == 6
    finally:
        stage.close()
        for end in ends:
            end.close()
        selector.close()


# -- the peer a header makes -------------------------------------------------------------------
def test_carried_peer_local_and_unknown() -> None:
    proxy_peer = Peer("10.0.0.5", 41000)
    carried = peer_of(proxy_peer, parse(v2("192.0.2.7", "10.0.0.100", 5555, 104), V2)
                      or pytest.fail())
    assert carried == Peer("192.0.2.7", 5555, Via.PROXY, "10.0.0.5:41000")
    assert carried.name == "192.0.2.7:5555" and carried.key == "192.0.2.7"
    assert str(carried) == "192.0.2.7:5555 via 10.0.0.5:41000"
    assert carried.fields() == {"DICOM_PEER": "192.0.2.7", "DICOM_PEER_PORT": "5555",
                                "DICOM_PROXY": "10.0.0.5:41000"}
    assert not carried.verification_only

    six = peer_of(proxy_peer, parse(v1("2001:db8::7", "2001:db8::1", 5555, 104), V1)
                  or pytest.fail())
    assert six.name == "[2001:db8::7]:5555" and six.fields()["DICOM_PEER"] == "2001:db8::7"

    # LOCAL: the proxy's own connection, whose peer is the proxy (keyed by its address),
    # whatever address block the header carries.
    for header in (v2_local(), v2_local(v2("192.0.2.7", "10.0.0.100", 1, 104)[16:], 0x11)):
        local = peer_of(proxy_peer, parse(header, V2) or pytest.fail())
        assert local.verification_only and local.via is Via.PROXY_LOCAL
        assert local.name == "10.0.0.5:41000" and local.key == "10.0.0.5"
        assert str(local) == "10.0.0.5:41000 (proxy's own connection, LOCAL)"

    unknown = peer_of(proxy_peer, parse(v1_unknown(), V1) or pytest.fail())
    assert not unknown.verification_only and unknown.key == "10.0.0.5"  # the proxy stands in
    assert unknown.via is Via.PROXY_UNKNOWN
    assert str(unknown) == "10.0.0.5:41000 (proxy, client address unknown)"


def test_access_control_sees_the_carried_address_and_spares_local_connections() -> None:
    policy = AccessPolicy(["192.0.2.0/24"], ["192.0.2.99"])
    proxy_peer = Peer("10.0.0.5", 41000)
    assert policy.check_peer(proxy_peer) == "10.0.0.5 is not in access.allow"
    assert policy.check_peer(proxy_peer.relayed((ip("192.0.2.7"), 1))) is None
    assert policy.check_peer(proxy_peer.relayed((ip("192.0.2.99"), 1))) == \
        "192.0.2.99 matches access.deny 192.0.2.99/32"
    assert policy.check_peer(proxy_peer.relayed((ip("::ffff:192.0.2.99"), 1))) is not None
    # LOCAL may only verify (Peer.verification_only): admitted by trusted_proxies alone.
    assert policy.check_peer(proxy_peer.relayed(None, local=True)) is None
    # UNKNOWN (and v2 unspecified): the proxy's address is the peer's, and it is checked.
    assert policy.check_peer(proxy_peer.relayed(None)) == "10.0.0.5 is not in access.allow"
    for header, versions in ((v1_unknown(), V1), (v2_raw(0x21, 0x00, b""), V2),
                             (v2_raw(0x21, 0x31, bytes(216)), V2)):
        unknown = peer_of(proxy_peer, parse(header, versions) or pytest.fail())
        assert unknown.via is Via.PROXY_UNKNOWN and unknown.key == "10.0.0.5"
        assert policy.check_peer(unknown) == "10.0.0.5 is not in access.allow"
        assert AccessPolicy(["10.0.0.5"], []).check_peer(unknown) is None


@pytest.mark.parametrize(("entry", "network"), [
    ("::ffff:192.0.2.99", "192.0.2.99/32"), ("::FFFF:c000:263", "192.0.2.99/32"),
    ("::ffff:192.0.2.0/120", "192.0.2.0/24"), ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
    (" 192.0.2.0/24 ", "192.0.2.0/24"), ("2001:db8::/32", "2001:db8::/32"),
    ("::ffff:0:0/95", "::fffe:0:0/95")])
def test_ipv4_mapped_networks_are_ipv4(entry: str, network: str) -> None:
    """Peers are compared as IPv4 (a dual-stack socket's ::ffff:a.b.c.d included): an entry
    written in the mapped form is the IPv4 network, or it would never match."""
    assert str(parse_network(entry)) == network


def test_ipv4_mapped_entries_match_in_access_control_and_trusted_proxies() -> None:
    policy = AccessPolicy(["::ffff:192.0.2.0/120"], ["::ffff:192.0.2.99"])
    assert policy.check("192.0.2.7") is None
    assert policy.check("::ffff:192.0.2.7") is None
    assert policy.check("192.0.2.99") == "192.0.2.99 matches access.deny 192.0.2.99/32"
    assert policy.check("198.51.100.1") == "198.51.100.1 is not in access.allow"
    trusted = ProxyPolicy(V2, tuple(parse_networks(["::ffff:127.0.0.2"])), 1.0, "v2")
    for address in (("127.0.0.2", 1), ("::ffff:127.0.0.2", 1, 0, 0)):
        trusted.check_trusted(Peer.from_address(address))
    with pytest.raises(Dropped, match=r"not one of network\.trusted_proxies"):
        trusted.check_trusted(Peer.from_address(("127.0.0.3", 1)))


def test_a_trusted_network_of_every_address_is_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text('[network]\nproxy_protocol = "v2"\n'
                    'trusted_proxies = ["10.0.0.5", "0.0.0.0/0", "::/0", "::ffff:0:0/96"]\n')
    warnings = ProxyPolicy.from_config(load_config(path).network).warnings()
    assert [w.split(" trusts")[0] for w in warnings] == [
        "network.trusted_proxies: 0.0.0.0/0", "network.trusted_proxies: ::/0",
        "network.trusted_proxies: 0.0.0.0/0"]
    assert "any host that reaches the port may send a PROXY protocol header" in warnings[0]
    result = cli("check-config", "-c", str(path))
    assert result.returncode == 0 and result.stdout == f"{path}: OK\n"
    assert result.stderr.splitlines() == [f"{path}: warning: {w}" for w in warnings]
    path.write_text('[network]\nproxy_protocol = "off"\ntrusted_proxies = ["0.0.0.0/0"]\n')
    assert ProxyPolicy.from_config(load_config(path).network).warnings() == []
    path.write_text('[network]\nproxy_protocol = "v1"\ntrusted_proxies = ["10.0.0.0/8"]\n')
    assert cli("check-config", "-c", str(path)).stderr == ""


# -- what a LOCAL connection may negotiate -----------------------------------------------------
def associate_rq(*contexts: tuple[int, str, str]) -> bytes:
    """An A-ASSOCIATE-RQ proposing (context ID, abstract syntax, transfer syntax)s, with an
    SCP/SCU role selection item for each SOP class."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "SENDER"
    primitive.called_ae_title = "STORESCP"
    proposed = []
    for context_id, abstract_syntax, transfer_syntax in contexts:
        context = build_context(abstract_syntax, [transfer_syntax])
        context.context_id = context_id
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    roles = []
    for _, abstract_syntax, _ in contexts:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = abstract_syntax
        role.scu_role, role.scp_role = True, True
        roles.append(role)
    primitive.user_information = [length, implementation, *roles]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


@pytest.mark.parametrize("negotiation", [
    "", '[negotiation]\nprofile = "P"\n[negotiation.transfer_syntaxes]\n'
        'Explicit = ["ExplicitVRLittleEndian"]\n[negotiation.profiles.P.contexts]\n'
        'Verification = "Explicit"\nCTImageStorage = "Explicit"\n'
        '[negotiation.profiles.P.roles]\nCTImageStorage = "both"\n'],
    ids=["preference", "profile"])
def test_a_local_connection_negotiates_verification_alone(tmp_path: Path,
                                                          negotiation: str) -> None:
    """Whatever the configuration accepts, a LOCAL connection (verification_only) gets
    Verification, and every other context "user rejection" (1), with no role reply."""
    path = tmp_path / "ingestd.toml"
    path.write_text(negotiation or '[storage_commitment]\nenabled = true\n')
    config = load_config(path)
    explicit = "1.2.840.10008.1.2.1"
    pdu = associate_rq((1, "1.2.840.10008.5.1.4.1.1.2", explicit),
                       (3, "1.2.840.10008.1.1", explicit),
                       (5, "1.2.840.10008.1.20.1", explicit))
    request, primitive, _ = acceptor.decode_request(pdu)
    everyone = acceptor.accept(request, primitive, config)
    assert 1 in everyone.contexts and 3 in everyone.contexts  # what a sender gets
    local = acceptor.accept(request, primitive, config, verification_only=True)
    assert [(cx.context_id, cx.abstract_syntax) for cx in local.contexts.values()] == \
        [(3, "1.2.840.10008.1.1")]
    assert sorted((cx.context_id, cx.result) for cx in local.rejected) == [(1, 1), (5, 1)]
    answer = A_ASSOCIATE_AC()
    answer.decode(local.pdu)
    results = {cx.context_id: cx.result for cx in answer.to_primitive()
               .presentation_context_definition_results_list}
    assert results[1] == 1 and results[3] == 0
    roles = [item for item in answer.to_primitive().user_information
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation)]
    assert all(str(role.sop_class_uid) == "1.2.840.10008.1.1" for role in roles), roles


# -- configuration -----------------------------------------------------------------------------
def config_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "ingestd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [line.removeprefix(f"{path}: ") for line in info.value.problems]


def test_config_proxy_protocol_needs_trusted_proxies(tmp_path: Path) -> None:
    assert config_problems(tmp_path, '[network]\nproxy_protocol = "v2"\n') == [
        "network.proxy_protocol = 'v2': needs network.trusted_proxies, the addresses of the "
        "load balancers that send the header (every other address is refused)"]


def test_config_trusted_proxies_are_networks(tmp_path: Path) -> None:
    problems = config_problems(
        tmp_path, '[network]\nproxy_protocol = "any"\n'
                  'trusted_proxies = ["10.0.0.5", "haproxy.local", "10.0.0.0/33"]\n')
    assert problems[:2] == [
        "network.trusted_proxies[1] = 'haproxy.local': must be an IPv4 or IPv6 address or "
        "network, e.g. 10.0.0.0/8 or fd00::/8",
        "network.trusted_proxies[2] = '10.0.0.0/33': must be an IPv4 or IPv6 address or "
        "network, e.g. 10.0.0.0/8 or fd00::/8"]


def test_config_proxy_protocol_choices(tmp_path: Path) -> None:
    assert config_problems(tmp_path, '[network]\nproxy_protocol = "v3"\n'
                                     'trusted_proxies = ["10.0.0.5"]\n') == [
        "network.proxy_protocol = 'v3': must be one of off, v1, v2, any"]
    path = tmp_path / "ok.toml"
    path.write_text('[network]\nproxy_protocol = "any"\ntrusted_proxies = ["10.0.0.5", '
                    '"fd00::/8"]\n')
    policy = ProxyPolicy.from_config(load_config(path).network)
    assert policy.versions == ANY and policy.enabled
    assert policy.describe() == " behind a proxy (PROXY protocol any from 10.0.0.5/32, fd00::/8)"


# -- the health check's HAProxy rules ----------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_ingestd", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_config_haproxy_check_prints_the_rules_for_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text('[network]\naetitle = "PACS_IN"\n')
    result = cli("config", "haproxy-check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == healthcheck.haproxy_rules("PACS_IN", "HEALTHCHECK")
    assert b"PACS_IN".hex() in result.stdout  # the called AE title in the RQ
    path.write_text('[association]\nallowed_calling_aetitles = ["CT1", "MONITOR"]\n')
    assert cli("config", "haproxy-check", "-c", str(path)).stdout == \
        healthcheck.haproxy_rules("STORESCP", "CT1")
    assert cli("config", "haproxy-check", "-c", str(path), "--calling-ae", "MONITOR").stdout \
        == healthcheck.haproxy_rules("STORESCP", "MONITOR")
    refused = cli("config", "haproxy-check", "-c", str(path), "--calling-ae", "OTHER")
    assert refused.returncode == 64 and refused.stdout == ""
    assert "'OTHER' is not in association.allowed_calling_aetitles" in refused.stderr
    too_long = cli("config", "haproxy-check", "-c", str(path), "--calling-ae", "X" * 17)
    assert too_long.returncode == 64 and "1 to 16 printable ASCII" in too_long.stderr


EXPLICIT_ONLY = ('[negotiation]\nprofile = "P"\n[negotiation.transfer_syntaxes]\n'
                 'Explicit = ["ExplicitVRLittleEndian"]\n[negotiation.profiles.P.contexts]\n'
                 '{verification}CTImageStorage = "Explicit"\n')


def test_config_haproxy_check_proposes_what_the_negotiation_accepts(tmp_path: Path) -> None:
    """Under a profile that accepts Verification with Explicit VR Little Endian only, a
    check proposing Implicit VR Little Endian could never pass: the check proposes what the
    configuration accepts (test_proxy_daemon.py runs the printed check), or, when it accepts
    Verification with nothing, exits 78 and prints nothing."""
    path = tmp_path / "ingestd.toml"
    path.write_text(EXPLICIT_ONLY.format(verification='Verification = "Explicit"\n'))
    result = cli("config", "haproxy-check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    explicit = b"1.2.840.10008.1.2.1"
    assert result.stdout == (
        "# Verification with Explicit VR Little Endian, which this configuration accepts "
        "(Implicit VR Little Endian it does not): run this again after changing "
        "[negotiation]\n" + healthcheck.haproxy_rules("STORESCP", "HEALTHCHECK", explicit))
    assert healthcheck.accepted(explicit) != healthcheck.ACCEPTED

    path.write_text(EXPLICIT_ONLY.format(verification=""))
    refused = cli("config", "haproxy-check", "-c", str(path))
    assert refused.returncode == 78 and refused.stdout == ""
    assert refused.stderr == (
        f"dicom-ingestd: {path}: Verification (1.2.840.10008.1.1) is accepted with none of "
        "Implicit VR Little Endian, Explicit VR Little Endian, Explicit VR Big Endian "
        "(negotiation.profile = 'P'): a check could never pass; accept Verification in the "
        "negotiation\n")

    path.write_text("[association]\nrefuse = true\n")
    refused = cli("config", "haproxy-check", "-c", str(path))
    assert refused.returncode == 78 and refused.stdout == ""
    assert "would be rejected (refusing every association (association.refuse))" in \
        refused.stderr


def test_config_haproxy_check_says_check_ssl_with_tls(tmp_path: Path) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text('[tls]\nenabled = true\nprivate_key = "/etc/k.pem"\n'
                    'certificate = "/etc/c.pem"\npeer_certificate = "ignore"\n')
    result = cli("config", "haproxy-check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    comments = [line for line in result.stdout.splitlines() if line.startswith("#")]
    assert comments[0] == "# [tls] is enabled: the check must speak TLS too; add to " \
                          "default-server"
    assert "#   check-ssl verify required ca-file" in comments[1]
    assert result.stdout.endswith(healthcheck.haproxy_rules("STORESCP"))


def test_the_documented_haproxy_backend_has_the_rules_of_the_default_configuration() -> None:
    doc = (REPO / "docs" / "scale-out.md").read_text()
    for line in healthcheck.haproxy_rules("STORESCP").splitlines():
        assert f"    {line}\n" in doc, line
