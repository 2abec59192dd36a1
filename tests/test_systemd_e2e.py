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
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from conftest import testdata as data_file
from pydicom import dcmread
from pydicom.uid import generate_uid

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        journal = self.out("journalctl -b --no-pager -n 60", check=False)
        raise AssertionError(f"not within {timeout} s: {what}\nlast journal lines:\n{journal}")

    def show(self, unit: str, prop: str) -> str:
        return self.out(f"systemctl show -p {prop} --value {unit}")

    def journal(self, args: str) -> str:
        return self.out(f"journalctl --no-pager -o cat {args}", check=False)

    def files(self) -> list[str]:
        """Received files (the staging directory excluded)."""
        listing = self.out(f"find {OUTPUT} -path '*/.ingestd-tmp' -prune -o -type f -print")
        return sorted(listing.splitlines())

    def staging(self) -> list[str]:
        return self.out(f"find {OUTPUT}/.ingestd-tmp -type f 2>/dev/null; true").splitlines()

    def store(self, *files: str, aet: str = AET, check: bool = True) -> str:
        result = self.sh(f"TCP_NODELAY=1 storescu -aet {aet} -aec STORESCP 127.0.0.1 104 "
                         + " ".join(files), check=check, timeout=60)
        return result.stdout + result.stderr


@contextlib.contextmanager
def edited_config(box: Container, *sed: str) -> Iterator[None]:
    """/etc/ingestd.toml edited with sed expressions (each must change a line) for the body
    of the with statement; the original is put back afterwards, whatever happens."""
    box.sh("cp -p /etc/ingestd.toml /root/ingestd.toml.orig")
    try:
        for expression in sed:
            box.sh(f"cp /etc/ingestd.toml /root/before && sed -i -e '{expression}' "
                   "/etc/ingestd.toml && ! cmp -s /root/before /etc/ingestd.toml")
        yield
    finally:
        box.sh("cp -p /root/ingestd.toml.orig /etc/ingestd.toml")


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


@pytest.fixture(scope="module")
def host_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb and the DICOM objects to send, in a directory the container sees as DATA."""
    require_host()
    data = tmp_path_factory.mktemp("e2e-data")
    started = time.monotonic()
    build = subprocess.run([str(REPO / "packaging/build-deb"), "-o", str(data)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"packaging/build-deb failed:\n{build.stdout}\n{build.stderr}"
    print(f"built the .deb in {time.monotonic() - started:.0f} s")
    study = generate_uid()
    for group, count in (("study", STUDY_SIZE), ("later", 2), ("slow", 1), ("accept", 1)):
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
def test_install_enables_and_starts_only_the_socket(container: Container) -> None:
    out = container.out(f"dpkg -i {DATA}/dicom-ingestd_{__version__}_all.deb 2>&1")
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
    exposure = container.out("systemd-analyze security --no-pager dicom-ingestd.service "
                             "| tail -1", check=False)
    print(f"in the container: {exposure}")


def test_a_connection_starts_the_service_and_the_study_is_stored(container: Container) -> None:
    container.store(f"{DATA}/study/*.dcm")
    assert container.out("systemctl is-active dicom-ingestd.service") == "active"
    files = container.files()
    assert len(files) == STUDY_SIZE, files
    owners = container.out("stat -c '%U:%G %a' " + " ".join(files)).splitlines()
    assert owners == ["dicom-ingestd:dicom-ingestd 640"] * STUDY_SIZE
    assert container.staging() == []


def test_status_shows_the_daemons_status_line(container: Container) -> None:
    container.wait_for(lambda: f"{STUDY_SIZE} object(s)" in container.show(
        "dicom-ingestd", "StatusText"), "STATUS= counts the stored objects")
    status = container.out("systemctl status --no-pager dicom-ingestd", check=False)
    assert re.search(rf'Status: "0 active association\(s\); {STUDY_SIZE} object\(s\)', status), \
        status


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
    assert len({r["DICOM_STUDY_UID"] for r in stored}) == 1
    # Info lines are not warnings.
    assert "association accepted" not in container.journal("-u dicom-ingestd -p warning")


def test_reload_applies_an_edited_configuration_in_the_same_process(
        container: Container) -> None:
    pid = container.show("dicom-ingestd", "MainPID")
    # Kept for the rest of the run: later tests check that it survives an upgrade.
    container.sh("sed -i 's/^#filename_extension = \"\"$/filename_extension = \".dcm\"/' "
                 "/etc/ingestd.toml && grep -qx 'filename_extension = \".dcm\"' "
                 "/etc/ingestd.toml")
    # The watcher (inotify on /etc, inside the sandbox) notices the edit by itself ...
    container.wait_for(lambda: "changed on disk: reloading" in container.journal(
        "-u dicom-ingestd"), "the configuration watcher reloads")
    container.wait_for(lambda: "storage.filename_extension" in container.journal(
        "-u dicom-ingestd --grep 'reload: configuration applied'"), "the reload is logged")
    # ... and systemctl reload (SIGHUP; RELOADING=1, then READY=1) works as well.
    container.sh("systemctl reload dicom-ingestd")
    assert container.show("dicom-ingestd", "ActiveState") == "active"
    before = set(container.files())
    container.store(f"{DATA}/later/*.dcm")
    new = sorted(set(container.files()) - before)
    assert len(new) == 2 and all(name.endswith(".dcm") for name in new), new
    assert container.show("dicom-ingestd", "MainPID") == pid
    assert container.out("systemctl is-active dicom-ingestd") == "active"


def test_an_invalid_configuration_is_rejected_and_logged_as_an_error(
        container: Container) -> None:
    pid = container.show("dicom-ingestd", "MainPID")
    with edited_config(container, 's/^#sort = "none"$/sort = "sideways"/'):
        container.sh("systemctl reload dicom-ingestd")
        container.wait_for(lambda: "reload rejected" in container.journal(
            "-u dicom-ingestd -p err"), "the rejected reload is logged at priority err")
    assert "association accepted" not in container.journal("-u dicom-ingestd -p warning")
    assert container.show("dicom-ingestd", "MainPID") == pid
    assert container.out("systemctl is-active dicom-ingestd") == "active"
    container.sh("systemctl reload dicom-ingestd")


def test_an_end_of_study_job_runs_and_its_output_is_in_the_journal(
        container: Container) -> None:
    with edited_config(
            container,
            's|^#exec_on_eostudy = \\[\\]$|'
            'exec_on_eostudy = ["/bin/echo", "E2E-STUDY-DONE", "#p"]|',
            "s/^#eostudy_timeout = 60$/eostudy_timeout = 2/"):
        container.sh("dicom-ingestd check-config && systemctl reload dicom-ingestd")
        container.store(f"{DATA}/study/*.dcm")
        container.wait_for(lambda: "E2E-STUDY-DONE" in container.journal(
            "-u dicom-ingestd --grep E2E-STUDY-DONE"), "the end-of-study job's output")
        verbose = container.journal("-u dicom-ingestd -o verbose --grep E2E-STUDY-DONE")
        assert "JOB_ID=" in verbose and "DICOM_STUDY_UID=" in verbose, verbose
    container.sh("systemctl reload dicom-ingestd")


def test_stop_during_a_transfer_leaves_no_partial_file(container: Container) -> None:
    with edited_config(container, "s/^#sleep_during = 0$/sleep_during = 60/",
                       "s/^#stop_timeout = 30$/stop_timeout = 2/"):
        container.sh("dicom-ingestd check-config && systemctl reload dicom-ingestd")
        container.wait_for(lambda: "testing.sleep_during" in container.journal(
            "-u dicom-ingestd --grep 'reload: configuration applied'"), "the reload is logged")
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


def test_upgrade_restarts_the_running_service(container: Container) -> None:
    container.sh("echoscu -aet ECHO 127.0.0.1 104")
    old = container.show("dicom-ingestd", "MainPID")
    assert old != "0"
    container.sh(f"dpkg -i --force-confold {DATA}/dicom-ingestd_{__version__}_all.deb")
    # The restart of the service (propagated from the socket's) may still be under way.
    container.wait_for(lambda: container.out("systemctl is-active dicom-ingestd.socket "
                                             "dicom-ingestd", check=False) == "active\nactive",
                       "the socket and the service are active after the upgrade")
    new = container.show("dicom-ingestd", "MainPID")
    assert new not in ("0", old), "the service was not restarted with the new package"
    assert "filename_extension = \".dcm\"" in container.out("cat /etc/ingestd.toml")
    container.sh("echoscu -aet ECHO 127.0.0.1 104")
    assert container.out("systemctl list-units --failed --plain --no-legend") == ""


def test_per_connection_socket_serves_each_connection_in_its_own_process(
        container: Container) -> None:
    container.sh("systemctl disable --now dicom-ingestd.socket && "
                 "systemctl enable --now dicom-ingestd-accept.socket")
    assert container.out("systemctl is-active dicom-ingestd", check=False) == "inactive"
    before = set(container.files())
    container.store(f"{DATA}/accept/0.dcm", aet="ACCEPT")
    new = sorted(set(container.files()) - before)
    assert len(new) == 1 and new[0].endswith(".dcm"), new
    log = container.wait_for(lambda: container.journal(
        "DICOM_CALLING_AE=ACCEPT -o json --output-fields=_SYSTEMD_UNIT,MESSAGE"),
        "the per-connection instance logged the association")
    assert re.search(r'"_SYSTEMD_UNIT":"dicom-ingestd-accept@[^"]+\.service"', log), log
    assert container.out("systemctl list-units --failed --plain --no-legend") == ""
    container.sh("systemctl disable --now dicom-ingestd-accept.socket && "
                 "systemctl enable --now dicom-ingestd.socket")


def test_purge_removes_the_state_directory_and_the_units(container: Container) -> None:
    result = container.sh("apt-get purge -y dicom-ingestd 2>&1", timeout=120)
    assert "removing /var/lib/dicom-ingestd" in result.stdout, result.stdout
    leftovers = container.out(
        "ls -d /var/lib/dicom-ingestd /etc/ingestd.toml /usr/lib/dicom-ingestd "
        "/lib/systemd/system/dicom-ingestd* /etc/systemd/system/*/dicom-ingestd* "
        "/usr/lib/sysusers.d/dicom-ingestd.conf 2>/dev/null; true")
    assert leftovers == ""
    assert container.out("systemctl list-units --all --plain --no-legend 'dicom-ingestd*'") \
        == ""
    assert container.sh("echoscu 127.0.0.1 104", check=False).returncode != 0
    # Debian practice: the system user stays (files it owns may remain elsewhere).
    assert container.out("getent passwd dicom-ingestd").startswith("dicom-ingestd:")
