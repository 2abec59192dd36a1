"""TLS for DICOM associations (storescp's +tls option group): building the server context.

The master builds one `ssl.SSLContext` from [tls] at start-up and at each reload, reading the
key, certificate, password, CA and CRL files then (forked workers inherit the context; the
per-connection modes build their own).  Every problem is a `ConfigError` whose line names the
key and the file, so `dicom-ingestd run` exits 78 and a reload is rejected with the running
context kept.  The handshake itself happens in the worker (`worker/tls.py`).

Key material never touches a temporary file: OpenSSL's loaders want paths, so decoded or
converted PEM is handed over through an anonymous memory file (memfd) and /proc/self/fd.
The grammar of certificate subjects is config/subjects.py's.  Standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

from dicom_ingestd.config.schema import TLSConfig
from dicom_ingestd.errors import ConfigError

CREDENTIALS_PREFIXES = ("$CREDENTIALS_DIRECTORY/", "${CREDENTIALS_DIRECTORY}/")

# storescp 3.6.7's cipher suite names (DCMTK's table, TLS/IANA spelling) -> OpenSSL's names,
# for those this OpenSSL 3 offers.  Other names are passed to OpenSSL as they are.
TLS_TO_OPENSSL: dict[str, str] = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_CAMELLIA_128_CBC_SHA": "CAMELLIA128-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_CAMELLIA_256_CBC_SHA": "CAMELLIA256-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA256": "AES256-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_DHE_DSS_WITH_AES_128_CBC_SHA": "DHE-DSS-AES128-SHA",
    "TLS_DHE_DSS_WITH_CAMELLIA_128_CBC_SHA": "DHE-DSS-CAMELLIA128-SHA",
    "TLS_DHE_RSA_WITH_AES_128_CBC_SHA": "DHE-RSA-AES128-SHA",
    "TLS_DHE_RSA_WITH_CAMELLIA_128_CBC_SHA": "DHE-RSA-CAMELLIA128-SHA",
    "TLS_DHE_DSS_WITH_AES_128_CBC_SHA256": "DHE-DSS-AES128-SHA256",
    "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256": "DHE-RSA-AES128-SHA256",
    "TLS_DHE_DSS_WITH_AES_128_GCM_SHA256": "DHE-DSS-AES128-GCM-SHA256",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256": "DHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384": "ECDHE-ECDSA-AES256-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384": "ECDHE-RSA-AES256-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_DHE_DSS_WITH_AES_256_CBC_SHA": "DHE-DSS-AES256-SHA",
    "TLS_DHE_RSA_WITH_AES_256_CBC_SHA": "DHE-RSA-AES256-SHA",
    "TLS_DHE_DSS_WITH_CAMELLIA_256_CBC_SHA": "DHE-DSS-CAMELLIA256-SHA",
    "TLS_DHE_RSA_WITH_CAMELLIA_256_CBC_SHA": "DHE-RSA-CAMELLIA256-SHA",
    "TLS_DHE_DSS_WITH_AES_256_CBC_SHA256": "DHE-DSS-AES256-SHA256",
    "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256": "DHE-RSA-AES256-SHA256",
    "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "DHE-RSA-CHACHA20-POLY1305",
    "TLS_DHE_DSS_WITH_AES_256_GCM_SHA384": "DHE-DSS-AES256-GCM-SHA384",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384": "DHE-RSA-AES256-GCM-SHA384",
}

_GCM_RSA = ("ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-AES128-GCM-SHA256",
            "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-AES128-GCM-SHA256")
_GCM_ECDSA = ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256")
# Each profile's TLS 1.2 suites, strongest first (we choose by our order, as storescp and BCP
# 195 do), and whether TLS 1.3 is allowed.  DCMTK's lists, in our order of preference.
PROFILES: dict[str, tuple[tuple[str, ...], bool]] = {
    "bcp195-nd": (_GCM_RSA, True),
    "bcp195": ((*_GCM_RSA, "AES128-SHA"), True),
    "bcp195-ex": ((*_GCM_ECDSA, *_GCM_RSA), False),
    "rfc8996": (("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
                 "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"), True),
    "aes": (("AES128-SHA",), False),
}

_VERIFY = {"require": ssl.CERT_REQUIRED, "verify": ssl.CERT_OPTIONAL, "ignore": ssl.CERT_NONE}

# ---------------------------------------------------------------------------------------------
# Files


def resolve(path: str) -> str:
    """A configured path, with a leading $CREDENTIALS_DIRECTORY/ replaced (ValueError if that
    variable is not set: the daemon was not started by systemd with LoadCredential=)."""
    for prefix in CREDENTIALS_PREFIXES:
        if path.startswith(prefix):
            directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
            if not directory:
                raise ValueError("$CREDENTIALS_DIRECTORY is not set (not started by systemd "
                                 "with LoadCredential=/SetCredential=)")
            return str(Path(directory) / path[len(prefix):])
    return path


class _Problem(Exception):
    """One [tls] problem; the builder turns it into a ConfigError line."""

    def __init__(self, key: str, value: object, message: str) -> None:
        super().__init__(message)
        self.key, self.value = key, value


def _read(key: str, configured: str, *, secret: bool = False) -> bytes:
    try:
        path = resolve(configured)
    except ValueError as exc:
        raise _Problem(key, configured, str(exc)) from None
    shown = path if path == configured else f"{path} (from {configured})"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise _Problem(key, configured,
                       f"cannot read {shown}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _Problem(key, configured, f"{shown} is not a regular file")
        if secret and info.st_mode & stat.S_IROTH:
            raise _Problem(key, configured,
                           f"{shown} is readable by every user (mode "
                           f"{stat.S_IMODE(info.st_mode):04o}); refusing to use it: "
                           f"chmod o-rwx {path}, or pass it with LoadCredential=")
        try:
            return fh.read()
        except OSError as exc:
            raise _Problem(key, configured,
                           f"cannot read {shown}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds `data` in memory only."""
    fd = os.memfd_create("dicom-ingestd-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _pem(der: bytes, label: str) -> bytes:
    body = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])
            + "\n").encode("ascii")


def _der_element(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of element) of the DER element at offset."""
    tag = data[offset]
    length = data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[start:start + count], "big")
        start += count
    return tag, start, start + length


def _der_key_label(der: bytes) -> str:
    """The PEM label of a DER private key: PKCS#8 (plain or encrypted), PKCS#1 RSA or SEC1 EC."""
    try:
        tag, start, _ = _der_element(der, 0)
        first, _, after_first = _der_element(der, start)
        if tag != 0x30:
            raise IndexError
        if first == 0x30:
            return "ENCRYPTED PRIVATE KEY"
        second, _, _ = _der_element(der, after_first)
    except IndexError:
        return "PRIVATE KEY"
    return {0x30: "PRIVATE KEY", 0x02: "RSA PRIVATE KEY", 0x04: "EC PRIVATE KEY"}.get(
        second, "PRIVATE KEY")


def _encrypted(key_pem: bytes) -> bool:
    return b"ENCRYPTED" in key_pem


# ---------------------------------------------------------------------------------------------
# The context


def openssl_cipher(name: str) -> str:
    """An OpenSSL cipher name for a storescp (TLS) or OpenSSL cipher suite name."""
    return TLS_TO_OPENSSL.get(name.strip(), name.strip())


def build_context(config: TLSConfig, source: str = "<config>") -> ssl.SSLContext | None:
    """The server context for [tls], or None when TLS is off; raises ConfigError."""
    if not config.enabled:
        return None
    try:
        return _build(config)
    except _Problem as problem:
        raise ConfigError([f"{source}: tls.{problem.key} = {problem.value!r}: "
                           f"{problem}"]) from None


def _limit_versions(context: ssl.SSLContext, config: TLSConfig) -> None:
    """tls.minimum_version, and TLS 1.2 at most for a profile without TLS 1.3 suites."""
    context.minimum_version = (ssl.TLSVersion.TLSv1_3 if config.minimum_version == "1.3"
                               else ssl.TLSVersion.TLSv1_2)
    if not PROFILES[config.profile][1]:
        context.maximum_version = ssl.TLSVersion.TLSv1_2


def _build(config: TLSConfig) -> ssl.SSLContext:
    der = config.file_format == "der"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    suites = PROFILES[config.profile][0]
    _limit_versions(context, config)
    # Server order decides (BCP 195); a peer closing without close_notify after A-RELEASE-RP
    # is an ordinary end of the connection, not an error.
    context.options |= (ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
                        | ssl.OP_IGNORE_UNEXPECTED_EOF)
    extra = []
    for suite in config.cipher_suites:
        name = openssl_cipher(suite)
        try:
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            probe.set_ciphers(name)
            offered = probe.get_ciphers()
        except ssl.SSLError:
            raise _Problem("cipher_suites", config.cipher_suites,
                           f"{suite!r} is no cipher suite this OpenSSL ({ssl.OPENSSL_VERSION}) "
                           "knows (storescp +cc lists storescp's names)") from None
        if any(c.get("symmetric") in (None, "") or "NULL" in str(c.get("name")) for c in offered):
            raise _Problem("cipher_suites", config.cipher_suites,
                           f"{suite!r} is an unencrypted cipher suite: not allowed")
        extra.append(name)
    try:
        context.set_ciphers(":".join(dict.fromkeys((*suites, *extra))))
    except ssl.SSLError:  # pragma: no cover - the profile lists are OpenSSL 3 suites
        raise _Problem("profile", config.profile, "no cipher suite of this profile is "
                       f"available in {ssl.OPENSSL_VERSION}") from None

    key = _read("private_key", config.private_key, secret=True)
    if der:
        key = _pem(key, _der_key_label(key))
    certificate = _read("certificate", config.certificate)
    if der:
        certificate = ssl.DER_cert_to_PEM_cert(certificate).encode("ascii")
    password = b""
    if config.key_password_file:
        raw = _read("key_password_file", config.key_password_file, secret=True)
        password = raw.split(b"\n", 1)[0].removesuffix(b"\r")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(
            cadata=certificate.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise _Problem("certificate", config.certificate,
                       f"no {config.file_format.upper()} certificate in it "
                       f"({_reason(exc)})") from None
    with _memory_file(certificate) as cert_path, _memory_file(key) as key_path:
        try:
            # A password callback (never None): OpenSSL must not prompt on a terminal.
            context.load_cert_chain(cert_path, key_path, password=lambda: password)
        except ssl.SSLError as exc:
            raise _key_problem(config, exc, _encrypted(key)) from None
        except ValueError as exc:  # password longer than OpenSSL's buffer
            raise _Problem("key_password_file", config.key_password_file, str(exc)) from None

    context.verify_mode = _VERIFY[config.peer_certificate]
    for ca_file in config.ca_files:
        data = _read("ca_files", ca_file)
        try:
            if der:
                context.load_verify_locations(cadata=data)
            else:
                context.load_verify_locations(cadata=data.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise _Problem("ca_files", ca_file,
                           f"no {config.file_format.upper()} CA certificate in it "
                           f"({_reason(exc)})") from None
    for directory in config.ca_directories:
        _load_directory(context, directory, der)
    crl_check = config.crl_check
    for crl_file in config.crl_files:
        data = _read("crl_files", crl_file)
        if der:
            data = _pem(data, "X509 CRL")
        with _memory_file(data) as crl_path:
            try:
                context.load_verify_locations(cafile=crl_path)
            except ssl.SSLError as exc:
                raise _Problem("crl_files", crl_file,
                               f"no {config.file_format.upper()} CRL in it "
                               f"({_reason(exc)})") from None
        crl_check = crl_check if crl_check != "none" else "leaf"  # storescp: +crl implies +crv
    if crl_check == "leaf":
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    elif crl_check == "chain":
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    if config.dh_parameters:
        data = _read("dh_parameters", config.dh_parameters)
        with _memory_file(data) as dh_path:
            try:
                context.load_dh_params(dh_path)
            except ssl.SSLError as exc:
                raise _Problem("dh_parameters", config.dh_parameters,
                               f"no PEM DH parameters in it ({_reason(exc)})") from None
    return context


def _load_directory(context: ssl.SSLContext, configured: str, der: bool) -> None:
    try:
        directory = Path(resolve(configured))
    except ValueError as exc:
        raise _Problem("ca_directories", configured, str(exc)) from None
    try:
        entries = sorted(p for p in directory.iterdir() if p.is_file())
    except OSError as exc:
        raise _Problem("ca_directories", configured,
                       f"cannot read the directory: {exc.strerror or exc}") from None
    if not der:
        # OpenSSL looks certificates up by hashed name when it needs them.
        context.load_verify_locations(capath=str(directory))
        return
    for entry in entries:
        try:
            context.load_verify_locations(cadata=entry.read_bytes())
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise _Problem("ca_directories", configured,
                           f"{entry}: no DER certificate ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    text = str(getattr(exc, "strerror", None) or exc)
    return re.sub(r" \(_ssl\.c:\d+\)$", "", text)


def _key_problem(config: TLSConfig, exc: ssl.SSLError, encrypted: bool) -> _Problem:
    reason = str(exc.reason or "")
    # OpenSSL 3 drops the certificate when the key does not match it: NO_CERTIFICATE_ASSIGNED.
    if reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
        return _Problem("private_key", config.private_key,
                        f"the key does not belong to the certificate {config.certificate}")
    if encrypted and not config.key_password_file:
        return _Problem("private_key", config.private_key,
                        "the key is encrypted: set tls.key_password_file to a file holding "
                        "its password (storescp prompts or takes +pw)")
    if encrypted:
        return _Problem("key_password_file", config.key_password_file,
                        f"cannot decrypt the private key {config.private_key} with this "
                        "password (wrong password?)")
    return _Problem("private_key", config.private_key,
                    f"cannot load it as a {config.file_format.upper()} private key "
                    f"({_reason(exc)})")


def client_context(config: TLSConfig) -> ssl.SSLContext:
    """A client context from [tls] for associations we open (storage commitment reports):
    the profile's versions and suites, the peer's certificate verified against ca_files and
    ca_directories (its host name is not matched: DICOM peers are configured by address),
    our certificate presented when one is configured.  Raises ssl.SSLError or OSError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    suites = PROFILES[config.profile][0]
    _limit_versions(context, config)
    context.set_ciphers(":".join(dict.fromkeys(
        (*suites, *(openssl_cipher(s) for s in config.cipher_suites)))))
    der = config.file_format == "der"
    try:
        for ca_file in config.ca_files:
            data = _read("ca_files", ca_file)
            context.load_verify_locations(cadata=data if der else data.decode("ascii",
                                                                              "replace"))
        for directory in config.ca_directories:
            _load_directory(context, directory, der)
        if config.certificate and config.private_key:
            key = _read("private_key", config.private_key, secret=True)
            certificate = _read("certificate", config.certificate)
            if der:
                key = _pem(key, _der_key_label(key))
                certificate = ssl.DER_cert_to_PEM_cert(certificate).encode("ascii")
            password = b""
            if config.key_password_file:
                raw = _read("key_password_file", config.key_password_file, secret=True)
                password = raw.split(b"\n", 1)[0].removesuffix(b"\r")
            with _memory_file(certificate) as cert_path, _memory_file(key) as key_path:
                context.load_cert_chain(cert_path, key_path, password=lambda: password)
    except _Problem as problem:
        raise OSError(f"tls.{problem.key} = {problem.value!r}: {problem}") from None
    return context
