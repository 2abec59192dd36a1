"""In-process fuzzing of the parsers a peer's bytes reach, with fuzzgen's inputs.

Each parser has one documented way to refuse input (an exception type the session turns into
an A-ABORT or a failure status); anything else escaping it is a bug that the daemon would log
as an "internal error".  These run in-process, so tens of thousands of inputs take seconds:
the A-ASSOCIATE-RQ decoder, screening and negotiation (acceptor.py, pynetdicom underneath),
the command set decoder (dimse.py), the fast identifying-attribute reader (header.py, with
identify.py's pydicom fallback), and naming/layout for every sort and file name mode.
"""

import random
import struct
import sys
from datetime import datetime
from pathlib import Path

import fuzzgen
import pytest
from support import uids

from dicom_ingestd.config.load import config_from_mapping
from dicom_ingestd.dicom import dimse
from dicom_ingestd.worker import acceptor, header
from dicom_ingestd.worker.identify import Identity, UnreadableDataSet, identify, identify_prefix
from dicom_ingestd.worker.layout import Layout
from dicom_ingestd.worker.naming import MissingStudyUID
from dicom_ingestd.worker.session import MAX_ASSOCIATE_RQ

# Malformed data sets make pydicom warn; what matters here is what escapes, not the warnings.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEED = 20261128
FAST = 4000  # inputs per parser in the normal run (A-ASSOCIATE-RQs: a third, they cost more)
SLOW = 100_000


def _associate_inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        case = fuzzgen.associate_case(rng) if rng.random() < 0.9 else fuzzgen.random_case(rng)
        out.append(case.data)
    return out


def check_associate(data: bytes, config: object) -> str:
    """decode → screen → accept; only RequestError may escape decoding."""
    if len(data) - 6 > MAX_ASSOCIATE_RQ:
        return "too-long"  # the session refuses it before decoding
    try:
        request, primitive, version = acceptor.decode_request(data)
    except acceptor.RequestError:
        return "undecodable"
    assert isinstance(config, type(CONFIG))
    rejection = acceptor.screen(request, primitive, version, config)
    if rejection is not None:
        assert len(rejection.encode()) == 10
        return "rejected"
    acceptance = acceptor.accept(request, primitive, config)
    assert acceptance.pdu[:1] == b"\x02"
    for context_id, context in acceptance.contexts.items():
        assert 0 <= context_id <= 255 and context.transfer_syntax
    return "accepted"


CONFIG = config_from_mapping({"storage": {"output_directory": "/nonexistent"}})
PROMISCUOUS = config_from_mapping({"storage": {"output_directory": "/nonexistent"},
                                   "negotiation": {"promiscuous": True}})


def run_associate(seed: int, count: int) -> dict[str, int]:
    acceptor.warm_up(CONFIG)
    outcomes: dict[str, int] = {}
    for index, data in enumerate(_associate_inputs(seed, count)):
        config = PROMISCUOUS if index % 4 == 0 else CONFIG
        try:
            outcome = check_associate(data, config)
        except Exception as exc:
            raise AssertionError(f"input {index} of seed {seed} ({data[:200].hex()}...) "
                                 f"raised {exc!r}") from exc
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def _command_inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 0.1:
            out.append(rng.randbytes(rng.randint(0, 200)))
        else:
            out.append(fuzzgen._command_mutation(rng)[1])
    return out


def run_commands(seed: int, count: int) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for index, data in enumerate(_command_inputs(seed, count)):
        try:
            command = dimse.decode_command(data, fix_uid_padding=bool(index % 2))
            outcome = "decoded"
            # What the session derives from a decoded command must not raise either.
            header.file_meta(command.sop_class_uid, command.sop_instance_uid, uids.CT_IMAGE,
                             "1.2.3", "X", "FUZZ")
            dimse.encode_response(dimse.C_STORE_RSP, command.message_id, 0,
                                  command.sop_class_uid, command.sop_instance_uid, "why")
        except dimse.CommandError:
            outcome = "refused"
        except Exception as exc:
            raise AssertionError(f"command input {index} of seed {seed} ({data.hex()}) "
                                 f"raised {exc!r}") from exc
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


LAYOUTS = [{"sort": sort, "filenames": names, "sort_prefix": "P"}
           for sort in ("none", "conc-studies", "study-uid", "patientname")
           for names in ("default", "unique", "timenames")]


def _data_set_of(case: fuzzgen.Case) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of a fuzzgen data set case (well-framed PDVs)."""
    data = case.data
    pos = 0
    command = bytearray()
    dataset = bytearray()
    context = 1
    while pos < len(data):
        (length,) = struct.unpack_from(">L", data, pos + 2)
        body = data[pos + 6:pos + 6 + length]
        item_length, context, control = struct.unpack_from(">LBB", body, 0)
        (command if control & 1 else dataset).extend(body[6:4 + item_length])
        pos += 6 + length
    syntax = uids.EXPLICIT_LE if context == 1 else uids.IMPLICIT_LE
    return syntax, bytes(dataset)


def run_data_sets(seed: int, count: int, tmp_path: Path) -> dict[str, int]:
    rng = random.Random(seed)
    layouts = [Layout(config_from_mapping({"storage": {"output_directory": "/x", **spec}})
                      .storage) for spec in LAYOUTS]
    outcomes: dict[str, int] = {}
    scratch = tmp_path / "object.dcm"
    for index in range(count):
        case = fuzzgen.dataset_case(rng)
        syntax, data = _data_set_of(case)
        try:
            ident = identify_prefix(data, syntax, complete=True)
            outcome = "fast"
            if ident is None:
                scratch.write_bytes(header.file_meta(uids.CT_IMAGE, "1.2.3", syntax,
                                                     "1.2.3", "X", "FUZZ") + data)
                ident = identify(scratch)
                outcome = "pydicom"
        except UnreadableDataSet:
            outcomes["unreadable"] = outcomes.get("unreadable", 0) + 1
            continue
        except Exception as exc:
            raise AssertionError(f"data set input {index} of seed {seed} ({case.how}, "
                                 f"{data[:300].hex()}) raised {exc!r}") from exc
        try:
            check_layouts(layouts, ident)
        except Exception as exc:
            raise AssertionError(f"layout of {ident} (input {index}) raised {exc!r}") from exc
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def check_layouts(layouts: list[Layout], ident: Identity) -> None:
    for layout in layouts:
        try:
            target = layout.target(ident.sop_class_uid, ident.sop_instance_uid, ident,
                                   datetime(2026, 11, 28, 12, 0, 0))
        except MissingStudyUID:
            continue
        for part in [*target.directories, target.candidates[0]]:
            assert part not in ("", ".", "..") and "/" not in part and "\0" not in part, part
            assert len(part.encode()) <= 255, part


def test_associate_rq_parsing_never_escapes() -> None:
    outcomes = run_associate(SEED, FAST // 3)
    # The generator must reach every branch: some inputs decode, are rejected and accepted.
    assert set(outcomes) == {"undecodable", "rejected", "accepted", "too-long"}, outcomes


def test_command_set_parsing_never_escapes() -> None:
    outcomes = run_commands(SEED, FAST)
    assert set(outcomes) == {"decoded", "refused"}, outcomes


def test_data_set_identification_and_naming_never_escape(tmp_path: Path) -> None:
    outcomes = run_data_sets(SEED, FAST // 3, tmp_path)
    assert {"fast", "unreadable"} <= set(outcomes), outcomes


@pytest.mark.slow
def test_parsers_slow(tmp_path: Path) -> None:
    for seed in range(SEED + 1, SEED + 3):
        print(run_associate(seed, SLOW // 2), run_commands(seed, SLOW // 2),
              run_data_sets(seed, SLOW // 10, tmp_path), file=sys.stderr)
