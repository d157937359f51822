"""The quickstart: the iterative recipe end to end on bundled prompts with tiny local models, in one folder.

Everything (catalog, tiny models, outputs) lives in `workdir`; rerunning reuses what is already there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders.catalog import Catalog, Snapshot
from builders.config import BuildConfig, GenerateConfig, PublishConfig, QuickstartConfig, RankConfig
from builders.errors import InputError
from builders.generate import generate
from builders.pairs import build_pairs
from builders.publish import publish
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
    hub: Path | None = None  # the staged Hub repo folder

    def to_json(self) -> dict[str, Any]:
        return {"workdir": str(self.workdir), "catalog": str(self.catalog), "generator": str(self.generator),
                "ranker": str(self.ranker), "hub": str(self.hub) if self.hub else None,
                "snapshots": [s.to_json() for s in self.snapshots]}


def run_quickstart(cfg: QuickstartConfig = QuickstartConfig()) -> QuickstartReport:
    """Every iteration: generate with the current model, rank, build pairs, DPO-train the next model; then stage
    the Hub repo of all iterations. Each step is skipped when its snapshot exists, so a rerun continues."""
    from train.dpo import TrainConfig, train

    workdir = Path(cfg.workdir)
    if not Path(cfg.prompts).exists():
        raise InputError(f"bundled prompts not found at {cfg.prompts}; run from a source checkout or pass --prompts FILE")
    models = workdir / "models"
    if not (models / "generator" / "config.json").exists() or not (models / "ranker" / "config.json").exists():
        build_tiny_models(models, overwrite=True)
    catalog = Catalog(workdir / "catalog.duckdb")
    pool = import_prompts(catalog, str(cfg.prompts)).snapshot
    snaps: list[Snapshot] = [pool, *split_prompts(catalog, cfg.split, [pool.id])]
    policy = str(models / "generator")
    for it in range(1, cfg.split.iterations + 1):
        snaps += generate(catalog, GenerateConfig(iteration=it, model=policy, sampling=cfg.sampling)).snapshots
        snaps += rank(catalog, RankConfig(iteration=it, ranker_model=str(models / "ranker"))).snapshots
        snaps += build_pairs(catalog, BuildConfig(iteration=it)).snapshots
        model = catalog.newest("model", it)
        if model is None or not Path(catalog.read(model.id).column("path")[0].as_py()).exists():
            model = train(catalog, TrainConfig(it, cfg.recipe, policy, output_dir=models / f"iteration_{it}",
                                               overwrite=True)).snapshot
        snaps.append(model)
        policy = catalog.read(model.id).column("path")[0].as_py()  # the next iteration's generator
    staged = publish(catalog, PublishConfig(cfg.repo_id, local_dir=workdir / "hub", dry_run=True)).staged
    report = QuickstartReport(workdir, catalog.path, models / "generator", models / "ranker", snaps)
    report.hub = staged.folder
    return report
