"""The usage examples at the top of the stage modules run, so they show the signatures that exist today."""

from __future__ import annotations

import doctest
import importlib

import pytest

from tests.conftest import ROOT

MODULES = [
    "builders.generate",
    "builders.rank",
    "builders.stage",
    "builders.executor",
    "builders.evaluate",
    "builders.catalog",
    "builders.prompts",
    "builders.combine",
    "builders.conversation",
    "builders.textnorm",
    "builders.sources",
    "builders.decontaminate",
    "builders.dedup",
    "builders.judge",
    "builders.preferences",
    "builders.reward_eval",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_run(name, tiny_models, monkeypatch):
    monkeypatch.chdir(ROOT)  # as a user runs them: from a clone's root
    module = importlib.import_module(name)
    # TINY: the tiny models (`iterdpo tiny-models DIR`), built once per session rather than in every example
    result = doctest.testmod(
        module,
        extraglobs={"TINY": tiny_models},
        report=True,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (output above)"
