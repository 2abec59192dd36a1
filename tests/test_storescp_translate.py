"""storescp command line → TOML translation (dicom_ingestd.config.storescp).

The option table is checked against the installed storescp's own --help output, and refusals
that mirror storescp's are checked against the real storescp as well.
"""

import ctypes.util
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.daemon import free_port

from dicom_ingestd.access import AccessPolicy
from dicom_ingestd.config import schema
from dicom_ingestd.config.load import config_from_mapping
from dicom_ingestd.config.storescp import (
    HOSTS_DIR_ENV,
    OPTIONS,
    Kind,
    Translation,
    find_option,
    translate,
)
from dicom_ingestd.config.storescp.command_line import split_command_file
from dicom_ingestd.errors import TranslationError

PORT = "11104"
SCHEMA_KEYS = dict(schema.keys())  # "table.key" → field, in declaration order


def base(**tables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What `storescp 11104` translates to, updated table by table with `tables`."""
    data: dict[str, dict[str, Any]] = {
        "network": {"port": int(PORT), "max_pdu": 16384, "disable_host_lookup": False},
        "storage": {"output_directory": "."},
        "logging": {"level": "warn"},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    return data


def data_of(*argv: str) -> dict[str, dict[str, Any]]:
    return translate(argv).data


def refused(*argv: str) -> str:
    with pytest.raises(TranslationError) as info:
        translate(argv)
    return str(info.value)


@pytest.fixture(autouse=True)
def _no_host_tables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """+ac reads hosts.allow/hosts.deny: never this machine's, in any test (here: none)."""
    empty = tmp_path / "no-host-tables"
    empty.mkdir()
    monkeypatch.setenv(HOSTS_DIR_ENV, str(empty))


def storescp() -> str:
    """The installed storescp (a missing peer tool is a failure, as everywhere in this suite)."""
    path = shutil.which("storescp")
    if path is None:
        pytest.fail("storescp is not installed: run the README's test command, which installs it")
    return path


# --------------------------------------------------------------------------------------------
# Defaults and simple options


def test_port_only_sets_storescp_defaults_that_differ_from_ours() -> None:
    # storescp resolves host names and logs at warn; output goes to "." - all written out.
    t = translate([PORT])
    assert t.data == base()
    assert t.warnings == []


@pytest.mark.parametrize(("argv", "expected"), [
    (["-aet", "ARCHIVE"], base(network={"aetitle": "ARCHIVE"})),
    (["--aetitle", "ARCHIVE"], base(network={"aetitle": "ARCHIVE"})),
    (["-aet", "STORESCP"], base(network={"aetitle": "STORESCP"})),  # explicit: written
    (["-pdu", "4096"], base(network={"max_pdu": 4096})),
    (["--max-pdu", "131072"], base(network={"max_pdu": 131072})),
    (["-ta", "5"], base(network={"acse_timeout": 5})),
    (["-td", "7"], base(network={"dimse_timeout": 7})),
    (["-ts", "0"], base(network={"socket_timeout": 0})),
    (["-ts", "-1"], base(network={"socket_timeout": 0})),  # storescp: leave unset = none
    (["--socket-timeout", "+90"], base(network={"socket_timeout": 90})),
    (["-dhl"], base(network={"disable_host_lookup": True})),
    (["-i4"], base(network={"ip_version": "ipv4"})),
    (["--ipv6"], base(network={"ip_version": "ipv6"})),
    (["-i0"], base(network={"ip_version": "dual"})),
    (["--refuse"], base(association={"refuse": True})),
    (["--reject"], base(association={"reject_without_implementation_uid": True})),
    (["-up"], base(association={"uid_padding": True})),
    (["--ignore"], base(testing={"ignore": True})),
    (["--sleep-after", "3"], base(testing={"sleep_after": 3})),
    (["--sleep-during", "0"], base(testing={"sleep_during": 0})),
    (["--abort-after"], base(testing={"abort_after": True})),
    (["--abort-during"], base(testing={"abort_during": True})),
    (["-pm"], base(negotiation={"promiscuous": True})),
    (["-od", "/srv/dicom"], base(storage={"output_directory": "/srv/dicom"})),
    (["-od", "/srv/dicom//"], base(storage={"output_directory": "/srv/dicom"})),
    (["-od", "/"], base(storage={"output_directory": "/"})),
    (["-od", ""], base(storage={"output_directory": "."})),  # storescp: empty means "."
    (["+B"], base(storage={"bit_preserving": True})),
    (["--normal"], base(storage={"bit_preserving": False})),
    (["-ss", "ST"], base(storage={"sort": "conc-studies", "sort_prefix": "ST"})),
    (["-su", ""], base(storage={"sort": "study-uid", "sort_prefix": ""})),
    (["-sp"], base(storage={"sort": "patientname"})),
    (["+uf"], base(storage={"filenames": "unique"})),
    (["-uf"], base(storage={"filenames": "default"})),
    (["-tn"], base(storage={"filenames": "timenames"})),
    (["-fe", ".dcm"], base(storage={"filename_extension": ".dcm"})),
    (["-q"], base(logging={"level": "fatal"})),
    (["-v"], base(logging={"level": "info"})),
    (["-d"], base(logging={"level": "debug"})),
    (["-ll", "trace"], base(logging={"level": "trace"})),
    (["--log-level", "ERROR"], base(logging={"level": "error"})),  # case-insensitive
    (["-ll", "all"], base(logging={"level": "trace"})),
    (["-v", "+v"], base(logging={"level": "info", "verbose_pc": True})),
    (["--inetd"], {"network": {"inetd": True, "max_pdu": 16384, "disable_host_lookup": False},
                   "storage": {"output_directory": "."}, "logging": {"level": "warn"}}),
    (["--single-process"], base(workers={"process_model": "single"})),
    (["--fork"], base(workers={"process_model": "fork"})),  # our default, written: explicit
    (["--fork", "--max-associations", "4"],
     base(workers={"process_model": "fork", "max_associations": 4})),
    # Accepted as no-ops: they select what storescp and we do by default.
    (["-ac"], base()), (["--no-sni"], base()), (["-uc"], base()),
    (["-tls"], base(tls={"enabled": False})),  # explicit, so written
    # Output options: an option given is written, even with storescp's default value.
    (["+t="], base(storage={"transfer_syntax": "received"})),
    (["+F"], base(storage={"file_format": "file"})),
    (["--write-file"], base(storage={"file_format": "file"})),
    (["-F"], base(storage={"file_format": "dataset"})),
    (["-p"], base(storage={"file_padding": 0, "item_padding": 0})),
    (["--padding-off"], base(storage={"file_padding": 0, "item_padding": 0})),
    (["+u"], base(storage={"new_vrs": True})),
    # An option that re-encodes brings storescp's other defaults (+e, +g=) along.
    (["+te"], base(storage={"transfer_syntax": "little-explicit",
                            "sequence_lengths": "explicit", "group_length": "recalc"})),
    (["+tb"], base(storage={"transfer_syntax": "big-explicit",
                            "sequence_lengths": "explicit", "group_length": "recalc"})),
    (["+ti"], base(storage={"transfer_syntax": "implicit",
                            "sequence_lengths": "explicit", "group_length": "recalc"})),
    (["+td", "+cl", "0"], base(storage={"transfer_syntax": "deflated", "deflate_level": 0,
                                        "sequence_lengths": "explicit",
                                        "group_length": "recalc"})),
    (["+cl", "9"], base(storage={"deflate_level": 9, "sequence_lengths": "explicit",
                                 "group_length": "recalc"})),
    (["-e"], base(storage={"sequence_lengths": "undefined", "group_length": "recalc"})),
    (["+e"], base(storage={"sequence_lengths": "explicit", "group_length": "recalc"})),
    (["+g"], base(storage={"sequence_lengths": "explicit", "group_length": "create"})),
    (["-g"], base(storage={"sequence_lengths": "explicit", "group_length": "remove"})),
    (["+g="], base(storage={"sequence_lengths": "explicit", "group_length": "recalc"})),
    (["-u"], base(storage={"new_vrs": False, "sequence_lengths": "explicit",
                           "group_length": "recalc"})),
    (["+p", "1024", "16"], base(storage={"file_padding": 1024, "item_padding": 16,
                                        "sequence_lengths": "explicit",
                                        "group_length": "recalc"})),
])
def test_option(argv: list[str], expected: dict[str, dict[str, Any]]) -> None:
    assert data_of(*argv, PORT) == expected


@pytest.mark.parametrize(("flag", "choice"), [
    ("+x=", "uncompressed"), ("+xe", "little"), ("+xb", "big"), ("+xs", "lossless"),
    ("+xy", "jpeg8"), ("+xx", "jpeg12"), ("+xv", "j2k-lossless"), ("+xw", "j2k-lossy"),
    ("+xt", "jls-lossless"), ("+xu", "jls-lossy"), ("+xm", "mpeg2"), ("+xh", "mpeg2-high"),
    ("+xn", "mpeg4"), ("+xl", "mpeg4-bd"), ("+x2", "mpeg4-2-2d"), ("+x3", "mpeg4-2-3d"),
    ("+xo", "mpeg4-2-st"), ("+x4", "hevc"), ("+x5", "hevc10"), ("+xr", "rle"),
    ("+xd", "deflated"), ("+xi", "implicit"), ("+xa", "all"),
])
def test_preferred_transfer_syntax(flag: str, choice: str) -> None:
    expected = base(negotiation={"preferred_transfer_syntax": choice})
    assert data_of(flag, PORT) == expected
    option = find_option(flag)
    assert option is not None
    assert data_of(option.long, PORT) == expected


def test_every_preference_choice_has_exactly_one_flag() -> None:
    chosen = [
        translate([option.long, PORT]).data["negotiation"]["preferred_transfer_syntax"]
        for option in OPTIONS if option.effect.keys == ("negotiation.preferred_transfer_syntax",)
    ]
    assert sorted(chosen) == sorted(schema.PREFERENCE_CHOICES)


def test_short_and_long_spellings_translate_alike() -> None:
    for option in OPTIONS:
        if not option.short:
            continue
        sample = {"--max-pdu": "8192", "--log-level": "debug"}.get(option.long, "5")
        values = [sample] * option.values
        results: list[object] = []
        for spelling in (option.short, option.long):
            try:
                results.append(translate([spelling, *values, PORT]).data)
            except TranslationError as exc:
                # Same refusal, only the spelling differs.
                results.append(str(exc).replace(spelling, "OPTION"))
        assert results[0] == results[1], option.name


# --------------------------------------------------------------------------------------------
# storescp's command-line semantics


def test_options_and_port_in_any_order() -> None:
    assert data_of("-aet", "X", PORT, "-v") == data_of(PORT, "-v", "-aet", "X")


def test_values_are_taken_verbatim_even_when_they_look_like_options() -> None:
    assert data_of("-aet", "-v", PORT) == base(network={"aetitle": "-v"})


@pytest.mark.parametrize(("argv", "expected"), [
    (["+xe", "+xb"], base(negotiation={"preferred_transfer_syntax": "big"})),
    (["+xa", "+x="], base(negotiation={"preferred_transfer_syntax": "uncompressed"})),
    (["-aet", "A", "--aetitle", "B"], base(network={"aetitle": "B"})),
    (["-pdu", "8192", "-pdu", "32768"], base(network={"max_pdu": 32768})),
    (["-od", "/a", "-od", "/b"], base(storage={"output_directory": "/b"})),
    (["-ss", "a", "-su", "b"], base(storage={"sort": "study-uid", "sort_prefix": "b"})),
    (["-su", "b", "-sp"], base(storage={"sort": "patientname"})),
    (["-sp", "-ss", "c"], base(storage={"sort": "conc-studies", "sort_prefix": "c"})),
    (["+B", "-B"], base(storage={"bit_preserving": False})),
    (["-B", "+B"], base(storage={"bit_preserving": True})),
    (["+uf", "-uf"], base(storage={"filenames": "default"})),
    (["+uf", "-uf", "-tn"], base(storage={"filenames": "timenames"})),
    (["-tn", "-uf"], base(storage={"filenames": "timenames"})),  # -tn is not in the block
    (["-q", "-v"], base(logging={"level": "info"})),
    (["-v", "-d", "-q"], base(logging={"level": "fatal"})),
    (["-ll", "info", "-ll", "debug"], base(logging={"level": "debug"})),
    (["-i6", "-i4", "-i0"], base(network={"ip_version": "dual"})),
    (["--fork", "--single-process"], base(workers={"process_model": "single"})),
    (["--single-process", "--fork"], base(workers={"process_model": "fork"})),
    (["-F", "+F"], base(storage={"file_format": "file"})),
    (["+p", "8", "16", "-p"], base(storage={"file_padding": 0, "item_padding": 0})),
    # An overridden option has no effect, in storescp as here (+te brings no +e along).
    (["+te", "+t="], base(storage={"transfer_syntax": "received"})),
    (["+tls", "key.pem", "cert.pem", "-tls"], base(tls={"enabled": False})),
    (["+ac", "-ac"], base()),
])
def test_rightmost_wins(argv: list[str], expected: dict[str, dict[str, Any]]) -> None:
    assert data_of(*argv, PORT) == expected


def test_missing_port() -> None:
    assert refused("-v").startswith("port: missing parameter")
    assert "port: missing parameter" in refused()


def test_help_alone_has_nothing_to_translate() -> None:
    assert refused("--version") == (
        "port: missing parameter: storescp needs the port to listen on (or --inetd); with "
        "--version alone storescp only prints text, there is nothing to translate")


def test_inetd_needs_no_port_and_drops_a_given_one() -> None:
    t = translate(["--inetd", PORT])
    assert "port" not in t.data["network"]
    assert t.data["network"]["inetd"] is True
    assert t.warnings == [f"port {PORT}: not used with --inetd (the connection arrives on "
                          "standard input); dropped"]
    assert translate(["-id"]).data == translate(["--inetd"]).data


@pytest.mark.parametrize(("argv", "message"), [
    (["0"], "port '0': must be between 1 and 65535"),
    (["65536"], "port '65536': must be between 1 and 65535"),
    (["-1"], "port '-1': must be between 1 and 65535"),  # "-1" is a parameter, not an option
    (["104x"], "port '104x': invalid value, expected a decimal integer"),
    (["104", "105"], "'105': too many parameters"),
    (["@", PORT], "'11104': too many parameters"),  # a lone "@" is a parameter
])
def test_bad_port(argv: list[str], message: str) -> None:
    assert refused(*argv).startswith(message)


@pytest.mark.parametrize(("argv", "message"), [
    (["-pdu", "4095"], "-pdu 4095: must be between 4096 and 131072"),
    (["--max-pdu", "131073"], "--max-pdu 131073: must be between 4096 and 131072"),
    (["-pdu", "16k"], "-pdu 16k: invalid value, expected a decimal integer"),
    (["-pdu", "-4096"], "-pdu -4096: must be between 4096 and 131072"),
    (["-ta", "0"], "-ta 0: must be between 1 and 2147483647"),
    (["-td", "0"], "-td 0: must be between 1 and 2147483647"),  # storescp: unlimited = absent
    (["-ts", "-2"], "-ts -2: must be between -1 and 2147483647"),
    (["-ts", "2147483648"], "-ts 2147483648: must be between -1 and 2147483647"),
    (["-ta", "010"], "-ta 010: leading zero: storescp would read this as an octal number"),
    (["-ta", "0x10"], "-ta 0x10: invalid value, expected a decimal integer"),
    (["--sleep-after", "-1"], "--sleep-after -1: must be between 0"),
    (["-ll", "verbose"], "-ll verbose: invalid log level"),
    (["-aet", ""], "-aet '': the AE title must not be empty or all spaces"),
    (["-aet", "    "], "-aet '    ': the AE title must not be empty or all spaces"),
    (["-aet", "A" * 17], f"-aet {'A' * 17}: the AE title is longer than 16 characters"),
    (["-aet", "A\\B"], "-aet 'A\\B': the AE title must be printable ASCII"),
    (["-aet", "ÄRCHIV"], "-aet 'ÄRCHIV': the AE title must be printable ASCII"),
    (["-fe", "x/y"], "-fe x/y: the value is part of a file name: no '/'"),
    (["-ss", "a/b"], "-ss a/b: the value is part of a file name: no '/'"),
])
def test_invalid_value_names_the_option(argv: list[str], message: str) -> None:
    assert refused(*argv, PORT).startswith(message)


@pytest.mark.parametrize(("argv", "message"), [
    (["-aet"], "-aet: missing value (-aet/--aetitle takes a value)"),
    ([PORT, "-od"], "-od: missing value"),
    (["+tls", "key.pem"], "+tls: missing value (+tls/--enable-tls takes 2 values)"),
    (["--sleep-after"], "--sleep-after: missing value"),
])
def test_missing_value_names_the_option(argv: list[str], message: str) -> None:
    assert refused(*argv).startswith(message)


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", PORT], "--port: unknown storescp option"),
    (["-x", PORT], "-x: unknown storescp option"),
    (["--", PORT], "--: unknown storescp option (storescp has no end-of-options marker)"),
    (["--prefer-littel", PORT], "--prefer-littel: unknown storescp option (did you mean "
                                "--prefer-little?)"),
    (["--Verbose", PORT], "--Verbose: unknown storescp option"),  # matched exactly
    (["--verb", PORT], "--verb: unknown storescp option"),  # no abbreviations
])
def test_unknown_option_names_the_option(argv: list[str], message: str) -> None:
    assert refused(*argv).startswith(message)


def _dummy_values(option_values: int) -> list[str]:
    return ["1"] * option_values


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.effect.kind is Kind.UNSUPPORTED],
                         ids=lambda o: o.long)
def test_unimplemented_option_names_the_option(option: Any) -> None:
    for spelling in filter(None, (option.short, option.long)):
        message = refused(spelling, *_dummy_values(option.values), PORT)
        assert f"{spelling}" in message
        assert "not implemented yet" in message


def test_every_unimplemented_option_is_listed() -> None:
    message = refused("+uc", "-xcr", "echo", "+p", "8", "16", "--fork", "-uc", "+uc", PORT)
    assert message.splitlines() == [
        "+uc: not implemented yet (converting UN elements to the VR the data dictionary "
        "knows)",
    ]  # --fork, -xcr and +p are implemented


@pytest.mark.parametrize(("argv", "message"), [
    (["+B", "+te"], "+te: conflicts with +B (as in storescp)"),
    (["+B", "-e"], "-e: conflicts with +B (as in storescp)"),
    (["+B", "+g="], "+g=: conflicts with +B (as in storescp)"),
    (["+B", "+u"], "+u: conflicts with +B (as in storescp)"),
    (["+B", "+p", "8", "8"], "+p 8 8: conflicts with +B (as in storescp)"),
    (["+xa", "+tb"], "+tb: conflicts with +xa (as in storescp): compressed data sets cannot "
                     "be converted"),
    (["+xs", "+td"], "+td: conflicts with +xs (as in storescp)"),
    (["-F", "+p", "8", "8"], "+p 8 8: conflicts with -F (as in storescp)"),
    (["+ti", "+cl", "3"], "+cl 3: requires --write-xfer-deflated or --write-xfer-same"),
    (["+p", "7", "0"], "+p 7 0: padding lengths must be even"),
    (["+cl", "10"], "+cl 10: must be between 0 and 9"),
])
def test_output_option_conflicts(argv: list[str], message: str) -> None:
    assert message in refused(*argv, PORT)


# Not +B: storescp writes explicit lengths and recalculated group lengths when it re-encodes.
REENCODED = {"sequence_lengths": "explicit", "group_length": "recalc"}


@pytest.mark.parametrize(("argv", "tables"), [
    (["+xd", "+te"], {"negotiation": {"preferred_transfer_syntax": "deflated"},
                      "storage": {"transfer_syntax": "little-explicit", **REENCODED}}),
    (["+xi", "+tb"], {"negotiation": {"preferred_transfer_syntax": "implicit"},
                      "storage": {"transfer_syntax": "big-explicit", **REENCODED}}),
    (["+B", "-F"], {"storage": {"bit_preserving": True, "file_format": "dataset"}}),
    (["+td", "+cl", "1"], {"storage": {"transfer_syntax": "deflated", "deflate_level": 1,
                                       **REENCODED}}),
    (["-B", "+te"], {"storage": {"bit_preserving": False, "transfer_syntax": "little-explicit",
                                 **REENCODED}}),
])
def test_output_options_storescp_accepts(argv: list[str],
                                         tables: dict[str, dict[str, Any]]) -> None:
    """Combinations storescp accepts: translated to what they mean, without a warning, and
    loaded as such."""
    translation = translate([*argv, PORT])
    assert translation.data == base(**tables)
    assert translation.warnings == []
    config = config_from_mapping(tomllib.loads(translation.toml()), "<storescp>")
    for table, values in tables.items():
        for key, value in values.items():
            assert getattr(getattr(config, table), key) == value, f"{table}.{key}"


@pytest.mark.parametrize(("argv", "spelling", "why"), [
    (["-h"], "-h", "storescp would only print its help text and exit"),
    (["--help"], "--help", "storescp would only print its help text and exit"),
    (["--version"], "--version", "storescp would only print version information and exit"),
    (["--arguments"], "--arguments", "storescp logs its expanded arguments at startup"),
    (["-lc", "log.cfg"], "-lc log.cfg", "log4cplus configuration files are not supported"),
    (["--log-config", "log.cfg"], "--log-config log.cfg", "log4cplus configuration files"),
])
def test_ignored_option_warns_and_translates_the_rest(
        argv: list[str], spelling: str, why: str) -> None:
    t = translate([*argv, "-aet", "X", PORT])
    assert t.data == base(network={"aetitle": "X"})
    assert len(t.warnings) == 1
    assert t.warnings[0].startswith(f"{spelling}: ignored: {why}")


def test_repeated_ignored_option_warns_once() -> None:
    assert len(translate(["-lc", "a.cfg", "-lc", "b.cfg", PORT]).warnings) == 1


def test_log_level_off_warns() -> None:
    t = translate(["-ll", "off", PORT])
    assert t.data == base(logging={"level": "fatal"})
    assert t.warnings == ['-ll off: dicom-ingestd always logs fatal errors; logging.level = '
                          '"fatal"']


def test_log_config_allows_verbose_pc() -> None:
    # storescp checks +v against the level the log4cplus file sets; we cannot see that file.
    t = translate(["-lc", "log.cfg", "+v", PORT])
    assert t.data == base(logging={"verbose_pc": True})


@pytest.mark.parametrize(("argv", "message"), [
    (["+B", "-ss", "p"], "-ss p: conflicts with +B (as in storescp)"),
    (["-su", "p", "--bit-preserving"], "-su p: conflicts with --bit-preserving"),
    (["-sp", "+B"], "-sp: conflicts with +B"),
    (["+uf", "-tn"], "-tn: conflicts with +uf"),
    (["-ll", "debug", "-v"], "-ll debug: conflicts with -v"),
    (["-lc", "log.cfg", "-q"], "-lc log.cfg: conflicts with -q"),
    (["-lc", "log.cfg", "-ll", "info"], "-lc log.cfg: conflicts with -ll info"),
    (["+v"], "+v: only allowed with verbose mode"),
    (["-q", "+v"], "+v: only allowed with verbose mode"),
    (["+rs", "seed.bin"], "+rs seed.bin: requires --enable-tls"),
    (["--inetd", "--fork"], "--inetd: conflicts with --fork"),
    (["-xf", "storescp.cfg", "Default", "+xe"], "-xf storescp.cfg Default: conflicts with +xe"),
    (["-xf", "storescp.cfg", "Default", "-pm"], "-xf storescp.cfg Default: conflicts with -pm"),
    (["--max-associations", "4"], "--max-associations 4: requires --fork"),
    (["--single-process", "--max-associations", "4"], "--max-associations 4: requires --fork"),
    (["--fork", "--max-associations", "0"], "--max-associations 0: must be between 1 and "
                                            "2147483647"),
])
def test_storescp_conflicts_are_refused(argv: list[str], message: str) -> None:
    assert refused(*argv, PORT).splitlines()[0].startswith(message)


def test_conflicts_only_between_effective_options() -> None:
    # +B overridden by -B: no conflict with sorting, as in storescp.
    assert data_of("+B", "-B", "-sp", PORT) == base(
        storage={"bit_preserving": False, "sort": "patientname"})
    # -xf with +x= (the default choice) is allowed by storescp: only the file is looked at.
    message = refused("-xf", "/nonexistent/f.cfg", "Default", "+x=", PORT)
    assert message.splitlines() == [
        "-xf /nonexistent/f.cfg Default: /nonexistent/f.cfg: unable to open configuration "
        "file: No such file or directory"]


@pytest.mark.parametrize("argv", [
    ["+B", "-ss", "p", PORT],
    ["+uf", "-tn", PORT],
    ["+v", PORT],
    ["-ll", "debug", "-v", PORT],
    ["-lc", "log.cfg", "-q", PORT],
    ["+rs", "seed.bin", PORT],
    ["--", PORT],
    ["-td", "0", PORT],
    ["-ta", "0", PORT],
    ["-pdu", "4095", PORT],
    ["-pdu", "131073", PORT],
    ["-aet"],
    [PORT, "105"],
    ["-ll", "verbose", PORT],
    ["@/nonexistent/command-file", PORT],
])
def test_refusals_match_the_real_storescp(argv: list[str], tmp_path: Path) -> None:
    """Each of these is refused by storescp itself before it listens (checked here)."""
    with pytest.raises(TranslationError):
        translate(argv)
    result = subprocess.run([storescp(), *argv], capture_output=True, text=True, timeout=20,
                            cwd=tmp_path)
    assert result.returncode != 0
    assert "error" in (result.stdout + result.stderr).lower()


def _free_port() -> str:
    return str(free_port())


@pytest.mark.parametrize("argv", [
    ["-ts", "-1"],
    ["-tn", "-uf"],
    ["-aet", "-X"],
    ["+B", "-B", "-sp"],
    ["+tls", "key.pem", "cert.pem", "-tls", "--fork", "--single-process", "+te", "+t="],
    ["-ll", "all", "+v", "-od", ""],
])
def test_acceptances_match_the_real_storescp(argv: list[str], tmp_path: Path) -> None:
    """Each of these is accepted here, and the real storescp starts listening with it."""
    port = _free_port()
    translate([*argv, port])
    log = tmp_path / "storescp.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([storescp(), *argv, port], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        return  # still running: it accepted the command line
    finally:
        proc.kill()
        proc.wait()
    pytest.fail(f"storescp exited with {proc.returncode}:\n{log.read_text(errors='replace')}")


# --------------------------------------------------------------------------------------------
# Command files


def test_command_file_with_quotes_and_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "opts"
    path.write_text('-aet\t"MY AE"\n  -od  \'/srv/dicom in\'\r\n-fe ".d\'cm"\n\n-v\n')
    t = translate([f"@{path}", PORT])
    assert t.data == base(network={"aetitle": "MY AE"},
                          storage={"output_directory": "/srv/dicom in",
                                   "filename_extension": ".d'cm"},
                          logging={"level": "info"})
    assert t.arguments == ("-aet", "MY AE", "-od", "/srv/dicom in", "-fe", ".d'cm", "-v", PORT)
    assert t.argv == (f"@{path}", PORT)


def test_command_file_can_hold_the_port_and_mix_with_arguments(tmp_path: Path) -> None:
    path = tmp_path / "opts"
    path.write_text(f"-aet A {PORT}")
    assert data_of("-v", f"@{path}", "-aet", "B") == base(network={"aetitle": "B"},
                                                        logging={"level": "info"})


def test_command_file_option_and_value_split_across_the_boundary(tmp_path: Path) -> None:
    # Expansion happens before parsing, so an option in the file may take its value outside.
    path = tmp_path / "opts"
    path.write_text("-aet")
    assert data_of(f"@{path}", "X", PORT) == base(network={"aetitle": "X"})


@pytest.mark.parametrize(("content", "words"), [
    ("a b\tc\nd\r\ne", ["a", "b", "c", "d", "e"]),
    ('"a b" \'c d\'', ["a b", "c d"]),
    ('""', [""]),  # a quoted empty argument
    ('"a"b', ["a", "b"]),  # a closing quote ends the argument
    ('a"b c"', ["ab c"]),  # an opening quote continues it
    ('"it\'s" \'say "hi"\'', ["it's", 'say "hi"']),
    ('"unclosed value', ["unclosed value"]),
    ("", []),
    ("  \n\t ", []),
    ("back\\slash", ["back\\slash"]),  # no escapes
])
def test_command_file_splitting(content: str, words: list[str]) -> None:
    assert split_command_file(content) == words


def test_empty_quoted_value_in_command_file(tmp_path: Path) -> None:
    path = tmp_path / "opts"
    path.write_text("-od ''")
    assert data_of(f"@{path}", PORT) == base()  # storescp turns "" into "."


def test_nested_command_file_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.write_text("-v")
    outer = tmp_path / "outer"
    outer.write_text(f"-aet X @{inner}")
    message = refused(f"@{outer}", PORT)
    assert message == (f"@{inner} (from @{outer}): a command file cannot name another "
                       "command file")


def test_at_sign_value_in_command_file_is_literal(tmp_path: Path) -> None:
    # storescp expands only the command line's own arguments; a value is never a file.
    path = tmp_path / "opts"
    path.write_text("-aet @ARCHIVE")
    assert data_of(f"@{path}", PORT) == base(network={"aetitle": "@ARCHIVE"})


def test_errors_in_command_files_say_where(tmp_path: Path) -> None:
    path = tmp_path / "opts"
    path.write_text("-pdu 100 --bogus")
    assert refused(f"@{path}", PORT) == f"--bogus (from @{path}): unknown storescp option"
    path.write_text("-pdu 100")
    assert refused(f"@{path}", PORT) == (f"-pdu 100 (from @{path}): must be between 4096 "
                                         "and 131072")


def test_unreadable_command_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert refused(f"@{missing}", PORT) == (f"@{missing}: cannot read command file: "
                                            "No such file or directory")
    bad = tmp_path / "latin1"
    bad.write_bytes(b"-aet \xc4RCHIV")
    assert refused(f"@{bad}", PORT).startswith(f"@{bad}: command file is not UTF-8")


# --------------------------------------------------------------------------------------------
# TOML output


def test_toml_header_and_body() -> None:
    t = translate(["--arguments", "-aet", "MY AE", PORT])
    text = t.toml()
    lines = text.splitlines()
    assert lines[0] == f"# translated from: storescp --arguments -aet 'MY AE' {PORT}"
    assert lines[1].startswith("# warning: --arguments: ignored: ")
    assert lines[2] == ""
    assert tomllib.loads(text) == t.data


def test_toml_header_shows_expansion_and_cannot_be_broken_by_newlines(tmp_path: Path) -> None:
    path = tmp_path / "opts"
    path.write_text('-fe ".d\ncm" --version')
    text = translate([f"@{path}", PORT]).toml()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == [
        f"# translated from: storescp @{path} {PORT}",
        f"# after @file expansion: -fe '.d\\ncm' --version {PORT}",
        "# warning: --version (from @" + str(path) + "): ignored: storescp would only print "
        "version information and exit; the rest of the command line is translated",
    ]
    assert tomllib.loads(text)["storage"]["filename_extension"] == ".d\ncm"


def test_data_follows_schema_order() -> None:
    t = translate(["-v", "-fe", ".dcm", "-od", "/x", "-aet", "A", "-dhl", PORT])
    order = [f"{table}.{key}" for table, keys in t.data.items() for key in keys]
    schema_order = list(SCHEMA_KEYS)
    assert order == sorted(order, key=schema_order.index)


REALISTIC = [
    [PORT],
    ["-v", "-od", "/var/lib/dicom", "-aet", "ARCHIVE", "104"],
    ["--verbose", "--verbose-pc", "--accept-all", "--output-directory", "/srv/in",
     "--sort-on-study-uid", "ST", "--filename-extension", ".dcm", "11112"],
    ["-d", "-pm", "+xs", "-dhl", "-pdu", "131072", "-ta", "10", "-td", "60", "-ts", "-1", "104"],
    ["-q", "+B", "-uf", "-i0", "--inetd"],
    ["-ll", "info", "+v", "-tn", "-fe", ".dcm", "-ss", "CT", "-up", "--reject", "4242"],
    ["--ignore", "--sleep-after", "1", "--sleep-during", "2", "--abort-after", "--refuse", "104"],
    ["-lc", "/etc/storescp.log.cfg", "-sp", "+uf", "-i6", "--single-process", "-ac", "-tls",
     "+t=", "-B", "--arguments", "104"],
    ["--help", "+xi", "-aet", "-DASH-", "104"],
]


@pytest.mark.parametrize("argv", REALISTIC, ids=" ".join)
def test_round_trip_through_the_loader(argv: list[str]) -> None:
    from dicom_ingestd.config.load import config_from_mapping

    t = translate(argv)
    config = config_from_mapping(tomllib.loads(t.toml()), "<storescp>")
    for table, values in t.data.items():
        for key, value in values.items():
            assert getattr(getattr(config, table), key) == value, f"{table}.{key}"


def test_translation_is_a_plain_dataclass() -> None:
    t = Translation({"network": {"port": 104}}, ["w"])
    assert t.toml().startswith("# translated from: storescp\n# warning: w\n\n[network]")


# --------------------------------------------------------------------------------------------
# The table itself


def _help_options() -> dict[str, tuple[str, int]]:
    """{long option: (short option or "", number of values)} from `storescp --help`."""
    result = subprocess.run([storescp(), "--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    options: dict[str, tuple[str, int]] = {}
    # "  -pdu  --max-pdu  [n]umber of bytes: integer (4096..131072)" or "  --version  print...".
    # A value is announced by "[x]name" placeholders: one per value ("[f]ilename, [p]rofile").
    line_re = re.compile(r"^\s+(?:(?P<short>[+-]\S+)\s+)?(?P<long>--[a-z0-9][a-z0-9-]*)"
                         r"(?:\s+(?P<rest>.*))?$")
    for line in result.stdout.splitlines():
        match = line_re.match(line)
        if match is None:
            continue
        rest = match["rest"] or ""
        values = len(re.findall(r"\[[a-z]\][a-z]", rest)) if rest.startswith("[") else 0
        options[match["long"]] = (match["short"] or "", values)
    assert len(options) > 100, result.stdout  # the parse found the option list
    return options


def test_table_covers_every_option_of_the_installed_storescp() -> None:
    missing, wrong = [], []
    for long, (short, values) in _help_options().items():
        option = find_option(long)
        if option is None:
            missing.append(f"{short} {long}".strip())
        elif (option.short, option.values) != (short, values):
            wrong.append(f"{long}: table has ({option.short!r}, {option.values}), storescp "
                         f"--help says ({short!r}, {values})")
    assert missing == []
    assert wrong == []


@pytest.mark.parametrize(("long", "short", "values"), [
    ("--ipv4", "-i4", 0), ("--ipv6", "-i6", 0), ("--ip-auto", "-i0", 0),
    ("--max-associations", "", 1),
])
def test_table_covers_the_storescp_3_7_options(long: str, short: str, values: int) -> None:
    option = find_option(long)
    assert option is not None
    assert (option.short, option.values, option.since) == (short, values, "3.7.0")
    if short:
        assert find_option(short) is option


def test_spellings_are_unique() -> None:
    spellings = [s for o in OPTIONS for s in (o.long, o.short) if s]
    assert len(spellings) == len(set(spellings))


# Flags the schema already declares keys for, but which the translator still refuses until
# their feature is done; remove them here when their row sets the key.
PENDING: set[str] = set()


def test_every_storescp_flag_in_the_schema_sets_its_key() -> None:
    for key, f in SCHEMA_KEYS.items():
        for flag in f.metadata[schema.STORESCP]:
            if flag == "port":
                continue  # the parameter, not an option
            option = find_option(flag)
            assert option is not None, f"{key}: {flag} missing from the table"
            if flag in PENDING:
                assert option.effect.kind is Kind.UNSUPPORTED, f"{flag} is no longer pending"
                continue
            assert option.effect.kind is Kind.SET, f"{key}: {flag} is not translated"
            assert key in option.effect.keys, f"{flag} does not set {key}"


def test_setters_only_set_schema_keys() -> None:
    known = set(SCHEMA_KEYS)
    for option in OPTIONS:
        assert set(option.effect.keys) <= known, option.name
        if option.effect.kind is Kind.SET:
            assert option.effect.setter is not None
        else:
            assert option.effect.reason, option.name


def test_implemented_ignored_and_unimplemented_summary() -> None:
    """The decisions of the brief, pinned: a change to the table must be deliberate."""
    by_kind: dict[Kind, set[str]] = {kind: set() for kind in Kind}
    for option in OPTIONS:
        by_kind[option.effect.kind].add(option.short or option.long)
    assert by_kind[Kind.IGNORED] == {"-h", "--version", "--arguments", "-lc", "+rs", "+ws",
                                     "+wf", "+ps", "+cc", "+ph"}
    assert "+uc" in by_kind[Kind.UNSUPPORTED]
    # TLS: what is left out, on purpose (3DES, unencrypted, 3.7's SNI and modified profile).
    assert by_kind[Kind.UNSUPPORTED] & {o.short or o.long for o in OPTIONS
                                        if o.long.startswith(("--profile", "--expect-sni"))} \
        == {"+pb", "+pn", "+pm", "--expect-sni"}
    for flag in ("-xf", "-tls", "-B", "+t=", "-ac", "+ac", "--single-process", "--fork",
                 "--max-associations", "+F", "-p", "-xcr", "-xcs", "-rns", "-tos", "-xs",
                 "-F", "+te", "+tb", "+ti", "+td", "+cl", "+u", "-u", "+g=", "+g", "-g",
                 "+e", "-e", "+p", "-uc",
                 "+tls", "+pw", "-pw", "-pem", "-der", "+cf", "+cd", "+crl", "+crv", "+cra",
                 "+py", "+px", "+pz", "+pg", "+pa", "+cs", "+dp", "-rc", "-vc", "-ic"):
        assert flag in by_kind[Kind.SET], flag


@pytest.mark.parametrize(("argv", "expected"), [
    (["-su", "S", "-xcr", "echo #f", PORT],
     {"exec_on_reception": ["echo #f"], "shell": True}),
    (["-ss", "S", "-xcs", "run #p", "-rns", "-tos", "30", "-xs", PORT],
     {"exec_on_eostudy": ["run #p"], "shell": True, "rename_on_eostudy": True,
      "eostudy_timeout": 30, "exec_sync": True}),
    (["-sp", "-rns", PORT], {"rename_on_eostudy": True, "eostudy_timeout": 0}),
])
def test_event_options(argv: list[str], expected: dict[str, object]) -> None:
    data = translate(argv).data
    for key, value in expected.items():
        assert data["events"][key] == value, key
    assert data["jobs"] == {"timeout": 0, "retries": 0}  # storescp: once, no time limit


@pytest.mark.parametrize(("argv", "message"), [
    (["-xcs", "x", PORT], "-xcs x: requires --sort-conc-studies, --sort-on-study-uid or "
     "--sort-on-patientname (as in storescp)"),
    (["-rns", PORT], "-rns: requires --sort-conc-studies"),
    (["-tos", "5", PORT], "-tos 5: requires a --sort option"),
    (["-su", "S", "-rns", "--inetd"], "-rns: conflicts with --inetd"),
])
def test_event_option_dependencies(argv: list[str], message: str) -> None:
    assert message in refused(*argv)


def test_eostudy_timeout_zero_means_one_second_here() -> None:
    t = translate(["-su", "S", "-tos", "0", PORT])
    assert t.data["events"]["eostudy_timeout"] == 1
    assert any("closes 1 s after" in w for w in t.warnings)


def test_no_event_options_no_event_keys() -> None:
    data = translate(["-od", "/tmp", PORT]).data
    assert "events" not in data and "jobs" not in data



# --------------------------------------------------------------------------------------------
# +ac: TCP wrapper tables (hosts_access(5)) become [access]

Tables = Callable[..., Path]


@pytest.fixture
def tables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Tables:
    """tables(allow=..., deny=...) writes hosts.allow / hosts.deny (None: no file)."""
    directory = tmp_path / "etc"
    directory.mkdir()
    monkeypatch.setenv(HOSTS_DIR_ENV, str(directory))

    def write(allow: str | None = None, deny: str | None = None) -> Path:
        for name, text in (("hosts.allow", allow), ("hosts.deny", deny)):
            if text is not None:
                (directory / name).write_text(text)
        return directory

    return write


def access_of(*argv: str) -> dict[str, list[str]]:
    access: dict[str, list[str]] = translate(["+ac", *argv, PORT]).data["access"]
    return access


def read_warning(directory: Path) -> str:
    return (f"+ac: [access] was computed from {directory}/hosts.allow and {directory}/hosts.deny"
            " as they were at translation time; storescp reads them at every connection: "
            "after editing them, translate again or edit [access]")


def test_access_control_deny_all_allow_some(tables: Tables) -> None:
    directory = tables(allow="storescp: 10.0.0.0/8\n", deny="ALL: ALL\n")
    t = translate(["+ac", PORT])
    assert t.data == base(access={"allow": ["10.0.0.0/8"], "deny": []})
    assert t.warnings == [read_warning(directory)]
    assert translate(["--access-control", PORT]).data == t.data


def test_access_control_deny_one_host(tables: Tables) -> None:
    tables(deny="storescp: 192.168.1.5\n")  # no hosts.allow at all
    assert access_of() == {"allow": [], "deny": ["192.168.1.5/32"]}


def test_access_control_without_tables_grants_everyone(tables: Tables) -> None:
    directory = tables()
    t = translate(["+ac", PORT])
    assert t.data == base(access={"allow": [], "deny": []})  # explicit: +ac was given
    assert t.warnings == [read_warning(directory)]


def test_access_control_deny_everyone(tables: Tables) -> None:
    tables(deny="ALL: ALL\n")
    assert access_of() == {"allow": [], "deny": ["0.0.0.0/0", "::/0"]}


@pytest.mark.parametrize(("pattern", "networks"), [
    ("ALL", ["0.0.0.0/0", "::/0"]),
    ("all", ["0.0.0.0/0", "::/0"]),  # case-insensitive, as in libwrap
    ("192.168.1.5", ["192.168.1.5/32"]),
    ("0.0.0.0", ["0.0.0.0/32"]),
    ("10.0.0.0/255.0.0.0", ["10.0.0.0/8"]),
    ("131.155.72.0/255.255.254.0", ["131.155.72.0/23"]),  # hosts_access(5)'s example
    ("0.0.0.0/0.0.0.0", ["0.0.0.0/0"]),
    ("192.168.1.0/24", ["192.168.1.0/24"]),
    ("10.0.0.0/08", ["10.0.0.0/8"]),  # libwrap reads the length in decimal
    ("192.168.1.5/32", ["192.168.1.5/32"]),
    ("10.", ["10.0.0.0/8"]),
    ("192.168.", ["192.168.0.0/16"]),
    ("192.168.1.", ["192.168.1.0/24"]),
    ("0.", ["0.0.0.0/8"]),
    ("[::1]", ["::1/128"]),
    ("[2001:DB8:0::1]", ["2001:db8::1/128"]),  # libwrap compares addresses, not text
    ("[2001:db8::]/32", ["2001:db8::/32"]),
    ("[::]/0", ["::/0"]),
    ("[fe80::1]", ["fe80::1/128"]),
    ("10.1.0.0/16, 10.0.0.0/8 10.2.3.4", ["10.0.0.0/8"]),  # merged
    ("192.168.1.0/25,192.168.1.128/25", ["192.168.1.0/24"]),
    ("[2001:db8::1] 10.0.0.1", ["10.0.0.1/32", "2001:db8::1/128"]),  # IPv4 first
])
def test_access_control_client_forms(tables: Tables, pattern: str, networks: list[str]) -> None:
    tables(deny=f"storescp: {pattern}\n")
    assert access_of() == {"allow": [], "deny": networks}


@pytest.mark.parametrize(("daemons", "applies"), [
    ("storescp", True),
    ("STORESCP", True),
    ("ALL", True),
    ("sshd, storescp", True),
    ("sshd storescp", True),
    ("stores*", True),  # Debian's wildcards, in daemon lists too
    ("s?orescp", True),
    ("KNOWN", True),
    ("ALL EXCEPT sshd", True),
    ("ALL EXCEPT sshd EXCEPT storescp", True),  # ALL EXCEPT (sshd EXCEPT storescp)
    ("dicom-ingestd", True),  # taken as storescp
    ("sshd", False),
    ("storescpd", False),
    ("stores.", False),  # a prefix pattern; "storescp" has no dot
    (".scp", False),  # a suffix pattern includes the dot
    ("ALL EXCEPT storescp", False),
    ("ALL EXCEPT sshd, dicom-ingestd", False),
    ("sshd@10.0.0.1", False),  # another daemon: its server address does not matter
    ("", False),
    ("104", False),  # a port number is compared with the daemon name
])
def test_access_control_daemon_lists(tables: Tables, daemons: str, applies: bool) -> None:
    tables(deny=f"{daemons}: 10.0.0.1\n")
    assert access_of() == {"allow": [], "deny": ["10.0.0.1/32"] if applies else []}


def test_access_control_rules_for_other_daemons_are_not_checked(tables: Tables) -> None:
    tables(allow="sshd: .example.com KNOWN : spawn echo %h\n",
           deny="ALL EXCEPT storescp: PARANOID\nsshd: ALL\nstorescp: 10.0.0.1\n")
    assert access_of() == {"allow": [], "deny": ["10.0.0.1/32"]}


def test_access_control_comments_blank_lines_and_continuations(tables: Tables) -> None:
    tables(deny="# storescp: 10.0.0.1\n"
                "\n"
                "   \t\n"
                "storescp: 10.0.0.2,\\\n"
                "   10.0.0.3\\\n"
                ", 10.0.0.4\r\n"
                "# a comment continued \\\n"
                "storescp: 10.0.0.5\n"
                "storescp: 10.0.0.6")  # the last line needs no line end
    assert access_of() == {"allow": [], "deny": ["10.0.0.2/31", "10.0.0.4/32", "10.0.0.6/32"]}


def test_access_control_continuation_joins_without_a_space(tables: Tables) -> None:
    tables(deny="storescp: 10.0.0.1\\\n10.0.0.2\n")  # one pattern: 10.0.0.110.0.0.2
    message = refused("+ac", PORT)
    assert "lines 1-2 'storescp: 10.0.0.110.0.0.2'" in message
    assert "'10.0.0.110.0.0.2' is not an IPv4 address" in message


def test_access_control_line_without_colon_is_ignored_with_a_warning(tables: Tables) -> None:
    directory = tables(deny="storescp 10.0.0.1\nstorescp: 10.0.0.2\n")
    t = translate(["+ac", PORT])
    assert t.data["access"] == {"allow": [], "deny": ["10.0.0.2/32"]}
    assert t.warnings[1:] == [
        f"+ac: {directory}/hosts.deny line 1 'storescp 10.0.0.1': no ':' separator: "
        "tcp_wrappers ignores this line, and so does the translation",
    ]


def test_access_control_backslash_before_crlf_continues_nothing(tables: Tables) -> None:
    # libwrap joins lines at backslash-LF only: here the backslash is a pattern of its own
    # and the next line a line without ':'.
    directory = tables(deny="storescp: 10.0.0.2 \\\r\n10.0.0.3\n")
    assert refused("+ac", PORT) == (
        f"+ac: {directory}/hosts.deny line 1 'storescp: 10.0.0.2 \\\\': host name '\\\\' "
        "cannot be translated: dicom-ingestd decides on the peer address alone and never "
        "looks up names; write addresses or networks")


def test_access_control_empty_client_list_warns(tables: Tables) -> None:
    directory = tables(deny="storescp:\nstorescp: ,\n")
    t = translate(["+ac", PORT])
    assert t.data["access"] == {"allow": [], "deny": []}
    assert t.warnings[1:] == [
        f"+ac: {directory}/hosts.deny line 1 'storescp:': no client list: the rule matches no "
        "client, in tcp_wrappers as here",
        f"+ac: {directory}/hosts.deny line 2 'storescp: ,': no client list: the rule matches "
        "no client, in tcp_wrappers as here",
    ]


def test_access_control_empty_third_field_is_no_command(tables: Tables) -> None:
    tables(deny="storescp: 10.0.0.1:\nstorescp: 10.0.0.2 : \n")
    assert access_of() == {"allow": [], "deny": ["10.0.0.1/32", "10.0.0.2/32"]}


@pytest.mark.parametrize(("allow", "deny", "expected"), [
    # hosts_access: allow wins.  [access]: deny wins, so the granted hole is cut out of deny.
    ("ALL: 10.1.0.0/16\n", "storescp: 10.0.0.0/8\n",
     {"allow": [], "deny": ["10.0.0.0/16", "10.2.0.0/15", "10.4.0.0/14", "10.8.0.0/13",
                            "10.16.0.0/12", "10.32.0.0/11", "10.64.0.0/10", "10.128.0.0/9"]}),
    ("storescp: 10.0.0.0/8\n", "storescp: 10.1.2.3\n", {"allow": [], "deny": []}),
    ("storescp: 192.168.1.5\n", "storescp: 192.168.1.4/255.255.255.254\n",
     {"allow": [], "deny": ["192.168.1.4/32"]}),
    # Everything denied: the allow list itself, shorter than the complement.
    ("storescp: 10.0.0.0/8 [fd00::]/8\n", "ALL: ALL\n",
     {"allow": ["10.0.0.0/8", "fd00::/8"], "deny": []}),
    # All of IPv4 denied, IPv6 not mentioned: IPv6 peers stay allowed.
    ("storescp: 10.0.0.0/8\n", "storescp: 0.0.0.0/0.0.0.0\n",
     {"allow": ["10.0.0.0/8", "::/0"], "deny": []}),
    ("storescp: ALL\n", "ALL: ALL\n", {"allow": [], "deny": []}),
    ("", "storescp: 0.0.0.0/0.0.0.0\n", {"allow": [], "deny": ["0.0.0.0/0"]}),
])
def test_access_control_allow_and_deny_combined(
        tables: Tables, allow: str, deny: str, expected: dict[str, list[str]]) -> None:
    tables(allow=allow, deny=deny)
    assert access_of() == expected


def test_access_control_explains_cut_out_networks(tables: Tables) -> None:
    directory = tables(allow="ALL: 10.1.0.0/16\n", deny="storescp: 10.0.0.0/8\n")
    assert translate(["+ac", PORT]).warnings[1:] == [
        f"+ac: the networks {directory}/hosts.allow grants inside networks "
        f"{directory}/hosts.deny refuses were cut out of access.deny (in hosts_access an allow "
        "rule wins, in [access] deny wins)"]


def test_access_control_allow_rules_alone_have_no_effect(tables: Tables) -> None:
    directory = tables(allow="storescp: 10.0.0.0/8\n", deny="sshd: ALL\n")
    t = translate(["+ac", PORT])
    assert t.data["access"] == {"allow": [], "deny": []}
    assert t.warnings[1:] == [
        f"+ac: the {directory}/hosts.allow rules for storescp have no effect without a "
        f"{directory}/hosts.deny rule for it: everyone may connect, as with storescp"]


@pytest.mark.parametrize(("rule", "problem"), [
    ("storescp: host.example.com", "host name 'host.example.com' cannot be translated: "
     "dicom-ingestd decides on the peer address alone and never looks up names; write "
     "addresses or networks"),
    ("storescp: .example.com", "domain pattern '.example.com' cannot be translated"),
    ("storescp: ALL EXCEPT 10.0.0.1", "EXCEPT in a client list cannot be translated"),
    ("storescp: 10.0.0.0/8 except 10.0.0.1", "EXCEPT in a client list cannot be translated"),
    ("storescp: KNOWN", "the KNOWN wildcard cannot be translated: it depends on the client's "
     "host name"),
    ("storescp: unknown", "the UNKNOWN wildcard cannot be translated"),
    ("storescp: PARANOID", "the PARANOID wildcard cannot be translated"),
    ("storescp: LOCAL", "the LOCAL wildcard cannot be translated"),
    ("storescp: 192.168.1.*", "wildcard pattern '192.168.1.*' (* and ?) cannot be translated"),
    ("storescp: 10.0.0.?", "wildcard pattern '10.0.0.?'"),
    ("storescp: @trusted", "NIS netgroup '@trusted' cannot be translated"),
    ("storescp: joe@10.0.0.1", "user pattern 'joe@10.0.0.1' (user@host) cannot be translated"),
    ("storescp: /etc/dicom.hosts", "pattern file '/etc/dicom.hosts' cannot be translated"),
    ("storescp: 10.0.0.1: spawn (echo %a) &", "'spawn (echo %a) &' after a second ':' (a "
     "shell command or a hosts_options(5) option) cannot be translated"),
    ("storescp: 10.0.0.1: DENY", "'DENY' after a second ':'"),
    ("storescp: fd00::1", "IPv6 address 'fd00::1' without brackets: tcp_wrappers splits the "
     "rule at its first ':' and never matches it; write [fd00::1]"),
    ("storescp: fd00::/8", "IPv6 address 'fd00::/8' without brackets: tcp_wrappers splits the "
     "rule at its first ':' and never matches it; write [fd00::]/8"),
    ("storescp@10.0.0.1: 10.0.0.2", "server endpoint pattern 'storescp@10.0.0.1' "
     "(daemon@host) cannot be translated"),
    ("  # storescp: ALL", "'#' starts a comment only in the first column of a line: "
     "tcp_wrappers reads this line as a rule for storescp"),
    ("storescp: 10.0.0.1 # office", "'#': '#' starts a comment only in the first column"),
    ("storescp: 192.168.1.5/24", "'192.168.1.5/24' has host bits set (tcp_wrappers warns "
     "\"host bits not all zero\" and, for IPv4, matches nothing with it); write "
     "192.168.1.0/24"),
    ("storescp: 192.168.1.5/255.255.255.0", "has host bits set"),
    ("storescp: [2001:db8::1]/64", "has host bits set (tcp_wrappers warns \"host bits not all "
     "zero\" and, for IPv4, matches nothing with it); write [2001:db8::]/64"),
    ("storescp: 10.0.0.1/255.255.255.255", "tcp_wrappers takes 255.255.255.255 for an invalid "
     "mask and matches nothing with it; write 10.0.0.1 alone"),
    ("storescp: 10.0.0.0/255.0.255.0", "the netmask 255.0.255.0 is not contiguous"),
    # libwrap splits this at the mask's first ':' and fails on the rest as an option.
    ("storescp: [2001:db8::]/ffff:ffff::", "'ffff::' after a second ':'"),
    ("storescp: 0.0.0.0/0", "tcp_wrappers matches nothing with prefix length 0"),
    ("storescp: 10.0.0.0/33", "'33' is neither a netmask nor a prefix length 1-32"),
    ("storescp: [::]/129", "'129' is not a prefix length 0-128"),
    ("storescp: [::]/x", "'x' is not a prefix length 0-128"),
    ("storescp: 10.0.0.0/8/8", "'8/8' is neither a netmask nor a prefix length"),
    ("storescp: 010.0.0.1", "'010.0.0.1' is not an IPv4 address (four numbers 0-255 without "
     "leading zeros)"),
    ("storescp: 10.0.0.256", "'10.0.0.256' is not an IPv4 address"),
    ("storescp: 10", "'10' is not an IPv4 address"),
    ("storescp: 10.0.0.1.", "an address prefix is one to three numbers 0-255"),
    ("storescp: 192.168.001.", "an address prefix is one to three numbers 0-255"),
    ("storescp: 10..", "an address prefix is one to three numbers 0-255"),
    ("storescp: [10.0.0.1]", "'[10.0.0.1]' is not an IPv6 address in brackets"),
    ("storescp: [fe80::1%eth0]", "is not an IPv6 address in brackets"),
    ("storescp: [::ffff:10.0.0.1]", "tcp_wrappers never matches an IPv4-mapped address; write "
     "the IPv4 address or network"),
    ("storescp: [::ffff:10.0.0.0]/104", "tcp_wrappers never matches an IPv4-mapped address"),
])
def test_access_control_untranslatable_rule(tables: Tables, rule: str, problem: str) -> None:
    directory = tables(allow=f"# comment\n{rule}\n")
    message = refused("+ac", PORT)
    assert message.startswith(f"+ac: {directory}/hosts.allow line 2 {rule!r}: "), message
    assert problem in message
    assert len(message.splitlines()) == 1


def test_access_control_lists_every_untranslatable_rule_and_pattern(tables: Tables) -> None:
    directory = tables(allow="storescp: a.example.com 10.0.0.1 LOCAL\n",
                       deny="ALL: ALL\nstorescp: 10.0.0.0/8 : twist /bin/false\n")
    lines = refused("-pdu", "1", "+ac", PORT).splitlines()
    assert lines[0].startswith("-pdu 1: must be between 4096")
    assert lines[1] == (
        f"+ac: {directory}/hosts.allow line 1 'storescp: a.example.com 10.0.0.1 LOCAL': host "
        "name 'a.example.com' cannot be translated: dicom-ingestd decides on the peer address "
        "alone and never looks up names; write addresses or networks; the LOCAL wildcard "
        "cannot be translated: it depends on the client's host name; dicom-ingestd decides "
        "on the peer address alone and never looks up names")
    assert lines[2].startswith(f"+ac: {directory}/hosts.deny line 2 'storescp: 10.0.0.0/8 : "
                               "twist /bin/false': 'twist /bin/false' after a second ':'")
    assert len(lines) == 3


def test_access_control_unreadable_table(tables: Tables) -> None:
    directory = tables()
    (directory / "hosts.deny").mkdir()
    assert refused("+ac", PORT) == (f"+ac: cannot read {directory}/hosts.deny: Is a directory")


def test_access_control_overridden_reads_no_table(tables: Tables) -> None:
    directory = tables()
    (directory / "hosts.deny").mkdir()  # reading it would fail
    assert data_of("+ac", "-ac", PORT) == base()
    assert data_of("--access-control", "--access-full", PORT) == base()


def test_access_control_with_inetd(tables: Tables) -> None:
    # The daemon checks [access] on the inetd / Accept=yes connection too, as storescp does.
    tables(deny="storescp: 10.0.0.1\n")
    assert translate(["+ac", "--inetd"]).data["access"] == {"allow": [],
                                                           "deny": ["10.0.0.1/32"]}
    tables(deny="sshd: ALL\n")
    assert translate(["+ac", "--inetd"]).data["access"] == {"allow": [], "deny": []}


def test_access_control_round_trip_through_the_loader(tables: Tables) -> None:
    from dicom_ingestd.config.load import config_from_mapping

    tables(allow="storescp: 10.0.0.0/8, [fd00::]/8\n", deny="ALL: ALL\n")
    t = translate(["+ac", PORT])
    config = config_from_mapping(tomllib.loads(t.toml()), "<storescp>")
    assert config.access.allow == ["10.0.0.0/8", "fd00::/8"]
    assert config.access.deny == []


# The real arbiter: libwrap's hosts_access, which storescp +ac calls for every connection (as
# daemon "storescp", with the client's numeric address and, with -dhl, host name "unknown").
# libwrap reads the tables named by its hosts_allow_table / hosts_deny_table variables; each
# check runs in a fresh interpreter, since libwrap keeps state between calls.
_LIBWRAP_ORACLE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
names = [ctypes.create_string_buffer(arg.encode()) for arg in sys.argv[2:4]]
for variable, name in zip(("hosts_allow_table", "hosts_deny_table"), names):
    ctypes.c_void_p.in_dll(lib, variable).value = ctypes.addressof(name)
lib.hosts_ctl.argtypes = [ctypes.c_char_p] * 4
for address in sys.argv[4:]:
    print(lib.hosts_ctl(b"storescp", b"unknown", address.encode(), b"unknown"))
"""

# Not 255.255.255.255, which no TCP peer has: libwrap's net/mask patterns never match it.
PEERS = [
    "10.0.0.1", "10.0.0.2", "10.1.2.3", "10.200.0.1", "11.0.0.1", "127.0.0.1", "172.16.5.4",
    "172.32.0.1", "192.168.1.4", "192.168.1.5", "192.168.2.5", "8.8.8.8", "0.0.0.0", "::1",
    "2001:db8::1", "2001:db8:1::5", "2001:db9::1", "fe80::1", "fd00::1", "::ffff:10.1.2.3",
    "::ffff:8.8.8.8",
]


def _libwrap() -> str:
    name = ctypes.util.find_library("wrap")
    if name is None:
        pytest.fail("libwrap (TCP wrappers) is not installed; storescp +ac is built on it")
    return name


@pytest.mark.parametrize(("allow", "deny"), [
    ("storescp: 10.0.0.0/8\n", "ALL: ALL\n"),
    ("", "storescp: 192.168.1.5\n"),
    ("ALL: 10.1.0.0/16, [2001:db8:1::]/48\n", "storescp: 10.0.0.0/8 [2001:db8::]/32\n"),
    ("storescp: 192.168.1.\n", "ALL: 0.0.0.0/0.0.0.0\n"),
    ("", "ALL EXCEPT sshd: 172.16.0.0/255.240.0.0, 10.\n"),
    ("stores*: [::1]\n", "KNOWN: [::]/0\n"),
    ("# storescp: ALL\n", "storescp: 10.0.0.1,\\\n 10.0.0.2\n\n# x\nsshd: ALL\n"),
    ("storescp: 0.0.0.0/0.0.0.0 [::]/0\n", "ALL: ALL\n"),
    ("", "ALL: ALL\n"),
    ("storescp: 10.0.0.0/8\n", ""),
    ("storescp: 192.168.1.5\n", "storescp: 192.168.1.4/255.255.255.254, 127.\n"),
    ("ALL EXCEPT storescp: ALL\n", "storescp: [fd00::]/8 [fe80::1] 8.8.8.8 0.0.0.0\n"),
    ("storescp: 10.0.0.0/255.0.0.0\n", "STORESCP: 0.\nstorescp:10.0.0.0/9\r\n"),
], ids=lambda text: text.replace("\n", "|"))
def test_access_control_agrees_with_libwrap(tables: Tables, allow: str, deny: str) -> None:
    directory = tables(allow=allow, deny=deny)
    access = translate(["+ac", PORT]).data["access"]
    policy = AccessPolicy(access["allow"], access["deny"])
    result = subprocess.run(
        [sys.executable, "-I", "-c", _LIBWRAP_ORACLE, _libwrap(), str(directory / "hosts.allow"),
         str(directory / "hosts.deny"), *PEERS],
        capture_output=True, text=True, timeout=20, cwd=directory, check=True)
    libwrap = dict(zip(PEERS, (line == "1" for line in result.stdout.split()), strict=True))
    ours = {peer: policy.check(peer) is None for peer in PEERS}
    assert ours == libwrap, access


# -- TLS ---------------------------------------------------------------------------------------
TLS = ["+tls", "/etc/dicom/key.pem", "/etc/dicom/cert.pem", "+cf", "/etc/dicom/ca.pem"]


def tls_of(*argv: str) -> dict[str, Any]:
    return dict(data_of(*TLS, *argv, PORT)["tls"])


@pytest.mark.parametrize(("argv", "expected"), [
    ([], {}),
    (["-der"], {"file_format": "der"}),
    (["-der", "-pem"], {"file_format": "pem"}),
    (["+cf", "/ca2.pem", "+cd", "/etc/ssl/dicom"],
     {"ca_files": ["/etc/dicom/ca.pem", "/ca2.pem"], "ca_directories": ["/etc/ssl/dicom"]}),
    (["+crl", "/a.crl", "+crl", "/b.crl", "+cra"],
     {"crl_files": ["/a.crl", "/b.crl"], "crl_check": "chain"}),
    (["+crv"], {"crl_check": "leaf"}),
    (["+px"], {"profile": "bcp195"}), (["+pz"], {"profile": "bcp195-ex"}),
    (["+pg"], {"profile": "rfc8996"}), (["+pa"], {"profile": "aes"}),
    (["+py"], {"profile": "bcp195-nd"}),
    (["+cs", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "+cs", "ECDHE-RSA-CHACHA20-POLY1305"],
     {"cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                        "ECDHE-RSA-CHACHA20-POLY1305"]}),
    (["+dp", "/etc/dicom/dh.pem"], {"dh_parameters": "/etc/dicom/dh.pem"}),
    (["-vc"], {"peer_certificate": "verify"}), (["-ic"], {"peer_certificate": "ignore"}),
    (["-rc"], {"peer_certificate": "require"}),
    (["-pw"], {"key_password_file": ""}),
])
def test_tls_options(argv: list[str], expected: dict[str, Any]) -> None:
    assert tls_of(*argv) == {"enabled": True, "private_key": "/etc/dicom/key.pem",
                             "certificate": "/etc/dicom/cert.pem",
                             "ca_files": ["/etc/dicom/ca.pem"], **expected}


def test_tls_password_is_never_written() -> None:
    translation = translate([*TLS, "+pw", "s3cret", PORT])
    text = translation.toml()
    assert "s3cret" not in text and "s3cret" not in "\n".join(translation.warnings)
    assert "+pw HIDDEN: the password is not copied into this file" in text
    assert "key_password_file" not in translation.data["tls"]
    assert "s3cret" not in refused("+pw", "s3cret", PORT)  # refused without +tls


@pytest.mark.parametrize(("argv", "why"), [
    (["+ps"], "prompting for the key password on a terminal is meaningless for a daemon"),
    (["+rs", "/seed", "+ws"], "no effect with a modern OpenSSL"),
    (["+rs", "/seed", "+wf", "/seed2"], "no effect with a modern OpenSSL"),
    (["+cc"], "storescp would only print its cipher suites and exit"),
])
def test_tls_options_without_effect_warn(argv: list[str], why: str) -> None:
    translation = translate([*TLS, *argv, PORT])
    assert any(why in warning for warning in translation.warnings), translation.warnings
    assert translation.data["tls"]["enabled"] is True


@pytest.mark.parametrize(("argv", "message"), [
    (["-der", PORT], "-der: requires --enable-tls (as in storescp)"),
    (["+cf", "ca.pem", PORT], "+cf ca.pem: requires --enable-tls"),
    (["-ic", PORT], "-ic: requires --enable-tls"),
    ([*TLS, "+pz", "+cs", "TLS_RSA_WITH_AES_128_CBC_SHA", PORT], "+cs "),  # conflicts with +pz
    (["+tls", "/k", "/c", PORT], "+tls /k /c: with -rc (the default) and no +cf/+cd"),
    (["+tls", "/k", "/c", "-vc", PORT], "+tls /k /c: with -vc and no +cf/+cd"),
    ([*TLS, "+pn", PORT], "+pn: not implemented yet (unencrypted TLS"),
    ([*TLS, "+pb", PORT], "+pb: not implemented yet (the retired Basic TLS profile's 3DES"),
])
def test_tls_refusals(argv: list[str], message: str) -> None:
    assert refused(*argv).startswith(message)


def test_tls_translation_loads_and_relative_paths_warn() -> None:
    from dicom_ingestd.config.load import config_from_mapping

    translation = translate(["+tls", "key.pem", "cert.pem", "-ic", PORT])
    assert sum("is relative" in w for w in translation.warnings) == 2
    config = config_from_mapping(tomllib.loads(translation.toml()))
    assert config.tls.enabled and config.tls.peer_certificate == "ignore"
