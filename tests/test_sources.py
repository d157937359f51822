"""`prompts import --exclude-source / --include-source` on UltraFeedback's `source` column: the prompts left out
are counted per source in the pool's params, an unknown source name is an error listing the real ones, and a
filter on a source without that column says so; without the options the pool is what it always was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders.catalog import Catalog
from tests.conftest import SAMPLE

REAL = [json.loads(line)["prompt"] for line in SAMPLE.read_text().splitlines()]


@pytest.fixture
def uf(tmp_path: Path) -> Path:
    """Real UltraFeedback prompts with UltraFeedback's source names (and two rows without one)."""
    names = ["evol_instruct"] * 20 + ["truthful_qa"] * 6 + ["false_qa"] * 4 + [None] * 2
    names += ["sharegpt"] * (len(REAL) - len(names))
    path = tmp_path / "uf.jsonl"
    path.write_text("".join(json.dumps({"instruction": p, "source": s}) + "\n" for p, s in zip(REAL, names)))
    return path


def test_exclude_sources_drops_and_counts_them(cli, catalog_path, uf):
    out = cli("prompts", "import", uf, "--exclude-source", "truthful_qa", "--exclude-source", "false_qa", "--json")
    assert out.code == 0, out.err
    snap = Catalog(catalog_path).get(out.json()["id"])
    assert snap.rows == len(REAL) - 10
    assert snap.params["exclude_sources"] == ["false_qa", "truthful_qa"]
    assert snap.params["excluded_by_source"] == {"false_qa": 4, "truthful_qa": 6}
    sources = set(Catalog(catalog_path).read(snap.id).column("source").to_pylist())
    assert sources == {"evol_instruct", "sharegpt", None}
    human = cli("prompts", "import", uf, "--exclude-source", "truthful_qa")
    assert "left out by source: truthful_qa 6" in human.out


def test_include_sources_keeps_only_them(cli, catalog_path, uf):
    out = cli("prompts", "import", uf, "--include-source", "evol_instruct", "--json").json()
    snap = Catalog(catalog_path).get(out["id"])
    assert snap.rows == 20 and snap.params["include_sources"] == ["evol_instruct"]
    assert snap.params["excluded_by_source"] == {
        "(no source)": 2,
        "false_qa": 4,
        "sharegpt": len(REAL) - 32,
        "truthful_qa": 6,
    }


def test_without_filters_the_pool_and_its_params_are_unchanged(cli, catalog_path, uf):
    snap = Catalog(catalog_path).get(cli("prompts", "import", uf, "--json").json()["id"])
    assert snap.rows == len(REAL) and "excluded_by_source" not in snap.params


@pytest.mark.parametrize(
    "args, message",
    [
        (["--exclude-source", "truthfulqa"], "no prompts with source 'truthfulqa'; sources found: evol_instruct"),
        (["--include-source", "sharegpt", "--exclude-source", "false_qa"], "not both"),
        (["--exclude-source", "a", "--source-file"], None),  # Click's own usage error
    ],
)
def test_bad_source_filters_are_one_line_and_register_nothing(cli, catalog_path, uf, args, message):
    out = cli("prompts", "import", uf, *args)
    if message is None:
        assert out.code == 2
    else:
        assert out.code == 1 and message in out.err and len(out.err.splitlines()) == 1, out.err
    assert Catalog(catalog_path).list() == []


def test_a_source_without_a_source_column_cannot_be_filtered(cli, catalog_path):
    out = cli("prompts", "import", SAMPLE.parent / "benchmarks" / "mt_bench.jsonl", "--exclude-source", "x")
    assert out.code == 1 and "no `source` values to filter on" in out.err
    assert Catalog(catalog_path).list() == []


def test_the_card_names_the_sources_left_out_and_the_rebuild_leaves_them_out(cli, catalog_path, uf, tmp_path):
    from tests.test_decontaminate import _card, _pairs

    cli("prompts", "import", uf, "--exclude-source", "truthful_qa")
    cli("prompts", "split", "--iterations", 1, "--train-size", 8, "--test-size", 0)
    catalog = Catalog(catalog_path)
    _pairs(catalog)
    card = _card(catalog, tmp_path / "staged")
    assert "Sources left out at import: truthful_qa; prompts left out per source: `truthful_qa` 6." in card
    assert "--column instruction --exclude-source truthful_qa   # pool" in card
