"""The catalog file: opening and locking, the schema and its version, transactions, and row storage.

Every registration is one transaction, and the file is opened only for that transaction (DuckDB allows one writing
process per file), so other processes can work between a long stage's batches. Rows are stored once per kind, keyed
by their own hash, and shared by every snapshot (and work in progress) that contains them.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self

import duckdb
import pyarrow as pa

from builders import __version__
from builders.config import CATALOG_ENV, CatalogConfig
from builders.errors import CatalogBusy, CatalogError
from builders.schemas import KINDS, Kind

SCHEMA_VERSION = 1


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

    # ---------------------------------------------------------------------------------------------- row storage
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


def _sql_str(text: str) -> str:
    """Escape a string literal for the few statements that take no parameters (ATTACH) or need one inline."""
    return text.replace("'", "''")


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg
