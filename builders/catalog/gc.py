"""Upkeep of a catalog file: `versions verify` (recompute every hash and id) and `versions gc` (remove rows that
belong to no snapshot and no work in progress, left by interrupted registrations)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

import builders.catalog.store as store
from builders.catalog.db import Database, execute, fetch_one
from builders.catalog.hashing import row_hashes, snapshot_id
from builders.errors import CatalogError
from builders.schemas import KINDS, Kind
from builders.schemas import kind as get_kind

# rows hashed per batch by verify: pairs rows are ~10 kB each
_VERIFY_ROWS = 1_000


class Upkeep:
    """Verification and garbage collection (a facet of Catalog: it reads snapshots through Catalog's `list` and
    `read_batches`)."""

    db: Database
    path: Path

    # ----------------------------------------------------------------------------------------------------- verify
    def verify(self) -> dict[str, Any]:
        """Recompute every row hash and snapshot id from the stored rows; report each mismatch."""
        self.db.require()
        problems: list[str] = []
        snaps = self.list()
        for snap in snaps:
            k = get_kind(snap.kind)
            # chunk by chunk: the id is hashed as the rows stream past, so memory stays bounded by a batch
            seen = {"rows": 0, "bad": 0}
            try:
                sid = snapshot_id(k.name, snap.iteration, snap.split, self._rehash(snap.id, seen))
            except CatalogError as e:  # pairs rows referring to rows that are gone cannot be rebuilt
                problems.append(f"{snap.id[:12]}: {e}")
                continue
            if seen["rows"] != snap.rows:
                problems.append(f"{snap.id[:12]}: {snap.rows} rows recorded, {seen['rows']} stored")
            if seen["bad"]:
                problems.append(f"{snap.id[:12]}: {seen['bad']} rows do not match their hash")
            if sid != snap.id:
                problems.append(f"{snap.id[:12]}: recomputed id is {sid[:12]}")
        with self.db.connect(read_only=True) as con:
            dangling = fetch_one(
                con, "SELECT count(*) FROM snapshot_parents p ANTI JOIN snapshots s ON p.parent_id = s.id"
            )[0]
            if dangling:
                problems.append(f"{dangling} parent links name snapshots that are not in the catalog")
            # rows of interrupted registrations: in no snapshot and no work; harmless, reused by a retry,
            # removed by `versions gc`
            refs = store.has_refs(con)
            unreferenced = sum(
                fetch_one(con, f"SELECT count(*) {_unreferenced(k, refs)}", [k.name, k.name])[0]
                for k in KINDS.values()
                if store.has_rows_table(con, k.name)  # a read-only file made before the kind existed has none
            )
        return {
            "catalog": str(self.path),
            "snapshots": len(snaps),
            "ok": not problems,
            "problems": problems,
            "unreferenced_rows": unreferenced,
        }

    def _rehash(self, sid: str, seen: dict[str, int]) -> Iterator[bytes]:
        """A snapshot's recomputed row hashes in canonical order, batch by batch; counts rows and mismatches with
        the stored hashes into `seen`."""
        for batch in self.read_batches(sid, _VERIFY_ROWS, with_hash=True):
            table = pa.Table.from_batches([batch])
            hashes = row_hashes(table.drop_columns(["row_hash"]))
            seen["rows"] += len(hashes)
            seen["bad"] += sum(1 for x, y in zip(table.column("row_hash").to_pylist(), hashes) if x != y)
            yield from hashes

    # --------------------------------------------------------------------------------------------------------- gc
    def gc(self, dry_run: bool = False) -> dict[str, Any]:
        """Remove stored rows that belong to no snapshot and to no work in progress (left by interrupted
        registrations), in one transaction. Work is kept: it is what a rerun resumes from. Safe beside other
        processes: a registration holds the file from its first stored row to its snapshot record."""
        self.db.require()
        removed: dict[str, int] = {}
        with self.db.atomic() as con:
            before = _free_bytes(con)
            # pairs first: the prompts and generations rows that only removed pairs rows referred to go too
            for k in sorted(KINDS.values(), key=lambda k: k.name != "pairs"):
                n = fetch_one(con, f"SELECT count(*) {_unreferenced(k)}", [k.name, k.name])[0]
                if n and not dry_run:
                    execute(
                        con,
                        f"DELETE FROM {store.rows_table(k.name)} WHERE row_id IN (SELECT r.row_id {_unreferenced(k)})",
                        [k.name, k.name],
                    )
                removed[k.name] = n
            removed = {k: removed[k] for k in KINDS}
        freed = 0
        if not dry_run and any(removed.values()):
            with self.db.connect() as con:  # a checkpoint returns the deleted rows' blocks to the file's free list
                execute(con, "CHECKPOINT")
                freed = max(_free_bytes(con) - before, 0)
        return {
            "catalog": str(self.path),
            "dry_run": dry_run,
            "rows_removed": sum(removed.values()),
            "rows_removed_by_kind": removed,
            "bytes_freed": freed,
            "file_bytes": self.path.stat().st_size,
        }


def _unreferenced(k: Kind, refs: bool = True) -> str:
    """FROM clause of a kind's rows in no snapshot, no work, and (prompts, generations) not referred to by a stored
    pairs row (parameters: the kind name, twice). `refs`: the file has references (schema 2)."""
    referred = {
        "prompts": "SELECT prompt_ref AS h FROM rows_pairs WHERE prompt_ref IS NOT NULL",
        "generations": "SELECT unnest(response_refs) AS h FROM rows_pairs WHERE prompt_ref IS NOT NULL",
    }
    by_pairs = f" ANTI JOIN ({referred[k.name]}) refd ON r.row_hash = refd.h" if refs and k.name in referred else ""
    return f"""FROM {store.rows_table(k.name)} r
        ANTI JOIN (SELECT row_id FROM snapshot_rows s JOIN snapshots n ON s.seq = n.seq WHERE n.kind = ?
                   UNION ALL SELECT row_id FROM work_rows w JOIN work k ON w.work_key = k.work_key
                   WHERE k.kind = ?) used ON r.row_id = used.row_id{by_pairs}"""


def _free_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """Bytes of the file's free blocks (DuckDB reuses them; the file itself does not shrink)."""
    block_size, free_blocks = fetch_one(
        con, "SELECT block_size, free_blocks FROM pragma_database_size() WHERE database_name = current_database()"
    )
    return int(block_size) * int(free_blocks)
