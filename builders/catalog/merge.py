"""Merging catalog files: snapshots, rows, tags, work and publications of other catalogs, matched by hash."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

import builders.catalog.store as store
from builders.catalog.db import Database, atomic, execute, fetch_all, fetch_one, sql_str
from builders.config import CatalogConfig
from builders.errors import CatalogError, InputError, one_line
from builders.schemas import KINDS


class Merge:
    """`versions merge`: copy other catalogs into this one (idempotent). A facet of Catalog."""

    db: Database
    config: CatalogConfig
    path: Path

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
            with store.database(other_path, self.config).connect(read_only=True):
                pass
        for other_path in paths:
            report["merged"].append(self._merge_one(other_path))
        return report

    def _merge_one(self, other: Path) -> dict[str, Any]:
        """One transaction. Rows are matched by hash and renumbered; snapshots get new local seq numbers."""
        counts: dict[str, Any] = {"source": str(other)}
        with self.db.connect() as con:
            try:
                execute(con, f"ATTACH '{sql_str(str(other))}' AS src (READ_ONLY)")
            except duckdb.Error as e:
                raise CatalogError(f"cannot read catalog {other}: {one_line(e)}") from None
            try:
                with atomic(con):
                    counts.update(self._merge_from_src(con))
            finally:
                execute(con, "DETACH src")
        return counts

    def _merge_from_src(self, con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
        counts: dict[str, Any] = {"rows": 0}
        # every row of the source comes along, so the rows that its pairs rows refer to (by hash) do too; a version 1
        # source (read as it is) has no references
        src_refs = store.has_refs(con, "src")
        # a source made before a kind existed has no rows table (and no snapshots) of it
        present = [k for k in KINDS.values() if store.has_rows_table(con, k.name, "src")]
        for k in present:
            rt = store.rows_table(k.name)
            cols = ["row_hash", *k.columns, *(store.REF_COLUMNS if k.name == "pairs" and src_refs else ())]
            # an older source lacks the optional columns: they read as nulls
            selected = store.select_columns(con, k, cols, alias="s", database="src")
            counts["rows"] += fetch_one(
                con,
                f"""
                INSERT INTO {rt} BY NAME SELECT (SELECT coalesce(max(row_id), 0) FROM {rt})
                       + row_number() OVER (ORDER BY s.row_id) AS row_id, {selected}
                FROM src.{rt} s ANTI JOIN {rt} r ON s.row_hash = r.row_hash""",
            )[0]
        # new snapshots, numbered after ours in their source order
        counts["snapshots"] = fetch_one(
            con,
            """
            INSERT INTO snapshots SELECT s.id, (SELECT coalesce(max(seq), 0) FROM snapshots) + row_number() OVER (ORDER BY s.seq),
                   s.kind, s.iteration, s.split, s.n_rows, s.params, s.created_at
            FROM src.snapshots s ANTI JOIN snapshots d ON s.id = d.id""",
        )[0]
        for k in present:
            rt = store.rows_table(k.name)
            # membership of snapshots that have none here yet (the ones just added), mapped through the row hash
            execute(
                con,
                f"""
                INSERT INTO snapshot_rows SELECT d.seq, r.row_id
                FROM src.snapshot_rows m JOIN src.snapshots s ON m.seq = s.seq AND s.kind = ?
                JOIN snapshots d ON d.id = s.id
                JOIN src.{rt} sr ON sr.row_id = m.row_id JOIN {rt} r ON r.row_hash = sr.row_hash
                WHERE d.seq NOT IN (SELECT DISTINCT seq FROM snapshot_rows)""",
                [k.name],
            )
        execute(
            con,
            """INSERT INTO snapshot_parents SELECT s.* FROM src.snapshot_parents s
                        ANTI JOIN snapshot_parents d ON s.snapshot_id = d.snapshot_id AND s.parent_id = d.parent_id""",
        )
        counts["tag_conflicts_kept_ours"] = [
            r[0]
            for r in fetch_all(
                con, "SELECT s.name FROM src.tags s JOIN tags d ON s.name = d.name WHERE s.snapshot_id <> d.snapshot_id"
            )
        ]
        counts["tags"] = fetch_one(
            con, "INSERT INTO tags SELECT s.* FROM src.tags s ANTI JOIN tags d ON s.name = d.name"
        )[0]
        execute(con, "INSERT INTO work SELECT s.* FROM src.work s ANTI JOIN work d ON s.work_key = d.work_key")
        execute(
            con,
            """INSERT INTO publications SELECT s.* FROM src.publications s ANTI JOIN publications d
                        ON s.set_id = d.set_id AND s.repo_id = d.repo_id AND s.revision = d.revision
                        AND s.endpoint = d.endpoint""",
        )
        counts["work_units"] = fetch_one(
            con,
            """INSERT INTO work_units SELECT s.* FROM src.work_units s
                                                 ANTI JOIN work_units d ON s.work_key = d.work_key AND s.unit = d.unit""",
        )[0]
        for k in present:
            rt = store.rows_table(k.name)
            execute(
                con,
                f"""
                INSERT INTO work_rows SELECT w.work_key, r.row_id
                FROM src.work_rows w JOIN src.work sw ON sw.work_key = w.work_key AND sw.kind = ?
                JOIN src.{rt} sr ON sr.row_id = w.row_id JOIN {rt} r ON r.row_hash = sr.row_hash
                ANTI JOIN work_rows d ON d.work_key = w.work_key AND d.row_id = r.row_id""",
                [k.name],
            )
        return counts
