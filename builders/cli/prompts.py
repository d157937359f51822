"""`prompts`: the prompt pool and the disjoint per-iteration prompt sets drawn from it."""

from __future__ import annotations

import click

from builders.cli.app import State, cli
from builders.cli.options import OWN_CATALOG, example, field_option, json_option
from builders.cli.render import emit, print_snapshots
from builders.config import DecontaminateConfig, DedupConfig, SplitConfig


# ---------------------------------------------------------------------------------------------------------- prompts
@cli.group(epilog=example("iterdpo prompts import data/ultrafeedback_sample.jsonl"))
def prompts() -> None:
    """Import a prompt pool and draw disjoint per-iteration prompt sets."""


@prompts.command("import", epilog=example("iterdpo prompts import data/ultrafeedback_sample.jsonl --column prompt"))
@click.argument("source")
@click.option(
    "--column",
    default=None,
    help="Column holding the prompt: text, or a conversation (a list of {role, content}) (default: the first of "
    "prompt, instruction, question, query, input, text, messages).",
)
@click.option(
    "--exclude-source",
    "exclude_sources",
    multiple=True,
    metavar="NAME",
    help="Drop the prompts whose `source` column is NAME (repeatable; e.g. truthful_qa in UltraFeedback).",
)
@click.option(
    "--include-source",
    "include_sources",
    multiple=True,
    metavar="NAME",
    help="Keep only the prompts whose `source` column is NAME (repeatable).",
)
@json_option
@click.pass_obj
def prompts_import(
    state: State,
    source: str,
    column: str | None,
    exclude_sources: tuple[str, ...],
    include_sources: tuple[str, ...],
    as_json: bool,
) -> None:
    """Import prompts from SOURCE into a `prompts` pool snapshot.

    SOURCE is a local .jsonl/.json/.parquet/.csv file, a dataset folder, or a Hub dataset id with an optional
    split (openbmb/UltraFeedback, HuggingFaceH4/ultrafeedback_binarized:train_prefs). Prompts are
    whitespace-stripped, empty and null ones skipped, duplicates dropped (prompt_id = sha256 of the text).
    Importing the same prompts again is a no-op that returns the same snapshot.

    A conversation (OpenAI/TRL messages: an optional leading system message, then user and assistant turns
    alternating, ending with a user turn) is a prompt too; its id is the sha256 of its canonical form (README).
    """
    from builders.prompts import import_prompts

    result = import_prompts(state.catalog(), source, column, include_sources, exclude_sources)

    def human() -> None:
        click.echo(
            f"imported {result.snapshot.rows} prompts from {source} (column {result.column!r}): "
            f"{result.read} read, {result.skipped_empty} empty or null skipped, {result.duplicates} duplicates"
            + (f", {result.conversations} conversations" if result.conversations else "")
        )
        if result.by_source:
            dropped = ", ".join(f"{k} {v}" for k, v in result.by_source["excluded_by_source"].items())
            click.echo(f"left out by source: {dropped or 'none'}")
        click.echo(f"snapshot {result.snapshot.id}")

    emit(result.to_json(), as_json, human)


@prompts.command(
    "split",
    epilog=example(
        "iterdpo prompts import data/ultrafeedback_sample.jsonl",
        "iterdpo prompts split --iterations 3 --train-size 40 --test-size 10 --seed 42",
    ),
)
@field_option(SplitConfig, "iterations")
@field_option(SplitConfig, "train_size")
@field_option(SplitConfig, "test_size")
@field_option(SplitConfig, "seed")
@click.option(
    "--from", "from_refs", multiple=True, help="Pool snapshot(s) to draw from (repeatable; default: the newest pool)."
)
@json_option
@click.pass_obj
def prompts_split(
    state: State, iterations: int, train_size: int, test_size: int, seed: int, from_refs: tuple[str, ...], as_json: bool
) -> None:
    """Draw train and test prompt sets for each iteration, disjoint across iterations and splits.

    Deterministic for a seed: the same pool and options give the same snapshot ids.
    """
    from builders.prompts import split_prompts

    snaps = split_prompts(state.catalog(), SplitConfig(iterations, train_size, test_size, seed), from_refs)
    emit([s.to_json() for s in snaps], as_json, lambda: print_snapshots(snaps))


def _clip(text: str, width: int = 100) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


@prompts.command(
    "decontaminate",
    epilog=example(
        OWN_CATALOG,
        "iterdpo --catalog my.duckdb prompts decontaminate --against data/benchmarks/mt_bench.jsonl "
        "--against data/benchmarks/vicuna_bench.jsonl",
    ),
)
@click.option(
    "--against",
    "against",
    multiple=True,
    required=True,
    metavar="SOURCE",
    help="A benchmark's prompts, read as `prompts import` reads a source (file, folder, hub id[:split]); repeatable.",
)
@click.option("--column", default=None, help="The benchmarks' prompt column (default: as `prompts import` picks it).")
@field_option(DecontaminateConfig, "containment")
@field_option(DecontaminateConfig, "coverage")
@click.option("--from", "from_ref", default=None, help="The pool to clean (default: the newest pool).")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; register nothing.")
@json_option
@click.pass_obj
def prompts_decontaminate(
    state: State,
    against: tuple[str, ...],
    column: str | None,
    containment: float,
    coverage: float,
    from_ref: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove from the prompt pool the prompts that are, or lightly paraphrase, a benchmark's prompts.

    The match is lexical (content words weighted by rarity; numbers, inflections and common synonyms normalised;
    word order ignored): see the README's "Clean prompts" section for what it catches and misses. The cleaned
    pool is registered with the pool it cleaned as its parent and, in its params, each benchmark's rows and
    content hash, the method and thresholds and every removed prompt with its match; `prompts split` then draws
    from it. Nothing matched: the pool and its id are unchanged.
    """
    from builders.decontaminate import METHOD, decontaminate

    cfg = DecontaminateConfig(containment, coverage)
    result = decontaminate(state.catalog(), against, cfg, column, from_ref, dry_run)

    def human() -> None:
        click.echo(
            f"pool {result.pool.id[:12]} ({result.pool.rows} prompts) against {len(result.benchmarks)} "
            f"benchmark(s): {result.removed} prompt(s) match ({METHOD}; containment {cfg.containment}, "
            f"coverage {cfg.coverage})"
        )
        for bench, found in zip(result.benchmarks, result.by_benchmark().values()):
            click.echo(f"{bench.source}: {bench.rows} prompts, sha256 {bench.sha256[:12]}: {len(found)} removed")
            for m in found:
                click.echo(f"  - {_clip(m.prompt)}")
                click.echo(
                    f"    ~ {_clip(m.benchmark_prompt)}  (containment {m.containment:.2f}, coverage {m.coverage:.2f})"
                )
        if dry_run:
            click.echo("dry run: nothing registered")
        elif result.snapshot.id == result.pool.id:
            click.echo(f"nothing removed: the pool is unchanged, snapshot {result.pool.id}")
        else:
            click.echo(
                f"registered pool {result.snapshot.id} ({result.snapshot.rows} prompts), from {result.pool.id[:12]}"
            )

    emit(result.to_json(), as_json, human)


@prompts.command(
    "dedup",
    epilog=example(OWN_CATALOG, "iterdpo --catalog my.duckdb prompts dedup --threshold 0.8"),
)
@field_option(DedupConfig, "threshold")
@field_option(DedupConfig, "num_perm")
@click.option("--from", "from_ref", default=None, help="The pool to deduplicate (default: the newest pool).")
@click.option("--dry-run", is_flag=True, help="Report the groups; register nothing.")
@json_option
@click.pass_obj
def prompts_dedup(
    state: State, threshold: float, num_perm: int, from_ref: str | None, dry_run: bool, as_json: bool
) -> None:
    """Remove near-duplicate prompts from the prompt pool, keeping one per group (the smallest prompt_id).

    Near-duplicates: the same text up to case, whitespace and punctuation, or word 3-gram shingles with a Jaccard
    similarity of at least --threshold (MinHash LSH candidates, each verified exactly). The new pool's parent is
    the pool it read; its params hold the counts and every group. Nothing found: the pool and its id are unchanged.
    """
    from builders.dedup import dedup

    catalog = state.catalog()
    result = dedup(catalog, DedupConfig(threshold, num_perm), from_ref, dry_run)
    texts = None
    if result.groups:
        pool = catalog.read(result.pool.id)
        texts = dict(zip(pool.column("prompt_id").to_pylist(), pool.column("prompt").to_pylist()))

    def human() -> None:
        click.echo(
            f"pool {result.pool.id[:12]} ({result.pool.rows} prompts): {len(result.groups)} group(s) of "
            f"near-duplicates (threshold {threshold}), {result.removed} prompt(s) removed"
        )
        for g in result.groups:
            click.echo(f"  kept    {_clip(texts[g[0]])}")
            for pid in g[1:]:
                click.echo(f"  removed {_clip(texts[pid])}")
        if dry_run:
            click.echo("dry run: nothing registered")
        elif result.snapshot.id == result.pool.id:
            click.echo(f"nothing removed: the pool is unchanged, snapshot {result.pool.id}")
        else:
            click.echo(
                f"registered pool {result.snapshot.id} ({result.snapshot.rows} prompts), from {result.pool.id[:12]}"
            )

    emit(result.to_json(texts), as_json, human)
