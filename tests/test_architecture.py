"""The module layout reads like the architecture; these rules keep it that way.

config → listener/process model → association policy → storage → study events → jobs: a
worker (one association) never reaches into the master, the study tracker or the job queue
(it writes records to the outbox and datagrams over ipc), pynetdicom stays inside worker/,
and only cli.py exits the process.
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


def test_pynetdicom_only_inside_worker() -> None:
    for name, used in modules().items():
        if not name.startswith("worker/"):
            bad = sorted(u for u in used if u.split(".")[0] == "pynetdicom")
            assert not bad, f"{name} imports {bad}"


def test_leaf_modules_use_the_standard_library_only() -> None:
    leaves = {"errors.py", "codes.py", "config/schema.py", "config/asconfig.py",
              "config/dcmtk_uids.py", "outbox.py", "ipc.py", "peer.py", "proxy.py",
              "handoff.py"}
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
