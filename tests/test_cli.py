"""The command line, run as an operator runs it: `python -m dicom_ingestd ...` in a subprocess.

Exit codes are the contract systemd and scripts rely on: 0 ok, 64 usage, 69 no listening
socket, 73 unusable output directory, 78 bad configuration.  The storescp translation is checked
the strong way: the translated file runs, and the daemon then stores what DCMTK's storescp
stores for the same command line (same names, same transfer syntax, same bytes).
"""

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tomli_w
from pydicom.filereader import read_file_meta_info
from support.daemon import REPO, free_port
from support.data import testdata as data_file
from support.peers import require_tool, storescu
from support.uids import IMPLICIT_LE
from support.wait import wait_until

from dicom_ingestd import __version__
from dicom_ingestd.cli import build_parser
from dicom_ingestd.config.load import config_from_mapping, load_config
from dicom_ingestd.config.schema import Config

EXAMPLE_CONFIG = REPO / "etc" / "ingestd.toml"


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_ingestd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def subcommands(parser: argparse.ArgumentParser | None = None,
                prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: (), ("run",), ("config",), ("config", "show"), ..."""
    parser = parser or build_parser()
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += subcommands(sub, (*prefix, name))
    return found


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    def listening() -> bool:
        assert proc.poll() is None, f"exited with {proc.returncode} before listening"
        return port_open(port)
    wait_until(listening, timeout, f"something listening on port {port}", interval=0.05)


@contextmanager
def running(args: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running process (the daemon or storescp) listening on `port`; stopped on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def stored_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.iterdir() if p.is_file()}


# --- help and version ----------------------------------------------------------------------------


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


@pytest.mark.parametrize("command", subcommands(), ids=lambda c: " ".join(c) or "(none)")
def test_help_of_every_command_exits_0(command: tuple[str, ...]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")


def test_the_expected_commands_exist() -> None:
    commands = set(subcommands())
    assert {("run",), ("check-config",), ("config", "show"),
            ("config", "from-storescp"), ("config", "from-asconfig")} <= commands


# --- check-config and config show ----------------------------------------------------------------


def test_check_config_accepts_the_shipped_example() -> None:
    assert EXAMPLE_CONFIG.exists(), "etc/ingestd.toml is part of the tree"
    result = cli("check-config", "-c", str(EXAMPLE_CONFIG))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(("text", "expected"), [
    ("[network]\nport = \n", ":2"),  # not TOML: the line is named
    ("[network]\nport = 70000\n", "network.port"),
    ("[network]\nport = \"104\"\n", "network.port"),
    ("[storage]\nduplicates = \"sometimes\"\n", "storage.duplicates"),
    ("[storage]\nfsinc = true\n", "storage.fsinc"),
    ("[netwrok]\nport = 104\n", "[netwrok]"),
])
def test_check_config_rejects_a_broken_file_with_78(tmp_path: Path, text: str,
                                                     expected: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    result = cli("check-config", "-c", str(path))
    assert result.returncode == 78, result.stdout + result.stderr
    assert str(path) in result.stderr
    assert expected in result.stderr


def test_check_config_of_a_missing_file_exits_78(tmp_path: Path) -> None:
    result = cli("check-config", "-c", str(tmp_path / "absent.toml"))
    assert result.returncode == 78
    assert "absent.toml" in result.stderr


def test_config_show_of_an_empty_file_is_the_defaults_and_loads_back(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("# comments only (an empty file is refused: test_reload_safety.py)\n")
    shown = cli("config", "show", "-c", str(empty))
    assert shown.returncode == 0, shown.stderr
    assert config_from_mapping(tomllib.loads(shown.stdout)) == Config()
    again = tmp_path / "shown.toml"
    again.write_text(shown.stdout)
    assert load_config(again) == Config()
    assert cli("config", "show", "-c", str(again)).stdout == shown.stdout  # a fixed point


# --- config from-storescp ------------------------------------------------------------------------


def translate(*storescp_args: str) -> subprocess.CompletedProcess[str]:
    return cli("config", "from-storescp", "--", *storescp_args)


def test_from_storescp_translation_is_valid_and_runs_like_storescp(tmp_path: Path) -> None:
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    port = free_port()
    result = translate("-od", str(ours_dir), "-aet", "FOO", "+xi", str(port))
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["network"]["port"] == port
    assert data["network"]["aetitle"] == "FOO"
    assert data["negotiation"]["preferred_transfer_syntax"] == "implicit"
    assert data["storage"]["output_directory"] == str(ours_dir)

    translated = tmp_path / "translated.toml"
    translated.write_text(result.stdout)
    check = cli("check-config", "-c", str(translated))
    assert check.returncode == 0, check.stderr

    # Run it.  Tests listen on loopback only; bind_address is the one key we add, and it has no
    # storescp option to translate from.
    data["network"]["bind_address"] = "127.0.0.1"
    runnable = tmp_path / "runnable.toml"
    runnable.write_text(tomli_w.dumps(data))
    objects = [data_file("CT_small.dcm"), data_file("MR_small.dcm"),
               data_file("MR_small_bigendian.dcm")]
    with running([sys.executable, "-m", "dicom_ingestd", "run", "-c", str(runnable)], port,
                 tmp_path / "ours.log") as daemon:
        for path in objects:
            storescu(port, path, extra=["-aec", "FOO"])
        assert daemon.poll() is None

    reference_port = free_port()
    with running([require_tool("storescp"), "-od", str(theirs_dir), "-aet", "FOO", "+xi",
                  str(reference_port)], reference_port, tmp_path / "storescp.log"):
        for path in objects:
            storescu(reference_port, path, extra=["-aec", "FOO"])

    ours, theirs = stored_files(ours_dir), stored_files(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 2  # MR_small and MR_small_bigendian are one SOP instance
    for name, path in ours.items():
        assert read_file_meta_info(path).TransferSyntaxUID == IMPLICIT_LE, name
        assert read_file_meta_info(theirs[name]).TransferSyntaxUID == IMPLICIT_LE, name


def test_from_storescp_names_an_unknown_option() -> None:
    result = translate("--no-such-option", "104")
    assert result.returncode != 0
    assert "--no-such-option" in result.stderr
    assert result.stdout == ""


# --- run: exit codes when it cannot serve --------------------------------------------------------


def run_config(tmp_path: Path, settings: dict[str, dict[str, object]]) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(settings))
    return path


def test_run_with_a_missing_output_directory_exits_73(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    config = run_config(tmp_path, {
        "network": {"port": free_port(), "bind_address": "127.0.0.1"},
        "storage": {"output_directory": str(missing)}})
    result = cli("run", "-c", str(config), timeout=20)
    assert result.returncode == 73, result.stderr
    assert str(missing) in result.stderr
    assert "output directory" in result.stderr
    assert not missing.exists()


def test_run_on_a_port_in_use_exits_69(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = run_config(tmp_path, {
            "network": {"port": port, "bind_address": "127.0.0.1"},
            "storage": {"output_directory": str(tmp_path)}})
        result = cli("run", "-c", str(config), timeout=20)
    assert result.returncode == 69, result.stderr
    assert str(port) in result.stderr


# --- status, metrics, reload ---------------------------------------------------------------------
def _daemon_config(tmp_path: Path, **tables: dict[str, object]) -> tuple[Path, Path, int]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    port = free_port()
    settings: dict[str, dict[str, object]] = {
        "network": {"port": port, "bind_address": "127.0.0.1"},
        "storage": {"output_directory": str(out)}}
    for table, keys in tables.items():
        settings.setdefault(table, {}).update(keys)
    config = tmp_path / "d.toml"
    config.write_text(tomli_w.dumps(settings))
    return config, out, port


def test_status_and_metrics_without_a_daemon_read_the_disk(tmp_path: Path) -> None:
    config, _, _ = _daemon_config(tmp_path)
    text = cli("status", "-c", str(config))
    assert text.returncode == 0, text.stderr
    assert "not running" in text.stdout and "jobs: none" in text.stdout
    doc = json.loads(cli("status", "--json", "-c", str(config)).stdout)
    assert doc["daemon"]["running"] is False and doc["version"] == __version__
    assert doc["counters"]["stored"] == 0 and doc["jobs"] is None
    assert doc["disk"]["output"]["free_bytes"] > 0
    metrics = cli("metrics", "-c", str(config)).stdout
    assert "dicom_ingestd_up 0.0" in metrics
    assert "# TYPE dicom_ingestd_store_commit_seconds histogram" in metrics


def test_reload_without_a_daemon_exits_69(tmp_path: Path) -> None:
    config, _, _ = _daemon_config(tmp_path)
    result = cli("reload", "-c", str(config))
    assert result.returncode == 69, result.stderr
    assert "no daemon is running" in result.stderr


def test_status_counts_what_the_daemon_did_and_keeps_it_across_restarts(
        tmp_path: Path) -> None:
    config, _, port = _daemon_config(tmp_path, storage={"duplicates": "reject"},
                                       monitoring={"low_space_margin": 0})
    ct = data_file("CT_small.dcm")
    with running([sys.executable, "-m", "dicom_ingestd", "run", "-c", str(config)], port,
                 tmp_path / "d.log"):
        storescu(port, ct, extra=["-aet", "CT01"], timeout=60)
        storescu(port, ct, extra=["-aet", "CT01"], timeout=60, check=False)  # 0x0111
        live = json.loads(cli("status", "--json", "-c", str(config)).stdout)
        reloaded = cli("reload", "-c", str(config))
    assert reloaded.returncode == 0 and "reload applied" in reloaded.stdout, reloaded.stderr
    daemon = live["daemon"]
    assert daemon["running"] and daemon["active_associations"] == 0
    counters = live["counters"]
    assert counters["objects"] == {"0x0000": 1, "0x0111": 1}, counters
    assert counters["stored"] == 1 and counters["failed"] == 1
    assert counters["bytes_stored"] > 0 and counters["last_success"] > 0
    assert "0x0111" in counters["last_error"]["text"]
    # (running()'s port probe is a connection closed before any A-ASSOCIATE-RQ.)
    assert {(r["outcome"], r["calling_ae"], r["count"]) for r in counters["associations"]} \
        == {("released", "CT01", 2), ("closed", "-", 1)}
    assert sum(counters["commit_seconds"]["counts"]) == 1
    # Stopped: the same counters from the disk; started again: they go on from there.
    offline = json.loads(cli("status", "--json", "-c", str(config)).stdout)
    assert offline["daemon"]["running"] is False
    assert offline["counters"]["objects"] == counters["objects"]
    assert offline["counters"]["since"] == counters["since"]
    with running([sys.executable, "-m", "dicom_ingestd", "run", "-c", str(config)], port,
                 tmp_path / "d2.log"):
        text = cli("status", "-c", str(config)).stdout
        metrics = cli("metrics", "-c", str(config)).stdout
    assert "1 stored" in text and "0x0111" in text and "CT01: 2 released" in text, text
    assert 'dicom_ingestd_objects_total{result="failure",status="0x0111"} 1.0' in metrics
    assert 'dicom_ingestd_associations_total{calling_ae="CT01",outcome="released"} 2.0' \
        in metrics
    assert "dicom_ingestd_up 1.0" in metrics


def test_run_with_an_invalid_file_closes_the_connection_that_started_it(
        tmp_path: Path) -> None:
    """Socket activation of a daemon that cannot start: the connection waiting on the
    inherited socket is closed (not left to start it again and again)."""
    require_tool("systemd-socket-activate")
    config = tmp_path / "bad.toml"
    config.write_text("[storage]\nsort = 'sideways'\n")
    port = free_port()
    proc = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
                             sys.executable, "-m", "dicom_ingestd", "run", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 10
        while not port_open(port):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # port_open's probe itself started the daemon, which closed it; a real peer too:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.settimeout(20)
            assert sock.recv(1) == b""  # closed unanswered
        # It exits by itself (78) once every waiting connection is closed.
        output = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 78, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert "storage.sort = 'sideways'" in output
    assert "waiting connection(s) unanswered" in output, output
