"""`dicom-ingestd run` after its configuration is valid: from a configuration to a serving
process.

Opens the output directory (and removes what an earlier crash left), takes the sockets
(systemd's, inetd's fd 0, or a listener of our own) and hands over: a connection accepted
before we started goes to per_connection (one association, then exit); listeners go to the
Master.  A start-up that fails says why in STATUS= and closes the connections waiting for it
(`not_started`).  Returns exit codes; never exits itself.
"""

import contextlib
import logging
import os
import socket
import ssl

from dicom_ingestd import per_connection, systemd
from dicom_ingestd.codes import ExitCode
from dicom_ingestd.config.schema import Config
from dicom_ingestd.errors import StorageError
from dicom_ingestd.log import to_stderr
from dicom_ingestd.master import Master
from dicom_ingestd.proxy_reader import ProxyPolicy
from dicom_ingestd.sockets import create_listener
from dicom_ingestd.worker.store import Store

log = logging.getLogger("dicom_ingestd")


def run(config_path: str, config: Config, tls_context: ssl.SSLContext | None) -> ExitCode:
    """Serve with `config` (read from `config_path`) until stopped, or for one connection."""
    if config.storage.group_write:
        # Directories the daemon creates become group-writable (mkdir asks for 0777 and the
        # umask decides), so the group's consumers may move and delete received files.
        os.umask(os.umask(0) & ~0o070)
    store = Store(config.storage)
    try:
        store.open()
    except StorageError as exc:
        log.critical("%s", exc)
        return not_started(ExitCode.CANTCREAT, str(exc))
    if config.storage.group_write:
        with contextlib.suppress(OSError):  # systemd's StateDirectoryMode= resets it
            os.chmod(store.root, os.stat(store.root).st_mode & 0o7777 | 0o070)
    notifier = systemd.Notifier()
    inherited = systemd.listen_fds()
    removed = store.remove_leftovers()
    if removed:
        log.warning("removed %d partial object(s) left by an earlier crash in %s",
                    removed, store.staging)

    connected = [s.sock for s in inherited if not s.listening]
    listening = [s.sock for s in inherited if s.listening]
    if config.network.inetd and not inherited:
        stdin = _inetd_socket()
        if stdin is None:
            return ExitCode.USAGE
        if stdin.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listening = [stdin]
        else:
            connected = [stdin]
    if connected:
        # systemd Accept=yes (or inetd): exactly one association on an accepted socket.
        return per_connection.serve(connected[0], config, config_path, store, tls_context,
                                    notifier)

    for warning in ProxyPolicy.from_config(config.network).warnings():
        log.warning("%s", warning)
    listeners = listening
    if not listeners:
        try:
            listeners = [create_listener(config.network)]
        except OSError as exc:
            log.critical("cannot listen on port %d: %s", config.network.port,
                         exc.strerror or exc)
            return ExitCode.UNAVAILABLE
    try:
        master = Master(config_path, config, store, listeners, notifier,
                        tls_context=tls_context)
    except StorageError as exc:  # the state directory of [jobs]
        log.critical("%s", exc)
        return not_started(ExitCode.CANTCREAT, str(exc), listeners, notifier)
    master.serve()
    return ExitCode.OK


def _inetd_socket() -> socket.socket | None:
    """inetd's socket on fd 0: "nowait" hands over the connection; "wait" (and
    systemd-socket-activate --inetd without --accept) the listening socket itself."""
    try:
        stdin = socket.socket(fileno=os.dup(0))
    except OSError as exc:
        log.critical("inetd mode: fd 0 is not a socket (%s)", exc.strerror or exc)
        return None
    # stdout is the peer's connection in inetd mode: nothing may ever be printed to it.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return stdin


def not_started(code: ExitCode, why: str, listeners: list[socket.socket] | None = None,
                notifier: systemd.Notifier | None = None) -> ExitCode:
    """Start-up failed: answer the connections that triggered a socket-activated start.

    Each waiting connection is closed unanswered (the sender sees the connection end, and
    retries), so that systemd does not start us again at once for the same connection; a
    new connection starts a new attempt, which succeeds once the cause is fixed.  STATUS=
    says why, for `systemctl status`.
    """
    if notifier is None:
        notifier = systemd.Notifier()
    notifier.status(f"not started: {why} (exit status {int(code)}; "
                    "journalctl -u dicom-ingestd -p err)")
    if listeners is None:
        listeners = [s.sock for s in systemd.listen_fds()]
    closed = 0
    for sock in listeners:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.setblocking(False)
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    break
                conn.close()
                closed += 1
        sock.close()
    if closed:
        to_stderr(f"closed {closed} waiting connection(s) unanswered: {why}", logging.WARNING)
    return code
