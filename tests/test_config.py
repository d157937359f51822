"""The configs' one reflection (builders.config.build_config) as the CLI and the pipeline YAML use it, and the
options built from config fields (builders.cli.options.field_option)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from builders.cli.options import config_from, field_option
from builders.config import GenerateConfig, OpenAIConfig, RankConfig, SamplingConfig, VllmConfig, build_config
from builders.errors import InputError


def test_flat_options_fill_nested_configs_and_unset_ones_keep_the_defaults():
    cfg = config_from(
        GenerateConfig,
        {
            "model": "m",
            "num_responses": 3,
            "temperature": None,
            "dtype": "float16",
            "executor": "ray",
            "replicas": 2,
            "iteration": 1,
            "as_json": False,
        },
    )
    assert cfg.model == "m" and cfg.sampling.num_responses == 3
    assert cfg.sampling.temperature == SamplingConfig().temperature  # None: the option was not given
    assert cfg.vllm == VllmConfig(dtype="float16")
    assert (cfg.scale_out.executor, cfg.scale_out.replicas) == ("ray", 2)


def test_a_pipeline_section_and_the_same_options_give_the_same_config():
    yaml_like = {
        "model": "m",
        "backend": "vllm",
        "sampling": {"num_responses": 3, "max_tokens": 64},
        "vllm": {"enforce_eager": True},
        "scale_out": {"executor": "ray", "replicas": 2},
    }
    flat = {
        "model": "m",
        "backend": "vllm",
        "num_responses": 3,
        "max_tokens": 64,
        "enforce_eager": True,
        "executor": "ray",
        "replicas": 2,
    }
    assert build_config(GenerateConfig, yaml_like, "p.yaml: generation") == config_from(GenerateConfig, flat)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"sampling": {"num_respones": 3}}, "p.yaml: generation.sampling: unknown key 'num_respones'"),
        ({"sampling": {"num_responses": "3"}}, "p.yaml: generation.sampling.num_responses must be int, not '3'"),
        ({"sampling": {"num_responses": True}}, "must be int, not True"),
        ({"splits": "train"}, "p.yaml: generation.splits must be a list"),
        ({"sampling": 3}, "p.yaml: generation.sampling: expected a mapping"),
    ],
)
def test_pipeline_values_of_the_wrong_shape_name_their_key(data, message):
    with pytest.raises(InputError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_config(GenerateConfig, data, "p.yaml: generation")


def test_the_openai_url_comes_from_the_environment_in_the_library_too(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://10.0.0.9:9000/v1")
    assert OpenAIConfig().base_url == "http://10.0.0.9:9000/v1"
    assert GenerateConfig().openai.base_url == "http://10.0.0.9:9000/v1"
    assert build_config(GenerateConfig, {}, "p").openai.base_url == "http://10.0.0.9:9000/v1"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert OpenAIConfig(base_url="http://h:1/v1").base_url == "http://h:1/v1"
    assert OpenAIConfig().base_url == "http://127.0.0.1:8000/v1"


def test_field_option_takes_the_fields_default_type_and_help():
    @click.command()
    @field_option(SamplingConfig, "temperature")
    @field_option(RankConfig, "batch_tokens")
    @field_option(VllmConfig, "enforce_eager")
    def show(**options):
        click.echo(repr(sorted(options.items())))

    runner = CliRunner()
    help_text = runner.invoke(show, ["--help"]).output
    assert "--temperature FLOAT" in help_text and f"[default: {SamplingConfig().temperature}]" in help_text
    assert SamplingConfig.__dataclass_fields__["temperature"].metadata["help"].split()[0] in help_text
    assert "--enforce-eager " in help_text  # a False bool is a flag
    got = runner.invoke(show, []).output
    assert f"('temperature', {SamplingConfig().temperature})" in got and "('batch_tokens', None)" in got
    assert "('enforce_eager', False)" in got
    bad = runner.invoke(show, ["--temperature", "hot"])
    assert bad.exit_code == 2 and "'hot' is not a valid float" in bad.output
