"""dicom-ingestd against every independent Storage SCU installable here, per transfer syntax.

One daemon for the module; each sender sends each representative file as its own process,
through the recording relay (see harness.py for every check and senders.py for the commands).
A sender that is not installed, cannot send a file, or has no C-ECHO is a skip with the reason;
a receiver-side problem is a failure.  The last test checks that docs/interop-matrix.md still
says what these runs found (regenerate it with scripts/interop-matrix).

PixelMed starts a JVM per file and pynetdicom's app a Python interpreter that imports pydicom
and pynetdicom (about a second each on our CI machines), so only a representative part of
their rows runs by default (pynetdicom is also the peer of most other test modules);
`--run-slow` runs every cell.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import start_daemon

from .harness import BATCH, DAEMON_SETTINGS, FAIL, NOT_SENT, SKIP, Cell, Harness
from .matrix import BATCH_LABEL, DOC, detail_line, table_of
from .senders import SENDER_BY_KEY, SENDERS, SYNTAXES, Sender, Syntax
from .wire import WireTap

# Senders that start slowly, and the part of their rows that runs without --run-slow: one file
# per kind of encoding (little and big endian, deflated, JPEG, JPEG 2000).
SLOW_STARTERS = {"pixelmed", "pynetdicom"}
QUICK_SYNTAXES = {"explicit-le", "explicit-be", "deflated", "jpeg-baseline", "j2k"}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    daemon = start_daemon(tmp_path_factory.mktemp("interop"), DAEMON_SETTINGS, name="interop")
    tap = WireTap(daemon.port)
    try:
        yield Harness(daemon, tap)
    finally:
        tap.close()
        daemon.stop()


def _outcome(cell: Cell, what: str) -> None:
    assert cell.outcome != FAIL, f"{what}:\n" + "\n".join(cell.problems)
    if cell.outcome in (SKIP, NOT_SENT):
        pytest.skip(f"{what}: {cell.outcome}: {cell.reason}")


def _store_params() -> list[Any]:
    params = []
    for sender in SENDERS:
        for syntax in SYNTAXES:
            marks = [pytest.mark.slow] if sender.key in SLOW_STARTERS and \
                syntax.key not in QUICK_SYNTAXES else []
            params.append(pytest.param(sender, syntax, id=f"{sender.key}-{syntax.key}",
                                       marks=marks))
    return params


@pytest.mark.parametrize(("sender", "syntax"), _store_params())
def test_store(harness: Harness, sender: Sender, syntax: Syntax) -> None:
    _outcome(harness.store(sender, syntax), f"{sender.label} × {syntax.label}")


@pytest.mark.parametrize("sender", SENDERS, ids=lambda s: s.key)
def test_every_file_in_one_invocation(harness: Harness, sender: Sender) -> None:
    _outcome(harness.batch(sender), f"{sender.label}, all files at once")


@pytest.mark.parametrize("sender", SENDERS, ids=lambda s: s.key)
def test_echo(harness: Harness, sender: Sender) -> None:
    _outcome(harness.echo(sender), f"{sender.label} C-ECHO")


def test_docs_matrix_says_what_these_runs_found(harness: Harness) -> None:
    """Every cell run in this session has the same line in docs/interop-matrix.md.

    Cells of senders that cannot run here are left out (they depend on the machine), and so are
    cells not run (-k, or the slow part without --run-slow).
    """
    if not harness.cells:
        pytest.skip("no interoperability cell ran in this session")
    table = table_of(DOC.read_text()) if DOC.exists() else ""
    stale = []
    for (sender_key, syntax_key), cell in harness.cells.items():
        sender = SENDER_BY_KEY[sender_key]
        if cell.outcome == SKIP and sender.unavailable():
            continue
        label = BATCH_LABEL if syntax_key == BATCH else \
            next((s.label for s in SYNTAXES if s.key == syntax_key), "C-ECHO")
        line = detail_line(sender, label, cell)
        if line not in table:
            stale.append(line)
    assert not stale, (f"{Path(DOC).name} is stale; run scripts/interop-matrix. Lines not in "
                       "it:\n" + "\n".join(stale))
