"""What a storescp option is to the translation: its row (`Option`), one use of it on a
command line (`Use`), what it does (`Effect`: sets keys, ignored, or not implemented) and the
value parsers rows share.  The rows themselves are in `table`."""

import enum
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_ingestd.errors import TranslationError

INT_MAX = 2**31 - 1  # storescp stores these values in C ints; larger ones would wrap around
SECRET_OPTIONS = ("+pw", "--use-passwd")  # their value (a password) is never written out




class Kind(enum.Enum):
    """What a storescp option does in a translation."""

    SET = "set"  # sets TOML keys (possibly none, for options that select storescp's default)
    IGNORED = "ignored"  # accepted with a warning: the option has no meaning for this daemon
    UNSUPPORTED = "unsupported"  # refused: not implemented yet


@dataclass(frozen=True, slots=True)
class Use:
    """One occurrence of an option on the expanded command line."""

    option: "Option"
    spelling: str  # as written: short or long
    values: tuple[str, ...]
    position: int  # index in the expanded argument list
    origin: str  # "" on the command line itself, else the command file it came from

    def label(self) -> str:
        """The option and its values as written, for messages: `-pdu 100 (from @opts)`."""
        values = ("HIDDEN",) if self.spelling in SECRET_OPTIONS else self.values
        text = shlex.join([self.spelling, *values])
        return f"{text} (from @{self.origin})" if self.origin else text


# A setter turns one use of an option into TOML values ({"table.key": value}); it may add
# warnings to the list it is given and raises TranslationError for an invalid value.
Setter = Callable[[Use, list[str]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Effect:
    """The translation of one option: a setter (Kind.SET) or the reason it is not translated."""

    kind: Kind
    reason: str = ""
    setter: Setter | None = None
    keys: tuple[str, ...] = ()  # the keys the setter may set, for docs and tests


@dataclass(frozen=True, slots=True)
class Option:
    """One storescp option: its spellings, how many values it takes, what it becomes here.

    `block` names storescp's group of mutually exclusive options it belongs to ("" if none):
    of the options of one block only the rightmost on the command line has any effect.
    `prevails`: its values win over other options' values for the same keys wherever it
    stands on the command line (otherwise the rightmost option setting a key wins).
    """

    long: str
    short: str
    values: int
    effect: Effect
    block: str = ""
    since: str = "3.6.7"
    prevails: bool = False
    repeatable: bool = False  # every use counts (storescp +cf, +cd, +crl, +cs): values add up

    @property
    def name(self) -> str:
        """Both spellings, for messages: `-pdu/--max-pdu`."""
        return f"{self.short}/{self.long}" if self.short else self.long


def sets(*pairs: tuple[str, Any]) -> Effect:
    """An option that sets fixed values; with no pairs, one accepted silently (a default)."""
    values = dict(pairs)
    return Effect(Kind.SET, setter=lambda use, warnings: dict(values), keys=tuple(values))


def takes(key: str, parse: Callable[[Use, str, list[str]], Any]) -> Effect:
    """An option whose single value, parsed and checked by `parse`, is the value of `key`."""
    return Effect(
        Kind.SET, setter=lambda use, warnings: {key: parse(use, use.values[0], warnings)},
        keys=(key,),
    )


def setter(keys: tuple[str, ...], function: Setter) -> Effect:
    """An option with its own setter, which may set any of `keys`."""
    return Effect(Kind.SET, setter=function, keys=keys)


def ignored(reason: str) -> Effect:
    """An option accepted with a warning saying why it has no meaning for this daemon."""
    return Effect(Kind.IGNORED, reason=reason)


def unsupported(reason: str) -> Effect:
    """An option refused as not implemented yet; `reason` says what it would have done."""
    return Effect(Kind.UNSUPPORTED, reason=reason)


# Value parsers.  Each takes the use (for messages), the value and the warning list.


def integer(minimum: int, maximum: int, *, c_signed: bool) -> Callable[[Use, str, list[str]], int]:
    """A decimal integer in minimum..maximum.

    storescp reads signed values with sscanf("%li"), which takes "010" as octal 8 and "0x10" as
    hex; unsigned ones with "%lu".  Both ignore trailing garbage.  We accept plain decimal only
    and refuse what storescp would read differently from what a person reads.
    """

    def parse(use: Use, text: str, warnings: list[str]) -> int:
        return parse_integer(use.label(), text, minimum, maximum, c_signed=c_signed)

    return parse


def parse_integer(label: str, text: str, minimum: int, maximum: int, *, c_signed: bool) -> int:
    """Parse and range-check one integer value (see `integer`); errors name `label`."""
    stripped = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", stripped):
        raise TranslationError(f"{label}: invalid value, expected a decimal integer")
    if c_signed and re.fullmatch(r"[+-]?0[0-9]+", stripped):
        raise TranslationError(
            f"{label}: leading zero: storescp would read this as an octal number; "
            "write it in decimal without leading zeros"
        )
    number = int(stripped)
    if not minimum <= number <= maximum:
        raise TranslationError(f"{label}: must be between {minimum} and {maximum}")
    return number


def string_value(use: Use, text: str, warnings: list[str]) -> str:
    """Any string a file name can hold (NUL only arrives through command files)."""
    if "\0" in text:
        raise TranslationError(f"{use.label()}: the value contains a NUL character")
    return text


def name_part(use: Use, text: str, warnings: list[str]) -> str:
    """-fe, -ss, -su: becomes part of one file or directory name, so no '/'."""
    if "/" in text:
        raise TranslationError(f"{use.label()}: the value is part of a file name: no '/'")
    return string_value(use, text, warnings)
