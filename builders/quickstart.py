"""The quickstart: the iterative recipe end to end on bundled prompts with tiny local models, in one folder.

Everything (catalog, tiny models, trained models, staged Hub folder) lives in `workdir`; it is the pipeline of
builders/pipeline.py with a CPU-sized config, so a rerun reuses what is already there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders.catalog import Catalog, Snapshot
from builders.config import (
    GenerationSection, PipelineConfig, PromptSource, PublishSection, QuickstartConfig, RankingSection, TrainingSection,
)
from builders.errors import InputError
from builders.pipeline import run_pipeline


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


def pipeline_for(cfg: QuickstartConfig) -> PipelineConfig:
    """The quickstart as a pipeline config (pipelines/quickstart.yaml is this for --workdir quickstart)."""
    workdir = Path(cfg.workdir)
    models = workdir / "models"
    return PipelineConfig(
        catalog=workdir / "catalog.duckdb",
        tiny_models=models,
        prompts=PromptSource(source=str(cfg.prompts)),
        split=cfg.split,
        generation=GenerationSection(model=str(models / "generator"), backend="transformers", sampling=cfg.sampling),
        ranking=RankingSection(ranker="pairrm", ranker_model=str(models / "ranker")),
        training=TrainingSection(recipe=str(cfg.recipe), output_dir=str(models / "iteration_{n}")),
        publish=PublishSection(repo_id=cfg.repo_id, dry_run=True, local_dir=workdir / "hub"),
    )


def run_quickstart(cfg: QuickstartConfig = QuickstartConfig()) -> QuickstartReport:
    """Three iterations of generate -> rank -> build -> train on a CPU, then the staged Hub folder. A rerun skips
    every finished step."""
    if not Path(cfg.prompts).exists():
        raise InputError(f"bundled prompts not found at {cfg.prompts}; run from a source checkout or pass --prompts FILE")
    pipeline = pipeline_for(cfg)
    result = run_pipeline(Catalog(pipeline.catalog), pipeline)
    models = Path(cfg.workdir) / "models"
    report = QuickstartReport(Path(cfg.workdir), pipeline.catalog, models / "generator", models / "ranker",
                              result.snapshots)
    report.hub = result.staged
    return report
