"""The storescp option table: one row per option of storescp 3.6.7 (and the 3.7 additions),
with the parsers and setters only one row uses, and storescp's own defaults for every key an
option can set."""

from typing import Any

from dicom_ingestd.config import profile_tables
from dicom_ingestd.config.asconfig import AsconfigError, read_asconfig
from dicom_ingestd.config.storescp.hosts import access_control
from dicom_ingestd.config.storescp.options import (
    INT_MAX,
    Effect,
    Option,
    Use,
    ignored,
    integer,
    name_part,
    parse_integer,
    sets,
    setter,
    string_value,
    takes,
    unsupported,
)
from dicom_ingestd.dcmtk.transfer import DEFAULT_PREFERENCE, STORESCP_PREFERENCE_FLAGS
from dicom_ingestd.errors import TranslationError


def _socket_timeout(use: Use, text: str, warnings: list[str]) -> int:
    """-ts: storescp accepts -1 (leave the socket's timeout alone, i.e. none), which is our 0."""
    seconds = parse_integer(use.label(), text, -1, INT_MAX, c_signed=True)
    return max(seconds, 0)


def _ae_title(use: Use, text: str, warnings: list[str]) -> str:
    """-aet: an AE title: 1-16 printable ASCII characters, not all spaces, no backslash.

    storescp would silently cut a longer title to 16 characters; refusing is clearer.
    """
    if not text.strip(" "):
        raise TranslationError(f"{use.label()}: the AE title must not be empty or all spaces")
    if len(text) > 16:
        raise TranslationError(f"{use.label()}: the AE title is longer than 16 characters")
    if "\\" in text or any(not " " <= ch <= "~" for ch in text):
        raise TranslationError(
            f"{use.label()}: the AE title must be printable ASCII without a backslash"
        )
    return text


def _directory(use: Use, text: str, warnings: list[str]) -> str:
    """-od: a directory, normalized as storescp does: trailing '/' dropped, empty means '.'."""
    directory = string_value(use, text, warnings)
    while len(directory) > 1 and directory.endswith("/"):
        directory = directory[:-1]
    return directory or "."


# log4cplus level names as storescp's -ll accepts them (case-insensitive), and ours.
_LOG_LEVELS = {
    "fatal": "fatal", "error": "error", "warn": "warn", "info": "info", "debug": "debug",
    "trace": "trace", "all": "trace", "off": "fatal",
}


def _log_level(use: Use, text: str, warnings: list[str]) -> str:
    """-ll: a log4cplus level; OFF has no equivalent (we always log fatal errors)."""
    level = _LOG_LEVELS.get(text.lower())
    if level is None:
        raise TranslationError(
            f"{use.label()}: invalid log level, expected one of fatal, error, warn, info, "
            "debug, trace"
        )
    if text.lower() == "off":
        warnings.append(
            f"{use.label()}: dicom-ingestd always logs fatal errors; logging.level = \"fatal\""
        )
    return level


def _sort(mode: str) -> Effect:
    """-ss/-su p: sort into study subdirectories named with prefix p."""
    return setter(
        ("storage.sort", "storage.sort_prefix"),
        lambda use, warnings: {
            "storage.sort": mode, "storage.sort_prefix": name_part(use, use.values[0], warnings),
        },
    )


def _preference(choice: str) -> Effect:
    """A +x… option: one of the negotiation.preferred_transfer_syntax choices."""
    return sets(("negotiation.preferred_transfer_syntax", choice))


_CONVERT_UN = "converting UN elements to the VR the data dictionary knows"


def _padding(use: Use, warnings: list[str]) -> dict[str, Any]:
    """+p f i: DCMTK refuses to write odd padding (every store would fail), so refuse it here."""
    sizes = [parse_integer(use.label(), text, 0, 2**32 - 2, c_signed=False)
             for text in use.values]
    if any(size % 2 for size in sizes):
        raise TranslationError(f"{use.label()}: padding lengths must be even (storescp would "
                               "fail to write every object)")
    return {"storage.file_padding": sizes[0], "storage.item_padding": sizes[1]}


# storescp re-encodes every object unless +B; we store as received unless an option asks for
# another encoding.  When one does, the options left out take storescp's defaults (+e, +g=),
# so the files equal storescp's.
ENCODING_OPTIONS = ("--write-xfer-little", "--write-xfer-big", "--write-xfer-implicit",
                    "--write-xfer-deflated", "--length-explicit", "--length-undefined",
                    "--group-length-recalc", "--group-length-create", "--group-length-remove",
                    "--padding-create", "--disable-new-vr", "--compression-level")
REENCODING_DEFAULTS = {"storage.sequence_lengths": "explicit",
                       "storage.group_length": "recalc"}


def _config_file(use: Use, warnings: list[str]) -> dict[str, Any]:
    """-xf f p: profile p of the DCMTK association configuration file f, read now, as TOML.

    The whole file is checked as storescp checks it at start-up (a problem in any profile
    refuses the translation, as it refuses storescp's start); only profile p and the transfer
    syntax lists it uses are written.
    """
    path, name = use.values
    try:
        asconfig = read_asconfig(path)
        chosen = asconfig.select(name)
        lists, tables = profile_tables.from_asconfig(asconfig, [chosen])
    except (AsconfigError, ValueError) as exc:
        raise TranslationError(f"{use.label()}: {exc}") from None
    warnings.extend(f"{use.label()}: {warning}" for warning in asconfig.warnings)
    warnings.append(f"{use.label()}: [negotiation] holds profile {chosen.name!r} as {path} "
                    "was at translation time; storescp reads the file at every start: after "
                    "editing it, translate again or edit [negotiation.profiles]")
    return {"negotiation.profile": chosen.name, "negotiation.transfer_syntaxes": lists,
            "negotiation.profiles": tables}


def _command(key: str) -> Effect:
    """-xcr/-xcs c: a storescp-style command line, run through the shell form."""
    def build(use: Use, warnings: list[str]) -> dict[str, Any]:
        command = use.values[0]
        if "#r" in command:
            warnings.append(f"{use.label()}: #r is the peer's IP address here; storescp "
                            "substitutes its host name unless -dhl is given")
        return {key: [command], "events.shell": True}

    return setter((key, "events.shell"), build)


def _eostudy_timeout(use: Use, text: str, warnings: list[str]) -> int:
    """-tos t: storescp's 0 closes a study at once; our 0 means 'never by time'."""
    seconds = parse_integer(use.label(), text, 0, 2**31 - 1, c_signed=True)
    if seconds == 0:
        warnings.append(f"{use.label()}: a study closes 1 s after its last object "
                        "(events.eostudy_timeout = 0 would mean never)")
        return 1
    return seconds


_EXITS = "storescp would only print {what} and exit; the rest of the command line is translated"
_SEED = ("no effect with a modern OpenSSL, which seeds its random generator from the operating "
         "system")
_RETIRED_3DES = "the retired Basic TLS profile's 3DES suite, which OpenSSL 3 no longer offers"
_UNENCRYPTED = "unencrypted TLS (the retired IHE ATNA NULL profile): refused on purpose"
_PROFILE_8996_MOD = "the modified RFC 8996 profile's CAMELLIA and CCM suites"
_SNI = "checking the server name a client asks for (SNI)"


def _enable_tls(use: Use, warnings: list[str]) -> dict[str, Any]:
    """+tls key cert."""
    key, certificate = (string_value(use, value, warnings) for value in use.values)
    for path in (key, certificate):
        if not path.startswith("/"):
            warnings.append(f"{use.label()}: {path} is relative: the daemon resolves it "
                            "against its working directory (/ under systemd); prefer an "
                            "absolute path")
    return {"tls.enabled": True, "tls.private_key": key, "tls.certificate": certificate}


def _use_password(use: Use, warnings: list[str]) -> dict[str, Any]:
    """+pw p: a password on the command line; a daemon reads it from a file instead."""
    warnings.append(f"{use.label()}: the password is not copied into "
                    "this file: write it to a file only the daemon's user can read (chmod "
                    "600) and set tls.key_password_file to it, or pass it as a systemd "
                    "credential (LoadCredential=, then \"$CREDENTIALS_DIRECTORY/NAME\")")
    return {}


def _paths(key: str) -> Effect:
    """+cf/+cd/+crl/+cs: every use adds one value to the list `key`."""
    return setter((key,), lambda use, warnings: {key: [string_value(use, v, warnings)
                                                       for v in use.values]})


OPTIONS: tuple[Option, ...] = (
    # general options
    Option("--help", "-h", 0, ignored(_EXITS.format(what="its help text"))),
    Option("--version", "", 0, ignored(_EXITS.format(what="version information"))),
    Option("--arguments", "", 0, ignored(
        "storescp logs its expanded arguments at startup; dicom-ingestd does not "
        "(the header of this file records them)")),
    Option("--quiet", "-q", 0, sets(("logging.level", "fatal")), block="verbosity"),
    Option("--verbose", "-v", 0, sets(("logging.level", "info")), block="verbosity"),
    Option("--debug", "-d", 0, sets(("logging.level", "debug")), block="verbosity"),
    Option("--log-level", "-ll", 1, takes("logging.level", _log_level)),
    Option("--log-config", "-lc", 1, ignored(
        "log4cplus configuration files are not supported: dicom-ingestd logs to stderr "
        "(the journal under systemd); logging.level is storescp's default \"warn\", adjust "
        "[logging] to what the file configured")),
    Option("--verbose-pc", "+v", 0, sets(("logging.verbose_pc", True))),
    # multi-process options
    # Without either option storescp serves one association at a time; our default (fork)
    # serves them in parallel and isolated, which changes no stored result.
    Option("--single-process", "", 0, sets(("workers.process_model", "single")),
           block="process"),
    Option("--fork", "", 0, sets(("workers.process_model", "fork")), block="process"),
    Option("--max-associations", "", 1,
           takes("workers.max_associations", integer(1, 2**31 - 1, c_signed=True)),
           since="3.7.0"),
    # IP protocol version (3.7)
    Option("--ipv4", "-i4", 0, sets(("network.ip_version", "ipv4")), block="ip", since="3.7.0"),
    Option("--ipv6", "-i6", 0, sets(("network.ip_version", "ipv6")), block="ip", since="3.7.0"),
    Option("--ip-auto", "-i0", 0, sets(("network.ip_version", "dual")), block="ip",
           since="3.7.0"),
    # association negotiation
    Option("--config-file", "-xf", 2, setter(
        ("negotiation.profile", "negotiation.transfer_syntaxes", "negotiation.profiles"),
        lambda use, warnings: _config_file(use, warnings))),
    # preferred network transfer syntaxes: +x=, +xe, ... (one row each)
    *(Option(long, short, 0, _preference(key), block="xfer")
      for key, (short, long) in STORESCP_PREFERENCE_FLAGS.items()),
    # TCP wrapper
    Option("--access-full", "-ac", 0, sets(), block="access"),  # accept all: nothing to set
    Option("--access-control", "+ac", 0,
           setter(("access.allow", "access.deny"), access_control), block="access"),
    # other network options
    Option("--inetd", "-id", 0, sets(("network.inetd", True))),
    Option("--socket-timeout", "-ts", 1, takes("network.socket_timeout", _socket_timeout)),
    Option("--acse-timeout", "-ta", 1,
           takes("network.acse_timeout", integer(1, INT_MAX, c_signed=True))),
    Option("--dimse-timeout", "-td", 1,
           takes("network.dimse_timeout", integer(1, INT_MAX, c_signed=True))),
    Option("--aetitle", "-aet", 1, takes("network.aetitle", _ae_title)),
    Option("--max-pdu", "-pdu", 1,
           takes("network.max_pdu", integer(4096, 131072, c_signed=False))),
    Option("--disable-host-lookup", "-dhl", 0, sets(("network.disable_host_lookup", True))),
    Option("--refuse", "", 0, sets(("association.refuse", True))),
    Option("--reject", "", 0, sets(("association.reject_without_implementation_uid", True))),
    Option("--ignore", "", 0, sets(("testing.ignore", True))),
    Option("--sleep-after", "", 1,
           takes("testing.sleep_after", integer(0, INT_MAX, c_signed=False))),
    Option("--sleep-during", "", 1,
           takes("testing.sleep_during", integer(0, INT_MAX, c_signed=False))),
    Option("--abort-after", "", 0, sets(("testing.abort_after", True))),
    Option("--abort-during", "", 0, sets(("testing.abort_during", True))),
    Option("--promiscuous", "-pm", 0, sets(("negotiation.promiscuous", True))),
    Option("--uid-padding", "-up", 0, sets(("association.uid_padding", True))),
    # TLS (3.6.7, and the 3.7 additions so that 3.7 command lines get a clear answer)
    Option("--disable-tls", "-tls", 0, sets(("tls.enabled", False)), block="tls"),
    Option("--enable-tls", "+tls", 2,
           setter(("tls.enabled", "tls.private_key", "tls.certificate"), _enable_tls),
           block="tls"),
    Option("--std-passwd", "+ps", 0, ignored(
        "prompting for the key password on a terminal is meaningless for a daemon: an "
        "encrypted key needs tls.key_password_file (a file only the daemon's user can read, "
        "or a systemd credential)"), block="passwd"),
    Option("--use-passwd", "+pw", 1, setter(("tls.key_password_file",), _use_password),
           block="passwd"),
    Option("--null-passwd", "-pw", 0, sets(("tls.key_password_file", "")), block="passwd"),
    Option("--pem-keys", "-pem", 0, sets(("tls.file_format", "pem")), block="keyformat"),
    Option("--der-keys", "-der", 0, sets(("tls.file_format", "der")), block="keyformat"),
    Option("--add-cert-file", "+cf", 1, _paths("tls.ca_files"), repeatable=True),
    Option("--add-cert-dir", "+cd", 1, _paths("tls.ca_directories"), repeatable=True),
    Option("--add-crl-file", "+crl", 1, _paths("tls.crl_files"), repeatable=True),
    Option("--enable-crl-vfy", "+crv", 0, sets(("tls.crl_check", "leaf")), block="crl"),
    Option("--enable-crl-all", "+cra", 0, sets(("tls.crl_check", "chain")), block="crl"),
    Option("--list-profiles", "+ph", 0, ignored(_EXITS.format(what="its TLS profiles")),
           since="3.7.0"),
    Option("--profile-8996", "+pg", 0, sets(("tls.profile", "rfc8996")), block="profile",
           since="3.7.0"),
    Option("--profile-8996-mod", "+pm", 0, unsupported(_PROFILE_8996_MOD), block="profile",
           since="3.7.0"),
    Option("--profile-bcp195-nd", "+py", 0, sets(("tls.profile", "bcp195-nd")),
           block="profile"),
    Option("--profile-bcp195", "+px", 0, sets(("tls.profile", "bcp195")), block="profile"),
    Option("--profile-bcp195-ex", "+pz", 0, sets(("tls.profile", "bcp195-ex")),
           block="profile"),
    Option("--profile-basic", "+pb", 0, unsupported(_RETIRED_3DES), block="profile"),
    Option("--profile-aes", "+pa", 0, sets(("tls.profile", "aes")), block="profile"),
    Option("--profile-null", "+pn", 0, unsupported(_UNENCRYPTED), block="profile"),
    Option("--list-ciphers", "+cc", 0, ignored(_EXITS.format(what="its cipher suites"))),
    Option("--cipher", "+cs", 1, _paths("tls.cipher_suites"), repeatable=True),
    Option("--dhparam", "+dp", 1, takes("tls.dh_parameters", string_value)),
    Option("--no-sni", "", 0, sets(), since="3.7.0"),  # the default: SNI is not used
    Option("--expect-sni", "", 1, unsupported(_SNI), since="3.7.0"),
    Option("--seed", "+rs", 1, ignored(_SEED)),
    Option("--write-seed", "+ws", 0, ignored(_SEED), block="seed"),
    Option("--write-seed-file", "+wf", 1, ignored(_SEED), block="seed"),
    Option("--require-peer-cert", "-rc", 0, sets(("tls.peer_certificate", "require")),
           block="peercert"),
    Option("--verify-peer-cert", "-vc", 0, sets(("tls.peer_certificate", "verify")),
           block="peercert"),
    Option("--ignore-peer-cert", "-ic", 0, sets(("tls.peer_certificate", "ignore")),
           block="peercert"),
    # output options
    Option("--output-directory", "-od", 1, takes("storage.output_directory", _directory)),
    Option("--normal", "-B", 0, sets(("storage.bit_preserving", False)), block="bitpreserving"),
    Option("--bit-preserving", "+B", 0, sets(("storage.bit_preserving", True)),
           block="bitpreserving"),
    Option("--write-file", "+F", 0, sets(("storage.file_format", "file")), block="fileformat"),
    Option("--write-dataset", "-F", 0, sets(("storage.file_format", "dataset")),
           block="fileformat"),
    Option("--write-xfer-same", "+t=", 0, sets(("storage.transfer_syntax", "received")),
           block="writexfer"),
    Option("--write-xfer-little", "+te", 0,
           sets(("storage.transfer_syntax", "little-explicit")), block="writexfer"),
    Option("--write-xfer-big", "+tb", 0, sets(("storage.transfer_syntax", "big-explicit")),
           block="writexfer"),
    Option("--write-xfer-implicit", "+ti", 0, sets(("storage.transfer_syntax", "implicit")),
           block="writexfer"),
    Option("--write-xfer-deflated", "+td", 0, sets(("storage.transfer_syntax", "deflated")),
           block="writexfer"),
    Option("--enable-new-vr", "+u", 0, sets(("storage.new_vrs", True)), block="newvr"),
    Option("--disable-new-vr", "-u", 0, sets(("storage.new_vrs", False)), block="newvr"),
    Option("--group-length-recalc", "+g=", 0, sets(("storage.group_length", "recalc")),
           block="grouplength"),
    Option("--group-length-create", "+g", 0, sets(("storage.group_length", "create")),
           block="grouplength"),
    Option("--group-length-remove", "-g", 0, sets(("storage.group_length", "remove")),
           block="grouplength"),
    Option("--length-explicit", "+e", 0, sets(("storage.sequence_lengths", "explicit")),
           block="lengths"),
    Option("--length-undefined", "-e", 0, sets(("storage.sequence_lengths", "undefined")),
           block="lengths"),
    Option("--padding-off", "-p", 0,
           sets(("storage.file_padding", 0), ("storage.item_padding", 0)), block="padding"),
    Option("--padding-create", "+p", 2,
           setter(("storage.file_padding", "storage.item_padding"), _padding), block="padding"),
    Option("--retain-un", "-uc", 0, sets(), block="un"),  # what we do: UN stays UN
    Option("--convert-un", "+uc", 0, unsupported(_CONVERT_UN), block="un"),
    Option("--compression-level", "+cl", 1,
           takes("storage.deflate_level", integer(0, 9, c_signed=False))),
    Option("--sort-conc-studies", "-ss", 1, _sort("conc-studies"), block="sort"),
    Option("--sort-on-study-uid", "-su", 1, _sort("study-uid"), block="sort"),
    Option("--sort-on-patientname", "-sp", 0, sets(("storage.sort", "patientname")),
           block="sort"),
    Option("--default-filenames", "-uf", 0, sets(("storage.filenames", "default")),
           block="unique"),
    Option("--unique-filenames", "+uf", 0, sets(("storage.filenames", "unique")),
           block="unique"),
    # -tn is no member of the -uf/+uf block in storescp: time names win over -uf wherever -tn
    # stands, and it conflicts with an effective +uf (checked in _check_conflicts).
    Option("--timenames", "-tn", 0, sets(("storage.filenames", "timenames")), prevails=True),
    Option("--filename-extension", "-fe", 1, takes("storage.filename_extension", name_part)),
    # event options
    # storescp runs its command lines through /bin/sh; the shell form keeps that, with every
    # placeholder passed as a quoted variable reference (never parsed by the shell).
    Option("--exec-on-reception", "-xcr", 1, _command("events.exec_on_reception")),
    Option("--exec-on-eostudy", "-xcs", 1, _command("events.exec_on_eostudy")),
    Option("--rename-on-eostudy", "-rns", 0, sets(("events.rename_on_eostudy", True))),
    Option("--eostudy-timeout", "-tos", 1, takes("events.eostudy_timeout", _eostudy_timeout)),
    Option("--exec-sync", "-xs", 0, sets(("events.exec_sync", True))),
)

BY_SPELLING: dict[str, Option] = {
    spelling: option for option in OPTIONS for spelling in (option.long, option.short) if spelling
}


def find_option(spelling: str) -> Option | None:
    """The row for an option spelling (short or long, exactly as storescp matches), or None."""
    return BY_SPELLING.get(spelling)


# storescp's own value for every key an option can set, used where no option sets it.  The
# port has none: it is required (except with --inetd).
STORESCP_DEFAULTS: dict[str, Any] = {
    "network.port": None,
    "network.ip_version": "ipv4",  # storescp up to 3.6.x listens on IPv4 only; 3.7 defaults to -i4
    "network.inetd": False,
    "network.aetitle": "STORESCP",
    "network.max_pdu": 16384,
    "network.acse_timeout": 30,
    "network.socket_timeout": 60,
    "network.disable_host_lookup": False,  # storescp resolves peer names unless -dhl
    "negotiation.preferred_transfer_syntax": DEFAULT_PREFERENCE,
    "negotiation.promiscuous": False,
    "association.refuse": False,
    "association.reject_without_implementation_uid": False,
    "association.uid_padding": False,
    "testing.ignore": False,
    "testing.sleep_after": 0,
    "testing.sleep_during": 0,
    "testing.abort_after": False,
    "testing.abort_during": False,
    "storage.output_directory": ".",
    "storage.bit_preserving": False,
    # storescp (without +B) writes with +e and +g=; an omitted option means "as received" here
    # (see ENCODING_OPTIONS for when storescp's values are filled in).
    "storage.file_format": "file",
    "storage.transfer_syntax": "received",
    "storage.sequence_lengths": "received",
    "storage.group_length": "received",
    "storage.file_padding": 0,
    "storage.item_padding": 0,
    "storage.deflate_level": 6,
    "storage.new_vrs": True,
    "storage.sort": "none",
    "storage.sort_prefix": "",
    "storage.filenames": "default",
    "storage.filename_extension": "",
    "logging.level": "warn",  # storescp logs warnings and errors only
    "logging.verbose_pc": False,
    "tls.enabled": False,
    "tls.key_password_file": "",
    "tls.file_format": "pem",
    "tls.crl_check": "none",
    "tls.profile": "bcp195-nd",  # 3.6.7's default (3.7: rfc8996)
    "tls.peer_certificate": "require",
    "events.eostudy_timeout": 0,  # storescp closes studies by time only with -tos
    "jobs.retries": 0,  # storescp runs each command once and waits for it forever
    "jobs.timeout": 0,
}
