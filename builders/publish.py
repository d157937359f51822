"""Publishing: stage the Hub dataset repo (Parquet per config and split, card, plots), then upload it as ONE commit
and tag that revision with the snapshot set id.

    publish(catalog, PublishConfig("me/ultrafeedback-iterative-dpo", dry_run=True, local_dir=Path("staged")))

The staged folder is exactly what lands on the Hub. Republishing the same snapshots to the same repo revision is a
no-op (the catalog's publications table); a failure leaves no partial commit (the Hub applies a commit whole) and
records nothing. The token comes from HF_TOKEN or `hf auth login`, as huggingface_hub finds it, and is never
logged, written or put in a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from builders import __version__
from builders.catalog import Catalog, Snapshot
from builders.config import PUBLISH_DEFAULTS, PublishConfig
from builders.errors import InputError
from builders.hub import HubTarget, recorded, snapshot_set_id, staging, upload, validate_repo_id
from builders.pairs import TRL_SCHEMA, to_trl
from builders.schemas import KINDS


# what a publication writes: its configs' Parquet files, plots and card (stale ones of earlier publications are
# deleted; other files in the repo are the user's)
MANAGED = ("default/*", "trl/*", "plots/*", "README.md")


def split_name(split: str, iteration: int) -> str:
    return f"{split}_iteration_{iteration}"


@dataclass
class StagedRepo:
    folder: Path | None  # None: not staged (the snapshot set was already published)
    files: list[str]
    snapshots: dict[str, str]  # split name -> pairs snapshot id
    set_id: str

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder) if self.folder else None, "files": self.files,
                "snapshots": self.snapshots, "set_id": self.set_id}


@dataclass
class PublishResult:
    repo_id: str
    revision: str
    staged: StagedRepo
    dry_run: bool = False
    already_published: bool = False
    commit: str | None = None
    tag: str | None = None
    license: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "license": self.license, "dry_run": self.dry_run,
                "already_published": self.already_published, "commit": self.commit, "tag": self.tag,
                **self.staged.to_json()}


def published_snapshots(catalog: Catalog, iterations: tuple[int, ...] | None) -> dict[tuple[int, str], Snapshot]:
    """The newest complete pairs snapshot per (iteration, split) for the requested iterations."""
    found = {(s.iteration, s.split): s for s in catalog.list(kind="pairs") if s.iteration is not None
             and "shard" not in s.params}  # list is oldest first: later ones win
    built = sorted({it for it, _ in found})
    wanted = list(iterations) if iterations else built
    if not wanted:
        raise InputError(f"nothing built in catalog {catalog.path}: build pairs first (iterdpo build --iteration N)")
    missing = [it for it in wanted if (it, "train") not in found]
    if missing:
        raise InputError(f"iteration(s) {', '.join(map(str, missing))} have no pairs (built: "
                         f"{', '.join(map(str, built)) or 'none'}); build them first (iterdpo build --iteration N)")
    return {(it, split): found[(it, split)] for it in sorted(wanted) for split in ("train", "test")
            if (it, split) in found}


def _features() -> dict[str, Any]:
    from datasets import Features

    return {"default": Features.from_arrow_schema(KINDS["pairs"].schema)._to_yaml_list(),
            "trl": Features.from_arrow_schema(TRL_SCHEMA)._to_yaml_list()}


def write_parquet(table: pa.Table, path: Path, max_row_group_bytes: int = PUBLISH_DEFAULTS.max_row_group_bytes) -> int:
    """Write `table` as `datasets` writes Parquet (`Dataset.to_parquet`: its Features in the `huggingface` schema
    metadata, content-defined chunking, page index) in row groups of at most `max_row_group_bytes` of Arrow data,
    as datasets sizes them (the Hub's viewer refuses row groups past ~286 MiB). Returns `num_bytes` as datasets
    computes it when it loads the file: the Arrow size of what it reads, one batch per row group."""
    import datasets

    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    rows_per_group = max(1, table.num_rows * max_row_group_bytes // table.nbytes) if table.nbytes else 1
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a bar per file is noise; staging reports once
    try:
        datasets.Dataset(table).to_parquet(str(path), batch_size=rows_per_group)
    finally:
        if not quiet:
            enable_progress_bars()
    from datasets.arrow_writer import ArrowWriter
    from datasets.table import table_cast

    # what datasets' Parquet builder does on load: one batch per row group, cast to the file's Features, counted by
    # its ArrowWriter (here writing to a stream that only counts)
    parquet = pq.ParquetFile(path)
    features = datasets.Features.from_arrow_schema(parquet.schema_arrow)
    writer = ArrowWriter(features=features, stream=pa.MockOutputStream())
    for i in range(parquet.num_row_groups):
        group = table_cast(parquet.read_row_group(i), features.arrow_schema)
        writer.write_row(group) if group.num_rows == 1 else writer.write_table(group)  # as the builder calls it
    return writer.finalize()[1]


def stage_repo(catalog: Catalog, repo_id: str, iterations: tuple[int, ...] | None, local_dir: Path | None,
               license: str = PUBLISH_DEFAULTS.license,
               max_row_group_bytes: int = PUBLISH_DEFAULTS.max_row_group_bytes) -> StagedRepo:
    """Write the repo folder. It is built in a scratch folder and moved into place, so it is whole or absent."""
    from cards import plots
    from cards.card import SplitInfo, render
    from cards.stats import pair_stats

    validate_repo_id(repo_id)
    snaps = published_snapshots(catalog, iterations)
    with staging(local_dir) as st:
        scratch, files, infos, score_data = st.folder, st.files, [], {}
        for (it, split), snap in snaps.items():
            name = split_name(split, it)
            table = catalog.read(snap.id)
            num_bytes = {}
            for config, data in (("default", table), ("trl", to_trl(table))):
                rel = f"{config}/{name}-00000-of-00001.parquet"
                (scratch / config).mkdir(exist_ok=True)
                num_bytes[config] = write_parquet(data, scratch / rel, max_row_group_bytes)
                files.append(rel)
            infos.append(SplitInfo(name, it, table.num_rows, snap.params.get("prompt_count", table.num_rows),
                                   num_bytes, snap.params.get("drops", {}), pair_stats(table), snap.id, snap.params))
            score_data[name] = {"score_chosen": table.column("score_chosen").to_pylist(),
                                "score_rejected": table.column("score_rejected").to_pylist()}
        (scratch / "plots").mkdir()
        plots.score_distributions(score_data, scratch / "plots" / "score_distributions.png")
        plots.length_by_iteration({i.iteration: i.stats for i in infos if i.name.startswith("train_")},
                                  scratch / "plots" / "length_by_iteration.png")
        files += ["plots/score_distributions.png", "plots/length_by_iteration.png"]
        ids = {i.name: i.snapshot for i in infos}
        set_id = snapshot_set_id(list(ids.values()))
        split_params = _split_params(catalog, snaps)
        card = render(repo_id, infos, _features(), set_id, __version__, split_params, license)
        # The reward on test prompts per iteration (cards/rewards.py), as its own block before Provenance.
        from cards.rewards import add_to_card

        pinned = {it: s.parents[0] for (it, split), s in snaps.items() if split == "test" and s.parents}
        card, reward_files = add_to_card(catalog, card, scratch, sorted({it for it, _ in snaps}), pinned)
        files += reward_files
        (scratch / "README.md").write_text(card)
        files.append("README.md")
    return StagedRepo(st.target, sorted(files), ids, set_id)


def _split_params(catalog: Catalog, snaps: dict[tuple[int, str], Snapshot]) -> dict[str, Any]:
    """How the prompts were split and where the pool came from (for the card's rebuild commands)."""
    first = snaps[min(snaps)]
    prompts = catalog.get(first.params["prompts"]) if "prompts" in first.params else None
    if prompts is None:
        return {}
    out = dict(prompts.params)
    if prompts.parents:
        out["source"] = catalog.get(prompts.parents[0]).params.get("source")
    return out


def publish(catalog: Catalog, cfg: PublishConfig) -> PublishResult:
    """Stage the repo; unless dry-run, upload it as one commit, tag it, and record the publication. A snapshot set
    already published (and tagged) to that repo revision is found from its id alone, before any staging."""
    target = HubTarget(cfg.repo_id, "dataset", cfg.revision, cfg.private, cfg.max_retries, cfg.backoff,
                       license=cfg.license, managed=MANAGED)
    if not cfg.dry_run:
        validate_repo_id(cfg.repo_id)
        ids = {split_name(split, it): s.id for (it, split), s in published_snapshots(catalog, cfg.iterations).items()}
        set_id = snapshot_set_id(list(ids.values()))
        prior = recorded(catalog, target, set_id)
        if prior and prior["tag"]:
            return PublishResult(cfg.repo_id, cfg.revision, StagedRepo(None, [], ids, set_id), already_published=True,
                                 commit=prior["commit"], tag=prior["tag"], license=cfg.license)
    staged = stage_repo(catalog, cfg.repo_id, cfg.iterations, cfg.local_dir, cfg.license, cfg.max_row_group_bytes)
    result = PublishResult(cfg.repo_id, cfg.revision, staged, dry_run=cfg.dry_run, license=cfg.license)
    if cfg.dry_run:
        return result
    up = upload(catalog, target, staged.folder, staged.files, staged.set_id, staged.snapshots)
    result.already_published, result.commit, result.tag = up.already_published, up.commit, up.tag
    return result
