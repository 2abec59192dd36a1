"""The packaging: systemd units, manual pages, the packaged /etc/ingestd.toml, the .deb.

Fast checks of the files under packaging/ and man/ (systemd-analyze verify and security,
groff, consistency with the schema, the CLI and the daemon's constants), and one build of
the Debian package with lintian (about 20 s; `-k "not deb_build"` leaves it out).  The
end-to-end test under a real systemd is tests/test_systemd_e2e.py.
"""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DebBuild
from support.daemon import REPO

from dicom_ingestd import __version__
from dicom_ingestd.cli import DEFAULT_CONFIG, build_parser
from dicom_ingestd.codes import ExitCode
from dicom_ingestd.config.load import diff_configs, load_config
from dicom_ingestd.config.schema import STORESCP, WHOLE_TABLE, Config, keys
from dicom_ingestd.master import KILL_GRACE

SYSTEMD = REPO / "packaging" / "systemd"
DEBIAN = REPO / "packaging" / "debian"
MAN8 = REPO / "man" / "dicom-ingestd.8"
MAN5 = REPO / "man" / "ingestd.toml.5"
SERVICE = SYSTEMD / "dicom-ingestd.service"
ACCEPT_SERVICE = SYSTEMD / "dicom-ingestd-accept@.service"
SOCKET = SYSTEMD / "dicom-ingestd.socket"
ACCEPT_SOCKET = SYSTEMD / "dicom-ingestd-accept.socket"
UNITS = (SERVICE, SOCKET, ACCEPT_SOCKET, ACCEPT_SERVICE)
SERVICES = (SERVICE, ACCEPT_SERVICE)
MAX_EXPOSURE = 1.0
PACKAGED_OUTPUT = "/var/lib/dicom-ingestd/incoming"
PACKAGED_STATE = "/var/lib/dicom-ingestd/state"
SYSPATH = "/usr/sbin:/usr/bin:/sbin:/bin"


# -- helpers ---------------------------------------------------------------------------------
TOOL_PACKAGES = {
    "systemd-analyze": "systemd", "systemd-sysusers": "systemd", "groff": "groff-base",
    "dpkg-parsechangelog": "dpkg-dev", "dpkg-buildpackage": "dpkg-dev", "lintian": "lintian",
}


def require_tool(name: str) -> str:
    """The tool's path; fail (never skip) naming the Debian package that has it."""
    path = shutil.which(name, path=SYSPATH)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {TOOL_PACKAGES[name]}")
    return path


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file as {"Section.Key": [values in order]}."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def run(args: list[str], *, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def packaged_config_text() -> str:
    """The packaged /etc/ingestd.toml (a short conffile)."""
    return (DEBIAN / "ingestd.toml").read_text()


def packaged_reference_text() -> str:
    """etc/ingestd.toml as debian/rules turns it into the complete reference,
    /usr/share/doc/dicom-ingestd/examples/ingestd.toml."""
    result = run(["sed", "-f", str(DEBIAN / "ingestd.toml.sed"), str(REPO / "etc/ingestd.toml")])
    assert result.returncode == 0, result.stderr
    return result.stdout


def unit_root(tmp_path: Path, units: list[Path]) -> Path:
    """A root for `systemd-analyze verify --root`: the host's units, ours, and stand-ins for
    the programs our units run (ExecStart= paths are checked inside the root)."""
    root = tmp_path / "root"
    unit_dir = root / "lib/systemd/system"
    shutil.copytree("/lib/systemd/system", unit_dir, symlinks=True)
    for unit in units:
        shutil.copy(unit, unit_dir / unit.name)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "bin").symlink_to("usr/bin")
    for program in ("usr/bin/dicom-ingestd", "usr/bin/kill"):
        target = root / program
        if not target.exists():
            target.write_text("#!/bin/sh\n")
            target.chmod(0o755)
    return root


def verify_units(root: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    require_tool("systemd-analyze")
    return run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *names])


# -- systemd units ---------------------------------------------------------------------------
def test_units_verify_without_any_message(tmp_path: Path) -> None:
    root = unit_root(tmp_path, list(UNITS))
    result = verify_units(root, ["dicom-ingestd.socket", "dicom-ingestd.service",
                                 "dicom-ingestd-accept.socket",
                                 "dicom-ingestd-accept@0.service"])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_does_report_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo'd directive is reported."""
    broken = tmp_path / "dicom-ingestd.service"
    broken.write_text(SERVICE.read_text().replace("ProtectHome=", "ProtectHoem="))
    result = verify_units(unit_root(tmp_path, [broken, SOCKET]), ["dicom-ingestd.service"])
    assert "ProtectHoem" in result.stdout + result.stderr


@pytest.mark.parametrize("unit", SERVICES, ids=lambda p: p.name)
def test_service_exposure(unit: Path) -> None:
    require_tool("systemd-analyze")
    result = run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)])
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    exposure = float(match.group(1))
    print(f"{unit.name}: systemd-analyze security exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, output


def test_service_runs_the_daemon_as_documented() -> None:
    s = unit_settings(SERVICE)
    assert s["Service.Type"] == ["notify"]
    assert s["Service.ExecStart"] == [f"/usr/bin/dicom-ingestd run -c {DEFAULT_CONFIG}"]
    assert s["Service.ExecReload"] == [f"/usr/bin/dicom-ingestd reload -c {DEFAULT_CONFIG}"]
    assert s["Service.Restart"] == ["on-failure"]
    assert {str(int(ExitCode.CONFIG)), str(int(ExitCode.CANTCREAT))} <= set(
        s["Service.RestartPreventExitStatus"][0].split())
    # A failed start must never leave the socket in service-start-limit-hit.
    assert s["Unit.StartLimitIntervalSec"] == ["0"]
    assert s["Service.KillMode"] == ["mixed"]
    assert s["Service.User"] == ["dicom-ingestd"]
    assert "dicom-ingestd.socket" in s["Unit.Requires"][0].split()
    assert "dicom-ingestd.socket" in s["Unit.After"][0].split()


def test_stop_timeout_outlasts_the_daemons_own_stop() -> None:
    """systemd must not SIGKILL before the master has let associations finish (stop_timeout)
    and then stopped the stragglers itself (KILL_GRACE later)."""
    default_stop = Config().workers.stop_timeout
    timeout = int(unit_settings(SERVICE)["Service.TimeoutStopSec"][0])
    assert timeout > default_stop + KILL_GRACE


def test_state_directories_are_the_packaged_output_and_job_directories() -> None:
    config = load_config_text(packaged_config_text())
    assert config.storage.output_directory == PACKAGED_OUTPUT
    assert config.jobs.state_directory == PACKAGED_STATE
    mode = unit_settings(SERVICE)["Service.StateDirectoryMode"][0]
    tmpfiles = (SYSTEMD / "tmpfiles.d/dicom-ingestd.conf").read_text()
    for unit in SERVICES:
        s = unit_settings(unit)
        assert s["Service.ReadWritePaths"] == ["/var/lib/dicom-ingestd"], unit.name
        for directory in (PACKAGED_OUTPUT, PACKAGED_STATE):
            assert directory.removeprefix("/var/lib/") in s["Service.StateDirectory"][0].split()
    for directory in ("/var/lib/dicom-ingestd", PACKAGED_OUTPUT, PACKAGED_STATE):
        assert re.search(rf"^d {re.escape(directory)} +{mode} dicom-ingestd dicom-ingestd -$",
                         tmpfiles, re.M), directory


def test_both_services_have_the_same_sandbox() -> None:
    main, accept = unit_settings(SERVICE), unit_settings(ACCEPT_SERVICE)
    # Lifecycle settings differ on purpose; everything else must match.
    lifecycle = {"Type", "ExecStart", "ExecReload", "WatchdogSec", "Restart", "RestartSec",
                 "RestartPreventExitStatus", "TimeoutStopSec", "KillMode", "NotifyAccess",
                 "RuntimeDirectory", "RuntimeDirectoryMode"}
    def sandbox(s: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: v for k, v in s.items()
                if k.startswith("Service.") and k.split(".", 1)[1] not in lifecycle}
    assert sandbox(main) == sandbox(accept)


def test_sockets_listen_on_104_in_both_styles() -> None:
    plain, accept = unit_settings(SOCKET), unit_settings(ACCEPT_SOCKET)
    assert plain["Socket.ListenStream"] == accept["Socket.ListenStream"] == ["104"]
    assert plain.get("Socket.Accept", ["no"]) == ["no"]
    assert accept["Socket.Accept"] == ["yes"]
    assert "dicom-ingestd.socket" in accept["Unit.Conflicts"][0].split()
    assert plain["Install.WantedBy"] == accept["Install.WantedBy"] == ["sockets.target"]
    assert "Install.WantedBy" not in unit_settings(SERVICE)  # started by its socket only


def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles accept our files and create the user and the
    directories, owned by it, in a scratch root."""
    require_tool("systemd-sysusers")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text("")
    result = run(["systemd-sysusers", f"--root={root}",
                  str(SYSTEMD / "sysusers.d/dicom-ingestd.conf")])
    assert result.returncode == 0, result.stderr
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^dicom-ingestd:x:\d+:\d+:.*:/usr/sbin/nologin$", passwd, re.M), passwd
    result = run(["systemd-tmpfiles", f"--root={root}", "--create",
                  str(SYSTEMD / "tmpfiles.d/dicom-ingestd.conf")])
    assert result.returncode == 0, result.stderr
    uid = int(passwd.split(":")[2])
    for directory in ("var/lib/dicom-ingestd", "var/lib/dicom-ingestd/incoming",
                      "var/lib/dicom-ingestd/state"):
        st = (root / directory).stat()
        assert (st.st_uid, oct(st.st_mode & 0o777)) == (uid, "0o750"), directory


# -- manual pages ----------------------------------------------------------------------------
@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_man_page_formats_without_warnings(page: Path) -> None:
    require_tool("groff")
    for args in (["groff", "-man", "-ww", "-z"],
                 ["groff", "-t", "-man", "-ww", "-z", "-Tutf8", "-rLL=78n"]):
        result = run([*args, str(page)])
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), args


def test_every_config_key_is_in_ingestd_toml_5() -> None:
    text = MAN5.read_text()
    sections = dict(re.findall(r"^\.SS \[(\w+)\]\n(.*?)(?=^\.S[SH] )", text, re.M | re.S))
    for full, field in keys():
        table, key = full.split(".", 1)
        if field.metadata.get(WHOLE_TABLE):
            # Every key of the table is the user's (an AE title): the section is the entry.
            assert f"[{table}." in sections.get(table, ""), full
            continue
        assert f"\\fB{key}\\fR" in sections.get(table, ""), full


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(prefix + name)
                found.extend(_commands(sub, prefix + name + " "))
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found = {opt for action in parser._actions for opt in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def _man_section(text: str, name: str) -> str:
    match = re.search(rf"^\.SH {name}\n(.*?)(?=^\.SH )", text, re.M | re.S)
    assert match, name
    return match.group(1)


def test_every_cli_command_and_option_is_in_dicom_ingestd_8() -> None:
    text = MAN8.read_text()
    commands = _commands(build_parser())
    assert {"run", "check-config", "config show", "config from-storescp", "reload", "status",
            "metrics"} <= set(commands)
    synopsis = _man_section(text, "SYNOPSIS").replace("\n.B ", " ")
    described = _man_section(text, "COMMANDS")
    for command in commands:
        roff = command.replace("-", "\\-")
        assert roff in described, command
        if command != "config":
            assert roff in synopsis, command
    options = _man_section(text, "OPTIONS")
    for option in _options(build_parser()):
        assert option.replace("-", "\\-") in options, option


def test_every_exit_code_is_in_dicom_ingestd_8() -> None:
    described = _man_section(MAN8.read_text(), "EXIT STATUS")
    for code in (ExitCode.OK, ExitCode.USAGE, ExitCode.UNAVAILABLE, ExitCode.CANTCREAT,
                 ExitCode.CONFIG):
        assert f".B {int(code)}\n" in described, code
    assert ".B 2\n" not in described  # argparse's 2 is never used (EX_USAGE instead)


def test_storescp_table_of_dicom_ingestd_8_follows_the_schema() -> None:
    result = run([sys.executable, str(REPO / "packaging/update-man"), "--check"])
    assert result.returncode == 0, result.stderr
    table = _man_section(MAN8.read_text(), "STORESCP OPTIONS")
    for full, f in keys():
        if f.metadata[STORESCP]:
            assert re.search(rf"^{re.escape(full)}(  |\n)", table, re.M), full


# -- Debian package sources ------------------------------------------------------------------
def load_config_text(text: str, tmp: Path | None = None) -> Config:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=tmp) as fh:
        fh.write(text)
        fh.flush()
        return load_config(fh.name)


def test_packaged_config_is_valid_and_sets_only_the_service_settings(tmp_path: Path) -> None:
    text = packaged_config_text()
    config = load_config_text(text, tmp_path)
    assert config.storage.output_directory == PACKAGED_OUTPUT
    assert config.network.port == 104
    assert config.jobs.state_directory == PACKAGED_STATE
    assert sorted(key for key, _ in diff_configs(Config(), config)) == [
        "jobs.state_directory", "storage.output_directory"]
    uncommented = [line for line in text.splitlines() if line and not line.startswith(("#", "["))]
    assert uncommented == ["port = 104", f'output_directory = "{PACKAGED_OUTPUT}"',
                           f'state_directory = "{PACKAGED_STATE}"']
    # Short, so that a new version's documentation never changes it (no conffile prompt),
    # and pointing at the documentation and the complete reference.
    assert len(text.splitlines()) <= 40
    for pointer in ("man 5 ingestd.toml", "/usr/share/doc/dicom-ingestd/examples/ingestd.toml",
                    "systemctl reload dicom-ingestd"):
        assert pointer in text, pointer


def test_preinst_carries_the_conffile_for_the_upgrade_from_0_1() -> None:
    preinst = (DEBIAN / "dicom-ingestd.preinst").read_text()
    embedded = preinst.split("<<'END_OF_CONFFILE'\n", 1)[1].split("END_OF_CONFFILE\n", 1)[0]
    assert embedded == packaged_config_text()


def test_packaged_reference_says_what_the_conffile_says(tmp_path: Path) -> None:
    reference = packaged_reference_text()
    assert len(reference.splitlines()) > 300  # every key, commented
    assert load_config_text(reference, tmp_path) == load_config_text(packaged_config_text(),
                                                                     tmp_path)
    assert "/etc/ingestd.toml" in reference.split("[network]")[0]


def test_changelog_version_is_the_package_version() -> None:
    require_tool("dpkg-parsechangelog")
    result = run(["dpkg-parsechangelog", "-l", str(DEBIAN / "changelog"), "-S", "Version"],
                 env={"PATH": SYSPATH})
    assert result.stdout.strip() == __version__


def test_vendored_wheels_are_pinned_with_hashes() -> None:
    text = (DEBIAN / "vendor-requirements.txt").read_text()
    pins = re.findall(r"^([\w.-]+)==(\S+) \\\n\s+--hash=sha256:[0-9a-f]{64}$", text, re.M)
    assert sorted(name for name, _ in pins) == ["pydicom", "pynetdicom"]
    copyright_text = (DEBIAN / "copyright").read_text()
    for name, version in pins:
        assert f"{name} {version}" in copyright_text, name


# -- the package itself ----------------------------------------------------------------------
def test_deb_build_and_lintian(deb_build: DebBuild, tmp_path: Path) -> None:
    """packaging/build-deb produces the .deb; lintian --pedantic has nothing to say."""
    require_tool("lintian")
    result, out = deb_build.result, deb_build.directory
    deb = out / f"dicom-ingestd_{__version__}_all.deb"
    assert result.stdout.strip().splitlines()[-1] == str(deb)
    changes = next(out.glob(f"dicom-ingestd_{__version__}_*.changes"))
    lint = run(["lintian", "--pedantic", "--fail-on", "none", str(changes)],
               env={"PATH": SYSPATH, "LANG": "C.UTF-8"})
    print(lint.stdout)
    tags = [line for line in lint.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert lint.returncode == 0 and not tags, lint.stdout + lint.stderr

    def field(name: str) -> str:
        return run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()

    assert field("Architecture") == "all"
    depends = field("Depends")
    for dependency in ("python3-sdnotify", "python3-tomli-w", "python3-watchdog",
                       "python3:any (>= 3.11~)"):
        assert dependency in depends
    assert "pydicom" not in depends and "pynetdicom" not in depends
    assert "python3-prometheus-client" in depends and "debconf" in depends
    files = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ("./etc/ingestd.toml", "./usr/bin/dicom-ingestd",
                 "./lib/systemd/system/dicom-ingestd.service",
                 "./lib/systemd/system/dicom-ingestd-accept@.service",
                 "./usr/lib/sysusers.d/dicom-ingestd.conf",
                 "./usr/share/man/man8/dicom-ingestd.8.gz",
                 "./usr/share/man/man5/ingestd.toml.5.gz",
                 "./usr/lib/dicom-ingestd/dicom_ingestd/cli.py",
                 "./usr/lib/dicom-ingestd/vendor/pydicom/__init__.py",
                 "./usr/lib/dicom-ingestd/vendor/pynetdicom/__init__.py",
                 "./usr/share/doc/dicom-ingestd/examples/ingestd.toml",
                 "./usr/share/doc/dicom-ingestd/NEWS.Debian.gz",
                 "./usr/share/doc/dicom-ingestd/README.Debian"):
        assert f" {path}\n" in files, path
    # The developers' README (and the documents it links to) is not shipped.
    assert "./usr/share/doc/dicom-ingestd/README.md" not in files
    control = tmp_path / "control"
    run(["dpkg-deb", "-e", str(deb), str(control)])
    assert (control / "conffiles").read_text().split() == ["/etc/ingestd.toml"]
    assert "dicom-ingestd/purge-received-objects" in (control / "templates").read_text()
    root = tmp_path / "installed"
    run(["dpkg-deb", "-x", str(deb), str(root)])
    assert (root / "etc/ingestd.toml").read_text() == packaged_config_text()
    assert (root / "usr/share/doc/dicom-ingestd/examples/ingestd.toml").read_text() == \
        packaged_reference_text()
    # Shipped documents link only to documents that are shipped too.
    doc = root / "usr/share/doc/dicom-ingestd"
    for page in doc.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"
    units = sorted((root / "lib/systemd/system").iterdir())
    verified = verify_units(unit_root(tmp_path / "verify", units), [u.name.replace("@.", "@0.")
                                                                   for u in units])
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
