"""A reload never applies an empty, truncated or half-written configuration file (issue 16).

The issue's finding: with allowed_calling_aetitles = ["GOOD"], `: > ingestd.toml` made the
file watcher reload an empty (valid, all-defaults) configuration 0.3 s later: calling AE
"EVIL" could store, into the daemon's working directory.  Now the watcher announces only
finished writes (close after writing, rename into place), the loader refuses an empty file,
a file that is a proper prefix of what it held before, and a file that drops
storage.output_directory (config/load.py); the master keeps the running configuration and
logs why.  Every test checks the peer's view (A-ASSOCIATE-RJ/AC, the status), the log line
and where the objects are.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from support.daemon import REPO, Daemon
from support.data import testdata as bundled
from support.peers import storescu
from support.wait import wait_until

from dicom_ingestd.config.load import load_config
from dicom_ingestd.errors import ConfigError

CT = bundled("CT_small.dcm")


def guarded(daemon_factory: Any) -> Daemon:
    """A daemon whose file ends with the [association] table that keeps "EVIL" out."""
    daemon = daemon_factory({"storage": {"filenames": "unique", "fsync": False},
                             "logging": {"level": "info"},
                             "association": {"allowed_calling_aetitles": ["GOOD"]}})
    assert daemon.config_path.read_text().index("[association]") > 0
    time.sleep(0.3)  # the watcher is in place (test_process_model.py)
    return daemon


def store_as(daemon: Daemon, calling: str) -> int:
    return storescu(daemon.port, CT, extra=["-aet", calling], check=False).returncode


def assert_still_guarded(daemon: Daemon, stored_before: int) -> None:
    assert store_as(daemon, "EVIL") != 0  # A-ASSOCIATE-RJ: calling AE not recognized
    assert store_as(daemon, "GOOD") == 0
    assert len(daemon.files()) == stored_before + 1  # under the configured directory
    assert "calling AE title 'EVIL'" in daemon.log() or "EVIL" in daemon.log()


def no_objects_in_the_working_directory() -> None:
    """The daemon's working directory (the repository, see conftest) has no new object."""
    found = [p for p in REPO.iterdir() if p.name.startswith(("CT.", "UNKNOWN."))]
    assert found == [], found


def test_truncating_the_file_is_not_applied(daemon_factory: Any) -> None:
    daemon = guarded(daemon_factory)
    assert store_as(daemon, "GOOD") == 0
    mark = len(daemon.log())
    with open(daemon.config_path, "w"):  # `: > ingestd.toml`
        pass
    wait_until(lambda: "reload rejected" in daemon.log()[mark:], 5, "the reload rejected")
    log = daemon.log()[mark:]
    assert "the file is empty: refused" in log
    assert "reload: configuration applied" not in log
    assert_still_guarded(daemon, 1)
    no_objects_in_the_working_directory()


def test_a_file_cut_short_at_a_line_is_not_applied(daemon_factory: Any) -> None:
    """Cut before [association] it is still valid TOML, and would drop the AE title rule."""
    daemon = guarded(daemon_factory)
    text = daemon.config_path.read_text()
    cut = text.index("[association]")
    mark = len(daemon.log())
    daemon.config_path.write_text(text[:cut])
    wait_until(lambda: "reload rejected" in daemon.log()[mark:], 5, "the reload rejected")
    assert "looks cut short" in daemon.log()[mark:]
    assert_still_guarded(daemon, 0)


def test_a_half_written_file_is_not_reloaded_until_its_writer_is_done(
        daemon_factory: Any) -> None:
    """A writer truncates the file, writes part of it, pauses 1.5 s (five debounce
    intervals), then writes the rest: nothing is reloaded during the pause."""
    daemon = guarded(daemon_factory)
    document = {k: v for k, v in __import__("tomllib").loads(
        daemon.config_path.read_text()).items()}
    document["storage"]["filename_extension"] = ".new"
    text = tomli_w.dumps(document)
    cut = text.index("[association]")
    mark = len(daemon.log())
    with open(daemon.config_path, "w") as fh:
        fh.write(text[:cut])
        fh.flush()
        time.sleep(1.5)
        during = daemon.log()[mark:]
        assert store_as(daemon, "EVIL") != 0
        fh.write(text[cut:])
    assert "reload" not in during, during
    daemon.wait_log("reload: configuration applied")
    assert "storage.filename_extension" in daemon.log()[mark:]
    assert store_as(daemon, "EVIL") != 0
    assert store_as(daemon, "GOOD") == 0
    assert [p.suffix for p in daemon.files()] == [".new"]


def test_reload_storm_with_empty_variants_stores_nothing_elsewhere(
        daemon_factory: Any, tmp_path: Path) -> None:
    """The issue's storm: the file flips between a good and an empty variant while a
    sender stores continuously; every acknowledged object is in the output directory."""
    daemon = guarded(daemon_factory)
    good = daemon.config_path.read_text()
    stop = threading.Event()
    acknowledged = []

    def send() -> None:
        while not stop.is_set():
            if store_as(daemon, "GOOD") == 0:
                acknowledged.append(1)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for _ in range(40):
            daemon.config_path.write_text("")
            daemon.proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
            daemon.config_path.write_text(good)
            daemon.proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
    finally:
        stop.set()
        sender.join(60)
    assert acknowledged
    assert len(daemon.files()) == len(acknowledged)
    assert "reload rejected" in daemon.log()
    assert daemon.proc.poll() is None
    no_objects_in_the_working_directory()


# --- the loader's rules, on real files ------------------------------------------------------


def test_empty_and_blank_files_are_refused_comments_only_is_not(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    for text in ("", "\n\n  \t\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="the file is empty"):
            load_config(path)
    path.write_text("# every key at its default\n")
    load_config(path)  # as etc/ingestd.toml: an explicit, complete file


def test_dropping_the_output_directory_on_reload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[storage]\noutput_directory = "/srv/dicom"\n\n[network]\nport = 104\n')
    load_config(path)
    path.write_text("[network]\nport = 104\n")
    with pytest.raises(ConfigError, match="output_directory is no longer set"):
        load_config(path)
    path.write_text('[network]\nport = 105\n[storage]\noutput_directory = "/srv/dicom"\n')
    assert load_config(path).network.port == 105


def test_under_systemd_the_output_directory_must_be_set(tmp_path: Path) -> None:
    """Run by systemd (INVOCATION_ID set), a file without storage.output_directory is
    refused (exit 78) rather than storing into the service's working directory."""
    path = tmp_path / "c.toml"
    path.write_text("[network]\nport = 11112\n")
    env = dict(os.environ, INVOCATION_ID="0123456789abcdef0123456789abcdef")
    result = subprocess.run([sys.executable, "-m", "dicom_ingestd", "check-config", "-c",
                             str(path)], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=60)
    assert result.returncode == 78, result
    assert "under systemd the daemon does not fall back to its working directory" in \
        result.stdout + result.stderr
    env.pop("INVOCATION_ID")
    result = subprocess.run([sys.executable, "-m", "dicom_ingestd", "check-config", "-c",
                             str(path)], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=60)
    assert result.returncode == 0, result  # interactively, "." stays storescp's default
