"""Named constants of the protocols we speak: exit codes and DIMSE statuses (leaf module)."""

from enum import IntEnum


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


def status_name(code: int) -> str:
    """'0xA700 OUT_OF_RESOURCES' for a known code, '0xXXXX' otherwise (for log lines)."""
    try:
        return f"0x{code:04X} {Status(code).name}"
    except ValueError:
        return f"0x{code:04X}"
