"""`iterdpo run`: pipeline configs, and a kill -9 during iteration 2's generation followed by a rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builders.catalog import Catalog
from builders.config import QuickstartConfig
from builders.errors import InputError
from builders.pipeline import load_pipeline, run_pipeline
from tests.conftest import ROOT, SAMPLE

PIPELINES = ROOT / "pipelines"


def test_the_snorkel_pipeline_is_the_recipe():
    cfg = load_pipeline(PIPELINES / "snorkel.yaml")
    assert (cfg.split.iterations, cfg.split.train_size, cfg.split.test_size) == (3, 20000, 1000)
    assert cfg.generation.model == "mistralai/Mistral-7B-Instruct-v0.2" and cfg.generation.backend == "vllm"
    assert (cfg.generation.sampling.num_responses, cfg.generation.sampling.temperature) == (5, 0.7)
    assert cfg.ranking.ranker_model == "llm-blender/PairRM" and cfg.selection.selection == "max-min"
    assert all((ROOT / cfg.training.recipe.format(n=n)).exists() for n in (1, 2, 3))


def test_the_quickstart_pipeline_matches_the_quickstart_command():
    from builders.quickstart import pipeline_for

    cfg = load_pipeline(PIPELINES / "quickstart.yaml")
    ref = pipeline_for(QuickstartConfig())
    assert (cfg.split, cfg.generation.sampling, cfg.generation.backend) == (
        ref.split,
        ref.generation.sampling,
        ref.generation.backend,
    )
    assert Path(cfg.training.recipe).name == Path(ref.training.recipe).name


def test_unknown_keys_and_wrong_types_are_named(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("generation:\n  temprature: 0.7\n")
    with pytest.raises(InputError, match="p.yaml.generation: unknown key 'temprature'"):
        load_pipeline(bad)
    bad.write_text("split:\n  iterations: three\n")
    with pytest.raises(InputError, match="split.iterations must be int"):
        load_pipeline(bad)


def _pipeline(tmp: Path, tiny: Path) -> Path:
    doc = {
        "catalog": str(tmp / "catalog.duckdb"),
        "prompts": {"source": str(SAMPLE)},
        "split": {"iterations": 2, "train_size": 6, "test_size": 2, "seed": 5},
        "generation": {
            "model": str(tiny / "generator"),
            "backend": "transformers",
            "sampling": {"num_responses": 3, "max_tokens": 24, "seed": 5},
        },
        "ranking": {"ranker": "python", "ranker_model": "tests.scorers:longer_is_better"},
        "training": {"recipe": str(ROOT / "train/recipes/tiny-cpu.yaml"), "output_dir": str(tmp / "m{n}")},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _data_ids(catalog: Catalog) -> list[tuple]:
    # model snapshots record their folder, which differs between the two runs; the data must be identical
    return sorted(((s.kind, s.iteration, s.split, s.id) for s in catalog.list() if s.kind != "model"), key=str)


_KILLABLE = """
import sys
from builders.catalog import Catalog
from builders.catalog.work import Work
from builders.pipeline import load_pipeline, run_pipeline
commit = Work.add_work
def add_work(self, key, kind, *args, **kwargs):
    commit(self, key, kind, *args, **kwargs)
    if kind == "generations" and kwargs.get("iteration") == 2:
        print("committed", flush=True)
Work.add_work = add_work
cfg = load_pipeline(sys.argv[1])
run_pipeline(Catalog(cfg.catalog), cfg, progress=False)
"""


@pytest.mark.slow
def test_kill_9_in_iteration_2_generation_then_rerun_matches_an_uninterrupted_run(tmp_path, tiny_models):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    reference = run_pipeline(
        Catalog(ref_dir / "catalog.duckdb"), load_pipeline(_pipeline(ref_dir, tiny_models)), progress=False
    )
    assert len(reference.models) == 2
    pipeline = _pipeline(run_dir, tiny_models)
    doc = yaml.safe_load(pipeline.read_text())
    doc["generation"].update(batch_prompts=1, commit_seconds=0)  # a commit per prompt: a kill lands mid-split
    pipeline.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(pipeline)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # the handshake: the child prints a line after each commit of iteration 2's generations
    killed_mid = proc.stdout.readline().strip() == "committed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_mid, "the run ended before iteration 2's generation committed anything"
    catalog = Catalog(run_dir / "catalog.duckdb")
    assert catalog.newest("generations", 2, "train") is None or catalog.newest("generations", 2, "test") is None
    resumed = run_pipeline(catalog, load_pipeline(pipeline), progress=False)
    assert len(resumed.models) == 2
    assert _data_ids(catalog) == _data_ids(Catalog(ref_dir / "catalog.duckdb"))


def _one_iteration(tmp: Path, tiny: Path, name: str, recipe: Path | None = None, **selection) -> Path:
    doc = yaml.safe_load(_pipeline(tmp, tiny).read_text())
    doc["split"]["iterations"] = 1
    doc["selection"] = selection
    if recipe is not None:
        doc["training"]["recipe"] = str(recipe)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_run_retrains_when_the_pairs_or_recipe_change_and_reuses_the_model_otherwise(
    tmp_path, tiny_models, monkeypatch
):
    import builders.train

    trained: list[list[str]] = []  # the pairs each training used

    def counting(catalog, iteration, cfg, from_refs=()):
        result = real_train(catalog, iteration, cfg, from_refs)
        trained.append(sorted(result.snapshot.parents))
        return result

    real_train = builders.train.train
    monkeypatch.setattr(builders.train, "train", counting)
    catalog = Catalog(tmp_path / "catalog.duckdb")

    def run(config: Path) -> tuple[list[str], str]:
        result = run_pipeline(catalog, load_pipeline(config), progress=False)
        pairs = sorted(s.id for s in result.snapshots if s.kind == "pairs")
        model = [s for s in result.snapshots if s.kind == "model"][-1]
        assert sorted(model.parents) == pairs  # the model of the iteration is the one trained on these pairs
        return pairs, model.id

    longer = _one_iteration(tmp_path, tiny_models, "longer")
    shorter = _one_iteration(tmp_path, tiny_models, "shorter", length_penalty=2.0)  # score - 2 x length
    pairs_a, _ = run(longer)
    assert trained == [pairs_a]
    pairs_b, model_b = run(shorter)  # other pairs: trained again, on them
    assert pairs_b != pairs_a and trained == [pairs_a, pairs_b]
    assert run(shorter) == (pairs_b, model_b) and len(trained) == 2  # nothing changed: the model is reused
    # back to the first selection: its pairs exist already (older than the newest pairs), and the model folder
    # now holds the second model's weights, so it trains again, on the first pairs
    assert run(longer)[0] == pairs_a and trained[-1] == pairs_a and len(trained) == 3
    # the same pairs with another recipe: trained again
    recipe = yaml.safe_load((ROOT / "train/recipes/tiny-cpu.yaml").read_text())
    recipe["beta"] = 0.02
    other = tmp_path / "recipe-beta.yaml"
    other.write_text(yaml.safe_dump(recipe))
    assert run(_one_iteration(tmp_path, tiny_models, "beta", recipe=other))[0] == pairs_a and len(trained) == 4
