"""Shared fixtures. Everything is offline (HF_HUB_OFFLINE=1): tiny models are built here, data is local."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pytest

if TYPE_CHECKING:
    from builders.catalog import Catalog

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# Real UltraFeedback rows (MIT; tests/data/ultrafeedback/README.md gives their source), inside the repository so a
# clone of the project alone passes its tests.
UF_DATA = ROOT / "tests" / "data" / "ultrafeedback"
SAMPLE = ROOT / "data" / "ultrafeedback_sample.jsonl"


@pytest.fixture(scope="session")
def uf_data() -> Path:
    assert (UF_DATA / "eval200.jsonl").exists(), f"the UltraFeedback test rows are missing at {UF_DATA}"
    return UF_DATA


@pytest.fixture
def catalog_path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.duckdb"


@pytest.fixture
def catalog(catalog_path: Path):
    from builders.catalog import Catalog

    return Catalog(catalog_path)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys, catalog_path: Path):
    """Run `iterdpo --catalog <tmp> ARGS` in-process through the real entry point (error policy included)."""
    from builders.cli import main

    def run(*args: str, catalog: Path | None = catalog_path) -> Result:
        argv = (["--catalog", str(catalog)] if catalog else []) + [str(a) for a in args]
        capsys.readouterr()
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_iterdpo(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed command in a fresh process: what a user's shell sees."""
    return subprocess.run(
        [sys.executable, "-m", "builders.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from builders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_models(root)
    return root


WORDS = (
    "the a model answer explains quickly python function list steps because however city river plan poem "
    "reason table error data music history people water better worse simple clear"
).split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def generations_catalog(path: Path, n_prompts: int = 6, n: int = 4) -> Catalog:
    """Prompts, a split and hand-made generations: the rank stage without running a generator."""
    from builders.catalog import Catalog
    from builders.prompts import prompt_id

    catalog = Catalog(path)
    rng = random.Random(1)
    prompts = [text(rng, 8) for _ in range(n_prompts)]
    ids = [prompt_id(p) for p in prompts]
    pool = catalog.register(
        "prompts",
        pa.table({"prompt_id": ids, "prompt": prompts, "source": [None] * n_prompts}),
        iteration=1,
        split="train",
    )
    rows = [
        {
            "prompt_id": pid,
            "response_index": i,
            "response": text(rng, rng.randint(1, 30)),
            "finish_reason": "stop",
            "prompt_tokens": 5,
            "completion_tokens": 7,
        }
        for pid in ids
        for i in range(n)
    ]
    catalog.register("generations", pa.Table.from_pylist(rows), iteration=1, split="train", parents=[pool.id])
    return catalog


def built_catalog(path: Path, n_prompts: int):
    """Prompts, generations, scores (a python scorer: longer is better) and pairs for iteration 1, in seconds."""
    from builders.config import BuildConfig, RankConfig
    from builders.pairs import build_pairs
    from builders.rank import rank

    catalog = generations_catalog(path, n_prompts=n_prompts)
    rank(catalog, 1, RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better"), progress=False)
    build_pairs(catalog, 1, BuildConfig())
    return catalog


@pytest.fixture(scope="session")
def shell_bin(tmp_path_factory):
    """A folder with `iterdpo` and `python` for the bash scripts tests run as a user would (examples, a card's
    rebuild script): each command a process of its own, forked from one that has imported torch, transformers and
    TRL already (tests/forkserver.py), instead of a fresh interpreter importing them again."""
    from tests.forkserver import shims

    with shims(tmp_path_factory.mktemp("shell_bin"), {**os.environ, "PYTHONPATH": str(ROOT)}) as folder:
        yield folder
