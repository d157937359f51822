"""What every backend speaks. Generators: requests in, samples out, sampling passed with every call
(transformers.py, vllm.py, openai.py). Rankers: prompts and their candidates in, one score per candidate out
(pairrm.py, llm_blender.py, scalar.py, python.py). The stages drive any of them the same way.
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
    prompt: str | list[dict[str, str]]  # a string, or a conversation (builders.conversation: messages, last a user's)
    seed: int
    text: str | None = None  # rendered with the chat template (transformers / vllm)
    token_ids: list[int] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # a server's total over all samples (openai `usage`), when given


@dataclass
class Sample:
    text: str
    finish_reason: str
    completion_tokens: int | None


class Generator(Protocol):
    """A backend. `prepare` renders prompts, each a string or a conversation (a Request, or why the prompt is
    skipped); `generate` returns
    `sampling.num_responses` samples per request (an empty list: the server refused the prompt as too long).
    Sampling is passed with every call, so what a stage records is what the engine ran."""

    def prepare(self, prompts: Sequence[tuple[str, str, int]], sampling: SamplingConfig) -> list[Request | str]: ...

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Sample]]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    # Optional: `stream(prompts, sampling)` over (prompt_id, prompt, seed) yields (Request, samples) as each answer
    # arrives, in any order, keeping requests in flight while the stage commits (the openai backend has it).


def call_sampling(given: SamplingConfig | None, default: SamplingConfig | None) -> SamplingConfig:
    """The call's sampling; the one a generator was built with only when a direct caller passes none."""
    chosen = given if given is not None else default
    if chosen is None:
        raise InputError("no sampling settings: pass a SamplingConfig to generate()/prepare()")
    return chosen


class Ranker(Protocol):
    """Scores for each prompt's candidates (higher is better). A prompt is a string, or a conversation (a list of
    {role, content} messages ending with the user turn the candidates answer; builders.conversation)."""

    def score(self, prompts: Sequence[Any], candidates: Sequence[Sequence[str]]) -> list[list[float]]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def unflatten(values: list[float], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
    """Flat scores (one per candidate, in order) -> one list per prompt."""
    out, at = [], 0
    for cands in candidates:
        out.append(values[at : at + len(cands)])
        at += len(cands)
    return out


def device_for(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | None) -> None:
    """--device names a device this machine has (checked before any model loads)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device {device!r} is not a device; use cpu, cuda or cuda:N", option="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device}: CUDA is not available on this machine; use cpu", option="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)", option="device"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {device}: MPS is not available on this machine; use cpu", option="device")
    elif dev.type != "cpu":
        raise InputError(f"device {device!r}: use cpu, cuda or cuda:N", option="device")
