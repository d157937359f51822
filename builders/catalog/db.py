"""The catalog file's connections: opening and locking, this process's registry of attached files, fork handling,
and `atomic`, the one transaction every write of the catalog goes through.

DuckDB allows one writing process per file, so the file is opened only for each short unit of work (`connect`) and
released after it: other processes can work between a long stage's batches. This module knows nothing of the
catalog's tables; the file's owner checks them when the file is attached (`on_attach`).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from builders.config import CATALOG_ENV
from builders.errors import CatalogBusy, CatalogError, one_line


# DuckDB 2 refuses new work on a connection while a result is unfinished: every statement is fetched in full.
def fetch_all(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> list[tuple]:
    return con.execute(query, list(params)).fetchall()


def fetch_one(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> tuple | None:
    rows = fetch_all(con, query, params)
    return rows[0] if rows else None


def execute(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> None:
    fetch_all(con, query, params)


def fetch_arrow(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> pa.Table:
    return con.sql(query, params=list(params)).to_arrow_table()


def sql_str(text: str) -> str:
    """Escape a string literal for the few statements that take no parameters (ATTACH) or need one inline."""
    return text.replace("'", "''")


@contextmanager
def atomic(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction on an open unit of work: all of it is committed, or (on any error or a kill) none of it."""
    con.begin()
    try:
        yield con
    except BaseException:
        con.rollback()
        raise
    con.commit()


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
_INHERITED: list[duckdb.DuckDBPyConnection] = []


def _instance(memory_limit: str) -> duckdb.DuckDBPyConnection:
    instance = _INSTANCES.get(memory_limit)
    if instance is None:
        # zstd for every column: long texts compress 1.5x better and checkpoint 2x faster than DuckDB's
        # default analysis (FSST/dictionary), and nested string lists get it too (measured in bench/catalog.py).
        instance = _INSTANCES[memory_limit] = duckdb.connect(
            ":memory:", config={"memory_limit": memory_limit, "force_compression": "zstd"}
        )
    return instance


def _cursor(instance: duckdb.DuckDBPyConnection, alias: str) -> duckdb.DuckDBPyConnection:
    con = instance.cursor()
    execute(con, f"USE {alias}")
    return con


def _forget_after_fork() -> None:
    global _LOCK, _RELEASED
    _LOCK = threading.RLock()
    _RELEASED = threading.Condition(_LOCK)
    _INHERITED.extend(_INSTANCES.values())  # kept, never closed: closing would wait for threads the child lacks
    _INSTANCES.clear()
    _ATTACHED.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


class Database:
    """A DuckDB file opened for one short unit of work at a time. `on_attach(con, read_only)` runs when this
    process attaches the file (not for nested units of work): the owner checks (or creates) its tables there."""

    def __init__(
        self,
        path: str | os.PathLike,
        lock_timeout: float,
        memory_limit: str,
        on_attach: Callable[[duckdb.DuckDBPyConnection, bool], None],
    ):
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self.memory_limit = memory_limit
        self.on_attach = on_attach
        self._key = str(self.path.resolve())  # this file in this process's registry of attached files

    def exists(self) -> bool:
        return self.path.exists()

    def require(self) -> None:
        """Raise unless the file exists: commands that only read never create one."""
        if not self.path.exists():
            raise CatalogError(f"catalog {self.path} does not exist (set --catalog or {CATALOG_ENV})")

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
    def atomic(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A unit of work that is one transaction (see `atomic`)."""
        with self.connect() as con, atomic(con):
            yield con

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        if read_only:
            self.require()
        elif not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        key, me = self._key, threading.get_ident()
        deadline = time.monotonic() + self.lock_timeout
        with _LOCK:
            instance = _instance(self.memory_limit)
            # a write waits for this process's other threads to finish reading (the file is attached read-only)
            while (attached := _ATTACHED.get(key)) is not None and attached.read_only and not read_only:
                if me in attached.users or time.monotonic() >= deadline:
                    raise CatalogError(
                        f"catalog {self.path} is being read in this process; it cannot be written before that read ends"
                    )
                _RELEASED.wait(deadline - time.monotonic())
            if attached is not None:  # already open in this process (a nested or concurrent unit of work)
                attached.users.append(me)
                return _cursor(attached.instance, attached.alias)
            alias = f"iterdpo_{next(_ALIASES)}"
            self._attach(instance, alias, read_only)
            attached = _ATTACHED[key] = _Attached(instance, alias, read_only, [me])
            con = _cursor(instance, alias)
            try:
                self.on_attach(con, read_only)
            except BaseException:
                self._release(con)
                raise
            return con

    def _attach(self, instance: duckdb.DuckDBPyConnection, alias: str, read_only: bool) -> None:
        """Attach the file to this process's DuckDB instance (taking its lock), waiting while another process
        holds it. Attaching costs ~2 ms where creating a DuckDB instance (duckdb.connect) costs ~15 ms."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                # Reads attach the file read-only: they work on a read-only file and share it with other readers.
                execute(instance, f"ATTACH '{sql_str(self._key)}' AS {alias}" + (" (READ_ONLY)" if read_only else ""))
                return
            except duckdb.IOException as e:
                msg = str(e)
                if "lock" not in msg.lower():
                    raise CatalogError(f"catalog {self.path} cannot be opened: {one_line(msg)}") from None
                if time.monotonic() >= deadline:
                    raise CatalogBusy(
                        f"catalog {self.path} is held by another process (waited {self.lock_timeout:.0f}s; "
                        f"set ITERDPO_LOCK_TIMEOUT to wait longer)"
                    ) from None
                # jitter so that several waiting processes do not retry in lockstep
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)
            except duckdb.Error as e:
                raise CatalogError(f"catalog {self.path} cannot be opened: {one_line(e)}") from None

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
                    execute(attached.instance, f"DETACH {attached.alias}")
                finally:
                    _RELEASED.notify_all()
