"""storescp's own conflicts and dependencies between options we accept, as a table, so that a
command line storescp refuses is refused here too.

Each row looks only at the uses that count (`command_line.effective_uses`): of an option block
at most one member is there, so "X conflicts with every member of block B but one" is a row
per member.  The rows are in storescp's order of checking, which is the order of the messages.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dicom_ingestd.config.storescp.options import Use
from dicom_ingestd.config.storescp.table import OPTIONS

Effective = dict[str, Use]  # long option name -> the use that counts


@dataclass(frozen=True, slots=True)
class Excludes:
    """`a` and `b` together are refused; `text` follows a's label ({b} is b's label)."""

    a: str
    b: str
    text: str = "conflicts with {b} (as in storescp)"

    def problems(self, effective: Effective, level: str) -> list[str]:
        if self.a in effective and self.b in effective:
            text = self.text.format(b=effective[self.b].label())
            return [f"{effective[self.a].label()}: {text}"]
        return []


@dataclass(frozen=True, slots=True)
class Requires:
    """`option` is refused unless one of `any_of` is there too."""

    option: str
    any_of: tuple[str, ...]
    text: str

    def problems(self, effective: Effective, level: str) -> list[str]:
        if self.option in effective and not any(o in effective for o in self.any_of):
            return [f"{effective[self.option].label()}: requires {self.text}"]
        return []


@dataclass(frozen=True, slots=True)
class Check:
    """A dependency that is not a plain pair (the log level, or three options at once)."""

    check: Callable[[Effective, str], list[str]]

    def problems(self, effective: Effective, level: str) -> list[str]:
        return self.check(effective, level)


Rule = Excludes | Requires | Check


def _block(name: str, *, but: Iterable[str] = ()) -> tuple[str, ...]:
    return tuple(o.long for o in OPTIONS if o.block == name and o.long not in but)


def _verbose_pc(effective: Effective, level: str) -> list[str]:
    # +v needs verbose mode; with -lc the level comes from a file we cannot see: let it pass.
    if ("--verbose-pc" in effective and "--log-config" not in effective
            and level not in ("info", "debug", "trace")):
        return [f"{effective['--verbose-pc'].label()}: only allowed with verbose mode "
                "(-v, -d or -ll info/debug/trace), as in storescp"]
    return []


def _tls_without_ca(effective: Effective, level: str) -> list[str]:
    if "--enable-tls" in effective and "--ignore-peer-cert" not in effective and not any(
            o in effective for o in ("--add-cert-file", "--add-cert-dir")):
        mode = "-vc" if "--verify-peer-cert" in effective else "-rc (the default)"
        return [f"{effective['--enable-tls'].label()}: with {mode} and no +cf/+cd, storescp "
                "verifies client certificates against no CA and so refuses every client that "
                "sends one; add +cf CA-FILE (or -ic) to translate a working set-up"]
    return []


_VERBOSITY = ("--quiet", "--verbose", "--debug")
_SORTS = _block("sort")
_SORT_TEXT = "--sort-conc-studies, --sort-on-study-uid or --sort-on-patientname (as in storescp)"
# The output options storescp refuses with +B (checkConflict).
_NOT_WITH_BIT_PRESERVING = (
    *_block("writexfer", but=("--write-xfer-same",)), *_block("newvr"), *_block("grouplength"),
    *_block("lengths"), "--padding-create")
# The conversions storescp refuses for a compressed transfer syntax preference.
_CONVERTING = _block("writexfer", but=("--write-xfer-same",))
_COMPRESSED_PREFERENCES = _block("xfer", but=("--prefer-uncompr", "--prefer-little",
                                              "--prefer-big", "--implicit", "--prefer-deflated"))
# storescp's TLS options that depend on --enable-tls (DcmTLSOptions::parseArguments).
_NEEDS_TLS = ("--std-passwd", "--use-passwd", "--null-passwd", "--pem-keys", "--der-keys",
              "--add-cert-file", "--add-cert-dir", "--add-crl-file", "--enable-crl-vfy",
              "--enable-crl-all", "--profile-bcp195-nd", "--profile-bcp195",
              "--profile-bcp195-ex", "--profile-8996", "--profile-aes", "--cipher",
              "--dhparam", "--require-peer-cert", "--verify-peer-cert", "--ignore-peer-cert",
              "--seed", "--write-seed", "--write-seed-file")

RULES: tuple[Rule, ...] = (
    Excludes("--inetd", "--fork"),
    *(Excludes(a, b) for b in _VERBOSITY for a in ("--log-level", "--log-config")),
    Excludes("--log-config", "--log-level"),
    # -xf takes its transfer syntaxes from the file: only +x= (the default) goes with it.
    *(Excludes("--config-file", b) for b in _block("xfer", but=("--prefer-uncompr",))),
    Excludes("--config-file", "--promiscuous"),
    Requires("--max-associations", ("--fork",), "--fork (storescp 3.7)"),
    *(rule for event in ("--exec-on-eostudy", "--rename-on-eostudy")
      for rule in (Requires(event, _SORTS, _SORT_TEXT), Excludes(event, "--inetd"))),
    Requires("--eostudy-timeout", (*_SORTS, "--exec-on-eostudy", "--rename-on-eostudy"),
             "a --sort option, --exec-on-eostudy or --rename-on-eostudy (as in storescp)"),
    *(Excludes(sort, "--bit-preserving") for sort in _SORTS),
    Excludes("--timenames", "--unique-filenames"),
    *(Excludes(option, "--bit-preserving") for option in _NOT_WITH_BIT_PRESERVING),
    *(Excludes(option, preference, "conflicts with {b} (as in storescp): compressed data "
               "sets cannot be converted")
      for preference in _COMPRESSED_PREFERENCES for option in _CONVERTING),
    Excludes("--padding-create", "--write-dataset"),
    *(Excludes("--compression-level", b, "requires --write-xfer-deflated or --write-xfer-same "
               "(as in storescp)")
      for b in _block("writexfer", but=("--write-xfer-deflated", "--write-xfer-same"))),
    Check(_verbose_pc),
    *(Requires(option, ("--enable-tls",), "--enable-tls (as in storescp)")
      for option in _NEEDS_TLS),
    Excludes("--cipher", "--profile-bcp195-ex"),
    Check(_tls_without_ca),
    *(Requires(seed, ("--seed",), "--seed (as in storescp)")
      for seed in ("--write-seed", "--write-seed-file")),
)


def check(effective: Effective, level: str) -> list[str]:
    """One line per rule the command line breaks (`level`: the logging level it sets)."""
    return [problem for rule in RULES for problem in rule.problems(effective, level)]
