"""Row hashing and snapshot ids (DESIGN.md: a snapshot id is the sha256 of kind, iteration, split and the row
hashes in canonical key order). Changing anything here changes every id: tests/test_pinned_ids.py guards it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builders.errors import InputError
from builders.schemas import OPTIONAL_COLUMNS, Kind

_ID_HEADER = "iterdpo-snapshot/1"


# A row's canonical bytes: each column in schema order, each value as a presence byte (0: null, then nothing more)
# followed by
#   string/binary: 8-byte little-endian byte length + the UTF-8 bytes;  integer: 8-byte LE int64;
#   float: 8-byte LE IEEE-754 (NaN and infinities are refused);  bool: 1 byte;
#   list: 8-byte LE element count + each element;  struct: each field in declared order.
# Except: a null in an optional column (schemas.Kind.optional: trailing columns added after ids were pinned, such as
# a prompt's `messages`) adds no bytes at all, so a row without one hashes exactly as before the column existed; a
# row with one has more bytes after the same prefix, so the two never collide.
# Built column-wise with Arrow kernels, so hashing costs one sha256 call per row, not Python work per value.
def _prefixed(valid: np.ndarray, numbers: np.ndarray) -> pa.Array:
    """9 bytes per value: presence byte + 8-byte LE number; for a null, the single byte 0."""
    n = len(numbers)
    raw = np.zeros((n, 9), dtype=np.uint8)
    raw[:, 0] = valid
    raw[:, 1:] = np.ascontiguousarray(numbers).view(np.uint8).reshape(n, 8)
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(9), n, [None, pa.py_buffer(raw.tobytes())]).cast(pa.binary())
    return pc.if_else(pa.array(valid), fixed, b"\x00") if not valid.all() else fixed


def _join(*arrays: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(*arrays, b"")


def _encode(arr: pa.Array) -> pa.Array:
    """Canonical bytes of every value of `arr` (one binary value per element, never null)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        filled = arr.cast(pa.binary()).fill_null(b"")
        lengths = pc.binary_length(filled).to_numpy(zero_copy_only=False).astype("<i8")
        return _join(_prefixed(valid, lengths), filled)
    if pa.types.is_boolean(t):
        return pc.if_else(arr.is_valid(), pc.if_else(arr.fill_null(False), b"\x01\x01", b"\x01\x00"), b"\x00").cast(
            pa.binary()
        )
    if pa.types.is_integer(t):
        return _prefixed(valid, arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).astype("<i8"))
    if pa.types.is_floating(t):
        values = arr.cast(pa.float64()).fill_null(0.0)
        if not pc.all(pc.is_finite(values)).as_py():
            raise InputError("rows hold a NaN or infinite value, which a snapshot cannot store")
        return _prefixed(valid, values.to_numpy(zero_copy_only=False).astype("<f8"))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype("<i8")
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
        joined = pc.binary_join(pa.ListArray.from_arrays(offsets, _encode(pc.list_flatten(arr))), b"")
        return _join(_prefixed(valid, lengths), joined)
    if pa.types.is_struct(t):
        fields = [_encode(child) for child in arr.flatten()]
        return pc.if_else(arr.is_valid(), _join(pa.array([b"\x01"] * len(arr), pa.binary()), *fields), b"\x00")
    raise InputError(f"cannot hash values of type {t}")


def _encode_column(name: str, col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    encoded = _encode(col)
    if name in OPTIONAL_COLUMNS and col.null_count:
        return pc.if_else(col.is_valid(), encoded, b"")
    return encoded


def row_hashes(table: pa.Table) -> list[bytes]:
    """sha256 of each row's canonical bytes (see above)."""
    if table.num_rows == 0:
        return []
    encoded = [_encode_column(name, col) for name, col in zip(table.column_names, table.columns)]
    rows = _join(*encoded) if len(encoded) > 1 else encoded[0]
    offsets = np.frombuffer(rows.buffers()[1], dtype=np.int32)[rows.offset : rows.offset + len(rows) + 1]
    data = memoryview(rows.buffers()[2])
    sha = hashlib.sha256
    return [sha(data[a:b]).digest() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def snapshot_id(kind: str, iteration: int | None, split: str | None, hashes: Iterable[bytes]) -> str:
    h = hashlib.sha256(json.dumps([_ID_HEADER, kind, iteration, split]).encode())
    for rh in hashes:
        h.update(rh)
    return h.hexdigest()


def sort_order(table: pa.Table, k: Kind) -> pa.Array:
    """Row positions in canonical (key) order; rejects null and duplicate keys. The table itself is not copied."""
    for col in k.key:
        if table.column(col).null_count:
            raise InputError(f"{k.name} rows have a null {col}")
    order = pc.sort_indices(table.select(list(k.key)), sort_keys=[(c, "ascending") for c in k.key])
    if table.num_rows > 1:
        keys = table.select(list(k.key)).take(order)
        same = None
        for col in k.key:
            values = keys.column(col).combine_chunks()
            eq = pc.equal(values.slice(1), values.slice(0, len(values) - 1))
            same = eq if same is None else pc.and_(same, eq)
        if pc.any(same).as_py():
            at = pc.index(same, True).as_py()
            first = {c: keys.column(c)[at].as_py() for c in k.key}
            raise InputError(f"{k.name} rows repeat the key {first} ({pc.sum(same).as_py()} duplicate rows)")
    return order
