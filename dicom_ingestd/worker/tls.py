"""The worker's side of TLS: the handshake on an accepted connection, with a deadline, and
the checks on the verified peer certificate's subject.

Runs in the association's own worker (forked process or thread), never in the master's accept
loop, so a peer that connects and sends nothing delays no one else.  The context comes from
the master (`dicom_ingestd.tls`); `Channel` works unchanged over the returned SSLSocket
(recv_into, settimeout, setsockopt all behave as on the plain socket).
"""

import contextlib
import socket
import ssl
import time
from dataclasses import dataclass

from dicom_ingestd.config.schema import TLSConfig
from dicom_ingestd.config.subjects import parse_subject, subject_text
from dicom_ingestd.errors import IngestError


class TLSRefused(IngestError):
    """The TLS handshake failed or the peer's certificate is not allowed; the connection is
    closed without a DICOM answer (there is no secure channel to send one on)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """What the handshake established."""

    subject: str  # RFC 4514 text of the verified certificate's subject; "" when none
    version: str  # "TLSv1.3"
    cipher: str


def handshake(sock: socket.socket, context: ssl.SSLContext, config: TLSConfig,
              timeout: float) -> tuple[ssl.SSLSocket, Peer]:
    """Wrap `sock` and complete the server handshake within `timeout` seconds in all (the
    deadline covers the whole handshake, not each read); raise TLSRefused with the reason."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        secure = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except OSError as exc:
        raise TLSRefused(f"TLS set-up failed: {exc.strerror or exc}") from None
    try:
        secure.do_handshake()
    except TimeoutError:
        _close(secure)
        raise TLSRefused(f"no TLS handshake within {timeout:g} s (network.acse_timeout)") \
            from None
    except ssl.SSLCertVerificationError as exc:
        _close(secure)
        raise TLSRefused("TLS handshake failed: peer certificate not accepted: "
                         f"{exc.verify_message or exc.reason}") from None
    except ssl.SSLError as exc:
        _close(secure)
        raise TLSRefused(f"TLS handshake failed: {_explain(exc, config)}") from None
    except OSError as exc:
        _close(secure)
        raise TLSRefused("TLS handshake failed: connection lost "
                         f"({exc.strerror or exc}) after {time.monotonic() - started:.1f} s") \
            from None
    cipher = secure.cipher()
    peer = Peer(subject_text((secure.getpeercert() or {}).get("subject")),
                secure.version() or "?", cipher[0] if cipher else "?")
    refusal = check_subject(config, peer.subject)
    if refusal:
        _close(secure)
        raise TLSRefused(refusal)
    return secure, peer


def _close(sock: ssl.SSLSocket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _explain(exc: ssl.SSLError, config: TLSConfig) -> str:
    reason = str(exc.reason or "")
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNEXPECTED_MESSAGE",
                  "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"):
        return f"not a TLS client (plain DICOM or another protocol?) ({reason.lower()})"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return ("the peer sent no certificate (tls.peer_certificate = "
                f"{config.peer_certificate})")
    if isinstance(exc, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "the peer closed the connection during the handshake"
    if reason == "NO_SHARED_CIPHER":
        return f"no cipher suite in common (tls.profile = {config.profile})"
    if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
        return f"no TLS version in common (tls.minimum_version = {config.minimum_version})"
    if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_")):
        return "the peer refused our certificate or parameters " \
               f"({reason.split('ALERT_', 1)[1].lower().replace('_', ' ')} alert)"
    return reason.lower().replace("_", " ") or str(exc)


def check_subject(config: TLSConfig, subject: str) -> str:
    """Why a peer with this (verified) subject may not connect, or "" if it may."""
    allowed = [*config.allowed_subjects, *config.subject_aetitles]
    if not allowed:
        return ""
    if not subject:
        return "the peer presented no verified certificate, and tls.allowed_subjects is set"
    key = parse_subject(subject)
    if any(parse_subject(entry) == key for entry in allowed):
        return ""
    return f"TLS peer {subject!r} is not in tls.allowed_subjects or tls.subject_aetitles"


def allowed_calling_aetitles(config: TLSConfig, subject: str) -> list[str] | None:
    """The calling AE titles this subject may use (tls.subject_aetitles), or None for any."""
    if not subject or not config.subject_aetitles:
        return None
    key = parse_subject(subject)
    for entry, titles in config.subject_aetitles.items():
        if parse_subject(entry) == key:
            return [title.strip() for title in titles]
    return None
