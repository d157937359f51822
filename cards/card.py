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
    configs = [
        {
            "config_name": name,
            "data_files": [{"split": s.name, "path": f"{name}/{s.name}-*"} for s in splits],
            **({"default": True} if name == "default" else {}),
        }
        for name in ("default", "trl")
    ]
    info = [
        {
            "config_name": name,
            "features": features[name],
            "splits": [{"name": s.name, "num_bytes": s.num_bytes[name], "num_examples": s.rows} for s in splits],
            "dataset_size": sum(s.num_bytes[name] for s in splits),
        }
        for name in ("default", "trl")
    ]
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


def _recipe_rows(splits: list[SplitInfo], origins: dict[tuple[int, str], Any]) -> list[dict[str, Any]]:
    rows = []
    for s in splits:
        if not s.name.startswith("train_"):
            continue
        origin = origins.get((s.iteration, "train"))
        gen, sel = s.params.get("generator", {}), s.params.get("selection", {})
        ranker = (
            origin.scores.params if origin is not None and origin.scores is not None else s.params.get("ranker", {})
        )
        model = origin.generator if origin is not None else None
        sampling = origin.sampling if origin is not None else gen.get("sampling", {})
        kind = ranker.get("ranker")
        reward = display_ref(ranker.get("function") or ranker.get("ranker_model") or "?")
        if kind == "combine" and origin is not None and origin.axes:  # each axis with its weight
            kind = f"combine ({ranker.get('method')})"
            reward = " + ".join(f"{a.weight:g} x {a.name}" for a in origin.axes)
        rows.append(
            {
                "iteration": s.iteration,
                "responses": sampling.get("num_responses", "?"),
                "model": model.name if model else display_ref(gen.get("model", "?")),
                # a hub id's commit, or the weights' sha256 as the model snapshot hashes them (not the whole folder,
                # whose training_args.bin differs between two identical trainings)
                "revision": model.identity() if model else "not recorded",
                "sampling": (
                    f"n={sampling.get('num_responses')}, T={sampling.get('temperature')}, "
                    f"top_p={sampling.get('top_p')}, max_tokens={sampling.get('max_tokens')}, "
                    f"seed={sampling.get('seed')}, {gen.get('backend', '?')}"
                ),
                "ranker": f"{kind}: {reward}" if kind else reward,
                "selection": (
                    f"{sel.get('selection', 'max-min')}, length penalty {sel.get('length_penalty', 0)}, "
                    f"min margin {sel.get('min_margin', 0)}, ties {'kept' if sel.get('keep_ties') else 'dropped'}"
                ),
            }
        )
    return rows


def generators_line(recipe: list[dict[str, Any]]) -> str:
    """Who wrote the responses, in iteration order: `smollm2` (iteration 1), `iteration_1` (iteration 2), ..."""
    by_model: dict[str, list[int]] = {}
    for r in sorted(recipe, key=lambda r: r["iteration"]):
        by_model.setdefault(r["model"], []).append(r["iteration"])
    parts = [
        f"`{m}` (iteration{'s' if len(its) > 1 else ''} {', '.join(map(str, its))})" for m, its in by_model.items()
    ]
    said = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] if parts else "an unrecorded model"
    counts = sorted({str(r["responses"]) for r in recipe})
    return f"responses generated by {said}, {' or '.join(counts) or '?'} per prompt"


def pretty_name(repo_id: str) -> str:
    return f"{repo_id.split('/')[-1]}: iterative DPO preference pairs"


def render(
    repo_id: str,
    splits: list[SplitInfo],
    features: dict[str, Any],
    set_id: str,
    version: str,
    origins: dict[tuple[int, str], Any],
    license: str,
) -> str:
    """The card. `origins`: the lineage of each published split (cards/provenance.py: origins)."""
    import jinja2

    from cards.decontamination import summary as decontamination_summary
    from cards.provenance import prompt_formats
    from cards.rebuild import script

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        keep_trailing_newline=True,
        autoescape=False,
        undefined=jinja2.StrictUndefined,
    )
    recipe = _recipe_rows(splits, origins)
    pools = [chain[0] for o in origins.values() for chain in o.pool_lineage] or [
        p for o in origins.values() for p in o.pools
    ]
    sets = [o.prompts for o in origins.values() if o.prompts is not None and "seed" in o.prompts.params]
    source = next((p.params.get("source") for p in pools if p.params.get("source")), None)
    rebuild = script(origins, repo_id, set_id)
    return env.get_template("dataset_card.md.j2").render(
        metadata=yaml.safe_dump(
            metadata(splits, features, license, pretty_name(repo_id)), sort_keys=False, allow_unicode=True
        ),
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        license=license,
        prompt_source=display_ref(source or "openbmb/UltraFeedback"),
        first_train=next((s.name for s in splits if s.name.startswith("train_")), "train_iteration_1"),
        splits=splits,
        recipe=recipe,
        set_id=set_id,
        version=version,
        split_seed=sets[0].params.get("seed", "?") if sets else "?",
        commands=rebuild.text(),
        fills=rebuild.fills,
        formats=prompt_formats(origins),
        recipe_line=generators_line(recipe),
        axes=_axis_rows(splits, origins),
        decontamination=decontamination_summary(list(origins.values())),
    )


def _axis_rows(splits: list[SplitInfo], origins: dict[tuple[int, str], Any]) -> list[dict[str, Any]]:
    """The chosen-vs-rejected means of each axis of a combined reward, per split (none without a combination)."""
    rows = []
    for s in splits:
        origin = origins.get((s.iteration, s.name.split("_iteration_")[0]))
        for axis in origin.axes if origin is not None else []:
            if axis.chosen is not None:
                rows.append(
                    {
                        "split": s.name,
                        "axis": axis.name,
                        "weight": axis.weight,
                        "chosen": axis.chosen,
                        "rejected": axis.rejected,
                        "difference": axis.chosen - axis.rejected,
                    }
                )
    return rows
