"""The iterative loop: `iterdpo run PIPELINE.yaml`.

    prompts -> split -> for n in 1..K: generate (model n) -> rank -> build -> (publish) -> train -> model n+1

Every step is skipped when its output already exists (generation and ranking find all their prompts done and
register the same snapshot; pairs are content-addressed; a `model` snapshot whose folder exists skips training), so
a rerun after a crash continues where it stopped. A pipeline config is parsed onto the dataclasses of
builders/config.py; an unknown key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders.catalog import Catalog, Snapshot
from builders.config import BuildConfig, GenerateConfig, PipelineConfig, PublishConfig, RankConfig
from builders.errors import InputError


# --------------------------------------------------------------------------------------------------------- parsing
def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where} must be a list, not {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Path:
        if not isinstance(value, str):
            raise InputError(f"{where} must be a path, not {value!r}")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise InputError(f"{where} must be {tp.__name__}, not {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors naming the key."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(names)})")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


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
    return from_dict(PipelineConfig, raw if raw is not None else {}, str(path))


# ----------------------------------------------------------------------------------------------------------- run
@dataclass
class PipelineResult:
    snapshots: list[Snapshot] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # the model of each iteration, in order
    staged: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"snapshots": [s.to_json() for s in self.snapshots], "models": self.models,
                "staged": str(self.staged) if self.staged else None}


def _trained(catalog: Catalog, iteration: int) -> Snapshot | None:
    """A model snapshot of the iteration whose folder still exists."""
    model = catalog.newest("model", iteration)
    if model is not None and Path(catalog.read(model.id).column("path")[0].as_py()).exists():
        return model
    return None


def run_pipeline(catalog: Catalog, cfg: PipelineConfig, progress: bool = True) -> PipelineResult:
    from builders.generate import generate
    from builders.pairs import build_pairs
    from builders.prompts import import_prompts, split_prompts
    from builders.publish import publish
    from builders.rank import rank
    from builders.tiny import build_tiny_models
    from train.dpo import TrainConfig, train

    if cfg.tiny_models is not None and not (Path(cfg.tiny_models) / "generator" / "config.json").exists():
        build_tiny_models(cfg.tiny_models, overwrite=True)
    if cfg.gguf is not None and not (Path(cfg.generation.model) / "config.json").exists():
        from builders.gguf import SMOLLM2_DIST, import_gguf, smollm2_gguf

        import_gguf(smollm2_gguf() if cfg.gguf == SMOLLM2_DIST else cfg.gguf, cfg.generation.model)
    out = PipelineResult()
    pool = import_prompts(catalog, cfg.prompts.source, cfg.prompts.column).snapshot
    out.snapshots += [pool, *split_prompts(catalog, cfg.split, [pool.id])]
    gen, sel = cfg.generation, cfg.selection
    policy = gen.model
    for n in range(1, cfg.split.iterations + 1):
        out.snapshots += generate(catalog, GenerateConfig(
            iteration=n, model=policy, backend=gen.backend, sampling=gen.sampling, chat_template=gen.chat_template,
            vllm=gen.vllm, openai=gen.openai), progress=progress).snapshots
        out.snapshots += rank(catalog, RankConfig(
            iteration=n, ranker=cfg.ranking.ranker, ranker_model=cfg.ranking.ranker_model,
            device=cfg.ranking.device, dtype=cfg.ranking.dtype), progress=progress).snapshots
        out.snapshots += build_pairs(catalog, BuildConfig(
            iteration=n, selection=sel.selection, length_penalty=sel.length_penalty, min_margin=sel.min_margin,
            keep_ties=sel.keep_ties)).snapshots
        model = _trained(catalog, n)
        if model is None:
            model = train(catalog, TrainConfig(
                n, Path(cfg.training.recipe.format(n=n)), policy,
                output_dir=Path(cfg.training.output_dir.format(n=n)), overwrite=True)).snapshot
        out.snapshots.append(model)
        policy = catalog.read(model.id).column("path")[0].as_py()  # the generator of iteration n + 1
        out.models.append(policy)
    if cfg.publish.repo_id:
        pub = cfg.publish
        out.staged = publish(catalog, PublishConfig(pub.repo_id, local_dir=pub.local_dir, dry_run=pub.dry_run,
                                                    private=pub.private)).staged.folder
    return out
