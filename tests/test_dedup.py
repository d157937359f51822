"""`prompts dedup` as a user runs it: near-duplicates (case, whitespace and punctuation variants, near-copies) of
real UltraFeedback prompts grouped and one kept per group, whatever the order; templated prompts with other inputs
kept apart; the new pool's lineage and params; reruns and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders.catalog import Catalog
from builders.prompts import prompt_id
from tests.conftest import SAMPLE

REAL = [json.loads(line)["prompt"] for line in SAMPLE.read_text().splitlines()]
LONG = next(p for p in REAL if 400 < len(p) < 900 and "\n" not in p)
VARIANTS = [
    LONG.upper(),  # case
    "  " + LONG.replace(" ", "  ").replace(".", " ."),  # whitespace and punctuation
    LONG.replace(".", "!", 1).rstrip(".!") + " Thanks",  # a near-copy: punctuation and a word added at the end
]


def _write(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return _write(tmp_path / "pool.jsonl", REAL + VARIANTS)


def test_near_duplicates_are_grouped_and_the_smallest_id_kept(cli, catalog_path, pool):
    imported = cli("prompts", "import", pool, "--json").json()
    out = cli("prompts", "dedup", "--json")
    assert out.code == 0, out.err
    report = out.json()
    group = sorted(prompt_id(p.strip()) for p in [LONG, *VARIANTS])
    assert [[g["kept"], *g["removed"]] for g in report["groups"]] == [group]
    assert report["removed"] == 3 and report["snapshot"]["rows"] == imported["rows"] - 3
    catalog = Catalog(catalog_path)
    snap = catalog.get(report["snapshot"]["id"])
    assert catalog.parent(snap, "prompts").id == imported["id"]
    assert snap.params["groups"] == [{"kept": group[0], "removed": group[1:]}]
    assert snap.params["threshold"] == 0.8 and snap.params["removed"] == 3 and snap.params["pool_rows"] == 213
    kept = set(catalog.read(snap.id).column("prompt_id").to_pylist())
    assert group[0] in kept and not kept & set(group[1:])
    # every other real prompt is kept: templated tasks with other inputs (a Persian passage each) are not copies
    assert kept >= {prompt_id(p) for p in REAL if p != LONG} - set(group)
    # again: nothing left to remove, the same pool
    again = cli("prompts", "dedup", "--json").json()
    assert again["removed"] == 0 and again["snapshot"]["id"] == snap.id


def test_the_kept_prompt_and_the_pool_do_not_depend_on_the_order(cli, tmp_path, pool):
    ids = []
    for name, prompts in (("a", REAL + VARIANTS), ("b", (REAL + VARIANTS)[::-1])):
        catalog = tmp_path / f"{name}.duckdb"
        cli("prompts", "import", _write(tmp_path / f"{name}.jsonl", prompts), catalog=catalog)
        ids.append(cli("prompts", "dedup", "--json", catalog=catalog).json()["snapshot"]["id"])
    assert ids[0] == ids[1]


def test_a_lower_threshold_groups_looser_copies(cli, tmp_path):
    base = "Write a short poem about the sea at night, with the moon over the waves and a lighthouse far away"
    looser = base.replace("short poem", "brief poem").replace("far away", "in the distance")
    _write(tmp_path / "p.jsonl", [base, looser, "Why is the sky blue?"])
    cli("prompts", "import", tmp_path / "p.jsonl")
    assert cli("prompts", "dedup", "--dry-run", "--json").json()["removed"] == 0
    loose = cli("prompts", "dedup", "--threshold", 0.4, "--dry-run", "--json").json()
    assert loose["removed"] == 1 and loose["snapshot"] is None
    assert sorted(loose["groups"][0]["prompts"]) == sorted([base, looser])


def test_dry_run_registers_nothing_and_bad_thresholds_are_one_line(cli, catalog_path, pool):
    cli("prompts", "import", pool)
    before = Catalog(catalog_path).list()
    out = cli("prompts", "dedup", "--dry-run")
    assert out.code == 0 and "1 group(s)" in out.out and "dry run: nothing registered" in out.out
    for bad in ("0", "1.5"):
        out = cli("prompts", "dedup", "--threshold", bad)
        assert out.code == 1 and "--threshold must be in (0, 1]" in out.err and len(out.err.splitlines()) == 1
    assert Catalog(catalog_path).list() == before
