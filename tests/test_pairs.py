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
    rank(catalog, 1, RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better"),
         progress=False)
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
    with pytest.raises(InputError, match="1 of 7 train prompts of iteration 1 have no generations or scores.*"
                                         "allow_partial"):
        build_pairs(catalog, 1, BuildConfig())
    assert catalog.list(kind="pairs") == []
    partial = build_pairs(catalog, 1, BuildConfig(allow_partial=True)).snapshots[0]
    assert partial.params["drops"]["missing"] == 1 and partial.params["selection"]["allow_partial"] is True
    assert partial.rows + sum(partial.params["drops"].values()) == 7


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
