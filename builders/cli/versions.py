"""`versions`: the catalog's snapshots (list, show, diff, tag, export, verify, gc, merge)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from builders.cli.app import State, cli
from builders.cli.options import OWN_CATALOG, QUICKSTART_CATALOG, example, json_option
from builders.cli.render import emit, print_snapshots


# --------------------------------------------------------------------------------------------------------- versions
@cli.group(epilog=example(f"iterdpo --catalog {QUICKSTART_CATALOG} versions list --kind model"))
def versions() -> None:
    """List, inspect, compare, tag, export, verify, merge and garbage-collect snapshots.

    A snapshot is named by its id, a unique id prefix (4+ characters), a tag, or a selector for the newest of a
    kind: KIND (without iteration: the prompt pool), KIND:N or KIND:N:SPLIT (prompts:1:train).
    """


@versions.command(
    "list", epilog=example(f"iterdpo --catalog {QUICKSTART_CATALOG} versions list --kind pairs --iteration 1 --json")
)
@click.option("--kind", default=None, help="Only this kind (prompts, generations, scores, pairs, model).")
@click.option("--iteration", type=int, default=None)
@click.option("--split", type=click.Choice(["train", "test"]), default=None)
@json_option
@click.pass_obj
def versions_list(state: State, kind: str | None, iteration: int | None, split: str | None, as_json: bool) -> None:
    """List snapshots, oldest first."""
    snaps = state.catalog().require().list(kind, iteration, split)
    emit([s.to_json() for s in snaps], as_json, lambda: print_snapshots(snaps))


@versions.command("show", epilog=example(f"iterdpo --catalog {QUICKSTART_CATALOG} versions show pairs:1:train"))
@click.argument("ref")
@json_option
@click.pass_obj
def versions_show(state: State, ref: str, as_json: bool) -> None:
    """Show one snapshot: kind, iteration, split, rows, parents, params, tags; for pairs, the mean chosen and
    rejected length and score (the length drift across iterations).
    """
    catalog = state.catalog().require()
    snap = catalog.get(ref)
    doc = snap.to_json()
    if snap.kind == "pairs":  # chosen vs rejected length and scores: the length drift across iterations
        from cards.stats import pair_stats

        doc["stats"] = pair_stats(catalog.read(snap.id))

    def human() -> None:
        for key, value in doc.items():
            if key == "stats":
                st = value
                click.echo(
                    f"{'stats':<11} {st['rows']} pairs; mean length chosen {st['chosen_length']['mean']:.0f} vs "
                    f"rejected {st['rejected_length']['mean']:.0f} characters (chosen longer in "
                    f"{100 * st['chosen_longer']:.0f}%); mean score chosen {st['score_chosen']['mean']:.4g} vs "
                    f"rejected {st['score_rejected']['mean']:.4g}"
                )
                continue
            if key == "params":
                value = json.dumps(value, sort_keys=True)
            elif isinstance(value, list):
                value = ", ".join(value) or "-"
            click.echo(f"{key:<11} {value if value is not None else '-'}")

    emit(doc, as_json, human)


@versions.command(
    "diff", epilog=example(f"iterdpo --catalog {QUICKSTART_CATALOG} versions diff prompts:1:train prompts:2:train")
)
@click.argument("a")
@click.argument("b")
@click.option("--limit", type=int, default=10, show_default=True, help="Keys shown per category (human output).")
@json_option
@click.pass_obj
def versions_diff(state: State, a: str, b: str, limit: int, as_json: bool) -> None:
    """Rows added, removed and changed (same key, other content) from snapshot A to snapshot B."""
    result = state.catalog().require().diff(a, b)

    def human() -> None:
        click.echo(
            f"{result['a'][:12]} -> {result['b'][:12]} ({result['kind']}, key {', '.join(result['key'])}): "
            f"{len(result['added'])} added, {len(result['removed'])} removed, "
            f"{len(result['changed'])} changed, {result['unchanged']} unchanged"
        )
        for name, sign in (("added", "+"), ("removed", "-"), ("changed", "~")):
            for key in result[name][:limit]:
                click.echo(f"  {sign} {' '.join(str(v) for v in key.values())}")
            if len(result[name]) > limit:
                click.echo(f"  {sign} ... {len(result[name]) - limit} more")

    emit(result, as_json, human)


@versions.command(
    "tag", epilog=example(OWN_CATALOG, "iterdpo --catalog my.duckdb versions tag pairs:1:train quickstart-it1")
)
@click.argument("ref")
@click.argument("name")
@click.option("--force", is_flag=True, help="Move the tag if it already names another snapshot.")
@json_option
@click.pass_obj
def versions_tag(state: State, ref: str, name: str, force: bool, as_json: bool) -> None:
    """Name snapshot REF with tag NAME (usable wherever an id is).

    A name that reads as a selector (prompts, pairs:1:train) or as an id prefix (4+ hex characters) is refused.
    """
    snap = state.catalog().tag(ref, name, force)
    emit(snap.to_json(), as_json, lambda: click.echo(f"tagged {snap.id[:12]} as {name}"))


@versions.command(
    "export", epilog=example(f"iterdpo --catalog {QUICKSTART_CATALOG} versions export pairs:1:train pairs-1.parquet")
)
@click.argument("ref")
@click.argument("path", type=click.Path(dir_okay=False))
@json_option
@click.pass_obj
def versions_export(state: State, ref: str, path: str, as_json: bool) -> None:
    """Write a snapshot's rows to PATH: Parquet, or JSON Lines when PATH ends in .jsonl."""
    from builders.export import export_snapshot

    result = export_snapshot(state.catalog().require(), ref, Path(path))
    emit(result, as_json, lambda: click.echo(f"wrote {result['rows']} rows of {result['id'][:12]} to {result['path']}"))


@versions.command("verify", epilog=example(f"iterdpo --catalog {QUICKSTART_CATALOG} versions verify"))
@json_option
@click.pass_obj
def versions_verify(state: State, as_json: bool) -> None:
    """Recompute every snapshot id from its stored rows; exit 1 on any mismatch."""
    report = state.catalog().require().verify()
    emit(
        report,
        as_json,
        lambda: click.echo(
            f"{report['snapshots']} snapshots verified in {report['catalog']}: "
            + ("ok" if report["ok"] else "PROBLEMS\n  " + "\n  ".join(report["problems"]))
            + (
                f" ({report['unreferenced_rows']} rows of interrupted registrations belong to no snapshot; a retry "
                f"reuses them, `iterdpo versions gc` removes them)"
                if report["unreferenced_rows"]
                else ""
            )
        ),
    )
    if not report["ok"]:
        sys.exit(1)


@versions.command("gc", epilog=example(f"iterdpo --catalog {QUICKSTART_CATALOG} versions gc --dry-run"))
@click.option("--dry-run", is_flag=True, help="Count what would be removed; change nothing.")
@json_option
@click.pass_obj
def versions_gc(state: State, dry_run: bool, as_json: bool) -> None:
    """Remove stored rows that belong to no snapshot (left by interrupted registrations).

    Rows of work in progress are kept (a rerun resumes from them); every snapshot reads as before. The file does
    not shrink: DuckDB reuses the freed space for later rows.
    """
    report = state.catalog().require().gc(dry_run)

    def human() -> None:
        kinds = ", ".join(f"{n} {k}" for k, n in report["rows_removed_by_kind"].items() if n) or "none"
        verb = "would remove" if dry_run else "removed"
        click.echo(
            f"{verb} {report['rows_removed']} rows that belong to no snapshot ({kinds})"
            + (
                ""
                if dry_run
                else f"; {report['bytes_freed']:,} bytes freed for reuse in {report['catalog']} "
                f"({report['file_bytes']:,} bytes)"
            )
        )

    emit(report, as_json, human)


@versions.command("merge", epilog=example(f"iterdpo --catalog my.duckdb versions merge {QUICKSTART_CATALOG}"))
@click.argument("catalogs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@json_option
@click.pass_obj
def versions_merge(state: State, catalogs: tuple[str, ...], as_json: bool) -> None:
    """Copy snapshots, rows, tags and work from other catalog files into this one (idempotent).

    Shards of a long stage run on copies of the catalog; merging them brings their work back. Every source is
    checked first: if one is not a readable catalog, nothing is merged.
    """
    report = state.catalog().merge(catalogs)

    def human() -> None:
        for m in report["merged"]:
            click.echo(
                f"merged {m['source']}: {m['snapshots']} snapshots, {m['rows']} rows, {m['tags']} tags, "
                f"{m['work_units']} work units"
            )
            if m["tag_conflicts_kept_ours"]:
                click.echo(f"  kept our tags where both differ: {', '.join(m['tag_conflicts_kept_ours'])}")

    emit(report, as_json, human)
