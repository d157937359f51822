"""`best-of-n` and `eval`: a model's answers, selected by a ranker, and AlpacaEval-style figures."""

from __future__ import annotations

from pathlib import Path

import click

from builders.cli.app import cli, debug_flag, stage_output
from builders.cli.options import (
    QUICKSTART_CATALOG,
    backend_options,
    config_from,
    example,
    executor_options,
    field_option,
    json_option,
    ranker_options,
    sampling_options,
)
from builders.cli.render import emit
from builders.config import BEST_OF_N, BestOfNConfig, GenerateConfig, RankConfig

# the quickstart's held-out prompts (the final model's evaluation block, which no iteration trained on) as a file
TEST_PROMPTS = f"iterdpo --catalog {QUICKSTART_CATALOG} versions export prompts:4:test test-prompts.jsonl"
BEST_OF_16 = (
    "iterdpo best-of-n --model quickstart/models/iteration_3 --prompts test-prompts.jsonl --num-responses 16 "
    "--max-tokens 64 --ranker python --ranker-model builders.rewards:complete_concise_answer "
    "--output model_outputs.json"
)
# the final model's greedy answers to them (one each: nothing to rank), for eval
GREEDY = (
    "iterdpo best-of-n --model quickstart/models/iteration_3 --prompts test-prompts.jsonl --num-responses 1 "
    "--temperature 0 --max-tokens 64 --ranker python --ranker-model builders.rewards:complete_concise_answer "
    "--output greedy_outputs.json"
)


# ------------------------------------------------------------------------------------------------ best-of-n and eval
@cli.command("best-of-n", epilog=example(TEST_PROMPTS, BEST_OF_16))
@click.option("--model", required=True, help="Policy folder or hub id.")
@click.option(
    "--prompts",
    "prompts_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Prompt file (.jsonl/.json/.parquet/.csv; AlpacaEval's `instruction` column works).",
)
@sampling_options(num_responses_default=BEST_OF_N)
@backend_options()
@field_option(BestOfNConfig, "column")
@ranker_options(with_batches=False)
@field_option(BestOfNConfig, "generator_name")
@executor_options()
@click.option(
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="model_outputs.json to write (its folder must exist); the sidecar OUTPUT_STEM.candidates.jsonl "
    "goes beside it.",
)
@json_option
def best_of_n_cmd(
    model: str, prompts_file: str, output: str, column: str | None, generator_name: str | None, as_json: bool, **options
) -> None:
    """Generate N responses per prompt and keep the ranker's best (PairRM best-of-16 lifted Snorkel's model on
    AlpacaEval 2.0 from 30.22 to 34.86); write AlpacaEval's model_outputs.json.

    One row per input row, scalar fields only: instruction and dataset exactly as the input has them (rows without
    a dataset get their `source`, else the prompt file's name), output, generator. Every candidate with its score
    goes to a sidecar beside it, OUTPUT_STEM.candidates.jsonl. Every option, the prompt file and the output folder
    are checked before any model is loaded.
    """
    from builders.evaluate import best_of_n

    cfg = BestOfNConfig(
        Path(prompts_file),
        Path(output),
        config_from(GenerateConfig, {**options, "model": model}),
        config_from(RankConfig, options),
        column,
        generator_name,
    )
    with stage_output(debug_flag()):
        result = best_of_n(cfg)
    emit(
        result,
        as_json,
        lambda: click.echo(
            f"wrote {result['prompts']} outputs of {result['generator']} to {result['output']} "
            f"(candidates and scores: {result['candidates']})"
            + (f"; {result['skipped_too_long']} prompts too long: empty output" if result["skipped_too_long"] else "")
            + (f"; {result['skipped_empty']} empty prompts left out" if result["skipped_empty"] else "")
        ),
    )


@cli.command("eval", epilog=example(TEST_PROMPTS, GREEDY, "iterdpo eval greedy_outputs.json"))
@click.argument("outputs", type=click.Path(dir_okay=False))
@click.option(
    "--reference",
    type=click.Path(dir_okay=False),
    default=None,
    help="Reference outputs (AlpacaEval format) to compare against with the ranker.",
)
@ranker_options(with_batches=False)
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

    report = evaluate(
        Path(outputs), Path(reference) if reference else None, RankConfig(ranker=ranker, ranker_model=ranker_model)
    )

    def human() -> None:
        for gen, st in report["length"].items():
            click.echo(
                f"{gen}: {st['n']} outputs, avg_length {st['avg_length']:.1f} characters "
                f"(median {st['median_length']:.0f})"
            )
        if "win_rate" in report:
            click.echo(
                f"vs {report['reference']} ({report['compared']} compared, {report['unmatched']} unmatched"
                + (f", {report['unscored']} unscored by the judge" if report.get("unscored") else "")
                + "): "
                f"win rate {report['win_rate']:.2f} +/- {report['standard_error']:.2f}, length-controlled "
                f"{report['length_controlled_win_rate']:.2f} +/- "
                f"{report['length_controlled_standard_error']:.2f} "
                f"(length weight {report['length_weight']:+.2f})"
            )

    emit(report, as_json, human)
