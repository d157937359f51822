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
from builders.config import CATALOG_ENV, CatalogConfig
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
    rows: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch]  # a table, or batches streamed in bounded memory
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


# Rows are numbered per kind (row_id) and snapshots per catalog (seq): membership is then two integers a row,
# which compress to a few bytes, instead of two hashes. Ids are local to a file; `merge` renumbers by hash.
_DDL = [
    "CREATE TABLE iterdpo_meta(key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
    """CREATE TABLE snapshots(id VARCHAR PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, kind VARCHAR NOT NULL,
       iteration INTEGER, split VARCHAR, n_rows BIGINT NOT NULL, params VARCHAR NOT NULL, created_at VARCHAR NOT NULL)""",
    "CREATE TABLE snapshot_parents(snapshot_id VARCHAR NOT NULL, parent_id VARCHAR NOT NULL, position INTEGER NOT NULL)",
    "CREATE TABLE snapshot_rows(seq INTEGER NOT NULL, row_id BIGINT NOT NULL)",
    "CREATE TABLE tags(name VARCHAR PRIMARY KEY, snapshot_id VARCHAR NOT NULL, created_at VARCHAR NOT NULL)",
    """CREATE TABLE work(work_key VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, iteration INTEGER, split VARCHAR,
       params VARCHAR NOT NULL, created_at VARCHAR NOT NULL)""",
    "CREATE TABLE work_units(work_key VARCHAR NOT NULL, unit VARCHAR NOT NULL, info VARCHAR)",
    "CREATE TABLE work_rows(work_key VARCHAR NOT NULL, row_id BIGINT NOT NULL)",
    """CREATE TABLE publications(set_id VARCHAR NOT NULL, repo_id VARCHAR NOT NULL, revision VARCHAR NOT NULL,
       commit_id VARCHAR NOT NULL, tag VARCHAR, snapshot_ids VARCHAR NOT NULL, endpoint VARCHAR NOT NULL,
       created_at VARCHAR NOT NULL)""",
]


def _with_hash(table: pa.Table, hashes: list[bytes]) -> pa.Table:
    return table.add_column(0, "row_hash", pa.array(hashes, pa.binary()))


def _batches(rows: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    if isinstance(rows, pa.Table):
        for start in range(0, rows.num_rows, size):
            yield rows.slice(start, size)
        return
    for batch in rows:
        yield pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch


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

    def require(self) -> "Catalog":
        """This catalog, if its file exists: commands that only read never create one."""
        if not self.path.exists():
            raise CatalogError(f"catalog {self.path} does not exist (set --catalog or {CATALOG_ENV})")
        return self

    def _open(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        if read_only:
            self.require()
        elif not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.config.lock_timeout
        delay = 0.02
        while True:
            try:
                # zstd for every column: long texts compress 1.5x better and checkpoint 2x faster than DuckDB's
                # default analysis (FSST/dictionary), and nested string lists get it too (measured in bench/catalog.py).
                # Reads open the file read-only: they work on a read-only file and share it with other readers.
                con = duckdb.connect(str(self.path), read_only=read_only,
                                     config={"memory_limit": self.config.memory_limit, "force_compression": "zstd"})
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
            self._check_schema(con, read_only)
        except BaseException:
            con.close()
            raise
        return con

    def _check_schema(self, con: duckdb.DuckDBPyConnection, read_only: bool = False) -> None:
        tables = {r[0] for r in _all(con, "SELECT table_name FROM information_schema.tables")}
        if "iterdpo_meta" not in tables:
            if tables:
                raise CatalogError(f"{self.path} is a DuckDB file but not an iterdpo catalog (tables: {sorted(tables)[:5]})")
            if read_only:
                raise CatalogError(f"{self.path} is an empty DuckDB file, not an iterdpo catalog")
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
            empty = _with_hash(k.schema.empty_table(), []).add_column(0, "row_id", pa.array([], pa.int64()))
            con.register("_empty", empty)
            _run(con, f"CREATE TABLE {_rows_table(k.name)} AS SELECT * FROM _empty")
            con.unregister("_empty")
        _run(con, 
            "INSERT INTO iterdpo_meta VALUES ('schema_version', ?), ('created_by', ?)",
            [str(SCHEMA_VERSION), f"iterdpo {__version__}"],
        )
        con.commit()

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the file for one short unit of work, then release it for other processes. `read_only` never
        creates the file (a missing one is a CatalogError) and works on a file the user cannot write."""
        con = self._open(read_only)
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
        rows: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch],
        *,
        iteration: int | None = None,
        split: str | None = None,
        parents: Sequence[str] = (),
        params: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Register `rows` (a table, or batches streamed in bounded memory) as a snapshot of `kind`. Identical
        content returns the existing snapshot unchanged."""
        return self.register_many([Registration(kind, rows, iteration, split, tuple(parents), dict(params or {}))])[0]

    def register_many(self, items: Sequence[Registration]) -> list[Snapshot]:
        """Register several snapshots atomically: all of them appear, or none does.

        Rows are stored first, batch by batch, each batch in its own transaction (memory stays bounded however
        large the snapshot); they are content-addressed, so rows of an interrupted registration belong to no
        snapshot, change no id, and are reused when it is retried. The snapshots themselves (records, membership,
        lineage) are then written in ONE transaction."""
        for item in items:
            get_kind(item.kind)
            if item.split is not None and item.split not in SPLITS:
                raise InputError(f"split must be one of {', '.join(SPLITS)}, not {item.split!r}")
            if isinstance(item.rows, pa.Table):  # a table is checked whole before anything is stored
                sort_order(conform(item.rows, get_kind(item.kind)), get_kind(item.kind))
        with self.connect() as con:
            for item in items:
                for p in item.parents:
                    if not _one(con, "SELECT 1 FROM snapshots WHERE id = ?", [p]):
                        raise NotFound(f"parent snapshot {p} is not in catalog {self.path}")
            staged = [self._store_rows(con, item) for item in items]
            con.begin()
            try:
                out = [self._record(con, item, sid, hashes) for item, (sid, hashes) in zip(items, staged)]
            except BaseException:
                con.rollback()
                raise
            con.commit()
            return out

    def _store_rows(self, con: duckdb.DuckDBPyConnection, item: Registration) -> tuple[str, list[bytes]]:
        """Hash and store an item's rows batch by batch; return its snapshot id and row hashes."""
        k = get_kind(item.kind)
        keys, hashes = [], []
        for batch in _batches(item.rows, self.config.chunk_rows):
            table = conform(batch, k)
            batch_hashes = row_hashes(table)
            con.begin()
            try:
                self._insert_rows(con, k, table, batch_hashes)
            except BaseException:
                con.rollback()
                raise
            con.commit()
            keys.append(table.select(list(k.key)))
            hashes.extend(batch_hashes)
        key_table = pa.concat_tables(keys) if keys else k.schema.empty_table().select(list(k.key))
        order = sort_order(key_table, k).to_pylist()
        return snapshot_id(k.name, item.iteration, item.split, (hashes[i] for i in order)), hashes

    def _record(self, con: duckdb.DuckDBPyConnection, item: Registration, sid: str, hashes: list[bytes]) -> Snapshot:
        k = get_kind(item.kind)
        if not _one(con, "SELECT 1 FROM snapshots WHERE id = ?", [sid]):
            seq = _one(con, "SELECT coalesce(max(seq), 0) + 1 FROM snapshots")[0]
            record = dict(item.params)
            record.setdefault("iterdpo_version", __version__)
            _run(con, "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 [sid, seq, k.name, item.iteration, item.split, len(hashes),
                  json.dumps(record, sort_keys=True, allow_nan=False, default=str), _now()])
            self._insert_members(con, k, "INSERT INTO snapshot_rows SELECT ?, r.row_id", [seq], hashes)
            for i, p in enumerate(item.parents):
                _run(con, "INSERT INTO snapshot_parents VALUES (?, ?, ?)", [sid, p, i])
        return self._get(con, sid)

    def _insert_members(self, con, k: Kind, insert_select: str, params: list, hashes: list[bytes],
                        where: str = "TRUE") -> None:
        """`insert_select` + the row ids of `hashes` (all already stored)."""
        con.register("_members", pa.table({"row_hash": pa.array(hashes, pa.binary())}))
        _run(con, f"{insert_select} FROM (SELECT DISTINCT row_hash FROM _members) m "
                  f"JOIN {_rows_table(k.name)} r ON m.row_hash = r.row_hash WHERE {where}", params)
        con.unregister("_members")

    def _insert_rows(self, con: duckdb.DuckDBPyConnection, k: Kind, table: pa.Table, hashes: list[bytes]) -> None:
        """Store rows not stored yet (content addressing: a row is stored once however many snapshots hold it)."""
        rt = _rows_table(k.name)
        con.register("_chunk", _with_hash(table, hashes))
        _run(con, f"INSERT INTO {rt} SELECT (SELECT coalesce(max(row_id), 0) FROM {rt}) + row_number() OVER (), n.* "
                  f"FROM (SELECT DISTINCT ON (row_hash) * FROM _chunk) n ANTI JOIN {rt} r ON n.row_hash = r.row_hash")
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
                "AND json_extract_string(params, '$.shard') IS NULL ORDER BY seq DESC LIMIT 1",
                [selector["kind"], iteration, selector["split"], selector["split"]],
            )
            if newest:
                return newest[0]
            raise NotFound(f"no {ref} snapshot in catalog {self.path} (see `iterdpo versions list`)")
        if _looks_like_prefix(ref):
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
        with self.connect(read_only=True) as con:
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
        with self.connect(read_only=True) as con:
            ids = [r[0] for r in _all(con, 
                f"SELECT id FROM snapshots WHERE {' AND '.join(where)} ORDER BY seq", args)]
            return [self._get(con, i) for i in ids]

    def newest(self, kind: str, iteration: int | None = None, split: str | None = None) -> Snapshot | None:
        """The newest complete snapshot of a kind for an iteration and split (None matches the pool: no
        iteration/split). Shard snapshots (params.shard set) are parts, never complete."""
        if not self.exists():
            return None
        with self.connect(read_only=True) as con:
            row = _one(
                con,
                "SELECT id FROM snapshots WHERE kind = ? AND iteration IS NOT DISTINCT FROM ? "
                "AND split IS NOT DISTINCT FROM ? AND json_extract_string(params, '$.shard') IS NULL "
                "ORDER BY seq DESC LIMIT 1",
                [kind, iteration, split],
            )
            return self._get(con, row[0]) if row else None

    def inputs(self, kind: str, iteration: int, splits: Sequence[str], from_refs: Sequence[str], label: str,
               how: str, require_train: bool = False) -> dict[str, Snapshot]:
        """A stage's input snapshots per split: those named by --from (checked), else the newest complete ones."""
        if from_refs:
            chosen = {}
            for ref in from_refs:
                snap = self.get(ref)
                if snap.kind != kind or snap.iteration != iteration or snap.split is None:
                    raise InputError(f"--from {ref}: a {kind} snapshot of iteration {iteration} is needed, not "
                                     f"{snap.kind} (iteration {snap.iteration}, split {snap.split})")
                chosen[snap.split] = snap
            return chosen
        found = {s: snap for s in splits if (snap := self.newest(kind, iteration, s)) is not None}
        if not found:
            raise InputError(f"iteration {iteration} has no {label} in catalog {self.path}; run `{how}` first")
        if require_train and "train" in splits and "train" not in found:
            raise InputError(f"iteration {iteration} has no train {label}; run `{how}` first")
        return found

    def _select_rows(self, k: Kind, with_hash: bool = False) -> str:
        cols = ("r.row_hash, " if with_hash else "") + ", ".join(f"r.{c}" for c in k.columns)
        order = ", ".join(f"r.{c}" for c in k.key)
        return (f"SELECT {cols} FROM snapshot_rows s JOIN {_rows_table(k.name)} r ON s.row_id = r.row_id "
                f"WHERE s.seq = (SELECT seq FROM snapshots WHERE id = ?) ORDER BY {order}")

    def read(self, ref: str) -> pa.Table:
        """The rows of a snapshot, in canonical order, with the kind's declared schema."""
        snap = self.get(ref)
        k = get_kind(snap.kind)
        with self.connect(read_only=True) as con:
            return conform(_arrow(con, self._select_rows(k), [snap.id]), k)

    def iter_batches(self, ref: str, batch_rows: int | None = None, with_hash: bool = False) -> Iterator[pa.RecordBatch]:
        """Stream a snapshot's rows in canonical order (bounded memory for large snapshots)."""
        snap = self.get(ref)
        k = get_kind(snap.kind)
        schema = k.schema.insert(0, pa.field("row_hash", pa.binary())) if with_hash else k.schema
        with self.connect(read_only=True) as con:
            reader = con.sql(self._select_rows(k, with_hash), params=[snap.id]).to_arrow_reader(
                batch_rows or self.config.chunk_rows)
            for batch in reader:
                yield batch.cast(schema)

    # ------------------------------------------------------------------------------------------------------- tags
    def tag(self, ref: str, name: str, force: bool = False) -> Snapshot:
        name = name.strip()
        if not name or any(c.isspace() for c in name):
            raise InputError(f"tag name {name!r} must be non-empty and without spaces")
        # a tag wins over selectors and id prefixes when a name is resolved, so one that looks like either would
        # silently change what `prompts` or `3f2a` means
        selector = _SELECTOR.fullmatch(name)
        if selector and selector["kind"] in KINDS:
            raise InputError(f"tag name {name!r} reads as a selector (KIND, KIND:N, KIND:N:SPLIT); choose another")
        if _looks_like_prefix(name):
            raise InputError(f"tag name {name!r} reads as a snapshot id prefix ({_MIN_PREFIX}+ hex characters); "
                             f"choose another, e.g. with a letter beyond f")
        self.require()
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
             f"JOIN {_rows_table(k.name)} r ON s.row_id = r.row_id WHERE s.seq = (SELECT seq FROM snapshots WHERE id = ?)")
        with self.connect(read_only=True) as con:
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
        self.require()
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
        with self.connect(read_only=True) as con:
            dangling = _one(con, 
                "SELECT count(*) FROM snapshot_parents p ANTI JOIN snapshots s ON p.parent_id = s.id")[0]
            if dangling:
                problems.append(f"{dangling} parent links name snapshots that are not in the catalog")
            # rows of interrupted registrations: in no snapshot and no work; harmless, reused by a retry,
            # removed by `versions gc`
            unreferenced = sum(_one(con, f"SELECT count(*) {_unreferenced(k)}", [k.name, k.name])[0]
                               for k in KINDS.values())
        return {"catalog": str(self.path), "snapshots": len(snaps), "ok": not problems, "problems": problems,
                "unreferenced_rows": unreferenced}

    # --------------------------------------------------------------------------------------------------------- gc
    def gc(self, dry_run: bool = False) -> dict[str, Any]:
        """Remove stored rows that belong to no snapshot and to no work in progress (left by interrupted
        registrations), in one transaction. Work is kept: it is what a rerun resumes from. Safe beside other
        processes: a registration holds the file from its first stored row to its snapshot record."""
        self.require()
        removed: dict[str, int] = {}
        with self.transaction() as con:
            before = _free_bytes(con)
            for k in KINDS.values():
                n = _one(con, f"SELECT count(*) {_unreferenced(k)}", [k.name, k.name])[0]
                if n and not dry_run:
                    _run(con, f"DELETE FROM {_rows_table(k.name)} WHERE row_id IN (SELECT r.row_id "
                              f"{_unreferenced(k)})", [k.name, k.name])
                removed[k.name] = n
        freed = 0
        if not dry_run and any(removed.values()):
            with self.connect() as con:  # a checkpoint returns the deleted rows' blocks to the file's free list
                _run(con, "CHECKPOINT")
                freed = max(_free_bytes(con) - before, 0)
        return {"catalog": str(self.path), "dry_run": dry_run, "rows_removed": sum(removed.values()),
                "rows_removed_by_kind": removed, "bytes_freed": freed, "file_bytes": self.path.stat().st_size}

    # ------------------------------------------------------------------------------------------------------- work
    def work_units(self, work_key: str) -> dict[str, Any]:
        """Units (e.g. prompt ids) that a stage already finished under this work key, with their info."""
        if not self.exists():
            return {}
        with self.connect(read_only=True) as con:
            return {
                u: (json.loads(i) if i is not None else None)
                for u, i in _all(con, "SELECT unit, info FROM work_units WHERE work_key = ?", [work_key])
            }

    def work_params(self, work_key: str) -> dict[str, Any]:
        """The params a stage recorded when it began this work (empty if there is no such work)."""
        if not self.exists():
            return {}
        with self.connect(read_only=True) as con:
            row = _one(con, "SELECT params FROM work WHERE work_key = ?", [work_key])
        return json.loads(row[0]) if row else {}

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
        """Commit one finished batch of a stage: its rows and the units they complete, atomically. Replaying a
        batch that is already there changes nothing."""
        k = get_kind(kind)
        table = conform(table, k)
        sort_order(table, k)  # rejects null and duplicate keys
        hashes = row_hashes(table)
        with self.transaction() as con:
            known = _one(con, "SELECT kind FROM work WHERE work_key = ?", [work_key])
            if known is None:
                _run(con, "INSERT INTO work VALUES (?, ?, ?, ?, ?, ?)",
                     [work_key, k.name, iteration, split, json.dumps(dict(params or {}), sort_keys=True, default=str),
                      _now()])
            elif known[0] != k.name:
                raise CatalogError(f"work {work_key[:12]} holds {known[0]} rows, not {k.name}")
            self._insert_rows(con, k, table, hashes)
            self._insert_members(
                con, k, "INSERT INTO work_rows SELECT ?, r.row_id", [work_key], hashes,
                where=f"r.row_id NOT IN (SELECT row_id FROM work_rows WHERE work_key = '{_sql_str(work_key)}')")
            con.register("_u", pa.table({
                "unit": pa.array(list(units), pa.string()),
                "info": pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in units.values()],
                                 pa.string()),
            }))
            _run(con, "INSERT INTO work_units SELECT ?, u.unit, u.info FROM _u u "
                      "ANTI JOIN (SELECT unit FROM work_units WHERE work_key = ?) d ON u.unit = d.unit",
                 [work_key, work_key])
            con.unregister("_u")

    def work_rows(self, work_key: str, units: Iterable[str] | None = None, unit_column: str = "prompt_id") -> pa.Table:
        """The rows of a work key (optionally only those whose `unit_column` is in `units`), canonical order."""
        with self.connect(read_only=True) as con:
            row = _one(con, "SELECT kind FROM work WHERE work_key = ?", [work_key])
            if row is None:
                raise NotFound(f"no work {work_key[:12]} in catalog {self.path}")
            k = get_kind(row[0])
            cols = ", ".join(f"r.{c}" for c in k.columns)
            table = _arrow(
                con,
                f"SELECT {cols} FROM work_rows w JOIN {_rows_table(k.name)} r ON w.row_id = r.row_id "
                f"WHERE w.work_key = ? ORDER BY {', '.join('r.' + c for c in k.key)}",
                [work_key],
            )
        table = conform(table, k)
        if units is not None:
            table = table.filter(pc.is_in(table.column(unit_column), pa.array(sorted(set(units)), pa.string())))
        return table

    # ------------------------------------------------------------------------------------------------ publications
    def publication(self, set_id: str, repo_id: str, revision: str, endpoint: str) -> dict[str, Any] | None:
        """The recorded publication of a snapshot set to a repo revision, if any."""
        if not self.exists():
            return None
        with self.connect(read_only=True) as con:
            row = _one(con, "SELECT commit_id, tag, created_at FROM publications WHERE set_id = ? AND repo_id = ? "
                            "AND revision = ? AND endpoint = ?", [set_id, repo_id, revision, endpoint])
        return {"commit": row[0], "tag": row[1], "created_at": row[2]} if row else None

    def publications(self) -> list[dict[str, Any]]:
        """Every recorded publication, oldest first."""
        if not self.exists():
            return []
        with self.connect(read_only=True) as con:
            rows = _all(con, "SELECT set_id, repo_id, revision, commit_id, tag, snapshot_ids, endpoint, created_at "
                             "FROM publications ORDER BY created_at")
        return [{"set_id": r[0], "repo_id": r[1], "revision": r[2], "commit": r[3], "tag": r[4],
                 "snapshot_ids": json.loads(r[5]), "endpoint": r[6], "created_at": r[7]} for r in rows]

    def record_publication(self, set_id: str, repo_id: str, revision: str, commit: str, tag: str | None,
                           snapshot_ids: Sequence[str], endpoint: str) -> None:
        with self.transaction() as con:
            _run(con, "INSERT INTO publications VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 [set_id, repo_id, revision, commit, tag, json.dumps(sorted(snapshot_ids)), endpoint, _now()])

    def set_publication_tag(self, set_id: str, repo_id: str, revision: str, endpoint: str, tag: str) -> None:
        with self.transaction() as con:
            _run(con, "UPDATE publications SET tag = ? WHERE set_id = ? AND repo_id = ? AND revision = ? "
                      "AND endpoint = ?", [tag, set_id, repo_id, revision, endpoint])

    # ------------------------------------------------------------------------------------------------------ merge
    def merge(self, others: Sequence[str | os.PathLike]) -> dict[str, Any]:
        """Copy snapshots, rows, tags and work from other catalog files into this one (idempotent)."""
        report: dict[str, Any] = {"catalog": str(self.path), "merged": []}
        paths = [Path(other) for other in others]
        for other_path in paths:  # every source is checked before anything is merged
            if not other_path.exists():
                raise InputError(f"catalog to merge {other_path} does not exist")
            if other_path.resolve() == self.path.resolve():
                raise InputError(f"cannot merge catalog {other_path} into itself")
            # read-only: checks that it is a catalog of a known schema, and never writes to a source
            with Catalog(other_path, self.config).connect(read_only=True):
                pass
        for other_path in paths:
            report["merged"].append(self._merge_one(other_path))
        return report

    def _merge_one(self, other: Path) -> dict[str, Any]:
        """One transaction. Rows are matched by hash and renumbered; snapshots get new local seq numbers."""
        counts: dict[str, Any] = {"source": str(other)}
        with self.connect() as con:
            try:
                _run(con, f"ATTACH '{_sql_str(str(other))}' AS src (READ_ONLY)")
            except duckdb.Error as e:
                raise CatalogError(f"cannot read catalog {other}: {_first_line(str(e))}") from None
            try:
                con.begin()
                try:
                    counts.update(self._merge_from_src(con))
                except BaseException:
                    con.rollback()
                    raise
                con.commit()
            finally:
                _run(con, "DETACH src")
        return counts

    def _merge_from_src(self, con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
        counts: dict[str, Any] = {"rows": 0}
        for k in KINDS.values():
            rt = _rows_table(k.name)
            cols = ", ".join(["row_hash", *k.columns])
            counts["rows"] += _one(con, f"""
                INSERT INTO {rt} SELECT (SELECT coalesce(max(row_id), 0) FROM {rt}) + row_number() OVER (ORDER BY s.row_id),
                       {', '.join('s.' + c for c in cols.split(', '))}
                FROM src.{rt} s ANTI JOIN {rt} r ON s.row_hash = r.row_hash""")[0]
        # new snapshots, numbered after ours in their source order
        counts["snapshots"] = _one(con, """
            INSERT INTO snapshots SELECT s.id, (SELECT coalesce(max(seq), 0) FROM snapshots) + row_number() OVER (ORDER BY s.seq),
                   s.kind, s.iteration, s.split, s.n_rows, s.params, s.created_at
            FROM src.snapshots s ANTI JOIN snapshots d ON s.id = d.id""")[0]
        for k in KINDS.values():
            rt = _rows_table(k.name)
            # membership of snapshots that have none here yet (the ones just added), mapped through the row hash
            _run(con, f"""
                INSERT INTO snapshot_rows SELECT d.seq, r.row_id
                FROM src.snapshot_rows m JOIN src.snapshots s ON m.seq = s.seq AND s.kind = ?
                JOIN snapshots d ON d.id = s.id
                JOIN src.{rt} sr ON sr.row_id = m.row_id JOIN {rt} r ON r.row_hash = sr.row_hash
                WHERE d.seq NOT IN (SELECT DISTINCT seq FROM snapshot_rows)""", [k.name])
        _run(con, """INSERT INTO snapshot_parents SELECT s.* FROM src.snapshot_parents s
                     ANTI JOIN snapshot_parents d ON s.snapshot_id = d.snapshot_id AND s.parent_id = d.parent_id""")
        counts["tag_conflicts_kept_ours"] = [r[0] for r in _all(
            con, "SELECT s.name FROM src.tags s JOIN tags d ON s.name = d.name WHERE s.snapshot_id <> d.snapshot_id")]
        counts["tags"] = _one(con, "INSERT INTO tags SELECT s.* FROM src.tags s ANTI JOIN tags d ON s.name = d.name")[0]
        _run(con, "INSERT INTO work SELECT s.* FROM src.work s ANTI JOIN work d ON s.work_key = d.work_key")
        _run(con, """INSERT INTO publications SELECT s.* FROM src.publications s ANTI JOIN publications d
                     ON s.set_id = d.set_id AND s.repo_id = d.repo_id AND s.revision = d.revision
                     AND s.endpoint = d.endpoint""")
        counts["work_units"] = _one(con, """INSERT INTO work_units SELECT s.* FROM src.work_units s
                                            ANTI JOIN work_units d ON s.work_key = d.work_key AND s.unit = d.unit""")[0]
        for k in KINDS.values():
            rt = _rows_table(k.name)
            _run(con, f"""
                INSERT INTO work_rows SELECT w.work_key, r.row_id
                FROM src.work_rows w JOIN src.work sw ON sw.work_key = w.work_key AND sw.kind = ?
                JOIN src.{rt} sr ON sr.row_id = w.row_id JOIN {rt} r ON r.row_hash = sr.row_hash
                ANTI JOIN work_rows d ON d.work_key = w.work_key AND d.row_id = r.row_id""", [k.name])
        return counts


def _looks_like_prefix(ref: str) -> bool:
    return len(ref) >= _MIN_PREFIX and all(c in "0123456789abcdef" for c in ref.lower())


def _unreferenced(k: Kind) -> str:
    """FROM clause of a kind's rows in no snapshot and no work (parameters: the kind name, twice)."""
    return f"""FROM {_rows_table(k.name)} r
        ANTI JOIN (SELECT row_id FROM snapshot_rows s JOIN snapshots n ON s.seq = n.seq WHERE n.kind = ?
                   UNION ALL SELECT row_id FROM work_rows w JOIN work k ON w.work_key = k.work_key
                   WHERE k.kind = ?) used ON r.row_id = used.row_id"""


def _free_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """Bytes of the file's free blocks (DuckDB reuses them; the file itself does not shrink)."""
    block_size, free_blocks = _one(con, "SELECT block_size, free_blocks FROM pragma_database_size() "
                                        "WHERE database_name = current_database()")
    return int(block_size) * int(free_blocks)


def _sql_str(text: str) -> str:
    """Escape a string literal for the few statements that take no parameters (ATTACH) or need one inline."""
    return text.replace("'", "''")


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg
