"""Render the dataset card (README.md of the Hub repo): YAML metadata, recipe, statistics, provenance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from builders.models import display_name

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass
class SplitInfo:
    name: str  # train_iteration_1 ...
    iteration: int
    rows: int
    prompts: int
    num_bytes: dict[str, int]  # per config: the Arrow size datasets computes when it loads the split
    drops: dict[str, int]
    stats: dict[str, Any]
    snapshot: str
    params: dict[str, Any]


def size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "1M<n<10M"


def display_ref(ref: Any) -> str:
    """A model or data reference as the card shows it (the card never holds this machine's paths)."""
    return display_name(str(ref))


def metadata(splits: list[SplitInfo], features: dict[str, Any], license: str, pretty_name: str) -> dict[str, Any]:
    """The card's YAML header: both configs with every split's files, dataset_info, license, categories, tags.
    dataset_info is what datasets reads back without a warning: every split of both configs with name,
    num_examples and num_bytes (the uncompressed Arrow size, as datasets records it)."""
    configs = [{"config_name": name, "data_files": [{"split": s.name, "path": f"{name}/{s.name}-*"} for s in splits],
                **({"default": True} if name == "default" else {})} for name in ("default", "trl")]
    info = [{"config_name": name, "features": features[name],
             "splits": [{"name": s.name, "num_bytes": s.num_bytes[name], "num_examples": s.rows} for s in splits],
             "dataset_size": sum(s.num_bytes[name] for s in splits)}
            for name in ("default", "trl")]
    return {
        "pretty_name": pretty_name,
        "license": license,
        "task_categories": ["text-generation"],
        "language": ["en"],
        "size_categories": [size_category(sum(s.rows for s in splits))],
        "tags": ["dpo", "preference", "iterative-dpo", "synthetic", "ultrafeedback", "pairrm", "iterdpo"],
        "configs": configs,
        "dataset_info": info,
    }


def _recipe_rows(splits: list[SplitInfo]) -> list[dict[str, Any]]:
    rows = []
    for s in splits:
        if not s.name.startswith("train_"):
            continue
        gen, ranker, sel = s.params.get("generator", {}), s.params.get("ranker", {}), s.params.get("selection", {})
        sampling = gen.get("sampling", {})
        rows.append({
            "iteration": s.iteration,
            "model": display_ref(gen.get("model", "?")),
            "revision": gen.get("revision") or (gen.get("model_sha256") or "?")[:12],
            "sampling": (f"n={sampling.get('num_responses')}, T={sampling.get('temperature')}, "
                         f"top_p={sampling.get('top_p')}, max_tokens={sampling.get('max_tokens')}, "
                         f"seed={sampling.get('seed')}, {gen.get('backend', '?')}"),
            "ranker": display_ref(ranker.get("ranker_model", "?")),
            "selection": (f"{sel.get('selection', 'max-min')}, length penalty {sel.get('length_penalty', 0)}, "
                          f"min margin {sel.get('min_margin', 0)}, ties {'kept' if sel.get('keep_ties') else 'dropped'}"),
        })
    return rows


def commands(splits: list[SplitInfo], repo_id: str, split_params: dict[str, Any]) -> list[str]:
    """The iterdpo commands that rebuild the published data from its recorded parameters."""
    out = [f"iterdpo prompts import {display_ref(split_params.get('source') or 'openbmb/UltraFeedback')}",
           f"iterdpo prompts split --iterations {split_params.get('iterations', '?')} "
           f"--train-size {split_params.get('train_size', '?')} --test-size {split_params.get('test_size', '?')} "
           f"--seed {split_params.get('seed', '?')}"]
    for s in splits:
        if not s.name.startswith("train_"):
            continue
        gen, ranker, sel = s.params.get("generator", {}), s.params.get("ranker", {}), s.params.get("selection", {})
        sp = gen.get("sampling", {})
        out.append(f"iterdpo generate --iteration {s.iteration} --model {display_ref(gen.get('model'))} --backend "
                   f"{gen.get('backend')} --num-responses {sp.get('num_responses')} --temperature "
                   f"{sp.get('temperature')} --top-p {sp.get('top_p')} --max-tokens {sp.get('max_tokens')} "
                   f"--seed {sp.get('seed')}")
        out.append(f"iterdpo rank --iteration {s.iteration} --ranker-model {display_ref(ranker.get('ranker_model'))}")
        out.append(f"iterdpo build --iteration {s.iteration} --length-penalty {sel.get('length_penalty', 0)} "
                   f"--min-margin {sel.get('min_margin', 0)}" + (" --keep-ties" if sel.get("keep_ties") else ""))
        if s.iteration < max(x.iteration for x in splits):
            out.append(f"iterdpo train --iteration {s.iteration}   # the model of iteration {s.iteration + 1}")
    out.append(f"iterdpo publish {repo_id} --iterations {','.join(str(i) for i in sorted({s.iteration for s in splits}))}")
    return out


def pretty_name(repo_id: str) -> str:
    return f"{repo_id.split('/')[-1]}: iterative DPO preference pairs"


def render(repo_id: str, splits: list[SplitInfo], features: dict[str, Any], set_id: str, version: str,
           split_params: dict[str, Any], license: str) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True,
                             autoescape=False, undefined=jinja2.StrictUndefined)
    recipe = _recipe_rows(splits)
    models = sorted({r["model"] for r in recipe})
    n = {r["sampling"].split(",")[0] for r in recipe}
    return env.get_template("dataset_card.md.j2").render(
        metadata=yaml.safe_dump(metadata(splits, features, license, pretty_name(repo_id)), sort_keys=False,
                                allow_unicode=True),
        title=repo_id.split("/")[-1], repo_id=repo_id, license=license,
        prompt_source=display_ref(split_params.get("source") or "openbmb/UltraFeedback"),
        first_train=next((s.name for s in splits if s.name.startswith("train_")), "train_iteration_1"), splits=splits, recipe=recipe, set_id=set_id, version=version,
        split_seed=split_params.get("seed", "?"), commands=commands(splits, repo_id, split_params),
        recipe_line=f"responses generated by {', '.join(f'`{m}`' for m in models)} ({', '.join(sorted(n))} per prompt)",
    )
