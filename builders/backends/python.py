"""The `python` ranker: `module:function(prompts, responses) -> scores` over flat, equal-length lists. A prompt is
its string, or, for a conversation (or a prompt given a system prompt), its list of {role, content} messages
ending with the user turn the response answers (TRL's conversational form)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from builders.backends.base import unflatten
from builders.errors import InputError, one_line


class PythonScorer:
    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise InputError(
                f"ranker_model for the python ranker must be module:function, not {spec!r}", option="ranker_model"
            )
        if os.getcwd() not in sys.path:  # `module:function` next to the user, as `python -m` would find it
            sys.path.insert(0, os.getcwd())
        try:
            self.fn: Callable = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise InputError(f"python scorer {spec!r} cannot be imported ({one_line(e)})") from None
        self.spec = spec

    def describe(self) -> dict[str, Any]:
        return {"ranker": "python", "function": self.spec}

    def close(self) -> None:
        pass  # a function holds nothing to give back

    def score(self, prompts: Sequence[Any], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
        flat_r = [c for cands in candidates for c in cands]
        got = self.fn(flat_p, flat_r)
        try:
            values = [float(v) for v in got]
        except (TypeError, ValueError):
            raise InputError(
                f"python scorer {self.spec} must return a list of numbers, got {type(got).__name__}"
            ) from None
        if len(values) != len(flat_r):
            raise InputError(f"python scorer {self.spec} returned {len(values)} scores for {len(flat_r)} responses")
        return unflatten(values, candidates)
