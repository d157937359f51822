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
import pyarrow as pa
import pyarrow.compute as pc

from builders import __version__
from builders.config import CATALOG_ENV, CatalogConfig
from builders.errors import CatalogBusy, CatalogError
from builders.schemas import KINDS, Kind

SCHEMA_VERSION = 1


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
                     hashes: list[bytes]) -> tuple[dict[bytes, int], set[bytes]]:
        """Store rows not stored yet (content addressing: a row is stored once however many snapshots hold it).
        Returns the row id of every hash, and the hashes that were stored before.

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
            rows = _with_hash(rows, [hashes[i] for i in fresh]).add_column(0, "row_id", pa.array(new_ids, pa.int64()))
            con.register("_new", rows)
            _run(con, f"INSERT INTO {rt} SELECT * FROM _new")
            con.unregister("_new")
        return ids, existed


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
