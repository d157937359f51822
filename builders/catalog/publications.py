"""Publications: which snapshot set was pushed to which Hub repo revision, and its commit (so a publish is not
repeated)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import builders.catalog.store as store
from builders.catalog.db import Database, execute, fetch_all, fetch_one


class Publications:
    """Records of published snapshot sets (a facet of Catalog)."""

    db: Database

    def publication(self, set_id: str, repo_id: str, revision: str, endpoint: str) -> dict[str, Any] | None:
        """The recorded publication of a snapshot set to a repo revision, if any."""
        if not self.db.exists():
            return None
        with self.db.connect(read_only=True) as con:
            row = fetch_one(
                con,
                "SELECT commit_id, tag, created_at FROM publications WHERE set_id = ? AND repo_id = ? "
                "AND revision = ? AND endpoint = ?",
                [set_id, repo_id, revision, endpoint],
            )
        return {"commit": row[0], "tag": row[1], "created_at": row[2]} if row else None

    def publications(self) -> list[dict[str, Any]]:
        """Every recorded publication, oldest first."""
        if not self.db.exists():
            return []
        with self.db.connect(read_only=True) as con:
            rows = fetch_all(
                con,
                "SELECT set_id, repo_id, revision, commit_id, tag, snapshot_ids, endpoint, created_at "
                "FROM publications ORDER BY created_at",
            )
        return [
            {
                "set_id": r[0],
                "repo_id": r[1],
                "revision": r[2],
                "commit": r[3],
                "tag": r[4],
                "snapshot_ids": json.loads(r[5]),
                "endpoint": r[6],
                "created_at": r[7],
            }
            for r in rows
        ]

    def record_publication(
        self,
        set_id: str,
        repo_id: str,
        revision: str,
        commit: str,
        tag: str | None,
        snapshot_ids: Sequence[str],
        endpoint: str,
    ) -> None:
        with self.db.atomic() as con:
            execute(
                con,
                "INSERT INTO publications VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [set_id, repo_id, revision, commit, tag, json.dumps(sorted(snapshot_ids)), endpoint, store.now()],
            )

    def set_publication_tag(self, set_id: str, repo_id: str, revision: str, endpoint: str, tag: str) -> None:
        with self.db.atomic() as con:
            execute(
                con,
                "UPDATE publications SET tag = ? WHERE set_id = ? AND repo_id = ? AND revision = ? AND endpoint = ?",
                [tag, set_id, repo_id, revision, endpoint],
            )
