"""Ranking: native PairRM equals llm-blender's, is batch-independent; the rank stage and bring-your-own scorers."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from builders.backends.llm_blender import LlmBlender
from builders.backends.pairrm import PairRM
from builders.config import RankConfig
from builders.errors import InputError, IterdpoError
from builders.rank import rank
from tests.conftest import generations_catalog as _generations_catalog
from tests.conftest import text


@pytest.fixture(scope="module")
def rankers(tiny_models):
    return PairRM(str(tiny_models / "ranker"), device="cpu"), LlmBlender(str(tiny_models / "ranker"), device="cpu")


def _assert_close(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        assert max(abs(u - v) for u, v in zip(x, y)) <= tol, (x, y)


@pytest.mark.parametrize("n", [2, 3, 5, 16])  # Snorkel generates 5; best-of-n ranks 16
def test_pairrm_equals_llm_blender_for_2_to_16_candidates(rankers, n):
    native, reference = rankers
    rng = random.Random(n)
    prompts = [text(rng, rng.randint(3, 40)) for _ in range(2)]
    cands = [[text(rng, rng.randint(1, 60)) for _ in range(n)] for _ in prompts]
    _assert_close(native.score(prompts, cands), reference.score(prompts, cands))


def test_pairrm_equals_llm_blender_beyond_the_truncation_limits(rankers, tiny_models):
    native, reference = rankers
    rng = random.Random(0)
    # the tiny tokenizer spends ~1 token per 3 characters: these exceed 1224 source / 412 candidate tokens
    prompts = [text(rng, 1500), text(rng, 30), text(rng, 900)]
    cands = [[text(rng, 700), text(rng, 5), text(rng, 1400)] for _ in prompts]
    src, cand_ids = native.encode(prompts[0], cands[0])
    assert len(src) == 1224 and len(cand_ids[2]) == 412  # really truncated
    src_short, cand_short = native.encode(prompts[1], cands[1])
    assert len(cand_short[2]) > 412  # a short prompt leaves half its unused budget to the candidates
    _assert_close(native.score(prompts, cands), reference.score(prompts, cands))


@pytest.fixture(scope="module")
def short_ranker(tiny_models, tmp_path_factory):
    """The tiny ranker with truncation limits of 40 source / 24 candidate tokens: the batching properties at
    lengths just past the limits, in a second instead of minutes."""
    folder = tmp_path_factory.mktemp("short") / "ranker"
    shutil.copytree(tiny_models / "ranker", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "source_maxlength": 40, "candidate_maxlength": 24}))
    return folder


def test_pairrm_scores_are_bit_identical_whatever_the_batching(short_ranker):
    ranker = PairRM(str(short_ranker), device="cpu")
    rng = random.Random(5)
    prompts = [text(rng, rng.choice([3, 14, 40])) for _ in range(6)]
    cands = [[text(rng, rng.randint(2, 40)) for _ in range(5)] for _ in prompts]
    src, cand_ids = ranker.encode(max(prompts, key=len), cands[0])
    assert len(src) == 40 and max(len(c) for c in cand_ids) == 24  # some inputs really are truncated
    reference = ranker.score(prompts, cands)
    for batch_tokens in (16, 300):  # one pass per pair; several widths per pass (the default holds them all)
        ranker.batch_tokens = batch_tokens
        assert ranker.score(prompts, cands) == reference
    for size in (1, 3):  # other prompts in the same call (rank's --batch-prompts)
        got = [
            s
            for at in range(0, len(prompts), size)
            for s in ranker.score(prompts[at : at + size], cands[at : at + size])
        ]
        assert got == reference
    # the score of C - C^T sums to zero over the candidates
    assert all(abs(sum(s)) < 1e-5 for s in reference)


def test_rank_snapshot_ids_do_not_depend_on_batch_options(tmp_path, short_ranker):
    ids = set()
    for name, batch_prompts, batch_tokens in (("a", 64, None), ("b", 1, 16), ("c", 4, 200)):
        catalog = _generations_catalog(tmp_path / f"{name}.duckdb")
        cfg = RankConfig(ranker_model=str(short_ranker), batch_prompts=batch_prompts, batch_tokens=batch_tokens)
        ids.add(rank(catalog, 1, cfg, progress=False).snapshots[0].id)
    assert len(ids) == 1


def test_on_gpu_the_batch_options_are_part_of_the_resume_key(tmp_path, short_ranker, monkeypatch):
    # GPU kernels may change with the batch shape (not bit-identical there): a resumed run must not mix options
    ranker = PairRM(str(short_ranker), device="cpu")
    monkeypatch.setattr("builders.rank.device_for", lambda device: "cuda")
    catalog = _generations_catalog(tmp_path / "c.duckdb")
    first = rank(
        catalog,
        1,
        RankConfig(ranker_model=str(short_ranker), batch_prompts=2, batch_tokens=64),
        progress=False,
        ranker=ranker,
    )
    assert (first.snapshots[0].params["batch_prompts"], first.snapshots[0].params["batch_tokens"]) == (2, 64)
    other = rank(
        catalog,
        1,
        RankConfig(ranker_model=str(short_ranker), batch_prompts=3, batch_tokens=64),
        progress=False,
        ranker=ranker,
    )
    assert other.splits[0].processed == 6  # nothing reused from the run with other batch options


def test_forward_passes_are_n_times_n_minus_1(tiny_models):
    ranker = PairRM(str(tiny_models / "ranker"), device="cpu")
    ranker.score(["a prompt", "another"], [["x", "y", "z"], ["p", "q", "r", "s", "t"]])
    assert ranker.passes == 3 * 2 + 5 * 4


def test_ranker_folder_without_llm_blender_config(tmp_path, tiny_models):
    folder = tmp_path / "notpairrm"
    shutil.copytree(tiny_models / "ranker", folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "deberta"}))
    with pytest.raises(InputError, match="not a PairRM folder: it needs llm-blender's config.json"):
        PairRM(str(folder))
    with pytest.raises(InputError, match="cannot be loaded"):
        PairRM(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------------ the stage
def test_rank_stage_registers_scores_and_is_resumable(tmp_path, tiny_models):
    catalog = _generations_catalog(tmp_path / "c.duckdb")
    cfg = RankConfig(ranker_model=str(tiny_models / "ranker"), batch_prompts=2)
    first = rank(catalog, 1, cfg, progress=False)
    snap = first.snapshots[0]
    assert snap.kind == "scores" and snap.rows == 24 and snap.params["ranker"] == "pairrm"
    assert snap.parents == [catalog.newest("generations", 1, "train").id]
    again = rank(catalog, 1, cfg, progress=False)
    assert again.splits[0].processed == 0 and again.snapshots[0].id == snap.id
    # same scores as the reference library, through the whole stage
    blender = rank(
        catalog, 1, RankConfig(ranker="llm-blender", ranker_model=str(tiny_models / "ranker")), progress=False
    ).snapshots[0]
    a = catalog.read(snap.id).column("score").to_pylist()
    b = catalog.read(blender.id).column("score").to_pylist()
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_python_scorer_and_its_bad_outputs(tmp_path):
    catalog = _generations_catalog(tmp_path / "c.duckdb")
    ok = rank(
        catalog, 1, RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better"), progress=False
    ).snapshots[0]
    rows = catalog.read(ok.id).to_pylist()
    gens = {
        (r["prompt_id"], r["response_index"]): r["response"]
        for r in catalog.read(catalog.newest("generations", 1, "train").id).to_pylist()
    }
    assert all(r["score"] == len(gens[(r["prompt_id"], r["response_index"])]) for r in rows)
    first_prompt = rows[0]["prompt_id"]
    with pytest.raises(IterdpoError, match=f"non-finite score \\(nan\\) for prompt {first_prompt}"):
        rank(catalog, 1, RankConfig(ranker="python", ranker_model="tests.scorers:nan_for_second"), progress=False)
    with pytest.raises(InputError, match="returned 23 scores for 24 responses"):
        rank(catalog, 1, RankConfig(ranker="python", ranker_model="tests.scorers:too_few"), progress=False)
    with pytest.raises(InputError, match="must return a list of numbers"):
        rank(catalog, 1, RankConfig(ranker="python", ranker_model="tests.scorers:not_numbers"), progress=False)
    with pytest.raises(InputError, match="cannot be imported"):
        rank(catalog, 1, RankConfig(ranker="python", ranker_model="tests.scorers:nope"), progress=False)
    with pytest.raises(InputError, match="unknown ranker 'gpt4'"):
        rank(catalog, 1, RankConfig(ranker="gpt4"), progress=False)
    assert len(catalog.list(kind="scores")) == 1


def test_scalar_reward_model(tmp_path, tiny_models):
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    backbone = tiny_models / "ranker" / "backbone"
    config = DebertaV2Config.from_pretrained(backbone, num_labels=1)
    import torch

    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(backbone).save_pretrained(tmp_path / "rm")
    catalog = _generations_catalog(tmp_path / "c.duckdb")
    snap = rank(catalog, 1, RankConfig(ranker="scalar", ranker_model=str(tmp_path / "rm")), progress=False).snapshots[0]
    scores = catalog.read(snap.id).column("score").to_pylist()
    assert len(scores) == 24 and len(set(scores)) > 12


def test_scalar_ranker_refuses_a_model_without_a_trained_head(tmp_path, tiny_models):
    catalog = _generations_catalog(tmp_path / "c.duckdb")
    # a PairRM folder, and a bare backbone: transformers would fill the classifier with random weights
    for folder in (tiny_models / "ranker", tiny_models / "ranker" / "backbone"):
        with pytest.raises(
            InputError, match="weights are missing from its checkpoint and would be random \\(classifier"
        ):
            rank(catalog, 1, RankConfig(ranker="scalar", ranker_model=str(folder)), progress=False)
    assert catalog.list(kind="scores") == []


def _state(path):
    from builders.catalog import Catalog

    with Catalog(path).connect() as con:
        return [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("snapshots", "work_units")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-prompts", "0"], "--batch-prompts must be at least 1, not 0"),
        (["--batch-tokens", "-5"], "--batch-tokens must be at least 1, not -5"),
        (["--dtype", "float128"], "--dtype must be one of auto, float32, float16, bfloat16, not 'float128'"),
        (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device"),
    ],
)
def test_cli_rank_bad_options_fail_before_any_work(cli, catalog_path, tiny_models, monkeypatch, args, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _generations_catalog(catalog_path)
    before = _state(catalog_path)
    result = cli("rank", "--iteration", "1", "--ranker-model", tiny_models / "ranker", *args)
    assert result.code == 1 and result.out == "" and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith(f"Error: {message}")
    assert _state(catalog_path) == before


def test_cli_rank_without_generations_is_one_line(cli):
    from tests.conftest import SAMPLE

    assert cli("prompts", "import", SAMPLE).code == 0
    assert cli("prompts", "split", "--iterations", "1", "--train-size", "5", "--test-size", "0").code == 0
    result = cli("rank", "--iteration", "1")
    assert result.code == 1 and len(result.err.splitlines()) == 1
    assert (
        "iteration 1 has no generations" in result.err
        and "generate first (iterdpo generate --iteration 1)" in result.err
    )
