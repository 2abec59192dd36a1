"""The configuration schema: every setting declared once, with its default and its documentation.

This module is a leaf (stdlib and the DCMTK data in `dcmtk/` only).  The loader
(`config.load`), the storescp translator (`config.storescp`), the documentation renderer
(`config.docs`) and the example `etc/ingestd.toml` all read the declarations below, so a
setting cannot exist in one place and be missing in another.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dicom_ingestd.dcmtk.transfer import DEFAULT_PREFERENCE, STORESCP_PREFERENCE_FLAGS

# Metadata keys used in field(metadata=...).
DOC = "doc"
STORESCP = "storescp"  # the storescp options that set this key, for docs and the translator
CHOICES = "choices"
MINIMUM = "minimum"
MAXIMUM = "maximum"
RELOAD = "reload"  # False: needs a restart; a reload reports the change instead of applying it
DEFAULT_NOTE = "default_note"  # why our default differs from storescp's, when it does
EXAMPLE = "example"  # structured keys (tables): a TOML example for the documentation
WHOLE_TABLE = "whole_table"  # the key is its whole table (every key of it an entry)


def setting(
    default: Any,
    doc: str,
    *,
    storescp: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    minimum: int | float | None = None,
    maximum: int | float | None = None,
    reload: bool = True,
    default_note: str = "",
) -> Any:
    """Declare one configuration key (a dataclass field carrying its documentation)."""
    meta: dict[str, Any] = {
        DOC: doc, STORESCP: storescp, RELOAD: reload, DEFAULT_NOTE: default_note,
    }
    if choices is not None:
        meta[CHOICES] = choices
    if minimum is not None:
        meta[MINIMUM] = minimum
    if maximum is not None:
        meta[MAXIMUM] = maximum
    return field(default=default, metadata=meta)


PREFERENCE_CHOICES = tuple(STORESCP_PREFERENCE_FLAGS)


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """[network]: where and how the daemon listens, and the association's transport limits."""

    port: int = setting(
        104, "TCP port to listen on (ignored when sockets come from systemd or inetd).",
        storescp=("port",), minimum=1, maximum=65535, reload=False,
        default_note="storescp has no default port; 104 is the DICOM well-known port.",
    )
    bind_address: str = setting(
        "", "Address to bind; empty means every address of the chosen IP version.",
        reload=False,
    )
    ip_version: str = setting(
        "ipv4", "IP version to listen on: ipv4, ipv6, or dual (IPv6 socket accepting IPv4 too).",
        storescp=("-i4", "-i6", "-i0"), choices=("ipv4", "ipv6", "dual"), reload=False,
    )
    inetd: bool = setting(
        False, "Serve one association on the connected socket at fd 0 and exit (inetd style).",
        storescp=("-id", "--inetd"), reload=False,
    )
    aetitle: str = setting(
        "STORESCP", "Our AE title (1-16 characters, no backslash or control characters).",
        storescp=("-aet", "--aetitle"),
    )
    max_pdu: int = setting(
        131072, "Maximum PDU length we receive, in bytes (advertised to the peer; never 0). "
        "A peer may always send smaller PDUs.",
        storescp=("-pdu", "--max-pdu"), minimum=4096, maximum=131072,
        default_note="storescp's default is 16384. Data sets are streamed to disk whatever "
        "the PDU size, so the largest PDU storescp allows costs no memory, and a sender "
        "needs 8 times fewer PDUs (and we fewer reads and writes) per object.",
    )
    acse_timeout: int = setting(
        30, "Seconds to wait for association messages (A-ASSOCIATE-RQ, A-RELEASE), and for "
        "a TLS handshake to complete ([tls]).",
        storescp=("-ta", "--acse-timeout"), minimum=1,
    )
    dimse_timeout: int = setting(
        60,
        "Seconds an association may stay idle waiting for the next DIMSE message (command); "
        "then it is aborted. 0 means unlimited (socket_timeout applies).",
        storescp=("-td", "--dimse-timeout"), minimum=0,
        default_note="storescp waits forever by default. Every idle association holds a "
        "worker and its descriptors, so a peer that connects and never sends could hold "
        "them all; 60 s is as long as the socket timeout, and a sender that pauses longer "
        "between objects simply associates again.",
    )
    socket_timeout: int = setting(
        60, "Seconds a single network read or write may block; a stalled peer is dropped. 0: none.",
        storescp=("-ts", "--socket-timeout"), minimum=0,
    )
    min_transfer_rate: int = setting(
        1024, "Bytes per second a peer must average while a message (a command and its data "
        "set) is on its way, measured over each stretch of socket_timeout seconds (at most "
        "60) spent waiting for it; a slower peer is aborted. Without it, a peer sending one "
        "byte before each socket_timeout, or one tiny PDU at a time, would hold its worker "
        "indefinitely. 0: no minimum.", minimum=0,
        default_note="Not a storescp option: storescp bounds each read only (-ts).",
    )
    disable_host_lookup: bool = setting(
        True, "Do not resolve the peer's address to a host name (used in logs and #r).",
        storescp=("-dhl", "--disable-host-lookup"),
        default_note="storescp resolves names by default; a daemon should not stall on DNS.",
    )
    tcp_nodelay: bool = setting(
        True, "Set TCP_NODELAY and TCP_QUICKACK on accepted sockets (removes delayed-ACK stalls).",
        default_note="Not a storescp option; DCMTK leaves Nagle on unless TCP_NODELAY=1 is set.",
    )
    proxy_protocol: str = setting(
        "off", "Behind a load balancer: connections from trusted_proxies must start with a "
        "PROXY protocol header (HAProxy's specification: v1 text, v2 binary, or any of "
        "the two), read before anything else (before TLS too), within acse_timeout; the "
        "address it carries is the peer for access control, the per-peer limit, logs, #r "
        "and job variables, and the proxy's address is logged with it. A header without a "
        "client address (v1 UNKNOWN, v2 unspecified) makes the proxy the peer. A LOCAL "
        "header (the proxy's own connection: HAProxy's health checks, but also every client "
        "it accepted on a Unix socket) may only use Verification: every other presentation "
        "context is rejected and a C-STORE refused (0x0124); it needs no access.allow "
        "entry, counts under the per-peer limit as the proxy, and only a clean health check "
        "is logged at debug level. A connection from any other address is closed unread; "
        "a malformed, truncated or slow header is dropped. off: no header is expected (and "
        "one is never guessed). See docs/scale-out.md.",
        choices=("off", "v1", "v2", "any"),
    )
    trusted_proxies: list[str] = field(
        default_factory=list,
        metadata={DOC: "Addresses or networks (CIDR) of the load balancers that send the "
                       "PROXY protocol header; required when proxy_protocol is not off. "
                       "IPv4-mapped entries (::ffff:10.0.0.5) are their IPv4 addresses. "
                       "0.0.0.0/0 or ::/0 (any host may claim any client address) is "
                       "warned about at start and by check-config.",
                  STORESCP: (), RELOAD: True, DEFAULT_NOTE: ""},
    )


ROLE_CHOICES = ("scu", "scp", "both")


@dataclass(frozen=True, slots=True)
class NegotiationProfile:
    """One [negotiation.profiles.NAME] table after validation: numeric UIDs only, file order.

    `contexts` maps each SOP class UID to its transfer syntax UIDs in our order of preference;
    `context_lists` names the [negotiation.transfer_syntaxes] list a context referenced ("" if
    it was written inline), so the profile can be written back as it was meant.  `roles` maps
    SOP class UIDs to one of ROLE_CHOICES, `extended_negotiation` to the raw bytes of the
    service class application information we answer with.
    """

    contexts: dict[str, tuple[str, ...]]
    context_lists: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    extended_negotiation: dict[str, bytes] = field(default_factory=dict)


_TRANSFER_SYNTAXES_EXAMPLE = """\
[negotiation.transfer_syntaxes]
Uncompressed = ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"]
JPEG = ["JPEGBaseline8Bit", "JPEGExtended12Bit", "ImplicitVRLittleEndian"]"""

_PROFILES_EXAMPLE = """\
[negotiation.profiles.CT.contexts]
Verification = "Uncompressed"
CTImageStorage = "JPEG"
"1.2.840.10008.5.1.4.1.1.4" = ["JPEG2000Lossless", "ExplicitVRLittleEndian"]

[negotiation.profiles.CT.roles]
CTImageStorage = "both"

[negotiation.profiles.CT.extended_negotiation]
CTImageStorage = "020003000000"
"""


@dataclass(frozen=True, slots=True)
class NegotiationConfig:
    """[negotiation]: which presentation contexts we accept and in which preference order.

    Either storescp's built-in lists (preferred_transfer_syntax, promiscuous) or a negotiation
    profile (profile), the content of a DCMTK association configuration file (storescp -xf)
    in TOML.  dicom-ingestd config from-storescp -- -xf FILE PROFILE ... and dicom-ingestd
    config from-asconfig FILE [PROFILE] translate such a file.  A changed profile applies to
    new associations on reload.
    """

    preferred_transfer_syntax: str = setting(
        DEFAULT_PREFERENCE,
        "Transfer syntax preference list, as storescp's --prefer-* options (+x=, +xe, +xb, ...).",
        storescp=tuple(short for short, _ in STORESCP_PREFERENCE_FLAGS.values()),
        choices=PREFERENCE_CHOICES,
    )
    promiscuous: bool = setting(
        False, "Accept unknown SOP classes too, keeping our transfer syntax preference.",
        storescp=("-pm", "--promiscuous"),
    )
    profile: str = setting(
        "", "The negotiation profile to use: the NAME of a [negotiation.profiles.NAME] table. "
        "It alone then decides, as storescp -xf does: a proposed context whose SOP class it "
        "lists is accepted with the first of the SOP class's transfer syntaxes the peer "
        "proposed (else refused: transfer syntaxes not supported), other SOP classes are "
        "refused (abstract syntax not supported), roles and extended negotiation are answered "
        "from the profile. Empty: preferred_transfer_syntax and promiscuous decide; a profile "
        "cannot be combined with either (as in storescp).",
        storescp=("-xf", "--config-file"),
    )
    transfer_syntaxes: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={DOC: "Named transfer syntax lists that profiles refer to: NAME = [transfer "
                       "syntaxes in our order of preference], each a UID or a DICOM keyword "
                       "(ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEG2000Lossless, ...).",
                  STORESCP: ("-xf", "--config-file"), RELOAD: True, DEFAULT_NOTE: "",
                  EXAMPLE: _TRANSFER_SYNTAXES_EXAMPLE},
    )
    profiles: dict[str, NegotiationProfile] = field(
        default_factory=dict,
        metadata={DOC: "Negotiation profiles, one table per profile name. Its contexts table "
                       "maps each SOP class we accept (a UID or DICOM keyword; each once) to "
                       "the name of a transfer_syntaxes list or to an inline list. Optional: "
                       "roles maps SOP classes of contexts to scu, scp or both (our SCP/SCU "
                       "role selection; a peer proposing the default role for a SOP class "
                       "set to scp has that context refused), and extended_negotiation maps "
                       "SOP classes of contexts to hexadecimal service class application "
                       "information (1 to 1023 bytes), sent whenever a context of the SOP "
                       "class is accepted, as storescp does.",
                  STORESCP: ("-xf", "--config-file"), RELOAD: True, DEFAULT_NOTE: "",
                  EXAMPLE: _PROFILES_EXAMPLE},
    )


@dataclass(frozen=True, slots=True)
class AssociationConfig:
    """[association]: who may associate, and how requests are screened."""

    refuse: bool = setting(
        False, "Refuse every association (A-ASSOCIATE-RJ, permanent, no reason given).",
        storescp=("--refuse",),
    )
    reject_without_implementation_uid: bool = setting(
        False, "Reject associations whose request carries no implementation class UID.",
        storescp=("--reject",),
    )
    require_called_aetitle: bool = setting(
        False, "Reject requests whose called AE title is not network.aetitle "
        "(A-ASSOCIATE-RJ, called AE title not recognized). storescp accepts any called AE.",
    )
    allowed_calling_aetitles: list[str] = field(
        default_factory=list,
        metadata={DOC: "Calling AE titles allowed to associate; empty allows any "
                       "(others: A-ASSOCIATE-RJ, calling AE title not recognized).",
                  STORESCP: (), RELOAD: True, DEFAULT_NOTE: ""},
    )
    uid_padding: bool = setting(
        False, "Silently correct space-padded UIDs in received command sets.",
        storescp=("-up", "--uid-padding"),
    )


@dataclass(frozen=True, slots=True)
class TestingConfig:
    """[testing]: storescp's test aids. Never enable these in production."""

    ignore: bool = setting(
        False, "Receive data but do not store it (the status is still success).",
        storescp=("--ignore",),
    )
    sleep_after: int = setting(
        0, "Seconds to sleep after each store's response.",
        storescp=("--sleep-after",), minimum=0,
    )
    sleep_during: int = setting(
        0, "Seconds to sleep while receiving each store's data set.",
        storescp=("--sleep-during",), minimum=0,
    )
    abort_after: bool = setting(
        False, "Abort the association after receiving a C-STORE-RQ, before responding.",
        storescp=("--abort-after",),
    )
    abort_during: bool = setting(
        False, "Abort the association while a C-STORE-RQ data set is being received.",
        storescp=("--abort-during",),
    )


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """[storage]: where received objects go, how they are named and how they are encoded.
    By default an object is stored exactly as received, streamed to disk in bounded memory
    (as storescp +B). When transfer_syntax, sequence_lengths, group_length, file_padding,
    item_padding or new_vrs ask for another encoding, each object is re-encoded the way
    storescp writes it (byte for byte); that holds the whole object in memory, about twice
    its size, in the association's worker while it is written."""

    output_directory: str = setting(
        ".", "Existing directory that receives the objects.",
        storescp=("-od", "--output-directory"),
    )
    group_write: bool = setting(
        False, "Let the members of the daemon's group move and delete received files: "
        "directories are created group-writable (and the output directory made so at "
        "start), so a consumer in the group can take files away. Off: the group can read "
        "files and list directories only (the daemon's umask decides, 0027 under systemd).",
        reload=False,
    )
    bit_preserving: bool = setting(
        False, "Write the data set exactly as received (storescp +B). The default does that "
        "too (every encoding key below at \"received\"); true also makes any key that would "
        "re-encode a configuration error, as storescp refuses them with +B.",
        storescp=("+B", "--bit-preserving", "-B", "--normal"),
    )
    file_format: str = setting(
        "file", "file: preamble, File Meta Information and data set (storescp +F); dataset: "
        "the data set alone (storescp -F).",
        storescp=("+F", "--write-file", "-F", "--write-dataset"), choices=("file", "dataset"),
    )
    transfer_syntax: str = setting(
        "received", "Transfer syntax files are written in: received (as negotiated, storescp "
        "+t=), little-explicit (+te), big-explicit (+tb), implicit (+ti) or deflated (+td). "
        "Anything but received re-encodes: pixel data and every other binary value is "
        "byte-swapped as its VR says (OW 16-bit, OF/OL 32-bit, OD/OV 64-bit). Compressed "
        "data sets cannot be converted: refused with 0xA700, as storescp does.",
        storescp=("+t=", "--write-xfer-same", "+te", "--write-xfer-little", "+tb",
                  "--write-xfer-big", "+ti", "--write-xfer-implicit", "+td",
                  "--write-xfer-deflated"),
        choices=("received", "little-explicit", "big-explicit", "implicit", "deflated"),
    )
    sequence_lengths: str = setting(
        "received", "Length encoding of sequences and items: received (each as it arrived), "
        "explicit (storescp +e) or undefined, with delimitation items (storescp -e).",
        storescp=("+e", "--length-explicit", "-e", "--length-undefined"),
        choices=("received", "explicit", "undefined"),
        default_note="storescp re-encodes with explicit lengths (+e) unless +B is given; "
        "received keeps the sender's encoding and the streaming path.",
    )
    group_length: str = setting(
        "received", "Group length elements (gggg,0000): received (as they arrived; "
        "recalculated when another key re-encodes), recalc (recalculate those present, "
        "storescp +g=), create (write one for every group, +g) or remove (-g).",
        storescp=("+g=", "--group-length-recalc", "+g", "--group-length-create", "-g",
                  "--group-length-remove"),
        choices=("received", "recalc", "create", "remove"),
        default_note="storescp recalculates group lengths (+g=) unless +B is given; "
        "received keeps them and the streaming path.",
    )
    file_padding: int = setting(
        0, "Pad each file to a multiple of this many bytes with a trailing padding element "
        "(FFFC,FFFC), as storescp +p f i (f); 0: none. Even. Re-encoding without padding "
        "removes received trailing padding elements, as storescp -p does.",
        storescp=("+p", "--padding-create", "-p", "--padding-off"), minimum=0,
        maximum=2**32 - 2,
    )
    item_padding: int = setting(
        0, "Pad each sequence item's content to a multiple of this many bytes (storescp +p f i: "
        "i); 0: none. Even.",
        storescp=("+p", "--padding-create"), minimum=0, maximum=2**32 - 2,
    )
    deflate_level: int = setting(
        6, "zlib level (0-9) for files written deflated: transfer_syntax = deflated, or a "
        "deflated data set re-encoded with transfer_syntax = received (storescp +cl).",
        storescp=("+cl", "--compression-level"), minimum=0, maximum=9,
    )
    max_decoded_size: int = setting(
        512 << 20, "Largest data set, in bytes after inflation, that is decoded rather than "
        "streamed: a data set the keys above re-encode (held in memory, about twice this "
        "size at the peak), and the part of a deflated data set inflated to find its "
        "identifying attributes (in a 64 KiB buffer: this bounds CPU time, not memory). A "
        "larger one is refused with 0xA700 (out of resources) and one log line. Objects "
        "stored as received are never limited: they stream to disk whatever their size.",
        minimum=1 << 16,
        default_note="storescp has no limit: without +B it inflates and holds every data "
        "set in memory (a 1 MB deflated upload can inflate to gigabytes).",
    )
    new_vrs: bool = setting(
        True, "Write the post-1993 VRs UN, UT, UC, UR, OF, OD, OL, OV, SV, UV (storescp +u); "
        "false writes them as OB in explicit VR transfer syntaxes (storescp -u).",
        storescp=("+u", "--enable-new-vr", "-u", "--disable-new-vr"),
    )
    sort: str = setting(
        "none", "Sort into study subdirectories: none, conc-studies (prefix_YYYYMMDD_HHMMSSmmm), "
        "study-uid (prefix_StudyInstanceUID), patientname (PatientName_YYYYMMDD_HHMMSSmmm).",
        storescp=("-ss", "--sort-conc-studies", "-su", "--sort-on-study-uid", "-sp",
                  "--sort-on-patientname"),
        choices=("none", "conc-studies", "study-uid", "patientname"),
    )
    sort_prefix: str = setting(
        "", "Prefix of study subdirectory names (sort = conc-studies or study-uid).",
        # storescp takes the prefix as the value of -ss / -su (which also set storage.sort).
        storescp=("-ss", "--sort-conc-studies", "-su", "--sort-on-study-uid"),
    )
    filenames: str = setting(
        "default", "File names: default (MOD.SOPInstanceUID), unique (MOD.X.<new UID>), "
        "timenames (YYYYMMDDHHMMSSmmm[_NNNN].MOD).",
        storescp=("-uf", "--default-filenames", "+uf", "--unique-filenames", "-tn",
                  "--timenames"),
        choices=("default", "unique", "timenames"),
    )
    filename_extension: str = setting(
        "", "Suffix appended to every file name (no dot is added).",
        storescp=("-fe", "--filename-extension"),
    )
    duplicates: str = setting(
        "overwrite", "When the target file exists: overwrite (as storescp), keep-first (answer "
        "success, keep the existing file), keep-both (store the new one as NAME_N), reject "
        "(answer failure 0x0111, duplicate SOP instance).",
        choices=("overwrite", "keep-first", "keep-both", "reject"),
    )
    fsync: bool = setting(
        True, "Make each file and its name durable (fsync; see sync_directories) before "
        "answering success. Off: storescp's speed, but an acknowledged object can be lost in "
        "a power failure.",
        default_note="storescp never fsyncs; we do, so success means durable.",
    )
    sync_directories: str = setting(
        "auto", "How a stored file's name is made durable (with fsync on). \"always\": fsync "
        "the file, link it into place, fsync the directory (POSIX's recipe, two journal "
        "commits per object). \"auto\": on ext4, write the data out before linking and "
        "fsync the file after: one journal commit that covers data and name, or without a "
        "journal one fsync, which on ext4 also writes a new name's directories (about 0.2 "
        "ms less per object); \"always\" on any other file system. The start-up line says "
        "which applies.",
        choices=("auto", "always"),
        default_note="Not a storescp option (storescp never fsyncs).",
    )
    min_free_space: int = setting(
        0, "Refuse objects (status 0xA700) while the output file system has fewer free bytes "
        "than this; 0 disables the check.", minimum=0,
    )

    def reencoding_keys(self) -> tuple[str, ...]:
        """The encoding keys whose values make objects be re-encoded (whole data set in
        memory) instead of stored as received; empty on the streaming path."""
        found = [key for key in ("transfer_syntax", "sequence_lengths", "group_length")
                 if getattr(self, key) != "received"]
        found += [key for key in ("file_padding", "item_padding") if getattr(self, key)]
        if not self.new_vrs:
            found.append("new_vrs")
        return tuple(found)


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """[events]: commands run when objects arrive and when studies are complete, as
    storescp's -xcr, -xcs, -rns, -tos and -xs.  A command is a list, the program and its
    arguments, run without a shell (unless shell = true).  In each element the placeholders #p
    (the object's directory; at end of study the study's directory), #f (the object's file
    name; reception only), #a (calling AE title), #c (called AE title) and #r (peer IP
    address) are replaced by their values, so a value from the network is always part of one
    argument and never reaches a shell.  It can still look like an option: a calling AE
    title such as -rf is one argument "-rf", which a program parsing options takes for one.
    Put "--" before the placeholders (["/usr/local/bin/forward", "--", "#p/#f", "#a"]) for a
    program that follows that convention (getopt, argparse and most tools do), or pass the
    values as DICOM_* variables instead.  Commands also get DICOM_* environment variables:
    DICOM_EVENT, DICOM_OUTPUT_DIR, DICOM_FILE, DICOM_FILENAME, DICOM_STUDY_UID,
    DICOM_SERIES_UID, DICOM_SOP_INSTANCE_UID, DICOM_SOP_CLASS_UID, DICOM_PATIENT_ID,
    DICOM_CALLING_AE, DICOM_CALLED_AE, DICOM_PEER, DICOM_JOB_ID, DICOM_JOB_ATTEMPT; at end of
    study DICOM_BATCH, DICOM_EOSTUDY_REASON, DICOM_FILE_COUNT, DICOM_FILES (one path per
    line, left out beyond 64 KiB) and DICOM_MANIFEST (a JSON file listing the study's
    objects).  Studies are tracked per study, in the master, for every worker: a study is
    complete when an association that stored objects of it goes on to another study, when a
    later association stores an object of another study, or when no object of it arrived for
    eostudy_timeout seconds; never when an association just ends.  An object of a complete
    study opens a new batch of it, handled as a study of its own.  Files are renamed before
    the end-of-study command runs, and only after the reception jobs of the study's objects.
    """

    exec_on_reception: list[str] = field(
        default_factory=list,
        metadata={DOC: "Command run for each object stored, e.g. [\"/usr/local/bin/forward\", "
                       "\"--\", \"#p/#f\", \"#a\"]; empty: none. Objects whose store failed "
                       "never run it.",
                  STORESCP: ("-xcr", "--exec-on-reception"), RELOAD: True, DEFAULT_NOTE: ""},
    )
    exec_on_eostudy: list[str] = field(
        default_factory=list,
        metadata={DOC: "Command run once per complete study (after rename_on_eostudy); #p is "
                       "the study's directory, DICOM_MANIFEST a JSON file listing its objects, "
                       "e.g. [\"/usr/local/bin/archive\", \"--\", \"#p\"]. Empty: none.",
                  STORESCP: ("-xcs", "--exec-on-eostudy"), RELOAD: True, DEFAULT_NOTE: ""},
    )
    shell: bool = setting(
        False, "Run commands through /bin/sh -c, as storescp does: the first element is a shell "
        "command line (further elements become $0, $1, ...). Values never enter its text: each "
        "placeholder becomes a quoted reference to the variable holding its value "
        "(\"${DICOM_OUTPUT_DIR}\" for #p, DICOM_FILENAME #f, DICOM_CALLING_AE #a, "
        "DICOM_CALLED_AE #c, DICOM_PEER #r), so the shell never parses a value as code. "
        "Write placeholders unquoted (cmd -- #p/#f #a).",
        storescp=("-xcr", "--exec-on-reception", "-xcs", "--exec-on-eostudy"),
        default_note="storescp always runs commands through /bin/sh, pasting values "
        "unquoted into the command line.",
    )
    rename_on_eostudy: bool = setting(
        False, "When a study is complete, rename its files to the first two letters of the "
        "modality and a 6-digit number in order of arrival (CT000001, ...), as storescp -rns, "
        "but never over an existing file: a later batch of the same study continues the "
        "numbering. Requires storage.sort.",
        storescp=("-rns", "--rename-on-eostudy"),
    )
    eostudy_timeout: int = setting(
        60, "Seconds without a new object of an open study after which the study is "
        "complete; 0: only a following study completes it.",
        storescp=("-tos", "--eostudy-timeout"), minimum=0,
        default_note="storescp has no timeout unless -tos is given.",
    )
    exec_sync: bool = setting(
        False, "The association waits, after each object's response, until the object's jobs "
        "(reception, and the end-of-study jobs it triggered) are finished, retries included.",
        storescp=("-xs", "--exec-sync"),
    )
    exec_sync_timeout: int = setting(
        600, "With exec_sync, the longest an association waits for one object's jobs; then "
        "it goes on (the jobs stay queued) and a warning is logged. A master that exits "
        "ends the wait at once; a paused one does not.", minimum=1,
        default_note="storescp waits for the command without limit.",
    )
    on_stop: str = setting(
        "persist", "Studies still open when the daemon stops: persist (resume them after the "
        "restart, the timeout counting from the restart) or close (complete them now; their "
        "jobs run after the restart).", choices=("persist", "close"),
    )


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """[jobs]: the persistent queue that runs [events] commands.  Every command becomes a
    job, recorded in a SQLite database in the state directory before it runs, then run with
    a timeout, retried with backoff, and dead-lettered after its last failure.  A job's
    stdout and stderr lines are logged (journal fields JOB_ID, JOB_KIND, JOB_COMMAND,
    DICOM_STUDY_UID).  Jobs that were pending or running when the daemon stopped or crashed
    run again after the restart: delivery is at least once, so commands must tolerate running
    twice.  Inspect and re-queue jobs with dicom-ingestd jobs list, jobs show ID and jobs retry
    ID.
    """

    state_directory: str = setting(
        "", "Directory of the job database and study manifests. Empty: .ingestd-state in "
        "storage.output_directory; a relative path is relative to storage.output_directory.",
        reload=False,
    )
    concurrency: int = setting(
        4, "Most jobs of [events] running at once (storage commitment reports have slots of "
        "their own: storage_commitment.delivery_concurrency).", minimum=1, maximum=1024,
    )
    timeout: int = setting(
        3600, "Seconds one run of a job may take; then its whole process group is killed "
        "(SIGTERM, SIGKILL 5 s later) and the run counts as failed. 0: no limit.", minimum=0,
        default_note="storescp waits for commands forever.",
    )
    retries: int = setting(
        3, "Further runs of a failed job (non-zero exit, signal, timeout) before it is "
        "dead-lettered (state dead, kept until retried by hand).", minimum=0, maximum=100,
        default_note="storescp runs a command once and ignores its exit status.",
    )
    retry_backoff: int = setting(
        10, "Seconds before the first retry; each further retry waits twice as long.",
        minimum=0,
    )
    retry_backoff_max: int = setting(
        600, "Longest wait between retries, in seconds.", minimum=0,
    )
    keep_done_days: int = setting(
        7, "Days finished jobs and complete studies stay in the database (for jobs list and "
        "batch numbering); dead jobs stay until retried.", minimum=0,
    )


STORAGE_COMMITMENT_OBJECTS_FROM = ("any", "requester")


@dataclass(frozen=True, slots=True)
class StorageCommitmentConfig:
    """[storage_commitment]: the Storage Commitment Push Model SCP (SOP class
    1.2.840.10008.1.20.1): a sender asks, with an N-ACTION naming SOP instances, whether this
    daemon takes responsibility for them, and is told in an N-EVENT-REPORT which ones it
    committed (event type 1: all of them; 2: a Failed SOP Sequence with a reason per object:
    0x0112 never stored here or no longer where it was filed, 0x0119 stored with another SOP
    class, 0x0131 a transaction UID already used).  Committed means: this daemon stored that
    SOP instance with that SOP class and made its file and its durable record safe before
    answering the C-STORE, and the file is still where it was filed (or where the rename at
    end of study put it).  Objects received before a restart count; objects received while
    neither this table nor [events] was enabled are unknown.  Each request is recorded
    durably before its N-ACTION response, and evaluated only after every object record
    written before it was read.  The report goes back on the requesting association when the
    sender keeps it open (waiting up to same_association_wait seconds); otherwise, or when that
    fails, it is a job (kind commitment: retries with backoff, timeout and dead letter as
    [jobs], at least once, kept across restarts) that opens an association to the calling AE
    title's address in [remote_aes], proposing the SCP role for the SOP class.  Access
    control, [association] AE title checks and [tls] apply to these associations as to
    stores.  storescp has no such service, so no storescp option maps here.
    """

    enabled: bool = setting(
        False, "Accept the Storage Commitment Push Model SOP class and serve N-ACTION "
        "requests (needs the state directory of [jobs], as [events] do). With "
        "negotiation.profile set, the profile must list the SOP class too.",
        default_note="storescp has no storage commitment.",
    )
    allowed_calling_aetitles: list[str] = field(
        default_factory=list,
        metadata={DOC: "Calling AE titles that may request storage commitment; empty: any "
                       "calling AE title [association] admits. Others are answered 0x0124 "
                       "(refused: not authorized) and nothing is recorded.",
                  STORESCP: (), RELOAD: True, DEFAULT_NOTE: ""},
    )
    objects_from: str = setting(
        "any", "Which stored objects a request may be committed for: any (whichever calling "
        "AE title sent them: a router or another modality may have sent what a modality "
        "asks about) or requester (only objects sent with the requesting calling AE title; "
        "others fail with 0x0112, as if never stored). A file sent again by another AE title "
        "stays committed to the first one too (the latest 8 senders of a file count).",
        choices=STORAGE_COMMITMENT_OBJECTS_FROM,
    )
    max_references: int = setting(
        50000, "Most SOP instances one N-ACTION may reference. The request's data set is held "
        "in memory while it is read, at most 160 bytes per reference plus 64 KiB (8 MiB at "
        "the default); a larger one is read and discarded without being kept, the request is "
        "answered 0x0213 (resource limitation) and nothing is recorded.",
        minimum=1, maximum=1000000,
    )
    same_association_wait: int = setting(
        10, "Seconds the requesting association waits, after the N-ACTION response, for the "
        "report to be ready (usually well under a second) and then sends it there if the "
        "sender has sent nothing else meanwhile; its answer is awaited as long (or "
        "network.dimse_timeout if shorter). 0, a sender that goes on or releases, or a "
        "report not answered with success in time: the report is delivered on a new "
        "association.",
        minimum=0, maximum=600,
    )
    delivery_retries: int = setting(
        20, "Further attempts to deliver a report on a new association (peer down, "
        "association rejected, role refused, failure status) before its job is "
        "dead-lettered; the waits between attempts are those of jobs.retry_backoff and "
        "jobs.retry_backoff_max (with their defaults, 20 retries span about two and a half hours).",
        minimum=0, maximum=1000,
    )
    delivery_concurrency: int = setting(
        2, "Most reports being delivered on new associations at once, at most one per AE "
        "title. These runs have slots of their own, apart from jobs.concurrency: a modality "
        "that never answers holds one slot (each attempt up to network.acse_timeout and "
        "network.dimse_timeout), never delays the jobs of [events], and reports to other "
        "AE titles go out in the other slots.", minimum=1, maximum=64,
    )
    max_spool_size: int = setting(
        1 << 30, "Bytes the requests and undelivered reports in the state directory "
        "(commitment/ in jobs.state_directory) may take; a request arriving while they take "
        "more is answered 0x0213 (resource limitation) and nothing is recorded, so that "
        "reports for a modality that never takes them cannot fill the file system the "
        "outbox needs for every store. A report is removed once delivered, an undelivered "
        "one with its dead job keep_days after it died.", minimum=1 << 20,
    )
    keep_days: int = setting(
        30, "Days stored objects stay known to storage commitment (and transaction UIDs "
        "are remembered) after they were received; a request for an older object fails "
        "with 0x0112 and the sender can send it again.", minimum=1,
    )


_REMOTE_AES_EXAMPLE = """[remote_aes.CT01]
host = "10.1.2.3"
port = 104

[remote_aes.MR01]
host = "mr01.example.org"
port = 2762
tls = true"""


@dataclass(frozen=True, slots=True)
class RemoteAE:
    """One [remote_aes.TITLE] table: where a DICOM application entity listens."""

    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True, slots=True)
class RemoteAEsConfig:
    """[remote_aes]: the addresses of other application entities, by AE title, for the
    associations this daemon opens itself (storage commitment reports).  Each entry is a
    table [remote_aes.TITLE] with host (name or address), port and tls (true: DICOM over
    TLS, verifying the peer's certificate against tls.ca_files and tls.ca_directories and
    presenting tls.certificate when one is set; the host name is not matched)."""

    aetitles: dict[str, RemoteAE] = field(
        default_factory=dict,
        metadata={DOC: "Remote application entities, one table per AE title (the whole "
                       "[remote_aes] table: every key is an AE title).",
                  STORESCP: (), RELOAD: True, DEFAULT_NOTE: "", EXAMPLE: _REMOTE_AES_EXAMPLE,
                  WHOLE_TABLE: True},
    )


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """[workers]: the process model and the limits on parallel associations."""

    process_model: str = setting(
        "fork", "fork: one worker process per association (a crash in one association "
        "cannot affect another; parallel associations use every core); single: one process, "
        "a thread per association.",
        storescp=("--fork", "--single-process"), choices=("fork", "single"), reload=False,
        default_note="storescp runs a single process unless --fork is given.",
    )
    max_associations: int = setting(
        100, "Most associations served at once; one more waits up to 0.5 s for a place "
        "(a sender reconnecting right after its A-RELEASE-RP finds the one it released), "
        "then is answered with A-ASSOCIATE-RJ (transient, local limit exceeded); beyond 16 "
        "such waits or answers in progress further connections are closed at once. "
        "0: unlimited.",
        storescp=("--max-associations",), minimum=0,
        default_note="storescp --fork has no limit. Each association costs a process and "
        "descriptors (the master keeps three per worker): unlimited, a flood of silent "
        "connections exhausts the descriptor limit and delays everyone. 100 parallel "
        "associations is far more than PACS traffic needs; raise it with LimitNOFILE=.",
    )
    max_associations_per_peer: int = setting(
        32, "Most associations served at once for one peer address (same rejection). "
        "0: unlimited.", minimum=0,
        default_note="Not a storescp option. One address flooding the port (a scanner, a "
        "sender gone wrong) then holds at most a third of max_associations, and other "
        "senders are still served; a router that opens more parallel associations needs "
        "it raised.",
    )
    stop_timeout: int = setting(
        30, "Seconds running associations may take to finish on stop, before they are "
        "aborted (their partial objects are discarded).", minimum=0,
    )
    spare_workers: int = setting(
        4, "Idle worker processes kept forked and ready (process_model = fork): a new "
        "association is handed to one at once, and a replacement is forked afterwards. After "
        "a burst up to twice as many stay idle. 0: fork each worker when its connection "
        "arrives.", minimum=0, maximum=256,
        default_note="Not a storescp option: storescp --fork forks after accept(), which "
        "costs every association the fork, its copy-on-write faults and its exit (about "
        "9 ms of CPU). An idle worker costs about 1.7 MiB of memory (PSS: its pages are "
        "shared with the master until written), an association in progress about 3.3 MiB.",
    )
    max_associations_per_worker: int = setting(
        1000, "Associations one worker process serves, one after another, before a fresh "
        "process replaces it. A worker serves another association only after a clean one: "
        "ended by A-RELEASE, without TLS, without a failed C-STORE, and with the descriptors, "
        "threads and (within 16 MiB) the memory it had before; otherwise it exits. 1: a fresh "
        "process for every association. 0: no limit.", minimum=0,
        default_note="Not a storescp option (storescp --fork forks for every association); "
        "as Apache's MaxConnectionsPerChild, a bound on what a slow leak could accumulate.",
    )


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """[access]: which peer addresses may connect, decided before a byte is read."""

    allow: list[str] = field(
        default_factory=list,
        metadata={DOC: "Addresses or networks (CIDR, IPv4 or IPv6) that may connect; empty "
                       "allows every address not denied. IPv4-mapped entries "
                       "(::ffff:10.0.0.5) are their IPv4 addresses, as peers are.",
                  STORESCP: ("+ac", "--access-control"), RELOAD: True, DEFAULT_NOTE: ""},
    )
    deny: list[str] = field(
        default_factory=list,
        metadata={DOC: "Addresses or networks (CIDR) that may never connect; wins over allow. "
                       "Refused connections are closed without reading from them.",
                  STORESCP: ("+ac", "--access-control"), RELOAD: True, DEFAULT_NOTE: ""},
    )


TLS_PROFILES = ("bcp195-nd", "bcp195", "bcp195-ex", "rfc8996", "aes")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """[tls]: DICOM over TLS, as storescp's +tls option group.  The context is built once at
    start-up and at each reload (so certificates can be renewed with a reload); files are read
    then, by the daemon's user.  A path may start with $CREDENTIALS_DIRECTORY/ to name a
    systemd credential (LoadCredential=name:/etc/ssl/private/dicom.key, then
    private_key = "$CREDENTIALS_DIRECTORY/name"): systemd reads the file as root and hands
    it to the unprivileged service.  The TLS handshake runs in the association's worker,
    bounded by network.acse_timeout, never in the process that accepts connections.
    """

    enabled: bool = setting(
        False, "Accept only TLS connections on every listening socket (storescp +tls); "
        "needs private_key and certificate.",
        storescp=("+tls", "--enable-tls", "-tls", "--disable-tls"),
    )
    private_key: str = setting(
        "", "Our private key file. Refused when readable by every user (mode o+r); "
        "group-readable is allowed for the ssl-cert group convention.",
        storescp=("+tls", "--enable-tls"),
    )
    certificate: str = setting(
        "", "Our certificate file (PEM: may hold the intermediate certificates after ours).",
        storescp=("+tls", "--enable-tls"),
    )
    key_password_file: str = setting(
        "", "File whose first line is the private key's password (or a systemd credential). "
        "Empty: the key must be unencrypted (an empty password is tried, as storescp -pw). "
        "storescp's +pw on the command line and +ps prompting have no daemon equivalent.",
        storescp=("+pw", "--use-passwd", "-pw", "--null-passwd"),
    )
    file_format: str = setting(
        "pem", "Format of the key, certificate, CA and CRL files: pem or der.",
        storescp=("-pem", "--pem-keys", "-der", "--der-keys"), choices=("pem", "der"),
    )
    ca_files: list[str] = field(
        default_factory=list,
        metadata={DOC: "Files of trusted CA certificates that sign peer certificates.",
                  STORESCP: ("+cf", "--add-cert-file"), RELOAD: True, DEFAULT_NOTE: ""},
    )
    ca_directories: list[str] = field(
        default_factory=list,
        metadata={DOC: "Directories of trusted CA certificates (PEM: OpenSSL hashed names, "
                       "see openssl rehash; DER: every file in the directory).",
                  STORESCP: ("+cd", "--add-cert-dir"), RELOAD: True, DEFAULT_NOTE: ""},
    )
    crl_files: list[str] = field(
        default_factory=list,
        metadata={DOC: "Certificate revocation list files; any implies crl_check = leaf "
                       "unless crl_check says chain.",
                  STORESCP: ("+crl", "--add-crl-file"), RELOAD: True, DEFAULT_NOTE: ""},
    )
    crl_check: str = setting(
        "none", "Check peer certificates against crl_files: none, leaf (the peer's "
        "certificate) or chain (every certificate of the chain; each CA needs a CRL).",
        storescp=("+crv", "--enable-crl-vfy", "+cra", "--enable-crl-all"),
        choices=("none", "leaf", "chain"),
    )
    profile: str = setting(
        "bcp195-nd", "DICOM TLS security profile: bcp195-nd (non-downgrading BCP 195: TLS 1.2 "
        "ECDHE/DHE-RSA AES-GCM suites, and TLS 1.3), bcp195 (adds TLS_RSA_WITH_AES_128_CBC_SHA), "
        "bcp195-ex (extended: also ECDSA AES-GCM suites, TLS 1.2 only, no cipher_suites), "
        "rfc8996 (storescp 3.7's default: ECDHE RSA/ECDSA AES-GCM, and TLS 1.3), aes "
        "(retired AES profile: TLS_RSA_WITH_AES_128_CBC_SHA, TLS 1.2 only).",
        storescp=("+py", "--profile-bcp195-nd", "+px", "--profile-bcp195", "+pz",
                  "--profile-bcp195-ex", "+pg", "--profile-8996", "+pa", "--profile-aes"),
        choices=TLS_PROFILES,
    )
    minimum_version: str = setting(
        "1.2", "Oldest TLS version accepted: 1.2 or 1.3 (TLS 1.0 and 1.1 are never accepted).",
        choices=("1.2", "1.3"),
        default_note="storescp's bcp195 and aes profiles also allow TLS 1.0/1.1 when "
        "OpenSSL does.",
    )
    cipher_suites: list[str] = field(
        default_factory=list,
        metadata={DOC: "TLS 1.2 cipher suites added to the profile's, by TLS name "
                       "(TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, as storescp +cs) or OpenSSL "
                       "name (ECDHE-RSA-AES128-GCM-SHA256). Unencrypted suites are refused; "
                       "TLS 1.3 suites are OpenSSL's.",
                  STORESCP: ("+cs", "--cipher"), RELOAD: True, DEFAULT_NOTE: ""},
    )
    dh_parameters: str = setting(
        "", "PEM file of Diffie-Hellman parameters for the DHE suites; empty: DHE suites are "
        "not used (ECDHE and TLS 1.3 are).", storescp=("+dp", "--dhparam"),
        default_note="storescp has built-in 2048-bit DH parameters.",
    )
    peer_certificate: str = setting(
        "require", "Client certificates: require (verified against the CA files, a client "
        "without one is refused), verify (verified when sent), ignore (not asked for).",
        storescp=("-rc", "--require-peer-cert", "-vc", "--verify-peer-cert", "-ic",
                  "--ignore-peer-cert"),
        choices=("require", "verify", "ignore"),
    )
    allowed_subjects: list[str] = field(
        default_factory=list,
        metadata={DOC: "Verified client certificate subjects allowed to connect, e.g. "
                       "\"CN=ct1,O=Hospital\" or as openssl prints it (attribute order, case "
                       "and spaces around = and , do not matter); others are logged and "
                       "closed before any DICOM byte. Empty (and no subject_aetitles): any "
                       "verified client.",
                  STORESCP: (), RELOAD: True, DEFAULT_NOTE: ""},
    )
    subject_aetitles: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={DOC: "Calling AE titles each client certificate subject may use, as a "
                       "table: [tls.subject_aetitles] \"CN=ct1,O=Hospital\" = [\"CT1\"]. "
                       "A subject listed here is allowed too; another calling AE title is "
                       "rejected (A-ASSOCIATE-RJ, calling AE title not recognized).",
                  STORESCP: (), RELOAD: True, DEFAULT_NOTE: ""},
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """[logging]: what goes to stderr (and the journal)."""

    level: str = setting(
        "info", "Lowest level logged: fatal, error, warn, info, debug, trace.",
        storescp=("-q", "--quiet", "-v", "--verbose", "-d", "--debug", "-ll", "--log-level"),
        choices=("fatal", "error", "warn", "info", "debug", "trace"),
        default_note="storescp logs warnings and errors only; a daemon logs each association.",
    )
    verbose_pc: bool = setting(
        False, "Log the presentation contexts of each association at info level.",
        storescp=("+v", "--verbose-pc"),
    )
    journal_prefix: str = setting(
        "auto", "Prefix lines with <N> syslog priorities: auto (when stderr is the journal), "
        "always, never.", choices=("auto", "always", "never"),
    )


@dataclass(frozen=True, slots=True)
class MonitoringConfig:
    """[monitoring]: what the daemon tells monitoring beyond the journal.  Counters
    (associations by outcome and calling AE, objects by DIMSE status, bytes, commit latency,
    the last store and the last error) survive restarts; dicom-ingestd status shows them with
    the jobs by state and the free space, and dicom-ingestd metrics prints them in the
    Prometheus text format."""

    low_space_margin: int = setting(
        2147483648, "Warn (journal, STATUS=, status, metrics) while the output or state file "
        "system has fewer free bytes than storage.min_free_space plus this margin, i.e. "
        "before objects are refused; 0: no warning.", minimum=0,
    )
    metrics_file: str = setting(
        "", "Write the metrics (Prometheus text format) to this file every metrics_interval "
        "seconds and at stop, for node_exporter's textfile collector, e.g. "
        "\"/var/lib/prometheus/node-exporter/dicom-ingestd.prom\" (under systemd, allow "
        "the directory with ReadWritePaths=). Empty: no file.",
    )
    metrics_interval: int = setting(
        15, "Seconds between two writes of metrics_file.", minimum=1, maximum=3600,
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole daemon configuration: one typed, validated, immutable object."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    negotiation: NegotiationConfig = field(default_factory=NegotiationConfig)
    association: AssociationConfig = field(default_factory=AssociationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    storage_commitment: StorageCommitmentConfig = field(
        default_factory=StorageCommitmentConfig)
    remote_aes: RemoteAEsConfig = field(default_factory=RemoteAEsConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)


def tables() -> list[tuple[str, type]]:
    """The top-level tables in declaration order: (table name, section dataclass)."""
    return [(f.name, f.type) for f in dataclasses.fields(Config)]  # type: ignore[misc]


def keys() -> list[tuple[str, dataclasses.Field[Any]]]:
    """Every key as ("table.key", field), in declaration order."""
    return [(f"{table}.{f.name}", f) for table, cls in tables() for f in dataclasses.fields(cls)]
