"""Shared fixtures: a real dicom-ingestd process on loopback, and real DCMTK peers.

Nothing here is mocked: the daemon runs as `python -m dicom_ingestd run -c CONFIG` in a
subprocess, and peers are DCMTK's command-line tools or pynetdicom.  A missing peer tool is a
failure, not a skip (the test command installs them).  The helpers the fixtures use, and the
tests too, are in tests/support.
"""

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.daemon import REPO, Daemon, start_daemon
from support.peers import require_tool
from support.recorder import RECORDER_SOURCE, Recorder
from support.scu import park_before_every_send


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the long robustness tests (marked slow)")


def pytest_configure(config: pytest.Config) -> None:
    park_before_every_send()  # pynetdicom's reactor race (support.scu.park_reactor)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """Start daemons with start_daemon(tmp_path, settings); all are stopped afterwards."""
    started: list[Daemon] = []

    def factory(settings: dict[str, dict[str, Any]] | None = None, **kw: Any) -> Daemon:
        kw.setdefault("name", f"d{len(started)}")
        daemon = start_daemon(tmp_path, settings, **kw)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    """A daemon with the default configuration."""
    return daemon_factory()  # type: ignore[no-any-return]


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER_SOURCE)
    return Recorder(script, tmp_path / "records.jsonl")


@dataclass(frozen=True)
class DebBuild:
    """One run of packaging/build-deb for the session (test_packaging lints it, the
    end-to-end suite installs it): ~12 s saved per extra build."""

    result: subprocess.CompletedProcess[str]
    directory: Path


@pytest.fixture(scope="session")
def deb_build(tmp_path_factory: pytest.TempPathFactory) -> DebBuild:
    require_tool("dpkg-buildpackage")
    out = tmp_path_factory.mktemp("deb") / "dist"
    result = subprocess.run([str(REPO / "packaging/build-deb"), "-o", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"packaging/build-deb failed:\n{result.stdout}\n" \
        f"{result.stderr}"
    return DebBuild(result, out)


@pytest.fixture
def receivers() -> Iterator[list[Any]]:
    """Receivers a test starts (test_differential's); all are stopped however it ends."""
    started: list[Any] = []
    yield started
    for receiver in started:
        receiver.stop()
