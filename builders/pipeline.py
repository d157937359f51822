"""The iterative loop: `iterdpo run PIPELINE.yaml`.

    prompts -> split -> for n in 1..K: generate (model n) -> rank -> build -> (publish) -> train -> model n+1

Every step is skipped when its output already exists (generation and ranking find all their prompts done and
register the same snapshot; pairs are content-addressed), so a rerun after a crash continues where it stopped.
Training is decided by content: the model of iteration n is reused only if it was trained on exactly this run's
pairs of iteration n, from the same base model, with the same recipe, and its folder still holds those weights;
otherwise it is trained again. A pipeline config is parsed onto the dataclasses of builders/config.py (an unknown
key is an error naming it) and validated whole before anything is registered.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders.catalog import Catalog, Snapshot
from builders.config import (
    BACKENDS,
    RANKERS,
    ExecutorConfig,
    PipelineConfig,
    PublishConfig,
    PublishModelConfig,
    TrainConfig,
    build_config,
    check_license,
    check_revision,
    check_threads,
)
from builders.errors import InputError, IterdpoError


# --------------------------------------------------------------------------------------------------------- parsing
def load_pipeline(path: str | Path) -> PipelineConfig:
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InputError(f"pipeline {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"pipeline {path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from None
    return build_config(PipelineConfig, raw if raw is not None else {}, str(path))


# ------------------------------------------------------------------------------------------------------ validation
def _formatted(template: str, n: int, where: str) -> str:
    try:
        return template.format(n=n)
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(
            f"{where} {template!r}: use {{n}} for the iteration number ({type(e).__name__}: {e})"
        ) from None


def _under(path: str, folder: Path | None) -> bool:
    """Whether `path` lies in the folder the pipeline builds its tiny models into (not there before the run)."""
    if folder is None:
        return False
    return Path(path).expanduser().resolve().is_relative_to(Path(folder).expanduser().resolve())


def validate_pipeline(cfg: PipelineConfig, where: str = "pipeline") -> list[str]:
    """Check every value a run will use before it registers or builds anything, with the stages' own validators:
    a bad backend, sampling value, ranker, selection or recipe fails in seconds, not after hours of generation.
    Models are checked to exist (a local folder, or a hub id the cache or the Hub knows) but not loaded. Returns
    warnings: a generation budget that the training max_length cuts."""
    from builders.generate import validate_generate, validate_sampling
    from builders.models import model_identity
    from builders.pairs import validate_build
    from builders.prompts import looks_local, plan_split, prompts_table, read_source
    from builders.publish import validate_repo_id
    from builders.rank import make_ranker, ranker_identity, validate_rank

    def check(section: str, call, *args) -> Any:
        try:
            return call(*args)
        except IterdpoError as e:  # an InputError, or the environment (e.g. a Ray address nobody answers at)
            raise InputError(f"{where}: {section}: {e}") from None

    # prompts and split: a local source is read now, so a split larger than the pool fails here too
    sp = cfg.split
    if sp.iterations < 1 or sp.train_size < 1 or sp.test_size < 0:
        raise InputError(
            f"{where}: split: iterations and train_size must be at least 1 and test_size 0 or more "
            f"(found {sp.iterations}, {sp.train_size}, {sp.test_size})"
        )
    if looks_local(cfg.prompts.source):
        cols = check("prompts.source", read_source, cfg.prompts.source, cfg.prompts.column)
        check("split", plan_split, prompts_table(cols)[0], sp)

    gen = cfg.generation
    if gen.backend not in BACKENDS:
        raise InputError(
            f"{where}: generation.backend: unknown backend {gen.backend!r}; use one of {', '.join(BACKENDS)}"
        )
    check("generation.sampling", validate_sampling, gen.sampling)
    check("generation", validate_generate, gen)
    if gen.shard is not None:
        raise InputError(
            f"{where}: generation.shard: a pipeline generates every prompt; shard with "
            f"`iterdpo generate --shard` instead"
        )
    if gen.chat_template is not None and not Path(gen.chat_template).is_file():
        raise InputError(f"{where}: generation.chat_template {gen.chat_template}: no such file")
    if cfg.gguf is not None and not (Path(gen.model) / "config.json").exists():  # imported by the run
        from builders.gguf import SMOLLM2_DIST, smollm2_gguf

        if cfg.gguf == SMOLLM2_DIST:
            check("gguf", smollm2_gguf)
        elif not Path(cfg.gguf).is_file():
            raise InputError(f"{where}: gguf {cfg.gguf}: no such file")
    elif not _under(gen.model, cfg.tiny_models):
        check("generation.model", model_identity, gen.model)

    listed = isinstance(cfg.ranking, tuple)
    for i, rk in enumerate(cfg.ranking if listed else (cfg.ranking,)):
        at = f"ranking[{i}]" if listed else "ranking"
        if rk.ranker not in RANKERS:
            raise InputError(f"{where}: {at}.ranker: unknown ranker {rk.ranker!r}; use one of {', '.join(RANKERS)}")
        rank_cfg = rk
        check(at, validate_rank, rank_cfg)
        if rk.ranker == "python":
            # imports module:function; loads no model (and starts no Ray replicas: the local ranker)
            check(f"{at}.ranker_model", make_ranker, dataclasses.replace(rank_cfg, scale_out=ExecutorConfig()))
        elif not _under(rk.ranker_model, cfg.tiny_models):
            check(f"{at}.ranker_model", ranker_identity, rank_cfg)
    from builders.combine import check_combination

    check("combine", check_combination, 0, [[]], [1.0], cfg.combine.method)  # the method, also when unused
    if listed:
        if not cfg.ranking:
            raise InputError(f"{where}: ranking: an empty list names no ranker")
        check(
            "combine",
            check_combination,
            0,
            [[] for _ in cfg.ranking],
            [r.weight for r in cfg.ranking],
            cfg.combine.method,
        )

    check("selection", validate_build, cfg.selection)
    for key in ("revision", "model_revision"):
        check(f"publish.{key}", check_revision, getattr(cfg.publish, key))
    for key in ("license", "model_license"):
        check(f"publish.{key}", check_license, getattr(cfg.publish, key))
    if cfg.publish.repo_id is not None:
        check("publish.repo_id", validate_repo_id, cfg.publish.repo_id)
    if cfg.publish.model_repo_id is not None:
        for n in range(1, sp.iterations + 1):
            check(
                "publish.model_repo_id",
                validate_repo_id,
                _formatted(cfg.publish.model_repo_id, n, f"{where}: publish.model_repo_id"),
            )
            if cfg.publish.model_local_dir is not None:
                _formatted(cfg.publish.model_local_dir, n, f"{where}: publish.model_local_dir")

    check("training.threads", check_threads, cfg.training.threads)
    # recipes last: parsing them imports TRL (seconds); each distinct file is parsed once, as training will
    recipes = {}
    for n in range(1, sp.iterations + 1):
        recipe = _formatted(cfg.training.recipe, n, f"{where}: training.recipe")
        output_dir = _formatted(cfg.training.output_dir, n, f"{where}: training.output_dir")
        recipes.setdefault(recipe, output_dir)
    from builders.train import check_budget, load_recipe

    warnings = []
    for recipe, output_dir in recipes.items():
        check("training.recipe", load_recipe, Path(recipe), {"model_name_or_path": gen.model, "output_dir": output_dir})
        if (budget := check("training.recipe", check_budget, Path(recipe), gen.sampling.max_tokens)) is not None:
            warnings.append(budget)
    return warnings


# ----------------------------------------------------------------------------------------------------------- run
@dataclass
class PipelineResult:
    snapshots: list[Snapshot] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # the model of each iteration, in order
    staged: Path | None = None
    staged_models: list[Path] = field(default_factory=list)  # the staged model repo of each iteration
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshots": [s.to_json() for s in self.snapshots],
            "models": self.models,
            "staged": str(self.staged) if self.staged else None,
            "staged_models": [str(p) for p in self.staged_models],
            "warnings": self.warnings,
        }


def _model_path(catalog: Catalog, model: Snapshot) -> str:
    row = catalog.read(model.id).to_pylist()[0]
    return row.get("path") or model.params["path"]


def _recipe_content(text: str | None) -> Any:
    """What of a recipe decides the training: its options, without `env` (secrets, not hyperparameters) and the
    two keys the pipeline overrides (the base model and the output folder)."""
    import yaml

    try:
        doc = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return None
    if not isinstance(doc, dict):
        return None
    return {k: v for k, v in doc.items() if k not in ("env", "model_name_or_path", "output_dir")}


def reusable_model(
    catalog: Catalog, iteration: int, pairs: list[Snapshot], base_model: str, recipe: Path
) -> Snapshot | None:
    """The newest `model` snapshot of the iteration trained on exactly these pairs, from `base_model`, with the
    same recipe options, whose folder still holds its weights; None when the iteration must be trained (again).
    Metrics and timings are not compared: they differ between two identical trainings."""
    import yaml

    from builders.models import model_ref, weights_sha256
    from builders.train import stored_recipe

    wanted = sorted(s.id for s in pairs)
    try:
        raw = yaml.safe_load(recipe.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(raw, dict):
        return None
    # compared as training stored it (canonical, secrets redacted), so a recipe with a token still matches
    current = _recipe_content(stored_recipe({k: v for k, v in raw.items() if k != "env"}, {}))
    for snap in reversed(catalog.list(kind="model", iteration=iteration)):
        if sorted(snap.parents) != wanted:
            continue
        row = catalog.read(snap.id).to_pylist()[0]
        if (
            row.get("base_model") != model_ref(base_model)
            or current is None
            or _recipe_content(row.get("recipe")) != current
        ):
            continue
        # the folder is shared by every training of the iteration: it may now hold another one's weights
        path = Path(row.get("path") or snap.params.get("path", ""))
        if path.is_dir() and weights_sha256(path) == row.get("weights_sha256"):
            return snap
    return None


def _ranked(
    catalog: Catalog, n: int, cfg: PipelineConfig, generated: list[str], progress: bool
) -> tuple[list[Snapshot], list[Snapshot]]:
    """Iteration n's scores (every one registered, and those build selects from): of the one ranker, or of each
    listed ranker and their combination (builders/combine.py)."""
    from builders.combine import combine_snapshots
    from builders.rank import rank

    if not isinstance(cfg.ranking, tuple):
        ranked = rank(catalog, n, cfg.ranking, generated, progress=progress).snapshots
        return ranked, ranked
    axes = [rank(catalog, n, rk, generated, progress=progress).snapshots for rk in cfg.ranking]
    per_split = {s.split: [next(a for a in axis if a.split == s.split) for axis in axes] for s in axes[0]}
    combined = combine_snapshots(catalog, n, per_split, [rk.weight for rk in cfg.ranking], cfg.combine.method)
    return [*(s for axis in axes for s in axis), *combined.snapshots], combined.snapshots


def run_pipeline(
    catalog: Catalog, cfg: PipelineConfig, progress: bool = True, where: str = "pipeline"
) -> PipelineResult:
    """The whole loop; `where` names the config in error messages (its file)."""
    from builders.generate import generate
    from builders.pairs import build_pairs
    from builders.prompts import import_prompts, split_prompts
    from builders.publish import publish
    from builders.publish_model import publish_model
    from builders.tiny import build_tiny_models
    from builders.train import train

    warnings = validate_pipeline(cfg, where)  # before anything is registered or built
    if progress:
        for w in warnings:
            print(f"Warning: {w}", file=sys.stderr, flush=True)
    if cfg.tiny_models is not None and not (Path(cfg.tiny_models) / "generator" / "config.json").exists():
        build_tiny_models(cfg.tiny_models, overwrite=True)
    if cfg.gguf is not None and not (Path(cfg.generation.model) / "config.json").exists():
        from builders.gguf import SMOLLM2_DIST, import_gguf, smollm2_gguf

        import_gguf(smollm2_gguf() if cfg.gguf == SMOLLM2_DIST else cfg.gguf, cfg.generation.model)
    out = PipelineResult(warnings=warnings)
    pool = import_prompts(catalog, cfg.prompts.source, cfg.prompts.column).snapshot
    sets = split_prompts(catalog, cfg.split, [pool.id])
    out.snapshots += [pool, *sets]
    policy = cfg.generation.model
    for n in range(1, cfg.split.iterations + 1):
        # each stage reads exactly what the previous one made in this run (not the newest of its kind, which
        # can be another run's when this run's content equals an older snapshot)
        generated = generate(
            catalog,
            n,
            dataclasses.replace(cfg.generation, model=policy),
            [s.id for s in sets if s.iteration == n],
            progress=progress,
        ).snapshots
        ranked, scores = _ranked(catalog, n, cfg, [s.id for s in generated], progress)
        pairs = build_pairs(catalog, n, cfg.selection, [s.id for s in scores]).snapshots
        out.snapshots += [*generated, *ranked, *pairs]
        recipe = Path(cfg.training.recipe.format(n=n))
        model = reusable_model(catalog, n, pairs, policy, recipe)
        if model is None:
            model = train(
                catalog,
                n,
                TrainConfig(
                    recipe,
                    policy,
                    output_dir=Path(cfg.training.output_dir.format(n=n)),
                    overwrite=True,
                    threads=cfg.training.threads,
                ),
                [s.id for s in pairs],
            ).snapshot
        out.snapshots.append(model)
        policy = _model_path(catalog, model)  # the generator of iteration n + 1
        out.models.append(policy)
    pub = cfg.publish
    if pub.repo_id:
        out.staged = publish(
            catalog,
            PublishConfig(
                pub.repo_id,
                local_dir=pub.local_dir,
                dry_run=pub.dry_run,
                private=pub.private,
                revision=pub.revision,
                license=pub.license,
            ),
        ).staged.folder
    if pub.model_repo_id:  # after the dataset, so each model card names the dataset commit its pairs landed in
        for n in range(1, cfg.split.iterations + 1):
            local = Path(pub.model_local_dir.format(n=n)) if pub.model_local_dir else None  # checked up front
            staged = publish_model(
                catalog,
                n,
                PublishModelConfig(
                    pub.model_repo_id.format(n=n),
                    dataset_repo=pub.repo_id,
                    local_dir=local,
                    dry_run=pub.dry_run,
                    private=pub.private,
                    revision=pub.model_revision,
                    license=pub.model_license,
                ),
            ).staged.folder
            if staged is not None:  # None: already published, or uploaded from a temporary folder
                out.staged_models.append(staged)
    return out
