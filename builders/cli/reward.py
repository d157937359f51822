"""`reward train` and `reward eval`: a reward model from your labels, and how well any scorer agrees with labels."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from builders.cli.app import State, cli, stage_output
from builders.cli.options import config_from, example, field_option, json_option, judge_options, ranker_options
from builders.cli.render import emit
from builders.config import RankConfig, RewardEvalConfig, RewardTrainConfig

PAIRS = "data/ultrafeedback_pairs.jsonl"  # 200 real UltraFeedback pairs, bundled (data/README.md)
REWARD_TRAIN = (
    f"iterdpo --catalog my.duckdb reward train --data {PAIRS} --base quickstart/models/smollm2 "
    "--output-dir models/my-reward"
)
REWARD_EVAL = (
    f"iterdpo --catalog my.duckdb reward eval --data {PAIRS} --ranker python "
    "--ranker-model builders.rewards:complete_concise_answer"
)


@cli.group("reward", epilog=example(REWARD_EVAL))
def reward() -> None:
    """Build your own reward: train a reward model on labelled pairs, and measure how well any scorer (pairrm,
    scalar, python, or a weighted combination) agrees with held-out labels before an iteration is spent on it."""


@reward.command("train", epilog=example(REWARD_TRAIN, "iterdpo --catalog my.duckdb reward eval --data reward"))
@field_option(RewardTrainConfig, "data", required=True)
@field_option(RewardTrainConfig, "base")
@field_option(RewardTrainConfig, "output_dir", type=click.Path(file_okay=False, path_type=Path))
@field_option(RewardTrainConfig, "recipe")
@field_option(RewardTrainConfig, "eval_fraction")
@field_option(RewardTrainConfig, "overwrite")
@field_option(RewardTrainConfig, "threads")
@json_option
@click.pass_obj
def train_cmd(state: State, as_json: bool, **options) -> None:
    """Train a reward model on preference pairs with TRL's RewardTrainer; register a `reward` snapshot.

    Pairs with equal scores (ties) are dropped and counted; --eval-fraction of the prompts (all their pairs) are
    held out, and the trained model's accuracy on them is recorded (see it again with `reward eval --data
    REWARD_SNAPSHOT`). The saved folder loads with AutoModelForSequenceClassification and is a `--ranker scalar
    --ranker-model DIR` for `rank`. The snapshot's parent is the data: the catalog snapshot named, or the file's
    pairs, registered as a `preferences` snapshot.
    """
    from builders.reward_train import counts_line, train_reward

    cfg = config_from(RewardTrainConfig, {**options, "trainer_logs": state.debug})
    with stage_output(state.debug):
        result = train_reward(state.catalog(), cfg)

    def human() -> None:
        m = result.metrics
        if result.resumed:
            click.echo(f"the reward model of this training is already in {result.output_dir} (weights verified)")
        else:
            loss = m.get("train_loss")
            click.echo(
                f"trained on {counts_line(m)}: reward model in {result.output_dir}"
                + (f", train loss {loss:.4f}" if loss is not None else "")
            )
        held = m.get("heldout")
        if held and held.get("accuracy") is not None:
            click.echo(
                f"held-out accuracy {held['accuracy']:.3f} +/- {held['standard_error']:.3f} on {held['pairs']} pairs"
                + (f" ({held['ties']} scored as ties)" if held["ties"] else "")
                + ("" if held["accuracy"] - 2 * held["standard_error"] > 0.5 else "; not above chance (0.5) by 2 se")
            )
        if result.snapshot:
            click.echo(f"reward snapshot {result.snapshot.id[:12]} (data {result.data_snapshot[:12]})")

    emit(result.to_json(), as_json, human)


@reward.command(
    "eval",
    epilog=example(
        REWARD_EVAL,
        f"iterdpo --catalog my.duckdb reward eval --data {PAIRS} --ranker-spec "
        "python:builders.rewards:complete_concise_answer=1 --ranker-spec python:tests.scorers:longer_is_better=0.5",
    ),
)
@field_option(RewardEvalConfig, "data", required=True)
@ranker_options(with_batches=False)
@field_option(RankConfig, "device")
@judge_options()
@click.option(
    "--ranker-spec",
    "specs",
    multiple=True,
    metavar="KIND:MODEL=WEIGHT",
    help="A component of a combination (repeatable), e.g. scalar:models/my-reward=1 or "
    "python:builders.rewards:complete_concise_answer=0.5; instead of --ranker.",
)
@field_option(RewardEvalConfig, "method", type=click.Choice(("zscore", "rank", "weighted-sum")))
@json_option
@click.pass_obj
def eval_cmd(state: State, data: str, specs: tuple[str, ...], method: str, as_json: bool, **options) -> None:
    """How often a scorer agrees with labelled pairs: pairwise accuracy with its standard error, scorer ties
    counted apart, and how often it prefers the longer answer (and how often the labels do).

    --data is a preference file or dataset, a pairs/preferences snapshot, or a reward snapshot (then the pairs it
    held out, scored by that model unless --ranker is given). Pairs whose labels tie are dropped and counted.
    Several --ranker-spec combine as `combine` does (--method; zscore: each scorer standardised over all answers,
    then the weighted sum).
    """
    from builders.reward_eval import eval_reward, parse_spec

    ctx = click.get_current_context()
    explicit = ctx.get_parameter_source("ranker") != ParameterSource.DEFAULT
    options.setdefault("judge_vllm", RankConfig.__dataclass_fields__["judge_vllm"].default)  # as rank: eager on CPU
    base = config_from(RankConfig, options)
    components = tuple(parse_spec(s, base) for s in specs)
    if components and explicit:
        raise click.UsageError("give --ranker or --ranker-spec, not both")
    cfg = RewardEvalConfig(data=data, ranker=base if explicit else None, components=components, method=method)
    with stage_output(state.debug):
        report = eval_reward(state.catalog(), cfg, progress=not as_json)

    def human() -> None:
        scorer = (
            " + ".join(f"{c['weight']:g} x {c['ranker']}:{c['ranker_model']}" for c in report["components"])
            + f" ({report['method']})"
            if "components" in report
            else f"{report['ranker']}:{report['ranker_model']}"
        )
        click.echo(f"{scorer} on {report['pairs']} labelled pairs of {report['data']}")
        if report["accuracy"] is None:
            click.echo(f"accuracy: none (the scorer tied every pair: {report['ties']})")
        else:
            above = report["accuracy"] - 2 * report["standard_error"] > 0.5
            click.echo(
                f"accuracy {report['accuracy']:.3f} +/- {report['standard_error']:.3f} "
                f"({report['wins']} agree, {report['losses']} disagree, {report['ties']} ties counted apart"
                + (f", {report['unscored']} unscored by the judge" if report["unscored"] else "")
                + "); "
                f"{'above' if above else 'not above'} chance (0.5) by 2 se"
            )
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        click.echo(
            f"prefers the longer answer {fmt(report['prefers_longer'])} of the time (the labels: "
            f"{fmt(report['labels_prefer_longer'])})"
            + (f"; {report['label_ties_dropped']} label ties dropped" if report["label_ties_dropped"] else "")
        )

    emit(report, as_json, human)
