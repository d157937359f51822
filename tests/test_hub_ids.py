"""Hub ids load: every command that takes a model by hub id, run as a user's shell runs it, offline, against
tiny models laid out in a Hugging Face cache (`$HF_HOME/hub/models--ORG--NAME/snapshots/REV/`, `refs/main`).

The default ranker, `llm-blender/PairRM`, is used by name: its config names its backbone by hub id
(`microsoft/deberta-v3-large`), which is cached here too, as PairRM's users have it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE
from tests.forkserver import shims

REV = "0123456789abcdef0123456789abcdef01234567"
GENERATOR = "iterdpo-test/tiny-mistral"
SCALAR = "iterdpo-test/tiny-reward"


def _cache(hub: Path, repo_id: str, source: Path) -> Path:
    """Lay `source` out as huggingface_hub's cache does for `repo_id` at REV (files, not blobs+links: both load)."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REV
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snapshot


pytestmark = pytest.mark.slow  # every path a hub id takes, vLLM included


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_models) -> Path:
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub"
    _cache(hub, GENERATOR, tiny_models / "generator")
    # PairRM as published: its backbone named by hub id, not shipped inside the folder
    ranker = _cache(hub, "llm-blender/PairRM", tiny_models / "ranker")
    shutil.rmtree(ranker / "backbone")
    config = json.loads((ranker / "config.json").read_text())
    (ranker / "config.json").write_text(json.dumps({**config, "model_name": "microsoft/deberta-v3-large"}))
    _cache(hub, "microsoft/deberta-v3-large", tiny_models / "ranker" / "backbone")
    scalar = home / "scalar-src"
    torch.manual_seed(0)
    backbone = tiny_models / "ranker" / "backbone"
    DebertaV2ForSequenceClassification(DebertaV2Config.from_pretrained(backbone, num_labels=1)).save_pretrained(scalar)
    AutoTokenizer.from_pretrained(backbone).save_pretrained(scalar)
    _cache(hub, SCALAR, scalar)
    return home


@pytest.fixture(scope="module")
def iterdpo(hf_home, tmp_path_factory):
    """`iterdpo ARGS` in a process of its own, as a user's shell runs it with HF_HOME set (forked with the imports
    done, tests/forkserver.py: huggingface_hub reads the cache's place when imported, so the server is this
    module's, started with that environment)."""
    catalog = tmp_path_factory.mktemp("hubcat") / "c.duckdb"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_home / "hub"))

    with shims(tmp_path_factory.mktemp("hub_bin"), env) as bin_dir:

        def run(*args: str, timeout: float = 300):
            argv = [str(bin_dir / "iterdpo"), "--catalog", str(catalog), *map(str, args)]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout) if "--json" in args else result

        run("prompts", "import", SAMPLE)
        run("prompts", "split", "--iterations", "1", "--train-size", "6", "--test-size", "2")
        yield run


def _snapshots(doc: dict) -> list[dict]:
    return [s["snapshot"] for s in doc["splits"]]


def test_generate_rank_and_train_take_hub_ids(iterdpo, tmp_path):
    gen = iterdpo(
        "generate", "--iteration", "1", "--model", GENERATOR, "--num-responses", "3", "--max-tokens", "8", "--json"
    )
    assert {s["split"] for s in _snapshots(gen)} == {"train", "test"}
    assert {(s["params"]["model"], s["params"]["revision"]) for s in _snapshots(gen)} == {(GENERATOR, REV)}
    # the default ranker, by its hub id
    ranked = iterdpo("rank", "--iteration", "1", "--json")
    assert {s["params"]["ranker"] for s in _snapshots(ranked)} == {"pairrm"}
    blender = iterdpo(
        "rank", "--iteration", "1", "--ranker", "llm-blender", "--ranker-model", "llm-blender/PairRM", "--json"
    )
    for ours, theirs in zip(_snapshots(ranked), _snapshots(blender)):
        assert ours["rows"] == theirs["rows"] == (18 if ours["split"] == "train" else 6)
    scalar = iterdpo("rank", "--iteration", "1", "--ranker", "scalar", "--ranker-model", SCALAR, "--json")
    assert len(_snapshots(scalar)) == 2
    iterdpo("build", "--iteration", "1", "--allow-partial")
    model = iterdpo(
        "train",
        "--iteration",
        "1",
        "--recipe",
        "train/recipes/tiny-cpu.yaml",
        "--model",
        GENERATOR,
        "--output-dir",
        str(tmp_path / "m1"),
        "--json",
    )
    assert (tmp_path / "m1" / "model.safetensors").exists() and model["snapshot"]["kind"] == "model"


def test_best_of_n_takes_hub_ids(iterdpo, tmp_path):
    out, prompts = tmp_path / "model_outputs.json", tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Name a colour ({i})."}) + "\n" for i in range(3)))
    iterdpo(
        "best-of-n",
        "--model",
        GENERATOR,
        "--prompts",
        prompts,
        "--num-responses",
        "2",
        "--max-tokens",
        "6",
        "--output",
        str(out),
    )
    rows = json.loads(out.read_text())
    assert len(rows) == 3 and all(isinstance(r["output"], str) for r in rows)


def test_vllm_backend_takes_a_hub_id(iterdpo):
    gen = iterdpo(
        "generate",
        "--iteration",
        "1",
        "--model",
        GENERATOR,
        "--backend",
        "vllm",
        "--num-responses",
        "2",
        "--max-tokens",
        "8",
        "--split",
        "test",
        "--json",
        timeout=600,
    )
    assert _snapshots(gen)[0]["rows"] == 4
