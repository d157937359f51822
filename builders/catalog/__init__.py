"""The DuckDB catalog: content-addressed rows, snapshots with lineage, tags, and resumable work.

Contracts (DESIGN.md):
- a snapshot id is the sha256 of (kind, iteration, split, the row hashes in canonical key order); params and
  parents are recorded but not hashed, so registering the same content again is a no-op returning the same id;
- rows are stored once per kind, keyed by their own hash, and shared by every snapshot that contains them;
- every registration is one transaction, and the file is opened only for that transaction (DuckDB allows one
  writing process per file), so other processes can work between a long stage's batches;
- work in progress (finished batches of a running stage) lives beside the snapshots, keyed by the stage's inputs
  and params, and is never listed as a snapshot.

One module per concern: hashing (row hashes, snapshot ids, key order), store (the file, its schema, transactions,
row storage), snapshots, work, merge, publications, gc (verify and gc). `Catalog` composes them; this module is
the public API.
"""

from __future__ import annotations

from builders.catalog.gc import Upkeep
from builders.catalog.hashing import row_hashes, snapshot_id, sort_order
from builders.catalog.merge import Merge
from builders.catalog.publications import Publications
from builders.catalog.snapshots import Registration, Snapshot, Snapshots
from builders.catalog.store import REF_SCHEMA, SCHEMA_VERSION, Store
from builders.catalog.work import Work

__all__ = ["REF_SCHEMA", "SCHEMA_VERSION", "Catalog", "Registration", "Snapshot", "row_hashes", "snapshot_id", "sort_order"]


class Catalog(Upkeep, Snapshots, Work, Merge, Publications, Store):
    """A catalog file. Cheap to create: the file is opened only inside each short transaction."""
