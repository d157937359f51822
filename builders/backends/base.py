"""What every generation backend speaks: requests in, samples out, sampling passed with every call.

The backends (transformers and vLLM in builders/generate.py, OpenAI-compatible servers in
builders/openai_backend.py) implement `Generator`; the generation stage drives any of them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from builders.config import SamplingConfig
from builders.errors import InputError


@dataclass
class Request:
    prompt_id: str
    prompt: str
    seed: int
    text: str | None = None  # rendered with the chat template (transformers / vllm)
    token_ids: list[int] | None = None
    prompt_tokens: int | None = None


@dataclass
class Sample:
    text: str
    finish_reason: str
    completion_tokens: int | None


class Generator(Protocol):
    """A backend. `prepare` renders prompts (a Request, or why the prompt is skipped); `generate` returns
    `sampling.num_responses` samples per request (an empty list: the server refused the prompt as too long).
    Sampling is passed with every call, so what a stage records is what the engine ran."""

    def prepare(self, prompts: Sequence[tuple[str, str, int]], sampling: SamplingConfig) -> list[Request | str]: ...

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Sample]]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def call_sampling(given: SamplingConfig | None, default: SamplingConfig | None) -> SamplingConfig:
    """The call's sampling; the one a generator was built with only when a direct caller passes none."""
    chosen = given if given is not None else default
    if chosen is None:
        raise InputError("no sampling settings: pass a SamplingConfig to generate()/prepare()")
    return chosen
