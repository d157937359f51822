"""Combining scorers: the numbers of each method (checked against numpy or by hand, not the module's code), and
`iterdpo combine` as a user runs it: the registered snapshots, their lineage, and bad input."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from builders.catalog import Catalog
from builders.combine import combine_scores
from builders.errors import InputError
from builders.prompts import prompt_id
from builders.publish import published_snapshots
from builders.schemas import KINDS
from tests.conftest import ROOT, SAMPLE

PIDS = ["a", "a", "a", "b", "b"]
HELPFUL = [1.0, 4.0, 2.0, 10.0, 0.0]
STYLE = [0.5, 0.5, 3.0, -1.0, 2.0]


def test_zscore_is_the_weighted_sum_of_population_standardised_components():
    got = combine_scores(PIDS, [HELPFUL, STYLE], [2.0, 0.5])
    h, s = np.array(HELPFUL), np.array(STYLE)
    expected = 2.0 * (h - h.mean()) / h.std() + 0.5 * (s - s.mean()) / s.std()  # numpy's std is the population sd
    assert got == pytest.approx(expected.tolist(), abs=1e-12)


def test_zscore_cancels_scale_and_offset_and_a_constant_component_counts_zero():
    scaled = [1000.0 * x - 7.0 for x in HELPFUL]
    assert combine_scores(PIDS, [scaled], [1.0]) == pytest.approx(combine_scores(PIDS, [HELPFUL], [1.0]))
    constant = [0.1] * 5
    alone = combine_scores(PIDS, [HELPFUL], [1.0])
    assert combine_scores(PIDS, [HELPFUL, constant], [1.0, 3.0]) == pytest.approx(alone)
    assert combine_scores(PIDS, [constant], [1.0]) == [0.0] * 5


def test_rank_is_the_per_prompt_weighted_mean_rank_with_ties_averaged():
    got = combine_scores(PIDS, [HELPFUL, STYLE], [3.0, 1.0], method="rank")
    # prompt a: HELPFUL 1,4,2 -> ranks 1,3,2; STYLE 0.5,0.5,3 -> tied lowest share (1+2)/2 = 1.5, then 3
    # prompt b: HELPFUL 10,0 -> 2,1; STYLE -1,2 -> 1,2
    helpful_ranks = [1, 3, 2, 2, 1]
    style_ranks = [1.5, 1.5, 3, 1, 2]
    expected = [(3 * h + 1 * s) / 4 for h, s in zip(helpful_ranks, style_ranks)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_a_negative_weight_turns_an_axis_round():
    got = combine_scores(PIDS, [HELPFUL], [-1.0], method="rank")
    assert got == pytest.approx([-1, -3, -2, -2, -1])  # the best is the one HELPFUL likes least
    assert combine_scores(PIDS, [HELPFUL], [-2.0], method="weighted-sum") == [-2.0, -8.0, -4.0, -20.0, -0.0]


def test_weighted_sum_is_the_plain_weighted_sum():
    got = combine_scores(PIDS, [HELPFUL, STYLE], [0.25, 2.0], method="weighted-sum")
    assert got == pytest.approx([0.25 * h + 2.0 * s for h, s in zip(HELPFUL, STYLE)], abs=1e-12)


@pytest.mark.parametrize("method", ["zscore", "rank", "weighted-sum"])
def test_a_response_missing_in_any_component_is_unscored(method):
    style = [0.5, None, 3.0, -1.0, 2.0]
    got = combine_scores(PIDS, [HELPFUL, style], [1.0, 1.0], method=method)
    assert got[1] is None and all(g is not None for i, g in enumerate(got) if i != 1)


def test_rank_ranks_only_the_responses_every_component_scored():
    # response 1 is unscored by STYLE: prompt a's ranks are among responses 0 and 2 only
    got = combine_scores(PIDS, [HELPFUL, [0.5, None, 3.0, -1.0, 2.0]], [1.0, 1.0], method="rank")
    assert got[:3] == [1.0, None, 2.0]


def test_zscore_standardises_a_component_over_all_the_responses_it_scored():
    style = [0.5, None, 3.0, -1.0, 2.0]
    got = combine_scores(PIDS, [HELPFUL, style], [0.0, 1.0])
    s = np.array([0.5, 3.0, -1.0, 2.0])
    expected = ((s - s.mean()) / s.std()).tolist()
    assert [g for g in got if g is not None] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "components, weights, method, message",
    [
        ([HELPFUL], [1.0], "median", "is not a combine method"),
        ([HELPFUL, STYLE], [1.0], "zscore", "1 weights for 2 components"),
        ([HELPFUL], [float("nan")], "zscore", "finite number"),
        ([HELPFUL], ["1"], "zscore", "finite number"),
        ([HELPFUL, STYLE], [0.0, 0.0], "zscore", "every weight is 0"),
        ([HELPFUL[:4]], [1.0], "zscore", "4 scores for 5 responses"),
        ([[1.0, float("inf"), 0.0, 0.0, 0.0]], [1.0], "rank", "non-finite"),
        ([], [], "zscore", "at least one component"),
    ],
)
def test_bad_arguments_are_one_clear_error(components, weights, method, message):
    with pytest.raises(InputError, match=message):
        combine_scores(PIDS, components, weights, method=method)


# ------------------------------------------------------------------------------------------------ the stage (CLI)
# two axes as python scorers (`--ranker-model tests.test_combine:FUNCTION`), recomputed below from the texts
def length(prompts, responses):
    return [float(len(r)) for r in responses]


def vowels(prompts, responses):
    return [float(sum(c in "aeiou" for c in r)) for r in responses]


def constant(prompts, responses):
    return [1.0 for _ in responses]


ANSWERS = {  # prompt -> its responses (ties within a prompt on purpose: `aa` and `ab` have one vowel each)
    "train": {"Name a fruit.": ["apple", "kiwi fruit", "a", "pear"], "Say hi.": ["hi there", "hello", "yo"]},
    "test": {"Name a tree.": ["oak", "willow tree", "elm"]},
}


def _catalog(path: Path) -> Catalog:
    """Prompts and generations of iteration 1, both splits, registered as `prompts split` and `generate` do."""
    catalog = Catalog(path)
    for split, answers in ANSWERS.items():
        prompts = catalog.register(
            "prompts",
            pa.table(
                {"prompt_id": [prompt_id(p) for p in answers], "prompt": list(answers), "source": [None] * len(answers)}
            ),
            iteration=1,
            split=split,
        )
        rows = [
            {
                "prompt_id": prompt_id(p),
                "response_index": i,
                "response": r,
                "finish_reason": "stop",
                "prompt_tokens": 3,
                "completion_tokens": 3,
            }
            for p, rs in answers.items()
            for i, r in enumerate(rs)
        ]
        catalog.register("generations", pa.Table.from_pylist(rows), iteration=1, split=split, parents=[prompts.id])
    return catalog


def _rank(cli, function: str, *extra) -> dict[str, str]:
    out = cli(
        "rank",
        "--iteration",
        1,
        "--ranker",
        "python",
        "--ranker-model",
        f"tests.test_combine:{function}",
        *extra,
        "--json",
    )
    assert out.code == 0, out.err
    return {s["split"]: s["snapshot"]["id"] for s in out.json()["splits"]}


@pytest.fixture
def ranked(cli, catalog_path):
    _catalog(catalog_path)
    return _rank(cli, "length"), _rank(cli, "vowels")


def _expected(split: str, method: str, weights: tuple[float, float]) -> dict[tuple[str, int], float]:
    """The combination computed here from the texts, with numpy (not builders.combine)."""
    keys = [(prompt_id(p), i) for p, rs in ANSWERS[split].items() for i in range(len(rs))]
    texts = [r for rs in ANSWERS[split].values() for r in rs]
    axes = [np.array(length([], texts)), np.array(vowels([], texts))]
    if method == "weighted-sum":
        total = weights[0] * axes[0] + weights[1] * axes[1]
    elif method == "zscore":
        total = sum(w * (a - a.mean()) / a.std() for w, a in zip(weights, axes))
    else:  # per prompt: ranks 1..n from the lowest score, ties share the mean of their positions
        total = np.zeros(len(keys))
        for pid in {k[0] for k in keys}:
            at = np.array([k[0] == pid for k in keys])
            for w, a in zip(weights, axes):
                values = a[at]
                ranks = np.array([1 + (values < v).sum() + ((values == v).sum() - 1) / 2 for v in values])
                total[at] += w * ranks
        total /= sum(abs(w) for w in weights)
    return dict(zip(keys, total.tolist()))


@pytest.mark.parametrize("method", ["zscore", "rank", "weighted-sum"])
def test_combine_registers_the_weighted_combination_of_each_split(cli, catalog_path, ranked, method):
    by_length, by_vowels = ranked
    catalog = Catalog(catalog_path)
    catalog.tag(by_vowels["train"], "vowel-axis")
    args = ("combine", "--iteration", 1, "--scores", f"{by_length['train']}=2", "--scores", "vowel-axis=0.5")
    out = cli(*args, "--method", method, "--json")
    assert out.code == 0, out.err
    splits = {s["split"]: s for s in out.json()["splits"]}
    assert set(splits) == {"train", "test"}
    for split, s in splits.items():
        snap = catalog.get(s["snapshot"]["id"])
        got = {(r["prompt_id"], r["response_index"]): r["score"] for r in catalog.read(snap.id).to_pylist()}
        assert got == pytest.approx(_expected(split, method, (2.0, 0.5)), abs=1e-9)
        # the axes are the parents (after the generations build follows), the test split's found by its ranker
        gen = catalog.newest("generations", 1, split)
        assert snap.parents == [gen.id, by_length[split], by_vowels[split]]
        assert (snap.params["method"], snap.params["weights"], snap.params["unscored"]) == (method, [2.0, 0.5], 0)
        assert [c["function"] for c in snap.params["ranker_components"]] == [
            "tests.test_combine:length",
            "tests.test_combine:vowels",
        ]
    again = cli(*args, "--method", method, "--json").json()
    assert [s["snapshot"]["id"] for s in again["splits"]] == [s["snapshot"]["id"] for s in out.json()["splits"]]
    # build selects from the combination: the chosen response is the one the combination ranks first
    built = cli("build", "--iteration", 1, "--json")
    assert built.code == 0, built.err
    pairs = catalog.read(built.json()["splits"][0]["snapshot"]["id"]).to_pylist()
    expected = _expected("train", method, (2.0, 0.5))
    for row in pairs:
        best = max(range(len(row["all_generated_responses"])), key=lambda i: (expected[(row["prompt_id"], i)], -i))
        assert row["chosen"][-1]["content"] == row["all_generated_responses"][best]


def test_combine_prints_a_line_per_split_and_only_the_split_asked(cli, ranked):
    by_length, by_vowels = ranked
    out = cli(
        "combine",
        "--iteration",
        1,
        "--scores",
        f"{by_length['test']}=1",
        "--scores",
        f"{by_vowels['test']}=1",
        "--split",
        "test",
    )
    assert out.code == 0, out.err
    assert out.out.startswith("test: 1 prompts, 3 responses (0 unscored") and "train" not in out.out


def test_a_response_an_axis_did_not_score_is_left_out_and_counted(cli, catalog_path, ranked):
    by_length, _ = ranked
    catalog = Catalog(catalog_path)
    gen = catalog.newest("generations", 1, "train")
    rows = catalog.read(by_length["train"]).to_pylist()[1:]  # a scorer that skipped one response
    partial = catalog.register(
        "scores",
        pa.Table.from_pylist(rows, schema=KINDS["scores"].schema),
        iteration=1,
        split="train",
        parents=[gen.id],
        params={"ranker": "python", "function": "hand"},
    )
    out = cli(
        "combine",
        "--iteration",
        1,
        "--split",
        "train",
        "--scores",
        f"{partial.id}=1",
        "--scores",
        f"{by_length['train']}=1",
        "--json",
    )
    assert out.code == 0, out.err
    split = out.json()["splits"][0]
    assert split["drops"] == {"unscored": 1} and split["snapshot"]["rows"] == len(rows)
    assert split["snapshot"]["params"]["unscored"] == 1


def test_a_constant_axis_counts_for_nothing_in_zscore(cli, ranked):
    by_length, _ = ranked
    flat = _rank(cli, "constant")
    out = cli(
        "combine", "--iteration", 1, "--scores", f"{by_length['train']}=1", "--scores", f"{flat['train']}=5", "--json"
    )
    alone = cli("combine", "--iteration", 1, "--scores", f"{by_length['train']}=1", "--json")
    assert out.code == 0 and alone.code == 0, out.err + alone.err
    assert [s["snapshot"]["id"] for s in out.json()["splits"]] == [s["snapshot"]["id"] for s in alone.json()["splits"]]


@pytest.mark.parametrize(
    "scores, extra, message",
    [
        (["{L}=heavy"], (), "--scores '.*=heavy': the weight 'heavy' is not a number"),
        (["{L}"], (), "give SELECTOR_OR_ID=WEIGHT"),
        (["{L}=nan"], (), "finite"),
        (["{L}=0", "{V}=0"], (), "every weight is 0"),
        (["{L}=1"], ("--method", "median"), "--method 'median' is not a combine method"),
        (["{L}=1", "{C}=1"], (), "has no test split"),
        (["{L}=1", "{O}=1"], ("--split", "train"), "scores of different generations in train"),
        (["generations:1:train=1"], (), "a complete scores snapshot of iteration 1 is needed, not generations"),
        (["{L}=1"], ("--iteration", 2), "of iteration 2 is needed"),
        (["nosuchtag=1"], (), "no snapshot or tag 'nosuchtag'"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_registers_nothing(cli, catalog_path, ranked, scores, extra, message):
    by_length, by_vowels = ranked
    train_only = _rank(cli, "constant", "--split", "train")
    catalog = Catalog(catalog_path)
    # another generation run of the same train prompts, scored by the same axis
    gen = catalog.newest("generations", 1, "train")
    other_rows = catalog.read(gen.id).to_pylist()
    other_rows[0]["response"] = "banana"
    other = catalog.register(
        "generations",
        pa.Table.from_pylist(other_rows, schema=KINDS["generations"].schema),
        iteration=1,
        split="train",
        parents=[catalog.parent(gen, "prompts").id],
    )
    other_scores = cli(
        "rank",
        "--iteration",
        1,
        "--ranker",
        "python",
        "--ranker-model",
        "tests.test_combine:length",
        "--from",
        other.id,
        "--json",
    ).json()["splits"][0]["snapshot"]["id"]
    refs = {"L": by_length["train"], "V": by_vowels["train"], "C": train_only["train"], "O": other_scores}
    before = [s.id for s in catalog.list()]
    args = [a for s in scores for a in ("--scores", s.format(**refs))]
    iteration = () if "--iteration" in extra else ("--iteration", 1)
    out = cli("combine", *iteration, *args, *extra)
    assert out.code == 1, out.out
    assert re.search(message, out.err), out.err
    assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err
    assert [s.id for s in catalog.list()] == before


def test_the_card_names_each_axis_and_its_rebuild_script_registers_the_combination_again(cli, tmp_path, tiny_models):
    """One iteration through the CLI, its reward a combination of two axes, staged: the recipe names each axis with
    its weight, the chosen-vs-rejected table shows each axis' means, and the card's commands run as a script in an
    empty folder register the same snapshots."""
    from tests.test_cards import _shims, rebuild_block

    steps = [
        ("prompts", "import", SAMPLE),
        ("prompts", "split", "--iterations", 1, "--train-size", 4, "--test-size", 2, "--seed", 5),
        ("generate", "--iteration", 1, "--model", tiny_models / "generator", "--num-responses", 3, "--max-tokens", 16),
    ]
    for step in steps:
        assert cli(*step).code == 0, step
    by_length, by_vowels = _rank(cli, "length"), _rank(cli, "vowels")
    out = cli(
        "combine",
        "--iteration",
        1,
        "--scores",
        f"{by_length['train']}=2",
        "--scores",
        f"{by_vowels['train']}=-0.5",
        "--method",
        "rank",
    )
    assert out.code == 0, out.err
    assert cli("build", "--iteration", 1, "--keep-ties").code == 0
    staged = cli("publish", "me/combined", "--dry-run", "--local-dir", tmp_path / "staged", "--json").json()
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "`combine (rank): 2 x python: tests.test_combine:length + -0.5 x python: tests.test_combine:vowels`" in card
    catalog = Catalog(tmp_path / "catalog.duckdb")
    pairs = catalog.read(catalog.newest("pairs", 1, "train").id).to_pylist()
    chosen = [len(r["chosen"][-1]["content"]) for r in pairs]
    rejected = [len(r["rejected"][-1]["content"]) for r in pairs]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    row = (
        f"| `train_iteration_1` | `python: tests.test_combine:length` | 2 | {mean(chosen):.4g} | {mean(rejected):.4g} "
        f"| {mean(chosen) - mean(rejected):.4g} |"
    )
    assert row in card, card[card.index("## Chosen vs rejected") :][:2000]
    assert "| `test_iteration_1` | `python: tests.test_combine:vowels` | -0.5 |" in card
    # the reward on test prompts: each axis' own mean, as the combination is standardised within an iteration
    test_length = catalog.read(by_length["test"]).to_pylist()
    per_prompt = {}
    for r in test_length:
        per_prompt.setdefault(r["prompt_id"], []).append(r["score"])
    assert (
        f"| 1 | `python: tests.test_combine:length` | 2 | {mean([mean(v) for v in per_prompt.values()]):.3f} ± " in card
    )

    script = rebuild_block(card)
    assert "iterdpo combine --iteration 1 --scores " in script and "--method rank" in script
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "rebuild.sh").write_text(script)
    env = {**os.environ, **_shims(tmp_path / "bin"), "BASE_MODEL": str(tiny_models / "generator")}
    done = subprocess.run(["bash", "rebuild.sh"], cwd=fresh, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rebuilt = {
        f"{split}_iteration_{it}": s.id
        for (it, split), s in published_snapshots(Catalog(fresh / "catalog.duckdb"), None).items()
    }
    assert rebuilt == staged["snapshots"]
    assert (fresh / "rebuilt" / "README.md").read_text() == card


def test_a_pipeline_ranks_with_each_listed_ranker_and_builds_from_their_combination(tmp_path, tiny_models):
    import yaml

    from builders.pipeline import load_pipeline, run_pipeline

    doc = {
        "catalog": str(tmp_path / "catalog.duckdb"),
        "prompts": {"source": str(SAMPLE)},
        "split": {"iterations": 1, "train_size": 4, "test_size": 2, "seed": 5},
        "generation": {
            "model": str(tiny_models / "generator"),
            "backend": "transformers",
            "sampling": {"num_responses": 3, "max_tokens": 16, "seed": 5},
        },
        "ranking": [
            {"ranker": "python", "ranker_model": "tests.test_combine:length", "weight": 1},
            {"ranker": "python", "ranker_model": "tests.test_combine:vowels", "weight": 3},
        ],
        "combine": {"method": "weighted-sum"},
        "training": {"recipe": str(ROOT / "train/recipes/tiny-cpu.yaml"), "output_dir": str(tmp_path / "m{n}")},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    catalog = Catalog(tmp_path / "catalog.duckdb")
    run_pipeline(catalog, load_pipeline(path), progress=False)
    for split in ("train", "test"):
        pairs = catalog.newest("pairs", 1, split)
        combined = catalog.parent(pairs, "scores")
        axes = catalog.parents(combined, "scores")
        assert [a.params["function"] for a in axes] == ["tests.test_combine:length", "tests.test_combine:vowels"]
        assert (combined.params["method"], combined.params["weights"]) == ("weighted-sum", [1.0, 3.0])
        gen = catalog.read(catalog.parent(combined, "generations").id).to_pylist()
        texts = [r["response"] for r in gen]
        expected = [a + 3 * b for a, b in zip(length([], texts), vowels([], texts))]
        assert [r["score"] for r in catalog.read(combined.id).to_pylist()] == pytest.approx(expected)
        # the pairs' chosen is the best of the combination
        for row in catalog.read(pairs.id).to_pylist():
            scores = row["all_rm_scores"]
            assert row["score_chosen"] == max(scores) and row["score_rejected"] == min(scores)


def test_a_pipelines_list_of_rankers_is_checked_before_anything_runs(tmp_path, tiny_models):
    import yaml

    from builders.pipeline import load_pipeline, validate_pipeline

    path = tmp_path / "p.yaml"
    base = {
        "prompts": {"source": str(SAMPLE)},
        "split": {"iterations": 1, "train_size": 4, "test_size": 2},
        "generation": {"model": str(tiny_models / "generator")},
        "training": {"recipe": str(ROOT / "train/recipes/tiny-cpu.yaml")},
    }
    bad = [
        (
            [{"ranker": "python", "ranker_model": "tests.test_combine:length", "weight": "x"}],
            {},
            "ranking[0].weight must be float",
        ),
        ([{"ranker": "python", "ranker_model": "tests.test_combine:nothing"}], {}, "ranking[0].ranker_model"),
        (
            [{"ranker": "python", "ranker_model": "tests.test_combine:length"}],
            {"method": "mean"},
            "combine: method 'mean'",
        ),
        ([{"ranker": "python", "ranker_model": "tests.test_combine:length", "weight": 0}], {}, "every weight is 0"),
        ([{"ranker": "python", "ranker_model": "tests.test_combine:length", "wieght": 1}], {}, "unknown key 'wieght'"),
    ]
    for ranking, combine, message in bad:
        path.write_text(yaml.safe_dump({**base, "ranking": ranking, "combine": combine}))
        with pytest.raises(InputError, match=re.escape(message)):
            validate_pipeline(load_pipeline(path), str(path))
