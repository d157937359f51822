"""Publishing: stage the Hub dataset repo (Parquet per config and split, card, plots), then upload it as ONE commit
and tag that revision with the snapshot set id.

    publish(catalog, PublishConfig("me/ultrafeedback-iterative-dpo", dry_run=True, local_dir=Path("staged")))

The staged folder is exactly what lands on the Hub. Republishing the same snapshots to the same repo revision is a
no-op (the catalog's publications table); a failure leaves no partial commit (the Hub applies a commit whole) and
records nothing. The token comes from HF_TOKEN or `hf auth login`, as huggingface_hub finds it, and is never
logged, written or put in a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from builders import __version__
from builders.catalog import Catalog, Snapshot
from builders.config import PUBLISH_DEFAULTS, SPLITS, PublishConfig, validate_repo_id
from builders.errors import InputError
from builders.hub import HubTarget, check_token, recorded, snapshot_set_id, staged_as, staging, upload
from builders.pairs import TRL_SCHEMA, to_trl
from builders.schemas import KINDS

# what a publication writes: its configs' Parquet files, plots and card (stale ones of earlier publications are
# deleted; other files in the repo are the user's)
MANAGED = ("default/*", "trl/*", "plots/*", "README.md")
# pairs rows read per batch while staging (~10 kB each)
_BATCH_ROWS = 1_000


def split_name(split: str, iteration: int) -> str:
    return f"{split}_iteration_{iteration}"


@dataclass
class StagedRepo:
    folder: Path | None  # None: not staged (the snapshot set was already published)
    files: list[str]
    snapshots: dict[str, str]  # split name -> pairs snapshot id
    set_id: str

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder) if self.folder else None,
            "files": self.files,
            "snapshots": self.snapshots,
            "set_id": self.set_id,
        }


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
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "license": self.license,
            "dry_run": self.dry_run,
            "already_published": self.already_published,
            "commit": self.commit,
            "tag": self.tag,
            **self.staged.to_json(),
        }


def published_snapshots(catalog: Catalog, iterations: tuple[int, ...] | None) -> dict[tuple[int, str], Snapshot]:
    """The newest complete pairs snapshot per (iteration, split) for the requested iterations."""
    found = {
        (s.iteration, s.split): s for s in catalog.list(kind="pairs") if s.iteration is not None and s.shard is None
    }  # list is oldest first: later ones win
    built = sorted({it for it, _ in found})
    wanted = list(iterations) if iterations else built
    if not wanted:
        raise InputError(f"nothing built in catalog {catalog.path}: build pairs first (iterdpo build --iteration N)")
    missing = [it for it in wanted if (it, "train") not in found]
    if missing:
        raise InputError(
            f"iteration(s) {', '.join(map(str, missing))} have no pairs (built: "
            f"{', '.join(map(str, built)) or 'none'}); build them first (iterdpo build --iteration N)"
        )
    return {(it, split): found[(it, split)] for it in sorted(wanted) for split in SPLITS if (it, split) in found}


def _features() -> dict[str, Any]:
    from datasets import Features

    return {
        "default": Features.from_arrow_schema(KINDS["pairs"].schema)._to_yaml_list(),
        "trl": Features.from_arrow_schema(TRL_SCHEMA)._to_yaml_list(),
    }


class ParquetOut:
    """A Parquet file written batch by batch exactly as `datasets` writes one (`Dataset.to_parquet`, which holds the
    whole table): its Features in the `huggingface` schema metadata, content-defined chunking, page index, and row
    groups of `num_rows * max_row_group_bytes // nbytes` rows (at most `max_row_group_bytes` of Arrow data, as
    datasets sizes them; the Hub's viewer refuses row groups past ~286 MiB). Only one row group is held at a time.
    Rows may be written in batches of any size; the file is the same, byte for byte, as datasets writes from one
    table of those rows with that `nbytes`. (Summed over batches, `nbytes` counts each batch's own validity and
    offset buffers: a few kB more than one table's, which can move a row group boundary by a row.)"""

    def __init__(
        self,
        path: Path,
        schema: pa.Schema,
        num_rows: int,
        nbytes: int,
        max_row_group_bytes: int = PUBLISH_DEFAULTS.max_row_group_bytes,
    ):
        from datasets import Features, config
        from datasets.arrow_writer import get_parquet_column_options

        features = Features.from_arrow_schema(schema)
        self.schema = features.arrow_schema
        self.rows_per_group = max(1, num_rows * max_row_group_bytes // nbytes) if nbytes else 1
        self.cdc = config.DEFAULT_CDC_OPTIONS
        self.writer = pq.ParquetWriter(
            str(path),
            schema=self.schema,
            use_content_defined_chunking=self.cdc,
            write_page_index=True,
            **get_parquet_column_options(features, self.schema),
        )
        self.pending: list[pa.Table] = []
        self.held = 0

    def write(self, rows: pa.Table | pa.RecordBatch) -> None:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
        self.pending.append(table)
        self.held += table.num_rows
        while self.held >= self.rows_per_group:
            held = pa.concat_tables(self.pending)
            # one row group per call, as datasets; in one chunk, as datasets' table is (pages depend on chunks)
            self.writer.write_table(held.slice(0, self.rows_per_group).combine_chunks())
            rest = held.slice(self.rows_per_group)
            self.pending, self.held = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.held:
            self.writer.write_table(pa.concat_tables(self.pending).combine_chunks())
            self.pending, self.held = [], 0
        self.writer.add_key_value_metadata({"content_defined_chunking": json.dumps(self.cdc)})
        self.writer.close()

    def __enter__(self) -> ParquetOut:
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.writer.close()  # the file is discarded with the scratch folder


def num_bytes(path: Path) -> int:
    """`num_bytes` of a Parquet file as datasets computes it when it loads the file: the Arrow size of what it reads,
    one batch per row group."""
    import datasets
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


def _stage_split(
    catalog: Catalog, snap: Snapshot, folder: Path, name: str, max_row_group_bytes: int
) -> tuple[list[str], dict[str, int], dict[str, Any], dict[str, list[float]]]:
    """Write one split's files of both configs, streaming the pairs snapshot (sizes and statistics first, then the
    rows of each file), so memory is bounded by a row group. Returns the files, num_bytes per config, the split's statistics and
    its scores (for the plots)."""
    from cards.stats import pair_stats_of

    rows, nbytes = 0, {"default": 0, "trl": 0}
    lengths: dict[str, list[float]] = {"chosen": [], "rejected": []}
    scores: dict[str, list[float]] = {"score_chosen": [], "score_rejected": []}
    for batch in catalog.read_batches(snap.id, _BATCH_ROWS):
        table = pa.Table.from_batches([batch])
        rows += table.num_rows
        nbytes["default"] += table.nbytes
        nbytes["trl"] += to_trl(table).nbytes
        for column, out in lengths.items():
            out.extend(float(len(conv[-1]["content"])) for conv in table.column(column).to_pylist())
        for column, out in scores.items():
            out.extend(table.column(column).to_pylist())
    schemas = {"default": KINDS["pairs"].schema, "trl": TRL_SCHEMA}
    files = {config: f"{config}/{name}-00000-of-00001.parquet" for config in schemas}
    for config in schemas:
        (folder / config).mkdir(exist_ok=True)
    for config, schema in schemas.items():  # one file per pass: one row group held at a time
        with ParquetOut(folder / files[config], schema, rows, nbytes[config], max_row_group_bytes) as out:
            for batch in catalog.read_batches(snap.id, _BATCH_ROWS):
                table = pa.Table.from_batches([batch])
                out.write(table if config == "default" else to_trl(table))
    stats = pair_stats_of(lengths["chosen"], lengths["rejected"], scores["score_chosen"], scores["score_rejected"])
    return list(files.values()), {c: num_bytes(folder / f) for c, f in files.items()}, stats, scores


def stage_repo(
    catalog: Catalog,
    repo_id: str,
    iterations: tuple[int, ...] | None,
    local_dir: Path | None,
    license: str = PUBLISH_DEFAULTS.license,
    max_row_group_bytes: int = PUBLISH_DEFAULTS.max_row_group_bytes,
) -> StagedRepo:
    """Write the repo folder. It is built in a scratch folder and moved into place, so it is whole or absent."""
    from cards import plots
    from cards.card import SplitInfo, render
    from cards.provenance import origins

    validate_repo_id(repo_id)
    snaps = published_snapshots(catalog, iterations)
    ids = {split_name(split, it): s.id for (it, split), s in snaps.items()}
    set_id = snapshot_set_id(list(ids.values()))
    # what decides the folder's content: the same stamp on a folder staged before means nothing to redo
    stamp = {
        "repo_id": repo_id,
        "set_id": set_id,
        "license": license,
        "max_row_group_bytes": max_row_group_bytes,
        "iterdpo": __version__,
    }
    if (files := staged_as(local_dir, stamp)) is not None:
        return StagedRepo(Path(local_dir), sorted(files), ids, set_id)
    with staging(local_dir, stamp=stamp) as st:
        scratch, files, infos, score_data = st.folder, st.files, [], {}
        for (it, split), snap in snaps.items():
            name = split_name(split, it)
            written, num_bytes_, stats, score_data[name] = _stage_split(
                catalog, snap, scratch, name, max_row_group_bytes
            )
            files += written
            infos.append(
                SplitInfo(
                    name,
                    it,
                    stats["rows"],
                    snap.params.get("prompt_count", stats["rows"]),
                    num_bytes_,
                    snap.params.get("drops", {}),
                    stats,
                    snap.id,
                    snap.params,
                )
            )
        (scratch / "plots").mkdir()
        plots.score_distributions(score_data, scratch / "plots" / "score_distributions.png")
        plots.length_by_iteration(
            {i.iteration: i.stats for i in infos if i.name.startswith("train_")},
            scratch / "plots" / "length_by_iteration.png",
        )
        files += ["plots/score_distributions.png", "plots/length_by_iteration.png"]
        lineage = origins(catalog, snaps)
        card = render(repo_id, infos, _features(), set_id, __version__, lineage, license)
        # The reward on test prompts per iteration (cards/reward_table.py), as its own block before Provenance.
        from cards.reward_table import add_to_card

        pinned = {it: o.scores.id for (it, split), o in lineage.items() if split == "test" and o.scores is not None}
        card, reward_files = add_to_card(catalog, card, scratch, sorted({it for it, _ in snaps}), pinned)
        files += reward_files
        (scratch / "README.md").write_text(card)
        files.append("README.md")
    return StagedRepo(st.target, sorted(files), ids, set_id)


def publish(catalog: Catalog, cfg: PublishConfig) -> PublishResult:
    """Stage the repo; unless dry-run, upload it as one commit, tag it, and record the publication. A snapshot set
    already published (and tagged) to that repo revision is found from its id alone, before any staging."""
    target = HubTarget(
        cfg.repo_id,
        "dataset",
        cfg.revision,
        cfg.private,
        cfg.max_retries,
        cfg.backoff,
        license=cfg.license,
        managed=MANAGED,
    )
    if not cfg.dry_run:
        validate_repo_id(cfg.repo_id)
        ids = {split_name(split, it): s.id for (it, split), s in published_snapshots(catalog, cfg.iterations).items()}
        set_id = snapshot_set_id(list(ids.values()))
        prior = recorded(catalog, target, set_id)
        if prior and prior["tag"]:
            return PublishResult(
                cfg.repo_id,
                cfg.revision,
                StagedRepo(None, [], ids, set_id),
                already_published=True,
                commit=prior["commit"],
                tag=prior["tag"],
                license=cfg.license,
            )
        check_token(target)  # before the folder is staged: a bad token fails in seconds
    staged = stage_repo(catalog, cfg.repo_id, cfg.iterations, cfg.local_dir, cfg.license, cfg.max_row_group_bytes)
    result = PublishResult(cfg.repo_id, cfg.revision, staged, dry_run=cfg.dry_run, license=cfg.license)
    if cfg.dry_run:
        return result
    up = upload(catalog, target, staged.folder, staged.files, staged.set_id, staged.snapshots)
    result.already_published, result.commit, result.tag = up.already_published, up.commit, up.tag
    return result
