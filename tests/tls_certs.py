"""Test certificates made with the openssl command line: two CAs, a server, clients.

Made once per test session (about a second): the server key is RSA 2048 (storescp's
profiles' TLS 1.2 suites are RSA ones; DCMTK warns about shorter RSA keys), CAs and clients
use P-256 keys, which are quick to make.
"""

import subprocess
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "correct horse"


@dataclass(frozen=True)
class Pair:
    key: Path
    cert: Path
    subject: str  # as openssl -subj takes it


@dataclass(frozen=True)
class Certificates:
    directory: Path
    ca: Pair
    other_ca: Pair
    server: Pair
    client: Pair  # signed by ca
    client2: Pair  # signed by ca, another subject
    client3: Pair  # signed by ca, a third subject
    stranger: Pair  # signed by other_ca
    encrypted_key: Path  # server key encrypted with PASSWORD
    password_file: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> Pair:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subject = f"/O=Test Hospital/CN={name}"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", subject,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Pair(key, cert, subject)


def _leaf(directory: Path, name: str, ca: Pair, *, rsa: bool = False) -> Pair:
    key, csr, cert = (directory / f"{name}.key", directory / f"{name}.csr",
                      directory / f"{name}.crt")
    subject = f"/O=Test Hospital/CN={name}"
    algorithm = ["-newkey", "rsa:2048"] if rsa else ["-newkey", "ec", "-pkeyopt",
                                                       "ec_paramgen_curve:P-256"]
    _openssl("req", *algorithm, "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", subject)
    extensions = directory / f"{name}.ext"
    extensions.write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions))
    key.chmod(0o600)
    return Pair(key, cert, subject)


def make(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    other_ca = _ca(directory, "other-ca")
    server = _leaf(directory, "dicom-server", ca, rsa=True)
    encrypted = directory / "dicom-server-encrypted.key"
    password_file = directory / "key-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    _openssl("pkey", "-in", str(server.key), "-out", str(encrypted), "-aes256",
             "-passout", f"pass:{PASSWORD}")
    encrypted.chmod(0o600)
    clients = [_leaf(directory, name, ca)
               for name in ("modality-ct1", "modality-mr1", "modality-us1")]
    return Certificates(directory, ca, other_ca, server, *clients,
                        _leaf(directory, "stranger", other_ca), encrypted, password_file)


def revocation_list(certs: Certificates, *revoked: Pair) -> Path:
    """A CRL of the test CA (PEM) revoking `revoked`, made with `openssl ca`."""
    directory = certs.directory / "crl"
    directory.mkdir(exist_ok=True)
    (directory / "index.txt").write_text("")
    (directory / "crlnumber").write_text("1000\n")
    config = directory / "ca.cnf"
    config.write_text("[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\n"
                      "crlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\n")
    common = ["-batch", "-config", str(config), "-keyfile", str(certs.ca.key),
              "-cert", str(certs.ca.cert)]
    for pair in revoked:
        subprocess.run(["openssl", "ca", *common, "-revoke", str(pair.cert)], check=True,
                       capture_output=True, timeout=60, cwd=directory)
    crl = directory / "test-ca.crl"
    subprocess.run(["openssl", "ca", *common, "-gencrl", "-out", str(crl)], check=True,
                   capture_output=True, timeout=60, cwd=directory)
    return crl
