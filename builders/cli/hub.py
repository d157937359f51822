"""`publish` and `publish-model`: the Hub."""

from __future__ import annotations

from pathlib import Path

import click

from builders.cli.app import State, cli
from builders.cli.options import QUICKSTART_CATALOG, compose, config_from, example, field_option, json_option
from builders.cli.render import emit
from builders.config import PublishConfig, PublishModelConfig, validate_publish
from builders.config import check_license as config_check_license
from builders.errors import InputError


def repo_options(config: type):
    """The staging and Hub options that publish and publish-model share (their configs have the same fields)."""
    return compose(
        field_option(config, "local_dir", type=click.Path(file_okay=False, path_type=Path)),
        *(field_option(config, name) for name in ("dry_run", "private", "revision")),
        field_option(config, "license", "--license"),
    )


# ---------------------------------------------------------------------------------------------------------- publish
@cli.command(
    "publish",
    epilog=example(
        f"iterdpo --catalog {QUICKSTART_CATALOG} publish me/iterdpo-quickstart --iterations 1 --local-dir staged --dry-run"
    ),
)
@click.argument("repo_id")
@click.option("--iterations", default=None, help="Comma-separated iterations, e.g. 1,2,3 (default: every built one).")
@repo_options(PublishConfig)
@json_option
@click.pass_obj
def publish_cmd(state: State, repo_id: str, iterations: str | None, as_json: bool, **options) -> None:
    """Publish the built pairs as a Hub dataset repo: configs `default` and `trl`, splits train_iteration_N /
    test_iteration_N, a dataset card with the recipe, statistics and plots.

    One commit, tagged with the snapshot set id; publishing the same snapshots again is a no-op (and so is staging
    them into the same --local-dir again). The token comes
    from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.
    """
    from builders.publish import publish

    its = None
    if iterations is not None:  # given: an empty list (",,") is an error of its own, not "every iteration"
        try:
            its = tuple(int(x) for x in iterations.split(",") if x.strip())
        except ValueError:
            raise click.BadParameter(
                f"{iterations!r} is not a comma-separated list of numbers", param_hint="--iterations"
            ) from None
    check_license(options["license"])
    cfg = config_from(PublishConfig, {**options, "repo_id": repo_id, "iterations": its})
    validate_publish(cfg)
    result = publish(state.catalog(), cfg)
    _print_publication(result, repo_id, cfg.revision, as_json)


def check_license(license_: str) -> None:
    """The library's rule (builders/config.py), as a usage error of the flag."""
    try:
        config_check_license(license_)
    except InputError:
        raise click.BadParameter(
            f"{license_!r} is not a licence id (e.g. apache-2.0, mit, cc-by-4.0)", param_hint="--license"
        ) from None


def _print_publication(result, repo_id: str, revision: str, as_json: bool) -> None:
    def human() -> None:
        if result.staged.folder is not None:
            click.echo(
                f"staged {len(result.staged.files)} files in {result.staged.folder} "
                f"(snapshot set {result.staged.set_id[:12]})"
            )
        if result.dry_run:
            click.echo("dry run: nothing uploaded")
        elif result.already_published:
            click.echo(f"already published to {repo_id}@{revision} as commit {result.commit}: nothing to do")
        else:
            click.echo(f"published {repo_id}@{revision}: commit {result.commit}, tag {result.tag}")

    emit(result.to_json(), as_json, human)


@cli.command(
    "publish-model",
    epilog=example(
        f"iterdpo --catalog {QUICKSTART_CATALOG} publish-model me/smollm2-iterdpo-it1 --iteration 1 --local-dir staged-model "
        "--dry-run"
    ),
)
@click.argument("repo_id")
@click.option("--iteration", type=int, required=True, help="Publish the model trained on this iteration's pairs.")
@field_option(PublishModelConfig, "dataset_repo")
@field_option(PublishModelConfig, "base_model")
@repo_options(PublishModelConfig)
@json_option
@click.pass_obj
def publish_model_cmd(state: State, repo_id: str, iteration: int, as_json: bool, **options) -> None:
    """Publish the trained model of an iteration as a Hub model repo: weights (safetensors), config, tokenizer,
    chat template, and a model card with its lineage (base -> iteration 1 -> ...), the pairs snapshots and
    dataset commit it learned from, the recipe as trained and the catalog's evaluation.

    One commit, tagged; publishing the same model again is a no-op. The token comes from HF_TOKEN or
    `hf auth login`; HF_ENDPOINT selects another Hub.
    """
    from builders.publish_model import publish_model

    check_license(options["license"])
    cfg = config_from(PublishModelConfig, {**options, "repo_id": repo_id})
    validate_publish(cfg)
    result = publish_model(state.catalog(), iteration, cfg)
    _print_publication(result, repo_id, cfg.revision, as_json)
