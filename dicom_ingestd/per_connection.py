"""One association on a connection accepted before we started: systemd Accept=yes, inetd.

No master runs: this process admits the connection as the master would (the PROXY protocol
header when network.proxy_protocol is on, then access control, with the master's log line),
serves it with the worker's Session, adds its counters to the counters file under a lock
and ends.  What needs the master ([events], storage commitment) is refused at start-up
(`config_problem`), and by `check-config --per-connection` before the socket listens.
"""

import logging
import os
import signal
import socket
import ssl

from dicom_ingestd.access import AccessPolicy
from dicom_ingestd.codes import ExitCode
from dicom_ingestd.config.schema import Config
from dicom_ingestd.event_commands import events_enabled
from dicom_ingestd.peer import Peer
from dicom_ingestd.proxy_reader import Dropped, ProxyPolicy, log_dropped, read_peer
from dicom_ingestd.stats import FILE_NAME, add_to_file
from dicom_ingestd.systemd import Notifier
from dicom_ingestd.telemetry import Reporter
from dicom_ingestd.worker.session import Session
from dicom_ingestd.worker.store import Store

log = logging.getLogger("dicom_ingestd.per_connection")


def config_problem(config: Config, path: str) -> str:
    """Why `config` cannot serve per connection (systemd Accept=yes, inetd), or ''.

    [events] needs the master: it consumes the outbox, tracks studies and runs the jobs.  A
    per-connection instance that stored objects with nobody to act on their records would
    break "no success without its events", so it refuses the configuration instead; the
    accept socket runs `check-config --per-connection` before it starts listening.
    """
    if config.storage_commitment.enabled and not events_enabled(config.events):
        # The same reason: the master evaluates requests and delivers the reports.
        return (f"{path}: storage_commitment.enabled: storage commitment needs the master, "
                "which a per-connection instance (systemd Accept=yes, inetd) does not have; "
                "use dicom-ingestd.socket (Accept=no)")
    if not events_enabled(config.events):
        return ""
    keys = [key for key, value in (("exec_on_reception", config.events.exec_on_reception),
                                   ("exec_on_eostudy", config.events.exec_on_eostudy),
                                   ("rename_on_eostudy", config.events.rename_on_eostudy))
            if value]
    return (f"{path}: events.{', events.'.join(keys)}: [events] needs the master, which a "
            "per-connection instance (systemd Accept=yes, inetd) does not have; use "
            "dicom-ingestd.socket (Accept=no) or remove [events]")


def serve(conn: socket.socket, config: Config, config_path: str, store: Store,
          tls_context: ssl.SSLContext | None, notifier: Notifier) -> ExitCode:
    """Admit and serve the one association on `conn`; OK also when it is refused (that is
    the peer's outcome, not ours), CONFIG when `config` needs the master."""
    problem = config_problem(config, config_path)
    if problem:
        log.critical("%s", problem)
        return ExitCode.CONFIG
    try:
        tcp_peer = Peer.from_address(conn.getpeername())
    except OSError:
        tcp_peer = Peer("socket")
    try:
        # network.proxy_protocol: the header first (blocking, within acse_timeout).
        peer = read_peer(conn, tcp_peer, ProxyPolicy.from_config(config.network))
    except Dropped as exc:
        log_dropped(tcp_peer, exc)
        conn.close()
        return ExitCode.OK
    if AccessPolicy(config.access.allow, config.access.deny).refuses(peer):
        conn.close()
        return ExitCode.OK
    notifier.ready(f"serving one association from {peer}")
    # systemctl stop: leave through Session.run's cleanup, so no partial file remains.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # No master to count for us: the counters file is updated under a lock.
    counters = store.staging / FILE_NAME
    reporter = Reporter(lambda report: add_to_file(counters, report, store.staging_fd),
                        os.getpid())
    Session(conn, peer, config, store, tls_context=tls_context, reporter=reporter).run()
    notifier.stopping()
    return ExitCode.OK


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)
