"""The command line: run, check-config, reload, status, metrics, config show,
config from-storescp, config from-asconfig, jobs.

The only module that exits the process; everything below it raises.
"""

import argparse
import contextlib
import logging
import shlex
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from dicom_ingestd import __version__
from dicom_ingestd import log as logsetup
from dicom_ingestd.codes import ExitCode
from dicom_ingestd.config.load import dump_config, load_config
from dicom_ingestd.errors import ConfigError, TranslationError

if TYPE_CHECKING:
    from dicom_ingestd.config.schema import Config
    from dicom_ingestd.jobs.queue import JobQueue

DEFAULT_CONFIG = "/etc/ingestd.toml"


def _print_problems(problems: Iterable[str], *, warning: bool = False) -> None:
    """The one way a command prints configuration problems: one line each on stderr, as
    ConfigError words them (file, key, value, what is allowed), under systemd with their
    priority (log.to_stderr).  `warning`: the command goes on regardless."""
    for problem in problems:
        if warning:
            logsetup.to_stderr(f"warning: {problem}", logging.WARNING)
        else:
            logsetup.to_stderr(problem)


def cmd_run(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGTERM/SIGINT (serve.py; per_connection.py for
    systemd Accept=yes and inetd)."""
    from dicom_ingestd import serve
    from dicom_ingestd.tls_context import build_context

    try:
        config = load_config(args.config)
        logsetup.setup(config.logging)
        # Key files are read now, before a byte is served (and only here and on reload).
        tls_context = build_context(config.tls, args.config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return serve.not_started(ExitCode.CONFIG, f"invalid configuration {args.config}")
    return serve.run(args.config, config, tls_context)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration; print each problem; exit 0 when valid."""
    from dicom_ingestd.tls_context import build_context
    try:
        # [tls] files too: a missing key or a wrong password is found before a restart.
        config = load_config(args.config)
        build_context(config.tls, args.config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return ExitCode.CONFIG
    if args.per_connection:
        from dicom_ingestd.per_connection import config_problem

        problem = config_problem(config, args.config)
        if problem:
            _print_problems([problem])
            return ExitCode.CONFIG
    from dicom_ingestd.proxy_reader import ProxyPolicy

    for warning in ProxyPolicy.from_config(config.network).warnings():
        logsetup.to_stderr(f"{args.config}: warning: {warning}", logging.WARNING)
    print(f"{args.config}: OK")
    return ExitCode.OK


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to reload its configuration; exit 0 only if it applied it.

    systemd's ExecReload= runs this as the service user, in the service's sandbox, and waits
    for it: `systemctl reload` fails when the daemon rejected the file.  The daemon itself
    validates (its user, its sandbox, its directories) and answers with the outcome of this
    very request.
    """
    from dicom_ingestd import control

    # The daemon is found through systemd's runtime directory (ExecReload=), else through
    # the configuration; with a file too broken to say where, the packaged unit's link.
    path = control.runtime_link() or _control_path(args.config)
    if path is None:
        if not control.PACKAGED_RUNTIME_LINK.exists():
            try:
                load_config(args.config)
            except ConfigError as exc:
                _print_problems(exc.problems)
            logsetup.to_stderr("reload not done: no running daemon found, and it would be "
                               "rejected")
            return ExitCode.CONFIG
        path = control.PACKAGED_RUNTIME_LINK
    try:
        answer = control.request(path, "reload", timeout=args.timeout)
    except control.ControlError as exc:
        logsetup.to_stderr(f"dicom-ingestd reload: {exc}")
        return ExitCode.UNAVAILABLE
    outcome = answer.get("reload") or {}
    if outcome.get("outcome") == "applied":
        applied = ", ".join(outcome.get("applied") or []) or "no change"
        print(f"reload applied ({applied})")
        for key in outcome.get("restart_needed") or []:
            print(f"{key} changed: takes effect after a restart")
        return ExitCode.OK
    _print_problems(outcome.get("problems") or [str(answer.get("error", "no answer"))])
    logsetup.to_stderr("reload rejected: the running daemon keeps its configuration")
    return ExitCode.CONFIG


def _control_path(config_path: str) -> "Path | None":
    """The control socket of the daemon serving `config_path`, or None for a file that
    cannot be read."""
    from dicom_ingestd.status import control_socket

    try:
        config = load_config(config_path)
    except ConfigError:
        return None
    return control_socket(config)


def _status_document(args: argparse.Namespace) -> "dict[str, object] | int":
    """The running daemon's status, or the one on disk when no daemon answers."""
    from dicom_ingestd import control
    from dicom_ingestd import status as status_doc

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        # The running daemon still answers (through systemd's runtime directory) while the
        # file is broken; say what is wrong with the file either way.
        _print_problems(exc.problems, warning=True)
        link = control.runtime_link() or control.PACKAGED_RUNTIME_LINK
        try:
            return control.request(link, "status", timeout=10.0)
        except control.ControlError:
            return ExitCode.CONFIG
    try:
        return control.request(status_doc.control_socket(config), "status", timeout=10.0)
    except control.ControlError as exc:
        doc = status_doc.offline(config, args.config)
        doc["daemon"] = {"running": False, "why": str(exc)}
        return doc


def cmd_status(args: argparse.Namespace) -> int:
    """The daemon's state and counters, as text or JSON."""
    import json

    from dicom_ingestd import status as status_doc

    doc = _status_document(args)
    if isinstance(doc, int):
        return doc
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        sys.stdout.write(status_doc.render(doc))
    return ExitCode.OK


def cmd_metrics(args: argparse.Namespace) -> int:
    """The status as Prometheus metrics (text exposition format)."""
    from dicom_ingestd.metrics import exposition

    doc = _status_document(args)
    if isinstance(doc, int):
        return doc
    sys.stdout.buffer.write(exposition(doc))
    return ExitCode.OK


def _config_or_problems(path: str) -> "Config | None":
    """The configuration, or None after printing its problems on stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return None


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the effective configuration (defaults filled in) as TOML."""
    config = _config_or_problems(args.config)
    if config is None:
        return ExitCode.CONFIG
    sys.stdout.write(dump_config(config))
    return ExitCode.OK


def cmd_haproxy_check(args: argparse.Namespace) -> int:
    """Print the HAProxy tcp-check rules of the DICOM health check for this configuration:
    its request is one the configuration accepts (else exit 78: it could never pass)."""
    from pydicom.uid import UID

    from dicom_ingestd import healthcheck

    config = _config_or_problems(args.config)
    if config is None:
        return ExitCode.CONFIG
    allowed = config.association.allowed_calling_aetitles
    calling = args.calling_ae or (allowed[0] if allowed else "HEALTHCHECK")
    if not 1 <= len(calling) <= 16 or not calling.isascii() or not calling.isprintable() \
            or "\\" in calling:
        print(f"dicom-ingestd: --calling-ae {calling!r}: an AE title is 1 to 16 printable "
              "ASCII characters, no backslash", file=sys.stderr)
        return ExitCode.USAGE
    if allowed and calling not in allowed:
        print(f"dicom-ingestd: calling AE title {calling!r} is not in "
              "association.allowed_calling_aetitles: the check would be rejected",
              file=sys.stderr)
        return ExitCode.USAGE
    try:
        chosen = healthcheck.accepted_syntax(config, calling)
    except healthcheck.Rejected as exc:
        print(f"dicom-ingestd: {args.config}: the check's association would be rejected "
              f"({exc}): it could never pass", file=sys.stderr)
        return ExitCode.CONFIG
    names = [UID(syntax.decode()).name for syntax in healthcheck.TRANSFER_SYNTAXES]
    if chosen is None:
        profile = config.negotiation.profile
        print(f"dicom-ingestd: {args.config}: Verification ({healthcheck.VERIFICATION.decode()})"
              f" is accepted with none of {', '.join(names)}"
              + (f" (negotiation.profile = {profile!r})" if profile else "")
              + ": a check could never pass; accept Verification in the negotiation",
              file=sys.stderr)
        return ExitCode.CONFIG
    if chosen != healthcheck.IMPLICIT_VR_LITTLE_ENDIAN:
        print(f"# Verification with {UID(chosen.decode()).name}, which this configuration "
              f"accepts ({names[0]} it does not): run this again after changing "
              "[negotiation]")
    if config.tls.enabled:
        print("# [tls] is enabled: the check must speak TLS too; add to default-server\n"
              "#   check-ssl verify required ca-file <the CA of the instances' certificates>\n"
              "# and, with tls.peer_certificate = \"require\", crt <a client certificate the\n"
              "# instances accept> (docs/scale-out.md)")
    sys.stdout.write(healthcheck.haproxy_rules(config.network.aetitle, calling, chosen))
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
    _print_problems(translation.warnings, warning=True)
    sys.stdout.write(translation.toml())
    return ExitCode.OK


def cmd_from_asconfig(args: argparse.Namespace) -> int:
    """Translate a DCMTK association configuration file (storescp -xf) into [negotiation]."""
    import tomli_w

    from dicom_ingestd.config.asconfig import AsconfigError, read_asconfig
    from dicom_ingestd.config.profile_tables import from_asconfig

    warnings: list[str] = []
    try:
        asconfig = read_asconfig(args.file)
        warnings += asconfig.warnings
        if args.profile is not None:
            chosen = [asconfig.select(args.profile)]
        else:
            chosen = []
            for profile in asconfig.profiles.values():
                try:
                    chosen.append(asconfig.select(profile.name))
                except AsconfigError as exc:
                    warnings.append(f"{exc}; left out")
        lists, tables = from_asconfig(asconfig, chosen)
    except (AsconfigError, ValueError) as exc:
        print(f"dicom-ingestd: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    _print_problems(warnings, warning=True)
    negotiation: dict[str, object] = {}
    if args.profile is not None:
        negotiation["profile"] = chosen[0].name
    negotiation["transfer_syntaxes"] = lists
    negotiation["profiles"] = tables
    sys.stdout.write(f"# translated from the DCMTK association configuration {args.file}\n\n")
    sys.stdout.write(tomli_w.dumps({"negotiation": negotiation}))
    return ExitCode.OK


def _open_jobs(args: argparse.Namespace, write: bool = False) -> "JobQueue | int":
    """The job database of the configuration's state directory, or an exit code."""
    from dicom_ingestd.jobs.queue import JobQueue
    from dicom_ingestd.jobs.service import state_directory

    config = _config_or_problems(args.config)
    if config is None:
        return ExitCode.CONFIG
    directory = state_directory(config)
    try:
        return JobQueue(directory, create=False, durable=config.storage.fsync,
                        busy_timeout=10.0 if write else 5.0)
    except FileNotFoundError:
        print(f"no job queue in {directory} (jobs.state_directory): no event has run a "
              "job yet", file=sys.stderr)
        return ExitCode.FAILURE if args.jobs_command != "list" else ExitCode.OK
    except (OSError, sqlite3.Error) as exc:
        print(f"cannot open the job queue in {directory}: {exc}", file=sys.stderr)
        return ExitCode.FAILURE


def _when(wall: float | None) -> str:
    if not wall:
        return "-"
    return datetime.fromtimestamp(wall).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """One line per job: id, state, kind, attempts, study, last result, command."""
    queue = _open_jobs(args)
    if isinstance(queue, int):
        return queue
    with contextlib.closing(queue):
        jobs = queue.select(args.state or (), args.limit)
        print(f"{'ID':>6}  {'STATE':<8} {'KIND':<9} {'RUNS':>4}  {'UPDATED':<19}  "
              f"{'STUDY':<28} RESULT / COMMAND")
        for job in jobs:
            study = job.study_uid + (f" #{job.batch}" if job.batch > 1 else "")
            updated = job.finished or job.started or job.created
            result = job.result or "-"
            # Values from the network reach the administrator's terminal: escaped.
            print(logsetup.escape_controls(
                f"{job.id:>6}  {job.state:<8} {job.kind:<9} {job.attempts:>4}  "
                f"{_when(updated):<19}  {study or '-':<28} {result} / {job.display}"))
        counts = queue.counts()
        print(", ".join(f"{counts.get(s, 0)} {s}" for s in ("pending", "running", "done",
                                                           "dead")))
    return ExitCode.OK


def cmd_jobs_show(args: argparse.Namespace) -> int:
    """Every field of one job."""
    queue = _open_jobs(args)
    if isinstance(queue, int):
        return queue
    with contextlib.closing(queue):
        job = queue.get(args.id)
        if job is None:
            print(f"no job {args.id} in {queue.path}", file=sys.stderr)
            return ExitCode.FAILURE
        rows = [
            ("id", str(job.id)), ("state", str(job.state)), ("kind", str(job.kind)),
            ("command", shlex.join(job.command)), ("argv", shlex.join(job.argv)),
            ("study", job.study_uid or "-"), ("batch", str(job.batch or "-")),
            ("runs", f"{job.attempts} of at most {job.max_attempts}"),
            ("timeout", f"{job.timeout:g} s" if job.timeout else "none"),
            ("created", _when(job.created)), ("started", _when(job.started)),
            ("finished", _when(job.finished)),
            ("next run", _when(job.not_before) if job.state == "pending" else "-"),
            ("pid", str(job.pid or "-")), ("result", job.result or "-"),
        ]
        for name, value in rows:
            print(logsetup.escape_controls(f"{name + ':':<10} {value}"))
        for key, value in sorted(job.env.items()):
            print(logsetup.escape_controls(f"{'env:':<10} {key}={value}"))
    return ExitCode.OK


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    """Re-queue a job (dead, done, or waiting for a retry) to run now."""
    queue = _open_jobs(args, write=True)
    if isinstance(queue, int):
        return queue
    with contextlib.closing(queue):
        try:
            job = queue.retry(args.id, time.time())
        except KeyError:
            print(f"no job {args.id} in {queue.path}", file=sys.stderr)
            return ExitCode.FAILURE
        except ValueError as exc:
            print(f"dicom-ingestd: {exc}; nothing to do", file=sys.stderr)
            return ExitCode.FAILURE
    print(f"job {job.id} re-queued ({job.max_attempts} run(s) at most): a running daemon "
          "starts it within a second, a stopped one at its next start")
    return ExitCode.OK


class _Parser(argparse.ArgumentParser):
    """Usage errors exit with EX_USAGE (64), as documented, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    check.add_argument("--per-connection", action="store_true",
                       help="also check what a per-connection instance (systemd Accept=yes, "
                       "inetd) cannot do: [events] needs the master")
    check.set_defaults(func=cmd_check_config)

    reload = sub.add_parser("reload", help="make the running daemon reload its configuration",
                            description="Ask the running daemon (over its control socket) "
                            "to reload the configuration file and wait for the outcome: exit "
                            f"0 when applied, {int(ExitCode.CONFIG)} when rejected (the "
                            "daemon keeps its configuration), "
                            f"{int(ExitCode.UNAVAILABLE)} when no daemon answers. "
                            "ExecReload= of dicom-ingestd.service.")
    with_config(reload)
    reload.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the daemon's answer (default 60)")
    reload.set_defaults(func=cmd_reload)

    status = sub.add_parser("status", help="show the daemon's state and counters",
                            description="Show version, configuration and last reload, uptime, "
                            "associations by outcome and calling AE, objects by DIMSE status, "
                            "bytes, commit latency, jobs by state, free space, the last store "
                            "and the last error: from the running daemon, or from what it "
                            "saved on disk when it is not running.")
    with_config(status)
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.set_defaults(func=cmd_status)

    metrics = sub.add_parser("metrics", help="print the metrics in the Prometheus format",
                             description="Print what status shows as Prometheus metrics "
                             "(text exposition format), e.g. for a node_exporter textfile; "
                             "see also monitoring.metrics_file.")
    with_config(metrics)
    metrics.set_defaults(func=cmd_metrics)

    config = sub.add_parser("config", help="show or translate configuration",
                            description="Show the effective configuration or translate a "
                            "storescp command line.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the effective configuration as TOML",
                                 description="Print the effective configuration, defaults "
                                 "filled in, as TOML.")
    with_config(show)
    show.set_defaults(func=cmd_config_show)
    check = config_sub.add_parser(
        "haproxy-check", help="print HAProxy tcp-check rules that speak DICOM",
        description="Print the HAProxy backend rules (option tcp-check, then tcp-check "
        "lines) of a health check that runs a Verification association with this "
        "configuration's AE title: A-ASSOCIATE-RQ, C-ECHO, A-RELEASE, proposing a transfer "
        "syntax the configuration accepts (exit 78 when it accepts none). See "
        "docs/scale-out.md.")
    with_config(check)
    check.add_argument("--calling-ae", metavar="TITLE", default="",
                       help="the check's calling AE title (default HEALTHCHECK, or the first "
                       "of association.allowed_calling_aetitles)")
    check.set_defaults(func=cmd_haproxy_check)
    translate = config_sub.add_parser(
        "from-storescp", help="translate a storescp command line into TOML",
        description="Translate storescp options and port (and @command files) into an "
        "equivalent configuration file on stdout. Put -- before the storescp arguments.",
        usage="dicom-ingestd config from-storescp [-h] -- STORESCP-ARG...")
    translate.add_argument("storescp_args", nargs=argparse.REMAINDER, metavar="ARG",
                           help="storescp arguments, e.g. -- -od /data +B 11112")
    translate.set_defaults(func=cmd_from_storescp)
    asconfig = config_sub.add_parser(
        "from-asconfig", help="translate a DCMTK association configuration file into TOML",
        description="Translate the profiles of a DCMTK association configuration file (as "
        "read by storescp -xf FILE PROFILE) into a [negotiation] table on stdout; with "
        "PROFILE, only that profile, selected.")
    asconfig.add_argument("file", metavar="FILE", help="e.g. /etc/dcmtk/storescp.cfg")
    asconfig.add_argument("profile", metavar="PROFILE", nargs="?",
                          help="the profile to select, as storescp -xf FILE PROFILE")
    asconfig.set_defaults(func=cmd_from_asconfig)

    jobs = sub.add_parser("jobs", help="inspect and re-queue event jobs",
                          description="The jobs of [events] commands, from the job database "
                          "in jobs.state_directory.")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    listing = jobs_sub.add_parser("list", help="list jobs, oldest first",
                                  description="List jobs, oldest first.")
    with_config(listing)
    listing.add_argument("--state", action="append",
                         choices=("pending", "running", "done", "dead"),
                         help="only jobs in this state (repeatable)")
    listing.add_argument("--limit", type=int, default=100, metavar="N",
                         help="the N most recent jobs (default 100; 0: all)")
    listing.set_defaults(func=cmd_jobs_list)
    show = jobs_sub.add_parser("show", help="show one job", description="Show every field "
                               "of one job: command, argv, environment, runs, last result.")
    with_config(show)
    show.add_argument("id", type=int, metavar="ID")
    show.set_defaults(func=cmd_jobs_show)
    retry = jobs_sub.add_parser("retry", help="re-queue a job",
                                description="Re-queue a dead, done or waiting job to run "
                                "now with a fresh set of attempts; the running daemon picks "
                                "it up within a second.")
    with_config(retry)
    retry.add_argument("id", type=int, metavar="ID")
    retry.set_defaults(func=cmd_jobs_retry)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dicom-ingestd` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
