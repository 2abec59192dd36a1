"""The master: owns the listening sockets, signals, sd_notify, reload and the workers.

Single-threaded while it forks (process_model = fork): one selector waits on the listeners,
the signal wakeup socket, the worker report channel, the config watcher and the warm workers'
control sockets and pidfds (pool.py).  Signal handlers do nothing but wake the loop (the
signal number arrives on the wakeup socket); the loop does the work.  The master never reads
a DICOM byte: access control uses the peer address, and even an over-limit association is
answered by a worker, because an A-ASSOCIATE-RJ is only meaningful after reading the request.

A connection goes accept -> [its PROXY protocol header, when network.proxy_protocol is on:
proxy_reader.PendingHeaders, the only bytes the master reads] -> admission (access control
and limits, for the peer the header carried: _admit) -> dispatch (to an idle warm worker,
pool.py, or a thread: _dispatch).
"""

import contextlib
import errno
import functools
import logging
import os
import resource
import selectors
import signal
import socket
import ssl
import time
from collections import deque
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from dicom_ingestd import __version__, ipc, warm
from dicom_ingestd import log as logsetup
from dicom_ingestd import status as status_doc
from dicom_ingestd.access import AccessPolicy
from dicom_ingestd.assignment import Assignment
from dicom_ingestd.codes import Ending
from dicom_ingestd.config.load import diff_configs, load_config
from dicom_ingestd.config.schema import Config
from dicom_ingestd.control import SOCKET_NAME, ControlServer
from dicom_ingestd.errors import ConfigError, StorageError
from dicom_ingestd.jobs.service import EventService
from dicom_ingestd.peer import Peer
from dicom_ingestd.pool import WorkerPool
from dicom_ingestd.processes import KILL_GRACE
from dicom_ingestd.proxy_reader import PendingHeaders, ProxyPolicy
from dicom_ingestd.running import Running, ThreadRunner
from dicom_ingestd.sockets import describe
from dicom_ingestd.stats import FILE_NAME as STATS_FILE
from dicom_ingestd.stats import NO_AE, Stats
from dicom_ingestd.systemd import Notifier
from dicom_ingestd.tls_context import build_context
from dicom_ingestd.watch import ConfigWatcher
from dicom_ingestd.worker import acceptor
from dicom_ingestd.worker.store import Store

log = logging.getLogger("dicom_ingestd.master")

# Connections over the limit are answered by a short-lived rejecting worker; past this many
# of those at once (a flood) further connections are closed without an answer.
MAX_REJECTING = 16
# A connection over a limit first waits this long for a place (_admit_waiting): a worker
# says its association is over only after the peer has the A-RELEASE-RP, and a sender that
# reconnects at once must not meet the limit of the association it has just released.
OVER_LIMIT_WAIT = 0.5
# accept() failing for want of descriptors or memory: pause accepting (see _pause_accepting).
ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_MIN = 0.1
ACCEPT_BACKOFF_MAX = 2.0
ACCEPT_LOG_INTERVAL = 10.0
REFRESH_INTERVAL = 5.0  # seconds between two looks at the free space and the job counts
# The loop turns several times per association (accept, the worker's answers, its reports):
# the periodic work (counters, STATUS=, control connections, metrics) runs at most this often.
MONITOR_INTERVAL = 0.25


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:  # EMFILE itself, or no /proc
        return -1


def _descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class State(Enum):
    RUNNING = "running"
    STOPPING = "stopping"


class Master:
    """Run with `serve()`; returns when stopped (SIGTERM/SIGINT) and every worker is gone."""

    def __init__(self, config_path: str | None, config: Config, store: Store,
                 listeners: list[socket.socket], notifier: Notifier,
                 watch_config: bool = True, tls_context: ssl.SSLContext | None = None) -> None:
        self.config_path = config_path
        self.config = config
        # [tls]: built from the key files before serving (and again on reload); forked
        # workers inherit it and do the handshake themselves.
        self.tls_context = tls_context
        self.store = store
        self.listeners = listeners
        self.notifier = notifier
        self.access = AccessPolicy(config.access.allow, config.access.deny)
        self.proxy_policy = ProxyPolicy.from_config(config.network)
        self.state = State.RUNNING
        self.running: dict[str, Running] = {}  # associations in progress, by key
        self.channel = ipc.Channel()
        self.selector = selectors.DefaultSelector()
        # network.proxy_protocol: connections waiting for their header, then _admit.
        self.pending = PendingHeaders(self.selector, self._admit,
                                      lambda outcome: self.stats.association_ended(outcome,
                                                                                   NO_AE))
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        # Connections over a limit waiting for a place, oldest first: (connection, peer,
        # key, when to give up and answer A-ASSOCIATE-RJ).
        self._waiting: deque[tuple[socket.socket, Peer, str, float]] = deque()
        self._stop_deadline = 0.0
        self._stored_before = 0  # the counters' stored objects when serving began
        self._associations = 0
        # With a counter: association keys unique across restarts.
        self._key_prefix = f"{time.time_ns():x}-"
        self._generation = 0  # configuration generation: one more at each applied reload
        self._outbox_used = False  # a generation had an outbox: workers may send notes
        self._next_watchdog = 0.0
        self._next_monitor = 0.0
        # -- monitoring (stats.py, status.py, control.py, metrics.py) ----------------------
        self.stats = Stats.load(store.staging / STATS_FILE, store.staging_fd)
        # Workers' AssociationReports (statistics).  Not in the selector: read in batches,
        # each MONITOR_INTERVAL (before the counters are saved or put in STATUS=), before
        # the counters are shown (status, metrics) and at stop.  That spares the master a
        # wake-up and a read per association; the channel (a socketpair, bounded only by
        # its 1 MiB send buffer) holds far more than the reports of a second.
        self.telemetry = ipc.Channel()
        self.control = ControlServer(store.staging / SOCKET_NAME, self.selector,
                                     {"status": self._status_request,
                                      "reload": self._reload_request})
        self._started = time.time()
        self._last_reload: dict[str, Any] | None = None
        self._disk: dict[str, Any] = {}
        self._jobs: dict[str, int] | None = None
        self._next_refresh = 0.0
        self._next_metrics = 0.0
        self._control_moved = False
        self._accept_backoff = 0.0  # seconds of the last accept pause (0: not pausing)
        self._accept_paused_until = 0.0
        self._accept_next_log = 0.0
        self._accept_pauses = 0
        self._closed_unanswered = 0
        self._next_flood_log = 0.0
        self._watcher: ConfigWatcher | None = None
        self._retired: list[Store] = []
        if watch_config and config_path:
            self._watcher = ConfigWatcher(Path(config_path))
        # [events]/[jobs]: study tracking and the job queue (raises StorageError).
        self.events = EventService(config, self.selector)
        self.events.open()
        if config.workers.process_model == "fork":
            self.pool: WorkerPool | None = WorkerPool(self.selector, self._close_in_child,
                                                      self.channel, self.telemetry,
                                                      self._finished)
            self.runner: WorkerPool | ThreadRunner = self.pool
        else:
            self.pool = None
            self.runner = ThreadRunner(self.selector, self.channel, self._finished)

    # -- set-up ----------------------------------------------------------------------------
    def _close_in_child(self) -> None:
        """In a forked worker: drop every master resource but the report channel's writer."""
        self.selector.close()
        self.pending.close_in_child()
        for waiting in self._waiting:
            waiting[0].close()
        self._waiting.clear()
        for sock in self.listeners:
            sock.close()
        self._wakeup_r.close()
        self._wakeup_w.close()
        self.channel.reader.close()
        if self.pool is not None:
            self.pool.close_in_child()
        for store in self._retired:
            store.close()
        if self._watcher is not None:
            self._watcher.close_in_child()
        self.events.close_in_child()
        self.telemetry.close_reader()
        self.control.close_in_child()

    def _install_signals(self) -> None:
        for sock in (self._wakeup_r, self._wakeup_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number

    # -- the loop --------------------------------------------------------------------------
    def serve(self) -> None:
        self._stored_before = self.stats.stored
        acceptor.warm_up(self.config)
        self._new_generation()
        if self._watcher is not None:
            self._watcher.start()  # a process of its own, started before any worker
        self._install_signals()
        for sock in self.listeners:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, self._accept)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._signals)
        self.selector.register(self.channel.reader, selectors.EVENT_READ, self._reports)
        if self._watcher is not None:
            self.selector.register(self._watcher.fileno(), selectors.EVENT_READ,
                                   self._config_changed)
        self.control.open()
        self._refresh(time.monotonic())
        model = self.config.workers.process_model
        if self.pool is not None:
            try:
                self.pool.fill()  # ready means ready to hand a connection over at once
            except OSError as exc:
                log.warning("cannot fork the spare workers (%s); workers are forked as "
                            "connections arrive", exc.strerror or exc)
            model += f" ({self.pool.idle} spare workers)"
        tls = self.config.tls
        log.info("dicom-ingestd %s ready: pid %d, listening on %s%s%s as %s, process model %s, "
                 "storing under %s (%s)", __version__, os.getpid(),
                 ", ".join(describe(s) for s in self.listeners) or "nothing",
                 f" (TLS, profile {tls.profile}, peer certificates: {tls.peer_certificate})"
                 if self.tls_context is not None else "", self.proxy_policy.describe(),
                 self.config.network.aetitle, model, self.store.root, self.store.durability)
        self.notifier.ready(self._status())
        while self.state is State.RUNNING or self.running or (self.pool and self.pool.processes):
            ready = self.selector.select(self._timeout())
            if len(ready) > 1:
                # A new connection never waits behind bookkeeping: the previous
                # association's Finished, its worker's exit or a job's end are handled
                # after the hand-off.  An association whose end is among them still frees
                # its place for the new one: an over-limit connection waits for a place
                # (OVER_LIMIT_WAIT), and the end, handled next, gives it one.
                ready.sort(key=self._listeners_first)
            for key, _ in ready:
                key.data(key.fileobj)
            self._tick()
        self._shutdown()

    def _listeners_first(self, event: tuple[selectors.SelectorKey, int]) -> bool:
        return event[0].fileobj not in self.listeners

    def _new_generation(self) -> None:
        """What workers forked from now on serve under: the configuration just applied."""
        self._generation += 1
        self._outbox_used = self._outbox_used or self.events.outbox_fd >= 0
        if self.pool is not None:
            self.pool.configure(warm.Generation(self._generation, self.config, self.store,
                                                self.tls_context, self.events.outbox_fd))

    def _timeout(self) -> float:
        timeout = 1.0
        if self.pool is not None and self.state is State.RUNNING:
            timeout = self.pool.next_maintenance(time.monotonic())  # in _tick
        if self._accept_paused_until:
            timeout = min(timeout, max(0.0, self._accept_paused_until - time.monotonic()))
        if self.notifier.watchdog_interval:
            timeout = min(timeout, max(0.0, self._next_watchdog - time.monotonic()))
        pending = self.pending.timeout()
        if pending is not None:
            timeout = min(timeout, pending)
        if self._waiting:
            timeout = min(timeout, max(0.0, self._waiting[0][3] - time.monotonic()))
        return min(timeout, self.events.timeout())

    def _tick(self) -> None:
        now = time.monotonic()
        self._resume_accepting(now)
        self.pending.expire()
        if self._waiting and now >= self._waiting[0][3]:
            self._admit_waiting(now)
        if self.notifier.watchdog_interval and now >= self._next_watchdog:
            # Pinged from the loop itself: a master stuck anywhere stops the pings.
            self.notifier.watchdog()
            self._next_watchdog = now + self.notifier.watchdog_interval
        if self.state is State.STOPPING:
            self._enforce_stop_deadline(now)
        elif self.pool is not None:
            self.pool.maintain(now)
        self.events.tick()
        if now >= self._next_monitor:
            self._next_monitor = now + MONITOR_INTERVAL
            self._monitor(now)
            if self.notifier.enabled:
                self.notifier.status(self._status())

    # -- monitoring ------------------------------------------------------------------------
    def _status(self) -> str:
        """The STATUS= line: what `systemctl status` shows; problems first."""
        stats = self.stats
        text = f"{len(self.running)} active association(s); {stats.stored} object(s) stored"
        if stats.failed:
            text += f", {stats.failed} failed"
        text += f" since {_short_time(stats.since)}"
        problems = []
        reload = self._last_reload
        if reload is not None and reload["outcome"] == "rejected":
            first = reload["problems"][0] if reload["problems"] else "?"
            problems.append(f"RELOAD REJECTED at {_short_time(reload['time'])} "
                            f"(running configuration kept): {first}")
        dead = (self._jobs or {}).get("dead", 0)
        if dead:
            problems.append(f"{dead} DEAD JOB(S) (dicom-ingestd jobs list --state dead)")
        for name in self._disk.get("low", []):
            entry = self._disk[name]
            problems.append(f"LOW DISK SPACE on {name} {entry['path']}: "
                            f"{status_doc.size(entry['free_bytes'])} free")
        if stats.last_error:
            problems.append(f"last error {_short_time(stats.last_error_time)}: "
                            f"{stats.last_error[:200]}")
        if problems:
            text = "; ".join([*problems, text])
        if self.state is State.STOPPING:
            text = "stopping: " + text
        return text

    def _telemetry(self) -> None:
        for report in self.telemetry.receive():
            if isinstance(report, ipc.AssociationReport):
                self.stats.merge(report)

    def _monitor(self, now: float) -> None:
        """Periodic: save the counters, refresh free space and job counts, write the
        metrics file, drop silent control connections."""
        self._telemetry()
        if self.stats.dirty and self.store.has_free_space():
            # Below storage.min_free_space the reserve is for objects: the counters wait.
            self.stats.save(dir_fd=self.store.staging_fd)
        self.control.expire()
        if self._control_moved:
            self._control_moved = False
            self.control.close()
            self.control = ControlServer(self.store.staging / SOCKET_NAME, self.selector,
                                         {"status": self._status_request,
                                          "reload": self._reload_request})
            self.control.open()
        if now >= self._next_refresh:
            self._refresh(now)
        metrics_file = self.config.monitoring.metrics_file
        if metrics_file and now >= self._next_metrics:
            self._next_metrics = now + self.config.monitoring.metrics_interval
            self._write_metrics(metrics_file)

    def _refresh(self, now: float) -> None:
        self._next_refresh = now + REFRESH_INTERVAL
        before = set(self._disk.get("low", []))
        self._disk = status_doc.disk(self.config)
        low = set(self._disk["low"])
        for name in sorted(low - before):
            entry = self._disk[name]
            log.warning("free space low on the %s file system (%s): %s free, warning below "
                        "%s (storage.min_free_space + monitoring.low_space_margin); objects "
                        "are refused below %s", name, entry["path"],
                        status_doc.size(entry["free_bytes"]),
                        status_doc.size(self._disk["warning_below"]),
                        status_doc.size(self._disk["refusing_below"])
                        if self._disk["refusing_below"] else "nothing (min_free_space = 0)")
        for name in sorted(before - low):
            log.info("free space on the %s file system is above the warning threshold again",
                     name)
        self._jobs = status_doc.job_counts(self.config, live=True)

    def _daemon_status(self) -> dict[str, Any]:
        return {"running": True, "pid": os.getpid(), "state": self.state.value,
                "started": self._started, "uptime_seconds": time.time() - self._started,
                "active_associations": len(self.running),
                "idle_workers": self.pool.idle if self.pool is not None else 0,
                "last_reload": self._last_reload,
                "control_socket": str(self.control.path)}

    def _document(self) -> dict[str, Any]:
        self._telemetry()
        return status_doc.document(self.config, self.config_path or "", self.stats,
                                   self._daemon_status(), live=True)

    def _status_request(self, _request: dict[str, Any]) -> dict[str, Any]:
        return self._document()

    def _reload_request(self, _request: dict[str, Any]) -> dict[str, Any]:
        """`dicom-ingestd reload` (systemctl reload): reload now, answer with the outcome."""
        log.info("reload requested by dicom-ingestd reload: reloading %s", self.config_path)
        self.reload("dicom-ingestd reload")
        return {"reload": self._last_reload}

    def _write_metrics(self, path: str) -> None:
        from dicom_ingestd.metrics import write_textfile

        try:
            write_textfile(Path(path), self._document())
        except OSError as exc:
            message = f"cannot write monitoring.metrics_file {path}: {exc.strerror or exc}"
            if self.stats.last_error != message:
                log.error("%s", message)
                self.stats.error(message)

    # -- events ----------------------------------------------------------------------------
    def _signals(self, _sock: object) -> None:
        try:
            data = self._wakeup_r.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT) and self.state is State.RUNNING:
                log.info("received %s: stopping", signal.Signals(signum).name)
                self._begin_stop()
            elif signum == signal.SIGHUP:
                log.info("received SIGHUP: reloading %s", self.config_path)
                self.reload("SIGHUP")
            # SIGCHLD only wakes us; pidfds tell which worker ended.

    def _config_changed(self, _fd: object) -> None:
        assert self._watcher is not None
        if self._watcher.drain() and self.state is State.RUNNING:
            log.info("%s changed on disk: reloading", self.config_path)
            self.reload("file changed")

    def _reports(self, _sock: object) -> None:
        """Workers' datagrams: statistics, and a wake-up to read the outbox now."""
        messages = self.channel.receive()
        for message in messages:
            if isinstance(message, ipc.CommitmentNote):
                self.events.commitment_note(message)
        if messages:
            self.events.wake()

    def _accept(self, listener: object) -> None:
        assert isinstance(listener, socket.socket)
        while self.state is State.RUNNING:
            try:
                conn, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_EXHAUSTED:
                    self._pause_accepting(listener, exc)
                else:
                    log.error("accept on %s failed: %s", describe(listener),
                              exc.strerror or exc)
                    self.stats.error(f"accept failed: {exc.strerror or exc}")
                return
            peer = Peer.from_address(address)
            if self.proxy_policy.enabled:
                self.pending.take(conn, peer, self.proxy_policy)  # then _admit
            else:
                self._admit(conn, peer)
            if self._accept_paused_until:  # _dispatch ran out of descriptors
                return
            self._accept_backoff = 0.0

    def _pause_accepting(self, where: socket.socket, exc: OSError) -> None:
        """Out of descriptors (or kernel memory): stop watching the listeners for a while.

        The listeners stay readable while connections wait in the backlog, so retrying at
        once would spin (storescp-style daemons log hundreds of thousands of lines).  The
        pause doubles up to ACCEPT_BACKOFF_MAX while accept keeps failing; the waiting
        connections stay in the kernel's backlog meanwhile.  One line per pause, at most one
        per ACCEPT_LOG_INTERVAL (with the count of the pauses not logged).
        """
        self._accept_backoff = min(max(self._accept_backoff * 2, ACCEPT_BACKOFF_MIN),
                                   ACCEPT_BACKOFF_MAX)
        now = time.monotonic()
        self._accept_paused_until = now + self._accept_backoff
        for sock in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)
        self._accept_pauses += 1
        if now >= self._accept_next_log:
            what = f"accept on {describe(where)}" if where in self.listeners else \
                "starting a worker"
            log.error("%s failed: %s; not accepting connections for %.1f s "
                      "(%d open descriptors, limit %d; %d pause(s) since the last line)",
                      what, exc.strerror or exc, self._accept_backoff,
                      _open_descriptors(), _descriptor_limit(), self._accept_pauses)
            self._accept_next_log = now + ACCEPT_LOG_INTERVAL
            self._accept_pauses = 0
        self.stats.error(f"accept failed: {exc.strerror or exc}")

    def _resume_accepting(self, now: float) -> None:
        """After a pause: watch the listeners again (the next failure pauses longer)."""
        if not self._accept_paused_until or now < self._accept_paused_until:
            return
        self._accept_paused_until = 0.0
        if self.state is not State.RUNNING:
            return
        for sock in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.register(sock, selectors.EVENT_READ, self._accept)

    def _admit(self, conn: socket.socket, peer: Peer) -> None:
        """Access control and the limits for `peer` (behind a proxy: the address its header
        carried, or the proxy's when it carried none or for its own LOCAL connections), then
        _dispatch.  Even an over-limit association goes to a worker, after up to
        OVER_LIMIT_WAIT for a place: it answers A-ASSOCIATE-RJ."""
        if self.access.refuses(peer):
            conn.close()
            self.stats.association_ended(Ending.REFUSED, NO_AE)
            return
        key = _key(peer.host)  # the proxy's own for its LOCAL and UNKNOWN connections
        over = self._over_limit(key)
        if over and self.state is State.RUNNING and len(self._waiting) < MAX_REJECTING:
            # Perhaps one that has just been released (OVER_LIMIT_WAIT): _admit_waiting.
            self._waiting.append((conn, peer, key, time.monotonic() + OVER_LIMIT_WAIT))
            return
        self._answer(conn, peer, key, over)

    def _admit_waiting(self, now: float) -> None:
        """Hand over the waiting connections that now fit (in their order), and answer
        those whose wait is over with the limit."""
        for _ in range(len(self._waiting)):
            conn, peer, key, until = self._waiting.popleft()
            over = self._over_limit(key)
            if over and now < until:
                self._waiting.append((conn, peer, key, until))
            else:
                self._answer(conn, peer, key, over)

    def _answer(self, conn: socket.socket, peer: Peer, key: str, over: str) -> None:
        """_dispatch, or close `conn` unanswered when rejections flood."""
        if over and sum(r.rejecting for r in self.running.values()) >= MAX_REJECTING:
            # A flood: one line per ACCEPT_LOG_INTERVAL, counting the connections closed.
            conn.close()
            self.stats.association_ended(Ending.DROPPED, NO_AE)
            self._closed_unanswered += 1
            now = time.monotonic()
            if now >= self._next_flood_log:
                log.warning("%s: %s and %d rejections already in progress; closing the "
                            "connection unanswered (%d connection(s) closed this way since "
                            "the last such line)", peer, over, MAX_REJECTING,
                            self._closed_unanswered)
                self._next_flood_log = now + ACCEPT_LOG_INTERVAL
                self._closed_unanswered = 0
            return
        self._dispatch(conn, peer, key, over)

    def _dispatch(self, conn: socket.socket, peer: Peer, key: str, over: str) -> None:
        """Hand an admitted connection to a worker (a warm process, or a thread); `key` is
        what the per-peer limit counts, `over` the limit to answer with A-ASSOCIATE-RJ.

        On the association's critical path: the client waits for its A-ASSOCIATE-AC.  What
        the hand-off does not need comes after it."""
        if not conn.getblocking():  # accepted sockets are; the PROXY header reader's not
            conn.setblocking(True)
        try:
            running = self.runner.start(Assignment(
                conn, peer, self.config, self.store, over, self.tls_context,
                association=f"{self._key_prefix}{self._associations + 1}",
                outbox_fd=self.events.outbox_fd, counters=self.telemetry))
        except OSError as exc:
            conn.close()
            if exc.errno in ACCEPT_EXHAUSTED:  # the accept succeeded, the fork or pidfd not
                self._pause_accepting(conn, exc)
                return
            log.error("%s: cannot start a worker: %s", peer, exc.strerror or exc)
            self.stats.error(f"cannot start a worker: {exc.strerror or exc}")
            return
        self._associations += 1
        running.peer_key = key
        self.running[running.association] = running
        self.events.worker_started(running.association, running.reply, self.config)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: association %s handed to %s", peer, running.association,
                      running.name)

    def _over_limit(self, key: str) -> str:
        """The limit a new association from `key` (Peer.key; "" for none to count) would
        pass, or ""."""
        limits = self.config.workers
        if not self.running:
            return ""
        serving = [r for r in self.running.values() if not r.rejecting]
        if limits.max_associations and len(serving) >= limits.max_associations:
            return f"{len(serving)} associations in progress (workers.max_associations = " \
                   f"{limits.max_associations})"
        if limits.max_associations_per_peer and key:
            same = sum(r.peer_key == key for r in serving)
            if same >= limits.max_associations_per_peer:
                return f"{same} associations in progress from {key} " \
                       f"(workers.max_associations_per_peer = " \
                       f"{limits.max_associations_per_peer})"
        return ""

    def _close_retired(self) -> None:
        in_use = {id(r.store) for r in self.running.values()}
        for store in [s for s in self._retired if id(s) not in in_use]:
            store.close()
            self._retired.remove(store)

    def _finished(self, running: Running, problem: str | None,
                  outcome: Ending | None) -> None:
        """An association is over (`problem`: its worker died with it)."""
        self.running.pop(running.association, None)
        if self._waiting:  # a place for one, perhaps
            self._admit_waiting(time.monotonic())
        if self._outbox_used:  # its notes before its end (no outbox: it sends none)
            self._reports(None)
        released = outcome is Ending.RELEASED and problem is None
        self.events.worker_done(running.association, released)  # reads its records first
        try:
            if problem is not None:
                self._log_worker_failure(running, problem)
        finally:
            if self._retired:
                self._close_retired()

    def _log_worker_failure(self, running: Running, problem: str) -> None:
        removed = running.store.remove_leftovers(running.pid) if running.pid else 0
        level = logging.ERROR
        if running.signalled and problem.startswith("killed by SIG"):
            level = logging.WARNING  # we stopped it at the stop deadline
        hint = " (out of memory?)" if "SIGKILL" in problem and not running.signalled else ""
        log.log(level, "%s: worker %d %s%s; %d partial object(s) removed; other "
                "associations are unaffected", running.peer, running.pid, problem, hint,
                removed, extra={"journal": running.peer.fields()})
        self.stats.error(f"worker {running.pid} ({running.peer}) {problem}")

    # -- reload ----------------------------------------------------------------------------
    def reload(self, source: str = "SIGHUP") -> bool:
        """Re-read the configuration; apply it to new associations, or keep the old one.

        The outcome is kept for `status`, STATUS= and the answer to `dicom-ingestd reload`.
        """
        if not self.config_path:
            log.warning("reload requested, but no configuration file is in use")
            self._last_reload = {"time": time.time(), "source": source,
                                 "outcome": "rejected",
                                 "problems": ["no configuration file is in use"]}
            return False
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            tls_context = build_context(new.tls, self.config_path)
            store = self.store
            if new.storage.output_directory != self.config.storage.output_directory:
                store = Store(new.storage)
                store.open()
                store.remove_leftovers()
            elif new.storage != self.config.storage:
                store = Store(new.storage)
                store.open()
            access = AccessPolicy(new.access.allow, new.access.deny)
        except (ConfigError, StorageError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            for problem in problems:
                log.error("reload rejected, keeping the running configuration: %s", problem)
            self._last_reload = {"time": time.time(), "source": source,
                                 "outcome": "rejected", "problems": problems}
            self.stats.error(f"reload rejected: {problems[0]}")
            self.notifier.ready(self._status())
            return False
        changed = diff_configs(self.config, new)
        later = [key for key, reloadable in changed if not reloadable]
        for key in later:
            log.warning("reload: %s changed, which takes effect only after a restart", key)
        if store is not self.store:
            # Running workers keep the old one (threads share it): close it once unused.
            self._retired.append(self.store)
            self.store = store
            self._close_retired()
        self.config = new
        self.tls_context = tls_context
        acceptor.warm_up(new)
        self.access = access
        self.proxy_policy = ProxyPolicy.from_config(new.network)
        self.events.reload(new)
        logsetup.setup(new.logging)
        self._new_generation()  # after everything a new worker inherits is in place
        applied = [key for key, reloadable in changed if reloadable]
        log.info("reload: configuration applied to new associations (%s)",
                 ", ".join(applied) or "no change")
        self._last_reload = {"time": time.time(), "source": source, "outcome": "applied",
                             "problems": [], "applied": applied, "restart_needed": later}
        if self.stats.path != self.store.staging / STATS_FILE:
            # A new output directory: the counters and the control socket move with it.
            self.stats.path = self.store.staging / STATS_FILE
            self.stats.dirty = True
            self._control_moved = True  # in _monitor: this reload may be answering on it
        self._refresh(time.monotonic())
        self.notifier.ready(self._status())
        return True

    # -- stop ------------------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self.state = State.STOPPING
        self.notifier.stopping()
        self.pending.close()
        while self._waiting:  # as the connections still in the listeners' backlogs
            self._waiting.popleft()[0].close()
            self.stats.association_ended(Ending.DROPPED, NO_AE)
        for sock in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)
            sock.close()
        self._stop_deadline = time.monotonic() + self.config.workers.stop_timeout
        if self.pool is not None:
            self.pool.stop()  # idle workers retire now
        if self.running:
            log.info("waiting up to %d s for %d running association(s) to finish",
                     self.config.workers.stop_timeout, len(self.running))

    def _enforce_stop_deadline(self, now: float) -> None:
        if now < self._stop_deadline:
            return
        if self.pool is not None and now >= self._stop_deadline + KILL_GRACE:
            self.pool.kill_retiring()  # retired workers that did not exit on their own
        for running in self.running.values():
            if now >= self._stop_deadline + KILL_GRACE:
                running.signal(signal.SIGKILL)
            elif not running.signalled:
                log.warning("%s: stop timeout reached; stopping %s", running.peer,
                            running.name)
                running.signal(signal.SIGTERM)
        if self.running and not any(r.pid for r in self.running.values()):
            # Threads cannot be stopped from outside; leave them to the process exit.
            log.warning("%d association thread(s) still running at the stop deadline",
                        len(self.running))
            self.running.clear()

    def _shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self.events.shutdown()  # open studies closed or kept; running jobs re-queued
        self._telemetry()
        if self.store.has_free_space():
            self.stats.save(force=True, dir_fd=self.store.staging_fd)
        if self.config.monitoring.metrics_file:
            self._write_metrics(self.config.monitoring.metrics_file)
        self.control.close()
        removed = self.store.remove_leftovers(os.getpid())
        log.info("stopped after %d association(s), %d object(s) stored%s", self._associations,
                 self.stats.stored - self._stored_before,
                 f"; {removed} partial object(s) removed" if removed else "")


@functools.lru_cache(maxsize=1024)
def _key(host: str) -> str:
    """Peer.key of a peer with this host: parsed once per address, not per association."""
    return Peer(host).key


def _short_time(wall: float) -> str:
    """HH:MM:SS today, else the date too (STATUS= is one short line)."""
    moment = datetime.fromtimestamp(wall)
    if moment.date() == datetime.now().date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")
