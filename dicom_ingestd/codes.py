"""Named constants of the protocols we speak: exit codes, DIMSE statuses and how an
association ended (leaf module)."""

from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    """Process exit codes (sysexits.h values where one fits), for RestartPreventExitStatus=."""

    OK = 0
    FAILURE = 1
    USAGE = 64  # EX_USAGE
    UNAVAILABLE = 69  # EX_UNAVAILABLE: a listening socket could not be had
    SOFTWARE = 70  # EX_SOFTWARE
    CANTCREAT = 73  # EX_CANTCREAT: the output directory is not usable
    CONFIG = 78  # EX_CONFIG


class Status(IntEnum):
    """DIMSE statuses we send (PS3.4 Annex B for storage, PS3.7 Annex C for general ones)."""

    SUCCESS = 0x0000
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124  # PS3.7 C.5: "Refused: Not Authorized"
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


class Ending(StrEnum):
    """How an association (or a connection that never became one) ended.

    The values are the text of log lines, of DICOM_OUTCOME journal fields, of the counters'
    file and of the metrics' `outcome` label: they never change.
    """

    RELEASED = "released"  # A-RELEASE: the only clean end
    ABORTED_BY_PEER = "aborted-by-peer"  # the peer sent A-ABORT
    ABORTED = "aborted"  # we sent A-ABORT (protocol error, test aid, internal error)
    REJECTED = "rejected"  # we answered A-ASSOCIATE-RJ
    TIMEOUT = "timeout"  # ARTIM, DIMSE or socket timeout, or below min_transfer_rate
    CLOSED = "closed"  # the peer closed the connection without A-RELEASE
    TLS_REFUSED = "tls-refused"  # the TLS handshake failed or the peer was not let in
    HEALTH_CHECK = "health-check"  # a proxy's clean check on its own (LOCAL) connection
    # Counted by the master for connections no worker served:
    REFUSED = "refused"  # access control, or not a trusted proxy
    DROPPED = "dropped"  # lost during its PROXY header, or closed unanswered in a flood


def status_name(code: int) -> str:
    """'0xA700 OUT_OF_RESOURCES' for a known code, '0xXXXX' otherwise (for log lines)."""
    try:
        return f"0x{code:04X} {Status(code).name}"
    except ValueError:
        return f"0x{code:04X}"
