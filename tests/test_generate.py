"""The generation stage on the tiny generator: reproducible, resumable, shardable, and clear about bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fake_openai import PROMPT_TOKENS, FakeOpenAI, answer
from builders.catalog import Catalog
from builders.config import GenerateConfig, OpenAIConfig, SamplingConfig, SplitConfig
from builders.errors import InputError, IterdpoError
from builders.generate import generate, in_shard, parse_shard, prompt_seed
from builders.prompts import import_prompts, split_prompts
from tests.conftest import ROOT, SAMPLE

FAST = SamplingConfig(num_responses=3, temperature=0.7, max_tokens=16, seed=7)


@pytest.fixture
def split_catalog(tmp_path: Path) -> Catalog:
    catalog = Catalog(tmp_path / "catalog.duckdb")
    import_prompts(catalog, str(SAMPLE))
    split_prompts(catalog, SplitConfig(iterations=2, train_size=12, test_size=4, seed=1))
    return catalog


def cfg(model: Path, **kw) -> GenerateConfig:
    return GenerateConfig(model=str(model), sampling=kw.pop("sampling", FAST), **kw)


def test_generations_have_the_row_schema_and_record_how_they_were_made(split_catalog, tiny_models):
    result = generate(split_catalog, 1, cfg(tiny_models / "generator"), progress=False)
    assert [s.split for s in result.splits] == ["train", "test"]
    train = result.splits[0].snapshot
    rows = split_catalog.read(train.id)
    assert rows.num_rows == 12 * 3 and train.kind == "generations" and (train.iteration, train.split) == (1, "train")
    assert set(rows.column("response_index").to_pylist()) == {0, 1, 2}
    assert set(rows.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(0 < t <= 16 for t in rows.column("completion_tokens").to_pylist())
    prompts = split_catalog.newest("prompts", 1, "train")
    assert train.parents == [prompts.id]
    assert train.params["sampling"]["num_responses"] == 3 and train.params["backend"] == "transformers"
    assert train.params["chat_template"].count("[INST]") >= 1 and len(train.params["model_sha256"]) == 64
    # the n responses of a prompt differ (different seeds), so the ranker has something to rank
    per_prompt = {}
    for r in rows.to_pylist():
        per_prompt.setdefault(r["prompt_id"], set()).add(r["response"])
    assert sum(len(v) > 1 for v in per_prompt.values()) >= 10


def test_results_do_not_depend_on_batch_size_or_reruns(split_catalog, tiny_models, tmp_path):
    one = generate(split_catalog, 1, cfg(tiny_models / "generator", batch_prompts=1), progress=False)
    other = Catalog(tmp_path / "other.duckdb")
    import_prompts(other, str(SAMPLE))
    split_prompts(other, SplitConfig(iterations=2, train_size=12, test_size=4, seed=1))
    many = generate(other, 1, cfg(tiny_models / "generator", batch_prompts=50), progress=False)
    assert [s.id for s in one.snapshots] == [s.id for s in many.snapshots]
    again = generate(split_catalog, 1, cfg(tiny_models / "generator"), progress=False)  # all done: nothing generated
    assert [s.processed for s in again.splits] == [0, 0]
    assert [s.id for s in again.snapshots] == [s.id for s in one.snapshots]


def test_seeds_are_per_prompt_blocks():
    n = 5
    seeds = {prompt_seed(42, f"{i:064x}", n) for i in range(2000)}
    assert len(seeds) == 2000 and all(s % n == 0 and s < 2**62 for s in seeds)
    assert prompt_seed(42, "a" * 64, n) == prompt_seed(42, "a" * 64, n) != prompt_seed(43, "a" * 64, n)


def test_shards_merged_equal_an_unsharded_run(split_catalog, tiny_models, tmp_path):
    reference = Catalog(tmp_path / "ref.duckdb")
    shutil.copy(split_catalog.path, reference.path)
    full = generate(reference, 1, cfg(tiny_models / "generator", splits=("train",)), progress=False).snapshots[0]

    shards = []
    for k in range(3):
        copy = Catalog(tmp_path / f"shard{k}.duckdb")
        shutil.copy(split_catalog.path, copy.path)
        part = generate(copy, 1, cfg(tiny_models / "generator", splits=("train",), shard=f"{k}/3"), progress=False)
        assert part.snapshots[0].params["shard"] == f"{k}/3"
        shards.append(copy.path)
    split_catalog.merge(shards)
    merged = generate(split_catalog, 1, cfg(tiny_models / "generator", splits=("train",)), progress=False)
    assert merged.splits[0].processed == 0  # every prompt was done by a shard
    assert merged.snapshots[0].id == full.id
    # the full snapshot is the newest complete one; shard snapshots are marked as shards
    assert split_catalog.newest("generations", 1, "train").id == full.id


def test_shard_partition_covers_every_prompt_once():
    ids = [f"{i * 7919:064x}" for i in range(500)]
    owners = [[k for k in range(4) if in_shard(pid, (k, 4))] for pid in ids]
    assert all(len(o) == 1 for o in owners)
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(InputError, match="shard"):
            parse_shard(bad)


def test_prompts_too_long_for_the_context_are_skipped_and_counted(split_catalog, tiny_models, tmp_path):
    from builders.backends.transformers import TransformersGenerator

    sampling = SamplingConfig(num_responses=2, max_tokens=8, seed=1)
    prompts = split_catalog.read(split_catalog.newest("prompts", 1, "test").id).to_pylist()
    lengths = sorted(
        r.prompt_tokens
        for r in TransformersGenerator(str(tiny_models / "generator")).prepare(
            [(p["prompt_id"], p["prompt"], 1) for p in prompts], sampling
        )
    )
    # a copy of the generator whose context holds the shorter prompts and max_tokens, not the longest one
    short = tmp_path / "short-context"
    shutil.copytree(tiny_models / "generator", short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": lengths[-1] + 7}))
    result = generate(split_catalog, 1, cfg(short, splits=("test",), sampling=sampling), progress=False)
    split = result.splits[0]
    assert split.skipped == sum(n + 8 > lengths[-1] + 7 for n in lengths) >= 1
    assert split.snapshot.params["skipped_too_long"] == split.skipped
    assert split.snapshot.params["sampling"]["max_tokens"] == 8  # what the engine ran
    assert split.snapshot.rows == 2 * (split.prompts - split.skipped)


def test_sampling_is_the_stages_not_the_one_a_generator_was_built_with(split_catalog, tiny_models, tmp_path):
    from builders.backends.transformers import TransformersGenerator

    reference = Catalog(tmp_path / "ref.duckdb")
    shutil.copy(split_catalog.path, reference.path)
    built_with = SamplingConfig(num_responses=1, temperature=1.3, max_tokens=2, seed=99)
    given = TransformersGenerator(str(tiny_models / "generator"), built_with)
    ran = generate(split_catalog, 1, cfg(tiny_models / "generator", splits=("test",)), progress=False, generator=given)
    own = generate(reference, 1, cfg(tiny_models / "generator", splits=("test",)), progress=False)
    assert ran.snapshots[0].id == own.snapshots[0].id  # FAST's 3 responses of up to 16 tokens, as recorded
    assert ran.snapshots[0].params["sampling"] == own.snapshots[0].params["sampling"]


def test_temperature_0_is_greedy_with_one_response(split_catalog, tiny_models):
    greedy = SamplingConfig(num_responses=1, temperature=0.0, max_tokens=6, seed=1)
    one = generate(split_catalog, 1, cfg(tiny_models / "generator", splits=("test",), sampling=greedy), progress=False)
    rows = split_catalog.read(one.snapshots[0].id).to_pylist()
    assert len(rows) == 4 and all(r["response_index"] == 0 for r in rows)
    # greedy ignores the seed: another seed gives the same responses
    other = generate(
        split_catalog,
        1,
        cfg(
            tiny_models / "generator",
            splits=("test",),
            sampling=SamplingConfig(num_responses=1, temperature=0.0, max_tokens=6, seed=2),
        ),
        progress=False,
    )
    assert other.snapshots[0].id == one.snapshots[0].id


_KILLABLE = """
import sys
from bench.fake_openai import PROMPT_TOKENS, FakeOpenAI, answer
from builders.catalog import Catalog
from builders.config import GenerateConfig, SamplingConfig
from builders.generate import generate
catalog = Catalog(sys.argv[1])
commit = catalog.add_work
def add_work(*args, **kwargs):  # the handshake: the test kills this process after the third commit
    commit(*args, **kwargs)
    print("committed", flush=True)
catalog.add_work = add_work
generate(catalog, 1, GenerateConfig(model=sys.argv[2], splits=("train",), batch_prompts=1, commit_seconds=0,
         sampling=SamplingConfig(num_responses=3, max_tokens=48, seed=7)), progress=False)
"""


@pytest.mark.slow
def test_kill_9_mid_generation_then_rerun_gives_the_uninterrupted_snapshot(split_catalog, tiny_models, tmp_path):
    reference = Catalog(tmp_path / "ref.duckdb")
    shutil.copy(split_catalog.path, reference.path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(split_catalog.path), str(tiny_models / "generator")],
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
    assert commits == 3, "the run never committed three batches"
    with split_catalog.connect() as con:
        key = con.execute("SELECT work_key FROM work_units LIMIT 1").fetchone()[0]
    done_before = len(split_catalog.work_units(key))
    assert 3 <= done_before < 12, "kill the run in the middle"
    assert split_catalog.list(kind="generations") == []  # no snapshot from an unfinished run
    with Catalog(split_catalog.path).connect():  # nothing holds the catalog after the kill
        pass

    sampling = SamplingConfig(num_responses=3, max_tokens=48, seed=7)
    resumed = generate(
        split_catalog, 1, cfg(tiny_models / "generator", splits=("train",), sampling=sampling), progress=False
    )
    assert resumed.splits[0].processed == 12 - done_before
    full = generate(reference, 1, cfg(tiny_models / "generator", splits=("train",), sampling=sampling), progress=False)
    assert resumed.snapshots[0].id == full.snapshots[0].id


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_clear_errors(split_catalog, tiny_models, tmp_path):
    model = tiny_models / "generator"
    with pytest.raises(InputError, match="cannot be loaded"):
        generate(split_catalog, 1, cfg(tmp_path / "nope"), progress=False)
    with pytest.raises(InputError, match="cannot be loaded"):
        generate(split_catalog, 1, cfg("someone/unknown-model"), progress=False)
    with pytest.raises(InputError, match="num_responses must be at least 1"):
        generate(split_catalog, 1, cfg(model, sampling=SamplingConfig(num_responses=0)), progress=False)
    for value in (float("nan"), float("inf"), -0.5):
        with pytest.raises(InputError, match="temperature must be a number, 0 or more"):
            generate(split_catalog, 1, cfg(model, sampling=SamplingConfig(temperature=value)), progress=False)
    with pytest.raises(InputError, match="temperature 0 is greedy decoding: its 5 responses would be identical"):
        generate(split_catalog, 1, cfg(model, sampling=SamplingConfig(temperature=0.0)), progress=False)
    with pytest.raises(InputError, match="top_p must be in"):
        generate(split_catalog, 1, cfg(model, sampling=SamplingConfig(top_p=float("nan"))), progress=False)
    with pytest.raises(InputError, match="batch_prompts must be at least 1, not -1"):
        generate(split_catalog, 1, cfg(model, batch_prompts=-1), progress=False)
    with pytest.raises(InputError, match="shard must look like K/N"):
        generate(split_catalog, 1, cfg(model, shard="half"), progress=False)
    with pytest.raises(InputError, match="iteration 3 has no prompt sets.*split prompts first"):
        generate(split_catalog, 3, GenerateConfig(model=str(model), sampling=FAST), progress=False)
    assert split_catalog.list(kind="generations") == []


def test_a_tokenizer_without_chat_template_needs_one(split_catalog, tiny_models, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_models / "generator", bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    template = config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    if (bare / "chat_template.jinja").exists():
        template = (bare / "chat_template.jinja").read_text()
        (bare / "chat_template.jinja").unlink()
    assert template
    with pytest.raises(InputError, match="no chat template; give a chat_template file"):
        generate(split_catalog, 1, cfg(bare), progress=False)
    (tmp_path / "mistral.jinja").write_text(template)
    result = generate(
        split_catalog, 1, cfg(bare, chat_template=tmp_path / "mistral.jinja", splits=("test",)), progress=False
    )
    assert result.snapshots[0].rows == 4 * 3


def test_cli_generate_json_and_one_line_errors(cli, tiny_models):
    assert cli("prompts", "import", SAMPLE).code == 0
    assert cli("prompts", "split", "--iterations", "1", "--train-size", "5", "--test-size", "2").code == 0
    out = cli(
        "generate",
        "--iteration",
        "1",
        "--model",
        tiny_models / "generator",
        "--num-responses",
        "2",
        "--max-tokens",
        "8",
        "--json",
    )
    assert out.code == 0, out.err
    doc = out.json()
    assert [s["snapshot"]["rows"] for s in doc["splits"]] == [10, 4]
    bad = cli("generate", "--iteration", "1", "--model", tiny_models / "generator", "--shard", "9/2")
    assert bad.code == 1 and bad.err.strip().splitlines()[-1].startswith("Error: --shard 9/2")


def _state(path: Path) -> list[int]:
    with Catalog(path).connect() as con:
        return [con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("snapshots", "work_units")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "0", "--num-responses", "2"], "--temperature 0 is greedy decoding"),
        (["--temperature", "nan"], "--temperature must be a number, 0 or more, not nan"),
        (["--batch-prompts", "-1"], "--batch-prompts must be at least 1, not -1"),
        (["--backend", "openai", "--concurrency", "0"], "--concurrency must be at least 1, not 0"),
        (["--backend", "openai", "--max-retries", "-1"], "--max-retries must be 0 or more, not -1"),
        (["--backend", "openai", "--base-url", "localhost:8000"], "--base-url must be an http:// or https:// URL"),
        (["--backend", "vllm", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
    ],
)
def test_cli_generate_bad_options_fail_before_any_work(cli, catalog_path, tiny_models, args, message):
    assert cli("prompts", "import", SAMPLE).code == 0
    assert cli("prompts", "split", "--iterations", "1", "--train-size", "5", "--test-size", "2").code == 0
    before = _state(catalog_path)
    result = cli("generate", "--iteration", "1", "--model", tiny_models / "generator", *args)
    assert result.code == 1 and result.out == "" and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith(f"Error: {message}")
    assert _state(catalog_path) == before


# --------------------------------------------------------------------------------------------- openai (fake server)
@pytest.fixture
def fake_server():
    with FakeOpenAI() as fake:
        yield fake.url, fake


def _openai_cfg(url: str, model: str = "served-model", **kw) -> GenerateConfig:
    return GenerateConfig(
        model=model,
        backend="openai",
        splits=("train",),
        sampling=FAST,
        batch_prompts=4,
        openai=OpenAIConfig(base_url=url, backoff=0.01, **kw),
    )


def test_openai_backend_retries_then_keeps_finished_prompts(split_catalog, fake_server, tmp_path, monkeypatch):
    url, fake = fake_server
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    monkeypatch.setattr("builders.generate.model_identity", lambda model: {"model": model})
    fake.fail_first = 2  # two 503s, then fine: retried transparently
    fake.fail_after = 6  # then the server breaks for good after 6 answers
    with pytest.raises(IterdpoError, match="failed 3 times .*rerun to continue") as err:
        generate(split_catalog, 1, _openai_cfg(url, max_retries=2), progress=False)
    assert "sk-secret" not in str(err.value)
    assert all(a == "Bearer sk-secret-value" for a in fake.auth)
    with split_catalog.connect() as con:
        keys = [k for (k,) in con.execute("SELECT DISTINCT work_key FROM work_units").fetchall()]
    # every prompt the server answered is kept (requests stream: no batch is lost with its failed neighbour)
    assert len(keys) == 1 and len(split_catalog.work_units(keys[0])) == fake.answered == 6
    fake.fail_after = None
    resumed = generate(split_catalog, 1, _openai_cfg(url), progress=False).snapshots[0]
    rows = split_catalog.read(resumed.id).to_pylist()
    assert len(rows) == 36
    assert all(r["response"] == answer(prompt_seed(7, r["prompt_id"], 3) + r["response_index"]) for r in rows)
    assert all(r["prompt_tokens"] == PROMPT_TOKENS for r in rows)
    # no secret anywhere in the catalog
    with split_catalog.connect() as con:
        dump = json.dumps(con.execute("SELECT * FROM snapshots").fetchall()) + json.dumps(
            con.execute("SELECT * FROM work").fetchall()
        )
    assert "sk-secret" not in dump


def test_openai_backend_refused_and_unreachable(split_catalog, fake_server, monkeypatch):
    url, fake = fake_server
    monkeypatch.setattr("builders.generate.model_identity", lambda model: {"model": model})
    fake.fail_first, fake.fail_status = 10**6, 401
    with pytest.raises(IterdpoError, match="HTTP 401"):
        generate(split_catalog, 1, _openai_cfg(url), progress=False)
    with pytest.raises(IterdpoError, match="failed 2 times \\(ConnectError\\)"):
        generate(split_catalog, 1, _openai_cfg("http://127.0.0.1:9/v1", max_retries=1), progress=False)


CANARY = "canary-7f3a9c1e5b2d"


@pytest.mark.parametrize("key", [CANARY, "sk-" + CANARY])
def test_openai_errors_never_show_the_api_key(split_catalog, fake_server, monkeypatch, key):
    url, fake = fake_server
    monkeypatch.setenv("MY_KEY", key)
    monkeypatch.setattr("builders.generate.model_identity", lambda model: {"model": model})
    fake.fail_first, fake.fail_status = 10**6, 422
    with pytest.raises(IterdpoError, match="answered HTTP 422: .*overloaded") as err:
        generate(split_catalog, 1, _openai_cfg(url, api_key_env="MY_KEY"), progress=False)
    assert fake.auth and all(a == f"Bearer {key}" for a in fake.auth)  # the key was sent...
    assert CANARY not in str(err.value) and "Bearer ***" in str(err.value)  # ...and is not in the message


def test_cli_openai_error_keeps_the_key_off_the_terminal(cli, fake_server, monkeypatch):
    url, fake = fake_server
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.setattr("builders.generate.model_identity", lambda model: {"model": model})
    assert cli("prompts", "import", SAMPLE).code == 0
    assert cli("prompts", "split", "--iterations", "1", "--train-size", "5", "--test-size", "0").code == 0
    fake.fail_first, fake.fail_status = 10**6, 400
    result = cli("generate", "--iteration", "1", "--model", "served", "--backend", "openai", "--base-url", url)
    last = result.err.strip().splitlines()[-1]  # after the progress bar
    assert result.code == 1 and last.startswith("Error: server ") and "HTTP 400" in last
    assert CANARY not in result.err + result.out


def _only_progress(stderr: str) -> list[str]:
    """What stderr holds besides our own progress bars (tqdm redraws with carriage returns)."""
    parts = [p.strip() for line in stderr.splitlines() for p in line.split("\r")]
    return [p for p in parts if p and not p.startswith(("generate it", "rank it"))]


def test_cli_stages_print_only_json_on_stdout_and_progress_on_stderr(tmp_path, tiny_models):
    from tests.conftest import run_iterdpo

    db = tmp_path / "c.duckdb"
    import_prompts(Catalog(db), str(SAMPLE))
    split_prompts(Catalog(db), SplitConfig(iterations=1, train_size=3, test_size=0, seed=1))
    for args in (
        ["generate", "--model", tiny_models / "generator", "--num-responses", "2", "--max-tokens", "4"],
        ["rank", "--ranker-model", tiny_models / "ranker"],
    ):
        done = run_iterdpo("--catalog", db, *args, "--iteration", "1", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["splits"][0]["snapshot"]["rows"] == 6
        assert _only_progress(done.stderr) == []


def test_the_in_process_vllm_engine_on_a_cpu_runs_on_the_threads_its_config_gives(monkeypatch):
    """OMP_NUM_THREADS=1 (the Makefile's) leaves torch, and so an in-process CPU engine, on one thread: `cpu_threads`
    sets them before the engine starts (the quickstart gives it every core); unset, the process's count stays."""
    import types

    import torch

    from builders.backends import vllm as backend
    from builders.config import VllmConfig
    from builders.generate import validate_generate

    seen = []

    class FakeLLM:  # stands in for vllm.LLM: what matters is torch's thread count when the engine is built
        def __init__(self, **kwargs):
            seen.append(torch.get_num_threads())

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    before = torch.get_num_threads()
    try:
        torch._C.set_num_threads(1)
        backend.start_llm("m", VllmConfig(cpu_threads=2))
        backend.start_llm("m", VllmConfig())
    finally:
        torch._C.set_num_threads(before)
    assert seen == [2, 2]  # the second engine (cpu_threads unset) runs as the process left torch
    with pytest.raises(InputError, match="cpu_threads must be at least 1, not 0"):
        validate_generate(GenerateConfig(model="m", backend="vllm", vllm=VllmConfig(cpu_threads=0)))
