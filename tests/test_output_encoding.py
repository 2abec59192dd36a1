"""storescp's output options (+F/-F, +t*, +cl, +u/-u, +g*, +e/-e, +p): byte for byte as DCMTK.

The differential cases run the real storescp and dicom-ingestd (translated from the same
command line) side by side, send the same objects with the same storescu invocation and
compare each pair of files: the data sets byte for byte, the meta headers' transfer syntax.
Documented, asserted differences: the meta header names each receiver (Implementation Class UID
and Version Name, so its length differs), and with +p the trailing padding element's length,
which makes each whole file a multiple of f, differs by the same amount.

The codec cases compare elements.py with DCMTK's dcmconv (the same dcmdata writer storescp
calls) on pydicom's bundled files; the full matrix runs with --run-slow.
"""

import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from support.daemon import STAGING
from support.data import minimal_ct
from support.data import testdata as bundled
from support.peers import assert_serving, require_tool, run_tool
from support.uids import CT_IMAGE
from support.wire import associate, c_store, explicit, release
from test_differential import Receiver, run_both, start_ingestd, start_storescp, translate

from dicom_ingestd.codes import Status
from dicom_ingestd.config.schema import StorageConfig
from dicom_ingestd.dcmtk import transfer
from dicom_ingestd.dicom import elements
from dicom_ingestd.errors import StorageError
from dicom_ingestd.worker import encode, header
from dicom_ingestd.worker.store import Store

TEST_FILES = Path(pydicom.__file__).parent / "data/test_files"

# Sent in one association: every bit depth (1, 8, 16, 32), OW pixel data, OW LUTs and
# waveforms, AT/FL/FD/SL/SS values, OF, nested and private sequences, trailing padding.
SENT = ("CT_small.dcm", "MR_small.dcm", "rtdose_1frame.dcm", "SC_rgb_small_odd.dcm",
        "liver_1frame.dcm", "reportsi_with_empty_number_tags.dcm", "waveform_ecg.dcm",
        "examples_palette.dcm", "rtplan.dcm")


@pytest.fixture(scope="module")
def sent_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The bundled files above plus one with every post-1993 VR (UC UR UV OF OD OL OV SV UN),
    a string with extra trailing padding and a sequence of undefined length.  Its elements
    are all in DCMTK 3.6.7's dictionary (see test_implicit_vr_of_elements_newer_than_dcmtk)."""
    folder = tmp_path_factory.mktemp("sent")
    files = [bundled(name) for name in SENT]
    ds = dcmread(bundled("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.LongCodeValue = "A" * 70
    ds.URNCodeValue = "urn:oid:1.2.3"
    ds.SelectorUVValue = 2**40 + 5
    ds.VerticesOfThePolygonalOutline = struct.pack("<3f", 1.5, -2.25, 1e10)
    ds.SelectorODValue = struct.pack("<2d", 3.14159, -1e-300)
    ds.LongPrimitivePointIndexList = struct.pack("<3L", 1, 70000, 2**31)
    ds.SelectorOVValue = struct.pack("<Q", 2**63 + 1)
    ds.SelectorSVValue = -(2**62)
    ds.add_new(0x00110010, "LO", "INGESTD TEST")
    ds.add_new(0x00111001, "UN", b"\x01\x02\x03\x04")
    ds.StudyDescription = "padded    "  # DCMTK drops trailing padding when it re-encodes
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = generate_uid()
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = [item]
    ds["ReferencedImageSequence"].is_undefined_length = True
    path = folder / "vrs.dcm"
    ds.save_as(path, enforce_file_format=True)
    files.append(path)
    return files


def _data_set(raw: bytes) -> tuple[str, bytes, int]:
    """(transfer syntax, data set bytes, offset) of a file with a meta header."""
    assert raw[128:132] == b"DICM"
    end = 144 + struct.unpack_from("<L", raw, 140)[0]
    ts = str(dcmread(pydicom.filebase.DicomBytesIO(raw), stop_before_pixels=True)
             .file_meta.TransferSyntaxUID)
    return ts, raw[end:], end


def _inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)


def _drop_trailing_padding(data: bytes, ts: str) -> bytes:
    """The data set without its last element when that is (FFFC,FFFC)."""
    tag = b"\xff\xfc\xff\xfc" if ts == transfer.EXPLICIT_BE else b"\xfc\xff\xfc\xff"
    pos = data.rfind(tag)
    assert pos > 0, "no trailing padding element"
    return data[:pos]


def _objects(out: Path) -> dict[str, Path]:
    found = {}
    for path in out.rglob("*"):
        if path.is_file() and STAGING not in path.parts:
            found[str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)] = path
    return found


def assert_same_bytes(reference: Receiver, ours: Receiver, args: list[str],
                      count: int) -> None:
    ref_files, our_files = _objects(reference.out), _objects(ours.out)
    assert sorted(our_files) == sorted(ref_files), ours.log()
    assert len(our_files) == count, (reference.log(), ours.log())
    dataset_only = "-F" in args
    padding = int(args[args.index("+p") + 1]) if "+p" in args else 0
    for uid, ref_path in ref_files.items():
        ref_raw, our_raw = ref_path.read_bytes(), our_files[uid].read_bytes()
        if dataset_only:
            assert our_raw[128:132] != b"DICM"
            assert our_raw == ref_raw, f"{ref_path.name}: data set differs"
            continue
        ref_ts, ref_data, _ = _data_set(ref_raw)
        our_ts, our_data, _ = _data_set(our_raw)
        assert our_ts == ref_ts, ref_path.name
        if padding:
            # The padding makes each whole file a multiple of f; the meta headers differ in
            # length (each names its own implementation), so the padding does too.
            assert len(ref_raw) % padding == 0 and len(our_raw) % padding == 0
            ref_data = _drop_trailing_padding(ref_data, ref_ts)
            our_data = _drop_trailing_padding(our_data, our_ts)
        if ref_ts == transfer.DEFLATED_LE and "+cl" in args and args[args.index("+cl") + 1] == "0":
            # Documented difference: level 0 writes stored blocks whose sizes follow the
            # writer's buffer sizes; the inflated data sets are compared instead.
            ref_data, our_data = _inflate(ref_data), _inflate(our_data)
        assert our_data == ref_data, f"{ref_path.name} ({ref_ts}): data set differs"
    bad = [line for line in ours.log().splitlines() if " ERROR " in line or "Traceback" in line]
    assert bad == []
    assert list((ours.out / STAGING).glob("*.part")) == []


# (storescp options, storescu options): the preference +xb/+xi makes the object arrive in
# that transfer syntax (storescu converts it), so each case reads one syntax and writes another.
CASES: list[tuple[list[str], list[str]]] = [
    (["+xb", "+te"], ["+C"]),
    (["+tb"], []),
    (["+xi", "+tb", "-e"], ["+C"]),
    (["+xb", "+ti", "+g"], ["+C"]),
    (["+td", "-g"], []),
    (["-u", "+tb", "+p", "512", "16"], []),
    (["+xd", "+cl", "9"], ["+C", "-xd"]),
    (["-F", "+xi", "+te"], ["+C"]),
]
SLOW_CASES: list[tuple[list[str], list[str]]] = [
    (["+e"], []),
    (["-e"], []),
    (["+g="], []),
    (["+xi", "-u"], ["+C"]),
    (["+xb", "+tb", "+g", "-e"], ["+C"]),
    (["+xi", "+td", "+cl", "0"], ["+C"]),
    (["+xb", "+p", "256", "0"], ["+C"]),
    (["+ti", "+p", "0", "8"], []),
    (["-F", "+e"], []),
]


@pytest.mark.parametrize(("args", "scu_args"), CASES + [
    pytest.param(a, s, marks=pytest.mark.slow) for a, s in SLOW_CASES],
    ids=[" ".join(a) for a, _ in CASES + SLOW_CASES])
def test_files_equal_storescp_byte_for_byte(tmp_path: Path, receivers: list[Receiver],
                                           sent_files: list[Path], args: list[str],
                                           scu_args: list[str]) -> None:
    # -R: propose the SOP classes of the files only (storescu's default list lacks some)
    reference, ours = run_both(tmp_path, receivers, args, sent_files, ["-R", *scu_args])
    assert ours.returncodes == reference.returncodes == [0], ours.stderr
    assert_same_bytes(reference.receiver, ours.receiver, args, len(sent_files))


def test_bit_preserving_data_set_only_stores_the_bytes_received(
        tmp_path: Path, receivers: list[Receiver], sent_files: list[Path]) -> None:
    """+B -F: the data set as received, without meta header (our streaming copy path)."""
    reference, ours = run_both(tmp_path, receivers, ["+B", "-F"], sent_files, ["-R"])
    assert ours.returncodes == reference.returncodes == [0], ours.stderr
    assert_same_bytes(reference.receiver, ours.receiver, ["+B", "-F"], len(sent_files))


def test_unparseable_data_set_is_refused_and_the_daemon_keeps_serving(
        daemon_factory: Any) -> None:
    """The identifying attributes are readable, a later element overruns the data set: the
    re-encoder refuses it with 0xC000, logs why, leaves nothing behind, and goes on."""
    daemon = daemon_factory({"storage": {"transfer_syntax": "big-explicit"}})
    good_uid, bad_uid = generate_uid().encode(), generate_uid().encode()
    broken = minimal_ct(bad_uid, generate_uid().encode(), b"Doe^Jane") \
        + struct.pack("<HH2sH", 0x0020, 0x0011, b"IS", 32) + b"12"
    assoc = associate(daemon.port)
    assert c_store(assoc, 1, CT_IMAGE.encode(), bad_uid, broken) == 0xC000
    good = minimal_ct(good_uid, generate_uid().encode(), b"Doe^John")
    assert c_store(assoc, 1, CT_IMAGE.encode(), good_uid, good, message_id=2) == 0
    release(assoc)
    log = daemon.wait_log("failed with 0xC000")
    assert "cannot parse the data set to re-encode it" in log
    stored = daemon.files()
    assert len(stored) == 1 and good_uid.decode() in stored[0].name
    assert dcmread(stored[0]).file_meta.TransferSyntaxUID == transfer.EXPLICIT_BE
    assert daemon.staging() == []
    assert_serving(daemon)


def test_raw_values_are_re_padded_as_storescp_does(tmp_path: Path,
                                                   receivers: list[Receiver]) -> None:
    """Values storescu would have cleaned up, sent raw: odd lengths, extra trailing spaces,
    white space inside a UID, an odd OB value.  DCMTK re-pads them when it writes; so do we."""
    uid = generate_uid().encode()
    data_set = b"".join([
        explicit(0x0008, 0x0005, b"CS", b"ISO_IR 100"),
        explicit(0x0008, 0x0016, b"UI", CT_IMAGE.encode() + b"\x00"),
        explicit(0x0008, 0x0018, b"UI", uid),  # odd length: zero-padded
        explicit(0x0008, 0x0060, b"CS", b"CT"),
        explicit(0x0008, 0x0070, b"LO", b"ACME"),
        explicit(0x0008, 0x1030, b"LO", b"odd"),
        explicit(0x0010, 0x0010, b"PN", b"Doe^John   "),  # extra trailing spaces
        explicit(0x0018, 0x0015, b"CS", b"HEAD    "),
        explicit(0x0020, 0x000D, b"UI", b"1.2.3.4 "),  # space-padded UID
        explicit(0x0020, 0x000E, b"UI", b"1.2.3.5\x00"),
        explicit(0x0020, 0x0052, b"UI", b"1.2 .3\x00"),  # white space inside a UID
        explicit(0x0029, 0x0010, b"LO", b"PRIVATE "),
        explicit(0x0029, 0x1001, b"OB", b"\x01\x02\x03"),  # odd binary value
    ])
    if len(data_set) % 2:  # DCMTK refuses odd PDV fragments; the values may be odd
        data_set += explicit(0x0029, 0x1002, b"OB", b"\x07")
    args = ["+tb"]
    reference = start_storescp(tmp_path, args)
    receivers.append(reference)
    ours = start_ingestd(tmp_path, args)
    receivers.append(ours)
    for receiver in (reference, ours):
        assoc = associate(receiver.port)
        assert c_store(assoc, 1, CT_IMAGE.encode(), uid, data_set) == 0
        release(assoc)
        receiver.stop()
    assert_same_bytes(reference, ours, args, 1)


# --- configuration: storescp's incompatibilities -------------------------------------------


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\noutput_directory = "{tmp_path}"\n{text}')
    return subprocess.run([sys.executable, "-m", "dicom_ingestd", "check-config", "-c",
                           str(config)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("text", "message"), [
    ('bit_preserving = true\ntransfer_syntax = "big-explicit"',
     "storage.transfer_syntax = 'big-explicit': re-encodes the data set, which "
     "storage.bit_preserving = true forbids"),
    ('bit_preserving = true\nsequence_lengths = "explicit"\ngroup_length = "create"',
     "storage.group_length = 'create': re-encodes"),
    ('file_format = "dataset"\nfile_padding = 256', "padding needs storage.file_format"),
    ('transfer_syntax = "implicit"\n[negotiation]\npreferred_transfer_syntax = "jpeg8"',
     "compressed data sets cannot be converted"),
    ('transfer_syntax = "little-explicit"\ndeflate_level = 9', "only applies to deflated"),
    ("file_padding = 3", "storage.file_padding = 3: must be even"),
    ('transfer_syntax = "big"', "must be one of received, little-explicit, big-explicit"),
    ("deflate_level = 10", "storage.deflate_level = 10: must be an integer from 0 to 9"),
])
def test_incompatible_settings_are_config_errors(tmp_path: Path, text: str,
                                                 message: str) -> None:
    result = _check(tmp_path, text)
    assert result.returncode == 78, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert str(tmp_path / "c.toml") in result.stderr


def test_compressed_data_set_is_not_converted(tmp_path: Path) -> None:
    """A compressed object reaching a converting configuration (e.g. through a negotiation
    profile) is refused with storescp's status, 0xA700, and nothing is left behind."""
    storage = StorageConfig(output_directory=str(tmp_path), transfer_syntax="little-explicit")
    store = Store(storage)
    store.open()
    raw = bundled("MR_small_RLE.dcm").read_bytes()
    ts, data, _ = _data_set(raw)
    temp = store.temp_file()
    temp.write(header.file_meta("1.2.3", "4.5.6", ts, "1.2", "X"))
    temp.write(data)
    temp.finish(False)
    with pytest.raises(StorageError) as raised:
        encode.rewrite(storage, store, temp, ts, lambda t: b"")
    assert raised.value.status == Status.OUT_OF_RESOURCES
    assert "no conversion of compressed pixel data" in str(raised.value)
    assert list((tmp_path / STAGING).iterdir()) == []
    store.close()


def test_translation_fills_storescp_defaults_only_when_re_encoding() -> None:
    plain = translate(["-F", "-od", "/x", "104"]).stdout
    assert 'file_format = "dataset"' in plain and "sequence_lengths" not in plain
    big = translate(["+tb", "-od", "/x", "104"]).stdout
    assert 'transfer_syntax = "big-explicit"' in big
    assert 'sequence_lengths = "explicit"' in big and 'group_length = "recalc"' in big


# --- the codec against dcmconv -------------------------------------------------------------

CONVERSIONS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "+te": (["+te"], {"transfer_syntax": transfer.EXPLICIT_LE}),
    "+tb": (["+tb"], {"transfer_syntax": transfer.EXPLICIT_BE}),
    "+ti": (["+ti"], {"transfer_syntax": transfer.IMPLICIT_LE}),
    "+td +cl 9": (["+td", "+cl", "9"], {"transfer_syntax": transfer.DEFLATED_LE,
                                        "deflate_level": 9}),
    "-e": (["-e"], {"sequence_lengths": "undefined"}),
    "+g": (["+g"], {"group_length": "create"}),
    "-g": (["-g"], {"group_length": "remove"}),
    "-u": (["-u"], {"new_vrs": False}),
    "+tb -e +g +p 100 6": (["+tb", "-e", "+g", "+p", "100", "6"],
                           {"transfer_syntax": transfer.EXPLICIT_BE,
                            "sequence_lengths": "undefined", "group_length": "create",
                            "file_padding": 100, "item_padding": 6}),
}
# Truncated or malformed files DCMTK refuses to read (storescp would refuse them as well).
UNREADABLE = ("MR_truncated.dcm", "rtplan_truncated.dcm", "SC_rgb_jpeg.dcm")
QUICK_FILES = ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtdose_1frame.dcm",
               "examples_ybr_color.dcm", "UN_sequence.dcm", "nested_priv_SQ.dcm")


def _codec_files(quick: bool) -> list[str]:
    if quick:
        return list(QUICK_FILES)
    return sorted(p.name for p in TEST_FILES.glob("*.dcm")
                  if p.read_bytes()[128:132] == b"DICM"
                  and p.name not in ("no_meta_group_length.dcm", "meta_missing_tsyntax.dcm"))


def _compare_with_dcmconv(tmp_path: Path, name: str, option: str) -> None:
    require_tool("dcmconv")
    dcmconv_args, settings = CONVERSIONS[option]
    source = TEST_FILES / name
    ts, data, _ = _data_set(source.read_bytes())
    target = tmp_path / "out.dcm"
    padding = [] if "+p" in dcmconv_args else ["-p"]  # storescp's default is -p (remove)
    result = run_tool(["dcmconv", *padding, *dcmconv_args, str(source), str(target)])
    settings = {"transfer_syntax": ts, **settings}
    if result.returncode != 0:
        # dcmconv cannot convert compressed data (neither do we), nor read a broken file
        assert name in UNREADABLE or (settings["transfer_syntax"] != ts
                                      and ts not in elements.UNCOMPRESSED), result.stderr
        return
    ref_ts, ref_data, prefix = _data_set(target.read_bytes())
    assert ref_ts == settings["transfer_syntax"]
    ours = b"".join(elements.write(elements.parse(data, ts), elements.Encoding(**settings),
                                   prefix))
    assert ours == ref_data, f"{name} {option}"


@pytest.mark.parametrize("option", list(CONVERSIONS))
def test_codec_equals_dcmconv(tmp_path: Path, option: str) -> None:
    for name in _codec_files(quick=True):
        _compare_with_dcmconv(tmp_path, name, option)


@pytest.mark.slow
@pytest.mark.parametrize("option", list(CONVERSIONS))
def test_codec_equals_dcmconv_on_every_bundled_file(tmp_path: Path, option: str) -> None:
    for name in _codec_files(quick=False):
        _compare_with_dcmconv(tmp_path, name, option)


def test_implicit_vr_of_elements_newer_than_dcmtk(tmp_path: Path) -> None:
    """Documented difference: an implicit VR element that DCMTK 3.6.7's dictionary does not
    know yet is written as UN by storescp; we take its VR from pydicom's newer dictionary."""
    ds = dcmread(bundled("MR_small_implicit.dcm"))
    ds.FileOffsetInContainer = 5  # (0008,040C) UV, added to the standard in 2022
    source = tmp_path / "in.dcm"
    ds.save_as(source, enforce_file_format=True)
    target = tmp_path / "out.dcm"
    run_tool(["dcmconv", "-p", "+te", str(source), str(target)], check=True)
    ts, data, _ = _data_set(source.read_bytes())
    ref = elements.parse(_data_set(target.read_bytes())[1], transfer.EXPLICIT_LE)
    ours = elements.parse(b"".join(elements.write(elements.parse(data, ts),
                                                  elements.Encoding(transfer.EXPLICIT_LE))),
                          transfer.EXPLICIT_LE)
    vrs = {e.tag: e.vr for e in ours}
    assert {e.tag: e.vr for e in ref} == {**vrs, 0x0008040C: "UN"}
    assert vrs[0x0008040C] == "UV"


def test_unparseable_data_set_is_refused(tmp_path: Path) -> None:
    """A truncated data set cannot be re-encoded: 0xC000, staging emptied."""
    storage = StorageConfig(output_directory=str(tmp_path), transfer_syntax="big-explicit")
    store = Store(storage)
    store.open()
    temp = store.temp_file()
    temp.write(header.file_meta("1.2.3", "4.5.6", transfer.EXPLICIT_LE, "1.2", "X"))
    temp.write(bundled("CT_small.dcm").read_bytes()[400:1000])
    temp.finish(False)
    with pytest.raises(StorageError) as raised:
        encode.rewrite(storage, store, temp, transfer.EXPLICIT_LE, lambda t: b"")
    assert raised.value.status == Status.CANNOT_UNDERSTAND
    assert list((tmp_path / STAGING).iterdir()) == []
    store.close()

