"""Command-line details beyond tests/test_cli.py: the usage exit code, the wording of
configuration errors, run with a bad configuration, unimplemented storescp options."""

import os
import subprocess
import sys
from pathlib import Path

from support.daemon import REPO


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_ingestd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_usage_errors_exit_64() -> None:
    result = cli("frobnicate")
    assert result.returncode == 64 and "invalid choice" in result.stderr


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


def test_from_storescp_names_an_unknown_or_unimplemented_option() -> None:
    unknown = cli("config", "from-storescp", "--", "--frobnicate", "104")
    assert unknown.returncode == 64 and "--frobnicate" in unknown.stderr
    later = cli("config", "from-storescp", "--", "+uc", "104")
    assert later.returncode == 64 and "+uc" in later.stderr and "not implemented" in later.stderr


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return cli("run", "-c", str(config), timeout=20)


def test_bad_config_at_run_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[network]\nport = 'x'\n")
    result = _run(config)
    assert result.returncode == 78 and "network.port" in result.stderr


def _cli_to_journal(tmp_path: Path, *args: str) -> list[str]:
    """stderr of a command whose stderr is "the journal" (JOURNAL_STREAM names it, as
    systemd sets it for a service)."""
    stderr = tmp_path / "journal-stream"
    with stderr.open("w+") as out:
        st = os.fstat(out.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-m", "dicom_ingestd", *args], stdout=subprocess.DEVNULL,
                       stderr=out, env=env, timeout=30, cwd=REPO, check=False)
    return stderr.read_text().splitlines()


def test_every_command_prints_configuration_problems_one_way(tmp_path: Path) -> None:
    """One line per problem, worded by the loader; under systemd with its priority: an
    error where the command stops (78), a warning where it goes on (status, metrics)."""
    config = tmp_path / "bad.toml"
    config.write_text("[network]\nport = 0\n")
    problem = f"{config}: network.port = 0: must be an integer from 1 to 65535"
    stopping = (["run"], ["check-config"], ["config", "show"], ["config", "haproxy-check"],
                ["jobs", "list"], ["jobs", "show", "1"], ["jobs", "retry", "1"])
    for command in stopping:
        result = cli(*command, "-c", str(config))
        assert result.returncode == 78, (command, result.stderr)
        assert problem in result.stderr.splitlines(), (command, result.stderr)
        assert f"<3>{problem}" in _cli_to_journal(tmp_path, *command, "-c", str(config)), command
    for command in (["status"], ["metrics"]):
        result = cli(*command, "-c", str(config))
        assert f"warning: {problem}" in result.stderr.splitlines(), (command, result.stderr)
        assert f"<4>warning: {problem}" in _cli_to_journal(tmp_path, *command, "-c",
                                                            str(config)), command
