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
from builders.models import weights_sha256
from builders.train import RECIPES, TrainConfig, load_recipe, train
from tests.conftest import ROOT, built_catalog

TINY = RECIPES / "tiny-cpu.yaml"


@pytest.fixture
def built(tmp_path) -> Catalog:
    return built_catalog(tmp_path / "c.duckdb", n_prompts=12)


def test_dpo_steps_change_the_weights_and_the_model_generates(built, tmp_path, tiny_models):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "model"
    result = train(built, 1, TrainConfig(TINY, str(tiny_models / "generator"), output_dir=out))
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] > 0
    before = load_file(tiny_models / "generator" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    snap = result.snapshot
    row = built.read(snap.id).to_pylist()[0]
    assert snap.kind == "model" and snap.iteration == 1 and row["path"] == str(out.resolve())
    assert snap.parents == [built.newest("pairs", 1, "train").id]
    assert row["base_model"] == str(tiny_models / "generator") and "beta: 0.01" in row["recipe"]
    assert snap.params["metrics"]["train_loss"] == result.metrics["train_loss"]
    # the row holds what identifies the model; the pair counts are TRL's (every pair fits max_length 256 here)
    counts = json.loads(row["metrics"])
    assert counts == {"train_pairs_used": 12, "train_pairs_dropped": 0, "train_pairs_truncated": 0}
    assert "train_runtime" in snap.params["metrics"] and "train_runtime" not in row["metrics"]
    # the saved model is a valid --model for the next generation
    from builders.backends.transformers import TransformersGenerator

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
        train(built, 1, TrainConfig(RECIPES / "iteration_1.yaml", model, output_dir=tmp_path / "o1"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not empty; pass --overwrite"):
        train(built, 1, TrainConfig(TINY, model, output_dir=busy))
    with pytest.raises(InputError, match="is a file"):
        train(built, 1, TrainConfig(TINY, model, output_dir=busy / "file", overwrite=True))
    with pytest.raises(InputError, match="iteration 2 has no pairs"):
        train(built, 2, TrainConfig(TINY, model, output_dir=tmp_path / "o2"))
    staged = tmp_path / "staged"
    from builders.config import PublishConfig
    from builders.publish import publish

    publish(built, PublishConfig("me/x", local_dir=staged, dry_run=True))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        TINY.read_text().replace("dataset_train_split: train_iteration_1", "dataset_train_split: train_iteration_9")
    )
    with pytest.raises(InputError, match="has no split 'train_iteration_9'"):
        train(built, 1, TrainConfig(wrong, model, dataset=str(staged), output_dir=tmp_path / "o3"))
    assert built.list(kind="model") == []


# what an in-process engine or trainer of an earlier test may have left in os.environ: a launched process must not
# join (or wait on) that process group's rendezvous
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_bf16_on_a_cpu_is_autocast_when_the_recipe_says_use_cpu(built, tmp_path, tiny_models):
    """The quickstart's recipe trains in bf16 on the CPU: bf16 matmuls, fp32 weights and optimizer (the saved model
    is fp32, as with bf16 off). Without `use_cpu` a bf16 recipe still needs a GPU, and fp16 always does."""
    from safetensors.torch import load_file

    text = TINY.read_text()
    assert "bf16: false" in text and "use_cpu: true" in text
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text(text.replace("bf16: false", "bf16: true"))
    out = tmp_path / "model"
    result = train(built, 1, TrainConfig(recipe, str(tiny_models / "generator"), output_dir=out))
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] > 0
    assert "bf16: true" in built.read(result.snapshot.id).to_pylist()[0]["recipe"]
    assert {str(t.dtype) for t in load_file(out / "model.safetensors").values()} == {"torch.float32"}
    for flags, refused in (("bf16: true", "use_cpu: false"), ("fp16: true", "use_cpu: true")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace("bf16: false", flags).replace("use_cpu: true", refused))
        with pytest.raises(InputError, match=f"asks for {flags.split(':')[0]} but no CUDA GPU"):
            load_recipe(bad)


def test_two_cpu_processes_with_accelerate(built, tmp_path, tiny_models):
    out = tmp_path / "ddp"
    # `--multi_gpu` picks accelerate's torchrun launcher; without CUDA each process runs on the CPU over gloo
    # (`--cpu` would start a single process)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "train.dpo",
            "--catalog",
            str(built.path),
            "--iteration",
            "1",
            "--recipe",
            str(TINY),
            "--model",
            str(tiny_models / "generator"),
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=_env(),
    )
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
        [
            trl_cli,
            "dpo",
            "--config",
            str(TINY),
            "--dataset_name",
            str(staged),
            "--model_name_or_path",
            str(tiny_models / "generator"),
            "--output_dir",
            str(tmp_path / "trl-out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "trl-out" / "model.safetensors").exists()


# ------------------------------------------------------------------------- identity, counts, secrets, noise, kills
def _recipe(tmp_path: Path, name: str, replace: dict[str, str] | None = None, extra: str = "") -> Path:
    text = TINY.read_text()
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text + extra)
    return path


def test_the_same_training_twice_is_the_same_model_snapshot_and_prints_a_summary_not_dicts(
    built, tmp_path, tiny_models, cli, catalog_path
):
    shutil.copy(built.path, catalog_path)
    args = (
        "train",
        "--iteration",
        "1",
        "--recipe",
        TINY,
        "--model",
        tiny_models / "generator",
        "--output-dir",
        tmp_path / "m",
    )
    first = cli(*args, "--json")
    assert first.code == 0, first.err
    doc = first.json()  # stdout is the JSON document alone
    # stderr: our pair count and progress bar, none of the Trainer's metric dicts
    assert "training 12 pairs" in first.err and "train: 100%" in first.err
    assert "{'loss'" not in first.err and "'train_runtime'" not in first.err + first.out
    again = cli(*args, "--overwrite")
    assert again.code == 0, again.err
    assert again.out.startswith("trained iteration 1 on 12 pairs: model in ")
    assert f"model snapshot {doc['snapshot']['id'][:12]}" in again.out  # identical weights: the same snapshot
    models = Catalog(catalog_path).list(kind="model")
    assert [m.id for m in models] == [doc["snapshot"]["id"]]
    assert doc["snapshot"]["params"]["metrics"]["train_runtime"] > 0  # timings are params, not identity


def test_pairs_that_trl_drops_are_counted_and_warned(built, tmp_path, tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / "generator")
    prompts = built.read(built.newest("pairs", 1, "train").id).column("prompt").to_pylist()
    # TRL drops a pair when its tokenized prompt (chat template, generation prompt) reaches max_length
    lengths = sorted(
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for p in prompts
    )
    max_length = lengths[len(lengths) // 2]
    expected = sum(n >= max_length for n in lengths)
    assert 0 < expected < len(lengths)
    recipe = _recipe(tmp_path, "short.yaml", {"max_length: 256": f"max_length: {max_length}"})
    result = train(
        built, 1, TrainConfig(recipe, str(tiny_models / "generator"), output_dir=tmp_path / "m", progress=False)
    )
    row = built.read(result.snapshot.id).to_pylist()[0]
    counts = json.loads(row["metrics"])
    assert counts["train_pairs_dropped"] == expected and counts["train_pairs_used"] == len(lengths) - expected
    assert counts["train_pairs_truncated"] == counts["train_pairs_used"]  # every kept prompt + answer is too long
    assert result.warnings == [
        f"{expected} of {len(lengths)} train pairs dropped: their prompt alone reaches "
        f"max_length {max_length} tokens (raise max_length in the recipe, or set "
        f"truncation_mode: keep_end)"
    ]
    every = _recipe(tmp_path, "tiny.yaml", {"max_length: 256": f"max_length: {lengths[0]}"})
    with pytest.raises(InputError, match=f"all {len(lengths)} train pairs were dropped"):
        train(built, 1, TrainConfig(every, str(tiny_models / "generator"), output_dir=tmp_path / "m2"))
    assert not (tmp_path / "m2").exists()


def test_generation_budget_against_max_length():
    from builders.train import check_budget

    # the tiny recipe chooses its truncation explicitly; without that line the check warns with the numbers
    assert check_budget(TINY, max_tokens=4096) is None
    assert check_budget(TINY, max_tokens=48, prompt_tokens=100) is None
    for n in (1, 2, 3):  # the Snorkel recipes: 2048 new tokens, max_length 1024, truncation chosen in the recipe
        assert "truncation_mode: keep_start" in (RECIPES / f"iteration_{n}.yaml").read_text()
        assert check_budget(RECIPES / f"iteration_{n}.yaml", max_tokens=2048) is None


def test_generation_budget_warns_without_an_explicit_truncation(tmp_path):
    from builders.train import check_budget

    implicit = _recipe(tmp_path, "implicit.yaml", {"truncation_mode: keep_start\n": ""})
    message = check_budget(implicit, max_tokens=300, prompt_tokens=20)
    assert message and "300 new tokens + 20 prompt tokens" in message and "max_length 256" in message
    assert check_budget(implicit, max_tokens=200, prompt_tokens=20) is None
    with pytest.raises(InputError, match="learning_rate must be a number"):
        check_budget(_recipe(tmp_path, "bad.yaml", {"learning_rate: 1.0e-4": "learning_rate: fast"}), 10)


def test_recipe_secrets_never_reach_the_catalog_or_exports(built, tmp_path, tiny_models, monkeypatch):
    import duckdb

    from builders.train import stored_recipe

    canary = "hf_CANARYsecret0123456789"
    monkeypatch.setenv("ITERDPO_TEST_TOKEN", "unset")  # restored after the test (train sets the recipe's env)
    recipe = _recipe(tmp_path, "env.yaml", extra=f"env:\n  ITERDPO_TEST_TOKEN: {canary}\n")
    result = train(
        built, 1, TrainConfig(recipe, str(tiny_models / "generator"), output_dir=tmp_path / "m", progress=False)
    )
    assert os.environ["ITERDPO_TEST_TOKEN"] == canary  # the env block still applies to the run
    row = built.read(result.snapshot.id).to_pylist()[0]
    assert "ITERDPO_TEST_TOKEN: <redacted>" in row["recipe"] and "beta: 0.01" in row["recipe"]
    from builders.export import export_snapshot  # what `versions export` writes

    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"model.{suffix}"
        export_snapshot(built, result.snapshot.id, out)
        assert canary.encode() not in out.read_bytes() and b"ITERDPO_TEST_TOKEN" in out.read_bytes()
    con = duckdb.connect(str(built.path), read_only=True)
    tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
    dump = "".join(str(con.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables)
    con.close()
    assert canary not in dump and canary.encode() not in built.path.read_bytes()
    assert json.dumps(result.to_json()).find(canary) == -1
    assert "hub_token: <redacted>" in stored_recipe({"hub_token": canary, "beta": 0.1}, {})
    # options that only mention tokens are hyper-parameters, kept as they are (the pipeline compares recipes)
    kept = stored_recipe({"include_tokens_per_second": True, "pad_token": "<pad>", "max_length": 512}, {})
    assert "<redacted>" not in kept and "include_tokens_per_second: true" in kept


def test_bad_recipe_values_fail_before_the_model_loads(built, tmp_path, cli, catalog_path):
    shutil.copy(built.path, catalog_path)
    before = [s.id for s in Catalog(catalog_path).list()]
    bad = _recipe(tmp_path, "bad.yaml", {"learning_rate: 1.0e-4": "learning_rate: fast"})
    # the model does not exist: an error about it would mean the recipe was checked after loading
    out = cli(
        "train", "--iteration", "1", "--recipe", bad, "--model", tmp_path / "no-model", "--output-dir", tmp_path / "m"
    )
    assert out.code == 1 and out.err.strip().count("\n") == 0
    assert out.err.startswith("Error: recipe ") and "learning_rate must be a number, found 'fast'" in out.err
    assert [s.id for s in Catalog(catalog_path).list()] == before and not (tmp_path / "m").exists()
    sci = _recipe(tmp_path, "sci.yaml", {"learning_rate: 1.0e-4": "learning_rate: 5e-7"})  # YAML 1.1 text
    assert load_recipe(sci)[1].learning_rate == 5e-7


@pytest.mark.parametrize("threads", ["-2", "0"])
def test_a_thread_count_below_1_fails_before_anything_loads(built, tmp_path, cli, catalog_path, tiny_models, threads):
    """torch refuses it only after the recipe, data and tokenizer are loaded (an `unexpected RuntimeError`); 0 was
    ignored without a word."""
    shutil.copy(built.path, catalog_path)
    before = [s.id for s in Catalog(catalog_path).list()]
    out = cli(
        "train",
        "--iteration",
        "1",
        "--recipe",
        TINY,
        "--model",
        tiny_models / "generator",
        "--output-dir",
        tmp_path / "m",
        "--threads",
        threads,
    )
    assert out.code == 1 and out.out == "" and out.err.strip().count("\n") == 0, out.err
    assert out.err.startswith(
        f"Error: --threads must be at least 1 (or unset: as the process has them), not {threads}"
    ), out.err
    assert [s.id for s in Catalog(catalog_path).list()] == before and not (tmp_path / "m").exists()


def test_a_killed_training_does_not_block_the_same_command(built, tmp_path, tiny_models):
    out = tmp_path / "m"
    long = _recipe(tmp_path, "long.yaml", {"max_steps: 5": "max_steps: 100000"})
    cmd = [
        sys.executable,
        "-m",
        "builders.cli",
        "--catalog",
        str(built.path),
        "train",
        "--iteration",
        "1",
        "--recipe",
        str(long),
        "--model",
        str(tiny_models / "generator"),
        "--output-dir",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=_env())
    try:
        for line in proc.stderr:  # the handshake: the pair count is printed when training starts
            if line.startswith("training "):
                break
        else:
            pytest.fail(f"training never started (exit {proc.wait()})")
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    finally:
        proc.kill()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".iterdpo-train-m-")]
    assert not out.exists() and leftovers  # the model is only ever written beside the output dir
    long.write_text(TINY.read_text())  # the same command line, now a short run
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".iterdpo-train-")] == []
    assert len(built.list(kind="model")) == 1


def test_a_training_killed_before_its_registration_is_finished_by_the_same_command(built, tmp_path, tiny_models, cli):
    import duckdb

    from builders.train import MODEL_MARKER

    out = tmp_path / "m"
    model = str(tiny_models / "generator")
    cmd = [
        sys.executable,
        "-m",
        "builders.cli",
        "--catalog",
        str(built.path),
        "train",
        "--iteration",
        "1",
        "--recipe",
        str(TINY),
        "--model",
        model,
        "--output-dir",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=_env())
    lock = None
    try:
        for line in proc.stderr:
            if line.startswith("training ") and lock is None:
                # the pairs are read: hold the catalog (DuckDB lets one process open the file), so that the
                # registration waits and the kill below lands between the move into place and the registration
                lock = duckdb.connect(str(built.path))
            if "model written to " in line:  # the handshake: the model is in place, the registration next
                break
        else:
            pytest.fail(f"the model was never written (exit {proc.wait()})")
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    finally:
        proc.kill()
        if lock is not None:
            lock.close()
    assert (out / "model.safetensors").is_file() and (out / MODEL_MARKER).is_file()
    assert built.list(kind="model") == []
    written = (out / "model.safetensors").stat().st_mtime_ns

    # the same command again: the weights are verified and registered, nothing is trained
    again = subprocess.run([*cmd, "--json"], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    doc = json.loads(again.stdout)
    assert doc["resumed"] and "train: " not in again.stderr and "(weights verified)" in again.stderr
    assert (out / "model.safetensors").stat().st_mtime_ns == written
    [snap] = built.list(kind="model")
    row = built.read(snap.id).to_pylist()[0]
    assert snap.id == doc["snapshot"]["id"] and snap.parents == [built.newest("pairs", 1, "train").id]
    assert row["path"] == str(out.resolve()) and row["weights_sha256"] == weights_sha256(out)
    assert json.loads(row["metrics"]) == {"train_pairs_used": 12, "train_pairs_dropped": 0, "train_pairs_truncated": 0}
    assert snap.params["metrics"]["train_loss"] > 0  # the params of the run that trained it
    said = cli("train", "--iteration", "1", "--recipe", TINY, "--model", model, "--output-dir", out, catalog=built.path)
    assert said.code == 0 and said.out.startswith(
        f"the model of this training is already in {out} (iteration 1, 12 pairs; weights verified, not trained again)"
    ), said.out
    assert [m.id for m in built.list(kind="model")] == [snap.id]

    # the model of another training there (another recipe), or a user's folder, is still refused
    other = _recipe(tmp_path, "other.yaml", {"max_steps: 5": "max_steps: 3"})
    with pytest.raises(InputError, match="holds the model of another training .*; pass --overwrite"):
        train(built, 1, TrainConfig(other, model, output_dir=out, progress=False))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / MODEL_MARKER).write_text("{}")  # a marker of no training (a copy, a hand-made file)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="pass --overwrite"):
        train(built, 1, TrainConfig(TINY, model, output_dir=mine, progress=False))
    assert sorted(p.name for p in mine.iterdir()) == [MODEL_MARKER, "notes.txt"]

    # weights that no longer verify (cut short, changed): the same training runs again into its own folder, and
    # registers the snapshot an uninterrupted run registers
    (out / "model.safetensors").write_bytes(b"cut short")
    retrained = train(built, 1, TrainConfig(TINY, model, output_dir=out, progress=False))
    assert not retrained.resumed and weights_sha256(out) == row["weights_sha256"]
    assert retrained.snapshot.id == snap.id and len(built.list(kind="model")) == 1


def test_overwrite_replaces_our_model_folder_but_never_a_users_files(built, tmp_path, tiny_models):
    model = str(tiny_models / "generator")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "model-00001-of-00002.safetensors").write_bytes(b"another model's shard")  # loaders would mix it in
    for _ in range(2):  # a user's folder stays theirs, run after run
        result = train(built, 1, TrainConfig(TINY, model, output_dir=mine, overwrite=True, progress=False))
        assert (mine / "notes.txt").read_text() == "mine" and (mine / "model.safetensors").exists()
        assert not (mine / "model-00001-of-00002.safetensors").exists()
        assert built.read(result.snapshot.id).column("weights_sha256")[0].as_py() == weights_sha256(mine)
    ours = tmp_path / "ours"
    train(built, 1, TrainConfig(TINY, model, output_dir=ours, progress=False))
    (ours / "stale-shard.safetensors").write_bytes(b"old")  # e.g. a shard of an earlier, bigger model
    again = train(built, 1, TrainConfig(TINY, model, output_dir=ours, overwrite=True, progress=False))
    assert not (ours / "stale-shard.safetensors").exists() and (ours / "model.safetensors").exists()
    assert len({s.id for s in built.list(kind="model")}) == 2 and again.snapshot.iteration == 1  # mine, ours


def test_the_accelerate_launcher_puts_global_options_before_train():
    from train.dpo import argv

    assert argv(["--iteration", "1"]) == ["train", "--iteration", "1"]
    assert argv(["--catalog", "c.duckdb", "--iteration", "1"]) == ["--catalog", "c.duckdb", "train", "--iteration", "1"]
    assert argv(["--catalog=c.duckdb", "--debug", "--iteration", "1"]) == [
        "--catalog=c.duckdb",
        "--debug",
        "train",
        "--iteration",
        "1",
    ]
