"""The command line: run, check-config, config show, config from-storescp.

The only module that exits the process; everything below it raises.
"""

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence

from dicom_ingestd import __version__
from dicom_ingestd import log as logsetup
from dicom_ingestd.codes import ExitCode
from dicom_ingestd.config.load import dump_config, load_config
from dicom_ingestd.errors import ConfigError, StorageError, TranslationError

DEFAULT_CONFIG = "/etc/ingestd.toml"
log = logging.getLogger("dicom_ingestd")


def cmd_run(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGTERM/SIGINT."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.CONFIG
    logsetup.setup(config.logging)
    # Heavy imports only when serving; the master imports the worker code before forking so
    # that workers start warm.
    from dicom_ingestd import systemd
    from dicom_ingestd.master import Master
    from dicom_ingestd.sockets import create_listener
    from dicom_ingestd.worker.session import Session, peer_name
    from dicom_ingestd.worker.store import Store

    notifier = systemd.Notifier()
    inherited = systemd.listen_fds()
    store = Store(config.storage)
    try:
        store.open()
    except StorageError as exc:
        log.critical("%s", exc)
        return ExitCode.CANTCREAT
    removed = store.remove_leftovers()
    if removed:
        log.warning("removed %d partial object(s) left by an earlier crash in %s",
                    removed, store.staging)

    connected = [s.sock for s in inherited if not s.listening]
    if connected or config.network.inetd:
        # systemd Accept=yes (or inetd): exactly one association on an accepted socket.
        if connected:
            conn = connected[0]
        else:
            try:
                conn = socket.socket(fileno=os.dup(0))
            except OSError as exc:
                log.critical("inetd mode: fd 0 is not a socket (%s)", exc.strerror or exc)
                return ExitCode.USAGE
        try:
            peer = peer_name(conn.getpeername())
        except OSError:
            peer = "socket"
        notifier.ready(f"serving one association from {peer}")
        Session(conn, peer, config, store).run()
        notifier.stopping()
        return ExitCode.OK

    listeners = [s.sock for s in inherited if s.listening]
    if not listeners:
        try:
            listeners = [create_listener(config.network)]
        except OSError as exc:
            log.critical("cannot listen on port %d: %s", config.network.port,
                         exc.strerror or exc)
            return ExitCode.UNAVAILABLE
    Master(args.config, config, store, listeners, notifier).serve()
    return ExitCode.OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration; print each problem; exit 0 when valid."""
    try:
        load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.CONFIG
    print(f"{args.config}: OK")
    return ExitCode.OK


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective configuration (defaults filled in) as TOML."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.CONFIG
    sys.stdout.write(dump_config(config))
    return ExitCode.OK


def cmd_from_storescp(args: argparse.Namespace) -> int:
    """Translate a storescp command line into TOML on stdout."""
    from dicom_ingestd.config.storescp import translate

    argv = list(args.storescp_args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    try:
        translation = translate(argv)
    except TranslationError as exc:
        print(f"dicom-ingestd: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    for warning in translation.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(translation.toml())
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-ingestd",
        description="DICOM C-STORE receiver daemon (a durable storescp for systemd).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG, metavar="PATH",
                       help=f"configuration file (default: {DEFAULT_CONFIG})")

    run = sub.add_parser("run", help="serve in the foreground",
                         description="Receive DICOM objects until SIGTERM or SIGINT.")
    with_config(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate the configuration",
                           description="Validate the configuration; exit 0 when it is valid, "
                           f"{int(ExitCode.CONFIG)} otherwise, printing each problem.")
    with_config(check)
    check.set_defaults(func=cmd_check_config)

    config = sub.add_parser("config", help="show or translate configuration",
                            description="Show the effective configuration or translate a "
                            "storescp command line.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the effective configuration as TOML",
                                 description="Print the effective configuration, defaults "
                                 "filled in, as TOML.")
    with_config(show)
    show.set_defaults(func=cmd_config_show)
    translate = config_sub.add_parser(
        "from-storescp", help="translate a storescp command line into TOML",
        description="Translate storescp options and port (and @command files) into an "
        "equivalent configuration file on stdout. Put -- before the storescp arguments.",
        usage="dicom-ingestd config from-storescp [-h] -- STORESCP-ARG...")
    translate.add_argument("storescp_args", nargs=argparse.REMAINDER, metavar="ARG",
                           help="storescp arguments, e.g. -- -od /data +B 11112")
    translate.set_defaults(func=cmd_from_storescp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dicom-ingestd` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
