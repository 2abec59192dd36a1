"""The command line contract: run, check-config, config show, config from-storescp, exit codes."""

import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, free_port, storescu
from conftest import testdata as bundled
from pydicom import dcmread

from dicom_ingestd import __version__
from dicom_ingestd.config.schema import Config


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_ingestd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


@pytest.mark.parametrize("command", [[], ["run"], ["check-config"], ["config"],
                                     ["config", "show"], ["config", "from-storescp"],
                                     ["jobs"]])
def test_help_for_every_command(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_usage_errors_exit_64() -> None:
    result = cli("frobnicate")
    assert result.returncode == 64 and "invalid choice" in result.stderr


def test_check_config_accepts_the_shipped_example() -> None:
    result = cli("check-config", "-c", str(REPO / "etc" / "ingestd.toml"))
    assert result.returncode == 0, result.stderr


def test_check_config_names_file_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[network]\nport = 0\n[storage]\nsort = "by-date"\nfsinc = true\n')
    result = cli("check-config", "-c", str(path))
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert f"{path}: network.port = 0: must be an integer from 1 to 65535" in lines
    assert any(line.startswith(f"{path}: storage.sort = 'by-date': must be one of")
               for line in lines), lines
    assert any("storage.fsinc" in line and "did you mean storage.fsync" in line
               for line in lines), lines


def test_config_show_is_loadable_and_equals_the_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    result = cli("config", "show", "-c", str(empty))
    assert result.returncode == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(result.stdout)
    from dicom_ingestd.config.load import load_config

    assert load_config(shown) == Config()
    assert tomllib.loads(result.stdout)["network"]["aetitle"] == "STORESCP"


def test_from_storescp_output_runs_and_behaves_like_storescp(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    result = cli("config", "from-storescp", "--", "-od", str(out), "-aet", "FOO", "+xi",
                 "-fe", ".dcm", str(port))
    assert result.returncode == 0, result.stderr
    config = tmp_path / "translated.toml"
    config.write_text(result.stdout.replace('[network]\n', '[network]\nbind_address = '
                                            '"127.0.0.1"\n', 1))
    assert cli("check-config", "-c", str(config)).returncode == 0
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_ingestd", "run", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        storescu(port, bundled("MR_small.dcm"), extra=["-aec", "FOO"])
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    (stored,) = [p for p in out.iterdir() if p.is_file()]
    assert stored.name.startswith("MR.") and stored.name.endswith(".dcm")
    assert dcmread(stored).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"  # +xi


def test_from_storescp_names_an_unknown_or_unimplemented_option() -> None:
    unknown = cli("config", "from-storescp", "--", "--frobnicate", "104")
    assert unknown.returncode == 64 and "--frobnicate" in unknown.stderr
    later = cli("config", "from-storescp", "--", "+te", "104")
    assert later.returncode == 64 and "+te" in later.stderr and "not implemented" in later.stderr


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return cli("run", "-c", str(config), timeout=20)


def test_unusable_output_directory_exits_73(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[network]\nport = {free_port()}\n[storage]\noutput_directory = '
                      f'"{tmp_path / "missing"}"\n')
    result = _run(config)
    assert result.returncode == 73
    assert "output directory" in result.stderr and "missing" in result.stderr


def test_port_in_use_exits_69(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(f'[network]\nport = {port}\nbind_address = "127.0.0.1"\n'
                          f'[storage]\noutput_directory = "{tmp_path}"\n')
        result = _run(config)
    assert result.returncode == 69
    assert f"cannot listen on port {port}" in result.stderr


def test_bad_config_at_run_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[network]\nport = 'x'\n")
    result = _run(config)
    assert result.returncode == 78 and "network.port" in result.stderr
