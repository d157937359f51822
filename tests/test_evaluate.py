"""best-of-n picks the ranker's top candidate; eval's statistics on small known files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from builders.config import RankConfig, SamplingConfig
from builders.errors import InputError
from builders.evaluate import BestOfNConfig, best_of_n, evaluate, length_controlled

LONGER = RankConfig(iteration=0, ranker="python", ranker_model="tests.scorers:longer_is_better")


def test_best_of_n_keeps_the_top_scored_candidate(tmp_path, tiny_models):
    prompts = tmp_path / "alpaca.json"
    prompts.write_text(json.dumps([{"instruction": "Name three colours."}, {"instruction": "What is DPO?"}]))
    out = tmp_path / "model_outputs.json"
    result = best_of_n(BestOfNConfig(str(tiny_models / "generator"), prompts, out, num_responses=6,
                                     sampling=SamplingConfig(max_tokens=12, seed=3), ranker=LONGER))
    rows = json.loads(out.read_text())
    assert result["prompts"] == 2 and [r["instruction"] for r in rows] == ["Name three colours.", "What is DPO?"]
    for row in rows:
        assert set(row) >= {"instruction", "output", "generator", "dataset", "selection_score"}
        assert len(row["candidate_scores"]) == 6
        assert row["selection_score"] == max(row["candidate_scores"]) == len(row["output"])


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def test_eval_length_statistics_without_a_model(tmp_path):
    out = _write(tmp_path / "o.json", [
        {"instruction": "a", "output": "xx", "generator": "m1"},
        {"instruction": "b", "output": "xxxx", "generator": "m1"},
        {"instruction": "c", "output": "xxxxxxxxx", "generator": "m2"},
    ])
    report = evaluate(out)
    assert report["length"] == {"m1": {"n": 2, "avg_length": 3.0, "median_length": 3.0},
                                "m2": {"n": 1, "avg_length": 9.0, "median_length": 9.0}}
    assert "win_rate" not in report


def test_eval_win_rate_standard_error_and_length_control(tmp_path):
    # the ranker prefers longer answers: outputs win exactly where they are longer (3 of 4, one tie)
    out = _write(tmp_path / "o.json", [
        {"instruction": "a", "output": "x" * 30, "generator": "m"},
        {"instruction": "b", "output": "x" * 25, "generator": "m"},
        {"instruction": "c", "output": "x" * 5, "generator": "m"},
        {"instruction": "d", "output": "x" * 10, "generator": "m"},
        {"instruction": "not in the reference", "output": "x", "generator": "m"},
    ])
    ref = _write(tmp_path / "r.json", [
        {"instruction": i, "output": "x" * 10, "generator": "ref"} for i in "abcd"])
    report = evaluate(out, ref, LONGER)
    prefs = [1.0, 1.0, 0.0, 0.5]
    assert report["compared"] == 4 and report["unmatched"] == 1
    assert report["win_rate"] == pytest.approx(62.5)
    mean = sum(prefs) / 4
    se = math.sqrt(sum((p - mean) ** 2 for p in prefs) / 3) / 2
    assert report["standard_error"] == pytest.approx(100 * se)
    # all of the advantage is length: controlling for it pulls the win rate towards 50
    assert abs(report["length_controlled_win_rate"] - 50) < abs(report["win_rate"] - 50)


def test_length_controlled_is_the_raw_rate_when_lengths_do_not_matter():
    # 20 wins and 10 losses, each half with the longer and half with the shorter answer
    prefs = [1.0] * 20 + [0.0] * 10
    diffs = [5.0, -5.0] * 15
    assert length_controlled(prefs, diffs) == pytest.approx(2 / 3, abs=1e-3)


def test_eval_bad_files(tmp_path):
    broken = tmp_path / "x.json"
    broken.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        evaluate(broken)
    with pytest.raises(InputError, match="record 0 lacks a text instruction and output"):
        evaluate(_write(tmp_path / "y.json", [{"instruction": "a"}]))
    with pytest.raises(InputError, match="no such file|No such file"):
        evaluate(tmp_path / "missing.json")


def test_cli_eval_json_and_errors(cli, tmp_path):
    out = _write(tmp_path / "o.json", [{"instruction": "a", "output": "abc", "generator": "m"}])
    done = cli("eval", out, "--json", catalog=None)
    assert done.code == 0 and done.json()["length"]["m"]["avg_length"] == 3.0
    bad = cli("eval", tmp_path / "missing.json", catalog=None)
    assert bad.code == 1 and bad.err.startswith("Error: ") and len(bad.err.splitlines()) == 1
