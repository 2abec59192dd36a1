"""The configuration loader (config.load) and the generated documentation (config.docs).

Error tests assert the whole contract of a problem line: it names the file, the key, the bad
value and what is allowed, because that line is all an operator sees when the daemon refuses
to start.  The sync tests keep etc/ingestd.toml, man/ingestd.toml.5 and docs/storescp-options.md
equal to what the schema renders now.
"""

import dataclasses
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dicom_ingestd.config import docs
from dicom_ingestd.config.load import (
    _VALUE_CHECKS,
    config_from_mapping,
    diff_configs,
    dump_config,
    load_config,
)
from dicom_ingestd.config.schema import (
    CHOICES,
    MAXIMUM,
    MINIMUM,
    WHOLE_TABLE,
    Config,
    NegotiationProfile,
    RemoteAE,
    keys,
    tables,
)
from dicom_ingestd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def problems_of(tmp_path: Path, text: str) -> tuple[str, list[str]]:
    """Write `text` as a config file, load it, and return (file name, the problem lines)."""
    path = tmp_path / "ingestd.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(path), info.value.problems


def only_problem(tmp_path: Path, text: str) -> tuple[str, str]:
    source, problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    return source, problems[0]


# --- loading: the happy path -------------------------------------------------------------------


def test_file_of_comments_only_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("# nothing but a comment; an empty file is refused (test_reload_safety)\n")
    assert load_config(path) == Config()


def test_values_are_loaded_into_their_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[network]\nport = 11112\naetitle = "PACS1"\n'
        '[association]\nallowed_calling_aetitles = ["CT01", "MR 01"]\n'
        '[storage]\nsort = "study-uid"\nsort_prefix = "st"\nfsync = false\n'
    )
    config = load_config(str(path))  # str and Path are both accepted
    assert config.network.port == 11112
    assert config.network.aetitle == "PACS1"
    assert config.association.allowed_calling_aetitles == ["CT01", "MR 01"]
    assert (config.storage.sort, config.storage.sort_prefix) == ("study-uid", "st")
    assert config.storage.fsync is False
    assert config.logging == Config().logging  # untouched tables keep their defaults


def test_sort_prefix_is_accepted_with_any_sort_mode() -> None:
    config = config_from_mapping({"storage": {"sort": "none", "sort_prefix": "x"}})
    assert config.storage.sort_prefix == "x"


# --- loading: every kind of error --------------------------------------------------------------


def test_unknown_key_suggests_the_closest_key(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, '[storage]\noutput_dir = "/srv"\n')
    assert line == (
        f"{source}: unknown key storage.output_dir (did you mean storage.output_directory?)"
    )


def test_key_under_the_wrong_table_suggests_its_home(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, "[storage]\nport = 11112\n")
    assert line == f"{source}: unknown key storage.port (did you mean network.port?)"


def test_key_outside_any_table_suggests_its_home(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, "max_pdu = 65536\n")
    assert line == f"{source}: unknown key max_pdu (did you mean network.max_pdu?)"


def test_unknown_table_suggests_the_closest_table(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, "[netwrok]\nport = 1\n")
    assert line == f"{source}: unknown table [netwrok] (did you mean [network]?)"


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, "[network]\nzzzzqqq = 1\n")
    assert line == f"{source}: unknown key network.zzzzqqq"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[network]\nport = "104"\n', "network.port = '104': must be an integer from 1 to 65535"),
        # bool is an int in Python; TOML true must not become port 1.
        ("[network]\nport = true\n", "network.port = True: must be an integer from 1 to 65535"),
        ("[network]\nport = 104.0\n", "network.port = 104.0: must be an integer from 1 to 65535"),
        ("[storage]\nfsync = 1\n", "storage.fsync = 1: must be true or false"),
        ('[storage]\nfsync = "yes"\n', "storage.fsync = 'yes': must be true or false"),
        ("[network]\naetitle = 5\n", "network.aetitle = 5: must be a string"),
        (
            '[association]\nallowed_calling_aetitles = "CT01"\n',
            "association.allowed_calling_aetitles = 'CT01': must be an array of strings",
        ),
        (
            '[association]\nallowed_calling_aetitles = ["CT01", 2]\n',
            "association.allowed_calling_aetitles = ['CT01', 2]: must be an array of strings",
        ),
        ("network = 5\n", "network = 5: must be a table ([network])"),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, expected: str) -> None:
    source, line = only_problem(tmp_path, text)
    assert line == f"{source}: {expected}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[network]\nport = 0\n", "network.port = 0: must be an integer from 1 to 65535"),
        ("[network]\nport = 65536\n", "network.port = 65536: must be an integer from 1 to 65535"),
        (
            "[network]\nmax_pdu = 4095\n",
            "network.max_pdu = 4095: must be an integer from 4096 to 131072",
        ),
        ("[network]\nacse_timeout = 0\n", "network.acse_timeout = 0: must be an integer >= 1"),
        ("[testing]\nsleep_after = -1\n", "testing.sleep_after = -1: must be an integer >= 0"),
    ],
)
def test_out_of_range(tmp_path: Path, text: str, expected: str) -> None:
    source, line = only_problem(tmp_path, text)
    assert line == f"{source}: {expected}"


def test_range_bounds_are_inclusive() -> None:
    config = config_from_mapping({"network": {"port": 65535, "max_pdu": 4096}})
    assert (config.network.port, config.network.max_pdu) == (65535, 4096)


def test_bad_choice_lists_the_choices(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, '[storage]\nsort = "by-date"\n')
    assert line == (
        f"{source}: storage.sort = 'by-date': "
        "must be one of none, conc-studies, study-uid, patientname"
    )


def test_choices_are_case_sensitive(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, '[logging]\nlevel = "INFO"\n')
    assert line.startswith(f"{source}: logging.level = 'INFO': must be one of fatal, error")


AE_RULE = "1 to 16 printable ASCII characters, not all spaces, no backslash"


@pytest.mark.parametrize(
    "title",
    ["", "A" * 17, "A\\B", "    ", "A\tB", "PACS\n", "ÄRZTE", "A\x7f"],
    ids=["empty", "17-chars", "backslash", "all-spaces", "tab", "newline", "non-ascii", "DEL"],
)
def test_bad_aetitle(tmp_path: Path, title: str) -> None:
    # TOML basic strings accept \uXXXX escapes, so every title is written escaped.
    escaped = "".join(f"\\u{ord(c):04x}" for c in title)
    source, line = only_problem(tmp_path, f'[network]\naetitle = "{escaped}"\n')
    assert line == f"{source}: network.aetitle = {title!r}: an AE title must be {AE_RULE}"


@pytest.mark.parametrize("title", ["A", "A" * 16, " PACS ", "MY-AE_1.x"])
def test_good_aetitle(title: str) -> None:
    assert config_from_mapping({"network": {"aetitle": title}}).network.aetitle == title


def test_bad_allowed_calling_aetitles_names_each_bad_entry(tmp_path: Path) -> None:
    source, problems = problems_of(
        tmp_path, '[association]\nallowed_calling_aetitles = ["CT01", "", "A\\\\B"]\n'
    )
    assert problems == [
        f"{source}: association.allowed_calling_aetitles[1] = '': "
        f"each AE title must be {AE_RULE}",
        f"{source}: association.allowed_calling_aetitles[2] = 'A\\\\B': "
        f"each AE title must be {AE_RULE}",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[storage]\nfilename_extension = "/x"\n',
            "storage.filename_extension = '/x': must not contain '/' or NUL "
            "(it is part of a file name)",
        ),
        (
            '[storage]\nfilename_extension = ".dcm\\u0000"\n',
            "storage.filename_extension = '.dcm\\x00': must not contain '/' or NUL "
            "(it is part of a file name)",
        ),
        (
            '[storage]\nsort_prefix = "../up"\n',
            "storage.sort_prefix = '../up': must not contain '/' or NUL "
            "(it is part of a file name)",
        ),
        (
            '[storage]\noutput_directory = ""\n',
            "storage.output_directory = '': must name a directory "
            "(use '.' for the working directory)",
        ),
    ],
)
def test_bad_storage_names(tmp_path: Path, text: str, expected: str) -> None:
    source, line = only_problem(tmp_path, text)
    assert line == f"{source}: {expected}"


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, "[network]\nport = 104\naetitle = PACS\n")
    assert line.startswith(f"{source}:3:11: TOML syntax error: ")


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    source, line = only_problem(tmp_path, "[network]\nport = 1\nport = 2\n")
    assert line.startswith(f"{source}:3:")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: cannot read: no such file"]


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    # A directory is unreadable as a file even for root (permission bits would not be).
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[network]\naetitle = "\xc4RZTE"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:2: not UTF-8 text (byte 0xc4)"]


def test_all_problems_are_collected_in_one_error(tmp_path: Path) -> None:
    source, problems = problems_of(
        tmp_path,
        "stray = 1\n"
        '[network]\nport = "x"\nmax_pdu = 1\naetitle = ""\n'
        '[storage]\nsort = "x"\nfsync = 1\noutput_dir = "."\n'
        "[bogus]\n",
    )
    expected_labels = [
        "unknown key stray",
        "unknown table [bogus]",
        "network.port = 'x'",
        "network.max_pdu = 1",
        "network.aetitle = ''",
        "unknown key storage.output_dir",
        "storage.sort = 'x'",
        "storage.fsync = 1",
    ]
    assert len(problems) == len(expected_labels), problems
    for label in expected_labels:
        assert any(line.startswith(f"{source}: {label}") for line in problems), label


def test_config_error_message_is_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[network]\nport = 0\ninetd = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == info.value.problems


def test_config_from_mapping_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"network": {"port": 0}}, source="<storescp>")
    assert info.value.problems == [
        "<storescp>: network.port = 0: must be an integer from 1 to 65535"
    ]
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"network": {"port": 0}})
    assert info.value.problems[0].startswith("<config>: network.port = 0")


def test_extra_value_checks_name_real_keys() -> None:
    # A renamed key must not silently lose its AE-title or file-name check.
    assert set(_VALUE_CHECKS) <= {name for name, _ in keys()}


# --- dump, round trip, diff --------------------------------------------------------------------


def _non_default(f: dataclasses.Field[Any]) -> Any:
    """A valid value different from the field's default, derived from the metadata alone."""
    default: Any = f.default
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        high = f.metadata.get(MAXIMUM)
        value = default + 1 if high is None or default < high else default - 1
        return max(value, f.metadata.get(MINIMUM, value))
    if CHOICES in f.metadata:
        return next(c for c in f.metadata[CHOICES] if c != default)
    if f.name == "transfer_syntaxes":
        return {"Uncompressed": ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]}
    if f.name == "profiles":
        return {"P": NegotiationProfile(
            {"1.2.840.10008.1.1": ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"),
             "1.2.840.10008.5.1.4.1.1.2": ("1.2.840.10008.1.2.4.50",)},
            {"1.2.840.10008.1.1": "Uncompressed"},
            {"1.2.840.10008.5.1.4.1.1.2": "both"},
            {"1.2.840.10008.5.1.4.1.1.2": b"\x02\x00\x03"})}
    if f.name == "profile":
        return "P"
    if f.name == "aetitles":  # [remote_aes]
        return {"CT01": RemoteAE("10.1.2.3", 104), "MR01": RemoteAE("mr01", 2762, False)}
    if isinstance(default, dict):  # tls.subject_aetitles
        return {"CN=ct1,O=Hospital": ["CT01"]}
    if isinstance(default, list):
        if f.name in ("allow", "deny", "trusted_proxies"):
            return ["10.0.0.0/8", "fd00::/8"]
        if f.name == "allowed_subjects":
            return ["CN=mr1,O=Hospital"]
        return ["CT01", "MR01"]
    return "X" + default if default != "." else "/srv/dicom"


# Changed values that cannot all hold at once (storescp's output-option conflicts: no
# re-encoding with bit_preserving, even padding, a deflate level only for deflated output);
# the configuration that must load uses these instead.
_VALID_TOGETHER = {"storage": {"bit_preserving": False, "file_format": "file",
                               "file_padding": 2, "item_padding": 2,
                               "transfer_syntax": "deflated"}}
# A negotiation profile cannot be combined with these (as storescp -xf with +x... or -pm): a
# valid configuration changes them or the profile, and every_key_changed chooses the profile.
_EXCLUDED_BY_PROFILE = ("negotiation.preferred_transfer_syntax", "negotiation.promiscuous")


def every_key_changed(*, loadable: bool = False) -> Config:
    sections = {
        table: cls(**{f.name: _non_default(f) for f in dataclasses.fields(cls)
                      if f"{table}.{f.name}" not in _EXCLUDED_BY_PROFILE}
                   | (_VALID_TOGETHER.get(table, {}) if loadable else {}))
        for table, cls in tables()
    }
    return Config(**sections)


def test_every_key_changed_is_valid_and_differs_everywhere() -> None:
    changed = every_key_changed()
    assert [key for key, _ in diff_configs(Config(), changed)] == [
        key for key, _ in keys() if key not in _EXCLUDED_BY_PROFILE]
    without_profile = config_from_mapping({"negotiation": {
        "preferred_transfer_syntax": "all", "promiscuous": True}})
    assert [key for key, _ in diff_configs(Config(), without_profile)] == list(
        _EXCLUDED_BY_PROFILE)


@pytest.mark.parametrize("config", [Config(), every_key_changed(loadable=True)],
                         ids=["defaults", "changed"])
def test_dump_load_round_trip(tmp_path: Path, config: Config) -> None:
    path = tmp_path / "dump.toml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert config_from_mapping(tomllib.loads(dump_config(config))) == config


def test_dump_lists_every_key_in_declaration_order() -> None:
    document = tomllib.loads(dump_config(Config()))
    assert list(document) == [table for table, _ in tables()]
    # A table that is one key ([remote_aes]: every key an AE title) is empty by default.
    whole = {name for name, f in keys() if f.metadata.get(WHOLE_TABLE)}
    assert [f"{t}.{k}" for t, section in document.items() for k in section] == [
        name for name, _ in keys() if name not in whole
    ]
    assert whole == {"remote_aes.aetitles"} and document["remote_aes"] == {}


def test_diff_configs_reports_changed_keys_and_reloadability() -> None:
    old = Config()
    assert diff_configs(old, Config()) == []
    new = config_from_mapping(
        {"network": {"port": 11112, "aetitle": "PACS1"}, "storage": {"fsync": False}}
    )
    assert diff_configs(old, new) == [
        ("network.port", False),  # the listening socket is only bound at start
        ("network.aetitle", True),
        ("storage.fsync", True),
    ]


# --- generated files: example config, man page, storescp table ---------------------------------

GENERATED = {
    "etc/ingestd.toml": docs.example_toml,
    "man/ingestd.toml.5": docs.man_page,
    "docs/storescp-options.md": docs.storescp_table_md,
}


def test_example_config_loads_as_the_defaults() -> None:
    assert load_config(REPO / "etc" / "ingestd.toml") == Config()


def test_example_config_with_every_key_uncommented_is_the_defaults() -> None:
    # Proves the commented-out values are the real defaults, spelled as valid TOML.
    text = (REPO / "etc" / "ingestd.toml").read_text()
    uncommented = re.sub(r"^#(?=[a-z_]+ = )", "", text, flags=re.M)
    assert uncommented != text
    assert config_from_mapping(tomllib.loads(uncommented)) == Config()
    assert tomllib.loads(uncommented) == tomllib.loads(dump_config(Config()))


@pytest.mark.parametrize("relative", list(GENERATED))
def test_generated_file_is_up_to_date(relative: str) -> None:
    on_disk = (REPO / relative).read_text(encoding="utf-8")
    assert on_disk == GENERATED[relative](), (
        f"{relative} is stale: run python -m dicom_ingestd.config.docs --write"
    )


def test_rendered_files_are_the_three_generated_files() -> None:
    assert {p.relative_to(REPO).as_posix() for p in docs.rendered_files()} == set(GENERATED)


def _table_blocks(text: str, header: str) -> dict[str, str]:
    """Split a generated text into {table: the text from its header to the next header}."""
    pattern = re.compile(header, re.M)
    starts = [(m.start(), m["table"]) for m in pattern.finditer(text)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {table: text[start:end] for (start, table), end in zip(starts, ends, strict=True)}


def test_every_key_is_in_the_example_config_under_its_table() -> None:
    blocks = _table_blocks(docs.example_toml(), r"^\[(?P<table>\w+)\]$")
    assert list(blocks) == [table for table, _ in tables()]
    for name, f in keys():
        table, key = name.split(".")
        if f.metadata.get(WHOLE_TABLE):  # its entries are the table's keys: an example
            assert re.search(rf"^#  \[{table}\.\w+\]$", blocks[table], re.M), name
            continue
        assert re.search(rf"^#{key} = ", blocks[table], re.M), name


def test_every_key_is_in_the_man_page_under_its_table() -> None:
    blocks = _table_blocks(docs.man_page(), r"^\.SS \[(?P<table>\w+)\]$")
    assert list(blocks) == [table for table, _ in tables()]
    for name, f in keys():
        table, key = name.split(".")
        if f.metadata.get(WHOLE_TABLE):
            key = f"[{table}.\\fR\\fITITLE\\fR\\fB]"
        assert f"\n.TP\n\\fB{key}\\fR (" in blocks[table], name


def test_every_key_is_in_the_storescp_table() -> None:
    text = docs.storescp_table_md()
    for name, f in keys():
        assert f"| `{name}` |" in text, name
        for flag in f.metadata["storescp"]:
            assert f"`{flag}`" in text, (name, flag)


def test_example_config_marks_restart_only_and_storescp_flags() -> None:
    text = docs.example_toml()
    port = text[: text.index("#port = 104")].rsplit("\n\n", 1)[1]
    assert "# storescp: port (argument)" in port
    assert "# default differs from storescp: storescp has no default port" in port
    assert "# takes effect on restart only" in port
    aetitle = text[: text.index('#aetitle = "STORESCP"')].rsplit("\n\n", 1)[1]
    assert "# storescp: -aet, --aetitle" in aetitle
    assert "restart" not in aetitle


def test_example_config_lines_fit_79_columns() -> None:
    long = [line for line in docs.example_toml().splitlines() if len(line) > 79]
    assert long == []


def test_man_page_renders_without_groff_warnings() -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.fail("groff is not installed (apt-get install groff-base)")
    result = subprocess.run(
        [groff, "-man", "-ww", "-z", str(REPO / "man" / "ingestd.toml.5")],
        capture_output=True, text=True, check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_docs_check_reports_stale_and_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert docs.main(["--check"], root=tmp_path) == 1
    err = capsys.readouterr().err
    for relative in GENERATED:
        assert f"{tmp_path / relative}: out of date" in err

    assert docs.main(["--write"], root=tmp_path) == 0
    assert docs.main(["--check"], root=tmp_path) == 0
    (tmp_path / "man" / "ingestd.toml.5").write_text("stale\n")
    capsys.readouterr()
    assert docs.main(["--check"], root=tmp_path) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{tmp_path / 'man' / 'ingestd.toml.5'}: out of date; "
        "run python -m dicom_ingestd.config.docs --write"
    ]


def test_docs_check_passes_on_the_repository() -> None:
    assert docs.main(["--check"]) == 0
