"""Shared fixtures. Everything is offline (HF_HUB_OFFLINE=1): tiny models are built here, data is local."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "ultrafeedback"
SAMPLE = ROOT / "data" / "ultrafeedback_sample.jsonl"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert (SHARED_DATA / "eval200.jsonl").exists(), f"the shared UltraFeedback rows are missing at {SHARED_DATA}"
    return SHARED_DATA


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
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from builders.tiny import build_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_models(root)
    return root
