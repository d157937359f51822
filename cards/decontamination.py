"""What the dataset card says about how its prompt pool was cleaned, read from the pool's lineage (import ->
decontaminate / dedup -> ... -> the pool the prompt sets were drawn from): the benchmarks it was checked against
with the method and counts, the near-duplicates removed, the sources left out at import (the rebuild script's commands for those steps:
cards/rebuild.py)."""

from __future__ import annotations

from typing import Any

from builders.models import display_name


def lineages(origins) -> list[list[Any]]:
    """Each distinct pool lineage (oldest first) behind the published splits."""
    out: dict[str, list[Any]] = {}
    for o in origins:
        for chain in o.pool_lineage or [[p] for p in o.pools]:
            out.setdefault(chain[-1].id, chain)
    return list(out.values())


def summary(origins) -> dict[str, Any]:
    """The card's "Decontamination" section: `steps` (each decontaminate step: benchmarks with rows, hash and
    removed count, method, thresholds, pool rows before and removed), `dedup` (each dedup step's counts) and
    `sources` (what the import left out by source)."""
    steps, dedups, sources = [], [], []
    for chain in lineages(origins):
        root = chain[0].params
        if root.get("excluded_by_source"):
            sources.append(
                {
                    "mode": "kept only" if root.get("include_sources") else "left out",
                    "names": root.get("include_sources") or root.get("exclude_sources") or [],
                    "dropped": root["excluded_by_source"],
                }
            )
        for snap in chain[1:]:
            p = snap.params
            if p.get("stage") == "decontaminate":
                per = p.get("removed_per_benchmark", {})
                steps.append(
                    {
                        "method": p.get("method"),
                        "thresholds": p.get("thresholds", {}),
                        "pool_rows": p.get("pool_rows"),
                        "removed": p.get("removed"),
                        "snapshot": snap.id,
                        "benchmarks": [
                            {
                                "name": display_name(str(b["source"])),
                                "rows": b["rows"],
                                "sha256": b["sha256"],
                                "removed": per.get(b["source"], 0),
                            }
                            for b in p.get("benchmarks", [])
                        ],
                    }
                )
            elif p.get("stage") == "dedup":
                dedups.append(
                    {
                        "threshold": p.get("threshold"),
                        "pool_rows": p.get("pool_rows"),
                        "removed": p.get("removed"),
                        "groups": p.get("groups_found"),
                        "snapshot": snap.id,
                    }
                )
    return {"steps": steps, "dedup": dedups, "sources": sources}
