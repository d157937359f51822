"""Work in progress of resumable stages: finished batches of a running stage live beside the snapshots, keyed by
the stage's inputs and params (the work key), and are never listed as snapshots."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import builders.catalog.refs as refs
import builders.catalog.store as store
from builders.catalog.db import Database, execute, fetch_all, fetch_arrow, fetch_one
from builders.catalog.hashing import row_hashes, sort_order
from builders.errors import CatalogError, NotFound
from builders.schemas import conform
from builders.schemas import kind as get_kind


class Work:
    """Work in progress: batches committed by a stage, read back to resume it and to register its snapshot (a facet
    of Catalog)."""

    db: Database
    path: Path

    def work_units(self, work_key: str) -> dict[str, Any]:
        """Units (e.g. prompt ids) that a stage already finished under this work key, with their info."""
        if not self.db.exists():
            return {}
        with self.db.connect(read_only=True) as con:
            return {
                u: (json.loads(i) if i is not None else None)
                for u, i in fetch_all(con, "SELECT unit, info FROM work_units WHERE work_key = ?", [work_key])
            }

    def work_params(self, work_key: str) -> dict[str, Any]:
        """The params a stage recorded when it began this work (empty if there is no such work)."""
        if not self.db.exists():
            return {}
        with self.db.connect(read_only=True) as con:
            row = fetch_one(con, "SELECT params FROM work WHERE work_key = ?", [work_key])
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
        with self.db.atomic() as con:
            known = fetch_one(con, "SELECT kind FROM work WHERE work_key = ?", [work_key])
            if known is None:
                execute(
                    con,
                    "INSERT INTO work VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        work_key,
                        k.name,
                        iteration,
                        split,
                        json.dumps(dict(params or {}), sort_keys=True, default=str),
                        store.now(),
                    ],
                )
            elif known[0] != k.name:
                raise CatalogError(f"work {work_key[:12]} holds {known[0]} rows, not {k.name}")
            ids, existed = store.insert_rows(con, k, table, hashes)
            row_ids = set(ids.values())
            if existed:  # only rows stored before this transaction can already belong to the work (a replay)
                old = pa.table({"row_id": pa.array([ids[h] for h in existed], pa.int64())})
                where, params = store.key_range(old, "row_id", "w")
                con.register("_old", old)
                row_ids -= {
                    r[0]
                    for r in fetch_all(
                        con,
                        "SELECT w.row_id FROM work_rows w SEMI JOIN _old o "
                        f"ON w.row_id = o.row_id WHERE w.work_key = ? AND {where}",
                        [work_key, *params],
                    )
                }
                con.unregister("_old")
            if row_ids:
                con.register("_ids", pa.table({"row_id": pa.array(sorted(row_ids), pa.int64())}))
                execute(con, "INSERT INTO work_rows SELECT ?, row_id FROM _ids", [work_key])
                con.unregister("_ids")
            batch_units = pa.table(
                {
                    "unit": pa.array(list(units), pa.string()),
                    "info": pa.array(
                        [None if v is None else json.dumps(v, sort_keys=True) for v in units.values()], pa.string()
                    ),
                }
            )
            con.register("_u", batch_units)
            if existed or not _units_have_new_rows(units, table):
                # a replay (its rows were stored before) or units without rows: skip the units already done
                execute(
                    con,
                    "INSERT INTO work_units SELECT ?, u.unit, u.info FROM _u u "
                    "ANTI JOIN (SELECT unit FROM work_units WHERE work_key = ?) d ON u.unit = d.unit",
                    [work_key, work_key],
                )
            else:
                # every unit has rows in this batch, none stored before: no unit can be done already (a batch
                # committed before under this work key would have stored these rows), so no need to scan for them
                execute(con, "INSERT INTO work_units SELECT ?, unit, info FROM _u", [work_key])
            con.unregister("_u")

    def work_rows(self, work_key: str, units: Iterable[str] | None = None, unit_column: str = "prompt_id") -> pa.Table:
        """The rows of a work key (optionally only those whose `unit_column` is in `units`), canonical order."""
        with self.db.connect(read_only=True) as con:
            row = fetch_one(con, "SELECT kind FROM work WHERE work_key = ?", [work_key])
            if row is None:
                raise NotFound(f"no work {work_key[:12]} in catalog {self.path}")
            k = get_kind(row[0])
            cols = store.select_columns(con, k, k.columns) + (f", {refs.select_list(con)}" if k.name == "pairs" else "")
            table = fetch_arrow(
                con,
                f"SELECT {cols} FROM work_rows w JOIN {store.rows_table(k.name)} r ON w.row_id = r.row_id "
                f"WHERE w.work_key = ? ORDER BY {', '.join('r.' + c for c in k.key)}",
                [work_key],
            )
            if k.name == "pairs":  # a row stored by reference by a registration is shared with the work
                table = refs.expand(con, table)
        table = conform(table, k)
        if units is not None:
            table = table.filter(pc.is_in(table.column(unit_column), pa.array(sorted(set(units)), pa.string())))
        return table


def _units_have_new_rows(units: Mapping[str, Any], table: pa.Table, unit_column: str = "prompt_id") -> bool:
    """Whether every unit has rows in `table` (units are prompt ids, as in `work_rows`)."""
    if unit_column not in table.column_names or table.num_rows == 0:
        return False
    return set(units) <= set(table.column(unit_column).to_pylist())
