"""The catalog's tables: the schema and its version (checked when the file is attached, migrated in place), and row
storage. Rows are stored once per kind, keyed by their own hash, and shared by every snapshot (and work in
progress) that contains them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from builders import __version__
from builders.catalog.db import Database, atomic, execute, fetch_all, fetch_one, sql_str
from builders.config import CatalogConfig
from builders.errors import CatalogError
from builders.schemas import KINDS, Kind

# 2: pairs rows may refer to the prompts and generations rows that hold their texts (REF_COLUMNS) instead of
# repeating them (builders.catalog.refs)
# 3: prompts rows have an optional `messages` column (a conversation; null for a string prompt, builders.conversation)
SCHEMA_VERSION = 3

# The columns of rows_pairs that hold a row's references (schema 2; builders.catalog.refs says what they mean), in
# SQL and in Arrow.
REF_COLUMNS = {"prompt_ref": "BLOB", "response_refs": "BLOB[]", "chosen_ref": "INTEGER", "rejected_ref": "INTEGER"}
REF_SCHEMA = pa.schema(
    [
        ("prompt_ref", pa.binary()),
        ("response_refs", pa.list_(pa.binary())),
        ("chosen_ref", pa.int32()),
        ("rejected_ref", pa.int32()),
    ]
)

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


def rows_table(kind: str) -> str:
    return f"rows_{kind}"


def now() -> str:
    """A record's timestamp."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def database(path: Path, config: CatalogConfig) -> Database:
    """The catalog file at `path`, its schema checked (or created) whenever this process attaches it."""
    return Database(path, config.lock_timeout, config.memory_limit, partial(check_schema, path=path))


# ------------------------------------------------------------------------------------------------------- schema
def check_schema(con: duckdb.DuckDBPyConnection, read_only: bool, *, path: Path) -> None:
    """Check the schema of the catalog file `path` just attached (creating it in an empty file opened for writing,
    upgrading an older one in place at its first write)."""
    try:  # the common case in one cheap query
        row = fetch_one(
            con,
            "SELECT value, (SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND starts_with(table_name, 'rows_')) FROM iterdpo_meta WHERE key = 'schema_version'",
        )
    except duckdb.CatalogException:
        tables = {
            r[0]
            for r in fetch_all(con, "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()")
        }
        if tables:
            raise CatalogError(
                f"{path} is a DuckDB file but not an iterdpo catalog (tables: {sorted(tables)[:5]})"
            ) from None
        if read_only:
            raise CatalogError(f"{path} is an empty DuckDB file, not an iterdpo catalog") from None
        _create(con)
        return
    version = int(row[0]) if row else 0
    if row and row[1] < len(KINDS) and not read_only:
        # a kind added since the file was made (preferences, reward): its rows table, at the first write; a
        # read-only open reads the file as it is (no snapshot of that kind can be in it)
        with atomic(con):
            _add_kind_tables(con)
    if version > SCHEMA_VERSION:
        raise CatalogError(
            f"catalog {path} has schema version {version}, newer than this iterdpo {__version__} "
            f"understands ({SCHEMA_VERSION}); upgrade iterdpo"
        )
    if version in (1, 2):
        # in place, once, at the first write: the rows of an older version stay valid as they are (version 1 has
        # only full pairs rows; before 3 no prompt is a conversation). A read-only open reads it as it is
        # (has_refs is False, absent optional columns read as nulls: select_columns), so a source of `merge` is
        # never written.
        if not read_only:
            with atomic(con):
                if version == 1:
                    _add_ref_columns(con)
                _add_optional_columns(con)
                execute(con, "UPDATE iterdpo_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        return
    if version < SCHEMA_VERSION:
        raise CatalogError(f"catalog {path} has an unknown schema version {version}")


def _create(con: duckdb.DuckDBPyConnection) -> None:
    with atomic(con):
        for ddl in _DDL:
            execute(con, ddl)
        _add_kind_tables(con)
        _add_ref_columns(con)
        execute(
            con,
            "INSERT INTO iterdpo_meta VALUES ('schema_version', ?), ('created_by', ?)",
            [str(SCHEMA_VERSION), f"iterdpo {__version__}"],
        )


def _add_kind_tables(con: duckdb.DuckDBPyConnection) -> None:
    """The rows table of every kind that has none yet in this file."""
    for k in KINDS.values():
        if has_rows_table(con, k.name):
            continue
        empty = _with_hash(k.schema.empty_table(), []).add_column(0, "row_id", pa.array([], pa.int64()))
        con.register("_empty", empty)
        execute(con, f"CREATE TABLE {rows_table(k.name)} AS SELECT * FROM _empty")
        con.unregister("_empty")


def has_rows_table(con: duckdb.DuckDBPyConnection, kind: str, database: str | None = None) -> bool:
    """Whether the file holds `kind`'s rows table (a file made before the kind existed, opened read-only, does not:
    it holds no rows of that kind)."""
    where = "database_name = current_database()" if database is None else f"database_name = '{sql_str(database)}'"
    return bool(
        fetch_one(con, f"SELECT count(*) FROM duckdb_tables() WHERE {where} AND table_name = ?", [rows_table(kind)])[0]
    )


def _add_ref_columns(con: duckdb.DuckDBPyConnection) -> None:
    for name, sql_type in REF_COLUMNS.items():
        execute(con, f"ALTER TABLE {rows_table('pairs')} ADD COLUMN {name} {sql_type}")


# the SQL types of the optional columns (schemas.Kind.optional), added to older catalogs by the schema 3 migration
OPTIONAL_SQL = {("prompts", "messages"): "STRUCT(content VARCHAR, role VARCHAR)[]"}


def _add_optional_columns(con: duckdb.DuckDBPyConnection) -> None:
    for (kind, name), sql_type in OPTIONAL_SQL.items():
        execute(con, f"ALTER TABLE {rows_table(kind)} ADD COLUMN IF NOT EXISTS {name} {sql_type}")


def _has_column(con: duckdb.DuckDBPyConnection, table: str, column: str, database: str | None) -> bool:
    where = "database_name = current_database()" if database is None else f"database_name = '{sql_str(database)}'"
    return bool(
        fetch_one(
            con,
            f"SELECT count(*) FROM duckdb_columns() WHERE {where} AND table_name = ? AND column_name = ?",
            [table, column],
        )[0]
    )


def select_columns(
    con: duckdb.DuckDBPyConnection, k: Kind, names: Iterable[str], alias: str = "r", database: str | None = None
) -> str:
    """`names` of `alias` (a rows table of kind `k`) for a SELECT list: an optional column that this file lacks
    (an older schema opened read-only) reads as NULL."""
    out = []
    for name in names:
        if name in k.optional and not _has_column(con, rows_table(k.name), name, database):
            out.append(f"NULL::{OPTIONAL_SQL[(k.name, name)]} AS {name}")
        else:
            out.append(f"{alias}.{name}")
    return ", ".join(out)


def has_refs(con: duckdb.DuckDBPyConnection, database: str | None = None) -> bool:
    """Whether this catalog's pairs rows can hold references (schema 2; a version 1 file opened read-only cannot)."""
    where = "database_name = current_database()" if database is None else f"database_name = '{sql_str(database)}'"
    return bool(
        fetch_one(
            con,
            f"SELECT count(*) FROM duckdb_columns() WHERE {where} AND table_name = ? AND column_name = 'prompt_ref'",
            [rows_table("pairs")],
        )[0]
    )


# -------------------------------------------------------------------------------------------------- row storage
# `prepare(rows, hashes)`: the rows to store for rows not stored yet (e.g. pairs rows by reference, builders.catalog.refs)
Prepare = Callable[[pa.Table, list[bytes]], pa.Table]


def insert_rows(
    con: duckdb.DuckDBPyConnection, k: Kind, table: pa.Table, hashes: list[bytes], prepare: Prepare | None = None
) -> tuple[dict[bytes, int], set[bytes]]:
    """Store rows not stored yet (content addressing: a row is stored once however many snapshots hold it).
    Returns the row id of every hash, and the hashes that were stored before. `prepare` turns the new rows into
    what is stored (any of the optional columns, e.g. REF_COLUMNS, beside the kind's); their hashes stay theirs.

    One scan of the stored hashes (a semi join, built on the batch) finds the rows already stored; new rows are
    appended with ids numbered here, so that nothing else in the transaction has to look rows up again."""
    rt = rows_table(k.name)
    con.register("_hashes", pa.table({"row_hash": pa.array(hashes, pa.binary())}))
    ids = dict(
        fetch_all(con, f"SELECT r.row_hash, r.row_id FROM {rt} r SEMI JOIN _hashes h ON r.row_hash = h.row_hash")
    )
    con.unregister("_hashes")
    existed = set(ids)
    fresh = []
    for i, h in enumerate(hashes):
        if h not in ids:
            ids[h] = -1
            fresh.append(i)
    if fresh:
        first = fetch_one(con, f"SELECT coalesce(max(row_id), 0) + 1 FROM {rt}")[0]
        new_ids = list(range(first, first + len(fresh)))
        for h, row_id in zip((hashes[i] for i in fresh), new_ids):
            ids[h] = row_id
        rows = table.take(pa.array(fresh, pa.int64()))
        fresh_hashes = [hashes[i] for i in fresh]
        if prepare is not None:
            rows = prepare(rows, fresh_hashes)
        rows = _with_hash(rows, fresh_hashes).add_column(0, "row_id", pa.array(new_ids, pa.int64()))
        con.register("_new", rows)
        execute(con, f"INSERT INTO {rt} BY NAME SELECT * FROM _new")  # by name: the optional columns may be absent
        con.unregister("_new")
    return ids, existed


def insert_members(
    con: duckdb.DuckDBPyConnection, k: Kind, insert_select: str, params: list, hashes: list[bytes], where: str = "TRUE"
) -> None:
    """`insert_select` + the row ids of `hashes` (all already stored)."""
    con.register("_members", pa.table({"row_hash": pa.array(hashes, pa.binary())}))
    execute(
        con,
        f"{insert_select} FROM (SELECT DISTINCT row_hash FROM _members) m "
        f"JOIN {rows_table(k.name)} r ON m.row_hash = r.row_hash WHERE {where}",
        params,
    )
    con.unregister("_members")


def key_range(table: pa.Table, column: str, alias: str) -> tuple[str, list]:
    """A filter on `alias.column` to the min..max of `table`'s column (TRUE when it holds a null), which lets a
    scan skip the blocks that cannot hold those values."""
    values = table.column(column)
    if values.null_count or len(values) == 0:
        return "TRUE", []
    low, high = pc.min_max(values).values()
    return f"{alias}.{column} BETWEEN ? AND ?", [low.as_py(), high.as_py()]


def batches(rows: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """`rows` as tables of at most `size` rows (a table), or as they come (batches)."""
    if isinstance(rows, pa.Table):
        for start in range(0, rows.num_rows, size):
            yield rows.slice(start, size)
        return
    for batch in rows:
        yield pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch


def _with_hash(table: pa.Table, hashes: list[bytes]) -> pa.Table:
    return table.add_column(0, "row_hash", pa.array(hashes, pa.binary()))
