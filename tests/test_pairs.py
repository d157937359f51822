"""Pair selection (Snorkel's max-min and its options) and the build stage's schemas, drops and errors."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from builders.catalog import Catalog
from builders.config import BuildConfig, RankConfig
from builders.errors import InputError
from builders.pairs import TRL_SCHEMA, build_pairs, select, to_trl
from builders.rank import rank
from builders.schemas import KINDS
from tests.conftest import generations_catalog as _generations_catalog


def test_max_min_picks_top_and_bottom():
    cfg = BuildConfig()
    assert select(["a", "bb", "ccc"], [0.1, 0.9, -0.5], cfg) == (1, 2)
    # equal top scores: the lower response index wins, deterministically
    assert select(["a", "b", "c"], [1.0, 1.0, 0.0], cfg) == (0, 2)


def test_ties_distinctness_margin_and_length_penalty():
    cfg = BuildConfig()
    assert select(["a", "b"], [0.3, 0.3], cfg) == "tie"
    assert select(["a", "b"], [0.3, 0.3], BuildConfig(keep_ties=True)) == (0, 1)
    assert select(["same", "same", "same"], [1.0, 0.0, 2.0], cfg) == "single_distinct"
    assert select(["a", "b"], [0.30, 0.25], BuildConfig(min_margin=0.1)) == "below_margin"
    # a long answer with a slightly higher score loses once length is penalised
    long, short = "x" * 1000, "y" * 10
    assert select([long, short], [1.0, 0.9], cfg) == (0, 1)
    assert select([long, short], [1.0, 0.9], BuildConfig(length_penalty=0.001)) == (1, 0)
    # the worst-scored response copies the best: the rejected one must differ from the chosen one
    assert select(["good", "good", "bad"], [2.0, -1.0, 0.5], cfg) == (0, 2)


def _scored_catalog(path: Path, **kw) -> Catalog:
    catalog = _generations_catalog(path, **kw)
    rank(catalog, 1, RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better"), progress=False)
    return catalog


def test_build_registers_the_snorkel_schema_and_counts_drops(tmp_path):
    catalog = _scored_catalog(tmp_path / "c.duckdb")
    result = build_pairs(catalog, 1, BuildConfig())
    snap = result.snapshots[0]
    assert (snap.kind, snap.iteration, snap.split) == ("pairs", 1, "train")
    table = catalog.read(snap.id)
    assert table.schema.equals(KINDS["pairs"].schema)
    gens = catalog.read(catalog.newest("generations", 1, "train").id).to_pylist()
    for row in table.to_pylist():
        responses = [g["response"] for g in gens if g["prompt_id"] == row["prompt_id"]]
        assert row["all_generated_responses"] == responses
        assert row["all_rm_scores"] == [float(len(r)) for r in responses]
        assert row["chosen"][0] == {"content": row["prompt"], "role": "user"}
        assert row["chosen"][1]["role"] == "assistant"
        assert row["chosen"][1]["content"] == max(responses, key=len)
        assert row["score_chosen"] == max(row["all_rm_scores"]) and row["score_rejected"] == min(row["all_rm_scores"])
    drops = snap.params["drops"]
    assert table.num_rows + sum(drops.values()) == 6
    assert snap.parents == [catalog.newest("scores", 1, "train").id]
    assert snap.params["selection"]["selection"] == "max-min"
    trl = to_trl(table)
    assert trl.schema.equals(TRL_SCHEMA)
    first = trl.to_pylist()[0]
    assert first["prompt"] == [{"content": table.column("prompt")[0].as_py(), "role": "user"}]
    assert [m["role"] for m in first["chosen"]] == ["assistant"] == [m["role"] for m in first["rejected"]]


def test_build_streamed_in_small_batches_registers_the_same_pairs(tmp_path, monkeypatch):
    """Build reads its inputs and spools its pairs batch by batch: tiny batches give the same snapshot id."""
    import dataclasses

    import builders.pairs as pairs

    catalog = _scored_catalog(tmp_path / "c.duckdb", n_prompts=12)
    whole = build_pairs(catalog, 1, BuildConfig()).snapshots[0]
    other = tmp_path / "other.duckdb"
    _scored_catalog(other, n_prompts=12)
    monkeypatch.setattr(pairs, "_SPOOL_CHARS", 1)  # one pairs row per spooled batch
    small = Catalog(other, dataclasses.replace(catalog.config, path=other, chunk_rows=2))
    streamed = build_pairs(small, 1, BuildConfig()).snapshots[0]
    assert streamed.id == whole.id and streamed.params["drops"] == whole.params["drops"]
    assert small.read(streamed.id).equals(catalog.read(whole.id))


def test_missing_generations_need_allow_partial(tmp_path):
    source = _scored_catalog(tmp_path / "c.duckdb")
    prompts = source.read(source.newest("prompts", 1, "train").id)
    gens = source.read(source.newest("generations", 1, "train").id)
    scores = source.read(source.newest("scores", 1, "train").id)
    # a prompt set with one more prompt than was generated and scored
    extra = pa.table({"prompt_id": ["f" * 64], "prompt": ["An extra prompt?"], "source": pa.array([None], pa.string())})
    catalog = Catalog(tmp_path / "o.duckdb")
    p = catalog.register("prompts", pa.concat_tables([prompts, extra]), iteration=1, split="train")
    g = catalog.register("generations", gens, iteration=1, split="train", parents=[p.id])
    catalog.register("scores", scores, iteration=1, split="train", parents=[g.id])
    with pytest.raises(
        InputError, match="1 of 7 train prompts of iteration 1 have no generations or scores.*allow_partial"
    ):
        build_pairs(catalog, 1, BuildConfig())
    assert catalog.list(kind="pairs") == []
    partial = build_pairs(catalog, 1, BuildConfig(allow_partial=True)).snapshots[0]
    assert partial.params["drops"]["missing"] == 1 and partial.params["selection"]["allow_partial"] is True
    assert partial.rows + sum(partial.params["drops"].values()) == 7


def test_build_finds_its_inputs_by_kind_and_says_when_scores_record_none(tmp_path):
    source = _scored_catalog(tmp_path / "c.duckdb")
    expected = build_pairs(source, 1, BuildConfig()).snapshots[0]
    tables = {k: source.read(source.newest(k, 1, "train").id) for k in ("prompts", "generations", "scores")}
    catalog = Catalog(tmp_path / "o.duckdb")
    p = catalog.register("prompts", tables["prompts"], iteration=1, split="train")
    g = catalog.register("generations", tables["generations"], iteration=1, split="train", parents=[p.id])
    orphan = catalog.register("scores", tables["scores"], iteration=1, split="train")  # no lineage recorded
    with pytest.raises(InputError, match=f"scores snapshot {orphan.id[:12]} records no generations snapshot"):
        build_pairs(catalog, 1, BuildConfig())
    assert catalog.list(kind="pairs") == []
    # the generations recorded after another parent: found by kind, not position
    other = catalog.register("prompts", tables["prompts"].slice(0, 1), iteration=2, split="train")
    shifted = tables["scores"].set_column(
        2, "score", pa.array([x + 1.0 for x in tables["scores"].column("score").to_pylist()])
    )
    scores = catalog.register("scores", shifted, iteration=1, split="train", parents=[other.id, g.id])
    snap = build_pairs(catalog, 1, BuildConfig(), from_refs=[scores.id]).snapshots[0]
    assert (snap.params["generations"], snap.params["prompts"]) == (g.id, p.id)
    assert (
        catalog.read(snap.id)
        .select(["prompt_id", "chosen", "rejected"])
        .equals(source.read(expected.id).select(["prompt_id", "chosen", "rejected"]))
    )


def test_bad_build_options_and_missing_scores(tmp_path):
    catalog = _generations_catalog(tmp_path / "c.duckdb")
    with pytest.raises(InputError, match="has no scores.*rank first .iterdpo rank --iteration 1"):
        build_pairs(catalog, 1, BuildConfig())
    with pytest.raises(InputError, match="min_margin must be a finite number >= 0"):
        build_pairs(catalog, 1, BuildConfig(min_margin=-1))
    with pytest.raises(InputError, match="unknown selection"):
        build_pairs(catalog, 1, BuildConfig(selection="best-of-random"))


def test_cli_build_prints_drops(cli, tmp_path, catalog_path):
    _scored_catalog(catalog_path)
    out = cli("build", "--iteration", "1", "--min-margin", "1000000", "--allow-partial")
    assert out.code == 1 and "no train pairs left for iteration 1" in out.err
    ok = cli("build", "--iteration", "1", "--json")
    assert ok.code == 0 and ok.json()["splits"][0]["snapshot"]["kind"] == "pairs"


# ------------------------------------------------------------------------------- pairs refer to the rows they come from
def _long_catalog(path: Path, n_prompts: int = 200, n: int = 4, chars: int = 6000) -> tuple[Catalog, int]:
    """Prompts, generations of long responses and scores of iteration 1 (train); also the responses' text bytes."""
    import numpy as np

    rng = np.random.default_rng(0)

    def texts(count: int, length: int) -> list[str]:
        letters = rng.integers(97, 123, (count, length), dtype=np.uint8)
        return [row.tobytes().decode() for row in letters]

    prompts = [f"{i} {t}" for i, t in enumerate(texts(n_prompts, 300))]
    ids = [f"{i:064x}" for i in range(n_prompts)]
    catalog = Catalog(path)
    p = catalog.register(
        "prompts",
        pa.table({"prompt_id": ids, "prompt": prompts, "source": ["t"] * n_prompts}),
        iteration=1,
        split="train",
    )
    responses = texts(n_prompts * n, chars)
    gens = pa.table(
        {
            "prompt_id": [i for i in ids for _ in range(n)],
            "response_index": pa.array(list(range(n)) * n_prompts, pa.int32()),
            "response": responses,
            "finish_reason": ["stop"] * (n_prompts * n),
            "prompt_tokens": pa.array([3] * (n_prompts * n), pa.int32()),
            "completion_tokens": pa.array([9] * (n_prompts * n), pa.int32()),
        }
    )
    g = catalog.register("generations", gens, iteration=1, split="train", parents=[p.id])
    catalog.register(
        "scores",
        gens.select(["prompt_id", "response_index"]).append_column("score", pa.array(rng.normal(size=n_prompts * n))),
        iteration=1,
        split="train",
        parents=[g.id],
    )
    return catalog, sum(len(r.encode()) for r in responses)


def _stored_texts(catalog: Catalog) -> tuple[int, int]:
    """(pairs rows stored by reference, pairs rows stored in full)."""
    with catalog.connect(read_only=True) as con:
        return con.execute("SELECT count(prompt_ref), count(prompt) FROM rows_pairs").fetchone()


def test_build_stores_each_text_once_and_every_reader_sees_the_full_rows(tmp_path):
    import shutil

    from builders.export import export_snapshot

    catalog, text_bytes = _long_catalog(tmp_path / "refs.duckdb")
    shutil.copy(catalog.path, tmp_path / "full.duckdb")
    before = catalog.path.stat().st_size
    snap = build_pairs(catalog, 1, BuildConfig()).snapshots[0]
    grown = catalog.path.stat().st_size - before
    assert _stored_texts(catalog) == (snap.rows, 0)
    rows = catalog.read(snap.id)

    # the same rows registered in full (a user's table): same id, same rows, and the catalog grows by their texts
    full = Catalog(tmp_path / "full.duckdb")
    size = full.path.stat().st_size
    same = full.register("pairs", rows, iteration=1, split="train", parents=snap.parents)
    assert same.id == snap.id and _stored_texts(full) == (0, snap.rows)
    assert grown < 0.2 * text_bytes < full.path.stat().st_size - size
    assert full.read(snap.id).equals(rows)

    # streamed (one batch and many), with hashes, exported, verified, in the trl form: exactly the full rows
    for batch_rows in (7, 10_000):
        streamed = pa.Table.from_batches(list(catalog.read_batches(snap.id, batch_rows, with_hash=True)))
        assert streamed.equals(pa.Table.from_batches(list(full.read_batches(snap.id, batch_rows, with_hash=True))))
        assert streamed.drop_columns(["row_hash"]).equals(rows)
    for name in ("pairs.parquet", "pairs.jsonl"):
        export_snapshot(catalog, snap.id, tmp_path / f"refs-{name}")
        export_snapshot(full, snap.id, tmp_path / f"full-{name}")
        assert (tmp_path / f"refs-{name}").read_bytes() == (tmp_path / f"full-{name}").read_bytes()
    assert catalog.verify()["ok"] and catalog.verify()["unreferenced_rows"] == 0
    assert to_trl(rows).equals(to_trl(full.read(snap.id)))
    assert catalog.diff(snap.id, snap.id)["unchanged"] == snap.rows

    # a rerun stores nothing new; a merge into an empty catalog brings the referenced rows along
    assert build_pairs(catalog, 1, BuildConfig()).snapshots[0].id == snap.id
    merged = Catalog(tmp_path / "merged.duckdb")
    merged.merge([catalog.path])
    assert merged.read(snap.id).equals(rows) and merged.verify()["ok"]
    assert _stored_texts(merged) == (snap.rows, 0)


def test_pairs_whose_texts_are_not_in_the_catalog_are_stored_in_full(tmp_path):
    catalog, _ = _long_catalog(tmp_path / "c.duckdb", n_prompts=6, chars=50)
    rows = catalog.read(build_pairs(catalog, 1, BuildConfig()).snapshots[0].id)
    sources = (catalog.newest("prompts", 1, "train").id, catalog.newest("generations", 1, "train").id)
    # other prompts (a user's table of iteration 2): the named snapshots' rows do not hold them
    mine = rows.set_column(1, "prompt", pa.array([p + "!" for p in rows.column("prompt").to_pylist()]))
    mine = mine.set_column(
        2,
        "chosen",
        pa.array(
            [[{"content": c[0]["content"] + "!", "role": "user"}, c[1]] for c in rows.column("chosen").to_pylist()],
            mine.schema.field(2).type,
        ),
    )
    # rows whose texts differ from the sources' in other ways: only the exact rows are stored by reference
    edited = rows.to_pylist()
    edited[0]["all_generated_responses"][0] += " (edited)"
    edited[1]["chosen"][1]["content"] = edited[1]["all_generated_responses"][-1] + "x"
    edited[2]["score_chosen"] = 99.0
    edited = pa.Table.from_pylist(edited, schema=rows.schema)
    before = _stored_texts(catalog)
    a = catalog.register("pairs", mine, iteration=2, split="train", texts_from=sources)
    b = catalog.register("pairs", edited, iteration=3, split="train", texts_from=sources)
    assert catalog.read(a.id).equals(mine) and catalog.read(b.id).equals(edited)
    assert b.id == Catalog(tmp_path / "other.duckdb").register("pairs", edited, iteration=3, split="train").id
    # mine: in full; edited: rows 0 and 1 in full (texts differ), row 2 by reference (only a score differs), the
    # others are iteration 1's rows (stored already)
    assert _stored_texts(catalog) == (before[0] + 1, before[1] + mine.num_rows + 2)
    assert catalog.verify()["ok"]


def test_texts_from_must_name_a_prompts_and_a_generations_snapshot(tmp_path):
    catalog, _ = _long_catalog(tmp_path / "c.duckdb", n_prompts=6, chars=50)
    snap = build_pairs(catalog, 1, BuildConfig()).snapshots[0]
    rows = catalog.read(snap.id).slice(0, 2)
    rows = rows.set_column(6, "score_chosen", pa.array([99.0, 98.0]))  # rows not stored yet, the same texts
    prompts, gens = catalog.newest("prompts", 1, "train").id, catalog.newest("generations", 1, "train").id
    scores = catalog.newest("scores", 1, "train").id
    before = (catalog.list(), _stored_texts(catalog))
    for names, message in (
        ((prompts, scores), "'.*' is a scores snapshot"),
        ((gens, gens), "is another generations snapshot"),
        ((prompts,), "not 1 snapshot"),
    ):
        with pytest.raises(InputError, match=message):
            catalog.register("pairs", rows, iteration=2, split="train", texts_from=names)
    with pytest.raises(InputError, match="of scores rows"):
        catalog.register("scores", catalog.read(scores), iteration=2, split="train", texts_from=(prompts, gens))
    assert (catalog.list(), _stored_texts(catalog)) == before  # refused before anything was stored
    # named by tag and selector as well as by id; the order does not matter
    catalog.tag(gens, "gens-1")
    stored = catalog.register("pairs", rows, iteration=2, split="train", texts_from=("gens-1", "prompts:1:train"))
    assert _stored_texts(catalog) == (before[1][0] + 2, before[1][1]) and catalog.read(stored.id).equals(rows)


def test_gc_keeps_the_rows_that_stored_pairs_refer_to(tmp_path):
    catalog, _ = _long_catalog(tmp_path / "c.duckdb", n_prompts=6, chars=50)
    snap = build_pairs(catalog, 1, BuildConfig()).snapshots[0]
    rows = catalog.read(snap.id)
    referenced = sum(len(r) for r in rows.column("all_generated_responses").to_pylist())
    # a referenced row that is gone (a damaged file) is reported by verify, and a read says what is wrong
    import shutil

    from builders.errors import CatalogError

    broken = Catalog(shutil.copy(catalog.path, tmp_path / "broken.duckdb"))
    with broken.connect() as con:
        con.execute("DELETE FROM rows_generations WHERE row_id = (SELECT min(row_id) FROM rows_generations)").fetchall()
    assert [p for p in broken.verify()["problems"] if p.startswith(snap.id[:12]) and "not in the catalog" in p]
    with pytest.raises(CatalogError, match="refer to generations rows that are not in the catalog"):
        broken.read(snap.id)

    def drop(kind: str) -> None:  # as if the snapshot were gone: its rows belong to no snapshot
        with catalog.connect() as con:
            con.execute(
                "DELETE FROM snapshot_rows WHERE seq = (SELECT seq FROM snapshots WHERE id = ?)",
                [catalog.newest(kind, 1, "train").id],
            ).fetchall()

    drop("prompts")
    drop("generations")
    report = catalog.gc()
    n_gens = catalog.newest("generations", 1, "train").rows
    assert report["rows_removed_by_kind"]["generations"] == n_gens - referenced
    assert report["rows_removed_by_kind"]["prompts"] == 6 - rows.num_rows
    assert catalog.read(snap.id).equals(rows)
    assert not [p for p in catalog.verify()["problems"] if p.startswith(snap.id[:12])]
    # once no snapshot holds the pairs either, their rows go, and then the rows they referred to
    drop("pairs")
    report = catalog.gc()
    assert report["rows_removed_by_kind"]["pairs"] == rows.num_rows
    assert report["rows_removed_by_kind"]["generations"] == referenced
    assert report["rows_removed_by_kind"]["prompts"] == rows.num_rows


_BUILD_THEN_HANG = """
import sys, time
import builders.catalog as c
import builders.catalog.store as store
from builders.config import BuildConfig
from builders.pairs import build_pairs
original = store.insert_rows
def slow(*args):
    out = original(*args)
    print("inserted", flush=True)
    time.sleep(60)
    return out
store.insert_rows = slow
build_pairs(c.Catalog(sys.argv[1]), 1, BuildConfig())
"""


def test_a_build_killed_while_storing_referencing_rows_leaves_the_catalog_as_before(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    catalog, _ = _long_catalog(tmp_path / "c.duckdb", n_prompts=6, chars=50)
    before = [s.id for s in catalog.list()]
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD_THEN_HANG, str(catalog.path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "inserted"  # pairs rows in, their transaction not committed
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert [s.id for s in catalog.list()] == before and _stored_texts(catalog) == (0, 0)
    assert catalog.verify()["ok"] and catalog.verify()["unreferenced_rows"] == 0
    snap = build_pairs(catalog, 1, BuildConfig()).snapshots[0]  # and a rerun completes
    assert _stored_texts(catalog) == (snap.rows, 0) and catalog.verify()["ok"]
