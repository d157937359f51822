"""`prompts`: the prompt pool and the disjoint per-iteration prompt sets drawn from it."""

from __future__ import annotations

import click

from builders.cli.app import State, cli
from builders.cli.options import example, field_option, json_option
from builders.cli.render import emit, print_snapshots
from builders.config import SplitConfig


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
@json_option
@click.pass_obj
def prompts_import(state: State, source: str, column: str | None, as_json: bool) -> None:
    """Import prompts from SOURCE into a `prompts` pool snapshot.

    SOURCE is a local .jsonl/.json/.parquet/.csv file, a dataset folder, or a Hub dataset id with an optional
    split (openbmb/UltraFeedback, HuggingFaceH4/ultrafeedback_binarized:train_prefs). Prompts are
    whitespace-stripped, empty and null ones skipped, duplicates dropped (prompt_id = sha256 of the text).
    Importing the same prompts again is a no-op that returns the same snapshot.

    A conversation (OpenAI/TRL messages: an optional leading system message, then user and assistant turns
    alternating, ending with a user turn) is a prompt too; its id is the sha256 of its canonical form (README).
    """
    from builders.prompts import import_prompts

    result = import_prompts(state.catalog(), source, column)

    def human() -> None:
        click.echo(
            f"imported {result.snapshot.rows} prompts from {source} (column {result.column!r}): "
            f"{result.read} read, {result.skipped_empty} empty or null skipped, {result.duplicates} duplicates"
            + (f", {result.conversations} conversations" if result.conversations else "")
        )
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
