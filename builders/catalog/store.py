"""The catalog file: opening and locking, the schema and its version, transactions, and row storage.

Every registration is one transaction, and the file is opened only for that transaction (DuckDB allows one writing
process per file), so other processes can work between a long stage's batches. Rows are stored once per kind, keyed
by their own hash, and shared by every snapshot (and work in progress) that contains them.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builders import __version__
from builders.config import CATALOG_ENV, CatalogConfig
from builders.errors import CatalogBusy, CatalogError
from builders.catalog.hashing import row_hashes
from builders.schemas import KINDS, Kind

# 2: pairs rows may refer to the prompts and generations rows that hold their texts (REFS) instead of repeating them
SCHEMA_VERSION = 2

# A pairs row built from catalog rows stores, instead of its prompt, chosen, rejected and all_generated_responses
# (NULL), the row_hash of the prompts row holding its prompt, the row_hash of each generations row holding its
# responses (in response order), and the positions of chosen and rejected among them; reads rebuild the full row
# (expand_pairs), and its stored row_hash is still the full row's. Hashes, not row ids: they stay valid across
# `merge`, which copies every row of a source, so the referenced rows always come along.
REFS = {"prompt_ref": "BLOB", "response_refs": "BLOB[]", "chosen_ref": "INTEGER", "rejected_ref": "INTEGER"}
REF_SCHEMA = pa.schema([("prompt_ref", pa.binary()), ("response_refs", pa.list_(pa.binary())),
                        ("chosen_ref", pa.int32()), ("rejected_ref", pa.int32())])
# the columns a referencing row leaves NULL
REFERENCED = ("prompt", "chosen", "rejected", "all_generated_responses")
# pairs rows rebuilt at a time to check their references (~10 kB each)
_CHECK_ROWS = 1_000


# One in-memory DuckDB instance per process (and memory limit), to which the catalog file is attached for each
# unit of work and detached after it: the file and its lock are held exactly as long as with a connection per unit,
# without creating a DuckDB instance (~15 ms) each time. A forked child makes its own (DuckDB's threads do not
# survive a fork).
@dataclass
class _Attached:
    instance: duckdb.DuckDBPyConnection
    alias: str
    read_only: bool
    users: list[int]  # the thread of each unit of work using it


_LOCK = threading.RLock()
_RELEASED = threading.Condition(_LOCK)
_INSTANCES: dict[str, duckdb.DuckDBPyConnection] = {}
_ATTACHED: dict[str, _Attached] = {}
_ALIASES = itertools.count(1)


def _instance(memory_limit: str) -> duckdb.DuckDBPyConnection:
    instance = _INSTANCES.get(memory_limit)
    if instance is None:
        # zstd for every column: long texts compress 1.5x better and checkpoint 2x faster than DuckDB's
        # default analysis (FSST/dictionary), and nested string lists get it too (measured in bench/catalog.py).
        instance = _INSTANCES[memory_limit] = duckdb.connect(
            ":memory:", config={"memory_limit": memory_limit, "force_compression": "zstd"})
    return instance


def _cursor(instance: duckdb.DuckDBPyConnection, alias: str) -> duckdb.DuckDBPyConnection:
    con = instance.cursor()
    _run(con, f"USE {alias}")
    return con


_INHERITED: list[duckdb.DuckDBPyConnection] = []


def _forget_after_fork() -> None:
    global _LOCK, _RELEASED
    _LOCK = threading.RLock()
    _RELEASED = threading.Condition(_LOCK)
    _INHERITED.extend(_INSTANCES.values())  # kept, never closed: closing would wait for threads the child lacks
    _INSTANCES.clear()
    _ATTACHED.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


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


class Store:
    """A catalog file and its storage; every other concern of `Catalog` builds on it. Cheap to create: the file is
    opened only inside each short transaction."""

    def __init__(self, path: str | os.PathLike | None = None, config: CatalogConfig | None = None):
        base = config or CatalogConfig.from_env(path)
        self.config = CatalogConfig(Path(path), base.lock_timeout, base.chunk_rows, base.memory_limit) if path else base
        self.path = Path(self.config.path)
        self._key = str(self.path.resolve())  # this file in this process's registry of attached catalogs

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------------- connection
    def exists(self) -> bool:
        return self.path.exists()

    def require(self) -> Self:
        """This catalog, if its file exists: commands that only read never create one."""
        if not self.path.exists():
            raise CatalogError(f"catalog {self.path} does not exist (set --catalog or {CATALOG_ENV})")
        return self

    def _open(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        if read_only:
            self.require()
        elif not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        key, me = self._key, threading.get_ident()
        deadline = time.monotonic() + self.config.lock_timeout
        with _LOCK:
            instance = _instance(self.config.memory_limit)
            # a write waits for this process's other threads to finish reading (the file is attached read-only)
            while (attached := _ATTACHED.get(key)) is not None and attached.read_only and not read_only:
                if me in attached.users or time.monotonic() >= deadline:
                    raise CatalogError(f"catalog {self.path} is being read in this process; it cannot be written "
                                       f"before that read ends")
                _RELEASED.wait(deadline - time.monotonic())
            if attached is not None:  # already open in this process (a nested or concurrent unit of work)
                attached.users.append(me)
                return _cursor(attached.instance, attached.alias)
            alias = f"iterdpo_{next(_ALIASES)}"
            self._attach(instance, alias, read_only)
            attached = _ATTACHED[key] = _Attached(instance, alias, read_only, [me])
            con = _cursor(instance, alias)
            try:
                self._check_schema(con, read_only)
            except BaseException:
                self._release(con)
                raise
            return con

    def _attach(self, instance: duckdb.DuckDBPyConnection, alias: str, read_only: bool) -> None:
        """Attach the file to this process's DuckDB instance (taking its lock), waiting while another process
        holds it. Attaching costs ~2 ms where creating a DuckDB instance (duckdb.connect) costs ~15 ms."""
        deadline = time.monotonic() + self.config.lock_timeout
        delay = 0.02
        while True:
            try:
                # Reads attach the file read-only: they work on a read-only file and share it with other readers.
                _run(instance, f"ATTACH '{_sql_str(self._key)}' AS {alias}" + (" (READ_ONLY)" if read_only else ""))
                return
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

    def _release(self, con: duckdb.DuckDBPyConnection) -> None:
        """End a unit of work; the last one detaches the file, which checkpoints it and releases its lock for
        other processes."""
        con.close()
        key = self._key
        with _LOCK:
            attached = _ATTACHED.get(key)
            if attached is None:
                return
            me = threading.get_ident()
            attached.users.remove(me if me in attached.users else attached.users[-1])
            if not attached.users:
                del _ATTACHED[key]
                try:
                    _run(attached.instance, f"DETACH {attached.alias}")
                finally:
                    _RELEASED.notify_all()

    def _check_schema(self, con: duckdb.DuckDBPyConnection, read_only: bool = False) -> None:
        try:  # the common case in one cheap query
            row = _one(con, "SELECT value FROM iterdpo_meta WHERE key = 'schema_version'")
        except duckdb.CatalogException:
            tables = {r[0] for r in _all(con, "SELECT table_name FROM duckdb_tables() "
                                              "WHERE database_name = current_database()")}
            if tables:
                raise CatalogError(f"{self.path} is a DuckDB file but not an iterdpo catalog (tables: {sorted(tables)[:5]})")
            if read_only:
                raise CatalogError(f"{self.path} is an empty DuckDB file, not an iterdpo catalog")
            self._create(con)
            return
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"catalog {self.path} has schema version {version}, newer than this iterdpo {__version__} "
                f"understands ({SCHEMA_VERSION}); upgrade iterdpo"
            )
        if version == 1:
            # in place, once, at the first write: version 1 has only full rows, which stay valid as they are.
            # A read-only open reads it as it is (has_refs is False), so a source of `merge` is never written.
            if not read_only:
                con.begin()
                _add_ref_columns(con)
                _run(con, "UPDATE iterdpo_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
                con.commit()
            return
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
        _add_ref_columns(con)
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
            self._release(con)

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

    # ---------------------------------------------------------------------------------------------- row storage
    def _insert_members(self, con, k: Kind, insert_select: str, params: list, hashes: list[bytes],
                        where: str = "TRUE") -> None:
        """`insert_select` + the row ids of `hashes` (all already stored)."""
        con.register("_members", pa.table({"row_hash": pa.array(hashes, pa.binary())}))
        _run(con, f"{insert_select} FROM (SELECT DISTINCT row_hash FROM _members) m "
                  f"JOIN {_rows_table(k.name)} r ON m.row_hash = r.row_hash WHERE {where}", params)
        con.unregister("_members")

    def _insert_rows(self, con: duckdb.DuckDBPyConnection, k: Kind, table: pa.Table,
                     hashes: list[bytes], refs: pa.Table | None = None) -> tuple[dict[bytes, int], set[bytes]]:
        """Store rows not stored yet (content addressing: a row is stored once however many snapshots hold it).
        Returns the row id of every hash, and the hashes that were stored before. `refs` (pairs only: REFS columns
        beside `table`'s rows) lets rows be stored by reference (see _by_reference).

        One scan of the stored hashes (a semi join, built on the batch) finds the rows already stored; new rows are
        appended with ids numbered here, so that nothing else in the transaction has to look rows up again."""
        rt = _rows_table(k.name)
        con.register("_hashes", pa.table({"row_hash": pa.array(hashes, pa.binary())}))
        ids = dict(_all(con, f"SELECT r.row_hash, r.row_id FROM {rt} r SEMI JOIN _hashes h ON r.row_hash = h.row_hash"))
        con.unregister("_hashes")
        existed = set(ids)
        fresh = []
        for i, h in enumerate(hashes):
            if h not in ids:
                ids[h] = -1
                fresh.append(i)
        if fresh:
            first = _one(con, f"SELECT coalesce(max(row_id), 0) + 1 FROM {rt}")[0]
            new_ids = list(range(first, first + len(fresh)))
            for h, row_id in zip((hashes[i] for i in fresh), new_ids):
                ids[h] = row_id
            rows = table.take(pa.array(fresh, pa.int64()))
            fresh_hashes = [hashes[i] for i in fresh]
            if refs is not None:
                rows = self._by_reference(con, rows, refs.take(pa.array(fresh, pa.int64())), fresh_hashes)
            rows = _with_hash(rows, fresh_hashes).add_column(0, "row_id", pa.array(new_ids, pa.int64()))
            con.register("_new", rows)
            _run(con, f"INSERT INTO {rt} BY NAME SELECT * FROM _new")  # by name: the REFS columns are optional
            con.unregister("_new")
        return ids, existed

    def _references_match(self, con: duckdb.DuckDBPyConnection, part: pa.Table, refs: pa.Table,
                          hashes: list[bytes]) -> np.ndarray:
        """Per row: whether the row is exactly what its references rebuild. Its chosen and rejected are its prompt
        and the referenced responses (the row assembled from its own texts has its hash), and each referenced row
        holds the same text: that row's stored hash, recomputed with this row's text in place of its own, is
        unchanged (so the long texts of the referenced rows need not be read)."""
        responses = part.column("all_generated_responses").combine_chunks()
        same_count = pc.equal(pc.list_value_length(responses).fill_null(-1),
                              pc.list_value_length(refs.column("response_refs").combine_chunks()))
        ok = same_count.fill_null(False).to_numpy(zero_copy_only=False).copy()
        ok &= pc.greater(pc.list_value_length(responses).fill_null(0), 0).to_numpy(zero_copy_only=False)
        if not ok.any():
            return ok
        keep = pa.array(np.flatnonzero(ok), pa.int64())
        part, refs = part.take(keep), refs.take(keep)
        prompt = part.column("prompt").combine_chunks()
        responses = part.column("all_generated_responses").combine_chunks()
        assembled = _assemble(prompt, responses, refs.column("chosen_ref"), refs.column("rejected_ref"))
        whole = part.select([c for c in part.column_names if c not in assembled])
        for name, column in assembled.items():
            whole = whole.append_column(name, column.cast(part.schema.field(name).type))
        good = np.array([a == b for a, b in zip(row_hashes(whole.select(part.column_names)),
                                                 (hashes[i] for i in keep.to_pylist()))])
        good &= _same_texts(con, "prompts", "prompt", refs.column("prompt_ref").combine_chunks(), prompt)
        flat = _same_texts(con, "generations", "response", pc.list_flatten(refs.column("response_refs")),
                           pc.list_flatten(responses))
        lengths = pc.list_value_length(responses).to_numpy(zero_copy_only=False)
        good &= np.logical_and.reduceat(flat, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        ok[ok] = good
        return ok

    def _by_reference(self, con: duckdb.DuckDBPyConnection, rows: pa.Table, refs: pa.Table,
                      hashes: list[bytes]) -> pa.Table:
        """`rows` (pairs) with REFS beside them: a row whose references rebuild it exactly (every referenced row
        is present and holds the same text, byte for byte: _references_match) is stored by reference, any other
        row (no references, a missing or different text) in full."""
        refs = refs.cast(REF_SCHEMA)
        count = pc.list_value_length(refs.column("response_refs")).fill_null(0)
        candidate = pc.is_valid(refs.column("prompt_ref"))
        for index in ("chosen_ref", "rejected_ref"):  # positions within the references (else stored in full)
            value = refs.column(index).fill_null(-1)
            candidate = pc.and_(candidate, pc.and_(pc.greater_equal(value, 0), pc.less(value, count)))
        candidate = candidate.to_numpy(zero_copy_only=False)
        if not candidate.any():
            return rows
        exact = np.zeros(rows.num_rows, dtype=bool)
        candidates = np.flatnonzero(candidate)
        # a slice at a time: the assembled rows are held only for the check
        for lo in range(0, len(candidates), _CHECK_ROWS):
            at = pa.array(candidates[lo : lo + _CHECK_ROWS], pa.int64())
            part, ref = rows.take(at), refs.take(at)
            exact[at.to_numpy()] = self._references_match(con, part, ref, [hashes[i] for i in at.to_pylist()])
        if not exact.any():
            return rows
        keep = pa.array(exact)
        out = rows
        for name in REFERENCED:
            col = out.column(name)
            out = out.set_column(out.column_names.index(name), name,
                                 pc.if_else(keep, pa.nulls(len(col), col.type), col))
        for name in REF_SCHEMA.names:
            col = refs.column(name)
            out = out.append_column(name, pc.if_else(keep, col, pa.nulls(len(col), col.type)))
        return out


def _add_ref_columns(con: duckdb.DuckDBPyConnection) -> None:
    for name, sql_type in REFS.items():
        _run(con, f"ALTER TABLE {_rows_table('pairs')} ADD COLUMN {name} {sql_type}")


def has_refs(con: duckdb.DuckDBPyConnection, database: str | None = None) -> bool:
    """Whether this catalog's pairs rows can hold references (schema 2; a version 1 file opened read-only cannot)."""
    where = "database_name = current_database()" if database is None else f"database_name = '{_sql_str(database)}'"
    return bool(_one(con, f"SELECT count(*) FROM duckdb_columns() WHERE {where} AND table_name = ? "
                          f"AND column_name = 'prompt_ref'", [_rows_table("pairs")])[0])


def ref_columns(con: duckdb.DuckDBPyConnection, alias: str = "r") -> str:
    """The REFS columns of `alias` (a rows_pairs) for a SELECT list; NULLs where the file has none (version 1)."""
    if has_refs(con):
        return ", ".join(f"{alias}.{name}" for name in REFS)
    return ", ".join(f"NULL::{sql_type} AS {name}" for name, sql_type in REFS.items())


def expand_pairs(con: duckdb.DuckDBPyConnection, table: pa.Table) -> pa.Table:
    """`table` (pairs columns, any others such as row_hash, and the REFS columns) with every referencing row
    rebuilt in full from the rows it refers to, and the REFS columns dropped. Row order is kept. A referenced row
    that is not in the catalog is a CatalogError."""
    out_names = [c for c in table.column_names if c not in REFS]
    refd = pc.is_valid(table.column("prompt_ref")).to_numpy(zero_copy_only=False)
    if not refd.any():
        return table.select(out_names)
    at = np.flatnonzero(refd)
    part = table.take(pa.array(at, pa.int64()))
    prompt_refs = part.column("prompt_ref").combine_chunks()
    response_refs = part.column("response_refs").combine_chunks()
    flat_refs = pc.list_flatten(response_refs)

    def texts(kind: str, column: str, wanted: pa.Array) -> pa.Array:
        # the row ids first (a scan of the hashes only), then the texts of those ids: the rows of a batch are
        # stored near each other, so the id range lets DuckDB skip the other blocks of (long) texts
        rt = _rows_table(kind)
        con.register("_wanted", pa.table({"h": pc.unique(wanted)}))
        try:
            ids = _arrow(con, f"SELECT r.row_id FROM {rt} r SEMI JOIN _wanted w ON r.row_hash = w.h")
        finally:
            con.unregister("_wanted")
        where, params = _key_range(ids, "row_id", "r")
        con.register("_ids", ids)
        try:
            found = _arrow(con, f"SELECT r.row_hash, r.{column} FROM {rt} r SEMI JOIN _ids i ON r.row_id = i.row_id "
                                f"WHERE {where}", params)
        finally:
            con.unregister("_ids")
        taken = found.column(1).take(pc.index_in(wanted, value_set=found.column(0).combine_chunks()))
        if taken.null_count:
            raise CatalogError(f"{taken.null_count} texts of pairs rows refer to {kind} rows that are not in the "
                               f"catalog (see `iterdpo versions verify`)")
        return taken.combine_chunks().cast(pa.string())

    prompt = texts("prompts", "prompt", prompt_refs)
    responses = texts("generations", "response", flat_refs)
    offsets = response_refs.offsets
    if response_refs.offset or offsets[0].as_py():
        offsets = pc.subtract(offsets, offsets[0])
    built = _assemble(prompt, pa.ListArray.from_arrays(offsets, responses), part.column("chosen_ref"),
                      part.column("rejected_ref"))
    full = pa.array(np.flatnonzero(~refd), pa.int64())
    columns = []
    for name in out_names:
        col = table.column(name)
        if name in built:
            rebuilt = built[name].cast(col.type)
            merged = pa.concat_arrays([col.combine_chunks().take(full), rebuilt]) if len(full) else rebuilt
            columns.append(merged)
        else:
            columns.append(col)
    # rows were split into full ones, then rebuilt ones: put the rebuilt columns back in the table's order
    order = np.empty(len(refd), dtype=np.int64)
    order[np.concatenate([np.flatnonzero(~refd), at])] = np.arange(len(refd))
    order = pa.array(order)
    return pa.Table.from_arrays([c.take(order) if name in built else c for name, c in zip(out_names, columns)],
                                names=out_names)


def _assemble(prompt: pa.Array, responses: pa.ListArray, chosen: pa.ChunkedArray | pa.Array,
              rejected: pa.ChunkedArray | pa.Array) -> dict[str, pa.Array]:
    """The REFERENCED columns of pairs rows from their texts: prompt, chosen and rejected ([{prompt, user},
    {the response at the position, assistant}]) and all_generated_responses."""
    n = len(prompt)
    offsets = responses.offsets
    if responses.offset or offsets[0].as_py():
        offsets = pc.subtract(offsets, offsets[0])
    flat = pc.list_flatten(responses)
    pairs_offsets = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))
    roles = _interleave(pa.array(["user"] * n), pa.array(["assistant"] * n))

    def turn(index) -> pa.Array:
        if isinstance(index, pa.ChunkedArray):
            index = index.combine_chunks()
        answer = flat.take(pc.add(offsets.slice(0, n), index.cast(pa.int32())))
        messages = pa.StructArray.from_arrays([_interleave(prompt, answer), roles], names=["content", "role"])
        return pa.ListArray.from_arrays(pairs_offsets, messages)

    return {"prompt": prompt, "chosen": turn(chosen), "rejected": turn(rejected),
            "all_generated_responses": pa.ListArray.from_arrays(offsets, flat.cast(pa.string()))}


def _same_texts(con: duckdb.DuckDBPyConnection, kind: str, column: str, refs: pa.Array, texts: pa.Array) -> np.ndarray:
    """Per reference: whether the `kind` row of that hash is stored and holds `texts` (byte for byte): its other
    (short) columns are read and its hash recomputed with the text."""
    k = KINDS[kind]
    rt = _rows_table(kind)
    con.register("_wanted", pa.table({"h": pc.unique(refs)}))
    try:
        others = ", ".join(f"r.{c}" for c in k.columns if c != column)
        stored = _arrow(con, f"SELECT r.row_hash, {others} FROM {rt} r SEMI JOIN _wanted w ON r.row_hash = w.h")
    finally:
        con.unregister("_wanted")
    at = pc.index_in(refs, value_set=stored.column(0).combine_chunks())
    found = at.is_valid().to_numpy(zero_copy_only=False)
    if not found.any():
        return found
    rows = stored.take(at.fill_null(0))
    table = pa.table({c: (texts if c == column else rows.column(c)) for c in k.columns}).cast(k.schema)
    same = np.array([a == b for a, b in zip(row_hashes(table), refs.to_pylist())])
    return found & same


def _interleave(a: pa.Array, b: pa.Array) -> pa.Array:
    """a0, b0, a1, b1, ..."""
    both = pa.concat_arrays([a.cast(pa.string()), b.cast(pa.string())])
    n = len(a)
    return both.take(pa.array(np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)))


def _key_range(table: pa.Table, column: str, alias: str) -> tuple[str, list]:
    """A filter on `alias.column` to the min..max of `table`'s column (TRUE when it holds a null), which lets a
    scan skip the blocks that cannot hold those values."""
    values = table.column(column)
    if values.null_count or len(values) == 0:
        return "TRUE", []
    low, high = pc.min_max(values).values()
    return f"{alias}.{column} BETWEEN ? AND ?", [low.as_py(), high.as_py()]


def _sql_str(text: str) -> str:
    """Escape a string literal for the few statements that take no parameters (ATTACH) or need one inline."""
    return text.replace("'", "''")


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg
