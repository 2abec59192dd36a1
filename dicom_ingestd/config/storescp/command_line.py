"""storescp's command line as its parser (DCMTK's OFCommandLine) reads it: @file expansion,
options and their values, the port, and which uses of an option count (see the package
docstring for the rules)."""

import dataclasses
import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_ingestd.config.storescp.options import Use
from dicom_ingestd.config.storescp.table import BY_SPELLING, find_option
from dicom_ingestd.errors import TranslationError


@dataclass(frozen=True, slots=True)
class Argument:
    text: str
    origin: str  # "" from the command line, else the command file it was read from


def expand(argv: Sequence[str]) -> list[Argument]:
    """Replace each "@file" argument by the arguments in that file (see the module docstring)."""
    expanded: list[Argument] = []
    for arg in argv:
        if len(arg) > 1 and arg.startswith("@"):
            filename = arg[1:]
            try:
                content = Path(filename).read_bytes().decode("utf-8")
            except OSError as exc:
                raise TranslationError(
                    f"{arg}: cannot read command file: {exc.strerror or exc}"
                ) from exc
            except UnicodeDecodeError as exc:
                raise TranslationError(f"{arg}: command file is not UTF-8: {exc}") from exc
            expanded.extend(Argument(word, filename) for word in split_command_file(content))
        else:
            expanded.append(Argument(arg, ""))
    return expanded


def split_command_file(content: str) -> list[str]:
    """Split a command file's content into arguments, as DCMTK's OFCommandLine does.

    Separators are space, tab, CR and LF outside quotes.  A quote (' or ") opens a group that
    ends at the next quote of the same kind; the other kind is literal inside it.  A closing
    quote ends the argument at once, so '""' is an empty argument and '"a"b' is two arguments,
    while a quote right after other characters continues that argument ('a"b c"' is 'ab c').
    A missing closing quote keeps what was read so far, as storescp does.
    """
    words: list[str] = []
    word: list[str] = []
    quote = ""
    for ch in content:
        if ch in "\"'":
            if ch == quote:
                words.append("".join(word))
                word = []
                quote = ""
            elif not quote:
                quote = ch
            else:
                word.append(ch)
        elif ch in " \t\r\n" and not quote:
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    return words


def is_option(text: str) -> bool:
    """storescp's test: a sign character, then at least one more character, not a digit."""
    return len(text) >= 2 and text[0] in "+-" and not text[1].isdigit()


def parse(arguments: list[Argument]) -> tuple[list[Use], list[Argument]]:
    """Split the expanded arguments into option uses and parameters.

    Raises TranslationError, like storescp's parser, for an unknown option, an option whose
    values are missing, a nested command file, and more than one parameter.
    """
    uses: list[Use] = []
    parameters: list[Argument] = []
    position = 0
    while position < len(arguments):
        arg = arguments[position]
        where = f" (from @{arg.origin})" if arg.origin else ""
        if not is_option(arg.text):
            if arg.origin and len(arg.text) > 1 and arg.text.startswith("@"):
                raise TranslationError(
                    f"{arg.text}{where}: a command file cannot name another command file"
                )
            parameters.append(arg)
            position += 1
            continue
        option = find_option(arg.text)
        if option is None:
            raise TranslationError(f"{arg.text}{where}: unknown storescp option{hint(arg.text)}")
        values = arguments[position + 1:position + 1 + option.values]
        if len(values) < option.values:
            wanted = "a value" if option.values == 1 else f"{option.values} values"
            raise TranslationError(
                f"{arg.text}{where}: missing value ({option.name} takes {wanted})"
            )
        uses.append(Use(option, arg.text, tuple(v.text for v in values), position, arg.origin))
        position += 1 + option.values
    if len(parameters) > 1:
        extra = parameters[1]
        where = f" (from @{extra.origin})" if extra.origin else ""
        raise TranslationError(
            f"{extra.text!r}{where}: too many parameters: storescp takes one, the port "
            f"(already given: {parameters[0].text!r})"
        )
    return uses, parameters


def hint(text: str) -> str:
    """A ' (did you mean …?)' suffix naming the closest known spelling, if any is close."""
    if text == "--":
        return " (storescp has no end-of-options marker)"
    close = difflib.get_close_matches(text, list(BY_SPELLING), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def effective_uses(uses: Iterable[Use]) -> dict[str, Use]:
    """The uses that count, by long option name.

    A repeated option counts once, at its rightmost use, unless it is repeatable (then one use
    at the rightmost position carries the values of all, in order); of an option block only the
    rightmost use of any member counts (the others are dropped, as storescp never looks at them).
    """
    rightmost: dict[str, Use] = {}
    for use in uses:  # left to right: later uses replace earlier ones
        key = use.option.block or use.option.long
        earlier = rightmost.get(key)
        if use.option.repeatable and earlier is not None:
            use = dataclasses.replace(use, values=earlier.values + use.values)
        rightmost[key] = use
    return {use.option.long: use for use in sorted(rightmost.values(), key=lambda u: u.position)}
