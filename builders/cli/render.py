"""How the CLI prints: `--json` documents and the human lines for snapshots."""

from __future__ import annotations

import json
from typing import Any, Callable

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


