"""How the CLI prints: `--json` documents and the human lines for snapshots."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click


def emit(obj: Any, as_json: bool, human: Callable[[], None]) -> None:
    """`--json`: one JSON document on stdout and nothing else there; otherwise the human rendering."""
    if as_json:
        click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    else:
        human()


def snapshot_line(s) -> str:
    where = f"it{s.iteration}" if s.iteration is not None else "-"
    tags = f"  [{', '.join(s.tags)}]" if s.tags else ""
    return f"{s.id[:12]}  {s.kind:<11} {where:<4} {s.split or '-':<5} {s.rows:>8} rows  {s.created_at[:19]}{tags}"


def print_snapshots(snaps) -> None:
    if not snaps:
        click.echo("(no snapshots)")
        return
    click.echo(f"{'ID':<12}  {'KIND':<11} {'IT':<4} {'SPLIT':<5} {'ROWS':>8}       CREATED")
    for s in snaps:
        click.echo(snapshot_line(s))


def print_executor(stats: dict[str, Any] | None) -> None:
    """The ray executor's line: replicas, nodes, the work split, start-up and losses."""
    if not stats:
        return
    lost = (
        f", {stats['replaced_replicas']} replicas replaced ({stats['resubmitted_chunks']} chunks resubmitted)"
        if stats["replaced_replicas"]
        else ""
    )
    click.echo(
        f"ray: {stats['replicas']} replicas on {stats['nodes']} node(s), units per replica "
        f"{'/'.join(map(str, stats['units_per_replica']))}; start-up {stats['ray_init_seconds']:.1f}s Ray + "
        f"{stats['replicas_ready_seconds']:.1f}s replicas{lost}"
    )
