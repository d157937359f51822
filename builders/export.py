"""Export a snapshot's rows to Parquet or JSON Lines, with the kind's declared schema, atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from builders.catalog import Catalog
from builders.errors import InputError
from builders.schemas import kind as get_kind


def export_snapshot(catalog: Catalog, ref: str, path: Path) -> dict[str, Any]:
    """Write snapshot `ref` to `path` (JSONL when it ends in .jsonl, else Parquet). The file appears whole or not
    at all: rows stream batch by batch (bounded memory: one Parquet row group per batch) to a temporary file beside
    it, which is renamed at the end."""
    import pyarrow.parquet as pq

    snap = catalog.get(ref)
    k = get_kind(snap.kind)
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"{path.parent}: no such folder")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    rows = 0
    try:
        if path.suffix.lower() == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for batch in catalog.read_batches(snap.id):
                    for row in batch.to_pylist():
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    rows += batch.num_rows
            fmt = "jsonl"
        else:
            with pq.ParquetWriter(tmp, k.schema) as writer:
                for batch in catalog.read_batches(snap.id):
                    writer.write_batch(batch)
                    rows += batch.num_rows
            fmt = "parquet"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"id": snap.id, "kind": snap.kind, "path": str(path), "format": fmt, "rows": rows}
