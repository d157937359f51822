"""What the dataset card says about how its prompt pool was cleaned, read from the pool's lineage (import ->
decontaminate / dedup -> ... -> the pool the prompt sets were drawn from): the benchmarks it was checked against
with the method and counts, the near-duplicates removed, the sources left out at import; and the rebuild
script's commands for those steps."""

from __future__ import annotations

from pathlib import Path
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


def step_line(script, snap) -> str | None:
    """The command that registers a decontaminate or dedup pool again (from its parent, named by id: the rebuild
    registers the parent first, with the same id)."""
    from builders.prompts import looks_local
    from cards.rebuild import _arg

    p, parent = snap.params, snap.parents[0] if snap.parents else None
    src = f" --from {parent}" if parent else ""
    if p.get("stage") == "dedup":
        return f"iterdpo prompts dedup --threshold {p['threshold']} --num-perm {p['num_perm']}{src}   # pool {snap.id[:12]}"
    if p.get("stage") != "decontaminate":
        return None
    args = []
    for b in p.get("benchmarks", []):
        source = str(b["source"])
        if looks_local(source) and (Path(source).is_absolute() or source.startswith("~") or ".." in Path(source).parts):
            arg = script.variable(
                ("benchmark", b["sha256"]),
                "BENCHMARK_FILE",
                f"your copy of the benchmark {display_name(source)} (content sha256 {b['sha256'][:12]})",
            )
        else:
            arg = _arg(source)  # a hub id, or a path relative to the folder the data was built in
        args.append(f"--against {arg}")
    columns = {b.get("column") for b in p.get("benchmarks", [])}
    column = f" --column {_arg(columns.pop())}" if len(columns) == 1 and None not in columns else ""
    t = p.get("thresholds", {})
    return (
        f"iterdpo prompts decontaminate {' '.join(args)}{column} --containment {t.get('containment')} "
        f"--coverage {t.get('coverage')}{src}   # pool {snap.id[:12]}"
    )
