"""DICOM over TLS against DCMTK's TLS clients (storescu/echoscu +tls), with certificates made
here by the openssl command line (tests/tls_certs.py).

Covers: the three peer certificate modes (storescp -rc/-vc/-ic), a plain TCP client, clients
without a certificate or signed by another CA, TLS 1.2 and 1.3, the subject allow list and the
subject -> calling AE map, an idle TCP connection that must not hold up anyone (fork and
thread workers), start-up errors naming the file, DER files with an encrypted key, and
per-connection socket activation with the key passed as a systemd credential.
"""

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tls_certs
from support.daemon import REPO, Daemon, free_port, start_daemon
from support.data import testdata as bundled
from support.peers import echoscu, require_tool, storescu
from tls_certs import Certificates, Pair

from dicom_ingestd.config.schema import TLSConfig
from dicom_ingestd.config.subjects import parse_subject, subject_text
from dicom_ingestd.tls_context import TLS_TO_OPENSSL, build_context

CT1 = "CN=modality-ct1,O=Test Hospital"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    require_tool("openssl")
    return tls_certs.make(tmp_path_factory.mktemp("certs"))


def tls_table(certs: Certificates, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "enabled": True, "private_key": str(certs.server.key),
        "certificate": str(certs.server.cert), "ca_files": [str(certs.ca.cert)],
    }
    table.update(overrides)
    return table


def client(certs: Certificates, pair: Pair | None = None, *extra: str) -> list[str]:
    """DCMTK client options: our certificate (or none: +tla), the server verified by our CA."""
    mine = ["+tls", str(pair.key), str(pair.cert)] if pair is not None else ["+tla"]
    return [*mine, "+cf", str(certs.ca.cert), *extra]


def line_with(log: str, text: str) -> str:
    return next(line for line in log.splitlines() if text in line)


@pytest.fixture(scope="module")
def required(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) \
        -> Iterator[Daemon]:
    """One daemon in storescp's default mode (-rc: a CA-signed client certificate required)."""
    daemon = start_daemon(tmp_path_factory.mktemp("required"), {"tls": tls_table(certs)})
    yield daemon
    daemon.stop()


# -- storescp -rc (the default) ---------------------------------------------------------------
def test_storescu_and_echoscu_over_tls(required: Daemon, certs: Certificates) -> None:
    echoscu(required.port, client(certs, certs.client))
    storescu(required.port, bundled("CT_small.dcm"), extra=client(certs, certs.client))
    assert [p.name for p in required.files()][-1].startswith("CT.")
    log = required.log()
    accepted = line_with(log, "STORESCU->ANY-SCP: association accepted")
    assert f"over TLSv1.3 TLS_AES_256_GCM_SHA384, peer certificate '{CT1}'" in accepted
    assert "ECHOSCU->ANY-SCP: C-ECHO" in log
    assert "(TLS, profile bcp195-nd, peer certificates: require)" in log


def test_tls12_with_dcmtk_extended_profile(required: Daemon, certs: Certificates) -> None:
    # storescu's BCP 195 extended profile allows TLS 1.2 only: an RSA AES-GCM suite of ours.
    result = storescu(required.port, bundled("MR_small.dcm"),
                      extra=client(certs, certs.client2, "+pz"))
    assert result.returncode == 0
    accepted = next(line for line in required.log().splitlines()
                    if "association accepted" in line and "modality-mr1" in line)
    assert "over TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384" in accepted


def test_plain_tcp_client_fails_cleanly(required: Daemon, certs: Certificates) -> None:
    result = echoscu(required.port, check=False)
    assert result.returncode != 0
    line = required.wait_log("not a TLS client")
    assert "Traceback" not in line
    refused = line_with(required.log(), "not a TLS client")
    assert "TLS handshake failed: not a TLS client (plain DICOM or another protocol?)" in refused
    assert refused.endswith("; connection closed")
    echoscu(required.port, client(certs, certs.client))  # still serving


@pytest.mark.parametrize(("who", "reason"), [
    ("no certificate", "the peer sent no certificate (tls.peer_certificate = require)"),
    ("another CA", "peer certificate not accepted: unable to get local issuer certificate"),
])
def test_require_mode_refuses(required: Daemon, certs: Certificates, who: str,
                              reason: str) -> None:
    options = client(certs, None, "-ic") if who == "no certificate" \
        else client(certs, certs.stranger)
    before = required.log().count("TLS handshake failed")
    result = echoscu(required.port, options, check=False)
    assert result.returncode != 0
    required.wait_log(reason)
    assert required.log().count("TLS handshake failed") == before + 1
    assert "Traceback" not in required.log()


# -- storescp -vc and -ic ---------------------------------------------------------------------
def test_verify_mode_accepts_a_client_without_certificate(daemon_factory: Any,
                                                          certs: Certificates) -> None:
    daemon = daemon_factory({"tls": tls_table(certs, peer_certificate="verify")})
    echoscu(daemon.port, client(certs, None))
    echoscu(daemon.port, client(certs, certs.client))
    assert echoscu(daemon.port, client(certs, certs.stranger), check=False).returncode != 0
    log = daemon.wait_log("peer certificate not accepted")
    accepted = [line for line in log.splitlines() if "association accepted" in line]
    assert accepted[0].endswith("peer certificate none")
    assert accepted[1].endswith(f"peer certificate '{CT1}'")


def test_ignore_mode_asks_for_no_certificate(daemon_factory: Any, certs: Certificates) -> None:
    daemon = daemon_factory({"tls": tls_table(certs, peer_certificate="ignore", ca_files=[])})
    echoscu(daemon.port, client(certs, certs.stranger))
    assert line_with(daemon.log(), "association accepted").endswith("peer certificate none")


# -- subjects ---------------------------------------------------------------------------------
def test_subject_allow_list_and_calling_ae_map(daemon_factory: Any,
                                               certs: Certificates) -> None:
    daemon = daemon_factory({"tls": tls_table(
        certs, allowed_subjects=["O = Test Hospital, CN = modality-mr1"],
        subject_aetitles={"o=test hospital,cn=MODALITY-CT1": ["CT1", "CT1B"]})})
    echoscu(daemon.port, client(certs, certs.client, "-aet", "CT1"))
    echoscu(daemon.port, client(certs, certs.client2, "-aet", "ANYTHING"))
    assert echoscu(daemon.port, client(certs, certs.client, "-aet", "MR1"),
                   check=False).returncode != 0
    assert echoscu(daemon.port, client(certs, certs.client3), check=False).returncode != 0
    log = daemon.wait_log("is not in tls.allowed_subjects")
    assert ("association rejected: calling AE title 'MR1' is not one of CT1, CT1B allowed "
            f"for TLS peer '{CT1}' (tls.subject_aetitles)") in log
    refused = line_with(log, "is not in tls.allowed_subjects")
    assert "TLS peer 'CN=modality-us1,O=Test Hospital'" in refused
    assert refused.endswith("; connection closed")
    assert log.count("association accepted") == 2


# -- the handshake never blocks the accept loop ------------------------------------------------
@pytest.mark.parametrize("process_model", ["fork", "single"])
def test_idle_connection_does_not_block_a_good_client(daemon_factory: Any, certs: Certificates,
                                                      process_model: str) -> None:
    """An idle TCP connection held open while a TLS client associates: the client completes
    first, and only afterwards does the idle connection hit its handshake deadline."""
    daemon = daemon_factory({"tls": tls_table(certs), "network": {"acse_timeout": 1},
                             "workers": {"process_model": process_model}})
    with socket.create_connection(("127.0.0.1", daemon.port)) as idle:
        echoscu(daemon.port, client(certs, certs.client))
        # The good client is done and the idle connection has not been dropped yet.
        idle.setblocking(False)
        with pytest.raises(BlockingIOError):
            idle.recv(1)
        log = daemon.wait_log("no TLS handshake within 1 s (network.acse_timeout)")
        idle.setblocking(True)
        idle.settimeout(10)
        assert idle.recv(1) == b""  # closed by the worker at its deadline
    released = log.index("ECHOSCU->ANY-SCP: association released")
    assert released < log.index("no TLS handshake within 1 s")


# -- start-up errors ---------------------------------------------------------------------------
def run_with(tmp_path: Path, table: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    import tomli_w

    config = tmp_path / "bad.toml"
    config.write_text(tomli_w.dumps({
        "network": {"port": free_port(), "bind_address": "127.0.0.1"},
        "storage": {"output_directory": str(tmp_path)}, "tls": table}))
    return subprocess.run([sys.executable, "-m", "dicom_ingestd", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.mark.parametrize("case", ["wrong password", "no password", "missing key",
                                  "world-readable key", "key of another certificate",
                                  "unreadable password file"])
def test_startup_error_names_the_file(tmp_path: Path, certs: Certificates, case: str) -> None:
    key = tmp_path / "server.key"
    shutil.copy(certs.encrypted_key if "password" in case else certs.server.key, key)
    key.chmod(0o600)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    table = tls_table(certs, private_key=str(key))
    expected = f"tls.private_key = '{key}': "
    if case == "wrong password":
        table["key_password_file"] = str(wrong)
        expected = (f"tls.key_password_file = '{wrong}': cannot decrypt the private key {key} "
                    "with this password (wrong password?)")
    elif case == "no password":
        expected += "the key is encrypted: set tls.key_password_file"
    elif case == "missing key":
        key.unlink()
        expected += f"cannot read {key}: No such file or directory"
    elif case == "world-readable key":
        key.chmod(0o644)
        expected += f"{key} is readable by every user (mode 0644); refusing to use it"
    elif case == "key of another certificate":
        shutil.copy(certs.client.key, key)
        expected += f"the key does not belong to the certificate {certs.server.cert}"
    else:
        table["key_password_file"] = str(tmp_path / "absent")
        expected = (f"tls.key_password_file = '{tmp_path / 'absent'}': cannot read "
                    f"{tmp_path / 'absent'}: No such file or directory")
    result = run_with(tmp_path, table)
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'bad.toml'}: {expected}"), \
        result.stderr
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr


def test_config_errors_are_listed_together(tmp_path: Path) -> None:
    result = run_with(tmp_path, {"enabled": True, "allowed_subjects": ["ct1"],
                                 "profile": "bcp195-ex", "cipher_suites": ["AES128-SHA"]})
    assert result.returncode == 78
    problems = result.stderr.strip().splitlines()
    assert any("tls.allowed_subjects[0] = 'ct1': must be a certificate subject" in p
               for p in problems)
    assert any("tls.private_key = '': required with tls.enabled = true" in p for p in problems)
    assert any("tls.peer_certificate = 'require': needs tls.ca_files" in p for p in problems)
    assert any("no suites can be added to the bcp195-ex profile" in p for p in problems)


# -- file formats, password, credentials ------------------------------------------------------
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def test_der_files_encrypted_key_and_revocation_list(daemon_factory: Any, tmp_path: Path,
                                                     certs: Certificates) -> None:
    """-der for every file (an encrypted PKCS#8 key with its password file, the certificate,
    the CA and a CRL, which implies leaf checking as storescp +crl does)."""
    key, cert, ca = tmp_path / "server.der.key", tmp_path / "server.der", tmp_path / "ca.der"
    crl = tmp_path / "ca.crl.der"
    _openssl("pkcs8", "-topk8", "-in", str(certs.server.key), "-outform", "DER", "-v2",
             "aes256", "-passout", f"pass:{tls_certs.PASSWORD}", "-out", str(key))
    key.chmod(0o600)
    _openssl("x509", "-in", str(certs.server.cert), "-outform", "DER", "-out", str(cert))
    _openssl("x509", "-in", str(certs.ca.cert), "-outform", "DER", "-out", str(ca))
    _openssl("crl", "-in", str(tls_certs.revocation_list(certs, certs.client3)), "-outform",
             "DER", "-out", str(crl))
    daemon = daemon_factory({"tls": tls_table(
        certs, private_key=str(key), certificate=str(cert), ca_files=[str(ca)],
        crl_files=[str(crl)], file_format="der", key_password_file=str(certs.password_file))})
    echoscu(daemon.port, client(certs, certs.client))
    assert f"peer certificate '{CT1}'" in daemon.log()
    assert echoscu(daemon.port, client(certs, certs.client3), check=False).returncode != 0
    daemon.wait_log("TLS handshake failed: peer certificate not accepted: certificate revoked")


def test_socket_activation_accept_yes_with_a_credential(tmp_path: Path,
                                                        certs: Certificates) -> None:
    """systemd Accept=yes: each connection is its own process, which builds the context from
    the key passed as a credential ($CREDENTIALS_DIRECTORY, as LoadCredential= sets it)."""
    import tomli_w

    activate = require_tool("systemd-socket-activate")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copy(certs.server.key, credentials / "dicom.key")
    (credentials / "dicom.key").chmod(0o400)
    config = tmp_path / "accept.toml"
    out = tmp_path / "out"
    out.mkdir()
    config.write_text(tomli_w.dumps({
        "storage": {"output_directory": str(out)}, "logging": {"level": "info"},
        "tls": tls_table(certs, private_key="$CREDENTIALS_DIRECTORY/dicom.key")}))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "JOURNAL_"))}
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    log_path = tmp_path / "activate.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([activate, "--accept", "-E", "CREDENTIALS_DIRECTORY",
                                 "-l", f"127.0.0.1:{port}",
                                 sys.executable, "-m", "dicom_ingestd", "run", "-c",
                                 str(config)], stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        Daemon(proc, port, out, config, log_path).wait_log(f"Listening on 127.0.0.1:{port}")
        storescu(port, bundled("CT_small.dcm"), extra=client(certs, certs.client), timeout=60)
        assert len(list(out.glob("CT.*"))) == 1
        log = Daemon(proc, port, out, config, log_path).wait_log("association released")
        assert f"peer certificate '{CT1}'" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


# -- pieces ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("a", "b"), [
    ("CN=ct1,O=Test Hospital", "O = Test Hospital, CN = ct1"),
    ("cn=CT1, o=test  hospital", "commonName=ct1,organizationName=Test Hospital"),
    ("CN=a\\,b,O=x", "O=x,CN=a\\,b"),
])
def test_subjects_compare_regardless_of_order_case_and_spacing(a: str, b: str) -> None:
    assert parse_subject(a) == parse_subject(b)


def test_subject_text_is_rfc4514_most_specific_first() -> None:
    subject = ((("countryName", "DE"),), (("organizationName", "A, B"),),
               (("commonName", "ct1"),))
    assert subject_text(subject) == "CN=ct1,O=A\\, B,C=DE"
    assert parse_subject(subject_text(subject)) == parse_subject("C=DE,O=A\\, B,CN=ct1")


def test_storescp_cipher_names_map_to_suites_openssl_knows() -> None:
    known = {c["name"] for c in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers()}
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for tls_name, openssl_name in TLS_TO_OPENSSL.items():
        probe.set_ciphers(openssl_name)  # raises for an unknown name
        assert tls_name.startswith("TLS_"), tls_name
    assert "ECDHE-RSA-AES128-GCM-SHA256" in known


def test_no_context_without_tls() -> None:
    assert build_context(TLSConfig()) is None


def test_reload_rereads_the_key_and_keeps_the_running_context_on_error(
        daemon_factory: Any, certs: Certificates, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    shutil.copy(certs.server.key, key)
    key.chmod(0o600)
    daemon = daemon_factory({"tls": tls_table(certs, private_key=str(key))})
    key.chmod(0o644)
    daemon.proc.send_signal(signal.SIGHUP)
    line = line_with(daemon.wait_log("reload rejected"), "reload rejected")
    assert f"tls.private_key = '{key}': {key} is readable by every user" in line
    echoscu(daemon.port, client(certs, certs.client))  # the running context still serves


# -- the TLS settings, negotiated for real (Python's ssl as the client) -----------------------
def handshake(port: int, certs: Certificates, *, maximum: ssl.TLSVersion | None = None,
              ciphers: str = "") -> tuple[str, str]:
    """(protocol version, cipher suite) the daemon agrees to with this client; raises
    ssl.SSLError when it refuses."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(str(certs.ca.cert))
    context.load_cert_chain(str(certs.client.cert), str(certs.client.key))
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers:
        context.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        version, cipher = tls.version(), tls.cipher()
        assert version is not None and cipher is not None
        return version, cipher[0]


def test_minimum_version_13_refuses_a_tls12_client(daemon_factory: Any,
                                                    certs: Certificates) -> None:
    daemon = daemon_factory({"tls": tls_table(certs, minimum_version="1.3")})
    assert handshake(daemon.port, certs)[0] == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(daemon.port, certs, maximum=ssl.TLSVersion.TLSv1_2)
    echoscu(daemon.port, client(certs, certs.client))  # and it still serves


def test_default_minimum_version_12_serves_a_tls12_client(required: Daemon,
                                                          certs: Certificates) -> None:
    assert handshake(required.port, certs, maximum=ssl.TLSVersion.TLSv1_2)[0] == "TLSv1.2"
    assert handshake(required.port, certs)[0] == "TLSv1.3"


def test_a_profile_without_tls13_negotiates_tls12(daemon_factory: Any,
                                                  certs: Certificates) -> None:
    daemon = daemon_factory({"tls": tls_table(certs, profile="bcp195-ex")})
    assert handshake(daemon.port, certs)[0] == "TLSv1.2"


@pytest.mark.parametrize("profile", ["bcp195-nd", "bcp195"])
def test_the_servers_cipher_order_decides(daemon_factory: Any, certs: Certificates,
                                          profile: str) -> None:
    """The client lists the profile's TLS 1.2 suites in reverse; the daemon picks its own
    first (OP_CIPHER_SERVER_PREFERENCE, as storescp and BCP 195 do)."""
    from dicom_ingestd.tls_context import PROFILES

    suites = PROFILES[profile][0]
    daemon = daemon_factory({"tls": tls_table(certs, profile=profile)})
    for offered in (suites[::-1], suites[1:][::-1]):
        version, cipher = handshake(daemon.port, certs, maximum=ssl.TLSVersion.TLSv1_2,
                                    ciphers=":".join(offered))
        assert (version, cipher) == ("TLSv1.2", offered[-1]), offered
