"""The module layout reads like the architecture; these rules keep it that way.

config → listener/process model → association policy → storage → study events → jobs: a
worker (one association) never reaches into the master, the study tracker or the job queue
(it writes records to the outbox and datagrams over ipc), pynetdicom stays inside worker/,
the configuration is read without the TLS stack, the jobs do not reach into the worker,
the command line reaches an association only through the process model (serve.py hands a
connection to per_connection.py or listeners to the master), and only cli.py exits the
process.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dicom_ingestd"


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): imports(p) for p in PACKAGE.rglob("*.py")}


def test_workers_never_import_the_master_side() -> None:
    forbidden = ("dicom_ingestd.master", "dicom_ingestd.tracker", "dicom_ingestd.jobs",
                 "dicom_ingestd.cli", "dicom_ingestd.running", "dicom_ingestd.assignment")
    for name, used in modules().items():
        if name.startswith("worker/"):
            bad = sorted(u for u in used if u.startswith(forbidden))
            assert not bad, f"{name} imports {bad}"


def _imported(names: tuple[str, ...], used: set[str]) -> list[str]:
    """The imports in `used` that are one of `names` or inside it (a package, a module)."""
    return sorted(u for u in used if any(u == n or u.startswith(n + ".") for n in names))


def test_configuration_imports_neither_tls_nor_the_worker() -> None:
    # check-config, reload and config show read the configuration; only building the
    # context (tls.py, at start-up and reload) and the handshake (worker/tls.py) need TLS,
    # and serving associations is a later layer (the certificate subject grammar both share
    # is config/subjects.py, the DCMTK tables dcmtk/).
    forbidden = ("ssl", "dicom_ingestd.tls_context", "dicom_ingestd.worker")
    for name, used in modules().items():
        if name.startswith("config/"):
            bad = _imported(forbidden, used)
            assert not bad, f"{name} imports {bad}"


def test_jobs_do_not_import_the_worker() -> None:
    # The master's side reads what workers wrote (outbox, spool) through shared modules,
    # never worker code: what both need lives below both (dcmtk/, commitment/).
    for name, used in modules().items():
        if name.startswith("jobs/"):
            bad = _imported(("dicom_ingestd.worker",), used)
            assert not bad, f"{name} imports {bad}"


def test_the_command_line_does_not_import_the_worker() -> None:
    # cli.py parses and dispatches; `run` hands over to serve.py, and an association is
    # served by the process model only: per_connection.py (Accept=yes, inetd) or the
    # master's workers.
    used = modules()["cli.py"]
    bad = _imported(("dicom_ingestd.worker", "dicom_ingestd.master", "dicom_ingestd.pool",
                     "dicom_ingestd.running", "dicom_ingestd.assignment",
                     "dicom_ingestd.warm"), used)
    assert not bad, f"cli.py imports {bad}"


def test_only_the_process_model_serves_an_association() -> None:
    # A Session is made from an Assignment (assignment.py) for a warm worker (warm.py) or a
    # worker thread (running.py), or by a per-connection instance (per_connection.py):
    # nowhere else, so the access check, the PROXY header and the counters are never
    # skipped on the way to one.
    serving = {"assignment.py", "warm.py", "per_connection.py"}
    for name, used in modules().items():
        if not name.startswith("worker/") and name not in serving:
            bad = _imported(("dicom_ingestd.worker.session",), used)
            assert not bad, f"{name} imports {bad}"


def test_the_wire_codecs_are_below_the_worker_and_the_commitment_delivery() -> None:
    # dicom/ (PDUs, DIMSE command sets, element encoding) is the protocol both the receiving
    # side (worker/) and the storage commitment delivery, an SCU (commitment/), speak: it
    # imports neither, and commitment/ does not reach into worker/ for it.
    for name, used in modules().items():
        if name.startswith("dicom/"):
            bad = _imported(("dicom_ingestd.worker", "dicom_ingestd.commitment"), used)
            assert not bad, f"{name} imports {bad}"
        if name.startswith("commitment/"):
            bad = _imported(("dicom_ingestd.worker",), used)
            assert not bad, f"{name} imports {bad}"


def test_pynetdicom_only_inside_worker() -> None:
    for name, used in modules().items():
        if not name.startswith("worker/"):
            bad = sorted(u for u in used if u.split(".")[0] == "pynetdicom")
            assert not bad, f"{name} imports {bad}"


def test_leaf_modules_use_the_standard_library_only() -> None:
    leaves = {"errors.py", "codes.py", "config/schema.py", "config/asconfig.py",
              "dcmtk/uids.py", "dcmtk/modalities.py", "dcmtk/storage.py", "dcmtk/transfer.py",
              "outbox.py", "ipc.py", "peer.py", "proxy.py",
              "handoff.py", "processes.py", "config/subjects.py"}
    for name in leaves:
        third_party = sorted(u for u in modules()[name]
                             if u.split(".")[0] in ("pydicom", "pynetdicom", "watchdog",
                                                    "sdnotify", "tomli_w"))
        assert not third_party, f"{name} imports {third_party}"


def test_only_cli_exits_the_process() -> None:
    for path in PACKAGE.rglob("*.py"):
        name = str(path.relative_to(PACKAGE))
        if name in ("cli.py", "__main__.py", "jobs/rename.py",  # entry points (rename.py
                    "commitment/deliver_job.py"):
            continue  # runs as a job's own process)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "exit" and getattr(node.func.value, "id", "") == "sys":
                raise AssertionError(f"{name}:{node.lineno} calls sys.exit")
