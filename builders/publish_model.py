"""Publishing the trained model of an iteration: a Hub model repo whose card ties it to the data it learned from.

    publish_model(catalog, 3, PublishModelConfig("me/mistral-iterdpo-it3", dry_run=True,
                                                 local_dir=Path("staged-model")))

The repo holds the `model` snapshot's files (safetensors weights, config, tokenizer, chat template, generation
config) and a model card: base model, the lineage base -> iteration 1 -> ... -> this one with each iteration's
pairs snapshots and the dataset commit they were published in, the recipe as trained, the evaluation the catalog
holds (reward of test-prompt responses per iteration, length drift) and how to load it. One commit with a tag,
idempotent, with the same retries, token handling and errors as `publish` (builders/hub.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builders import __version__
from builders.catalog import Catalog, Snapshot
from builders.config import PublishModelConfig, check_base_model, validate_repo_id
from builders.errors import InputError
from builders.hub import HubTarget, check_token, recorded, snapshot_set_id, staging, upload
from builders.models import display_name, weights_sha256
from builders.publish import PublishResult, StagedRepo

# What a model folder holds that a user loads; TRL's training_args.bin (a pickle), optimizer states and
# checkpoint-* folders stay behind.
MODEL_FILES = ("*.safetensors", "*.json", "*.jinja", "tokenizer.model", "merges.txt", "vocab.txt")
# Recipe keys that are about where files go or how runs are logged, not how the model was trained
RECIPE_NOISE = (
    "env",
    "output_dir",
    "overwrite_output_dir",
    "report_to",
    "run_name",
    "model_name_or_path",
    "dataset_name",
    "dataset_config",
    "datasets",
    "dataset_train_split",
    "dataset_test_split",
)


@dataclass
class Step:
    """One model of the lineage."""

    iteration: int
    snapshot: Snapshot
    row: dict[str, Any]
    pairs: dict[str, str]  # split -> pairs snapshot id it was trained (and evaluated) on
    dataset: dict[str, Any] | None  # the publication of those pairs: repo_id, commit, tag


def _row(catalog: Catalog, snap: Snapshot) -> dict[str, Any]:
    return catalog.read(snap.id).to_pylist()[0]


def metrics(catalog: Catalog, snap: Snapshot) -> dict[str, Any]:
    """Training metrics of a model snapshot: the pair counts (in the row, part of its identity) and losses and
    timings (in its params)."""
    row = _row(catalog, snap)
    return {**(json.loads(row["metrics"]) if row.get("metrics") else {}), **snap.params.get("metrics", {})}


def lineage(catalog: Catalog, snap: Snapshot) -> tuple[str, list[Step]]:
    """(the base model the chain started from, the model snapshots from iteration 1 to `snap`)."""
    by_path = {}
    for s in catalog.list(kind="model"):  # oldest first: the newest snapshot of a folder wins
        by_path[str(Path(_row(catalog, s)["path"]).resolve())] = s
    publications = catalog.publications()
    chain: list[Step] = []
    current = snap
    while current is not None and all(step.snapshot.id != current.id for step in chain):
        row = _row(catalog, current)
        pairs = {catalog.get(p).split or "?": p for p in current.parents}
        published = [p for p in publications if set(pairs.values()) & set(p["snapshot_ids"])]
        chain.append(Step(current.iteration, current, row, pairs, published[-1] if published else None))
        base = row["base_model"]
        current = by_path.get(str(Path(base).expanduser().resolve())) if Path(base).expanduser().exists() else None
    return chain[-1].row["base_model"], chain[::-1]


def base_description(base: str, base_is_hub: bool, hub_id: str | None) -> dict[str, Any]:
    """How the card names the base model: its hub id when known (given, or the base itself), and for a local
    folder what identifies it (its weights' sha256, the GGUF file it was imported from)."""
    from cards.provenance import local_facts

    out: dict[str, Any] = {
        "name": hub_id or display_name(base),
        "hub_id": hub_id,
        "local": not base_is_hub,
        "folder": display_name(base),
        "weights_sha256": None,
        "gguf": None,
    }
    if not base_is_hub and Path(base).is_dir():
        out.update(local_facts(Path(base)))
    return out


def _hyperparameters(recipe_text: str) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        return {}
    return {
        k: (display_name(v) if isinstance(v, str) and v.startswith("/") else v)
        for k, v in raw.items()
        if k not in RECIPE_NOISE and not k.startswith(("hub_", "push_to_hub", "logging_"))
    }


def _prompt_format(folder: Path) -> str:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
        return tok.apply_chat_template(
            [{"role": "user", "content": "{prompt}"}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # no chat template: the card says so
        return ""


def stage_model(catalog: Catalog, iteration: int, cfg: PublishModelConfig) -> tuple[StagedRepo, Snapshot]:
    """Write the model repo folder (files + card); whole or absent."""
    validate_repo_id(cfg.repo_id)
    if cfg.dataset_repo:
        validate_repo_id(cfg.dataset_repo)
    if cfg.base_model is not None:
        check_base_model(cfg.base_model)
    snap = catalog.newest("model", iteration)
    if snap is None:
        raise InputError(
            f"iteration {iteration} has no trained model in catalog {catalog.path}; train it first "
            f"(iterdpo train --iteration {iteration})"
        )
    base, chain = lineage(catalog, snap)
    row = chain[-1].row
    folder = Path(row["path"])
    if not folder.is_dir():
        raise InputError(f"the model of iteration {iteration} is gone from {folder}; train it again")
    if weights_sha256(folder) != row["weights_sha256"]:
        raise InputError(
            f"the weights in {folder} changed since the model snapshot {snap.id[:12]} was registered; "
            f"train it again or restore them"
        )
    # never iterdpo's own marker files (dot files): a downloaded copy must not pass for a folder iterdpo wrote
    names = sorted(
        {p.name for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")}
    )
    if not any(n.endswith(".safetensors") for n in names):
        raise InputError(f"{folder} holds no safetensors weights")
    with staging(cfg.local_dir, prefix="iterdpo-publish-model-") as st:
        for name in names:
            shutil.copy2(folder / name, st.folder / name)
            st.files.append(name)
        (st.folder / "README.md").write_text(
            _card(catalog, iteration, cfg, snap, base, chain, _prompt_format(st.folder))
        )
        st.files.append("README.md")
    set_id = snapshot_set_id([snap.id])
    return StagedRepo(st.target, sorted(st.files), {"model": snap.id}, set_id), snap


def _card(
    catalog: Catalog,
    iteration: int,
    cfg: PublishModelConfig,
    snap: Snapshot,
    base: str,
    chain: list[Step],
    prompt_format: str,
) -> str:
    from cards.model_card import render
    from cards.reward_table import test_reward_table

    steps = []
    for step in chain:
        m = metrics(catalog, step.snapshot)
        dataset = step.dataset
        if dataset is None and cfg.dataset_repo:
            dataset = {"repo_id": cfg.dataset_repo, "commit": None, "tag": None}
        steps.append(
            {
                "iteration": step.iteration,
                "name": display_name(step.row["path"]),
                "snapshot": step.snapshot.id,
                "weights_sha256": step.row["weights_sha256"],
                "pairs": step.pairs,
                "dataset": dataset,
                "metrics": m,
            }
        )
    datasets = sorted({s["dataset"]["repo_id"] for s in steps if s["dataset"]})
    if cfg.dataset_repo and cfg.dataset_repo not in datasets:
        datasets.append(cfg.dataset_repo)
    base_is_hub = not Path(base).expanduser().exists() and not Path(base).is_absolute()
    base_info = base_description(base, base_is_hub, cfg.base_model or (base if base_is_hub else None))
    return render(
        repo_id=cfg.repo_id,
        iteration=iteration,
        base=base_info,
        license=cfg.license,
        datasets=datasets,
        steps=steps,
        hyperparameters=_hyperparameters(chain[-1].row["recipe"]),
        rewards=test_reward_table(
            catalog,
            list(range(1, iteration + 2)),
            {
                step.iteration: scores.id
                for step in chain
                if "test" in step.pairs and (scores := catalog.parent(step.pairs["test"], "scores")) is not None
            },
        ),
        drift=_drift(catalog, chain),
        prompt_format=prompt_format,
        snapshot=snap.id,
        version=__version__,
    )


def _drift(catalog: Catalog, chain: list[Step]) -> list[dict[str, Any]]:
    """Chosen vs rejected length of the train pairs each model of the lineage learned from."""
    from cards.stats import pair_stats

    out = []
    for step in chain:
        if "train" in step.pairs:
            st = pair_stats(catalog.read(step.pairs["train"]))
            out.append(
                {
                    "iteration": step.iteration,
                    "pairs": st["rows"],
                    "chosen": st["chosen_length"]["mean"],
                    "rejected": st["rejected_length"]["mean"],
                    "chosen_longer": st["chosen_longer"],
                }
            )
    return out


def publish_model(catalog: Catalog, iteration: int, cfg: PublishModelConfig) -> PublishResult:
    """Stage the model repo; unless dry-run, upload it as one commit, tag it, and record the publication. A model
    already published (and tagged) to that repo revision is found from its snapshot id, before any copying."""
    target = HubTarget(
        cfg.repo_id,
        "model",
        cfg.revision,
        cfg.private,
        cfg.max_retries,
        cfg.backoff,
        command="iterdpo publish-model",
        license=cfg.license,
        managed=(*MODEL_FILES, "README.md"),
    )
    snap = catalog.newest("model", iteration)
    if not cfg.dry_run and snap is not None:
        validate_repo_id(cfg.repo_id)
        set_id = snapshot_set_id([snap.id])
        prior = recorded(catalog, target, set_id)
        if prior and prior["tag"]:
            return PublishResult(
                cfg.repo_id,
                cfg.revision,
                StagedRepo(None, [], {"model": snap.id}, set_id),
                already_published=True,
                commit=prior["commit"],
                tag=prior["tag"],
                license=cfg.license,
            )
        check_token(target)  # before the weights are copied: a bad token fails in seconds
    staged, _ = stage_model(catalog, iteration, cfg)
    result = PublishResult(cfg.repo_id, cfg.revision, staged, dry_run=cfg.dry_run, license=cfg.license)
    if cfg.dry_run:
        return result
    try:
        up = upload(catalog, target, staged.folder, staged.files, staged.set_id, staged.snapshots)
    finally:
        if cfg.local_dir is None:  # a temporary copy of the weights: gone once uploaded (or failed)
            shutil.rmtree(staged.folder.parent, ignore_errors=True)
            result.staged.folder = None
    result.already_published, result.commit, result.tag = up.already_published, up.commit, up.tag
    return result
