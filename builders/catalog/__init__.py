"""The DuckDB catalog: content-addressed rows, snapshots with lineage, tags, and resumable work.

Contracts (DESIGN.md):
- a snapshot id is the sha256 of (kind, iteration, split, the row hashes in canonical key order); params and
  parents are recorded but not hashed, so registering the same content again is a no-op returning the same id;
- rows are stored once per kind, keyed by their own hash, and shared by every snapshot that contains them;
- every registration is one transaction, and the file is opened only for that transaction (DuckDB allows one
  writing process per file), so other processes can work between a long stage's batches;
- work in progress (finished batches of a running stage) lives beside the snapshots, keyed by the stage's inputs
  and params, and is never listed as a snapshot.

Modules, each using only the others' public names:
  db            connections: this process's registry of attached files, fork handling, `atomic` (every transaction)
  store         the file's tables: schema, version and migration; row insertion
  refs          pairs rows stored by reference to the prompts and generations rows holding their texts
  hashing       row hashes, snapshot ids, key order
  snapshots, work, merge, publications, gc
                the facets of `Catalog` (registration and reads with named lineage, work in progress, merge,
                publications, verify and gc), each working on the catalog's `db` through the modules above.
This module is the public API.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Self

import duckdb

from builders.catalog.gc import Upkeep
from builders.catalog.hashing import row_hashes, snapshot_id, sort_order
from builders.catalog.merge import Merge
from builders.catalog.publications import Publications
from builders.catalog.snapshots import Registration, Snapshot, Snapshots
from builders.catalog.store import SCHEMA_VERSION, database
from builders.catalog.work import Work
from builders.config import CatalogConfig

__all__ = ["SCHEMA_VERSION", "Catalog", "Registration", "Snapshot", "row_hashes", "snapshot_id", "sort_order"]


class Catalog(Snapshots, Work, Merge, Publications, Upkeep):
    """A catalog file. Cheap to create: the file is opened only inside each short unit of work.

    The facets (one per module) share nothing but `db`, `config` and `path`; a facet that needs another one's
    reads (gc's verify reads snapshots) calls its public methods."""

    def __init__(self, path: str | os.PathLike | None = None, config: CatalogConfig | None = None):
        base = config or CatalogConfig.from_env(path)
        self.config = dataclasses.replace(base, path=Path(path)) if path else base
        self.path = Path(self.config.path)
        self.db = database(self.path, self.config)

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    def exists(self) -> bool:
        return self.db.exists()

    def require(self) -> Self:
        """This catalog, if its file exists: commands that only read never create one."""
        self.db.require()
        return self

    def connect(self, read_only: bool = False) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """The file opened for one short unit of work (SQL on the catalog's tables), then released."""
        return self.db.connect(read_only)

    def atomic(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A unit of work that is one transaction: all of it is committed, or (on any error or a kill) none."""
        return self.db.atomic()
