"""DPO training on the tiny generator: real steps, lineage, accelerate with 2 CPU processes, `trl dpo` recipes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders.catalog import Catalog
from builders.config import SamplingConfig
from builders.errors import InputError
from tests.conftest import ROOT
from tests.conftest import built_catalog
from train.dpo import RECIPES, TrainConfig, load_recipe, train

TINY = RECIPES / "tiny-cpu.yaml"


@pytest.fixture
def built(tmp_path) -> Catalog:
    return built_catalog(tmp_path / "c.duckdb", n_prompts=12)


def test_dpo_steps_change_the_weights_and_the_model_generates(built, tmp_path, tiny_models):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "model"
    result = train(built, TrainConfig(1, TINY, str(tiny_models / "generator"), output_dir=out))
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] > 0
    before = load_file(tiny_models / "generator" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    snap = result.snapshot
    row = built.read(snap.id).to_pylist()[0]
    assert snap.kind == "model" and snap.iteration == 1 and row["path"] == str(out.resolve())
    assert snap.parents == [built.newest("pairs", 1, "train").id]
    assert row["base_model"] == str(tiny_models / "generator") and "beta: 0.01" in row["recipe"]
    assert json.loads(row["metrics"])["train_loss"] == result.metrics["train_loss"]
    # the saved model is a valid --model for the next generation
    from builders.generate import TransformersGenerator

    gen = TransformersGenerator(str(out), SamplingConfig(num_responses=2, max_tokens=5))
    req = gen.prepare([("a" * 64, "Say something.", 1)])[0]
    assert len(gen.generate([req])[0]) == 2


def test_recipes_parse_with_trl_and_bad_recipes_fail_before_any_work(tmp_path):
    import yaml

    for n in (1, 2, 3):
        path = RECIPES / f"iteration_{n}.yaml"
        assert yaml.safe_load(path.read_text())["bf16"] is True
        # this machine has no GPU: parse with bf16 off, everything else as written
        script, args, model, _, _, _ = load_recipe(path, {"bf16": False})
        assert (args.beta, args.learning_rate, args.max_length, args.num_train_epochs) == (0.01, 5e-7, 1024, 1)
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 128
        assert script.dataset_train_split == f"train_iteration_{n}" and script.dataset_config == "trl"
        assert args.lr_scheduler_type.value == "cosine" and args.warmup_steps == 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + "torch_dtype: bfloat16\nwarmup_ratio: 0.1\n")
    with pytest.raises(InputError, match="unknown key\\(s\\) torch_dtype, warmup_ratio"):
        load_recipe(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: [0.01\n")
    with pytest.raises(InputError, match="broken.yaml:2: invalid YAML"):
        load_recipe(broken)
    with pytest.raises(InputError, match="nope.yaml: No such file"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_training_inputs(built, tmp_path, tiny_models):
    model = str(tiny_models / "generator")
    with pytest.raises(InputError, match="asks for bf16 but no CUDA GPU"):
        train(built, TrainConfig(1, RECIPES / "iteration_1.yaml", model, output_dir=tmp_path / "o1"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not empty; pass --overwrite"):
        train(built, TrainConfig(1, TINY, model, output_dir=busy))
    with pytest.raises(InputError, match="iteration 2 has no pairs"):
        train(built, TrainConfig(2, TINY, model, output_dir=tmp_path / "o2"))
    staged = tmp_path / "staged"
    from builders.config import PublishConfig
    from builders.publish import publish

    publish(built, PublishConfig("me/x", local_dir=staged, dry_run=True))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(TINY.read_text().replace("dataset_train_split: train_iteration_1",
                                              "dataset_train_split: train_iteration_9"))
    with pytest.raises(InputError, match="has no split 'train_iteration_9'"):
        train(built, TrainConfig(1, wrong, model, dataset=str(staged), output_dir=tmp_path / "o3"))
    assert built.list(kind="model") == []


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_two_cpu_processes_with_accelerate(built, tmp_path, tiny_models):
    out = tmp_path / "ddp"
    # `--multi_gpu` picks accelerate's torchrun launcher; without CUDA each process runs on the CPU over gloo
    # (`--cpu` would start a single process)
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "train.dpo", "--catalog", str(built.path),
         "--iteration", "1", "--recipe", str(TINY), "--model", str(tiny_models / "generator"),
         "--output-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    models = built.list(kind="model")
    assert len(models) == 1 and models[0].params["world_size"] == 2
    assert (out / "model.safetensors").exists()


def test_the_recipe_runs_under_plain_trl_dpo(built, tmp_path, tiny_models):
    from builders.config import PublishConfig
    from builders.publish import publish

    staged = tmp_path / "staged"
    publish(built, PublishConfig("me/x", local_dir=staged, dry_run=True))
    trl_cli = shutil.which("trl", path=str(Path(sys.executable).parent)) or "trl"
    done = subprocess.run(
        [trl_cli, "dpo", "--config", str(TINY), "--dataset_name", str(staged), "--model_name_or_path",
         str(tiny_models / "generator"), "--output_dir", str(tmp_path / "trl-out")],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "trl-out" / "model.safetensors").exists()
