"""Tests for dicom_ingestd.worker.negotiation, and the daemon negotiating as storescp does.

(a) Table checks: the SOP class tables and UID names against the installed DCMTK (its
    libdcmdata through ctypes, tests/dcmtk_facts.py), the preference flags against the
    installed storescp's --help, and the tables' own consistency.
(b) Differential tests: the same presentation contexts are proposed to a real storescp and to
    the real daemon (one dicom-ingestd for the module, reconfigured through its control socket
    for each storescp option); both must answer every context alike.  Every pair of transfer
    syntaxes pins each preference list's whole order, and every storage SOP class the
    installed DCMTK lists is proposed to both.
"""

import itertools
import random
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import dcmtk_facts
import pytest
from pydicom import dcmread
from pydicom import uid as pydicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom import AE
from pynetdicom.presentation import PresentationContext, build_context
from support.daemon import Daemon, start_daemon
from support.peers import require_tool, storescp
from support.uids import CT_IMAGE, MWL_FIND

from dicom_ingestd.dcmtk import transfer as tsx
from dicom_ingestd.dcmtk.storage import DCMTK_STORAGE_SOP_CLASSES
from dicom_ingestd.worker import negotiation as neg

# pydicom warns when pynetdicom decodes the deliberately non-conformant PRIVATE_SOP_LEADING_ZERO.
LEADING_ZERO_WARNING = "ignore:Invalid value for VR UI:UserWarning"

STANDALONE_CURVE = "1.2.840.10008.5.1.4.1.1.9"  # retired; in DCMTK's list, not pynetdicom's
PHOTOACOUSTIC = "1.2.840.10008.5.1.4.1.1.6.3"  # pynetdicom's list only (newer than DCMTK 3.6.7)
HANGING_PROTOCOL = "1.2.840.10008.5.1.4.38.1"  # "non-patient" storage: storescp refuses it
GE_PRIVATE_SYNTAX = "1.2.840.113619.5.2"  # named by DCMTK only (not by pydicom)
PRIVATE_SOP = "1.2.826.0.1.3680043.9.7433.99.1"  # unknown to everyone
PRIVATE_SOP_LEADING_ZERO = "1.2.840.113619.4.030"  # not PS3.5-conformant, seen in the field

# The brief's eight syntaxes a storescu -R +C style proposal carries.
BASE8 = (
    tsx.IMPLICIT_LE, tsx.EXPLICIT_LE, tsx.EXPLICIT_BE, tsx.DEFLATED_LE,
    tsx.JPEG_BASELINE, tsx.JPEG_LOSSLESS_SV1, tsx.RLE_LOSSLESS, tsx.JPEG_2000,
)
ALL_TS = tsx.PREFERENCES["all"]


# -- (a) table checks ----------------------------------------------------------------------------

def test_installed_storescp_help_lists_the_same_flags() -> None:
    """Every "preferred network transfer syntaxes" option of the installed storescp, short
    and long, and no other: what each one means is test (b)'s, against storescp itself."""
    require_tool("storescp")
    text = subprocess.run(["storescp", "--help"], capture_output=True, text=True,
                          check=False).stdout
    flags = re.findall(r"^\s+(\+x\S+)\s+(--\S+)", text, re.M)
    assert len(flags) == 23, text
    assert sorted(flags) == sorted(tsx.STORESCP_PREFERENCE_FLAGS.values())
    assert {f for pair in flags for f in pair} == set(tsx.STORESCP_FLAG_TO_PREFERENCE)
    assert list(tsx.STORESCP_PREFERENCE_FLAGS) == list(tsx.PREFERENCES)


def test_preference_keys_match_config_choices() -> None:
    from dicom_ingestd.config.schema import PREFERENCE_CHOICES
    assert tuple(tsx.PREFERENCES) == PREFERENCE_CHOICES


def test_preference_facts() -> None:
    p = tsx.PREFERENCES
    le_be_impl = (tsx.EXPLICIT_LE, tsx.EXPLICIT_BE, tsx.IMPLICIT_LE)
    # +x= on a little-endian host equals +xe; +xb swaps the explicit pair.
    assert p["uncompressed"] == p["little"] == le_be_impl
    assert p["big"] == (tsx.EXPLICIT_BE, tsx.EXPLICIT_LE, tsx.IMPLICIT_LE)
    assert p["implicit"] == (tsx.IMPLICIT_LE,)
    for key, syntaxes in p.items():
        assert len(set(syntaxes)) == len(syntaxes), key
        if key not in ("uncompressed", "little", "big", "implicit", "all"):
            assert len(syntaxes) == 4 and syntaxes[1:] == le_be_impl, key
    assert len(p["all"]) == 21 and p["all"][:2] == (tsx.JPEG_2000, tsx.JPEG_2000_LOSSLESS)
    assert p["all"][-4:] == (tsx.DEFLATED_LE, *le_be_impl)
    assert set(p["all"]) == {s for syntaxes in p.values() for s in syntaxes}
    assert tsx.STORESCP_FLAG_TO_PREFERENCE["+x="] == tsx.DEFAULT_PREFERENCE


def test_transfer_syntax_constants_match_pydicom() -> None:
    pairs = {
        tsx.IMPLICIT_LE: pydicom_uid.ImplicitVRLittleEndian,
        tsx.EXPLICIT_LE: pydicom_uid.ExplicitVRLittleEndian,
        tsx.EXPLICIT_BE: pydicom_uid.ExplicitVRBigEndian,
        tsx.DEFLATED_LE: pydicom_uid.DeflatedExplicitVRLittleEndian,
        tsx.JPEG_BASELINE: pydicom_uid.JPEGBaseline8Bit,
        tsx.JPEG_EXTENDED: pydicom_uid.JPEGExtended12Bit,
        tsx.JPEG_LOSSLESS_SV1: pydicom_uid.JPEGLosslessSV1,
        tsx.JPEG_LS_LOSSLESS: pydicom_uid.JPEGLSLossless,
        tsx.JPEG_LS_NEAR_LOSSLESS: pydicom_uid.JPEGLSNearLossless,
        tsx.JPEG_2000_LOSSLESS: pydicom_uid.JPEG2000Lossless,
        tsx.JPEG_2000: pydicom_uid.JPEG2000,
        tsx.MPEG2_MPML: pydicom_uid.MPEG2MPML,
        tsx.MPEG2_MPHL: pydicom_uid.MPEG2MPHL,
        tsx.MPEG4_HP41: pydicom_uid.MPEG4HP41,
        tsx.MPEG4_HP41_BD: pydicom_uid.MPEG4HP41BD,
        tsx.MPEG4_HP42_2D: pydicom_uid.MPEG4HP422D,
        tsx.MPEG4_HP42_3D: pydicom_uid.MPEG4HP423D,
        tsx.MPEG4_HP42_STEREO: pydicom_uid.MPEG4HP42STEREO,
        tsx.HEVC_MP51: pydicom_uid.HEVCMP51,
        tsx.HEVC_M10P51: pydicom_uid.HEVCM10P51,
        tsx.RLE_LOSSLESS: pydicom_uid.RLELossless,
    }
    for ours, theirs in pairs.items():
        assert ours == theirs
    assert neg.VERIFICATION_SOP_CLASS == "1.2.840.10008.1.1"


def test_dcmtk_storage_list_matches_installed_libdcmdata() -> None:
    """Our copy of dcmAllStorageSOPClassUIDs is the installed DCMTK's, whole and in order."""
    assert dcmtk_facts.storage_sop_classes() == DCMTK_STORAGE_SOP_CLASSES
    assert len(DCMTK_STORAGE_SOP_CLASSES) == 186


def test_storage_union() -> None:
    from pynetdicom.presentation import AllStoragePresentationContexts
    pynetdicom_uids = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    union = neg.STORAGE_SOP_CLASSES
    assert len(union) == len(set(union))
    assert union[:len(DCMTK_STORAGE_SOP_CLASSES)] == DCMTK_STORAGE_SOP_CLASSES
    assert set(union) == set(DCMTK_STORAGE_SOP_CLASSES) | set(pynetdicom_uids)
    assert {STANDALONE_CURVE, PHOTOACOUSTIC, CT_IMAGE} <= set(union)
    assert HANGING_PROTOCOL not in union and MWL_FIND not in union
    assert neg.VERIFICATION_SOP_CLASS not in union


def test_acceptor_contexts() -> None:
    for key, syntaxes in tsx.PREFERENCES.items():
        contexts = neg.acceptor_contexts(key, promiscuous=False)
        assert contexts[0] == (neg.VERIFICATION_SOP_CLASS, syntaxes)
        assert [uid for uid, _ in contexts[1:]] == list(neg.STORAGE_SOP_CLASSES)
        assert all(ts == syntaxes for _, ts in contexts)  # one list for everything, as storescp
        assert neg.acceptor_contexts(key, promiscuous=True) == contexts
    with pytest.raises(ValueError, match="'implicit'"):
        neg.acceptor_contexts("+xi", promiscuous=False)
    with pytest.raises(ValueError, match="unknown transfer syntax preference"):
        neg.acceptor_contexts("nonsense", promiscuous=False)


def test_choose_transfer_syntax() -> None:
    pref = tsx.PREFERENCES["uncompressed"]
    assert neg.choose_transfer_syntax(pref, [tsx.IMPLICIT_LE, tsx.EXPLICIT_LE]) == tsx.EXPLICIT_LE
    assert neg.choose_transfer_syntax(pref, [tsx.IMPLICIT_LE]) == tsx.IMPLICIT_LE
    assert neg.choose_transfer_syntax(pref, [tsx.JPEG_BASELINE]) is None
    assert neg.choose_transfer_syntax(pref, []) is None
    pref = tsx.PREFERENCES["all"]
    assert neg.choose_transfer_syntax(pref, BASE8) == tsx.JPEG_2000
    assert neg.choose_transfer_syntax(pref, BASE8[:6]) == tsx.JPEG_BASELINE


def test_unknown_sop_class() -> None:
    assert neg.is_unknown_sop_class(PRIVATE_SOP)
    assert neg.is_unknown_sop_class(PRIVATE_SOP_LEADING_ZERO)
    for known in (CT_IMAGE, STANDALONE_CURVE, PHOTOACOUSTIC, HANGING_PROTOCOL, MWL_FIND,
                  neg.VERIFICATION_SOP_CLASS, tsx.EXPLICIT_LE, "1.2.840.113619.5.2"):
        assert not neg.is_unknown_sop_class(known), known
    for junk in ("", "1.2.", ".1.2", "1..2", "1.2.a", "1.2 ", "1." + "2" * 63):
        assert not neg.is_unknown_sop_class(junk), junk


def test_everything_dcmtk_can_name_is_known() -> None:
    """storescp -pm refuses what DCMTK names; so must we (the subset guarantee)."""
    named = dcmtk_facts.named_uids()
    assert GE_PRIVATE_SYNTAX in named.values()
    unknown_to_us = sorted(uid for uid in named.values() if neg.is_unknown_sop_class(uid))
    assert unknown_to_us == []


def _cx(uid: str | None, syntaxes: Sequence[str] = BASE8) -> PresentationContext:
    cx = PresentationContext()
    if uid is not None:
        cx.abstract_syntax = uid
    cx.transfer_syntax = list(syntaxes)
    return cx


@pytest.mark.filterwarnings(LEADING_ZERO_WARNING)
def test_promiscuous_contexts_for() -> None:
    proposed = [_cx(CT_IMAGE), _cx(PRIVATE_SOP), _cx(MWL_FIND), _cx(PRIVATE_SOP, [tsx.IMPLICIT_LE]),
                _cx(HANGING_PROTOCOL), _cx(PRIVATE_SOP_LEADING_ZERO, [tsx.JPEG_BASELINE]),
                _cx(None)]
    got = neg.promiscuous_contexts_for(proposed, "big")
    # One context per distinct unknown UID, our whole list, even if nothing of it was proposed.
    assert got == [(PRIVATE_SOP, tsx.PREFERENCES["big"]),
                   (PRIVATE_SOP_LEADING_ZERO, tsx.PREFERENCES["big"])]
    assert neg.promiscuous_contexts_for(proposed, "big", supported={PRIVATE_SOP}) == \
        [(PRIVATE_SOP_LEADING_ZERO, tsx.PREFERENCES["big"])]
    assert neg.promiscuous_contexts_for([_cx(CT_IMAGE)], "all") == []
    with pytest.raises(ValueError):
        neg.promiscuous_contexts_for(proposed, "bogus")


# -- helpers for servers -------------------------------------------------------------------------



@pytest.fixture(scope="module")
def ingestd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One dicom-ingestd for the module's differential tests (reconfigured per test)."""
    daemon = start_daemon(tmp_path_factory.mktemp("ingestd"),
                          {"network": {"aetitle": "STORESCP"}, "logging": {"level": "info"}})
    try:
        yield daemon
    finally:
        daemon.stop()


def ingestd_as(daemon: Daemon, flag: str, *, promiscuous: bool = False) -> int:
    """Reconfigure the daemon as `storescp FLAG [-pm]` would run; return its port."""
    daemon.reconfigure("negotiation", {
        "preferred_transfer_syntax": tsx.STORESCP_FLAG_TO_PREFERENCE[flag],
        "promiscuous": promiscuous})
    return daemon.port


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
                  (PRIVATE_SOP, (tsx.JPEG_LS_LOSSLESS,)), (PRIVATE_SOP_LEADING_ZERO, ALL_TS),
                  (GE_PRIVATE_SYNTAX, BASE8)]
    assert len(proposals) <= 128
    return proposals


# -- (b) differential tests: storescp and the daemon --------------------------------------------

ALL_FLAGS = [f for f in tsx.STORESCP_FLAG_TO_PREFERENCE if not f.startswith("--")]


@pytest.mark.parametrize("flag", ALL_FLAGS)
@pytest.mark.filterwarnings(LEADING_ZERO_WARNING)
def test_same_choice_as_storescp(flag: str, tmp_path: Path, ingestd: Daemon) -> None:
    """A mix of SOP classes and syntax orders, then every pair of syntaxes as a context of
    its own: with the singletons of proposal_set (membership) the pairs pin down the whole
    preference list, so a swap anywhere in it -- even between two fallbacks -- shows up."""
    preference = tsx.STORESCP_FLAG_TO_PREFERENCE[flag]
    proposals = proposal_set(seed=len(flag) * 31 + ord(flag[-1]))
    rng = random.Random(flag)
    pairs = [tuple(rng.sample(pair, 2)) for pair in itertools.combinations(ALL_TS, 2)
             if set(pair) & set(tsx.PREFERENCES[preference])]
    chunks = [[(CT_IMAGE, pair) for pair in pairs[i:i + 120]] for i in range(0, len(pairs), 120)]
    our_port = ingestd_as(ingestd, flag)
    with storescp([flag], tmp_path) as dcmtk_port:
        theirs = negotiate(dcmtk_port, proposals)
        ours = negotiate(our_port, proposals)
        for chunk in chunks:
            theirs_pairs = negotiate(dcmtk_port, chunk)
            assert negotiate(our_port, chunk) == theirs_pairs, flag
            assert all(t[0] == 0 for t in theirs_pairs)
    for (uid, syntaxes), t, o in zip(proposals, theirs, ours, strict=True):
        if uid == PHOTOACOUSTIC:
            # Deliberate: we accept pynetdicom's newer storage classes without -pm.
            assert t == (0x03, None)
            assert o == (0, neg.choose_transfer_syntax(tsx.PREFERENCES[preference], syntaxes))
            continue
        assert o == t, (flag, uid, syntaxes)
        expected = neg.choose_transfer_syntax(tsx.PREFERENCES[preference], syntaxes)
        if t[0] == 0:
            assert t[1] == expected
    # The proposals really exercised acceptance and refusal.
    assert {r for r, _ in theirs} >= {0, 0x03}


def test_every_storage_sop_class_storescp_accepts(tmp_path: Path, ingestd: Daemon) -> None:
    """Every SOP class of the installed DCMTK's storage list, proposed to both: each is
    accepted by the daemon as by storescp (the list is read from libdcmdata, not from our
    table); the non-patient storage classes storescp leaves out are refused by both."""
    storage = dcmtk_facts.storage_sop_classes()
    refused = [HANGING_PROTOCOL, MWL_FIND, GE_PRIVATE_SYNTAX, PRIVATE_SOP]
    proposals = [(uid, (tsx.IMPLICIT_LE, tsx.EXPLICIT_LE)) for uid in [*storage, *refused]]
    our_port = ingestd_as(ingestd, "+x=")
    with storescp([], tmp_path) as dcmtk_port:
        for start in range(0, len(proposals), 128):
            chunk = proposals[start:start + 128]
            theirs = negotiate(dcmtk_port, chunk)
            ours = negotiate(our_port, chunk)
            refused_by_us = [uid for (uid, _), o in zip(chunk, ours, strict=True) if o[0]]
            assert ours == theirs, refused_by_us
            assert all(t == (0, tsx.EXPLICIT_LE) for (uid, _), t in
                       zip(chunk, theirs, strict=True) if uid in storage)
    assert [outcome[0] for outcome in theirs[-len(refused):]] == [0x03] * len(refused)


@pytest.mark.parametrize("flag", ["+x=", "+xe", "+xb", "+xs", "+xi", "+xa", "+xr", "+xd"])
@pytest.mark.filterwarnings(LEADING_ZERO_WARNING)
def test_same_choice_as_storescp_promiscuous(flag: str, tmp_path: Path,
                                             ingestd: Daemon) -> None:
    preference = tsx.STORESCP_FLAG_TO_PREFERENCE[flag]
    proposals = proposal_set(seed=7)
    our_port = ingestd_as(ingestd, flag, promiscuous=True)
    with storescp([flag, "-pm"], tmp_path) as dcmtk_port:
        theirs = negotiate(dcmtk_port, proposals)
        ours = negotiate(our_port, proposals)
    assert ours == theirs
    outcome = dict(zip(proposals, theirs, strict=True))
    # Private SOP classes accepted with our order, or refused for the transfer syntax (0x04)
    # and not the abstract syntax; known non-storage classes (and a UID only DCMTK names)
    # still refused.
    pref = tsx.PREFERENCES[preference]
    assert outcome[(PRIVATE_SOP, BASE8[::-1])] == (0, neg.choose_transfer_syntax(pref, BASE8))
    jls_only = (tsx.JPEG_LS_LOSSLESS,)
    assert outcome[(PRIVATE_SOP, jls_only)] == (
        (0, tsx.JPEG_LS_LOSSLESS) if tsx.JPEG_LS_LOSSLESS in pref else (0x04, None))
    assert outcome[(MWL_FIND, BASE8)] == (0x03, None)
    assert outcome[(HANGING_PROTOCOL, BASE8)] == (0x03, None)
    assert outcome[(GE_PRIVATE_SYNTAX, BASE8)] == (0x03, None)


@pytest.mark.parametrize("flag", ["+x=", "+xa", "+xs"])
def test_single_context_associations(flag: str, tmp_path: Path, ingestd: Daemon) -> None:
    """Exactly the storescu -R +C shape: one presentation context, several syntaxes."""
    preference = tsx.STORESCP_FLAG_TO_PREFERENCE[flag]
    cases = [(CT_IMAGE, BASE8), (CT_IMAGE, BASE8[::-1]),
             (CT_IMAGE, (tsx.JPEG_2000, tsx.JPEG_LOSSLESS_SV1, tsx.EXPLICIT_BE, tsx.IMPLICIT_LE))]
    our_port = ingestd_as(ingestd, flag)
    with storescp([flag], tmp_path) as dcmtk_port:
        for case in cases:
            theirs = negotiate(dcmtk_port, [case])
            assert negotiate(our_port, [case]) == theirs
            assert theirs == [(0, neg.choose_transfer_syntax(tsx.PREFERENCES[preference],
                                                             case[1]))]


# -- (c) promiscuous mode storing, storescp and the daemon ---------------------------------------

def _dataset(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = pydicom_uid.generate_uid()
    ds.PatientName = "Test^Promiscuous"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom_uid.ExplicitVRLittleEndian
    return ds


def _store(port: int, ds: Dataset) -> tuple[str, int | None, bool]:
    """Propose implicit first (pynetdicom's unrestricted mode would take it), then C-STORE."""
    ae = AE(ae_title="DIFFTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ds.SOPClassUID, [tsx.IMPLICIT_LE, tsx.EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    try:
        assert assoc.is_established
        accepted = str(assoc.accepted_contexts[0].transfer_syntax[0])
        status = assoc.send_c_store(ds)
        code = int(status.Status) if "Status" in status else None
        deadline = time.monotonic() + 2  # an A-ABORT can arrive just after the empty response
        while code is None and not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        return accepted, code, assoc.is_aborted
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def test_promiscuous_store_as_storescp(tmp_path: Path, ingestd: Daemon) -> None:
    """A private SOP class proposed implicit first: both accept it with their own preference
    (explicit little endian), store it and answer success."""
    private = "1.2.826.0.1.3680043.9.7433.99.2"
    our_port = ingestd_as(ingestd, "+x=", promiscuous=True)
    with storescp(["-pm"], tmp_path) as dcmtk_port:
        theirs = _store(dcmtk_port, _dataset(private))
    ds = _dataset(private)
    ours = _store(our_port, ds)
    assert ours == theirs == (tsx.EXPLICIT_LE, 0x0000, False)
    stored = [p for p in ingestd.files() if ds.SOPInstanceUID in p.name]
    assert len(stored) == 1, stored
    written = dcmread(stored[0])
    assert (written.SOPClassUID, written.file_meta.TransferSyntaxUID) == (private, tsx.EXPLICIT_LE)


def test_build_context_round_trip() -> None:
    # acceptor.py builds pynetdicom contexts from our tuples; order must survive.
    cx = build_context(CT_IMAGE, list(tsx.PREFERENCES["all"]))
    assert tuple(cx.transfer_syntax) == tsx.PREFERENCES["all"]
