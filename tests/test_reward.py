"""`reward train` and `reward eval` as a user runs them: a reward model from labelled pairs that `rank --ranker scalar`
uses, registered with the data it learned from; the agreement of any scorer with labels, checked on pairs whose
answer is known; bad input refused in one line with nothing registered."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from tests.conftest import WORDS, generations_catalog

TINY_RECIPE = """\
max_length: 256
learning_rate: 1.0e-3
max_steps: 2
per_device_train_batch_size: 2
gradient_checkpointing: false
bf16: false
use_cpu: true
seed: 0
eval_strategy: "no"
logging_steps: 1
save_strategy: "no"
report_to: none
dataloader_num_workers: 0
output_dir: unused
"""


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen answer is the longer one (the labels agree with `tests.scorers:longer_is_better`)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {
            "prompt": f"Question {i}: {words(5)}?",
            "chosen": words(rng.randint(8, 14)),
            "rejected": words(rng.randint(1, 5)),
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        for i in range(n)
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def recipe(tmp_path) -> Path:
    return _write_text(tmp_path / "tiny-reward.yaml", TINY_RECIPE)


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _train(cli, data, base, out, recipe, *extra):
    return cli("reward", "train", "--data", data, "--base", base, "--output-dir", out, "--recipe", recipe,
               "--eval-fraction", "0.25", *extra, "--json")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- reward eval
def test_reward_eval_accuracy_is_1_on_agreeing_pairs_0_on_disagreeing_ones_and_ties_are_apart(cli, tmp_path):
    agree = _pairs(6)
    disagree = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in agree]
    same_length = {"prompt": "Tie?", "chosen": "abc", "rejected": "xyz", "score_chosen": 2, "score_rejected": 1}
    label_tie = {"prompt": "Label tie?", "chosen": "long answer", "rejected": "no", "score_chosen": 5,
                 "score_rejected": 5}  # fmt: skip
    scorer = ("--ranker", "python", "--ranker-model", "tests.scorers:longer_is_better")

    got = cli("reward", "eval", "--data", _write(tmp_path / "agree.jsonl", agree + [same_length, label_tie]),
              *scorer, "--json")  # fmt: skip
    assert got.code == 0, got.err
    report = got.json()
    assert (report["accuracy"], report["wins"], report["losses"], report["ties"]) == (1.0, 6, 0, 1)
    assert report["pairs"] == 7 and report["label_ties_dropped"] == 1
    assert report["standard_error"] == 0.0 and report["prefers_longer"] == 1.0

    got = cli("reward", "eval", "--data", _write(tmp_path / "disagree.jsonl", disagree), *scorer, "--json")
    report = got.json()
    assert (report["accuracy"], report["wins"], report["losses"]) == (0.0, 0, 6)
    assert report["prefers_longer"] == 1.0 and report["labels_prefer_longer"] == 0.0

    # half agree: accuracy 0.5, standard error sqrt(0.25 / 12)
    got = cli("reward", "eval", "--data", _write(tmp_path / "half.jsonl", agree + disagree), *scorer)
    assert got.code == 0, got.err
    assert "accuracy 0.500 +/- 0.144 (6 agree, 6 disagree, 0 ties counted apart); not above chance" in got.out


def test_reward_eval_of_a_combination_weighs_its_components(cli, tmp_path):
    """longer (weight 1) against shorter (weight 2): the combination prefers the shorter answer, so it disagrees
    with labels that chose the longer one; with the weights the other way round it agrees."""
    data = _write(tmp_path / "pairs.jsonl", _pairs(5))
    longer, shorter = "python:tests.scorers:longer_is_better", "python:tests.scorers:shorter_is_better"
    got = cli("reward", "eval", "--data", data, "--ranker-spec", f"{longer}=1", "--ranker-spec", f"{shorter}=2",
              "--json")  # fmt: skip
    assert got.code == 0, got.err
    assert got.json()["accuracy"] == 0.0 and got.json()["method"] == "zscore"
    got = cli("reward", "eval", "--data", data, "--ranker-spec", f"{longer}=2", "--ranker-spec", f"{shorter}=1",
              "--method", "rank", "--json")  # fmt: skip
    assert got.json()["accuracy"] == 1.0
    assert [c["weight"] for c in got.json()["components"]] == [2.0, 1.0]
    bad = cli("reward", "eval", "--data", data, "--ranker-spec", f"{longer}=heavy")
    assert bad.code == 1 and bad.err.count("\n") == 1 and "is not a number" in bad.err


def test_reward_eval_of_the_catalogs_own_pairs(cli, catalog_path):
    """Pairs `build` made with a longer-is-better scorer: that scorer agrees with every one of them."""
    from tests.conftest import built_catalog

    built_catalog(catalog_path, n_prompts=6)
    got = cli("reward", "eval", "--data", "pairs:1:train", "--ranker", "python", "--ranker-model",
              "tests.scorers:longer_is_better", "--json")  # fmt: skip
    assert got.code == 0, got.err
    report = got.json()
    assert report["accuracy"] == 1.0 and report["pairs"] == 6 and report["data_snapshots"]
    # a snapshot of another kind is not preference data
    bad = cli(
        "reward",
        "eval",
        "--data",
        "scores:1:train",
        "--ranker",
        "python",
        "--ranker-model",
        "tests.scorers:longer_is_better",
    )
    assert bad.code == 1 and "is a scores snapshot" in bad.err


def test_real_ultrafeedback_pairs_drop_their_25_ties_and_are_counted(cli, uf_data):
    got = cli("reward", "eval", "--data", uf_data / "eval200.jsonl", "--ranker", "python", "--ranker-model",
              "tests.scorers:longer_is_better", "--json")  # fmt: skip
    assert got.code == 0, got.err
    report = got.json()
    assert report["label_ties_dropped"] == 25 and report["pairs"] == 175
    # a scorer of length alone prefers the longer answer whenever the lengths differ
    assert report["prefers_longer"] == 1.0 and report["accuracy"] == report["labels_prefer_longer"]


# --------------------------------------------------------------------------------------------------- reward train
def test_reward_train_then_scalar_rank_and_the_lineage_reaches_the_labels(cli, tmp_path, tiny_models, recipe):
    from transformers import AutoModelForSequenceClassification

    from builders.backends.scalar import ScalarRM
    from builders.catalog import Catalog

    data = _write(tmp_path / "pairs.jsonl", _pairs(8) + [{**_pairs(1, seed=3)[0], "score_rejected": 8.0}])
    out = tmp_path / "my-reward"
    got = _train(cli, data, tiny_models / "generator", out, recipe)
    assert got.code == 0, got.err
    result = got.json()
    m = result["metrics"]
    assert (m["pairs"], m["ties_dropped"], m["heldout_pairs"]) == (9, 1, 2)
    assert m["train_pairs_used"] + m["train_pairs_dropped"] == 6
    reward = result["snapshot"]
    assert reward["kind"] == "reward" and reward["params"]["heldout_accuracy"] == m["heldout"]["accuracy"]

    # the parent is the file's pairs, imported: a preferences snapshot with every row of the file
    shown = cli("versions", "show", reward["id"], "--json").json()
    assert shown["parents"] == [result["data_snapshot"]]
    catalog = Catalog(tmp_path / "catalog.duckdb")
    imported = catalog.get(result["data_snapshot"])
    assert imported.kind == "preferences" and imported.rows == 9

    # the folder is a sequence-classification reward model (every weight trained, none random) ...
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    ScalarRM(str(out))  # refuses a folder whose head is missing or newly initialised
    # ... that `rank --ranker scalar` uses
    generations_catalog(tmp_path / "catalog.duckdb", n_prompts=3, n=2)
    ranked = cli("rank", "--iteration", "1", "--split", "train", "--ranker", "scalar", "--ranker-model", out,
                 "--json")  # fmt: skip
    assert ranked.code == 0, ranked.err
    scores = ranked.json()["splits"][0]["snapshot"]
    assert scores["rows"] == 6 and scores["params"]["ranker_model"] == str(out.resolve())
    # the scores' lineage: generations, and the reward model, whose parent is the labelled pairs
    assert scores["parents"][1] == reward["id"]
    assert catalog.parent(scores["id"], "reward").id == reward["id"]
    # and `reward eval --data REWARD` scores the pairs it held out with it: the recorded accuracy
    again = cli("reward", "eval", "--data", reward["id"], "--json").json()
    assert again["ranker"] == "scalar" and again["pairs"] == 2
    assert again["accuracy"] == m["heldout"]["accuracy"]


def test_a_catalog_snapshot_as_data_is_the_parent_and_a_rerun_registers_the_same_model(
    cli, tmp_path, tiny_models, recipe
):
    data = _write(tmp_path / "pairs.jsonl", _pairs(8))
    first = _train(cli, data, tiny_models / "generator", tmp_path / "a", recipe).json()
    imported = first["data_snapshot"]
    # the same pairs named by their catalog snapshot: the same parent
    second = _train(cli, imported, tiny_models / "generator", tmp_path / "b", recipe).json()
    assert second["snapshot"]["parents"] == [imported] and second["data_snapshot"] == imported
    # killed after the move and before the registration (here: another catalog that lacks it): the same command
    # registers the model it finds, verified, without training again
    other = tmp_path / "other.duckdb"
    shutil.copy(data, tmp_path / "again.jsonl")
    got = cli("reward", "train", "--data", tmp_path / "again.jsonl", "--base", tiny_models / "generator",
              "--output-dir", tmp_path / "a", "--recipe", recipe, "--eval-fraction", "0.25", "--json",
              catalog=other)  # fmt: skip
    assert got.code == 0, got.err
    assert got.json()["resumed"] and got.json()["snapshot"]["id"] == first["snapshot"]["id"]
    # another training into that folder is refused: it holds this one's model
    refused = _train(cli, data, tiny_models / "generator", tmp_path / "a", recipe, "--eval-fraction", "0.5")
    assert refused.code == 1 and "holds the model of another training" in refused.err


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_line_exit_1_and_nothing_registered(cli, tmp_path, tiny_models, recipe, catalog_path):
    no_columns = _write(tmp_path / "no-columns.jsonl", [{"prompt": "Hi", "answer": "Hello"}])
    got = _train(cli, no_columns, tiny_models / "generator", tmp_path / "out", recipe)
    assert got.code == 1 and got.err.count("\n") == 1 and "no chosen/rejected columns" in got.err, got.err
    got = cli(
        "reward", "eval", "--data", no_columns, "--ranker", "python", "--ranker-model", "tests.scorers:longer_is_better"
    )
    assert got.code == 1 and got.err.count("\n") == 1 and "no chosen/rejected columns" in got.err

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "nonsense"}')
    good = _write(tmp_path / "pairs.jsonl", _pairs(4))
    got = _train(cli, good, broken, tmp_path / "out", recipe)
    assert got.code == 1 and got.err.count("\n") == 1 and "cannot be loaded" in got.err, got.err

    dpo_key = _write_text(tmp_path / "dpo.yaml", TINY_RECIPE + "beta: 0.1\n")
    got = _train(cli, good, tiny_models / "generator", tmp_path / "out", dpo_key)
    assert got.code == 1 and got.err.count("\n") == 1 and "unknown key(s) beta" in got.err, got.err

    got = _train(cli, good, tiny_models / "generator", tmp_path / "out", recipe, "--eval-fraction", "1.5")
    assert got.code == 1 and "--eval-fraction must be" in got.err

    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".iterdpo-reward-*"))
    assert not catalog_path.exists() or cli("versions", "list", "--json").json() == []  # not even the file's pairs


def test_a_catalog_made_before_the_reward_kinds_gains_them_and_merges_either_way(tmp_path):
    """A file of an earlier iterdpo has no rows tables for `preferences` and `reward`: the first write adds them,
    a read-only open reads it as it is, and `versions merge` takes it as a source and as a destination."""
    import duckdb
    import pyarrow as pa

    from builders.catalog import Catalog
    from builders.preferences import Preferences, preferences_table, register_import

    def older(path: Path) -> Catalog:
        c = Catalog(path)
        c.register("scores", pa.table({"prompt_id": ["p"], "response_index": [0], "score": [1.0]}), iteration=1)
        with duckdb.connect(str(path)) as con:
            con.execute("DROP TABLE rows_preferences")
            con.execute("DROP TABLE rows_reward")
        return c

    old = older(tmp_path / "old.duckdb")
    assert old.verify()["ok"]  # read-only, tables missing
    new = Catalog(tmp_path / "new.duckdb")
    snap = register_import(new, Preferences(preferences_table(_pairs(3), "test"), "test"))
    assert new.merge([tmp_path / "old.duckdb"])  # an older source
    assert {s.kind for s in new.list()} == {"scores", "preferences"}
    assert old.merge([tmp_path / "new.duckdb"])  # an older destination: its tables are added at the write
    assert old.get(snap.id).rows == 3 and old.read(snap.id).num_rows == 3 and old.verify()["ok"]


def test_reward_eval_of_a_judge_counts_the_pairs_it_could_not_score_apart(cli, tmp_path):
    from bench.fake_openai import FakeOpenAI

    data = _write(tmp_path / "pairs.jsonl", _pairs(3))
    with FakeOpenAI() as server:
        server.judge_garbage = 1  # the first judgement says nothing: that pair is neither a win, a loss nor a tie
        got = cli(
            "reward", "eval", "--data", data, "--ranker", "judge", "--ranker-model", "served-model",
            "--judge-backend", "openai", "--base-url", server.url, "--concurrency", "1", "--judge-retries", "0",
            "--json",
        )  # fmt: skip
    assert got.code == 0, got.err
    report = got.json()
    assert report["pairs"] == 3 and report["unscored"] >= 1
    assert report["wins"] + report["losses"] + report["ties"] == 3 - report["unscored"]
