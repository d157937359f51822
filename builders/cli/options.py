"""Options built from the config fields: the default and the help text live on the field (builders/config.py),
so `--help`, the Python API and the pipeline YAML cannot disagree."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import click


def example(*commands: str) -> str:
    """A help epilog: every command's --help ends with an example that runs as written after `make quickstart`
    (tests/test_examples.py runs each): it reads the quickstart's catalog and models and writes only new paths,
    never over the quickstart's results. One command per line, run in order."""
    return "\b\nExample:\n" + "\n".join(f"  {c}" for c in commands)


# the quickstart's catalog, read by the examples; a stage's example writes to a copy of its own instead
QUICKSTART_CATALOG = "quickstart/catalog.duckdb"
OWN_CATALOG = f"iterdpo --catalog my.duckdb versions merge {QUICKSTART_CATALOG}   # the quickstart's snapshots, in a catalog of your own"


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(f)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name}")


def _click_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        tp = args[0]
    if tp is Path:
        return click.Path(dir_okay=False, path_type=Path)
    return tp if tp in (int, float, str) else None


def field_option(cls: type, name: str, *decls: str, choices: tuple[str, ...] | None = None, **overrides: Any):
    """`click.option` for field `name` of config `cls`: flag `--name-with-dashes` (or `decls`), the field's
    default (shown) and help. A bool field with a False default becomes a flag."""
    f = _field(cls, name)
    hints = typing.get_type_hints(cls)
    default = f.default if f.default is not dataclasses.MISSING else None
    kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": default}
    if hints[name] is bool and default is False:
        kw["is_flag"] = True
    else:
        kw["show_default"] = default is not None
        if choices:
            kw["type"] = click.Choice(choices)
        elif (tp := _click_type(hints[name])) is not None:
            kw["type"] = tp
    kw.update(overrides)
    return click.option(*(decls or (flag_name(name),)), name, **kw)


def config_from(cls: type, values: dict[str, Any]) -> Any:
    """Config `cls`, nested configs included, from a command's parsed options (builders.config.build_config: the
    reflection the pipeline YAML uses too); an option left unset keeps the config's default."""
    from builders.config import build_config

    return build_config(cls, values, flat=True)


def compose(*decorators):
    """Several option decorators as one (applied so that --help lists them in the given order)."""

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def sampling_options(num_responses_default: int | None = None):
    from builders.config import SamplingConfig

    extra = {"default": num_responses_default} if num_responses_default is not None else {}
    return compose(
        field_option(SamplingConfig, "num_responses", **extra),
        *(field_option(SamplingConfig, n) for n in ("temperature", "top_p", "max_tokens", "seed")),
    )


def backend_options():
    """The generation backend and its engines' options (vllm, openai)."""
    from builders.config import BACKENDS, GenerateConfig, OpenAIConfig, VllmConfig

    return compose(
        field_option(GenerateConfig, "backend", choices=BACKENDS),
        field_option(GenerateConfig, "chat_template"),
        field_option(GenerateConfig, "batch_prompts"),
        *(
            field_option(VllmConfig, n)
            for n in (
                "tensor_parallel_size",
                "dtype",
                "max_model_len",
                "gpu_memory_utilization",
                "enforce_eager",
                "max_num_seqs",
                "cpu_threads",
            )
        ),
        field_option(OpenAIConfig, "base_url"),
        *(field_option(OpenAIConfig, n) for n in ("api_key_env", "concurrency", "max_retries", "request_timeout")),
    )


def executor_options():
    """Where the model work runs: this process, or replicas on Ray (builders/backends/ray.py)."""
    from builders.config import EXECUTORS, ExecutorConfig

    return compose(
        field_option(ExecutorConfig, "executor", choices=EXECUTORS),
        field_option(ExecutorConfig, "replicas"),
        field_option(ExecutorConfig, "ray_address"),
    )


def ranker_options(with_batches: bool = True):
    from builders.config import RANKERS, RankConfig

    names = ("device", "dtype", "batch_prompts", "batch_tokens") if with_batches else ()
    return compose(
        field_option(RankConfig, "ranker", choices=RANKERS),
        field_option(RankConfig, "ranker_model"),
        *(field_option(RankConfig, n) for n in names),
    )


def judge_options():
    """The judge ranker's options (builders/judge.py) and its openai server's."""
    from builders.config import BACKENDS, OpenAIConfig, RankConfig
    from builders.judge import JUDGE_MODES

    return compose(
        field_option(RankConfig, "judge_backend", choices=BACKENDS),
        field_option(RankConfig, "judge_template"),
        field_option(RankConfig, "judge_mode", choices=JUDGE_MODES),
        *(
            field_option(RankConfig, n)
            for n in ("judge_retries", "judge_temperature", "judge_max_tokens", "judge_seed")
        ),
        *(field_option(OpenAIConfig, n) for n in ("base_url", "api_key_env", "concurrency", "max_retries")),
    )
