"""The DuckDB catalog: content-addressed rows, snapshots with lineage, tags, and resumable work.

Contracts (DESIGN.md):
- a snapshot id is the sha256 of (kind, iteration, split, the row hashes in canonical key order); params and
  parents are recorded but not hashed, so registering the same content again is a no-op returning the same id;
- rows are stored once per kind, keyed by their own hash, and shared by every snapshot that contains them;
- every registration is one transaction, and the file is opened only for that transaction (DuckDB allows one
  writing process per file), so other processes can work between a long stage's batches;
- work in progress (finished batches of a running stage) lives beside the snapshots, keyed by the stage's inputs
  and params, and is never listed as a snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builders import __version__
from builders.config import CatalogConfig
from builders.errors import CatalogBusy, CatalogError, InputError, NotFound
from builders.schemas import KINDS, SPLITS, Kind, conform, kind as get_kind

SCHEMA_VERSION = 1
_ID_HEADER = "iterdpo-snapshot/1"
_MIN_PREFIX = 4
# KIND (its newest snapshot without an iteration, e.g. the prompt pool), KIND:N (iteration N) or KIND:N:SPLIT
_SELECTOR = re.compile(r"(?P<kind>[a-z]+)(?::(?P<iteration>\d+)(?::(?P<split>train|test))?)?")


# ----------------------------------------------------------------------------------------------------------- hashing
# A row's canonical bytes: each column in schema order, each value as a presence byte (0: null, then nothing more)
# followed by
#   string/binary: 8-byte little-endian byte length + the UTF-8 bytes;  integer: 8-byte LE int64;
#   float: 8-byte LE IEEE-754 (NaN and infinities are refused);  bool: 1 byte;
#   list: 8-byte LE element count + each element;  struct: each field in declared order.
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
        return pc.if_else(arr.is_valid(), pc.if_else(arr.fill_null(False), b"\x01\x01", b"\x01\x00"), b"\x00").cast(pa.binary())
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


def row_hashes(table: pa.Table) -> list[bytes]:
    """sha256 of each row's canonical bytes (see above)."""
    if table.num_rows == 0:
        return []
    rows = _join(*[_encode(col) for col in table.columns]) if table.num_columns > 1 else _encode(table.column(0))
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


# --------------------------------------------------------------------------------------------------------- records
@dataclass
class Snapshot:
    id: str
    kind: str
    iteration: int | None
    split: str | None
    rows: int
    parents: list[str]
    params: dict[str, Any]
    created_at: str
    tags: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "iteration": self.iteration,
            "split": self.split,
            "rows": self.rows,
            "parents": self.parents,
            "params": self.params,
            "created_at": self.created_at,
            "tags": self.tags,
        }


@dataclass(frozen=True)
class Registration:
    """One snapshot to register: rows of a kind, where they belong, and how they were made."""

    kind: str
    table: pa.Table
    iteration: int | None = None
    split: str | None = None
    parents: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rows_table(kind: str) -> str:
    return f"rows_{kind}"


# DuckDB 2 refuses new work on a connection while a result is unfinished: every statement is fetched in full.
def _all(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> list[tuple]:
    return con.execute(query, list(params)).fetchall()


def _one(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> tuple | None:
    rows = _all(con, query, params)
    return rows[0] if rows else None


def _run(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> None:
    _all(con, query, params)


def _arrow(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> pa.Table:
    return con.sql(query, params=list(params)).to_arrow_table()


_DDL = [
    "CREATE TABLE iterdpo_meta(key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
    """CREATE TABLE snapshots(id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, iteration INTEGER, split VARCHAR,
       n_rows BIGINT NOT NULL, params VARCHAR NOT NULL, created_at VARCHAR NOT NULL)""",
    "CREATE TABLE snapshot_parents(snapshot_id VARCHAR NOT NULL, parent_id VARCHAR NOT NULL, position INTEGER NOT NULL)",
    "CREATE TABLE snapshot_rows(snapshot_id VARCHAR NOT NULL, row_hash BLOB NOT NULL)",
    "CREATE TABLE tags(name VARCHAR PRIMARY KEY, snapshot_id VARCHAR NOT NULL, created_at VARCHAR NOT NULL)",
    """CREATE TABLE work(work_key VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, iteration INTEGER, split VARCHAR,
       params VARCHAR NOT NULL, created_at VARCHAR NOT NULL)""",
    "CREATE TABLE work_units(work_key VARCHAR NOT NULL, unit VARCHAR NOT NULL, info VARCHAR)",
    "CREATE TABLE work_rows(work_key VARCHAR NOT NULL, row_hash BLOB NOT NULL)",
]


def _with_hash(table: pa.Table, hashes: list[bytes]) -> pa.Table:
    return table.add_column(0, "row_hash", pa.array(hashes, pa.binary()))


# --------------------------------------------------------------------------------------------------------- catalog
class Catalog:
    """A catalog file. Cheap to create: the file is opened only inside each short transaction."""

    def __init__(self, path: str | os.PathLike | None = None, config: CatalogConfig | None = None):
        base = config or CatalogConfig.from_env(path)
        self.config = CatalogConfig(Path(path), base.lock_timeout, base.chunk_rows, base.memory_limit) if path else base
        self.path = Path(self.config.path)

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------------- connection
    def exists(self) -> bool:
        return self.path.exists()

    def _open(self) -> duckdb.DuckDBPyConnection:
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.config.lock_timeout
        delay = 0.02
        while True:
            try:
                # zstd for every column: long texts compress 1.5x better and checkpoint 2x faster than DuckDB's
                # default analysis (FSST/dictionary), and nested string lists get it too (measured in bench/catalog.py)
                con = duckdb.connect(str(self.path), config={"memory_limit": self.config.memory_limit,
                                                             "force_compression": "zstd"})
                break
            except duckdb.IOException as e:
                msg = str(e)
                if "lock" not in msg.lower():
                    raise CatalogError(f"catalog {self.path} cannot be opened: {_first_line(msg)}") from None
                if time.monotonic() >= deadline:
                    raise CatalogBusy(
                        f"catalog {self.path} is held by another process (waited {self.config.lock_timeout:.0f}s; "
                        f"set ITERDPO_LOCK_TIMEOUT to wait longer)"
                    ) from None
                # jitter so that several waiting processes do not retry in lockstep
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)
            except duckdb.Error as e:
                raise CatalogError(f"catalog {self.path} cannot be opened: {_first_line(str(e))}") from None
        try:
            self._check_schema(con)
        except BaseException:
            con.close()
            raise
        return con

    def _check_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        tables = {r[0] for r in _all(con, "SELECT table_name FROM information_schema.tables")}
        if "iterdpo_meta" not in tables:
            if tables:
                raise CatalogError(f"{self.path} is a DuckDB file but not an iterdpo catalog (tables: {sorted(tables)[:5]})")
            self._create(con)
            return
        row = _one(con, "SELECT value FROM iterdpo_meta WHERE key = 'schema_version'")
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"catalog {self.path} has schema version {version}, newer than this iterdpo {__version__} "
                f"understands ({SCHEMA_VERSION}); upgrade iterdpo"
            )
        if version < SCHEMA_VERSION:
            raise CatalogError(f"catalog {self.path} has an unknown schema version {version}")

    def _create(self, con: duckdb.DuckDBPyConnection) -> None:
        con.begin()
        for ddl in _DDL:
            _run(con, ddl)
        for k in KINDS.values():
            empty = _with_hash(k.schema.empty_table(), [])
            con.register("_empty", empty)
            _run(con, f"CREATE TABLE {_rows_table(k.name)} AS SELECT * FROM _empty")
            con.unregister("_empty")
        _run(con, 
            "INSERT INTO iterdpo_meta VALUES ('schema_version', ?), ('created_by', ?)",
            [str(SCHEMA_VERSION), f"iterdpo {__version__}"],
        )
        con.commit()

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the file for one short unit of work, then release it for other processes."""
        con = self._open()
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One atomic change: all of it is committed, or (on any error or a kill) none of it."""
        with self.connect() as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    # ----------------------------------------------------------------------------------------------- registration
    def register(
        self,
        kind: str,
        table: pa.Table,
        *,
        iteration: int | None = None,
        split: str | None = None,
        parents: Sequence[str] = (),
        params: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Register `table` as a snapshot of `kind`; identical content returns the existing snapshot unchanged."""
        return self.register_many([Registration(kind, table, iteration, split, tuple(parents), dict(params or {}))])[0]

    def register_many(self, items: Sequence["Registration"]) -> list[Snapshot]:
        """Register several snapshots in ONE transaction: all of them land, or none does."""
        prepared = []
        for item in items:  # all hashing happens before the file is opened
            k = get_kind(item.kind)
            if item.split is not None and item.split not in SPLITS:
                raise InputError(f"split must be one of {', '.join(SPLITS)}, not {item.split!r}")
            table = conform(item.table, k)
            order = sort_order(table, k)
            hashes = self._hash_chunks(table)
            sid = snapshot_id(k.name, item.iteration, item.split, (hashes[i] for i in order.to_pylist()))
            record = dict(item.params)
            record.setdefault("iterdpo_version", __version__)
            prepared.append((k, item, table, hashes, sid, json.dumps(record, sort_keys=True, allow_nan=False, default=str)))
        with self.transaction() as con:
            out = []
            for k, item, table, hashes, sid, params_json in prepared:
                if not _one(con, "SELECT 1 FROM snapshots WHERE id = ?", [sid]):
                    self._insert_snapshot(con, k, item, table, hashes, sid, params_json)
                out.append(self._get(con, sid))
            return out

    def _insert_snapshot(self, con, k: Kind, item: "Registration", table: pa.Table, hashes: list[bytes],
                         sid: str, params_json: str) -> None:
        for p in item.parents:
            if not _one(con, "SELECT 1 FROM snapshots WHERE id = ?", [p]):
                raise NotFound(f"parent snapshot {p} is not in catalog {self.path}")
        self._insert_rows(con, k, table, hashes)
        con.register("_members", pa.table({"row_hash": pa.array(hashes, pa.binary())}))
        _run(con, "INSERT INTO snapshot_rows SELECT ?, row_hash FROM _members", [sid])
        con.unregister("_members")
        _run(con, 
            "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?)",
            [sid, k.name, item.iteration, item.split, table.num_rows, params_json, _now()],
        )
        for i, p in enumerate(item.parents):
            _run(con, "INSERT INTO snapshot_parents VALUES (?, ?, ?)", [sid, p, i])

    def _hash_chunks(self, table: pa.Table) -> list[bytes]:
        hashes: list[bytes] = []
        step = self.config.chunk_rows
        for start in range(0, table.num_rows, step):
            hashes.extend(row_hashes(table.slice(start, step)))
        return hashes

    def _insert_rows(self, con: duckdb.DuckDBPyConnection, k: Kind, table: pa.Table, hashes: list[bytes]) -> None:
        """Insert rows not yet stored (content addressing: a row is stored once however many snapshots hold it)."""
        rt = _rows_table(k.name)
        step = self.config.chunk_rows
        for start in range(0, table.num_rows, step):
            chunk = _with_hash(table.slice(start, step), hashes[start : start + step])
            con.register("_chunk", chunk)
            _run(con, f"INSERT INTO {rt} SELECT c.* FROM _chunk c ANTI JOIN {rt} r ON c.row_hash = r.row_hash")
            con.unregister("_chunk")

    # ------------------------------------------------------------------------------------------------------ reads
    def _get(self, con: duckdb.DuckDBPyConnection, sid: str) -> Snapshot:
        row = _one(con, 
            "SELECT id, kind, iteration, split, n_rows, params, created_at FROM snapshots WHERE id = ?", [sid]
        )
        if row is None:
            raise NotFound(f"no snapshot {sid} in catalog {self.path}")
        parents = [r[0] for r in _all(con, 
            "SELECT parent_id FROM snapshot_parents WHERE snapshot_id = ? ORDER BY position", [sid])]
        tags = [r[0] for r in _all(con, "SELECT name FROM tags WHERE snapshot_id = ? ORDER BY name", [sid])]
        return Snapshot(row[0], row[1], row[2], row[3], row[4], parents, json.loads(row[5]), row[6], tags)

    def _resolve(self, con: duckdb.DuckDBPyConnection, ref: str) -> str:
        ref = ref.strip()
        tagged = _one(con, "SELECT snapshot_id FROM tags WHERE name = ?", [ref])
        if tagged:
            return tagged[0]
        selector = _SELECTOR.fullmatch(ref)
        if selector and selector["kind"] in KINDS:
            iteration = int(selector["iteration"]) if selector["iteration"] else None
            newest = _one(
                con,
                "SELECT id FROM snapshots WHERE kind = ? AND iteration IS NOT DISTINCT FROM ? "
                "AND (split IS NOT DISTINCT FROM ? OR (? IS NULL AND iteration IS NOT NULL)) "
                "ORDER BY created_at DESC, id DESC LIMIT 1",
                [selector["kind"], iteration, selector["split"], selector["split"]],
            )
            if newest:
                return newest[0]
            raise NotFound(f"no {ref} snapshot in catalog {self.path} (see `iterdpo versions list`)")
        if len(ref) >= _MIN_PREFIX and all(c in "0123456789abcdef" for c in ref.lower()):
            ids = [r[0] for r in _all(con, 
                "SELECT id FROM snapshots WHERE starts_with(id, ?) ORDER BY id LIMIT 3", [ref.lower()])]
            if len(ids) == 1:
                return ids[0]
            if len(ids) > 1:
                raise NotFound(f"snapshot id prefix {ref!r} is ambiguous ({', '.join(i[:12] for i in ids)}, ...); give more characters")
        raise NotFound(f"no snapshot or tag {ref!r} in catalog {self.path} (see `iterdpo versions list`)")

    def get(self, ref: str) -> Snapshot:
        """A snapshot by tag name, selector (KIND, KIND:N, KIND:N:SPLIT: the newest such), full id or unique id
        prefix (4+ hex characters)."""
        if not self.exists():
            raise NotFound(f"no snapshot or tag {ref!r}: catalog {self.path} does not exist yet")
        with self.connect() as con:
            return self._get(con, self._resolve(con, ref))

    def list(
        self, kind: str | None = None, iteration: int | None = None, split: str | None = None
    ) -> list[Snapshot]:
        """Snapshots, oldest first, optionally filtered. A catalog that does not exist yet is empty."""
        if kind is not None:
            get_kind(kind)
        if not self.exists():
            return []
        where, args = ["TRUE"], []
        for col, val in (("kind", kind), ("iteration", iteration), ("split", split)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        with self.connect() as con:
            ids = [r[0] for r in _all(con, 
                f"SELECT id FROM snapshots WHERE {' AND '.join(where)} ORDER BY created_at, id", args)]
            return [self._get(con, i) for i in ids]

    def newest(self, kind: str, iteration: int | None = None, split: str | None = None) -> Snapshot | None:
        """The newest snapshot of a kind for an iteration and split (None matches the pool: no iteration/split)."""
        if not self.exists():
            return None
        with self.connect() as con:
            row = _one(con, 
                "SELECT id FROM snapshots WHERE kind = ? AND iteration IS NOT DISTINCT FROM ? "
                "AND split IS NOT DISTINCT FROM ? ORDER BY created_at DESC, id DESC LIMIT 1",
                [kind, iteration, split],
            )
            return self._get(con, row[0]) if row else None

    def _select_rows(self, k: Kind, with_hash: bool = False) -> str:
        cols = ("r.row_hash, " if with_hash else "") + ", ".join(f"r.{c}" for c in k.columns)
        order = ", ".join(f"r.{c}" for c in k.key)
        return (f"SELECT {cols} FROM snapshot_rows s JOIN {_rows_table(k.name)} r ON s.row_hash = r.row_hash "
                f"WHERE s.snapshot_id = ? ORDER BY {order}")

    def read(self, ref: str) -> pa.Table:
        """The rows of a snapshot, in canonical order, with the kind's declared schema."""
        snap = self.get(ref)
        k = get_kind(snap.kind)
        with self.connect() as con:
            return conform(_arrow(con, self._select_rows(k), [snap.id]), k)

    def iter_batches(self, ref: str, batch_rows: int | None = None, with_hash: bool = False) -> Iterator[pa.RecordBatch]:
        """Stream a snapshot's rows in canonical order (bounded memory for large snapshots)."""
        snap = self.get(ref)
        k = get_kind(snap.kind)
        schema = k.schema.insert(0, pa.field("row_hash", pa.binary())) if with_hash else k.schema
        with self.connect() as con:
            reader = con.sql(self._select_rows(k, with_hash), params=[snap.id]).to_arrow_reader(
                batch_rows or self.config.chunk_rows)
            for batch in reader:
                yield batch.cast(schema)

    # ------------------------------------------------------------------------------------------------------- tags
    def tag(self, ref: str, name: str, force: bool = False) -> Snapshot:
        name = name.strip()
        if not name or any(c.isspace() for c in name):
            raise InputError(f"tag name {name!r} must be non-empty and without spaces")
        with self.transaction() as con:
            sid = self._resolve(con, ref)
            old = _one(con, "SELECT snapshot_id FROM tags WHERE name = ?", [name])
            if old and old[0] != sid:
                if not force:
                    raise InputError(f"tag {name!r} already names snapshot {old[0][:12]}; use --force to move it")
                _run(con, "DELETE FROM tags WHERE name = ?", [name])
            if not old or old[0] != sid:
                _run(con, "INSERT INTO tags VALUES (?, ?, ?)", [name, sid, _now()])
            return self._get(con, sid)

    # ------------------------------------------------------------------------------------------------------- diff
    def diff(self, a: str, b: str) -> dict[str, Any]:
        """Rows added, removed and changed (same key, other content) from snapshot `a` to snapshot `b`."""
        import polars as pl

        sa, sb = self.get(a), self.get(b)
        if sa.kind != sb.kind:
            raise InputError(f"cannot diff a {sa.kind} snapshot with a {sb.kind} snapshot")
        k = get_kind(sa.kind)
        keys = list(k.key)
        q = (f"SELECT {', '.join('r.' + c for c in keys)}, r.row_hash FROM snapshot_rows s "
             f"JOIN {_rows_table(k.name)} r ON s.row_hash = r.row_hash WHERE s.snapshot_id = ?")
        with self.connect() as con:
            ta = pl.from_arrow(_arrow(con, q, [sa.id]))
            tb = pl.from_arrow(_arrow(con, q, [sb.id]))
        joined = ta.join(tb, on=keys, how="full", suffix="_b", coalesce=True)

        def keys_of(frame: pl.DataFrame) -> list[dict[str, Any]]:
            return frame.select(keys).sort(keys).to_dicts()

        return {
            "a": sa.id,
            "b": sb.id,
            "kind": k.name,
            "key": keys,
            "added": keys_of(joined.filter(pl.col("row_hash").is_null())),
            "removed": keys_of(joined.filter(pl.col("row_hash_b").is_null())),
            "changed": keys_of(joined.filter(
                pl.col("row_hash").is_not_null() & pl.col("row_hash_b").is_not_null()
                & (pl.col("row_hash") != pl.col("row_hash_b")))),
            "unchanged": int(joined.filter(pl.col("row_hash") == pl.col("row_hash_b")).height),
        }

    # ----------------------------------------------------------------------------------------------------- verify
    def verify(self) -> dict[str, Any]:
        """Recompute every row hash and snapshot id from the stored rows; report each mismatch."""
        problems: list[str] = []
        snaps = self.list()
        for snap in snaps:
            k = get_kind(snap.kind)
            stored: list[bytes] = []
            recomputed: list[bytes] = []
            for batch in self.iter_batches(snap.id, with_hash=True):
                table = pa.Table.from_batches([batch])
                stored.extend(table.column("row_hash").to_pylist())
                recomputed.extend(row_hashes(table.drop_columns(["row_hash"])))
            if len(stored) != snap.rows:
                problems.append(f"{snap.id[:12]}: {snap.rows} rows recorded, {len(stored)} stored")
            bad = sum(1 for x, y in zip(stored, recomputed) if x != y)
            if bad:
                problems.append(f"{snap.id[:12]}: {bad} rows do not match their hash")
            sid = snapshot_id(k.name, snap.iteration, snap.split, recomputed)
            if sid != snap.id:
                problems.append(f"{snap.id[:12]}: recomputed id is {sid[:12]}")
        with self.connect() as con:
            dangling = _one(con, 
                "SELECT count(*) FROM snapshot_parents p ANTI JOIN snapshots s ON p.parent_id = s.id")[0]
            if dangling:
                problems.append(f"{dangling} parent links name snapshots that are not in the catalog")
        return {"catalog": str(self.path), "snapshots": len(snaps), "ok": not problems, "problems": problems}

    # ------------------------------------------------------------------------------------------------------- work
    def work_units(self, work_key: str) -> dict[str, Any]:
        """Units (e.g. prompt ids) that a stage already finished under this work key, with their info."""
        if not self.exists():
            return {}
        with self.connect() as con:
            return {
                u: (json.loads(i) if i is not None else None)
                for u, i in _all(con, "SELECT unit, info FROM work_units WHERE work_key = ?", [work_key])
            }

    def add_work(
        self,
        work_key: str,
        kind: str,
        table: pa.Table,
        units: Mapping[str, Any],
        *,
        iteration: int | None = None,
        split: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Commit one finished batch of a stage: its rows and the units they complete, atomically."""
        k = get_kind(kind)
        table = conform(table, k)
        sort_order(table, k)  # rejects null and duplicate keys
        hashes = self._hash_chunks(table)
        with self.transaction() as con:
            known = _one(con, "SELECT kind FROM work WHERE work_key = ?", [work_key])
            if known is None:
                _run(con, 
                    "INSERT INTO work VALUES (?, ?, ?, ?, ?, ?)",
                    [work_key, k.name, iteration, split, json.dumps(dict(params or {}), sort_keys=True, default=str), _now()],
                )
            elif known[0] != k.name:
                raise CatalogError(f"work {work_key[:12]} holds {known[0]} rows, not {k.name}")
            self._insert_rows(con, k, table, hashes)
            con.register("_w", pa.table({"row_hash": pa.array(hashes, pa.binary())}))
            _run(con, 
                "INSERT INTO work_rows SELECT ?, w.row_hash FROM _w w "
                "ANTI JOIN (SELECT row_hash FROM work_rows WHERE work_key = ?) d ON w.row_hash = d.row_hash",
                [work_key, work_key],
            )
            con.unregister("_w")
            con.register("_u", pa.table({
                "unit": pa.array(list(units), pa.string()),
                "info": pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in units.values()], pa.string()),
            }))
            _run(con, 
                "INSERT INTO work_units SELECT ?, u.unit, u.info FROM _u u "
                "ANTI JOIN (SELECT unit FROM work_units WHERE work_key = ?) d ON u.unit = d.unit",
                [work_key, work_key],
            )
            con.unregister("_u")

    def work_rows(self, work_key: str, units: Iterable[str] | None = None, unit_column: str = "prompt_id") -> pa.Table:
        """The rows of a work key (optionally only those whose `unit_column` is in `units`), canonical order."""
        with self.connect() as con:
            row = _one(con, "SELECT kind FROM work WHERE work_key = ?", [work_key])
            if row is None:
                raise NotFound(f"no work {work_key[:12]} in catalog {self.path}")
            k = get_kind(row[0])
            cols = ", ".join(f"r.{c}" for c in k.columns)
            table = _arrow(
                con,
                f"SELECT {cols} FROM work_rows w JOIN {_rows_table(k.name)} r ON w.row_hash = r.row_hash "
                f"WHERE w.work_key = ? ORDER BY {', '.join('r.' + c for c in k.key)}",
                [work_key],
            )
        table = conform(table, k)
        if units is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.is_in(table.column(unit_column), pa.array(sorted(set(units)), pa.string())))
        return table

    # ------------------------------------------------------------------------------------------------------ merge
    def merge(self, others: Sequence[str | os.PathLike]) -> dict[str, Any]:
        """Copy snapshots, rows, tags and work from other catalog files into this one (idempotent)."""
        report: dict[str, Any] = {"catalog": str(self.path), "merged": []}
        for other in others:
            other_path = Path(other)
            if not other_path.exists():
                raise InputError(f"catalog to merge {other_path} does not exist")
            if other_path.resolve() == self.path.resolve():
                raise InputError(f"cannot merge catalog {other_path} into itself")
            with Catalog(other_path, self.config).connect():  # checks that it is a catalog of a known schema
                pass
            report["merged"].append(self._merge_one(other_path))
        return report

    def _merge_one(self, other: Path) -> dict[str, Any]:
        counts: dict[str, Any] = {"source": str(other)}
        with self.connect() as con:
            escaped = str(other).replace("'", "''")
            try:
                _run(con, f"ATTACH '{escaped}' AS src (READ_ONLY)")
            except duckdb.Error as e:
                raise CatalogError(f"cannot read catalog {other}: {_first_line(str(e))}") from None
            try:
                con.begin()
                try:
                    rows = 0
                    for k in KINDS.values():
                        rt = _rows_table(k.name)
                        rows += _one(con, 
                            f"INSERT INTO {rt} SELECT s.* FROM src.{rt} s ANTI JOIN {rt} r ON s.row_hash = r.row_hash"
                        )[0]
                    counts["rows"] = rows
                    new_ids = [r[0] for r in _all(con, 
                        "SELECT id FROM src.snapshots s ANTI JOIN snapshots d ON s.id = d.id")]
                    con.register("_new", pa.table({"id": pa.array(new_ids, pa.string())}))
                    _run(con, "INSERT INTO snapshots SELECT s.* FROM src.snapshots s SEMI JOIN _new n ON s.id = n.id")
                    _run(con, "INSERT INTO snapshot_rows SELECT s.* FROM src.snapshot_rows s "
                                "SEMI JOIN _new n ON s.snapshot_id = n.id")
                    _run(con, "INSERT INTO snapshot_parents SELECT s.* FROM src.snapshot_parents s "
                                "SEMI JOIN _new n ON s.snapshot_id = n.id")
                    con.unregister("_new")
                    counts["snapshots"] = len(new_ids)
                    conflicts = [r[0] for r in _all(con, 
                        "SELECT s.name FROM src.tags s JOIN tags d ON s.name = d.name WHERE s.snapshot_id <> d.snapshot_id"
                    )]
                    counts["tags"] = _one(con, 
                        "INSERT INTO tags SELECT s.* FROM src.tags s ANTI JOIN tags d ON s.name = d.name")[0]
                    counts["tag_conflicts_kept_ours"] = conflicts
                    _run(con, "INSERT INTO work SELECT s.* FROM src.work s ANTI JOIN work d ON s.work_key = d.work_key")
                    counts["work_units"] = _one(con, 
                        "INSERT INTO work_units SELECT s.* FROM src.work_units s ANTI JOIN work_units d "
                        "ON s.work_key = d.work_key AND s.unit = d.unit")[0]
                    _run(con, "INSERT INTO work_rows SELECT s.* FROM src.work_rows s ANTI JOIN work_rows d "
                                "ON s.work_key = d.work_key AND s.row_hash = d.row_hash")
                except BaseException:
                    con.rollback()
                    raise
                con.commit()
            finally:
                _run(con, "DETACH src")
        return counts


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg
