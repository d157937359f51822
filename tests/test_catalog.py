"""The catalog: content addressing, lineage, tags, diff, export, verify, merge, resumable work, and the file's safety
under kills and concurrent processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders.catalog import SCHEMA_VERSION, Catalog, row_hashes, snapshot_id
from builders.config import CatalogConfig, SplitConfig
from builders.errors import CatalogBusy, CatalogError, InputError, NotFound
from builders.prompts import import_prompts, split_prompts
from builders.schemas import KINDS
from tests.conftest import ROOT, SAMPLE


def gens(prompt_ids: list[str], n: int = 3, text: str = "answer") -> pa.Table:
    rows = [
        {
            "prompt_id": p,
            "response_index": i,
            "response": f"{text} {p[:6]} {i}",
            "finish_reason": "stop",
            "prompt_tokens": 10,
            "completion_tokens": 5 + i,
        }
        for p in prompt_ids
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows)


def pids(k: int, start: int = 0) -> list[str]:
    return [f"{i:064x}" for i in range(start, start + k)]


def count(catalog: Catalog, table: str) -> int:
    with catalog.connect() as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]


def test_id_is_content_only_and_rows_are_shared(catalog: Catalog):
    table = gens(pids(4))
    a = catalog.register("generations", table, iteration=1, split="train", params={"seed": 1})
    # the same rows in another order, with other params and parents: the same snapshot
    b = catalog.register(
        "generations",
        table.take([5, 3, 1, 0, 2, 4, 6, 7, 8, 9, 10, 11]),
        iteration=1,
        split="train",
        params={"seed": 999},
    )
    assert a.id == b.id and b.params["seed"] == 1
    assert a.id == snapshot_id("generations", 1, "train", row_hashes(catalog.read(a.id)))
    # the same rows for another split are another snapshot, but no row is stored twice
    c = catalog.register("generations", table, iteration=1, split="test")
    assert c.id != a.id
    assert count(catalog, "rows_generations") == 12
    # one changed row adds one row
    changed = table.set_column(2, "response", pa.array(["x"] + table.column("response").to_pylist()[1:]))
    d = catalog.register("generations", changed, iteration=1, split="train")
    assert d.id != a.id and count(catalog, "rows_generations") == 13
    assert catalog.read(a.id).equals(catalog.read(b.id))


def test_params_carry_the_iterdpo_version_and_parents_are_kept(catalog: Catalog):
    from builders import __version__

    p = catalog.register("prompts", pa.table({"prompt_id": ["a" * 64], "prompt": ["x"], "source": [None]}))
    g = catalog.register("generations", gens(["a" * 64]), iteration=1, split="train", parents=[p.id])
    assert g.parents == [p.id] and g.params["iterdpo_version"] == __version__
    with pytest.raises(NotFound, match="parent snapshot"):
        catalog.register("generations", gens(["b" * 64]), iteration=1, split="train", parents=["f" * 64])


def test_duplicate_and_null_keys_and_nan_are_rejected(catalog: Catalog):
    t = gens(pids(1), n=2)
    with pytest.raises(InputError, match="repeat the key"):
        catalog.register("generations", pa.concat_tables([t, t]))
    with pytest.raises(InputError, match="NaN"):
        catalog.register("scores", pa.table({"prompt_id": ["a"], "response_index": [0], "score": [float("nan")]}))
    with pytest.raises(InputError, match="lack column"):
        catalog.register("scores", pa.table({"prompt_id": ["a"]}))
    assert not catalog.list()


def test_list_newest_get_by_prefix_and_tag(catalog: Catalog):
    a = catalog.register("generations", gens(pids(2)), iteration=1, split="train")
    b = catalog.register("generations", gens(pids(3)), iteration=1, split="train")
    assert catalog.newest("generations", 1, "train").id == b.id
    assert catalog.newest("generations", 2, "train") is None
    assert [s.id for s in catalog.list(kind="generations")] == [a.id, b.id]
    assert catalog.get(a.id[:8]).id == a.id
    catalog.tag(a.id, "first")
    assert catalog.get("first").id == a.id and catalog.get(a.id).tags == ["first"]
    with pytest.raises(InputError, match="already names"):
        catalog.tag(b.id, "first")
    assert catalog.tag(b.id, "first", force=True).tags == ["first"]
    with pytest.raises(NotFound, match="no snapshot or tag 'nope'"):
        catalog.get("nope")


def test_lineage_is_named_by_kind_whatever_the_order_of_the_parents(catalog: Catalog, tmp_path: Path):
    def prompts(ids: list[str]) -> pa.Table:
        return pa.table({"prompt_id": ids, "prompt": [f"prompt {i[-3:]}" for i in ids], "source": [None] * len(ids)})

    pool = catalog.register("prompts", prompts(pids(4)))
    other_pool = catalog.register("prompts", prompts(pids(2, start=8)))
    prompt_set = catalog.register("prompts", prompts(pids(2)), iteration=1, split="train", parents=[pool.id])
    model = catalog.register(
        "model",
        pa.table(
            {"path": ["/m"], "weights_sha256": ["0" * 64], "base_model": ["b"], "recipe": ["r"], "metrics": ["{}"]}
        ),
        iteration=1,
    )
    gen_a = catalog.register(
        "generations", gens(pids(2)), iteration=1, split="train", parents=[prompt_set.id, model.id]
    )
    gen_b = catalog.register(
        "generations", gens(pids(2), text="other"), iteration=1, split="train", parents=[model.id, prompt_set.id]
    )  # the same inputs, recorded in another order
    scores = catalog.register(
        "scores",
        gens(pids(2)).select(["prompt_id", "response_index"]).append_column("score", pa.array([0.5] * 6)),
        iteration=1,
        split="train",
        parents=[gen_a.id],
    )
    for gen in (gen_a, gen_b):
        assert catalog.parent(gen, "prompts").id == prompt_set.id and catalog.parent(gen, "model").id == model.id
        assert catalog.parent(gen, "scores") is None
    assert [s.id for s in catalog.parents(gen_b)] == [model.id, prompt_set.id] == gen_b.parents
    assert [s.id for s in catalog.parents(gen_b, "prompts")] == [prompt_set.id]
    assert catalog.parent(prompt_set, "prompts").id == pool.id and catalog.parent(pool, "prompts") is None
    # a snapshot named as `get` takes it (id prefix, tag, selector)
    catalog.tag(scores.id, "scored")
    for ref in (scores.id[:8], "scored", "scores:1:train"):
        assert catalog.parent(ref, "generations").id == gen_a.id
    # several inputs of one kind (a prompt set drawn from two pools): the first recorded, and all of them
    union = catalog.register(
        "prompts", prompts(pids(2, start=20)), iteration=2, split="train", parents=[other_pool.id, pool.id]
    )
    assert catalog.parent(union, "prompts").id == other_pool.id
    assert [s.id for s in catalog.parents(union, "prompts")] == [other_pool.id, pool.id]
    with pytest.raises(InputError, match="unknown snapshot kind"):
        catalog.parent(gen_a, "prompt")
    # lineage comes along with a merge
    merged = Catalog(tmp_path / "merged.duckdb")
    merged.merge([catalog.path])
    assert merged.parent(gen_b.id, "prompts").id == prompt_set.id and merged.parent(gen_b.id, "model").id == model.id


def test_a_shard_is_flagged_and_never_taken_for_the_complete_snapshot(catalog: Catalog, tmp_path: Path):
    part = catalog.register("generations", gens(pids(2)), iteration=1, split="train", shard="0/2")
    assert part.shard == "0/2" and part.params["shard"] == "0/2" and catalog.get(part.id).shard == "0/2"
    # a shard recorded in the params (as catalogs written so far hold it) is the same flag
    other = catalog.register("generations", gens(pids(2, start=2)), iteration=1, split="train", params={"shard": "1/2"})
    assert catalog.get(other.id).shard == "1/2"
    assert catalog.newest("generations", 1, "train") is None
    with pytest.raises(NotFound, match="no generations:1:train snapshot"):
        catalog.get("generations:1:train")
    full = catalog.register("generations", gens(pids(4)), iteration=1, split="train")
    assert full.shard is None and catalog.newest("generations", 1, "train").id == full.id
    assert catalog.get("generations:1:train").id == full.id
    assert [s.shard for s in catalog.list()] == ["0/2", "1/2", None]
    # the flag is not content: the same rows are the same id
    assert (
        part.id == Catalog(tmp_path / "x.duckdb").register("generations", gens(pids(2)), iteration=1, split="train").id
    )
    # a flag that contradicts the params, or names no part, is refused before anything is stored
    for shard, params in (("0/3", {"shard": "1/3"}), ("", {}), (" ", {})):
        with pytest.raises(InputError, match="shard"):
            catalog.register(
                "generations", gens(pids(1, start=30)), iteration=1, split="train", shard=shard, params=params
            )
    assert len(catalog.list()) == 3 and count(catalog, "rows_generations") == 12


def test_diff_on_two_real_snapshots(catalog: Catalog):
    import_prompts(catalog, str(SAMPLE))
    snaps = {(s.iteration, s.split): s for s in split_prompts(catalog, SplitConfig(2, 30, 5, 1))}
    a, b = snaps[(1, "train")], snaps[(2, "train")]
    d = catalog.diff(a.id, b.id)
    assert len(d["added"]) == 30 and len(d["removed"]) == 30 and d["changed"] == [] and d["unchanged"] == 0
    # a real edit: the same prompt ids, one prompt text changed
    rows = catalog.read(a.id).to_pylist()
    rows[0]["prompt"] += " (edited)"
    edited = catalog.register("prompts", pa.Table.from_pylist(rows), iteration=1, split="train")
    d = catalog.diff(a.id, edited.id)
    assert d["changed"] == [{"prompt_id": rows[0]["prompt_id"]}] and d["unchanged"] == 29
    assert not d["added"] and not d["removed"]
    with pytest.raises(InputError, match="cannot diff"):
        catalog.diff(a.id, catalog.register("generations", gens(pids(1))).id)


def test_export_parquet_and_jsonl_have_the_row_schema(catalog: Catalog, tmp_path: Path):
    snap = catalog.register("generations", gens(pids(5)), iteration=1, split="train")
    from builders.export import export_snapshot

    export_snapshot(catalog, snap.id, tmp_path / "g.parquet")
    table = pq.read_table(tmp_path / "g.parquet")
    assert table.schema.equals(catalog.read(snap.id).schema)
    assert table.equals(catalog.read(snap.id))
    export_snapshot(catalog, snap.id, tmp_path / "g.jsonl")
    lines = (tmp_path / "g.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == table.to_pylist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.duckdb", "g.jsonl", "g.parquet"]  # no temp files


def test_read_batches_stream_the_snapshot_in_canonical_order(catalog: Catalog):
    """Batched reading gives exactly `read`'s rows, in order, in batches of the size asked, whatever the size."""
    import random

    ids = pids(23)
    random.Random(0).shuffle(ids)  # registered out of key order
    snap = catalog.register("generations", gens(ids), iteration=1, split="train")
    catalog.register("generations", gens(pids(9, start=100)), iteration=2, split="train")  # other rows beside
    whole = catalog.read(snap.id)
    for size in (1, 4, 25, 69, 1000):
        batches = list(catalog.read_batches(snap.id, size))
        assert [b.num_rows for b in batches[:-1]] == [size] * (len(batches) - 1) and batches[-1].num_rows <= size
        assert pa.Table.from_batches(batches).equals(whole)
    some = pa.Table.from_batches(
        list(catalog.read_batches(snap.id, 10, columns=["prompt_id", "response"], with_hash=True))
    )
    assert some.column_names == ["row_hash", "prompt_id", "response"]
    assert some.drop_columns(["row_hash"]).equals(whole.select(["prompt_id", "response"]))
    assert some.column("row_hash").to_pylist() == row_hashes(whole)
    with pytest.raises(InputError, match="no column"):
        list(catalog.read_batches(snap.id, columns=["nope"]))


def test_export_is_written_batch_by_batch_as_one_parquet_file_of_the_whole_table(catalog: Catalog, tmp_path: Path):
    """A large snapshot exports to the file pyarrow writes from the whole table (one row group per chunk_rows)."""
    import dataclasses

    from builders.export import export_snapshot

    small = Catalog(catalog.path, dataclasses.replace(catalog.config, chunk_rows=7))
    snap = small.register("generations", gens(pids(10)), iteration=1, split="train")
    export_snapshot(small, snap.id, tmp_path / "g.parquet")
    pq.write_table(small.read(snap.id), tmp_path / "whole.parquet", row_group_size=7)
    assert (tmp_path / "g.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert pq.ParquetFile(tmp_path / "g.parquet").num_row_groups == 5


def test_verify_detects_a_tampered_row(catalog: Catalog):
    snap = catalog.register("generations", gens(pids(3)), iteration=1, split="train")
    assert catalog.verify()["ok"]
    with catalog.connect() as con:
        con.execute("UPDATE rows_generations SET response = 'tampered' WHERE response_index = 1").fetchall()
    report = catalog.verify()
    assert not report["ok"]
    assert any(snap.id[:12] in p and "do not match" in p for p in report["problems"])


def test_work_is_resumable_hidden_and_merged(catalog: Catalog, tmp_path: Path):
    key = "work-key-1"
    catalog.add_work(key, "generations", gens(pids(2)), {p: None for p in pids(2)}, iteration=1, split="train")
    catalog.add_work(key, "generations", gens(pids(2)), {p: None for p in pids(2)})  # a replayed batch: no-op
    assert set(catalog.work_units(key)) == set(pids(2))
    assert catalog.list() == []  # work in progress is not a snapshot
    # a shard on a copy of the catalog finishes other prompts; merging brings them back, twice is a no-op
    shard = Catalog(tmp_path / "shard.duckdb")
    shard.add_work(
        key,
        "generations",
        gens(pids(2, start=2)),
        {p: {"skipped": False} for p in pids(2, start=2)},
        iteration=1,
        split="train",
    )
    shard_snap = shard.register("generations", gens(pids(2, start=2)), iteration=1, split="train")
    first = catalog.merge([shard.path])
    again = catalog.merge([shard.path])
    assert first["merged"][0]["snapshots"] == 1 and again["merged"][0]["snapshots"] == 0
    assert again["merged"][0]["rows"] == 0 and again["merged"][0]["work_units"] == 0
    assert set(catalog.work_units(key)) == set(pids(4))
    assert catalog.work_units(key)[pids(1, start=2)[0]] == {"skipped": False}
    full = catalog.work_rows(key)
    assert full.num_rows == 12
    # registering from the merged work equals registering the whole thing at once
    assert (
        catalog.register("generations", full, iteration=1, split="train").id
        == Catalog(tmp_path / "fresh.duckdb").register("generations", gens(pids(4)), iteration=1, split="train").id
    )
    assert catalog.get(shard_snap.id).rows == 6
    assert catalog.verify()["ok"]
    with pytest.raises(InputError, match="into itself"):
        catalog.merge([catalog.path])


# ------------------------------------------------------------------------------------------------------ file safety
def test_corrupt_file_foreign_database_and_newer_schema_are_clear_errors(tmp_path: Path):
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogError, match="cannot be opened"):
        Catalog(bad).list()
    foreign = tmp_path / "foreign.duckdb"
    con = duckdb.connect(str(foreign))
    con.execute("CREATE TABLE t(x INTEGER)").fetchall()
    con.close()
    with pytest.raises(CatalogError, match="not an iterdpo catalog"):
        Catalog(foreign).list()
    newer = Catalog(tmp_path / "newer.duckdb")
    newer.register("generations", gens(pids(1)))
    with newer.connect() as con:
        con.execute(
            "UPDATE iterdpo_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)]
        ).fetchall()
    with pytest.raises(CatalogError, match="newer than this iterdpo"):
        newer.list()


_REGISTER_SLOWLY = textwrap.dedent("""
    import sys, time, pyarrow as pa
    from builders.catalog import Catalog
    from builders.config import CatalogConfig
    import builders.catalog.store as store
    original = store.insert_rows
    def slow(*args):
        out = original(*args)
        print("inserted", flush=True)
        time.sleep(float(sys.argv[3]))
        return out
    store.insert_rows = slow
    cat = Catalog(sys.argv[1], CatalogConfig(sys.argv[1], lock_timeout=30))
    n = int(sys.argv[2])
    rows = [{"prompt_id": f"{i:064x}", "response_index": 0, "response": "r" * 50, "finish_reason": "stop",
             "prompt_tokens": 1, "completion_tokens": 1} for i in range(n)]
    snap = cat.register("generations", pa.Table.from_pylist(rows), iteration=1, split="train")
    print("done", snap.id, flush=True)
""")


def _spawn(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_kill_during_registration_leaves_the_catalog_clean(catalog: Catalog):
    keep = catalog.register("generations", gens(pids(2)), iteration=2, split="train")
    proc = _spawn(_REGISTER_SLOWLY, str(catalog.path), "2000", "60")
    assert proc.stdout.readline().strip() == "inserted"  # rows are in, the transaction is not committed
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert [s.id for s in catalog.list()] == [keep.id]
    report = catalog.verify()
    assert report["ok"], report
    assert count(catalog, "rows_generations") == 6  # the killed transaction's rows are gone


_ADD_WORK_THEN_HANG = textwrap.dedent("""
    import sys, time
    import builders.catalog as c
    import builders.catalog.store as store
    from tests.test_catalog import gens, pids
    original = store.insert_rows
    def slow(*args):
        out = original(*args)
        print("inserted", flush=True)
        time.sleep(60)
        return out
    store.insert_rows = slow
    c.Catalog(sys.argv[1]).add_work("key", "generations", gens(pids(2, start=2)), {p: None for p in pids(2, start=2)})
""")


def test_a_killed_commit_of_work_leaves_nothing_and_every_replay_lands_once(catalog: Catalog):
    def state() -> tuple[int, int, int]:
        return tuple(count(catalog, t) for t in ("rows_generations", "work_rows", "work_units"))

    key, first = "key", {p: None for p in pids(2)}
    catalog.add_work(key, "generations", gens(pids(2)), first)
    # this process lives on between its transactions without holding the file: another one commits (and dies)
    proc = _spawn(_ADD_WORK_THEN_HANG, str(catalog.path))
    assert proc.stdout.readline().strip() == "inserted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert state() == (6, 6, 2) and set(catalog.work_units(key)) == set(pids(2))
    # the killed batch committed again lands once; replaying it, or an older batch, changes nothing
    batch = {p: None for p in pids(2, start=2)}
    for _ in range(2):
        catalog.add_work(key, "generations", gens(pids(2, start=2)), batch)
    catalog.add_work(key, "generations", gens(pids(2)), first)
    assert state() == (12, 12, 4)
    # a unit without rows (a skipped prompt), replayed; rows already stored, committed under another work key
    skipped = {pids(1, start=9)[0]: {"skipped": "too_long"}}
    for _ in range(2):
        catalog.add_work(key, "generations", gens(pids(1)).slice(0, 0), skipped)
    catalog.add_work("other", "generations", gens(pids(1)), {pids(1)[0]: None})
    assert state() == (12, 15, 6)
    assert catalog.work_units(key)[pids(1, start=9)[0]] == {"skipped": "too_long"}
    assert catalog.work_rows("other").equals(catalog.work_rows(key, units=pids(1)))
    assert catalog.verify()["ok"]


def test_two_concurrent_writers_both_land(catalog: Catalog):
    # each holds the file for a second inside its transaction; the other waits for it, then lands too
    a = _spawn(_REGISTER_SLOWLY, str(catalog.path), "300", "1.0")
    b = _spawn(_REGISTER_SLOWLY.replace('f"{i:064x}"', 'f"{i + 10**6:064x}"'), str(catalog.path), "300", "1.0")
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    assert len(catalog.list()) == 2
    assert catalog.verify()["ok"]


def test_a_writer_waits_then_fails_clearly_when_the_catalog_stays_busy(catalog: Catalog):
    catalog.register("generations", gens(pids(1)))
    holder = _spawn(
        "import sys, time, duckdb; con = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(30)",
        str(catalog.path),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        impatient = Catalog(catalog.path, CatalogConfig(catalog.path, lock_timeout=1.0))
        start = time.monotonic()
        with pytest.raises(CatalogBusy, match="held by another process .*ITERDPO_LOCK_TIMEOUT"):
            impatient.register("generations", gens(pids(1, start=5)))
        assert 0.9 < time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    assert len(catalog.list()) == 1


def test_merge_of_copied_catalog_file(catalog: Catalog, tmp_path: Path):
    import_prompts(catalog, str(SAMPLE))
    copy = tmp_path / "copy.duckdb"
    shutil.copy(catalog.path, copy)
    shard = Catalog(copy)
    extra = shard.register("generations", gens(pids(2)), iteration=1, split="train")
    shard.tag(extra.id, "from-shard")
    catalog.merge([copy])
    assert catalog.get("from-shard").id == extra.id
    assert catalog.read(extra.id).equals(shard.read(extra.id))


def test_row_hash_definition_is_length_prefixed_and_null_aware():
    import hashlib
    import struct

    table = pa.table({"prompt_id": ["ab"], "prompt": ["c"], "source": pa.array([None], pa.string())})

    def text(s: str) -> bytes:
        return b"\x01" + struct.pack("<q", len(s.encode())) + s.encode()

    assert row_hashes(table) == [hashlib.sha256(text("ab") + text("c") + b"\x00").digest()]
    # boundaries and nulls are part of the content
    moved = pa.table({"prompt_id": ["a"], "prompt": ["bc"], "source": pa.array([None], pa.string())})
    empty = pa.table({"prompt_id": ["ab"], "prompt": ["c"], "source": [""]})
    assert len({*row_hashes(table), *row_hashes(moved), *row_hashes(empty)}) == 3
    nested = pa.table({"l": [["ab", "c"], ["a", "bc"], [], None]})
    assert len(set(row_hashes(nested))) == 4


def test_rows_of_an_interrupted_registration_are_reported_and_reused(catalog: Catalog, monkeypatch):
    keep = catalog.register("generations", gens(pids(2)), iteration=1, split="train")
    big = gens(pids(4, start=10))

    def crash(self, con, item, sid, hashes):
        raise KeyboardInterrupt  # the process is stopped after the rows, before the snapshot

    monkeypatch.setattr(Catalog, "_record", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog.register("generations", big, iteration=1, split="train")
    monkeypatch.undo()
    report = catalog.verify()
    assert report["ok"] and report["unreferenced_rows"] == 12
    assert [s.id for s in catalog.list()] == [keep.id]
    catalog.register("generations", big, iteration=1, split="train")  # the retry stores nothing new
    assert count(catalog, "rows_generations") == 6 + 12 and catalog.verify()["unreferenced_rows"] == 0


def _interrupted_registration(catalog: Catalog, monkeypatch, table: pa.Table) -> None:
    """Rows stored, then the process stopped before the snapshot was recorded."""

    def crash(self, con, item, sid, hashes):
        raise KeyboardInterrupt

    monkeypatch.setattr(Catalog, "_record", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog.register("generations", table, iteration=1, split="train")
    monkeypatch.undo()


def test_gc_removes_rows_of_no_snapshot_and_keeps_snapshots_and_work(catalog: Catalog, monkeypatch):
    import_prompts(catalog, str(SAMPLE))
    split_prompts(catalog, SplitConfig(1, 20, 5, 1))
    keep = catalog.register("generations", gens(pids(3)), iteration=1, split="train")
    catalog.add_work(
        "w1", "generations", gens(pids(2, start=50)), {p: None for p in pids(2, start=50)}, iteration=1, split="train"
    )  # work in progress: a rerun resumes from it
    _interrupted_registration(catalog, monkeypatch, gens(pids(4, start=10)))
    before = {s.id: catalog.read(s.id) for s in catalog.list()}
    work_before = catalog.work_rows("w1")
    assert catalog.verify()["unreferenced_rows"] == 12

    dry = catalog.gc(dry_run=True)
    assert dry["rows_removed"] == 12 and catalog.verify()["unreferenced_rows"] == 12
    report = catalog.gc()
    assert report["rows_removed"] == 12 and report["rows_removed_by_kind"]["generations"] == 12
    assert report["bytes_freed"] >= 0 and report["file_bytes"] == catalog.path.stat().st_size
    after = catalog.verify()
    assert after["ok"] and after["unreferenced_rows"] == 0
    assert count(catalog, "rows_generations") == 9 + 6  # the snapshot's and the work's rows
    assert {s.id: catalog.read(s.id) for s in catalog.list()}.keys() == before.keys()
    assert all(catalog.read(sid).equals(table) for sid, table in before.items())
    assert catalog.work_rows("w1").equals(work_before) and catalog.get(keep.id).rows == 9
    assert catalog.gc()["rows_removed"] == 0  # nothing left to remove
    # the rows can be stored again by a retry
    assert catalog.register("generations", gens(pids(4, start=10)), iteration=1, split="train").rows == 12
    assert catalog.verify()["ok"]


@pytest.mark.parametrize("name", ["prompts", "generations:1", "pairs:2:train", "beef", "BEEF", "2024", "a" * 64])
def test_tags_that_read_as_selectors_or_id_prefixes_are_refused(catalog: Catalog, name: str):
    snap = catalog.register("generations", gens(pids(1)), iteration=1, split="train")
    with pytest.raises(InputError, match="reads as"):
        catalog.tag(snap.id, name)
    assert catalog.get(snap.id).tags == []


def test_tags_that_read_as_neither_are_kept(catalog: Catalog):
    snap = catalog.register("generations", gens(pids(1)), iteration=1, split="train")
    for name in ("best", "prompts-v1", "abc", "prompts:1:dev", "v2024"):
        catalog.tag(snap.id, name)
        assert catalog.get(name).id == snap.id


def test_merge_checks_every_source_before_merging_any(catalog: Catalog, tmp_path: Path):
    catalog.register("generations", gens(pids(1)), iteration=1, split="train")
    good = Catalog(tmp_path / "good.duckdb")
    good.register("generations", gens(pids(2, start=5)), iteration=1, split="train")
    bad = tmp_path / "bad.txt"
    bad.write_text("not a catalog\n")
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()  # a DuckDB file without the catalog's tables
    before = [s.id for s in catalog.list()]
    for source, message in (
        (bad, "cannot be opened"),
        (empty, "not an iterdpo catalog"),
        (tmp_path / "missing.duckdb", "does not exist"),
    ):
        with pytest.raises((CatalogError, InputError), match=message):
            catalog.merge([good.path, source])
        assert [s.id for s in catalog.list()] == before and count(catalog, "rows_generations") == 3
    assert bad.read_text() == "not a catalog\n"
    with duckdb.connect(str(empty), read_only=True) as con:  # a source is never written to
        assert con.execute("SELECT count(*) FROM information_schema.tables").fetchall()[0][0] == 0


def test_reads_never_create_a_catalog_and_share_the_file_with_other_readers(tmp_path: Path):
    missing = Catalog(tmp_path / "nope" / "missing.duckdb")
    assert missing.list() == [] and missing.newest("prompts") is None  # a stage's "nothing yet"
    for call in (
        missing.verify,
        missing.gc,
        lambda: missing.tag("abcd1234", "x"),
        missing.require,
        lambda: missing.work_rows("k"),
    ):
        with pytest.raises(CatalogError, match="does not exist"):
            call()
    assert not missing.path.exists() and not missing.path.parent.exists()

    catalog = Catalog(tmp_path / "c.duckdb")
    snap = catalog.register("generations", gens(pids(2)), iteration=1, split="train")
    # another process reads the file: readers go on beside it, a writer waits for it (then gives up clearly)
    reader = _spawn(
        "import sys, time, duckdb; con = duckdb.connect(sys.argv[1], read_only=True); "
        "print('reading', flush=True); time.sleep(30)",
        str(catalog.path),
    )
    try:
        assert reader.stdout.readline().strip() == "reading"
        impatient = Catalog(catalog.path, CatalogConfig(catalog.path, lock_timeout=1.0))
        assert [s.id for s in impatient.list()] == [snap.id]
        assert impatient.read(snap.id).num_rows == 6 and impatient.verify()["ok"]
        with pytest.raises(CatalogBusy):
            impatient.tag(snap.id, "first")
    finally:
        reader.kill()
        reader.wait()
    assert catalog.tag(snap.id, "first").tags == ["first"]


# ---------------------------------------------------------------------------------------------- schema migration
def test_a_catalog_of_schema_1_reads_unchanged_and_is_upgraded_in_place_by_its_first_write(tmp_path: Path):
    """tests/data/catalog_v1.duckdb.gz: written by iterdpo at 2314c0e (schema 1: pairs rows in full), holding
    prompts, generations and scores of two prompts (a: r0 1.0, r1 0.0; b: s0 0.5, s1 2.0) and their pairs."""
    import gzip

    old = tmp_path / "v1.duckdb"
    old.write_bytes(gzip.decompress((ROOT / "tests" / "data" / "catalog_v1.duckdb.gz").read_bytes()))
    pairs_id = "874afccd04882dc1ffb7f2dde7dd5aa28aba1f51b6e7f089c9234b28013797bf"

    def turn(prompt: str, answer: str) -> list[dict[str, str]]:
        return [{"content": prompt, "role": "user"}, {"content": answer, "role": "assistant"}]

    expected = pa.Table.from_pylist(
        [
            {
                "prompt_id": "a",
                "prompt": "P a",
                "chosen": turn("P a", "r0"),
                "rejected": turn("P a", "r1"),
                "all_generated_responses": ["r0", "r1"],
                "all_rm_scores": [1.0, 0.0],
                "score_chosen": 1.0,
                "score_rejected": 0.0,
            },
            {
                "prompt_id": "b",
                "prompt": "P b",
                "chosen": turn("P b", "s1"),
                "rejected": turn("P b", "s0"),
                "all_generated_responses": ["s0", "s1"],
                "all_rm_scores": [0.5, 2.0],
                "score_chosen": 2.0,
                "score_rejected": 0.5,
            },
        ],
        schema=KINDS["pairs"].schema,
    )
    assert Catalog(tmp_path / "fresh.duckdb").register("pairs", expected, iteration=1, split="train").id == pairs_id

    def version(path: Path) -> str:
        con = duckdb.connect(str(path), read_only=True)
        try:
            return con.execute("SELECT value FROM iterdpo_meta WHERE key = 'schema_version'").fetchone()[0]
        finally:
            con.close()

    catalog = Catalog(old)
    # reads (and a merge from it) never write it: they read schema 1 as it is
    raw = old.read_bytes()
    assert catalog.read("pairs:1:train").equals(expected) and catalog.get("pairs:1:train").id == pairs_id
    assert pa.Table.from_batches(list(catalog.read_batches(pairs_id, 1))).equals(expected)
    assert catalog.verify()["ok"]
    merged = Catalog(tmp_path / "merged.duckdb")
    merged.merge([old])
    assert merged.read(pairs_id).equals(expected) and merged.verify()["ok"]
    assert old.read_bytes() == raw and version(old) == "1"

    # the first write upgrades it in place, once; its rows stay as they are
    catalog.tag(pairs_id, "v1-pairs")
    assert version(old) == str(SCHEMA_VERSION) == "3"
    assert catalog.read("v1-pairs").equals(expected) and catalog.verify()["ok"]
    from builders.config import BuildConfig
    from builders.pairs import build_pairs

    assert build_pairs(catalog, 1, BuildConfig()).snapshots[0].id == pairs_id  # the same rows again: a no-op
    assert [s.id for s in catalog.list(kind="pairs")] == [pairs_id]
