"""The openai backend keeps the server busy: exactly `concurrency` requests in flight, also while the stage commits;
the server's token counts land in the rows and the summary; failures (a server that never answers included) keep
finished prompts and leak no secret; a served model name needs neither the Hub nor a local tokenizer."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.fake_openai import PROMPT_TOKENS, SERVED, FakeOpenAI, tokens_of
from builders.backends.openai import OpenAIGenerator
from builders.catalog import Catalog
from builders.config import GenerateConfig, OpenAIConfig, SamplingConfig, SplitConfig
from builders.errors import IterdpoError
from builders.generate import generate, prompt_seed
from builders.prompts import import_prompts, split_prompts
from tests.conftest import ROOT, SAMPLE, run_iterdpo

ONE = SamplingConfig(num_responses=1, temperature=0.7, max_tokens=16, seed=3)
THREE = SamplingConfig(num_responses=3, temperature=0.7, max_tokens=16, seed=3)
KEY = "sk-test-7f3a9c1e5b2d"


@pytest.fixture
def server():
    with FakeOpenAI(latency=0.1) as fake:
        yield fake.url, fake


def catalog_with(path: Path, train: int, test: int = 0) -> Catalog:
    catalog = Catalog(path)
    import_prompts(catalog, str(SAMPLE))
    split_prompts(catalog, SplitConfig(iterations=1, train_size=train, test_size=test, seed=1))
    return catalog


def openai_cfg(url: str, concurrency: int, model: str = "served-model", sampling=ONE, **kw) -> GenerateConfig:
    splits = kw.pop("splits", ("train",))
    return GenerateConfig(
        model=model,
        backend="openai",
        splits=splits,
        sampling=sampling,
        commit_seconds=kw.pop("commit_seconds", 5.0),
        openai=OpenAIConfig(base_url=url, concurrency=concurrency, backoff=0.01, **kw),
    )


def no_loop_thread() -> bool:
    return not any(t.name == "iterdpo-openai" for t in threading.enumerate())


@pytest.mark.parametrize("concurrency,prompts", [(8, 40), (32, 12)])
def test_exactly_concurrency_requests_in_flight_on_one_set_of_connections(tmp_path, server, concurrency, prompts):
    url, fake = server
    fake.hold_until = min(concurrency, prompts)
    catalog = catalog_with(tmp_path / "c.duckdb", prompts, 8)
    result = generate(catalog, 1, openai_cfg(url, concurrency, splits=("train", "test")), progress=False)
    assert [s.processed for s in result.splits] == [prompts, 8]
    assert fake.max_in_flight == min(concurrency, prompts)  # honoured exactly, never a batch's worth
    # one client for the stage: both splits reuse the same keep-alive connections, one per request slot
    assert len(fake.ports) == min(concurrency, prompts)
    assert fake.requests == prompts + 8 and no_loop_thread()


def test_requests_keep_flowing_while_the_stage_commits(tmp_path, server, monkeypatch):
    url, fake = server
    catalog = catalog_with(tmp_path / "c.duckdb", 16)
    real_add = Catalog.add_work
    during: list[tuple[int, int]] = []  # (most in flight, requests sent) while the first commit ran

    def slow_add_work(self, *args, **kw):
        if not during:  # a first commit of 0.3 s (a big catalog): the server must not idle meanwhile
            calls, seen = fake.requests, 0
            for _ in range(30):
                time.sleep(0.01)
                seen = max(seen, fake.in_flight)
            during.append((seen, fake.requests - calls))
        return real_add(self, *args, **kw)

    monkeypatch.setattr(Catalog, "add_work", slow_add_work)
    result = generate(catalog, 1, openai_cfg(url, 4, commit_seconds=0), progress=False)
    seen, sent = during[0]
    assert seen == 4 and sent >= 4  # all four slots busy, and new requests went out during the commit
    assert fake.max_in_flight == 4 and fake.requests == 16 and result.splits[0].processed == 16


def test_server_token_counts_land_in_rows_and_summary(tmp_path, server, tiny_models):
    url, fake = server
    catalog = catalog_with(tmp_path / "c.duckdb", 6)
    one = generate(catalog, 1, openai_cfg(url, 4), progress=False)
    rows = catalog.read(one.snapshots[0].id).to_pylist()
    assert all(r["completion_tokens"] == tokens_of(prompt_seed(3, r["prompt_id"], 1)) for r in rows)
    assert all(r["prompt_tokens"] == PROMPT_TOKENS for r in rows)
    assert one.tokens == sum(r["completion_tokens"] for r in rows) > 0  # the summary's tok/s

    # n > 1: usage is a total over the choices; a served name has no tokenizer, so rows say null, never a guess
    three = generate(catalog, 1, openai_cfg(url, 4, sampling=THREE), progress=False)
    rows = catalog.read(three.snapshots[0].id).to_pylist()
    assert len(rows) == 18 and all(r["completion_tokens"] is None for r in rows)
    params = three.snapshots[0].params
    assert params["model"] == "served-model" and "null" in params["token_counts"]  # and the params say why
    seeds = [prompt_seed(3, r["prompt_id"], 3) + r["response_index"] for r in rows]
    assert three.tokens == sum(tokens_of(s) for s in seeds)  # the server's totals, still counted

    # a local model folder: the rows are counted with its tokenizer; the summary is still the server's total
    from transformers import AutoTokenizer

    model = tiny_models / "generator"
    local = generate(catalog, 1, openai_cfg(url, 4, model=str(model), sampling=THREE), progress=False)
    rows = catalog.read(local.snapshots[0].id).to_pylist()
    tok = AutoTokenizer.from_pretrained(model)
    assert all(
        r["completion_tokens"] == len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in rows
    )
    assert local.tokens == three.tokens
    params = local.snapshots[0].params
    assert "tokenizer" in params["token_counts"] and params["model_sha256"]
    # the server serves another name than the folder's path: recorded as such, not an error
    assert params["server_model"] is None and "does not list" in params["server_model_note"]


def test_a_failing_server_keeps_finished_prompts_and_a_rerun_matches_an_uninterrupted_run(
    tmp_path, server, monkeypatch
):
    url, fake = server
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    broken = catalog_with(tmp_path / "broken.duckdb", 12)
    fake.fail_after = 5
    with pytest.raises(IterdpoError) as err:
        generate(broken, 1, openai_cfg(url, 4, max_retries=1), progress=False)
    message = str(err.value)
    assert "failed 2 times (HTTP 503)" in message and "rerun to continue" in message
    assert KEY not in message and "\n" not in message
    assert no_loop_thread()  # nothing left running
    with broken.connect() as con:
        ((key,),) = con.execute("SELECT DISTINCT work_key FROM work_units").fetchall()
    assert len(broken.work_units(key)) == 5  # every answered prompt was committed

    fake.fail_after = None
    calls = fake.requests
    resumed = generate(broken, 1, openai_cfg(url, 4), progress=False)
    assert resumed.splits[0].processed == 7 and fake.requests - calls == 7
    whole = generate(catalog_with(tmp_path / "whole.duckdb", 12), 1, openai_cfg(url, 3), progress=False)
    assert resumed.snapshots[0].id == whole.snapshots[0].id


def test_stopping_early_cancels_what_is_in_flight(server, caplog):
    url, fake = server
    gen = OpenAIGenerator("served-model", ONE, None, OpenAIConfig(base_url=url, concurrency=4))
    prompts = [(f"{i:064x}", f"prompt {i}", 100 + i) for i in range(40)]
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        stream = gen.stream(prompts, ONE)
        first = [next(stream) for _ in range(3)]
        t0 = time.perf_counter()
        stream.close()  # the stage was interrupted (GeneratorExit)
        assert time.perf_counter() - t0 < 2 and no_loop_thread()
        calls = fake.requests
        time.sleep(0.3)
        assert fake.requests == calls and calls < 12  # nothing more was sent
        assert [r.prompt_id for r, _ in first] and all(len(s) == 1 for _, s in first)
        # the generator still works afterwards (a fresh loop), and `generate` answers in the order asked
        requests = gen.prepare(prompts[:10], ONE)
        answers = gen.generate(requests, ONE)
        assert [a[0].text.split()[1] for a in answers] == [str(100 + i) for i in range(10)]
        gen.close()
        assert no_loop_thread()
    assert not [r for r in caplog.records if r.name == "asyncio"]  # no "Task was destroyed" or loop errors


# `iterdpo` itself, with a handshake: a line on the given file descriptor after each commit of finished prompts (the
# stage sends stdout and stderr below Python to /dev/null, so the line goes to a pipe of its own)
_CLI_WITH_HANDSHAKE = """
import os, sys
from builders.catalog import Catalog
fd = int(sys.argv.pop(1))
commit = Catalog.add_work
def add_work(self, *args, **kwargs):
    commit(self, *args, **kwargs)
    os.write(fd, b"committed\\n")
Catalog.add_work = add_work
from builders.cli import main
main(sys.argv[1:])
"""


def test_ctrl_c_stops_the_cli_at_once_and_keeps_finished_prompts(tmp_path, server):
    url, fake = server
    fake.hang_after = 12  # then every request hangs: only cancelling them lets the run end
    db = tmp_path / "c.duckdb"
    catalog_with(db, 60)
    read, write = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CLI_WITH_HANDSHAKE,
            str(write),
            "--catalog",
            str(db),
            "generate",
            "--iteration",
            "1",
            "--model",
            "served-model",
            "--backend",
            "openai",
            "--base-url",
            url,
            "--concurrency",
            "4",
            "--num-responses",
            "1",
            "--split",
            "train",
            "--commit-seconds",
            "0",
            "--request-timeout",
            "3600",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(write,),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    os.close(write)
    commits = 0
    with open(read) as handshake:
        for line in handshake:  # EOF if the run ends first
            commits += line.strip() == "committed"
            if commits == 12:
                break
        assert commits == 12, proc.communicate(timeout=60)[1]
        # and the server holds the 4 requests the slots sent next
        assert all(fake.hanging.acquire(timeout=60) for _ in range(4)), "no requests in flight"
        proc.send_signal(signal.SIGINT)
        try:  # the 4 requests in flight would hold it for an hour: only cancelling them ends it
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the interrupted run hung on its requests in flight")
    assert proc.returncode == 130 and "Interrupted; finished work is kept" in err, err
    assert "Traceback" not in err and "Task was destroyed" not in err and "Exception ignored" not in err, err
    catalog = Catalog(db)
    with catalog.connect() as con:
        ((key,),) = con.execute("SELECT DISTINCT work_key FROM work_units").fetchall()
    assert len(catalog.work_units(key)) == 12  # every answered prompt, and nothing else


def test_a_server_that_never_answers_fails_in_one_line_after_the_retries_and_a_rerun_resumes(tmp_path, server):
    url, fake = server
    fake.hang_after = 5  # it accepts the 6th request and every later one, and never answers them
    db = tmp_path / "c.duckdb"
    catalog_with(db, 12)
    command = (
        "--catalog",
        db,
        "generate",
        "--iteration",
        "1",
        "--model",
        "served-model",
        "--backend",
        "openai",
        "--base-url",
        url,
        "--concurrency",
        "4",
        "--num-responses",
        "1",
        "--split",
        "train",
        "--request-timeout",
        "1",
        "--max-retries",
        "1",
        "--json",
    )
    failed = run_iterdpo(*command, timeout=300)  # hung for good before the option existed (600 s an attempt)
    assert failed.returncode == 1 and failed.stdout == "", failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        f"Error: the server at {url} did not answer within 1 s (--request-timeout) after 2 attempts; "
        f"finished prompts are kept, rerun to resume"
    )
    assert "Traceback" not in failed.stderr, failed.stderr
    assert fake.hung >= 2  # the request that gave up was sent twice: retried like other failures
    catalog = Catalog(db)
    with catalog.connect() as con:
        ((key,),) = con.execute("SELECT DISTINCT work_key FROM work_units").fetchall()
    assert len(catalog.work_units(key)) == 5 and catalog.list(kind="generations") == []

    fake.hang_after = None
    calls = fake.requests
    resumed = run_iterdpo(*command, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    split = json.loads(resumed.stdout)["splits"][0]
    assert split["processed"] == 7 and fake.requests - calls == 7 and split["snapshot"]["rows"] == 12


def test_the_request_timeout_bounds_the_whole_request_not_each_read(server):
    url, fake = server
    fake.hang_after, fake.trickle = 0, True  # headers at once, then a byte every 0.2 s: no read waits 1 s
    gen = OpenAIGenerator(
        "served-model", ONE, None, OpenAIConfig(base_url=url, concurrency=2, max_retries=0, request_timeout=1)
    )
    with pytest.raises(IterdpoError) as err:
        list(gen.stream([(f"{i:064x}", f"prompt {i}", i) for i in range(3)], ONE))
    assert str(err.value) == (
        f"the server at {url} did not answer within 1 s (request_timeout) after 1 attempt; "
        f"finished prompts are kept, rerun to resume"
    )
    assert err.value.option == "request_timeout" and no_loop_thread()


def test_the_request_timeout_option_is_checked_before_any_work(cli, server, catalog_path):
    url, fake = server
    help_text = cli("generate", "--help").out
    assert "--request-timeout" in help_text and "300" in help_text  # a default well below the old 600 s
    assert cli("prompts", "import", SAMPLE).code == 0
    assert cli("prompts", "split", "--iterations", "1", "--train-size", "3", "--test-size", "0").code == 0
    for value in ("0", "-1", "nan"):
        bad = cli(
            "generate",
            "--iteration",
            "1",
            "--model",
            "served-model",
            "--backend",
            "openai",
            "--base-url",
            url,
            "--request-timeout",
            value,
        )
        assert bad.code == 1 and bad.err.startswith("Error: --request-timeout must be a positive number of seconds")
        assert bad.err.count("\n") == 1, bad.err
    assert fake.requests == 0
    with Catalog(catalog_path).connect() as con:
        assert con.execute("SELECT count(*) FROM work_units").fetchone() == (0,)


def test_a_served_name_needs_no_hub_no_model_folder_and_no_tokenizer(cli, server, tmp_path, monkeypatch, catalog_path):
    import huggingface_hub
    import transformers

    url, fake = server

    def looked_up(*args, **kwargs):
        raise AssertionError(f"looked up {args}: a served name is the server's")

    with monkeypatch.context() as m:
        for name in ("snapshot_download", "model_info", "hf_hub_download"):
            m.setattr(huggingface_hub, name, looked_up)
        m.setattr(transformers.AutoTokenizer, "from_pretrained", looked_up)
        assert cli("prompts", "import", SAMPLE).code == 0
        assert cli("prompts", "split", "--iterations", "1", "--train-size", "4", "--test-size", "0").code == 0
        done = cli(
            "generate",
            "--iteration",
            "1",
            "--model",
            "served-model",
            "--backend",
            "openai",
            "--base-url",
            url,
            "--num-responses",
            "2",
            "--json",
        )
    assert done.code == 0, done.err
    snap = done.json()["splits"][0]["snapshot"]
    params = snap["params"]
    # the served name, and what the server says of it, less what changes per call (vLLM's created, permission)
    assert params["model"] == "served-model" and "revision" not in params and "model_sha256" not in params
    assert params["server_model"] == {k: v for k, v in SERVED.items() if k != "object"}
    # n = 2: usage is one total per prompt, and there is no tokenizer to split it: null, and the params say so
    assert "null" in params["token_counts"]
    rows = Catalog(catalog_path).read(snap["id"]).to_pylist()
    assert len(rows) == 8 and all(r["completion_tokens"] is None and r["prompt_tokens"] == PROMPT_TOKENS for r in rows)
    assert done.json()["tokens"] == sum(
        tokens_of(prompt_seed(42, r["prompt_id"], 2) + r["response_index"]) for r in rows
    )

    # the dataset card names the served model
    assert (
        cli("rank", "--iteration", "1", "--ranker", "python", "--ranker-model", "tests.scorers:longer_is_better").code
        == 0
    )
    assert cli("build", "--iteration", "1").code == 0
    staged = tmp_path / "staged"
    published = cli("publish", "me/served-dpo", "--iterations", "1", "--local-dir", staged, "--dry-run")
    assert published.code == 0, published.err
    card = (staged / "README.md").read_text()
    assert "| 1 | `served-model` |" in card and "responses generated by `served-model`" in card
