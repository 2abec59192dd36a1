"""storescp's output options: re-encode a received object before it is placed.

The default path stores the data set exactly as received (streamed to the staging file;
storescp +B).  When [storage] asks for another encoding (transfer_syntax, sequence_lengths,
group_length, file_padding/item_padding, new_vrs = false) the finished staging file is read
whole, re-encoded by elements.py the way DCMTK's storescp writes it, and written to a new
staging file, which then takes the original's place.  file_format = "dataset" alone only drops
the meta header (a streaming copy).

The staging file always starts with our File Meta Information, so the identification and
checks before this step are the same in every mode.
"""

import os
import struct
from collections.abc import Callable

from dicom_ingestd.codes import Status
from dicom_ingestd.config.schema import StorageConfig
from dicom_ingestd.dcmtk.transfer import DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE
from dicom_ingestd.dicom import elements
from dicom_ingestd.errors import StorageError
from dicom_ingestd.worker.store import Store, TempFile

TRANSFER_SYNTAXES = {
    "little-explicit": EXPLICIT_LE,
    "big-explicit": EXPLICIT_BE,
    "implicit": IMPLICIT_LE,
    "deflated": DEFLATED_LE,
}
_COPY_CHUNK = 1 << 20


def reencodes(storage: StorageConfig) -> bool:
    """True when objects are re-encoded (the whole data set is then held in memory, up to
    storage.max_decoded_size bytes after inflation; a larger one is refused)."""
    return bool(storage.reencoding_keys())


def wanted(storage: StorageConfig) -> bool:
    """True when the staging file must be rewritten before it is placed."""
    return reencodes(storage) or storage.file_format == "dataset"


def _meta_length(data: bytes) -> int:
    """Size of preamble, 'DICM' and the meta group at the start of a staging file."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise StorageError("staging file has no file meta header", Status.PROCESSING_FAILURE)
    return 144 + int(struct.unpack_from("<L", data, 140)[0])


def rewrite(storage: StorageConfig, store: Store, temp: TempFile, received_ts: str,
            file_meta: Callable[[str], bytes]) -> TempFile:
    """Write the finished staging file `temp` as [storage] says into a new staging file.

    Returns the new file (finished, fsynced when storage.fsync); `temp` is discarded either
    way.  Raises StorageError with the status to answer.  `file_meta(ts)` gives the meta
    header for the transfer syntax written.
    """
    new: TempFile | None = None
    try:
        if not reencodes(storage):
            new = _copy_data_set(store, temp)
        else:
            new = _reencode(storage, store, temp, received_ts, file_meta)
        new.finish(storage.fsync)
        return new
    except BaseException:
        if new is not None:
            new.discard()
        raise
    finally:
        temp.discard()


def _copy_data_set(store: Store, temp: TempFile) -> TempFile:
    """file_format = "dataset" without re-encoding: the received bytes after the meta."""
    new = store.temp_file()
    with temp.open_read() as source:
        head = source.read(1 << 16)
        offset = _meta_length(head)
        source.seek(offset)
        while chunk := source.read(_COPY_CHUNK):
            new.write(chunk)
    return new


def _reencode(storage: StorageConfig, store: Store, temp: TempFile, received_ts: str,
              file_meta: Callable[[str], bytes]) -> TempFile:
    limit = storage.max_decoded_size
    with temp.open_read() as source:
        offset = _meta_length(source.read(1 << 16))
        size = source.seek(0, os.SEEK_END) - offset
        if size > limit:  # checked before a byte is read into memory
            raise StorageError(f"refused: re-encoding holds the data set in memory, and its "
                               f"{size} bytes exceed storage.max_decoded_size ({limit})",
                               Status.OUT_OF_RESOURCES)
        source.seek(0)
        data = source.read()
    target = TRANSFER_SYNTAXES.get(storage.transfer_syntax, received_ts)
    if target != received_ts and received_ts not in elements.UNCOMPRESSED:
        raise StorageError(f"cannot write a data set received in {received_ts} (compressed) "
                           f"as {target} (storage.transfer_syntax = "
                           f"\"{storage.transfer_syntax}\"): no conversion of compressed "
                           "pixel data", Status.OUT_OF_RESOURCES)
    try:
        tree = elements.parse(memoryview(data)[offset:], received_ts, max_size=limit)
    except elements.DataSetTooLarge as exc:
        raise StorageError(f"refused: {exc} (storage.max_decoded_size: re-encoding holds the "
                           "data set in memory)", Status.OUT_OF_RESOURCES) from None
    except elements.DataSetError as exc:
        raise StorageError(f"cannot parse the data set to re-encode it ({exc})",
                           Status.CANNOT_UNDERSTAND) from None
    meta = file_meta(target) if storage.file_format == "file" else b""
    encoding = elements.Encoding(
        target,
        sequence_lengths=storage.sequence_lengths,
        group_length="recalc" if storage.group_length == "received" else storage.group_length,
        new_vrs=storage.new_vrs,
        file_padding=storage.file_padding,
        item_padding=storage.item_padding,
        deflate_level=storage.deflate_level,
    )
    new = store.temp_file()
    new.write(meta)
    for chunk in elements.write(tree, encoding, len(meta)):
        new.write(chunk)
    return new
