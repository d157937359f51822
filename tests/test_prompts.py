"""The prompts stage: import from every supported source, dedupe, and disjoint deterministic splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders.catalog import Catalog
from builders.config import SplitConfig
from builders.errors import InputError
from builders.prompts import import_prompts, plan_split, split_prompts
from tests.conftest import SAMPLE


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_import_eval200_keys_are_sha256_of_stripped_text(catalog: Catalog, uf_data: Path):
    result = import_prompts(catalog, str(uf_data / "eval200.jsonl"))
    table = catalog.read(result.snapshot.id)
    expected = {
        hashlib.sha256(r["prompt"].strip().encode()).hexdigest(): r["prompt"].strip()
        for r in _rows(uf_data / "eval200.jsonl")
    }
    assert dict(zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist())) == expected
    assert result.column == "prompt"
    assert result.read == 200
    assert table.column("source").null_count == table.num_rows  # eval200 has no `source` column


def test_import_activeuf10_ignores_its_own_prompt_ids_and_keeps_source(catalog: Catalog, uf_data: Path):
    result = import_prompts(catalog, str(uf_data / "activeuf10.jsonl"))
    table = catalog.read(result.snapshot.id)
    rows = _rows(uf_data / "activeuf10.jsonl")
    assert table.num_rows == 10
    # its file says "prompt_0"...; ours is always the sha256 of the text, as ultrafeedback_binarized's
    assert all(len(pid) == 64 for pid in table.column("prompt_id").to_pylist())
    by_id = {r["prompt_id"]: r["source"] for r in table.to_pylist()}
    for r in rows:
        assert by_id[hashlib.sha256(r["prompt"].strip().encode()).hexdigest()] == r["source"]


def test_reimport_is_a_noop_with_the_same_id_and_no_new_rows(catalog: Catalog):
    first = import_prompts(catalog, str(SAMPLE))
    with catalog.connect() as con:
        rows_before = con.execute("SELECT count(*) FROM rows_prompts").fetchall()[0][0]
    second = import_prompts(catalog, str(SAMPLE))
    with catalog.connect() as con:
        rows_after = con.execute("SELECT count(*) FROM rows_prompts").fetchall()[0][0]
    assert second.snapshot.id == first.snapshot.id
    assert second.snapshot.created_at == first.snapshot.created_at
    assert rows_after == rows_before == 210
    assert len(catalog.list()) == 1


def test_strip_skip_empty_and_dedupe_are_counted(catalog: Catalog, tmp_path: Path):
    src = tmp_path / "p.jsonl"
    src.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"instruction": "  What is DPO?\n", "source": "evol"},
                {"instruction": "What is DPO?", "source": "other"},  # same text after stripping: a duplicate
                {"instruction": "   "},
                {"instruction": None},
                {"instruction": "Explain PairRM."},
            ]
        )
        + "\n"
    )
    result = import_prompts(catalog, str(src))
    assert result.column == "instruction"  # openbmb/UltraFeedback's column name is found without --column
    assert (result.read, result.skipped_empty, result.duplicates) == (5, 2, 1)
    rows = catalog.read(result.snapshot.id).to_pylist()
    assert sorted(r["prompt"] for r in rows) == ["Explain PairRM.", "What is DPO?"]
    assert {r["prompt"]: r["source"] for r in rows}["What is DPO?"] == "evol"  # first occurrence wins
    assert result.snapshot.params["skipped_empty"] == 2


def test_parquet_csv_json_and_dataset_folder_give_the_same_snapshot(catalog: Catalog, tmp_path: Path):
    rows = [{"question": f"Question number {i}?", "source": "s"} for i in range(7)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("question,source\n" + "".join(f'"{r["question"]}",s\n' for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "cols.json").write_text(json.dumps({"question": [r["question"] for r in rows], "source": ["s"] * 7}))
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    ids = {
        name: import_prompts(catalog, str(tmp_path / name)).snapshot.id
        for name in ("p.parquet", "p.csv", "p.json", "cols.json", "saved")
    }
    assert len(set(ids.values())) == 1, ids


def test_column_option_chooses_the_column(catalog: Catalog, tmp_path: Path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "ignored", "instruction": "chosen one"}) + "\n")
    result = import_prompts(catalog, str(src), column="instruction")
    assert catalog.read(result.snapshot.id).column("prompt").to_pylist() == ["chosen one"]


def test_hub_id_offline_is_a_clear_error(catalog: Catalog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="cannot load hub dataset 'openbmb/UltraFeedback'"):
        import_prompts(catalog, "openbmb/UltraFeedback")
    assert not catalog.exists()


# ----------------------------------------------------------------------------------------------------------- split
def test_split_sets_are_disjoint_sized_and_recorded(catalog: Catalog):
    pool = import_prompts(catalog, str(SAMPLE)).snapshot
    snaps = split_prompts(catalog, SplitConfig(iterations=3, train_size=40, test_size=10, seed=7))
    assert sorted((s.iteration, s.split, s.rows) for s in snaps) == [
        (i, split, n) for i in (1, 2, 3) for split, n in (("test", 10), ("train", 40))
    ]
    seen: set[str] = set()
    for s in snaps:
        ids = set(catalog.read(s.id).column("prompt_id").to_pylist())
        assert not ids & seen, "a prompt appears in two sets"
        seen |= ids
        assert s.parents == [pool.id]
        assert s.params["seed"] == 7
    assert len(seen) == 150


def test_split_is_deterministic_across_catalogs_and_import_order(tmp_path: Path):
    rows = _rows(SAMPLE)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    cfg = SplitConfig(iterations=2, train_size=30, test_size=5, seed=42)
    a, b = Catalog(tmp_path / "a.duckdb"), Catalog(tmp_path / "b.duckdb")
    import_prompts(a, str(SAMPLE))
    import_prompts(b, str(shuffled))
    ids_a = [s.id for s in split_prompts(a, cfg)]
    ids_b = [s.id for s in split_prompts(b, cfg)]
    assert ids_a == ids_b
    assert [s.id for s in split_prompts(a, cfg)] == ids_a  # again: a no-op
    assert len(a.list()) == 1 + 4
    other_seed = [s.id for s in split_prompts(b, SplitConfig(iterations=2, train_size=30, test_size=5, seed=43))]
    assert set(other_seed).isdisjoint(ids_b)


def test_iteration_sets_do_not_depend_on_how_many_iterations_are_drawn():
    pool = pa.table(
        {
            "prompt_id": [f"{i:064x}" for i in range(100)],
            "prompt": [str(i) for i in range(100)],
            "source": pa.array([None] * 100, pa.string()),
        }
    )
    two = plan_split(pool, SplitConfig(iterations=2, train_size=20, test_size=5))
    three = plan_split(pool, SplitConfig(iterations=3, train_size=20, test_size=5))
    for key in two:
        assert two[key].equals(three[key])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_size": -1}, "train-size must be at least 1"),
        ({"test_size": -5}, "test-size must be 0 or more"),
        ({"iterations": 0}, "iterations must be at least 1"),
        ({"train_size": 100, "test_size": 10}, "asked for 330 prompts .* but the pool holds 210"),
    ],
)
def test_split_rejects_bad_sizes_and_writes_nothing(catalog: Catalog, kwargs, message):
    import_prompts(catalog, str(SAMPLE))
    with pytest.raises(InputError, match=message):
        split_prompts(catalog, SplitConfig(**kwargs))
    assert len(catalog.list()) == 1


def test_split_without_a_pool_says_what_to_run(catalog: Catalog):
    with pytest.raises(InputError, match="prompts import"):
        split_prompts(catalog, SplitConfig(train_size=1, test_size=0))
