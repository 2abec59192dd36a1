"""Tests for dicom_ingestd.worker.negotiation.

(a) Table checks: the preference lists and SOP class tables against DCMTK 3.6.7's own source
    (read from the DCMTK git mirror when present) and against stated storescp facts.
(b) Differential tests: the same presentation contexts are proposed to a real storescp and to
    a pynetdicom acceptor configured from this module; both must answer every context alike.
(c) The promiscuous-mode hook (EVT_REQUESTED) working end to end, C-STORE included.
"""

import contextlib
import itertools
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import free_port
from pydicom import uid as pydicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext, build_context

from dicom_ingestd.worker import negotiation as neg

# pydicom warns when pynetdicom decodes the deliberately non-conformant PRIVATE_SOP_LEADING_ZERO.
LEADING_ZERO_WARNING = "ignore:Invalid value for VR UI:UserWarning"

DCMTK_MIRROR = Path("/work/.mirror/DCMTK+dcmtk/repo")
DCMTK_TAG = "DCMTK-3.6.7"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STANDALONE_CURVE = "1.2.840.10008.5.1.4.1.1.9"  # retired; in DCMTK's list, not pynetdicom's
PHOTOACOUSTIC = "1.2.840.10008.5.1.4.1.1.6.3"  # pynetdicom's list only (newer than DCMTK 3.6.7)
HANGING_PROTOCOL = "1.2.840.10008.5.1.4.38.1"  # "non-patient" storage: storescp refuses it
MWL_FIND = "1.2.840.10008.5.1.4.31"  # known, not storage
PRIVATE_SOP = "1.2.826.0.1.3680043.9.7433.99.1"  # unknown to everyone
PRIVATE_SOP_LEADING_ZERO = "1.2.840.113619.4.030"  # not PS3.5-conformant, seen in the field

# The brief's eight syntaxes a storescu -R +C style proposal carries.
BASE8 = (
    neg.IMPLICIT_LE, neg.EXPLICIT_LE, neg.EXPLICIT_BE, neg.DEFLATED_LE,
    neg.JPEG_BASELINE, neg.JPEG_LOSSLESS_SV1, neg.RLE_LOSSLESS, neg.JPEG_2000,
)
ALL_TS = neg.PREFERENCES["all"]


# -- DCMTK source access -------------------------------------------------------------------------

def dcmtk_source(path: str) -> str:
    """Return a DCMTK 3.6.7 source file from the git mirror, or skip the test without it."""
    if not DCMTK_MIRROR.exists() or shutil.which("git") is None:
        pytest.skip("DCMTK git mirror not available")
    result = subprocess.run(
        ["git", "-C", str(DCMTK_MIRROR), "show", f"{DCMTK_TAG}:{path}"],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"{DCMTK_TAG}:{path} not in the mirror")
    return result.stdout


def dcmtk_uid_defines() -> dict[str, str]:
    header = dcmtk_source("dcmdata/include/dcmtk/dcmdata/dcuid.h")
    return dict(re.findall(r'#define\s+(UID_\w+)\s+"([0-9.]+)"', header))


def storescp_cc_lists() -> dict[str, tuple[str, ...]]:
    """Derive {storescp long option: ordered TS UIDs} from storescp.cc, little-endian branch."""
    src = dcmtk_source("dcmnet/apps/storescp.cc")
    defines = dcmtk_uid_defines()
    option_of = dict(
        (exs, opt) for opt, exs in re.findall(
            r'cmd\.findOption\("(--[\w-]+)"\)\) opt_networkTransferSyntax = (EXS_\w+);', src)
    )
    switch = src[src.index("switch (opt_networkTransferSyntax)"):]
    switch = switch[:switch.index("if (opt_profileName)")]
    # Drop the big-endian-host branches ("else" blocks without nested braces) so the
    # remaining assignments are what a little-endian storescp executes.
    switch = re.sub(r"else\s*\{[^{}]*\}", "", switch)

    def assigned(block: str) -> tuple[str, ...]:
        pairs = re.findall(r"transferSyntaxes\[(\d+)\]\s*=\s*(UID_\w+);", block)
        return tuple(defines[name] for _, name in sorted(pairs, key=lambda p: int(p[0])))

    lists: dict[str, tuple[str, ...]] = {}
    for exs, block in re.findall(r"case (EXS_\w+):(.*?)break;", switch, re.S):
        lists[option_of[exs]] = assigned(block)
    default = switch[switch.index("default:"):]
    accept_all, _, uncompressed = default.partition("} else {")
    lists["--accept-all"] = assigned(accept_all)
    lists["--prefer-uncompr"] = assigned(uncompressed)
    return lists


# -- (a) table checks ----------------------------------------------------------------------------

def test_preference_lists_match_storescp_cc() -> None:
    lists = storescp_cc_lists()
    assert len(lists) == len(neg.PREFERENCES) == 23
    for option, syntaxes in lists.items():
        assert neg.PREFERENCES[neg.STORESCP_FLAG_TO_PREFERENCE[option]] == syntaxes, option


def test_every_storescp_preference_option_is_mapped() -> None:
    src = dcmtk_source("dcmnet/apps/storescp.cc")
    block = src[src.index('"preferred network transfer syntaxes'):]
    block = block[:block.index("cmd.addSubGroup", 10)]
    options = re.findall(r'cmd\.addOption\("(--[\w-]+)",\s*"(\+x[\w=]+)"', block)
    assert len(options) == 23
    for long_flag, short_flag in options:
        assert neg.STORESCP_FLAG_TO_PREFERENCE[long_flag] == \
            neg.STORESCP_FLAG_TO_PREFERENCE[short_flag]
    assert len(neg.STORESCP_FLAG_TO_PREFERENCE) == 2 * len(options)
    assert set(neg.STORESCP_FLAG_TO_PREFERENCE.values()) == set(neg.PREFERENCES)


def test_installed_storescp_help_lists_the_same_flags() -> None:
    if shutil.which("storescp") is None:
        pytest.skip("storescp not installed")
    text = subprocess.run(["storescp", "--help"], capture_output=True, text=True).stdout
    flags = re.findall(r"^\s+(\+x\S+)\s+(--\S+)", text, re.M)
    assert {s: neg.STORESCP_FLAG_TO_PREFERENCE[s] for s, _ in flags} == \
        {s: neg.STORESCP_FLAG_TO_PREFERENCE[long] for s, long in flags}
    assert {s for s, _ in flags} == {f for f in neg.STORESCP_FLAG_TO_PREFERENCE if f[1] == "x"}


def test_preference_keys_match_config_choices() -> None:
    from dicom_ingestd.config.schema import PREFERENCE_CHOICES
    assert tuple(neg.PREFERENCES) == PREFERENCE_CHOICES


def test_preference_facts() -> None:
    p = neg.PREFERENCES
    le_be_impl = (neg.EXPLICIT_LE, neg.EXPLICIT_BE, neg.IMPLICIT_LE)
    # +x= on a little-endian host equals +xe; +xb swaps the explicit pair.
    assert p["uncompressed"] == p["little"] == le_be_impl
    assert p["big"] == (neg.EXPLICIT_BE, neg.EXPLICIT_LE, neg.IMPLICIT_LE)
    assert p["implicit"] == (neg.IMPLICIT_LE,)
    for key, syntaxes in p.items():
        assert len(set(syntaxes)) == len(syntaxes), key
        if key not in ("uncompressed", "little", "big", "implicit", "all"):
            assert len(syntaxes) == 4 and syntaxes[1:] == le_be_impl, key
    assert len(p["all"]) == 21 and p["all"][:2] == (neg.JPEG_2000, neg.JPEG_2000_LOSSLESS)
    assert p["all"][-4:] == (neg.DEFLATED_LE, *le_be_impl)
    assert set(p["all"]) == {s for syntaxes in p.values() for s in syntaxes}
    assert neg.STORESCP_FLAG_TO_PREFERENCE["+x="] == neg.DEFAULT_PREFERENCE


def test_transfer_syntax_constants_match_pydicom() -> None:
    pairs = {
        neg.IMPLICIT_LE: pydicom_uid.ImplicitVRLittleEndian,
        neg.EXPLICIT_LE: pydicom_uid.ExplicitVRLittleEndian,
        neg.EXPLICIT_BE: pydicom_uid.ExplicitVRBigEndian,
        neg.DEFLATED_LE: pydicom_uid.DeflatedExplicitVRLittleEndian,
        neg.JPEG_BASELINE: pydicom_uid.JPEGBaseline8Bit,
        neg.JPEG_EXTENDED: pydicom_uid.JPEGExtended12Bit,
        neg.JPEG_LOSSLESS_SV1: pydicom_uid.JPEGLosslessSV1,
        neg.JPEG_LS_LOSSLESS: pydicom_uid.JPEGLSLossless,
        neg.JPEG_LS_NEAR_LOSSLESS: pydicom_uid.JPEGLSNearLossless,
        neg.JPEG_2000_LOSSLESS: pydicom_uid.JPEG2000Lossless,
        neg.JPEG_2000: pydicom_uid.JPEG2000,
        neg.MPEG2_MPML: pydicom_uid.MPEG2MPML,
        neg.MPEG2_MPHL: pydicom_uid.MPEG2MPHL,
        neg.MPEG4_HP41: pydicom_uid.MPEG4HP41,
        neg.MPEG4_HP41_BD: pydicom_uid.MPEG4HP41BD,
        neg.MPEG4_HP42_2D: pydicom_uid.MPEG4HP422D,
        neg.MPEG4_HP42_3D: pydicom_uid.MPEG4HP423D,
        neg.MPEG4_HP42_STEREO: pydicom_uid.MPEG4HP42STEREO,
        neg.HEVC_MP51: pydicom_uid.HEVCMP51,
        neg.HEVC_M10P51: pydicom_uid.HEVCM10P51,
        neg.RLE_LOSSLESS: pydicom_uid.RLELossless,
    }
    for ours, theirs in pairs.items():
        assert ours == theirs
    assert neg.VERIFICATION_SOP_CLASS == "1.2.840.10008.1.1"


def test_dcmtk_storage_list_matches_dcuid_cc() -> None:
    src = dcmtk_source("dcmdata/libsrc/dcuid.cc")
    defines = dcmtk_uid_defines()
    body = re.search(r"dcmAllStorageSOPClassUIDs\[\] = \{(.*?)NULL\s*\};", src, re.S)
    assert body is not None
    names = re.findall(r"UID_\w+", re.sub(r"//.*", "", body.group(1)))
    assert tuple(defines[n] for n in names) == neg.DCMTK_STORAGE_SOP_CLASSES
    assert len(neg.DCMTK_STORAGE_SOP_CLASSES) == 186


def test_storage_union() -> None:
    from pynetdicom.presentation import AllStoragePresentationContexts
    pynetdicom_uids = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    union = neg.STORAGE_SOP_CLASSES
    assert len(union) == len(set(union))
    assert union[:len(neg.DCMTK_STORAGE_SOP_CLASSES)] == neg.DCMTK_STORAGE_SOP_CLASSES
    assert set(union) == set(neg.DCMTK_STORAGE_SOP_CLASSES) | set(pynetdicom_uids)
    assert {STANDALONE_CURVE, PHOTOACOUSTIC, CT_IMAGE} <= set(union)
    assert HANGING_PROTOCOL not in union and MWL_FIND not in union
    assert neg.VERIFICATION_SOP_CLASS not in union


def test_acceptor_contexts() -> None:
    for key, syntaxes in neg.PREFERENCES.items():
        contexts = neg.acceptor_contexts(key, promiscuous=False)
        assert contexts[0] == (neg.VERIFICATION_SOP_CLASS, syntaxes)
        assert [uid for uid, _ in contexts[1:]] == list(neg.STORAGE_SOP_CLASSES)
        assert all(ts == syntaxes for _, ts in contexts)  # one list for everything, as storescp
        assert neg.acceptor_contexts(key, promiscuous=True) == contexts
    with pytest.raises(ValueError, match="'implicit'"):
        neg.acceptor_contexts("+xi", promiscuous=False)
    with pytest.raises(ValueError, match="unknown transfer syntax preference"):
        neg.acceptor_contexts("nonsense", promiscuous=False)


def test_pynetdicom_keeps_our_order_in_supported_contexts() -> None:
    ae = AE()
    for uid, syntaxes in neg.acceptor_contexts("all", promiscuous=False):
        ae.add_supported_context(uid, list(syntaxes))
    supported = {str(cx.abstract_syntax): tuple(cx.transfer_syntax)
                 for cx in ae.supported_contexts}
    assert supported[CT_IMAGE] == neg.PREFERENCES["all"]
    assert len(supported) == 1 + len(neg.STORAGE_SOP_CLASSES)


def test_choose_transfer_syntax() -> None:
    pref = neg.PREFERENCES["uncompressed"]
    assert neg.choose_transfer_syntax(pref, [neg.IMPLICIT_LE, neg.EXPLICIT_LE]) == neg.EXPLICIT_LE
    assert neg.choose_transfer_syntax(pref, [neg.IMPLICIT_LE]) == neg.IMPLICIT_LE
    assert neg.choose_transfer_syntax(pref, [neg.JPEG_BASELINE]) is None
    assert neg.choose_transfer_syntax(pref, []) is None
    pref = neg.PREFERENCES["all"]
    assert neg.choose_transfer_syntax(pref, BASE8) == neg.JPEG_2000
    assert neg.choose_transfer_syntax(pref, BASE8[:6]) == neg.JPEG_BASELINE


def test_unknown_sop_class() -> None:
    assert neg.is_unknown_sop_class(PRIVATE_SOP)
    assert neg.is_unknown_sop_class(PRIVATE_SOP_LEADING_ZERO)
    for known in (CT_IMAGE, STANDALONE_CURVE, PHOTOACOUSTIC, HANGING_PROTOCOL, MWL_FIND,
                  neg.VERIFICATION_SOP_CLASS, neg.EXPLICIT_LE, "1.2.840.113619.5.2"):
        assert not neg.is_unknown_sop_class(known), known
    for junk in ("", "1.2.", ".1.2", "1..2", "1.2.a", "1.2 ", "1." + "2" * 63):
        assert not neg.is_unknown_sop_class(junk), junk


def test_everything_dcmtk_can_name_is_known() -> None:
    """storescp -pm refuses what DCMTK names; so must we (the subset guarantee)."""
    src = dcmtk_source("dcmdata/libsrc/dcuid.cc")
    defines = dcmtk_uid_defines()
    table = re.search(r"uidNameMap\[\] = \{(.*?)\n\};", src, re.S)
    assert table is not None
    names = re.findall(r"\{\s*(UID_\w+)\s*,", table.group(1))
    assert len(names) > 400
    named = [n for n in names if neg.is_unknown_sop_class(defines[n])]
    assert named == []


def _cx(uid: str | None, syntaxes: Sequence[str] = BASE8) -> PresentationContext:
    cx = PresentationContext()
    if uid is not None:
        cx.abstract_syntax = uid
    cx.transfer_syntax = list(syntaxes)
    return cx


@pytest.mark.filterwarnings(LEADING_ZERO_WARNING)
def test_promiscuous_contexts_for() -> None:
    proposed = [_cx(CT_IMAGE), _cx(PRIVATE_SOP), _cx(MWL_FIND), _cx(PRIVATE_SOP, [neg.IMPLICIT_LE]),
                _cx(HANGING_PROTOCOL), _cx(PRIVATE_SOP_LEADING_ZERO, [neg.JPEG_BASELINE]),
                _cx(None)]
    got = neg.promiscuous_contexts_for(proposed, "big")
    # One context per distinct unknown UID, our whole list, even if nothing of it was proposed.
    assert got == [(PRIVATE_SOP, neg.PREFERENCES["big"]),
                   (PRIVATE_SOP_LEADING_ZERO, neg.PREFERENCES["big"])]
    assert neg.promiscuous_contexts_for(proposed, "big", supported={PRIVATE_SOP}) == \
        [(PRIVATE_SOP_LEADING_ZERO, neg.PREFERENCES["big"])]
    assert neg.promiscuous_contexts_for([_cx(CT_IMAGE)], "all") == []
    with pytest.raises(ValueError):
        neg.promiscuous_contexts_for(proposed, "bogus")


# -- helpers for servers -------------------------------------------------------------------------



def _listening(port: int) -> bool:
    """True once a socket listens on ``port`` (read from /proc, so storescp sees no probe)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@contextlib.contextmanager
def storescp(options: Sequence[str], outdir: Path) -> Iterator[int]:
    """Run a real storescp with ``options`` on a free port; always terminated on exit.

    storescp 3.6.7 has no bind-address option, so it listens on every interface for the
    test's short life; every connection the tests make goes to 127.0.0.1.
    """
    if shutil.which("storescp") is None:
        pytest.skip("storescp not installed")
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):  # a free port can be taken between probe and bind: retry
            port = free_port()
            proc = subprocess.Popen(
                ["storescp", *options, "-od", str(outdir), "--aetitle", "STORESCP", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and proc.poll() is None and not _listening(port):
                time.sleep(0.01)
            if proc.poll() is None and _listening(port):
                yield port
                return
            proc.kill()
            proc.wait()
        pytest.fail(f"storescp {' '.join(options)} did not start")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def pynetdicom_acceptor(preference: str, *, promiscuous: bool) -> Iterator[int]:
    """Run a pynetdicom AE configured from this module on a free loopback port."""
    ae = AE(ae_title="INGESTD")
    for uid, syntaxes in neg.acceptor_contexts(preference, promiscuous=promiscuous):
        ae.add_supported_context(uid, list(syntaxes))
    handlers: list[Any] = []
    if promiscuous:
        handlers.append((evt.EVT_REQUESTED, neg.make_promiscuous_handler(preference)))
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


Outcome = tuple[int, str | None]  # (result, accepted transfer syntax or None)


def negotiate(port: int, proposals: Sequence[tuple[str, Sequence[str]]]) -> list[Outcome]:
    """Propose ``proposals`` (one presentation context each) in one association; return results.

    pynetdicom numbers the contexts 1, 3, 5, ... in proposal order.
    """
    ae = AE(ae_title="DIFFTEST")
    ae.acse_timeout = ae.network_timeout = 5
    for uid, syntaxes in proposals:
        ae.add_requested_context(uid, list(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    try:
        assert assoc.is_established, "association not established"
        by_id: dict[int, Outcome] = {}
        for cx in assoc.accepted_contexts:
            by_id[cast(int, cx.context_id)] = (0, str(cx.transfer_syntax[0]))
        for cx in assoc.rejected_contexts:
            by_id[cast(int, cx.context_id)] = (cast(int, cx.result), None)
        return [by_id[2 * i + 1] for i in range(len(proposals))]
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def proposal_set(seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """Proposals as from storescu -R +C: one context per (SOP class, syntaxes in some order)."""
    rng = random.Random(seed)
    orders: list[tuple[str, ...]] = [BASE8, BASE8[::-1], ALL_TS, ALL_TS[::-1]]
    for _ in range(40):
        orders.append(tuple(rng.sample(BASE8, len(BASE8))))
    for _ in range(20):
        orders.append(tuple(rng.sample(ALL_TS, len(ALL_TS))))
    for size in (1, 1, 2, 2, 3, 3, 4, 5):
        orders.append(tuple(rng.sample(BASE8, size)))
        orders.append(tuple(rng.sample(ALL_TS, size)))
    for ts in ALL_TS:  # each syntax alone: accepted iff in the list
        orders.append((ts,))
    proposals = [(neg.VERIFICATION_SOP_CLASS, BASE8), (neg.VERIFICATION_SOP_CLASS, ALL_TS[::-1])]
    proposals += [(CT_IMAGE, order) for order in orders]
    proposals += [(STANDALONE_CURVE, BASE8[::-1]), (HANGING_PROTOCOL, BASE8), (MWL_FIND, BASE8),
                  (PHOTOACOUSTIC, BASE8), (PRIVATE_SOP, BASE8[::-1]),
                  (PRIVATE_SOP, (neg.JPEG_LS_LOSSLESS,)), (PRIVATE_SOP_LEADING_ZERO, ALL_TS)]
    assert len(proposals) <= 128
    return proposals


# -- (b) differential tests against storescp -----------------------------------------------------

ALL_FLAGS = [f for f in neg.STORESCP_FLAG_TO_PREFERENCE if not f.startswith("--")]


@pytest.mark.parametrize("flag", ALL_FLAGS)
@pytest.mark.filterwarnings(LEADING_ZERO_WARNING)
def test_same_choice_as_storescp(flag: str, tmp_path: Path) -> None:
    preference = neg.STORESCP_FLAG_TO_PREFERENCE[flag]
    proposals = proposal_set(seed=len(flag) * 31 + ord(flag[-1]))
    with storescp([flag], tmp_path) as dcmtk_port, \
            pynetdicom_acceptor(preference, promiscuous=False) as our_port:
        theirs = negotiate(dcmtk_port, proposals)
        ours = negotiate(our_port, proposals)
    for (uid, syntaxes), t, o in zip(proposals, theirs, ours, strict=True):
        if uid == PHOTOACOUSTIC:
            # Deliberate: we accept pynetdicom's newer storage classes without -pm.
            assert t == (0x03, None)
            assert o == (0, neg.choose_transfer_syntax(neg.PREFERENCES[preference], syntaxes))
            continue
        assert o == t, (flag, uid, syntaxes)
        expected = neg.choose_transfer_syntax(neg.PREFERENCES[preference], syntaxes)
        if t[0] == 0:
            assert t[1] == expected
    # The proposals really exercised acceptance and refusal.
    assert {r for r, _ in theirs} >= {0, 0x03}


@pytest.mark.parametrize("flag", ALL_FLAGS)
def test_pairwise_order_as_storescp(flag: str, tmp_path: Path) -> None:
    """Every pair of syntaxes, each pair its own context: pins down the whole order.

    With the singletons of proposal_set (membership) this determines the complete list, so a
    swap anywhere in it -- even between two fallbacks -- shows up.
    """
    preference = neg.STORESCP_FLAG_TO_PREFERENCE[flag]
    rng = random.Random(flag)
    pairs = [tuple(rng.sample(pair, 2)) for pair in itertools.combinations(ALL_TS, 2)
             if set(pair) & set(neg.PREFERENCES[preference])]
    chunks = [pairs[i:i + 120] for i in range(0, len(pairs), 120)]
    with storescp([flag], tmp_path) as dcmtk_port, \
            pynetdicom_acceptor(preference, promiscuous=False) as our_port:
        for chunk in chunks:
            proposals = [(CT_IMAGE, pair) for pair in chunk]
            theirs = negotiate(dcmtk_port, proposals)
            assert negotiate(our_port, proposals) == theirs
            assert all(t[0] == 0 for t in theirs)


@pytest.mark.parametrize("flag", ["+x=", "+xe", "+xb", "+xs", "+xi", "+xa", "+xr", "+xd"])
@pytest.mark.filterwarnings(LEADING_ZERO_WARNING)
def test_same_choice_as_storescp_promiscuous(flag: str, tmp_path: Path) -> None:
    preference = neg.STORESCP_FLAG_TO_PREFERENCE[flag]
    proposals = proposal_set(seed=7)
    with storescp([flag, "-pm"], tmp_path) as dcmtk_port, \
            pynetdicom_acceptor(preference, promiscuous=True) as our_port:
        theirs = negotiate(dcmtk_port, proposals)
        ours = negotiate(our_port, proposals)
    assert ours == theirs
    outcome = dict(zip(proposals, theirs, strict=True))
    # Private SOP classes accepted with our order, or refused for the transfer syntax (0x04)
    # and not the abstract syntax; known non-storage classes still refused.
    pref = neg.PREFERENCES[preference]
    assert outcome[(PRIVATE_SOP, BASE8[::-1])] == (0, neg.choose_transfer_syntax(pref, BASE8))
    jls_only = (neg.JPEG_LS_LOSSLESS,)
    assert outcome[(PRIVATE_SOP, jls_only)] == (
        (0, neg.JPEG_LS_LOSSLESS) if neg.JPEG_LS_LOSSLESS in pref else (0x04, None))
    assert outcome[(MWL_FIND, BASE8)] == (0x03, None)
    assert outcome[(HANGING_PROTOCOL, BASE8)] == (0x03, None)


@pytest.mark.parametrize("flag", ["+x=", "+xa", "+xs"])
def test_single_context_associations(flag: str, tmp_path: Path) -> None:
    """Exactly the storescu -R +C shape: one presentation context, several syntaxes."""
    preference = neg.STORESCP_FLAG_TO_PREFERENCE[flag]
    cases = [(CT_IMAGE, BASE8), (CT_IMAGE, BASE8[::-1]),
             (CT_IMAGE, (neg.JPEG_2000, neg.JPEG_LOSSLESS_SV1, neg.EXPLICIT_BE, neg.IMPLICIT_LE))]
    with storescp([flag], tmp_path) as dcmtk_port, \
            pynetdicom_acceptor(preference, promiscuous=False) as our_port:
        for case in cases:
            theirs = negotiate(dcmtk_port, [case])
            assert negotiate(our_port, [case]) == theirs
            assert theirs == [(0, neg.choose_transfer_syntax(neg.PREFERENCES[preference],
                                                             case[1]))]


# -- (c) the promiscuous hook, end to end --------------------------------------------------------

def _dataset(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = pydicom_uid.generate_uid()
    ds.PatientName = "Test^Promiscuous"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom_uid.ExplicitVRLittleEndian
    return ds


@contextlib.contextmanager
def _storing_acceptor(register: bool, received: list[tuple[str, str]]) -> Iterator[int]:
    ae = AE(ae_title="INGESTD")
    for uid, syntaxes in neg.acceptor_contexts("uncompressed", promiscuous=True):
        ae.add_supported_context(uid, list(syntaxes))

    def on_store(event: evt.Event) -> int:
        received.append((str(event.request.AffectedSOPClassUID),
                         str(event.context.transfer_syntax)))
        return 0x0000

    handlers: list[Any] = [
        (evt.EVT_REQUESTED, neg.make_promiscuous_handler("uncompressed", register=register)),
        (evt.EVT_C_STORE, on_store),
    ]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def _store(port: int, sop_class: str) -> tuple[str, int | None, bool]:
    """Propose implicit first (pynetdicom's unrestricted mode would take it), then C-STORE."""
    ae = AE(ae_title="DIFFTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(sop_class, [neg.IMPLICIT_LE, neg.EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title="INGESTD")
    try:
        assert assoc.is_established
        accepted = str(assoc.accepted_contexts[0].transfer_syntax[0])
        status = assoc.send_c_store(_dataset(sop_class))
        code = int(status.Status) if "Status" in status else None
        deadline = time.monotonic() + 2  # an A-ABORT can arrive just after the empty response
        while code is None and not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        aborted = assoc.is_aborted
        return accepted, code, aborted
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def test_promiscuous_hook_stores_private_sop_class() -> None:
    received: list[tuple[str, str]] = []
    private = "1.2.826.0.1.3680043.9.7433.99.2"
    with _storing_acceptor(register=True, received=received) as port:
        accepted, status, aborted = _store(port, private)
    assert accepted == neg.EXPLICIT_LE  # our preference, not the requestor's first (implicit)
    assert (status, aborted) == (0x0000, False)
    assert received == [(private, neg.EXPLICIT_LE)]


def test_promiscuous_hook_without_registration_gets_aborted() -> None:
    """Why make_promiscuous_handler registers: pynetdicom aborts C-STORE on unknown classes."""
    received: list[tuple[str, str]] = []
    private = "1.2.826.0.1.3680043.9.7433.99.3"
    with _storing_acceptor(register=False, received=received) as port:
        accepted, status, aborted = _store(port, private)
    assert accepted == neg.EXPLICIT_LE
    assert status is None and aborted
    assert received == []


def test_handler_is_per_association() -> None:
    """Contexts added for one association do not leak into the AE or the next association."""
    with pynetdicom_acceptor("uncompressed", promiscuous=True) as port:
        first = negotiate(port, [(PRIVATE_SOP, BASE8)])
        second = negotiate(port, [(CT_IMAGE, BASE8)])
    assert first == [(0, neg.EXPLICIT_LE)]
    assert second == [(0, neg.EXPLICIT_LE)]
    assert PRIVATE_SOP not in {uid for uid, _ in neg.acceptor_contexts("all", promiscuous=True)}


def test_register_storage_uids_leaves_known_classes_alone() -> None:
    from pynetdicom.service_class import BasicWorklistManagementServiceClass, StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class
    assert neg.register_storage_uids([MWL_FIND, CT_IMAGE]) == []
    assert uid_to_service_class(MWL_FIND) is BasicWorklistManagementServiceClass
    new = "1.2.826.0.1.3680043.9.7433.99.4"
    assert neg.register_storage_uids([new, new]) == [new]
    assert uid_to_service_class(new) is StorageServiceClass
    assert new not in neg.STORAGE_SOP_CLASSES  # the static table is a snapshot


def test_build_context_round_trip() -> None:
    # acceptor.py builds pynetdicom contexts from our tuples; order must survive.
    cx = build_context(CT_IMAGE, list(neg.PREFERENCES["all"]))
    assert tuple(cx.transfer_syntax) == neg.PREFERENCES["all"]
