"""The quickstart: the iterative recipe end to end on bundled prompts with tiny local models, in one folder.

Everything (catalog, tiny models, outputs) lives in `workdir`; rerunning reuses what is already there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders.catalog import Catalog, Snapshot
from builders.config import BuildConfig, GenerateConfig, QuickstartConfig, RankConfig
from builders.errors import InputError
from builders.generate import generate
from builders.pairs import build_pairs
from builders.rank import rank
from builders.prompts import import_prompts, split_prompts
from builders.tiny import build_tiny_models


@dataclass
class QuickstartReport:
    workdir: Path
    catalog: Path
    generator: Path
    ranker: Path
    snapshots: list[Snapshot] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"workdir": str(self.workdir), "catalog": str(self.catalog), "generator": str(self.generator),
                "ranker": str(self.ranker), "snapshots": [s.to_json() for s in self.snapshots]}


def run_quickstart(cfg: QuickstartConfig = QuickstartConfig()) -> QuickstartReport:
    workdir = Path(cfg.workdir)
    if not Path(cfg.prompts).exists():
        raise InputError(f"bundled prompts not found at {cfg.prompts}; run from a source checkout or pass --prompts FILE")
    models = workdir / "models"
    if not (models / "generator" / "config.json").exists() or not (models / "ranker" / "config.json").exists():
        build_tiny_models(models, overwrite=True)
    catalog = Catalog(workdir / "catalog.duckdb")
    pool = import_prompts(catalog, str(cfg.prompts)).snapshot
    sets = split_prompts(catalog, cfg.split, [pool.id])
    generated = generate(catalog, GenerateConfig(iteration=1, model=str(models / "generator"), sampling=cfg.sampling))
    scored = rank(catalog, RankConfig(iteration=1, ranker_model=str(models / "ranker")))
    pairs = build_pairs(catalog, BuildConfig(iteration=1))
    return QuickstartReport(workdir, catalog.path, models / "generator", models / "ranker",
                            [pool, *sets, *generated.snapshots, *scored.snapshots, *pairs.snapshots])
