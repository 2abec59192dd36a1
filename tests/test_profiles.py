"""Negotiation profiles (storescp -xf FILE PROFILE): reading DCMTK's files, the TOML tables, and
the acceptance behaviour compared with the real storescp 3.6.7.

(a) Reading association configuration files (config/asconfig.py): DCMTK's name table against
    the installed libdcmdata (tests/dcmtk_facts.py), the shipped storescp.cfg, the reader's
    quirks, and a differential on whether storescp itself starts with a file (`storescp -xf F
    P -od /nonexistent` fails on the file first, else on the directory, both at once).
(b) The TOML tables: validation problems name file, key and what is allowed; translation of
    the shipped file round-trips through the loader.
(c) Differential: the same A-ASSOCIATE-RQs to `storescp -xf` and to dicom-ingestd configured by
    translating the same command line: every context's result and transfer syntax, every role
    selection and extended negotiation item of the AC, compared exactly -- with pynetdicom
    encoding raw requests (all role proposals, extended negotiation, duplicates) and with DCMTK
    storescu -xf as proposer.  The daemon switches profile on SIGHUP in between (reload).
    Last, test_differential's comparison of the stored files, with the shipped profile.
"""

import contextlib
import re
import signal
import socket
import struct
import subprocess
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcmtk_facts
import pytest
import tomli_w
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_items import (
    SCP_SCU_RoleSelectionSubItem,
    SOPClassExtendedNegotiationSubItem,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SOPClassExtendedNegotiation,
)
from pynetdicom.presentation import PresentationContext
from support.daemon import Daemon, free_port
from support.data import testdata as bundled
from support.peers import require_tool, run_tool
from support.uids import BASIC_TEXT_SR, MWL_FIND, RT_PLAN
from support.uids import CT_IMAGE as CT
from support.uids import MR_IMAGE as MR
from support.uids import SECONDARY_CAPTURE as SC
from support.uids import STORAGE_COMMITMENT_PUSH as STORAGE_COMMITMENT
from support.uids import US_IMAGE as US
from support.wait import wait_until
from test_differential import Receiver, assert_same_output, run_both

from dicom_ingestd.config.asconfig import AsconfigError, parse_asconfig, read_asconfig
from dicom_ingestd.config.load import config_from_mapping, load_config
from dicom_ingestd.config.storescp import translate
from dicom_ingestd.dcmtk import transfer as tsx
from dicom_ingestd.dcmtk.uids import DCMTK_UID_NAMES
from dicom_ingestd.errors import ConfigError
from dicom_ingestd.worker import negotiation as neg

INSTALLED_CFG = Path("/etc/dcmtk/storescp.cfg")

LE, BE, IMPLICIT = tsx.EXPLICIT_LE, tsx.EXPLICIT_BE, tsx.IMPLICIT_LE
DEFLATED, RLE = tsx.DEFLATED_LE, tsx.RLE_LOSSLESS
JPEG8, JPEG12, JPEG_LL = tsx.JPEG_BASELINE, tsx.JPEG_EXTENDED, tsx.JPEG_LOSSLESS_SV1
VERIFICATION = neg.VERIFICATION_SOP_CLASS
PRIVATE = "1.2.826.0.1.3680043.9.7433.99.1"
PRIVATE_OTHER = "1.2.826.0.1.3680043.9.7433.99.2"


# --- DCMTK's shipped storescp.cfg ------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_cfg() -> Path:
    """DCMTK's own storescp.cfg, as Debian's dcmtk installs it."""
    if not INSTALLED_CFG.exists():
        pytest.fail(f"{INSTALLED_CFG} is missing: install Debian's dcmtk, as scripts/test does")
    return INSTALLED_CFG


# --- (a) reading the files --------------------------------------------------------------------


def test_dcmtk_names_match_installed_libdcmdata() -> None:
    """Our copy of DCMTK's UID names is the installed library's map, whole: every UID it
    names, by the same name, and every name resolves to the same UID."""
    assert dcmtk_facts.named_uids() == DCMTK_UID_NAMES
    for name, uid in DCMTK_UID_NAMES.items():
        assert dcmtk_facts.uid_of_name(name) == uid, name
    assert len(DCMTK_UID_NAMES) == 436


def test_shipped_storescp_cfg(shipped_cfg: Path) -> None:
    asconfig = read_asconfig(shipped_cfg)
    assert asconfig.warnings == []
    assert [p.name for p in asconfig.profiles.values()] == ["Default", "AllDICOM"]
    default = asconfig.select("Default")
    assert len(default.contexts) == 128 and default.contexts[0] == (VERIFICATION, "UNCOMPRESSED")
    assert (default.roles, default.extended_negotiation) == ((), ())
    # DCMTK's AnyTransferSyntax is storescp's +xa list (the same file says so).
    assert asconfig.transfer_syntaxes["ANYTRANSFERSYNTAX"] == tsx.PREFERENCES["all"]
    assert asconfig.transfer_syntaxes["UNCOMPRESSED"] == (LE, BE, IMPLICIT)
    assert asconfig.select(" all dicom ").name == "AllDICOM"  # storescp's mangling


QUIRKS = b"""\
# a comment; the next lines show what DCMTK's reader does
[[ Transfer Syntaxes ]]
[Plain.List]
Transfer Syntax1 = =LittleEndianImplicit
TransferSyntax2  = 1.2.840.10008.1.2.1
TransferSyntax4  = BigEndianExplicit
[PLAINLIST]
TransferSyntax1 = LocalEndianExplicit\r
[[PresentationContexts]]
[pcs]
PresentationContext1 = CTImageStorage\\ plain
   list
PresentationContext1 = MRImageStorage\\plainlist
[[PresentationContexts]]
[pcs]
PresentationContext2 = MRImageStorage\\plainlist
[[Profiles]]
[Mine]
presentationcontexts = PCS
"""


def test_reader_quirks() -> None:
    asconfig = parse_asconfig(QUIRKS, "q.cfg")
    # '=' before a name, a numeric UID, LocalEndianExplicit; entries stop at the first gap;
    # two sections with one name are merged; CR LF line ends.
    assert asconfig.transfer_syntaxes == {"PLAINLIST": (IMPLICIT, LE, LE)}
    assert asconfig.transfer_syntax_names == {"PLAINLIST": "Plain.List"}
    assert [w.split(": ", 1)[1] for w in asconfig.warnings] == [
        "entry TRANSFERSYNTAX4 in section [Plain.List] is ignored, as by storescp (entries "
        "are read as TRANSFERSYNTAX1, TRANSFERSYNTAX2, ... up to the first missing number)",
        "a second [[PresentationContexts]] is ignored, as by storescp (only the first "
        "supersection of a name is read)",
        "entry PRESENTATIONCONTEXT1 appears more than once in section [pcs]; the first "
        "counts, as in storescp",
    ]
    # A continuation line joins the reference; the first of two equal keys counts; only the
    # first [[PresentationContexts]] supersection is read.
    assert asconfig.select("mine").contexts == ((CT, "PLAINLIST"),)


ROLES_SECTION = b"SCPSCURoleSelection = R\n[[SCPSCURoleSelection]]\n[R]\n"
EXTNEG_SECTION = b"ExtendedNegotiation = E\n[[ExtendedNegotiation]]\n[E]\n"


def _contexts(count: int) -> bytes:
    """QUIRKS with `count` contexts in its profile's list."""
    extra = b"".join(b"PresentationContext%d = 1.2.3.%d\\plainlist\n" % (n, n)
                     for n in range(2, count + 1))
    return QUIRKS.replace(b"PresentationContext1 = MRImageStorage\\plainlist\n", extra, 1)


# (name, file content, profile, whether storescp starts with it) -- storescp is the oracle
START_CASES: list[tuple[str, bytes, str, bool]] = [
    ("valid", QUIRKS, "Mine", True),
    ("unknown profile", QUIRKS, "Yours", False),
    ("trailing blank in a name",
     QUIRKS.replace(b"=LittleEndianImplicit", b"=LittleEndianImplicit "), "Mine", False),
    ("comment not in column 1", QUIRKS.replace(b"[Mine]\n", b"[Mine]\n  # x\n"), "Mine", False),
    ("no transfer syntaxes", b"[[Profiles]]\n[P]\nPresentationContexts = X\n", "P", False),
    ("missing backslash",
     QUIRKS.replace(b"CTImageStorage\\ plain", b"CTImageStorage plain"), "Mine", False),
    ("unknown list", QUIRKS.replace(b"\\plainlist\n[[Pr", b"\\other\n[[Pr"), "Mine", True),
    ("unknown list used", QUIRKS.replace(b"\\ plain", b"\\ other"), "Mine", False),
    ("unknown name", QUIRKS.replace(b"CTImageStorage", b"CTImageStore"), "Mine", False),
    ("duplicate SOP class",
     QUIRKS.replace(b"PresentationContext1 = MR", b"PresentationContext2 = CT"), "Mine", False),
    ("unknown role key", QUIRKS + ROLES_SECTION + b"Role1 = CTImageStorage\\BOTH \n", "Mine",
     False),
    ("role in lower case", QUIRKS + ROLES_SECTION + b"Role1 = CTImageStorage\\both\n", "Mine",
     True),
    ("role outside the profile", QUIRKS + ROLES_SECTION + b"Role1 = MRImageStorage\\SCU\n",
     "Mine", False),
    ("role twice", QUIRKS + ROLES_SECTION + b"Role1 = CTImageStorage\\SCU\n"
     b"Role2 = 1.2.840.10008.5.1.4.1.1.2\\SCP\n", "Mine", False),
    ("empty role list", QUIRKS + ROLES_SECTION, "Mine", False),
    ("extended negotiation", QUIRKS + EXTNEG_SECTION +
     b"ExtendedNegotiation1 = CTImageStorage\\0a0B\n", "Mine", True),
    ("odd hex", QUIRKS + EXTNEG_SECTION + b"ExtendedNegotiation1 = CTImageStorage\\0a0\n",
     "Mine", False),
    ("empty hex", QUIRKS + EXTNEG_SECTION + b"ExtendedNegotiation1 = CTImageStorage\\\n",
     "Mine", False),
    ("1023 bytes", QUIRKS + EXTNEG_SECTION + b"ExtendedNegotiation1 = CTImageStorage\\"
     + b"ab" * 1023 + b"\n", "Mine", True),
    ("1024 bytes", QUIRKS + EXTNEG_SECTION + b"ExtendedNegotiation1 = CTImageStorage\\"
     + b"ab" * 1024 + b"\n", "Mine", False),
    ("two profiles of one name", QUIRKS + b"[MINE]\nPresentationContexts = pcs\n", "Mine",
     False),
    ("profile without contexts", QUIRKS + b"[Other]\nSCPSCURoleSelection = R\n", "Mine", False),
    ("128 contexts", _contexts(128), "Mine", True),
    ("129 contexts", _contexts(129), "Mine", False),
]


def test_files_storescp_starts_with_are_the_files_we_accept(tmp_path: Path) -> None:
    require_tool("storescp")
    differences = []
    for name, content, profile, expected in START_CASES:
        path = tmp_path / "case.cfg"
        path.write_bytes(content)
        result = subprocess.run(["storescp", "-xf", str(path), profile, "-od",
                                 str(tmp_path / "nonexistent"), "104"],
                                capture_output=True, text=True, timeout=10)
        assert result.returncode == 1 and result.stderr.startswith("F: "), result.stderr
        storescp_accepts = "specified output directory does not exist" in result.stderr
        assert storescp_accepts == expected, (name, result.stderr)
        try:
            read_asconfig(path).select(profile)
            ours = "accepted"
        except AsconfigError as exc:
            ours = str(exc)
        if (ours == "accepted") != storescp_accepts:
            differences.append(f"{name}: storescp {result.stderr.strip()!r}, ours {ours!r}")
    assert differences == []


# --- (b) the TOML tables ----------------------------------------------------------------------


def problems_of(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "ingestd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [line.split(": ", 1)[1] for line in info.value.problems]


def test_profile_problems_name_the_key_and_what_is_allowed(tmp_path: Path) -> None:
    problems = problems_of("""
[negotiation]
profile = "ct"
preferred_transfer_syntax = "all"
[negotiation.transfer_syntaxes]
Plain = ["ExplicitVRLitleEndian", "CTImageStorage", "1.2..3"]
[negotiation.profiles.CT]
context = 1
[negotiation.profiles.CT.contexts]
Verification = "Plane"
CTImageStorage = "Plain"
"1.2.840.10008.5.1.4.1.1.2" = ["JPEGBaseline8Bit"]
[negotiation.profiles.CT.roles]
CTImageStorage = "BOTH"
MRImageStorage = "scu"
[negotiation.profiles.CT.extended_negotiation]
CTImageStorage = "0200030"
""", tmp_path)
    assert problems == [
        "negotiation.transfer_syntaxes.Plain[0] = 'ExplicitVRLitleEndian': must be a transfer "
        "syntax UID or DICOM keyword (did you mean ExplicitVRLittleEndian?)",
        "negotiation.transfer_syntaxes.Plain[1] = 'CTImageStorage': 1.2.840.10008.5.1.4.1.1.2 "
        "is a SOP Class (CT Image Storage), not a transfer syntax",
        "negotiation.transfer_syntaxes.Plain[2] = '1.2..3': must be a transfer syntax UID or "
        "DICOM keyword",
        "negotiation.profiles.CT.context = 1: unknown key (did you mean "
        "negotiation.profiles.CT.contexts?); a profile has contexts, roles and "
        "extended_negotiation",
        "negotiation.profiles.CT.contexts.\"1.2.840.10008.5.1.4.1.1.2\" = ['JPEGBaseline8Bit']: "
        "the SOP class 1.2.840.10008.5.1.4.1.1.2 is already listed as CTImageStorage; each SOP "
        "class once",
        "negotiation.profiles.CT.contexts.Verification = 'Plane': must name a list of "
        "[negotiation.transfer_syntaxes] (defined: Plain) or be an array of transfer syntaxes",
        "negotiation.profiles.CT.roles.CTImageStorage = 'BOTH': must be one of scu, scp, both",
        "negotiation.profiles.CT.roles.MRImageStorage = 'scu': MRImageStorage is not in "
        "negotiation.profiles.CT.contexts (as in storescp, only SOP classes of the profile)",
        "negotiation.profiles.CT.extended_negotiation.CTImageStorage = '0200030': must be 1 to "
        "1023 bytes as pairs of hexadecimal digits, e.g. \"020003000000\"",
        "negotiation.profile = 'ct': must name a table [negotiation.profiles.NAME] (defined: "
        "CT); did you mean 'CT'?",
        "negotiation.preferred_transfer_syntax = 'all': cannot be combined with "
        "negotiation.profile (the profile's transfer syntax lists decide; storescp refuses -xf "
        "with +x... options too); remove one",
    ]


def test_translation_of_the_shipped_file_loads_unchanged(shipped_cfg: Path) -> None:
    translation = translate(["-xf", str(shipped_cfg), "Default", "11112"])
    document = tomllib.loads(translation.toml())
    config = config_from_mapping(document)
    negotiation = config.negotiation
    assert negotiation.profile == "Default"
    assert list(negotiation.transfer_syntaxes) == [
        "Uncompressed", "UncompressedOrZlib", "AnyTransferSyntax"]
    profile = negotiation.profiles["Default"]
    expected = read_asconfig(shipped_cfg)
    assert [(uid, ts) for uid, ts in profile.contexts.items()] == [
        (uid, expected.transfer_syntaxes[key]) for uid, key in expected.select("Default").contexts]
    # Written with DICOM keywords, readable: e.g. CTImageStorage = "AnyTransferSyntax".
    contexts = document["negotiation"]["profiles"]["Default"]["contexts"]
    assert contexts["CTImageStorage"] == "AnyTransferSyntax"
    assert contexts["Verification"] == "Uncompressed"


@pytest.mark.parametrize("extra", [["+xe"], ["-pm"], ["+xa"]])
def test_translation_refuses_what_storescp_refuses(shipped_cfg: Path, extra: list[str]) -> None:
    from dicom_ingestd.errors import TranslationError
    with pytest.raises(TranslationError, match=f"conflicts with {re.escape(extra[0])}"):
        translate(["-xf", str(shipped_cfg), "Default", *extra, "11112"])
    # +x= (the default preference) is allowed, as by storescp, and changes nothing.
    with_default = translate(["-xf", str(shipped_cfg), "Default", "+x=", "11112"])
    without = translate(["-xf", str(shipped_cfg), "Default", "11112"])
    loaded = config_from_mapping(tomllib.loads(with_default.toml()))
    assert loaded == config_from_mapping(tomllib.loads(without.toml()))
    assert (loaded.negotiation.profile, loaded.negotiation.preferred_transfer_syntax) == \
        ("Default", "uncompressed")


# --- (c) differential against storescp -xf ----------------------------------------------------

CUSTOM_SCP_CFG = b"""\
# A profile that uses every feature: JPEG only for CT, roles, extended negotiation
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit
[JPEG Only]
TransferSyntax1 = JPEGBaseline
TransferSyntax2 = JPEGExtended:Process2+4
[Lossless]
TransferSyntax1 = JPEGLossless:Non-hierarchical-1stOrderPrediction
TransferSyntax2 = RLELossless
TransferSyntax3 = =LittleEndianExplicit

[[PresentationContexts]]
[Custom]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\JPEGOnly
PresentationContext3 = MRImageStorage\\ lossless
PresentationContext4 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext5 = 1.2.826.0.1.3680043.9.7433.99.1\\Uncompressed
PresentationContext6 = BasicTextSRStorage\\Uncompressed
PresentationContext7 = UltrasoundImageStorage\\Uncom
  pressed
PresentationContext8 = StorageCommitmentPushModelSOPClass\\Uncompressed

[[SCPSCURoleSelection]]
[Roles]
Role1 = CTImageStorage\\BOTH
Role2 = MRImageStorage\\scu
Role3 = SecondaryCaptureImageStorage\\SCP
Role4 = 1.2.826.0.1.3680043.9.7433.99.1\\BOTH

[[ExtendedNegotiation]]
[Ext]
ExtendedNegotiation1 = BasicTextSRStorage\\020003000000
ExtendedNegotiation2 = CTImageStorage\\01
ExtendedNegotiation3 = UltrasoundImageStorage\\0a0B

[[Profiles]]
[Custom]
PresentationContexts = Custom
SCPSCURoleSelection = Roles
ExtendedNegotiation = Ext
"""

# storescu's side: proposes CT and MR with role selection and extended negotiation.
CUSTOM_SCU_CFG = b"""\
[[TransferSyntaxes]]
[Plain]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[JPEG]
TransferSyntax1 = JPEGBaseline
[[PresentationContexts]]
[P]
PresentationContext1 = CTImageStorage\\Plain
PresentationContext2 = CTImageStorage\\JPEG
PresentationContext3 = MRImageStorage\\Plain
PresentationContext4 = SecondaryCaptureImageStorage\\Plain
PresentationContext5 = RTPlanStorage\\Plain
[[SCPSCURoleSelection]]
[R]
Role1 = MRImageStorage\\SCU
Role2 = CTImageStorage\\BOTH
[[ExtendedNegotiation]]
[E]
ExtendedNegotiation1 = MRImageStorage\\01
ExtendedNegotiation2 = RTPlanStorage\\0102
[[Profiles]]
[P]
PresentationContexts = P
SCPSCURoleSelection = R
ExtendedNegotiation = E
"""


@dataclass(frozen=True)
class Answer:
    """What a requestor learns from the A-ASSOCIATE-AC (or -RJ), in PDU order."""

    rejected: tuple[int, int, int] | None
    contexts: tuple[tuple[int, int, str], ...]  # (context ID, result, transfer syntax)
    roles: tuple[tuple[str, int, int], ...]  # (SOP class, SCU flag, SCP flag)
    extended: tuple[tuple[str, bytes], ...]
    item_types: tuple[int, ...] = ()  # the user information sub-items' types, in PDU order


Proposal = tuple[str, Sequence[str]]


def _read_pdu(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} bytes")
        data += chunk
    return data


def associate(port: int, proposals: Sequence[Proposal],
              roles: tuple[int, int] | list[tuple[str, int, int]] | None = None,
              extended: Sequence[tuple[str, bytes]] = ()) -> Answer:
    """Send one A-ASSOCIATE-RQ (contexts 1, 3, 5, ...; with `roles` (SCU, SCP) a role item
    per distinct SOP class, even both flags 0, which pynetdicom's primitive refuses, or the
    role items listed), read the answer and release."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "PROFILETEST"
    primitive.called_ae_title = "STORESCP"
    contexts = []
    for index, (uid, syntaxes) in enumerate(proposals):
        cx = PresentationContext()
        cx.context_id = 2 * index + 1
        cx.abstract_syntax = uid
        cx.transfer_syntax = list(syntaxes)
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    items: list[Any] = [max_length, impl]
    for uid, data in extended:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = uid
        item.service_class_application_information = data
        items.append(item)
    primitive.user_information = items
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    if roles is not None:
        user_information = rq.user_information
        assert user_information is not None
        if isinstance(roles, tuple):
            roles = [(uid, *roles) for uid in dict.fromkeys(uid for uid, _ in proposals)]
        for index, (uid, scu, scp) in enumerate(roles):
            role = SCP_SCU_RoleSelectionSubItem()
            role.sop_class_uid = uid
            role.scu_role, role.scp_role = scu, scp
            user_information.user_data.insert(2 + index, role)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(rq.encode())
        pdu = _read_pdu(sock)
        if pdu[0] == 0x03:
            rj = A_ASSOCIATE_RJ()
            rj.decode(pdu)
            return Answer((int(rj.result), int(rj.source), int(rj.reason_diagnostic)), (), (), ())
        assert pdu[0] == 0x02, pdu[:1]
        ac = A_ASSOCIATE_AC()
        ac.decode(pdu)
        sock.sendall(bytes.fromhex("0500000000040000 0000".replace(" ", "")))
        with contextlib.suppress(OSError, AssertionError):
            _read_pdu(sock)  # A-RELEASE-RP
    answer_contexts = tuple(
        (int(item.context_id), int(item.result), str(item.transfer_syntax))
        for item in ac.presentation_context)
    user_data = ac.user_information.user_data if ac.user_information else []
    return Answer(
        None, answer_contexts,
        tuple((str(i.sop_class_uid), int(i.scu_role), int(i.scp_role))
              for i in user_data if isinstance(i, SCP_SCU_RoleSelectionSubItem)),
        tuple((str(i.sop_class_uid), bytes(i.service_class_application_information or b""))
              for i in user_data if isinstance(i, SOPClassExtendedNegotiationSubItem)),
        tuple(int(i.item_type) for i in user_data))


@contextlib.contextmanager
def storescp_xf(cfg: Path, profile: str, outdir: Path) -> Iterator[int]:
    """The real storescp -xf cfg profile on a free port."""
    require_tool("storescp")
    outdir.mkdir(exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(["storescp", "-xf", str(cfg), profile, "-od", str(outdir),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def accepts() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return False
        wait_until(accepts, 10, "storescp listening")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def daemon_settings(args: list[str]) -> dict[str, dict[str, Any]]:
    """The translation of a storescp command line, as settings for daemon_factory."""
    data = translate([*args, "11112"]).data
    del data["network"]["port"]
    data.pop("logging", None)
    data.pop("storage", None)
    return data


def reload_daemon(daemon: Daemon, settings: dict[str, dict[str, Any]]) -> None:
    """Rewrite the daemon's configuration with `settings` (port and output kept), SIGHUP."""
    current = tomllib.loads(daemon.config_path.read_text())
    current["negotiation"] = settings["negotiation"]
    daemon.config_path.write_text(tomli_w.dumps(current))
    count = daemon.log().count("reload: configuration applied")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log().count("reload: configuration applied") > count, 10,
               lambda: f"the reload applied:\n{daemon.log()}", interval=0.05)


def custom_proposals() -> list[Proposal]:
    return [
        (VERIFICATION, [IMPLICIT]), (VERIFICATION, [BE, LE]),
        (CT, [LE, IMPLICIT]), (CT, [JPEG12, JPEG8]), (CT, [IMPLICIT, JPEG12]), (CT, [JPEG8]),
        (MR, [LE, RLE]), (MR, [LE]), (MR, [IMPLICIT]), (MR, [JPEG_LL, RLE, LE]),
        (SC, [IMPLICIT, LE]), (PRIVATE, [IMPLICIT, BE]), (BASIC_TEXT_SR, [LE]),
        (US, [IMPLICIT]), (US, [JPEG8]), (STORAGE_COMMITMENT, [LE]),
        (RT_PLAN, [LE]), (MWL_FIND, [LE]), (PRIVATE_OTHER, [LE]), (CT, [DEFLATED]),
    ]


ROLE_PROPOSALS: list[tuple[int, int] | None] = [None, (1, 0), (0, 1), (1, 1), (0, 0)]
# Two role items for one SOP class: the first counts (for CT and SC), or both are equal (MR).
REPEATED_ROLES = [(CT, 1, 0), (CT, 0, 1), (SC, 0, 1), (SC, 1, 0), (MR, 1, 0), (MR, 1, 0)]


def storescu_xf(port: int, cfg: Path, files: Sequence[Path], profile: str = "P") \
        -> tuple[int, str]:
    """storescu -d -xf cfg profile: exit code and the negotiated parameters it dumps, without
    the lines that name the implementation (each receiver's own)."""
    result = run_tool(["storescu", "-d", "-xf", str(cfg), profile, "127.0.0.1", str(port),
                       *map(str, files)])
    dump = re.search(r"Association Parameters Negotiated:\n(.*?END A-ASSOCIATE-AC)",
                     result.stdout + result.stderr, re.S)
    assert dump is not None, result.stderr
    lines = [line for line in dump.group(1).splitlines()
             if "Implementation" not in line]
    return result.returncode, "\n".join(lines)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_custom_profile_and_shipped_default_answer_as_storescp(
        tmp_path: Path, shipped_cfg: Path, daemon_factory: Any) -> None:
    """Every context, role item and extended negotiation item as storescp -xf answers them.

    Custom profile: five associations, one per role proposal (none, SCU, SCP, both, both 0),
    each with extended negotiation proposed for MR and CT; then the daemon reloads the
    shipped Default profile (SIGHUP) and both answer the 125-context mix of test_negotiation.
    """
    from test_negotiation import proposal_set

    custom = tmp_path / "custom.cfg"
    custom.write_bytes(CUSTOM_SCP_CFG)
    daemon = daemon_factory(daemon_settings(["-xf", str(custom), "Custom"]))
    proposals = custom_proposals()
    extended = [(MR, b"\x01"), (CT, b"\x02\x03")]
    answers: dict[tuple[int, int] | None, Answer] = {}
    scu_cfg = tmp_path / "scu.cfg"
    scu_cfg.write_bytes(CUSTOM_SCU_CFG)
    # MR first: storescu stops at CT, which it cannot send as JPEG (CT is JPEG only here).
    files = [bundled("MR_small.dcm"), bundled("CT_small.dcm")]
    with storescp_xf(custom, "Custom", tmp_path / "scp-out") as port:
        for roles in ROLE_PROPOSALS:
            answers[roles] = associate(port, proposals, roles, extended)
            assert associate(daemon.port, proposals, roles, extended) == answers[roles], roles
        repeated = associate(port, proposals, REPEATED_ROLES)
        assert associate(daemon.port, proposals, REPEATED_ROLES) == repeated
        # DCMTK's storescu -xf as the proposer: the same negotiated parameters, as it dumps them.
        theirs_scu = storescu_xf(port, scu_cfg, files)
    # The answers really exercised the profile: every result, the role reply (0, 0), the
    # default role refused for SC (scp only), extended negotiation sent unasked for SR.
    results = {result for a in answers.values() for _, result, _ in a.contexts}
    assert results == {0, 2, 3, 4}
    assert (SC, 0, 0) in answers[(1, 0)].roles
    sc_context = 2 * proposals.index((SC, [IMPLICIT, LE])) + 1
    assert (sc_context, 2, IMPLICIT) in answers[None].contexts
    assert answers[None].roles == ()
    assert (CT, 1, 0) in repeated.roles and (SC, 0, 1) in repeated.roles  # the first items
    assert answers[None].extended == ((BASIC_TEXT_SR, bytes.fromhex("020003000000")),
                                      (CT, b"\x01"), (US, b"\x0a\x0b"))
    ours_scu = storescu_xf(daemon.port, scu_cfg, files)
    assert ours_scu == theirs_scu
    assert [p.name[:3] for p in daemon.files()] == ["MR."]  # stored on the profile's context
    assert "Accepted Extended Negotiation" in theirs_scu[1]
    assert "Accepted SCP/SCU Role: SCU" in theirs_scu[1]

    reload_daemon(daemon, daemon_settings(["-xf", str(shipped_cfg), "Default"]))
    mix = [*proposal_set(seed=11), (CT, ["1.2.840.10008.1.2.4.57"]), (RT_PLAN, [JPEG8])]
    # storescu's own shipped profile proposes several contexts per SOP class.
    scu_shipped = shipped_cfg.with_name("storescu.cfg")
    with storescp_xf(shipped_cfg, "Default", tmp_path / "scp-out2") as port:
        theirs = associate(port, mix)
        ours = associate(daemon.port, mix)
        if scu_shipped.exists():
            theirs_scu = storescu_xf(port, scu_shipped, files[:1], "Default")
            assert storescu_xf(daemon.port, scu_shipped, files[:1], "Default") == theirs_scu
    assert ours == theirs
    assert {result for _, result, _ in theirs.contexts} == {0, 3, 4}
    assert (ours.roles, ours.extended) == ((), ())
    log = daemon.log()  # each association names the profile it was negotiated with
    assert log.count(", profile Custom)") == len(ROLE_PROPOSALS) + 2
    assert log.count(", profile Default)") == 1 + scu_shipped.exists()


# --- the pieces on their own ------------------------------------------------------------------


@pytest.mark.parametrize(("proposed", "ours", "expected"), [
    # DCMTK's table (dcmnet/include/dcmtk/dcmnet/dul.h, DUL_SC_ROLE): (result, role item)
    (None, "default", (0, None)), (None, "scu", (0, None)), (None, "both", (0, None)),
    (None, "scp", (2, None)),
    ((1, 0), "scu", (0, (1, 0))), ((1, 0), "scp", (0, (0, 0))), ((1, 0), "both", (0, (1, 0))),
    ((0, 1), "scu", (0, (0, 0))), ((0, 1), "scp", (0, (0, 1))), ((0, 1), "both", (0, (0, 1))),
    ((1, 1), "scu", (0, (1, 0))), ((1, 1), "scp", (0, (0, 1))), ((1, 1), "both", (0, (1, 1))),
    ((0, 0), "both", (0, (1, 1))),  # both flags 0 reads as both, as in DCMTK
    ((1, 0), "default", (0, None)),
])
def test_role_selection_table(proposed: tuple[int, int] | None, ours: str,
                              expected: tuple[int, tuple[int, int] | None]) -> None:
    from dicom_ingestd.config.schema import NegotiationProfile
    from dicom_ingestd.worker.profile import negotiate
    profile = NegotiationProfile({CT: (LE,)}, roles={} if ours == "default" else {CT: ours})
    requested = {} if proposed is None else {CT: (bool(proposed[0]), bool(proposed[1]))}
    answer = negotiate([(1, CT, [LE])], requested, profile)
    assert [(c.result, c.role) for c in answer.contexts] == [expected]


def test_cli_from_asconfig(shipped_cfg: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_ingestd.cli import main
    assert main(["config", "from-asconfig", str(shipped_cfg)]) == 0
    every = tomllib.loads(capsys.readouterr().out)["negotiation"]
    assert list(every) == ["transfer_syntaxes", "profiles"]
    assert list(every["profiles"]) == ["Default", "AllDICOM"]
    assert main(["config", "from-asconfig", str(shipped_cfg), "alldicom"]) == 0
    one = tomllib.loads(capsys.readouterr().out)["negotiation"]
    assert one["profile"] == "AllDICOM" and list(one["profiles"]) == ["AllDICOM"]
    path = tmp_path / "ingestd.toml"
    path.write_text(tomli_w.dumps({"negotiation": one}))
    assert load_config(path).negotiation.profile == "AllDICOM"
    assert main(["config", "from-asconfig", str(shipped_cfg), "Nope"]) == 64
    assert "unknown configuration profile name: NOPE (profiles in the file: Default, " \
        "AllDICOM)" in capsys.readouterr().err


def test_stored_objects_match_storescp_with_the_shipped_profile(
        tmp_path: Path, receivers: list[Receiver], shipped_cfg: Path) -> None:
    """test_differential's tree comparison with -xf storescp.cfg Default: same files, same
    transfer syntaxes, same data, through the profile's contexts (CT, MR and an RT plan in
    implicit VR, sent with storescu's default proposal)."""
    files = [bundled(name) for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]
    reference, ours = run_both(tmp_path, receivers, ["-xf", str(shipped_cfg), "Default"], files)
    assert ours.returncodes == [0], ours.stderr
    assert_same_output(reference, ours, len(files))
