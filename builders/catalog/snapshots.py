"""Snapshots: registering rows as content-addressed snapshots with lineage, and finding, reading, tagging and
diffing them.

A snapshot id is the sha256 of (kind, iteration, split, the row hashes in canonical key order); params and parents
are recorded but not hashed, so registering the same content again is a no-op returning the same id. Lineage is
named: `parent(snap, kind)` is the input of that kind a snapshot was made from, and `Snapshot.shard` says whether it
is one shard of a larger snapshot (a part, never complete).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

import builders.catalog.refs as refs
import builders.catalog.store as store
from builders import __version__
from builders.catalog.db import Database, atomic, execute, fetch_all, fetch_arrow, fetch_one
from builders.catalog.hashing import row_hashes, snapshot_id, sort_order
from builders.config import CatalogConfig
from builders.errors import InputError, NotFound
from builders.schemas import KINDS, SPLITS, conform, without_unused
from builders.schemas import kind as get_kind

_MIN_PREFIX = 4
# rows per batch as a snapshot streams out of DuckDB unsorted (read_batches)
_STREAM_ROWS = 1024
# KIND (its newest snapshot without an iteration, e.g. the prompt pool), KIND:N (iteration N) or KIND:N:SPLIT
_SELECTOR = re.compile(r"(?P<kind>[a-z]+)(?::(?P<iteration>\d+)(?::(?P<split>train|test))?)?")
# A shard snapshot (one part of a sharded stage's snapshot) records its shard, "K/N", under this params key (params
# are not hashed: ids are unchanged, and catalogs of every schema version carry it). Only this module reads the key.
_SHARD = "shard"
# SQL: the snapshot is complete (not a shard)
_COMPLETE = f"json_extract_string(params, '$.{_SHARD}') IS NULL"


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

    @property
    def shard(self) -> str | None:
        """Which part this is, "K/N" (shard K of N: never complete, `newest` and selectors skip it); None if whole."""
        return self.params.get(_SHARD)

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
    """One snapshot to register: rows of a kind, where they belong, and how they were made.

    `texts_from` (pairs only): the prompts snapshot and the generations snapshot whose rows hold the pairs rows'
    texts. A row that their rows rebuild byte for byte is stored by reference (its texts once, in those rows;
    builders.catalog.refs); any other row in full. Nothing else changes: the id and row hashes are the full rows'.
    `shard`: "K/N" when the snapshot is shard K of N of a stage's output (a part, never complete)."""

    kind: str
    rows: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch]  # a table, or batches streamed in bounded memory
    iteration: int | None = None
    split: str | None = None
    parents: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    texts_from: tuple[str, ...] = ()
    shard: str | None = None


def _looks_like_prefix(ref: str) -> bool:
    return len(ref) >= _MIN_PREFIX and all(c in "0123456789abcdef" for c in ref.lower())


class Snapshots:
    """Registration and reads of snapshots (a facet of Catalog)."""

    db: Database
    config: CatalogConfig
    path: Path

    def register(
        self,
        kind: str,
        rows: pa.Table | pa.RecordBatchReader | Iterable[pa.RecordBatch],
        *,
        iteration: int | None = None,
        split: str | None = None,
        parents: Sequence[str] = (),
        params: Mapping[str, Any] | None = None,
        texts_from: Sequence[str] = (),
        shard: str | None = None,
    ) -> Snapshot:
        """Register `rows` (a table, or batches streamed in bounded memory) as a snapshot of `kind`. Identical
        content returns the existing snapshot unchanged. `texts_from` and `shard`: see Registration."""
        return self.register_many(
            [Registration(kind, rows, iteration, split, tuple(parents), dict(params or {}), tuple(texts_from), shard)]
        )[0]

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
            if item.texts_from and (item.kind != "pairs" or len(item.texts_from) != 2):
                raise InputError(
                    "texts_from names the prompts and the generations snapshot holding the texts of "
                    f"pairs rows, not {len(item.texts_from)} snapshot(s) of {item.kind} rows"
                )
            if item.shard is not None and (not isinstance(item.shard, str) or not item.shard.strip()):
                raise InputError(f"shard must name the part, e.g. '0/4', not {item.shard!r}", option="shard")
            if item.shard is not None and item.params.get(_SHARD, item.shard) != item.shard:
                raise InputError(
                    f"shard {item.shard!r} differs from the params' shard {item.params[_SHARD]!r}", option="shard"
                )
            if isinstance(item.rows, pa.Table):  # a table is checked whole before anything is stored
                sort_order(conform(item.rows, get_kind(item.kind)), get_kind(item.kind))
        with self.db.connect() as con:
            for item in items:
                for p in item.parents:
                    if not fetch_one(con, "SELECT 1 FROM snapshots WHERE id = ?", [p]):
                        raise NotFound(f"parent snapshot {p} is not in catalog {self.path}")
            sources = [self._text_sources(con, item.texts_from) if item.texts_from else None for item in items]
            staged = [self._store_rows(con, item, src) for item, src in zip(items, sources)]
            with atomic(con):
                return [self._record(con, item, sid, hashes) for item, (sid, hashes) in zip(items, staged)]

    def _text_sources(self, con: duckdb.DuckDBPyConnection, names: Sequence[str]) -> refs.Sources:
        """The prompts and generations snapshots `names` name (ids, tags, selectors), in this file."""
        found: dict[str, int] = {}
        for name in names:
            sid = self._resolve(con, name)
            kind, seq = fetch_one(con, "SELECT kind, seq FROM snapshots WHERE id = ?", [sid])
            if kind not in ("prompts", "generations") or kind in found:
                raise InputError(
                    f"texts_from names the prompts and the generations snapshot holding the texts of "
                    f"pairs rows; {name!r} is {'another' if kind in found else 'a'} {kind} snapshot"
                )
            found[kind] = seq
        return refs.Sources(prompts=found["prompts"], generations=found["generations"])

    def _store_rows(
        self, con: duckdb.DuckDBPyConnection, item: Registration, sources: refs.Sources | None = None
    ) -> tuple[str, list[bytes]]:
        """Hash and store an item's rows batch by batch, each batch in its own transaction (pairs rows by reference
        where `sources` hold their texts); return its snapshot id and row hashes."""
        k = get_kind(item.kind)
        prepare = None
        if sources is not None:

            def prepare(rows: pa.Table, fresh: list[bytes]) -> pa.Table:
                return refs.by_reference(con, rows, fresh, sources)

        keys, hashes = [], []
        for batch in store.batches(item.rows, self.config.chunk_rows):
            table = conform(batch, k)
            batch_hashes = row_hashes(table)
            with atomic(con):
                store.insert_rows(con, k, table, batch_hashes, prepare)
            # a copy: a batch read from an Arrow stream is one buffer, which a slice of it would keep alive (the
            # whole snapshot's rows in memory by the end)
            keys.append(table.select(list(k.key)).take(pa.array(np.arange(table.num_rows))))
            hashes.extend(batch_hashes)
        key_table = pa.concat_tables(keys) if keys else k.schema.empty_table().select(list(k.key))
        order = sort_order(key_table, k).to_pylist()
        return snapshot_id(k.name, item.iteration, item.split, (hashes[i] for i in order)), hashes

    def _record(self, con: duckdb.DuckDBPyConnection, item: Registration, sid: str, hashes: list[bytes]) -> Snapshot:
        k = get_kind(item.kind)
        if not fetch_one(con, "SELECT 1 FROM snapshots WHERE id = ?", [sid]):
            seq = fetch_one(con, "SELECT coalesce(max(seq), 0) + 1 FROM snapshots")[0]
            record = dict(item.params)
            record.setdefault("iterdpo_version", __version__)
            if item.shard is not None:
                record[_SHARD] = item.shard
            execute(
                con,
                "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    sid,
                    seq,
                    k.name,
                    item.iteration,
                    item.split,
                    len(hashes),
                    json.dumps(record, sort_keys=True, allow_nan=False, default=str),
                    store.now(),
                ],
            )
            store.insert_members(con, k, "INSERT INTO snapshot_rows SELECT ?, r.row_id", [seq], hashes)
            for i, p in enumerate(item.parents):
                execute(con, "INSERT INTO snapshot_parents VALUES (?, ?, ?)", [sid, p, i])
        return self._get(con, sid)

    # ------------------------------------------------------------------------------------------------------ reads
    def _get(self, con: duckdb.DuckDBPyConnection, sid: str) -> Snapshot:
        row = fetch_one(
            con, "SELECT id, kind, iteration, split, n_rows, params, created_at FROM snapshots WHERE id = ?", [sid]
        )
        if row is None:
            raise NotFound(f"no snapshot {sid} in catalog {self.path}")
        parents = [
            r[0]
            for r in fetch_all(
                con, "SELECT parent_id FROM snapshot_parents WHERE snapshot_id = ? ORDER BY position", [sid]
            )
        ]
        tags = [r[0] for r in fetch_all(con, "SELECT name FROM tags WHERE snapshot_id = ? ORDER BY name", [sid])]
        return Snapshot(row[0], row[1], row[2], row[3], row[4], parents, json.loads(row[5]), row[6], tags)

    def _resolve(self, con: duckdb.DuckDBPyConnection, ref: str) -> str:
        ref = ref.strip()
        tagged = fetch_one(con, "SELECT snapshot_id FROM tags WHERE name = ?", [ref])
        if tagged:
            return tagged[0]
        selector = _SELECTOR.fullmatch(ref)
        if selector and selector["kind"] in KINDS:
            iteration = int(selector["iteration"]) if selector["iteration"] else None
            newest = fetch_one(
                con,
                "SELECT id FROM snapshots WHERE kind = ? AND iteration IS NOT DISTINCT FROM ? "
                "AND (split IS NOT DISTINCT FROM ? OR (? IS NULL AND iteration IS NOT NULL)) "
                f"AND {_COMPLETE} ORDER BY seq DESC LIMIT 1",
                [selector["kind"], iteration, selector["split"], selector["split"]],
            )
            if newest:
                return newest[0]
            raise NotFound(f"no {ref} snapshot in catalog {self.path} (see `iterdpo versions list`)")
        if _looks_like_prefix(ref):
            ids = [
                r[0]
                for r in fetch_all(
                    con, "SELECT id FROM snapshots WHERE starts_with(id, ?) ORDER BY id LIMIT 3", [ref.lower()]
                )
            ]
            if len(ids) == 1:
                return ids[0]
            if len(ids) > 1:
                raise NotFound(
                    f"snapshot id prefix {ref!r} is ambiguous ({', '.join(i[:12] for i in ids)}, ...); give more characters"
                )
        raise NotFound(f"no snapshot or tag {ref!r} in catalog {self.path} (see `iterdpo versions list`)")

    def get(self, ref: str) -> Snapshot:
        """A snapshot by tag name, selector (KIND, KIND:N, KIND:N:SPLIT: the newest such), full id or unique id
        prefix (4+ hex characters)."""
        if not self.db.exists():
            raise NotFound(f"no snapshot or tag {ref!r}: catalog {self.path} does not exist yet")
        with self.db.connect(read_only=True) as con:
            return self._get(con, self._resolve(con, ref))

    def list(self, kind: str | None = None, iteration: int | None = None, split: str | None = None) -> list[Snapshot]:
        """Snapshots, oldest first, optionally filtered. A catalog that does not exist yet is empty."""
        if kind is not None:
            get_kind(kind)
        if not self.db.exists():
            return []
        where, args = ["TRUE"], []
        for col, val in (("kind", kind), ("iteration", iteration), ("split", split)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        with self.db.connect(read_only=True) as con:
            ids = [
                r[0] for r in fetch_all(con, f"SELECT id FROM snapshots WHERE {' AND '.join(where)} ORDER BY seq", args)
            ]
            return [self._get(con, i) for i in ids]

    def newest(self, kind: str, iteration: int | None = None, split: str | None = None) -> Snapshot | None:
        """The newest complete snapshot of a kind for an iteration and split (None matches the pool: no
        iteration/split). Shard snapshots (Snapshot.shard) are parts, never complete."""
        if not self.db.exists():
            return None
        with self.db.connect(read_only=True) as con:
            row = fetch_one(
                con,
                "SELECT id FROM snapshots WHERE kind = ? AND iteration IS NOT DISTINCT FROM ? "
                f"AND split IS NOT DISTINCT FROM ? AND {_COMPLETE} ORDER BY seq DESC LIMIT 1",
                [kind, iteration, split],
            )
            return self._get(con, row[0]) if row else None

    # ---------------------------------------------------------------------------------------------------- lineage
    def parents(self, snap: Snapshot | str, kind: str | None = None) -> list[Snapshot]:
        """The snapshots `snap` (a Snapshot, or a reference as `get` takes) was made from, in the order they were
        recorded; with `kind`, only those of that kind."""
        if kind is not None:
            get_kind(kind)
        with self.db.connect(read_only=True) as con:
            sid = snap.id if isinstance(snap, Snapshot) else self._resolve(con, snap)
            ids = [
                r[0]
                for r in fetch_all(
                    con,
                    "SELECT p.parent_id FROM snapshot_parents p LEFT JOIN snapshots s ON s.id = p.parent_id "
                    "WHERE p.snapshot_id = ? AND (?::VARCHAR IS NULL OR s.kind = ?) ORDER BY p.position",
                    [sid, kind, kind],
                )
            ]
            return [self._get(con, i) for i in ids]

    def parent(self, snap: Snapshot | str, kind: str) -> Snapshot | None:
        """The input of `kind` that `snap` was made from (a generations snapshot's prompts, a scores snapshot's
        generations, a pairs snapshot's scores, a prompt set's pool), or None if it records none. Where it has
        several of that kind (a prompt set drawn from several pools), the first recorded; `parents` gives all."""
        found = self.parents(snap, kind)
        return found[0] if found else None

    def read(self, ref: str) -> pa.Table:
        """The rows of a snapshot, in canonical order, with the kind's declared schema; an optional column that is
        null in every row is left out (a pool of string prompts reads as before conversations: no `messages`)."""
        snap = self.get(ref)
        k = get_kind(snap.kind)
        with self.db.connect(read_only=True) as con:
            cols = store.select_columns(con, k, k.columns) + (f", {refs.select_list(con)}" if k.name == "pairs" else "")
            table = fetch_arrow(
                con,
                f"SELECT {cols} FROM snapshot_rows s JOIN {store.rows_table(k.name)} r "
                f"ON s.row_id = r.row_id WHERE s.seq = (SELECT seq FROM snapshots WHERE id = ?) "
                f"ORDER BY {', '.join(f'r.{c}' for c in k.key)}",
                [snap.id],
            )
            if k.name == "pairs":
                table = refs.expand(con, table)
            return without_unused(conform(table, k), k)

    def read_batches(
        self, ref: str, batch_rows: int | None = None, *, columns: Sequence[str] | None = None, with_hash: bool = False
    ) -> Iterator[pa.RecordBatch]:
        """Stream a snapshot's rows in canonical order as record batches of `batch_rows` rows (default
        `chunk_rows`; the last one may be shorter), with the kind's declared types, optionally only `columns`
        and/or with each row's stored `row_hash` first.

        Memory stays bounded by a batch however large the snapshot: a read-only file cannot spill DuckDB's sort,
        so only the row ids are sorted (small); the rows themselves stream out once, unsorted, into one temporary
        Arrow file per output batch (by canonical position, under TMPDIR: as much disk as the snapshot's Arrow
        size, removed as it is read), and each file is then sorted and yielded in turn. No connection is held
        while the caller has a batch (it may write to the catalog meanwhile)."""
        snap = self.get(ref)
        k = get_kind(snap.kind)
        size = max(1, batch_rows or self.config.chunk_rows)
        names = list(columns) if columns is not None else k.columns
        unknown = [c for c in names if c not in k.columns]
        if unknown:
            raise InputError(
                f"{k.name} rows have no column(s) {', '.join(unknown)}; columns are {', '.join(k.columns)}"
            )
        schema = pa.schema(
            ([pa.field("row_hash", pa.binary())] if with_hash else []) + [k.schema.field(c) for c in names]
        )
        # pairs rows stored by reference are rebuilt batch by batch (refs.expand), from their reference columns
        refd = refs.needed(k.name, names)
        wide = pa.schema([*schema, *store.REF_SCHEMA]) if refd else schema
        order = ", ".join(f"r.{c}" for c in k.key)
        members = (
            f"FROM snapshot_rows s JOIN {store.rows_table(k.name)} r ON s.row_id = r.row_id "
            f"WHERE s.seq = (SELECT seq FROM snapshots WHERE id = ?)"
        )

        def full(table: pa.Table, con: duckdb.DuckDBPyConnection) -> pa.Table:
            return refs.expand(con, table.cast(wide)) if refd else table

        if snap.rows <= size:  # one batch: sorted by DuckDB in one small query
            with self._reading() as con:
                extra = f", {refs.select_list(con)}" if refd else ""
                cols = store.select_columns(con, k, schema.names)  # an older file's absent columns: nulls
                table = fetch_arrow(con, f"SELECT {cols}{extra} {members} ORDER BY {order}", [snap.id])
                table = full(table.rename_columns(wide.names), con)
            if table.num_rows:
                yield table.rename_columns(schema.names).cast(schema).combine_chunks().to_batches()[0]
            return
        with self._reading() as con:
            ids = fetch_arrow(con, f"SELECT r.row_id {members} ORDER BY {order}", [snap.id]).column(0).to_numpy()
        if not len(ids):
            return
        position = np.full(int(ids.max()) + 1, -1, np.int64)
        position[ids] = np.arange(len(ids))
        spill = wide.append(pa.field("_pos", pa.int64()))
        with tempfile.TemporaryDirectory(prefix="iterdpo-read-") as tmp:
            sinks: dict[int, tuple[Any, pa.ipc.RecordBatchStreamWriter]] = {}
            try:
                with self._reading() as con:
                    extra = f", {refs.select_list(con)}" if refd else ""
                    cols = store.select_columns(con, k, schema.names)
                    reader = con.sql(f"SELECT r.row_id, {cols}{extra} {members}", params=[snap.id]).to_arrow_reader(
                        min(size, _STREAM_ROWS)
                    )
                    for batch in reader:
                        pos = position[batch.column(0).to_numpy(zero_copy_only=False)]
                        bucket = pos // size
                        by_bucket = np.argsort(bucket, kind="stable")
                        pos, bucket = pos[by_bucket], bucket[by_bucket]
                        part = (
                            pa.Table.from_batches([batch])
                            .take(pa.array(by_bucket))
                            .drop_columns(["row_id"])
                            .rename_columns(wide.names)
                            .append_column("_pos", pa.array(pos))
                            .cast(spill)
                        )
                        cuts = [0, *(np.flatnonzero(np.diff(bucket)) + 1).tolist(), len(bucket)]
                        for lo, hi in zip(cuts[:-1], cuts[1:]):
                            b = int(bucket[lo])
                            if b not in sinks:
                                f = pa.OSFile(f"{tmp}/{b}.arrows", "wb")
                                sinks[b] = (f, pa.ipc.new_stream(f, spill))
                            sinks[b][1].write_table(part.slice(lo, hi - lo))
            finally:
                for f, writer in sinks.values():
                    writer.close()
                    f.close()
            for b in sorted(sinks):
                with pa.OSFile(f"{tmp}/{b}.arrows") as f, pa.ipc.open_stream(f) as reader:
                    table = reader.read_all()
                table = table.sort_by("_pos").drop_columns(["_pos"])
                Path(f"{tmp}/{b}.arrows").unlink()
                if refd:
                    with self._reading() as con:
                        table = full(table, con)
                yield table.cast(schema).combine_chunks().to_batches()[0]

    @contextmanager
    def _reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.db.connect(read_only=True) as con:
            execute(con, f"SET memory_limit = '{self.config.read_memory_limit}'")
            yield con

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
            raise InputError(
                f"tag name {name!r} reads as a snapshot id prefix ({_MIN_PREFIX}+ hex characters); "
                f"choose another, e.g. with a letter beyond f"
            )
        self.db.require()
        with self.db.atomic() as con:
            sid = self._resolve(con, ref)
            old = fetch_one(con, "SELECT snapshot_id FROM tags WHERE name = ?", [name])
            if old and old[0] != sid:
                if not force:
                    raise InputError(f"tag {name!r} already names snapshot {old[0][:12]}; use --force to move it")
                execute(con, "DELETE FROM tags WHERE name = ?", [name])
            if not old or old[0] != sid:
                execute(con, "INSERT INTO tags VALUES (?, ?, ?)", [name, sid, store.now()])
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
        q = (
            f"SELECT {', '.join('r.' + c for c in keys)}, r.row_hash FROM snapshot_rows s "
            f"JOIN {store.rows_table(k.name)} r ON s.row_id = r.row_id WHERE s.seq = (SELECT seq FROM snapshots WHERE id = ?)"
        )
        with self.db.connect(read_only=True) as con:
            ta = pl.from_arrow(fetch_arrow(con, q, [sa.id]))
            tb = pl.from_arrow(fetch_arrow(con, q, [sb.id]))
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
            "changed": keys_of(
                joined.filter(
                    pl.col("row_hash").is_not_null()
                    & pl.col("row_hash_b").is_not_null()
                    & (pl.col("row_hash") != pl.col("row_hash_b"))
                )
            ),
            "unchanged": int(joined.filter(pl.col("row_hash") == pl.col("row_hash_b")).height),
        }
