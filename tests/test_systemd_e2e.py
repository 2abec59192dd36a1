"""End to end under a real systemd: the Debian package installed in a booted container.

A Debian 12 root file system (debootstrap, with systemd, DCMTK and the package's
dependencies preinstalled) is built once and cached under CACHE, keyed by a hash of what it
contains.  Each run boots it with systemd-nspawn (--volatile=overlay: the cache is never
written; --private-network: port 104 stays inside), installs the .deb that
packaging/build-deb just built, and drives it as an administrator would: storescu to port
104 starts the service through its socket, then status, journal, reload, stop during a
transfer, upgrade, the per-connection socket, and purge.  The tests share one container and
run in file order; the container is always torn down.

Needs root, systemd-nspawn (systemd-container), debootstrap, nsenter and the package build
tools; the first run also needs a Debian mirror (about 2 minutes), later runs about a
minute.  Anything missing fails the run with the reason: nothing here is skipped.
Run alone:  scripts/test tests/test_systemd_e2e.py   (or .venv/bin/python -m pytest -v ...)

Three packages are built: the current one, one laid out as 0.1.x was (the whole generated
reference as the conffile) to upgrade from, and a later one whose reference file differs,
to upgrade to without a terminal.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import DebBuild
from pydicom import dcmread
from pydicom.uid import generate_uid
from support.daemon import REPO
from support.data import testdata as data_file
from support.wait import wait_until

from dicom_ingestd import __version__

CACHE = Path(os.environ.get("DICOM_INGESTD_TEST_CACHE", "/var/cache/dicom-ingestd-test"))
MIRROR = os.environ.get("DICOM_INGESTD_TEST_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# What the container needs besides the package's own dependencies (read from
# packaging/debian/control): a booting systemd, and DCMTK as the sending peer.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "dcmtk")
ROOTFS_RECIPE = 1  # bump when the way the root file system is made changes
SYSPATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DATA = "/srv/e2e"  # the host's data directory, bind-mounted read-only in the container
OUTPUT = "/var/lib/dicom-ingestd/incoming"
STATE = "/var/lib/dicom-ingestd/state"
AET = "E2ESCU"
STUDY_SIZE = 3
OLD_VERSION = "0.1.9"  # laid out as 0.1.x: the whole reference as /etc/ingestd.toml
NEXT_VERSION = f"{__version__}+e2e1"  # only the reference file differs
DEB = f"{DATA}/dicom-ingestd_{__version__}_all.deb"


# -- preconditions ---------------------------------------------------------------------------
def require_host() -> None:
    """Fail (never skip) with what is missing."""
    if os.geteuid() != 0:
        pytest.fail("the systemd end-to-end test boots a container with systemd-nspawn, "
                    "which needs root: run the test suite as root")
    missing = {tool: package for tool, package in (
        ("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"), ("dpkg-buildpackage", "dpkg-dev"))
        if shutil.which(tool, path=SYSPATH) is None}
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install "
                    f"{' '.join(sorted(set(missing.values())))}")


def package_dependencies() -> list[str]:
    """The Depends: of the binary package in packaging/debian/control, names only."""
    control = (REPO / "packaging/debian/control").read_text()
    paragraph = control.split("\nPackage: dicom-ingestd\n", 1)[1]
    match = re.search(r"^Depends:(.*(?:\n[ \t].*)*)", paragraph, re.M)
    assert match, "no Depends: in packaging/debian/control"
    names = []
    for item in match.group(1).split(","):
        name = re.sub(r"\(.*?\)", "", item).split("|")[0].strip()
        if name and not name.startswith("${"):
            names.append(name)
    return names


# -- the cached root file system -------------------------------------------------------------
def rootfs() -> Path:
    """The cached Debian root file system, made with debootstrap when absent."""
    packages = sorted({*BASE_PACKAGES, *package_dependencies()})
    key = hashlib.sha256(json.dumps([ROOTFS_RECIPE, SUITE, packages]).encode()).hexdigest()
    root = CACHE / f"rootfs-{key[:16]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be making the same one
        if (root / "usr/bin/systemctl").exists():
            return root
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        started = time.monotonic()
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE,
             str(partial), MIRROR],
            capture_output=True, text=True, timeout=1200, env={"PATH": SYSPATH})
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            pytest.fail(f"debootstrap of the test root file system failed (mirror {MIRROR}; "
                        f"set DICOM_INGESTD_TEST_MIRROR for another):\n"
                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        subprocess.run(["chroot", str(partial), "apt-get", "clean"], check=True,
                       env={"PATH": SYSPATH})
        partial.rename(root)
        print(f"made {root} ({', '.join(packages)}) in {time.monotonic() - started:.0f} s")
    return root


# -- the container ---------------------------------------------------------------------------
@dataclass
class Container:
    """A booted systemd-nspawn container; `sh` runs a shell command inside it."""

    process: subprocess.Popen[bytes]
    leader: int
    log: Path

    def command(self, script: str) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-a", "--", "/usr/bin/env", "-i",
                f"PATH={SYSPATH}", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive",
                "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "/bin/sh", "-c", script]

    def sh(self, script: str, *, check: bool = True,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(script), capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"in the container: {script}\nexit {result.returncode}\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def out(self, script: str, **kw: Any) -> str:
        return self.sh(script, **kw).stdout.strip()

    def spawn(self, script: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(script), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
        return wait_until(predicate, timeout, lambda: f"{what}\nlast journal lines:\n"
                          f"{self.out('journalctl -b --no-pager -n 60', check=False)}",
                          interval=0.2)

    def show(self, unit: str, prop: str) -> str:
        return self.out(f"systemctl show -p {prop} --value {unit}")

    def journal(self, args: str) -> str:
        return self.out(f"journalctl --no-pager -o cat {args}", check=False)

    def files(self) -> list[str]:
        """Received files (the staging directory excluded)."""
        listing = self.out(f"find {OUTPUT} -path '*/.ingestd-tmp' -prune -o -type f -print")
        return sorted(listing.splitlines())

    def staging(self) -> list[str]:
        """Partial objects (the staging directory also holds the counters and the control
        socket)."""
        return self.out(f"find {OUTPUT}/.ingestd-tmp -name '*.part' 2>/dev/null; true"
                        ).splitlines()

    def status(self) -> dict[str, Any]:
        return json.loads(self.out("dicom-ingestd status --json"))

    def status_text(self) -> str:
        return self.show("dicom-ingestd", "StatusText")

    def echo(self, timeout: int = 10) -> subprocess.CompletedProcess[str]:
        return self.sh(f"echoscu -to {timeout} -ta {timeout} -aet ECHO 127.0.0.1 104",
                       check=False, timeout=timeout + 20)

    def store(self, *files: str, aet: str = AET, check: bool = True) -> str:
        result = self.sh(f"TCP_NODELAY=1 storescu -aet {aet} -aec STORESCP 127.0.0.1 104 "
                         + " ".join(files), check=check, timeout=60)
        return result.stdout + result.stderr


# The configuration is edited as TOML (python3-tomli-w is a dependency of the package):
# keys set or, with None, removed.
_SET_KEYS = """
import json, os, tomllib, tomli_w
path = "/etc/ingestd.toml"
with open(path, "rb") as fh:
    data = tomllib.load(fh)
for table, keys in json.loads(os.environ["CHANGES"]).items():
    for key, value in keys.items():
        if value is None:
            data.get(table, {}).pop(key, None)
        else:
            data.setdefault(table, {})[key] = value
with open(path + ".new", "w") as fh:
    fh.write(tomli_w.dumps(data))
os.replace(path + ".new", path)
"""


def set_keys(box: "Container", changes: dict[str, dict[str, Any]]) -> None:
    box.sh(f"CHANGES={shlex.quote(json.dumps(changes))} python3 -c {shlex.quote(_SET_KEYS)}")


@contextlib.contextmanager
def edited_config(box: "Container", changes: dict[str, dict[str, Any]]) -> Iterator[None]:
    """/etc/ingestd.toml with `changes` for the body of the with statement; the original is
    put back afterwards, whatever happens."""
    box.sh("cp -p /etc/ingestd.toml /root/ingestd.toml.orig")
    try:
        set_keys(box, changes)
        yield
    finally:
        box.sh("cp -p /root/ingestd.toml.orig /etc/ingestd.toml")


def reload_ok(box: "Container") -> None:
    """systemctl reload, which now fails when the daemon rejects the file."""
    box.sh("systemctl reload dicom-ingestd")


def find_leader(process: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """nspawn's child running systemd, i.e. the container's PID 1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
            for child in children.split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        time.sleep(0.05)
    raise AssertionError("systemd-nspawn did not start systemd")


def terminate(process: subprocess.Popen[bytes]) -> None:
    """Halt the container (SIGTERM asks nspawn for an orderly shutdown), then kill it."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def build_variant(data: Path, version: str, edit: Callable[[Path], None]) -> Path:
    """The package built from a copy of the sources with another version and `edit`."""
    tree = data / f"src-{version}"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    init = tree / "dicom_ingestd/__init__.py"
    init.write_text(re.sub(r'__version__ = ".*"', f'__version__ = "{version}"',
                           init.read_text()))
    changelog = tree / "packaging/debian/changelog"
    changelog.write_text(
        f"dicom-ingestd ({version}) bookworm; urgency=medium\n\n  * End-to-end test "
        f"build.\n\n -- e2e <e2e@example.org>  Sun, 06 Dec 2026 12:00:00 +0000\n\n"
        + changelog.read_text())
    edit(tree)
    out = data / f"deb-{version}"
    build = subprocess.run([str(tree / "packaging/build-deb"), "-o", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"build of {version} failed:\n{build.stdout}\n{build.stderr}"
    shutil.rmtree(tree)
    return Path(build.stdout.strip().splitlines()[-1])


def _as_0_1(tree: Path) -> None:
    """Before 0.2.0 the conffile was the whole generated reference."""
    reference = subprocess.run(["sed", "-f", "packaging/debian/ingestd.toml.sed",
                                "etc/ingestd.toml"], cwd=tree, capture_output=True,
                               text=True, check=True).stdout
    (tree / "packaging/debian/ingestd.toml").write_text(reference)


def _changed_reference(tree: Path) -> None:
    reference = tree / "etc/ingestd.toml"
    reference.write_text(reference.read_text() + "# A documentation change.\n")


@pytest.fixture(scope="module")
def host_data(tmp_path_factory: pytest.TempPathFactory, deb_build: DebBuild) -> Path:
    """The .debs and the DICOM objects to send, in a directory the container sees as DATA."""
    require_host()
    data = tmp_path_factory.mktemp("e2e-data")
    started = time.monotonic()
    shutil.copy(deb_build.directory / Path(DEB).name, data)
    shutil.copy(build_variant(data, OLD_VERSION, _as_0_1), data / "old.deb")
    shutil.copy(build_variant(data, NEXT_VERSION, _changed_reference), data / "next.deb")
    print(f"built three .debs in {time.monotonic() - started:.0f} s")
    study = generate_uid()
    for group, count in (("study", STUDY_SIZE), ("later", 2), ("slow", 1), ("accept", 1),
                         ("more", 3), ("drain", 4)):
        (data / group).mkdir()
        for index in range(count):
            ds = dcmread(data_file("CT_small.dcm"))
            ds.StudyInstanceUID = study if group == "study" else generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(data / group / f"{index}.dcm")
    data.chmod(0o755)
    return data


@pytest.fixture(scope="module")
def container(host_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    root = rootfs()
    log = tmp_path_factory.mktemp("nspawn") / "console.log"
    with open(log, "wb") as console:
        process = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root), "--boot", "--register=no", "--keep-unit",
             "--volatile=overlay", "--console=pipe", "--private-network",
             f"--machine=ingestd-e2e-{os.getpid()}", f"--bind-ro={host_data}:{DATA}"],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            env={"PATH": SYSPATH, "LANG": "C.UTF-8"})
    try:
        try:
            box = Container(process, find_leader(process), log)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; nspawn output:\n{log.read_text(errors='replace')}") \
                from None
        # systemctl fails ("Failed to connect to bus") until PID 1 has set up its socket,
        # and says "offline" until PID 1 has created /run/systemd/system.
        deadline = time.monotonic() + 90
        while True:
            boot = box.sh("systemctl is-system-running --wait", check=False, timeout=90)
            state = boot.stdout.strip()
            if state not in ("", "offline") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert state in ("running", "degraded"), (
            f"container boot: {state} {boot.stderr}\n"
            f"{log.read_text(errors='replace')[-3000:]}")
        if state == "degraded":
            print(box.out("systemctl --failed --no-pager", check=False))
        yield box
    finally:
        terminate(process)


# -- the tests, in order ---------------------------------------------------------------------
def test_install_of_a_0_1_package_enables_and_starts_only_the_socket(
        container: Container) -> None:
    out = container.out(f"dpkg -i {DATA}/old.deb 2>&1")
    assert "dicom-ingestd" in out
    assert container.out("systemctl is-enabled dicom-ingestd.socket") == "enabled"
    assert container.out("systemctl is-active dicom-ingestd.socket") == "active"
    assert container.out("systemctl is-active dicom-ingestd.service", check=False) == "inactive"
    assert container.out("systemctl is-enabled dicom-ingestd-accept.socket",
                         check=False) == "disabled"
    assert container.out("getent passwd dicom-ingestd").endswith(":/usr/sbin/nologin")
    assert container.out(f"stat -c '%U:%G %a' /var/lib/dicom-ingestd {OUTPUT} {STATE}") == \
        "\n".join(["dicom-ingestd:dicom-ingestd 750"] * 3)
    assert container.out("dicom-ingestd check-config") == "/etc/ingestd.toml: OK"
    assert len(container.out("cat /etc/ingestd.toml").splitlines()) > 300
    # The administrator edits the long file, as one did with 0.1.0.
    container.sh("sed -i 's/^#filename_extension = \"\"$/filename_extension = \".dcm\"/' "
                 "/etc/ingestd.toml && grep -qx 'filename_extension = \".dcm\"' "
                 "/etc/ingestd.toml")


def test_upgrade_from_0_1_without_a_terminal_keeps_the_edited_conffile(
        container: Container) -> None:
    """0.1.x's conffile was the whole reference: an edited one would make dpkg ask, and an
    upgrade without a terminal failed ("end of file on stdin at conffile prompt")."""
    before = container.out("cat /etc/ingestd.toml")
    result = container.sh(f"dpkg -i {DEB} < /dev/null 2>&1", check=False)
    assert result.returncode == 0, result.stdout
    assert "kept your edited /etc/ingestd.toml" in result.stdout
    assert container.out("dpkg-query -W -f '${Version} ${Status}' dicom-ingestd") == \
        f"{__version__} install ok installed"
    assert container.out("cat /etc/ingestd.toml") == before
    short = container.out("cat /etc/ingestd.toml.dpkg-dist")
    assert "man 5 ingestd.toml" in short and len(short.splitlines()) < 40
    container.sh("rm /etc/ingestd.toml.dpkg-dist")
    assert container.out("dicom-ingestd check-config") == "/etc/ingestd.toml: OK"
    exposure = container.out("systemd-analyze security --no-pager dicom-ingestd.service "
                             "| tail -1", check=False)
    print(f"in the container: {exposure}")


def test_a_connection_starts_the_service_and_the_study_is_stored(container: Container) -> None:
    container.store(f"{DATA}/study/*.dcm")
    assert container.out("systemctl is-active dicom-ingestd.service") == "active"
    files = container.files()
    assert len(files) == STUDY_SIZE, files
    assert all(name.endswith(".dcm") for name in files), files
    owners = container.out("stat -c '%U:%G %a' " + " ".join(files)).splitlines()
    assert owners == ["dicom-ingestd:dicom-ingestd 640"] * STUDY_SIZE
    assert container.staging() == []
    # The group may list the staging directory: a consumer's find does not stop there.
    assert container.out(f"stat -c '%a' {OUTPUT}/.ingestd-tmp") == "750"


def test_status_shows_the_daemons_status_line(container: Container) -> None:
    container.wait_for(lambda: f"{STUDY_SIZE} object(s) stored" in container.status_text(),
                       "STATUS= counts the stored objects")
    status = container.out("systemctl status --no-pager dicom-ingestd", check=False)
    assert re.search(rf'Status: "0 active association\(s\); {STUDY_SIZE} object\(s\) stored '
                     r'since ', status), status
    assert "ready: pid" in container.journal("-u dicom-ingestd") and \
        f"dicom-ingestd {__version__} ready" in container.journal("-u dicom-ingestd")


def test_journal_has_the_association_with_priorities_and_fields(container: Container) -> None:
    container.wait_for(lambda: "association released" in container.journal(
        "-u dicom-ingestd"), "the association's end is in the journal")
    log = container.journal("-u dicom-ingestd")
    assert "association accepted" in log and log.count(": stored ") == STUDY_SIZE
    by_aet = container.journal(f"DICOM_CALLING_AE={AET}")
    assert "association accepted" in by_aet and by_aet.count(": stored ") == STUDY_SIZE
    records = [json.loads(line) for line in container.out(
        f"journalctl --no-pager -o json DICOM_CALLING_AE={AET}").splitlines()]
    stored = [r for r in records if r.get("DICOM_SOP_INSTANCE_UID")]
    assert len(stored) == STUDY_SIZE
    for record in stored:
        assert record["PRIORITY"] == "6"
        assert record["DICOM_STATUS"] == "0x0000"
        assert record["DICOM_CALLED_AE"] == "STORESCP"
        assert record["DICOM_FILE"].startswith(OUTPUT)
        assert record["_SYSTEMD_UNIT"] == "dicom-ingestd.service"
        # The socket is dual-stack ([::]:104): the IPv4 peer is written as IPv4, the
        # address alone, the port apart.
        assert record["DICOM_PEER"] == "127.0.0.1"
        assert record["DICOM_PEER_PORT"].isdigit()
        assert record["MESSAGE"].startswith(f"127.0.0.1:{record['DICOM_PEER_PORT']} ")
    assert len({r["DICOM_STUDY_UID"] for r in stored}) == 1
    # What the README and the manual advertise: filtering on the address.
    by_peer = container.journal("DICOM_PEER=127.0.0.1")
    assert by_peer.count(": stored ") == STUDY_SIZE, by_peer
    assert "::ffff:" not in container.journal("-u dicom-ingestd")
    # Info lines are not warnings.
    assert "association accepted" not in container.journal("-u dicom-ingestd -p warning")


def test_reload_applies_an_edited_configuration_in_the_same_process(
        container: Container) -> None:
    pid = container.show("dicom-ingestd", "MainPID")
    # Kept for the rest of the run: later tests check that it survives an upgrade.
    set_keys(container, {"storage": {"filename_extension": ".dicom"}})
    # The watcher (inotify on /etc, inside the sandbox) notices the edit by itself ...
    container.wait_for(lambda: "changed on disk: reloading" in container.journal(
        "-u dicom-ingestd"), "the configuration watcher reloads")
    container.wait_for(lambda: "storage.filename_extension" in container.journal(
        "-u dicom-ingestd --grep 'reload: configuration applied'"), "the reload is logged")
    # ... and systemctl reload (dicom-ingestd reload, in the sandbox) works as well.
    result = container.sh("systemctl reload dicom-ingestd")
    assert result.returncode == 0
    assert container.show("dicom-ingestd", "ActiveState") == "active"
    before = set(container.files())
    container.store(f"{DATA}/later/*.dcm")
    new = sorted(set(container.files()) - before)
    assert len(new) == 2 and all(name.endswith(".dicom") for name in new), new
    assert container.show("dicom-ingestd", "MainPID") == pid
    reload = container.status()["daemon"]["last_reload"]
    assert (reload["outcome"], reload["source"]) == ("applied", "dicom-ingestd reload")


def test_reload_of_an_invalid_file_fails_and_says_why(container: Container) -> None:
    pid = container.show("dicom-ingestd", "MainPID")
    with edited_config(container, {"storage": {"sort": "sideways"}}):
        result = container.sh("systemctl reload dicom-ingestd", check=False)
        assert result.returncode != 0, "systemctl reload succeeded for a rejected file"
        container.wait_for(lambda: "reload rejected" in container.journal(
            "-u dicom-ingestd -p err"), "the rejected reload is logged at priority err")
        assert "storage.sort = 'sideways'" in container.journal("-u dicom-ingestd -p err")
        status = container.status_text()
        assert status.startswith("RELOAD REJECTED") and "storage.sort" in status, status
        assert "RELOAD REJECTED" in container.out("systemctl status --no-pager dicom-ingestd",
                                                  check=False)
        reload = container.status()["daemon"]["last_reload"]
        assert reload["outcome"] == "rejected" and "storage.sort" in reload["problems"][0]
    assert container.show("dicom-ingestd", "MainPID") == pid
    assert container.out("systemctl is-active dicom-ingestd") == "active"
    assert "association accepted" not in container.journal("-u dicom-ingestd -p warning")
    reload_ok(container)
    assert "RELOAD REJECTED" not in container.status_text()


def test_reload_to_a_directory_the_sandbox_cannot_write_fails(container: Container) -> None:
    """The man page's storescp recipe without its ReadWritePaths= step: check-config (as
    root, outside the sandbox) cannot know; the reload (as the service) fails."""
    container.sh("mkdir -p /srv/dicom && chown dicom-ingestd: /srv/dicom")
    with edited_config(container, {"storage": {"output_directory": "/srv/dicom"}}):
        assert container.out("dicom-ingestd check-config") == "/etc/ingestd.toml: OK"
        result = container.sh("systemctl reload dicom-ingestd", check=False)
        assert result.returncode != 0
        errors = container.journal("-u dicom-ingestd -p err --since=-1min")
        assert "/srv/dicom" in errors and ("not writable" in errors or
                                           "Read-only file system" in errors), errors
        assert "RELOAD REJECTED" in container.status_text()
    reload_ok(container)


def test_restart_with_an_invalid_file_fails_and_recovers_once_fixed(
        container: Container) -> None:
    with edited_config(container, {"storage": {"sort": "sideways"}}):
        result = container.sh("systemctl restart dicom-ingestd", check=False)
        assert result.returncode != 0
        assert container.show("dicom-ingestd", "ExecMainStatus") == "78"
        assert "storage.sort = 'sideways'" in container.journal("-u dicom-ingestd -p err")
        # Senders keep trying: each connection starts the service, which fails and closes
        # it.  More than the default start limit (5 in 10 s) must not stop the socket.
        for _ in range(8):
            assert container.echo(timeout=5).returncode != 0
        assert container.out("systemctl is-active dicom-ingestd.socket") == "active"
        assert container.show("dicom-ingestd.socket", "Result") == "success"
        assert container.show("dicom-ingestd", "NRestarts") == "0"
        assert "closed 1 waiting connection(s) unanswered" in container.journal(
            "-u dicom-ingestd")
    # Fixed: the next connection starts the service, no reset-failed needed.
    assert container.echo().returncode == 0
    assert container.out("systemctl is-active dicom-ingestd") == "active"


def test_restart_with_an_unusable_output_directory_does_not_loop(container: Container) -> None:
    with edited_config(container, {"storage": {"output_directory": "/srv/missing"}}):
        result = container.sh("systemctl restart dicom-ingestd", check=False)
        assert result.returncode != 0
        assert container.show("dicom-ingestd", "ExecMainStatus") == "73"
        time.sleep(3)  # RestartSec=2: a restart loop would have begun
        assert container.show("dicom-ingestd", "NRestarts") == "0"
        assert container.echo(timeout=5).returncode != 0
        assert container.out("systemctl is-active dicom-ingestd.socket") == "active"
    assert container.echo().returncode == 0


def test_an_end_of_study_job_runs_and_its_output_is_in_the_journal(
        container: Container) -> None:
    with edited_config(container, {"events": {
            "exec_on_eostudy": ["/bin/echo", "E2E-STUDY-DONE", "#p", "#r"],
            "eostudy_timeout": 2}}):
        container.sh("dicom-ingestd check-config")
        reload_ok(container)
        container.store(f"{DATA}/study/*.dcm")
        container.wait_for(lambda: "E2E-STUDY-DONE" in container.journal(
            "-u dicom-ingestd --grep E2E-STUDY-DONE"), "the end-of-study job's output")
        verbose = container.journal("-u dicom-ingestd -o verbose --grep E2E-STUDY-DONE")
        assert "JOB_ID=" in verbose and "DICOM_STUDY_UID=" in verbose, verbose
        # #r is the plain IPv4 address, as storescp's scripts expect.
        assert re.search(r"E2E-STUDY-DONE \S+ 127\.0\.0\.1$", container.journal(
            "-u dicom-ingestd --grep E2E-STUDY-DONE"), re.M)
    reload_ok(container)


def test_status_and_metrics_after_a_refused_store_and_a_dead_job(container: Container) -> None:
    metrics_file = "/var/lib/dicom-ingestd/dicom-ingestd.prom"
    settings: dict[str, dict[str, Any]] = {
        "monitoring": {"metrics_file": metrics_file, "metrics_interval": 1}}
    # Refused: the output file system has less than storage.min_free_space.
    with edited_config(container, {**settings, "storage": {"min_free_space": 10**17}}):
        reload_ok(container)
        container.store(f"{DATA}/more/0.dcm", check=False)
        refused = container.wait_for(lambda: container.journal(
            "-u dicom-ingestd -p err --grep 'failed with'"), "the refused store is logged")
        assert "min_free_space" in refused, refused
    # A dead job: a reception command that fails, without retries.
    with edited_config(container, {**settings, "events": {"exec_on_reception": ["/bin/false"]},
                                   "jobs": {"retries": 0}}):
        reload_ok(container)
        container.store(f"{DATA}/more/1.dcm")
        container.wait_for(lambda: (container.status()["jobs"] or {}).get("dead"),
                           "the job is dead")
        # Low disk space: a margin above min_free_space larger than the disk.
        set_keys(container, {"monitoring": {"low_space_margin": 10**17}})
        reload_ok(container)
        status = container.status()
        line = container.wait_for(lambda: "DEAD JOB" in container.status_text()
                                  and container.status_text(), "STATUS= names the dead job")
        assert "LOW DISK SPACE on output" in line, line
        assert "free space low on the output file system" in container.journal(
            "-u dicom-ingestd -p warning")
        counters = status["counters"]
        assert counters["objects"]["0xA700"] >= 1 and counters["stored"] >= 8, counters
        assert "0xA700" in counters["last_error"]["text"] or \
            "min_free_space" in counters["last_error"]["text"], counters["last_error"]
        assert status["jobs"]["dead"] >= 1
        assert status["disk"]["low"] == ["output"] or "output" in status["disk"]["low"]
        assert status["daemon"]["running"] and status["version"] == __version__
        outcomes = {(r["outcome"], r["calling_ae"]) for r in status["counters"]["associations"]}
        assert ("released", AET) in outcomes
        assert sum(status["counters"]["commit_seconds"]["counts"]) >= counters["stored"] - 1
        text = container.out("dicom-ingestd status")
        assert "0xA700" in text and "dead" in text and "LOW" in text, text
        metrics = container.out("dicom-ingestd metrics")
        assert re.search(r'^dicom_ingestd_objects_total\{result="failure",status="0xA700"\} '
                         r"[1-9]", metrics, re.M), metrics
        assert re.search(r'^dicom_ingestd_jobs\{state="dead"\} [1-9]', metrics, re.M)
        assert re.search(rf'^dicom_ingestd_associations_total\{{calling_ae="{AET}",'
                         r'outcome="released"\} [1-9]', metrics, re.M)
        assert re.search(r'^dicom_ingestd_store_commit_seconds_bucket\{le="\+Inf"\} [1-9]',
                         metrics, re.M)
        assert "dicom_ingestd_free_space_low 1.0" in metrics
        textfile = container.wait_for(lambda: container.out(
            f"cat {metrics_file} 2>/dev/null; true"), "the metrics file is written")
        assert "dicom_ingestd_jobs{state=\"dead\"}" in textfile
        assert container.out(f"stat -c %a {metrics_file}") == "644"
    reload_ok(container)
    # Counters survive a restart.
    container.sh("systemctl restart dicom-ingestd")
    after = container.status()["counters"]
    assert after["objects"]["0xA700"] == counters["objects"]["0xA700"]
    assert after["stored"] >= counters["stored"] and after["since"] == counters["since"]
    container.sh(f"rm -f {metrics_file}")


def test_stop_during_a_transfer_leaves_no_partial_file(container: Container) -> None:
    with edited_config(container, {"testing": {"sleep_during": 60},
                                   "workers": {"stop_timeout": 2}}):
        container.sh("dicom-ingestd check-config")
        reload_ok(container)
        before = container.files()
        sender = container.spawn(
            f"storescu -aet SLOW -aec STORESCP 127.0.0.1 104 {DATA}/slow/0.dcm")
        try:
            partial = container.wait_for(container.staging, "the object is being received")
            assert partial[0].endswith(".part")
            started = time.monotonic()
            container.sh("systemctl stop dicom-ingestd", timeout=60)
            took = time.monotonic() - started
        finally:
            sender.kill()
            sender.wait(10)
    assert took < 15, f"stop took {took:.1f} s"
    assert container.out("systemctl is-active dicom-ingestd", check=False) == "inactive"
    assert container.show("dicom-ingestd", "Result") == "success"
    assert container.files() == before
    assert container.staging() == []
    assert container.out(f"find {OUTPUT} -name '*.part'") == ""
    log = container.journal("-u dicom-ingestd --since=-2min")
    assert "stop timeout reached" in log and "partial object(s) removed" in log, log


def test_restart_gap_while_an_association_drains(container: Container) -> None:
    """What a sender sees while the service restarts under a running association: the socket
    stays open, so a new connection waits in its queue (never refused) until the new master
    accepts it; the wait is the old association's drain plus the start-up."""
    with edited_config(container, {"testing": {"sleep_after": 1}}):
        container.sh("systemctl start dicom-ingestd")
        reload_ok(container)
        sender = container.spawn(
            f"storescu -aet DRAIN -aec STORESCP 127.0.0.1 104 {DATA}/drain/*.dcm")
        try:
            container.wait_for(lambda: "DRAIN->STORESCP: stored" in container.journal(
                "-u dicom-ingestd --since=-1min"), "the draining association stores")
            restart = container.spawn("systemctl restart dicom-ingestd")
            time.sleep(0.3)
            started = time.monotonic()
            echo = container.echo(timeout=60)
            waited = time.monotonic() - started
            restart.wait(60)
            sent = sender.wait(60)
        finally:
            sender.kill()
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert sent == 0, "the draining association was cut short"
    print(f"restart gap: a new association waited {waited:.2f} s while an association of "
          f"4 objects x 1 s drained (the socket kept it queued)")
    assert waited < 4 + 5


def test_upgrade_with_a_changed_reference_and_no_terminal(container: Container) -> None:
    container.sh("echoscu -aet ECHO 127.0.0.1 104")
    old = container.show("dicom-ingestd", "MainPID")
    socket_since = container.show("dicom-ingestd.socket", "ActiveEnterTimestampMonotonic")
    config = container.out("cat /etc/ingestd.toml")
    result = container.sh(f"dpkg -i {DATA}/next.deb < /dev/null 2>&1", check=False)
    assert result.returncode == 0, result.stdout
    assert "conffile" not in result.stdout.lower(), result.stdout
    assert "A documentation change." in container.out(
        "cat /usr/share/doc/dicom-ingestd/examples/ingestd.toml")
    # The restart of the service may still be under way.
    container.wait_for(lambda: container.out("systemctl is-active dicom-ingestd.socket "
                                             "dicom-ingestd", check=False) == "active\nactive",
                       "the socket and the service are active after the upgrade")
    new = container.show("dicom-ingestd", "MainPID")
    assert new not in ("0", old), "the service was not restarted with the new package"
    # The socket kept listening through the upgrade.
    assert container.show("dicom-ingestd.socket", "ActiveEnterTimestampMonotonic") == \
        socket_since
    assert container.out("cat /etc/ingestd.toml") == config
    assert container.status()["version"] == NEXT_VERSION
    container.sh("echoscu -aet ECHO 127.0.0.1 104")
    assert container.out("systemctl list-units --failed --plain --no-legend") == ""


def test_per_connection_socket_serves_each_connection_in_its_own_process(
        container: Container) -> None:
    container.sh("systemctl disable --now dicom-ingestd.socket && "
                 "systemctl enable --now dicom-ingestd-accept.socket")
    assert container.out("systemctl is-active dicom-ingestd", check=False) == "inactive"
    stored = container.status()["counters"]["stored"]
    before = set(container.files())
    container.store(f"{DATA}/accept/0.dcm", aet="ACCEPT")
    new = sorted(set(container.files()) - before)
    assert len(new) == 1 and new[0].endswith(".dicom"), new
    log = container.wait_for(lambda: container.journal(
        "DICOM_CALLING_AE=ACCEPT -o json --output-fields=_SYSTEMD_UNIT,MESSAGE"),
        "the per-connection instance logged the association")
    assert re.search(r'"_SYSTEMD_UNIT":"dicom-ingestd-accept@[^"]+\.service"', log), log
    # Where the manual sends an administrator for both modes' lines.
    assert "ACCEPT->STORESCP: stored" in container.journal("-t dicom-ingestd")
    # Counted without a master.
    assert container.status()["counters"]["stored"] == stored + 1
    assert container.out("systemctl list-units --failed --plain --no-legend") == ""
    container.sh("systemctl disable --now dicom-ingestd-accept.socket && "
                 "systemctl enable --now dicom-ingestd.socket")


def test_purge_keeps_received_objects_without_a_yes(container: Container) -> None:
    files = container.files()
    assert len(files) >= 10
    sums = container.out(f"find {OUTPUT} -path '*/.ingestd-tmp' -prune -o -type f "
                         "-exec sha256sum {} + | sort")
    result = container.sh("apt-get purge -y dicom-ingestd 2>&1", timeout=120)
    assert f"KEEPING the {len(files)} received object(s) in {OUTPUT}" in result.stdout, \
        result.stdout
    assert container.out(f"find {OUTPUT} -path '*/.ingestd-tmp' -prune -o -type f "
                         "-exec sha256sum {} + | sort") == sums
    leftovers = container.out(
        f"ls -d {STATE} {OUTPUT}/.ingestd-tmp /etc/ingestd.toml /usr/lib/dicom-ingestd "
        "/lib/systemd/system/dicom-ingestd* /etc/systemd/system/*/dicom-ingestd* "
        "/usr/lib/sysusers.d/dicom-ingestd.conf 2>/dev/null; true")
    assert leftovers == ""
    assert container.out("systemctl list-units --all --plain --no-legend 'dicom-ingestd*'") \
        == ""
    assert container.sh("echoscu 127.0.0.1 104", check=False).returncode != 0
    # Debian practice: the system user stays (files it owns may remain elsewhere).
    assert container.out("getent passwd dicom-ingestd").startswith("dicom-ingestd:")


def test_purge_deletes_received_objects_when_confirmed(container: Container) -> None:
    container.sh(f"dpkg -i {DEB} < /dev/null")
    assert container.files()  # the kept objects are still there
    container.sh("echo 'dicom-ingestd dicom-ingestd/purge-received-objects boolean true' "
                 "| debconf-set-selections")
    result = container.sh("apt-get purge -y dicom-ingestd 2>&1", timeout=120)
    assert "as confirmed" in result.stdout, result.stdout
    assert container.out("ls -d /var/lib/dicom-ingestd 2>/dev/null; true") == ""
