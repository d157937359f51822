"""best-of-n picks the ranker's top candidate; eval's statistics on small known files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from builders.config import BestOfNConfig, GenerateConfig, RankConfig, SamplingConfig
from builders.errors import InputError
from builders.evaluate import best_of_n, evaluate, length_controlled

LONGER = RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better")


def test_best_of_n_keeps_the_top_scored_candidate(tmp_path, tiny_models):
    prompts = tmp_path / "alpaca.json"
    prompts.write_text(json.dumps([{"instruction": "Name three colours."}, {"instruction": "What is DPO?"}]))
    out = tmp_path / "model_outputs.json"
    result = best_of_n(
        BestOfNConfig(
            prompts,
            out,
            GenerateConfig(
                model=str(tiny_models / "generator"), sampling=SamplingConfig(num_responses=6, max_tokens=12, seed=3)
            ),
            ranker=LONGER,
        )
    )
    rows = json.loads(out.read_text())
    assert result["prompts"] == 2 and [r["instruction"] for r in rows] == ["Name three colours.", "What is DPO?"]
    side = [json.loads(line) for line in Path(result["candidates"]).read_text().splitlines()]
    assert Path(result["candidates"]) == tmp_path / "model_outputs.candidates.jsonl"
    for row, cands in zip(rows, side):
        assert set(row) == {"instruction", "output", "generator", "dataset"}
        assert row["dataset"] == "alpaca"  # no dataset in the input: the prompt file's name
        assert len(cands["candidates"]) == len(cands["candidate_scores"]) == 6
        assert cands["instruction"] == row["instruction"]
        assert cands["candidates"][cands["selected_index"]] == row["output"]
        assert cands["selection_score"] == max(cands["candidate_scores"]) == len(row["output"])


def test_best_of_n_output_loads_the_way_alpaca_eval_does(tmp_path, tiny_models):
    import pandas as pd

    # AlpacaEval's rows: a dataset per row, and instructions kept byte for byte (some have surrounding spaces)
    inputs = [
        {"dataset": "helpful_base", "instruction": "  Name three colours.\n", "output": "", "generator": "x"},
        {"dataset": "koala", "instruction": "What is DPO?", "output": "", "generator": "x"},
        {"instruction": "Say hi."},  # no dataset: the file's name
        {"dataset": "vicuna", "instruction": "   "},
    ]  # nothing to answer: left out
    prompts = tmp_path / "alpaca_eval.json"
    prompts.write_text(json.dumps(inputs))
    out = tmp_path / "model_outputs.json"
    result = best_of_n(
        BestOfNConfig(
            prompts,
            out,
            GenerateConfig(
                model=str(tiny_models / "generator"), sampling=SamplingConfig(num_responses=3, max_tokens=8, seed=1)
            ),
            ranker=LONGER,
        )
    )
    assert result["prompts"] == 3 and result["skipped_empty"] == 1
    reference = tmp_path / "reference.json"
    reference.write_text(
        json.dumps(
            [
                {
                    "instruction": r["instruction"],
                    "output": f"reference answer {i}",
                    "generator": "gpt4_turbo",
                    "dataset": r.get("dataset", "alpaca_eval"),
                }
                for i, r in enumerate(inputs[:3])
            ]
        )
    )
    # as alpaca_eval.main.evaluate and PairwiseAnnotator.annotate_head2head do (0.6.6): read_json, merge on the
    # instruction, drop_duplicates
    model, ref = pd.read_json(out), pd.read_json(reference)
    assert model.drop_duplicates().shape == (3, 4)
    merged = pd.merge(ref, model, on=["instruction"], suffixes=("_1", "_2")).drop_duplicates()
    assert len(merged) == 3 and "  Name three colours.\n" in set(merged["instruction"])
    assert list(merged["dataset_1"]) == list(merged["dataset_2"]) == ["helpful_base", "koala", "alpaca_eval"]
    assert (merged["generator_2"] == result["generator"]).all()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def test_eval_length_statistics_without_a_model(tmp_path):
    out = _write(
        tmp_path / "o.json",
        [
            {"instruction": "a", "output": "xx", "generator": "m1"},
            {"instruction": "b", "output": "xxxx", "generator": "m1"},
            {"instruction": "c", "output": "xxxxxxxxx", "generator": "m2"},
        ],
    )
    report = evaluate(out)
    assert report["length"] == {
        "m1": {"n": 2, "avg_length": 3.0, "median_length": 3.0},
        "m2": {"n": 1, "avg_length": 9.0, "median_length": 9.0},
    }
    assert "win_rate" not in report


def test_eval_win_rate_standard_error_and_length_control(tmp_path):
    # the ranker prefers longer answers: outputs win exactly where they are longer (3 of 4, one tie)
    out = _write(
        tmp_path / "o.json",
        [
            {"instruction": "a", "output": "x" * 30, "generator": "m"},
            {"instruction": "b", "output": "x" * 25, "generator": "m"},
            {"instruction": "c", "output": "x" * 5, "generator": "m"},
            {"instruction": "d", "output": "x" * 10, "generator": "m"},
            {"instruction": "not in the reference", "output": "x", "generator": "m"},
        ],
    )
    ref = _write(tmp_path / "r.json", [{"instruction": i, "output": "x" * 10, "generator": "ref"} for i in "abcd"])
    report = evaluate(out, ref, LONGER)
    prefs = [1.0, 1.0, 0.0, 0.5]
    assert report["compared"] == 4 and report["unmatched"] == 1
    assert report["win_rate"] == pytest.approx(62.5)
    mean = sum(prefs) / 4
    se = math.sqrt(sum((p - mean) ** 2 for p in prefs) / 3) / 2
    assert report["standard_error"] == pytest.approx(100 * se)
    # all of the advantage is length: controlling for it pulls the win rate towards 50
    assert abs(report["length_controlled_win_rate"] - 50) < abs(report["win_rate"] - 50)
    assert report["length_weight"] > 0 and report["length_controlled_standard_error"] > 0


def test_length_controlled_is_the_raw_rate_when_lengths_do_not_matter():
    # 20 wins and 10 losses, each half with the longer and half with the shorter answer
    prefs = [1.0] * 20 + [0.0] * 10
    diffs = [5.0, -5.0] * 15
    lc = length_controlled(prefs, diffs)
    assert lc.win_rate == pytest.approx(2 / 3, abs=1e-3) and lc.length_weight == pytest.approx(0, abs=1e-6)


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


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--output": "{tmp}/nodir/x.json"}, "no such folder"),
        ({"--output": "{tmp}/outputs.txt"}, "must end in .json"),
        ({"--num-responses": "0"}, "--num-responses must be at least 1"),
        ({"--temperature": "-1"}, "--temperature"),
        ({"--max-tokens": "0"}, "--max-tokens"),
        ({"--prompts": "{tmp}/missing.json"}, "no such file"),
        ({"--prompts": "{tmp}/no_prompt_column.json"}, "no prompt-like column"),
        ({"--ranker-model": "tests.scorers:no_such_function"}, "cannot be imported"),
        ({"--model": "{tmp}/no_such_model"}, "cannot be loaded"),
        ({"--generator-name": " "}, "--generator-name"),
    ],
)
def test_cli_best_of_n_checks_everything_before_generating(cli, tmp_path, monkeypatch, catalog_path, change, message):
    import builders.generate

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(builders.generate, "make_generator", never)
    (tmp_path / "dir.json").mkdir()
    _write(tmp_path / "prompts.json", [{"instruction": "Say hi."}])
    _write(tmp_path / "no_prompt_column.json", [{"colour": "red"}])
    before = sorted(p.name for p in tmp_path.iterdir())
    args = {
        "--model": str(tmp_path / "dir.json"),
        "--prompts": str(tmp_path / "prompts.json"),
        "--output": str(tmp_path / "model_outputs.json"),
        "--num-responses": "2",
        "--ranker": "python",
        "--ranker-model": "tests.scorers:longer_is_better",
    }
    args.update({k: v.format(tmp=tmp_path) for k, v in change.items()})
    done = cli("best-of-n", *[x for kv in args.items() for x in kv])
    assert done.code == 1 and len(done.err.splitlines()) == 1 and message in done.err, done.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no catalog created
    assert not catalog_path.exists()


def test_best_of_n_api_refuses_a_folder_as_output(tmp_path):
    (tmp_path / "model_outputs.json").mkdir()
    _write(tmp_path / "p.json", [{"instruction": "Say hi."}])
    with pytest.raises(InputError, match="is a folder"):
        best_of_n(
            BestOfNConfig(
                tmp_path / "p.json", tmp_path / "model_outputs.json", GenerateConfig(model="unused"), ranker=LONGER
            )
        )
    (tmp_path / "model_outputs.json").rmdir()
    (tmp_path / "model_outputs.candidates.jsonl").mkdir()  # the sidecar's place is taken
    with pytest.raises(InputError, match="sidecar"):
        best_of_n(
            BestOfNConfig(
                tmp_path / "p.json", tmp_path / "model_outputs.json", GenerateConfig(model="unused"), ranker=LONGER
            )
        )


def test_cli_best_of_n_shows_its_progress_on_stderr(cli, tmp_path, tiny_models):
    # a run of many prompts took 25 silent minutes: generation and ranking each show a bar, as generate/rank do
    prompts = _write(tmp_path / "prompts.json", [{"instruction": f"Say {w}."} for w in ("hi", "yes", "no")])
    out = tmp_path / "model_outputs.json"
    done = cli(
        "best-of-n",
        "--model",
        tiny_models / "generator",
        "--prompts",
        prompts,
        "--num-responses",
        "3",
        "--max-tokens",
        "6",
        "--batch-prompts",
        "2",
        "--ranker",
        "python",
        "--ranker-model",
        "tests.scorers:longer_is_better",
        "--output",
        out,
        "--json",
        catalog=None,
    )
    assert done.code == 0, done.err
    assert "best-of-3 generate: 100%" in done.err and "3/3" in done.err and "tok/s" in done.err
    assert "best-of-n rank: 100%" in done.err
    assert done.json()["prompts"] == 3 and "100%" not in done.out  # stdout is the JSON alone
