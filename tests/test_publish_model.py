"""Publishing a trained model: the staged folder loads with transformers and generates, the card parses and ties
the model to its data, and the upload protocol against the fake Hub of test_publish (one commit, a tag, no-op
republish, 401 records nothing, the token nowhere on disk)."""

from __future__ import annotations

import pytest

from builders.catalog import Catalog
from builders.config import PublishConfig, PublishModelConfig
from builders.errors import InputError, IterdpoError
from builders.models import weights_sha256
from builders.publish import publish
from builders.publish_model import publish_model
from builders.train import RECIPES, TrainConfig, train
from tests.conftest import built_catalog
from tests.test_publish import TOKEN, hub  # noqa: F401  (the fake Hub fixture)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models) -> Catalog:
    """Pairs of iteration 1, published (dry run records nothing, so a publication is recorded by hand), and the
    model trained on them."""
    root = tmp_path_factory.mktemp("pm")
    catalog = built_catalog(root / "c.duckdb", n_prompts=8)
    train(
        catalog,
        1,
        TrainConfig(
            RECIPES / "tiny-cpu.yaml", str(tiny_models / "generator"), output_dir=root / "models" / "iteration_1"
        ),
    )
    staged = publish(catalog, PublishConfig("me/iterative-dpo", local_dir=root / "ds", dry_run=True)).staged
    catalog.record_publication(
        staged.set_id,
        "me/iterative-dpo",
        "main",
        "c0ffee" * 6 + "ab",
        staged.set_id,
        list(staged.snapshots.values()),
        "https://huggingface.co",
    )
    return catalog


def test_dry_run_stages_a_model_that_transformers_loads_and_a_card_that_ties_it_to_its_data(trained, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = publish_model(trained, 1, PublishModelConfig("me/tiny-iterdpo", local_dir=tmp_path / "m", dry_run=True))
    folder = result.staged.folder
    assert "model.safetensors" in result.staged.files and "config.json" in result.staged.files
    assert "training_args.bin" not in result.staged.files  # a pickle: never published
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert set(card.data.tags) >= {"dpo", "iterative-dpo", "trl", "iterdpo"}
    assert card.data.datasets == ["me/iterative-dpo"]
    assert card.data.get("base_model") is None  # the base is a local folder, not a hub id
    model_snap = trained.newest("model", 1)
    assert model_snap.parents == [trained.newest("pairs", 1, "train").id]
    assert trained.parent(model_snap, "pairs").id[:12] in card.text and model_snap.id in card.text
    assert "c0ffeec0ffee" in card.text  # the dataset commit its pairs were published in
    assert "beta: 0.01" in card.text and "[INST] {prompt} [/INST]" in card.text
    assert "Pairs used: 8, dropped by the trainer (e.g. over max_length): 0" in card.text
    assert str(tmp_path) not in card.text and "/tmp" not in card.text  # no local absolute paths


def test_upload_is_one_commit_with_a_tag_and_republishing_is_a_noop(trained, tmp_path, hub):  # noqa: F811
    hub["files"]["model-00002-of-00002.safetensors"] = b"a shard of an earlier, bigger upload"
    hub["files"]["evals/results.json"] = b"{}"  # the user's
    cfg = PublishModelConfig("me/tiny-iterdpo", local_dir=tmp_path / "m", backoff=0.01)
    result = publish_model(trained, 1, cfg)
    assert len(hub["commits"]) == 1
    deleted = [op["value"]["path"] for op in hub["commits"][0] if op["key"] == "deletedFile"]
    assert deleted == ["model-00002-of-00002.safetensors"] and "evals/results.json" in hub["files"]
    added = sorted(op["value"]["path"] for op in hub["commits"][0] if op["key"] == "file")
    assert added == sorted(result.staged.files)
    assert hub["create_body"]["type"] == "model"
    assert [t for t, _ in hub["tags"]] == [result.commit] and result.tag == result.staged.set_id
    before = len(hub["requests"])
    again = publish_model(trained, 1, cfg)
    assert again.already_published and again.commit == result.commit and len(hub["requests"]) == before
    for path in [trained.path, *result.staged.folder.rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes()


def test_401_records_nothing(trained, tmp_path, hub):  # noqa: F811
    hub["status_always"] = 401
    with pytest.raises(IterdpoError, match="HTTP 401"):
        publish_model(trained, 1, PublishModelConfig("me/other-model", local_dir=tmp_path / "m", backoff=0.01))
    assert hub["commits"] == [] and not [p for p in trained.publications() if p["repo_id"] == "me/other-model"]


def test_bad_inputs_are_one_line_errors(trained, tmp_path, cli, catalog_path):
    import shutil

    with pytest.raises(InputError, match="iteration 2 has no trained model"):
        publish_model(trained, 2, PublishModelConfig("me/x", dry_run=True))
    with pytest.raises(InputError, match="invalid repo id"):
        publish_model(trained, 1, PublishModelConfig("no-namespace", dry_run=True))
    shutil.copy(trained.path, catalog_path)
    out = cli("publish-model", "me/x", "--iteration", "3", "--dry-run")
    assert out.code == 1 and len(out.err.strip().splitlines()) == 1
    ok = cli("publish-model", "me/x", "--iteration", "1", "--dry-run", "--local-dir", tmp_path / "cli", "--json")
    assert ok.code == 0, ok.err and ok.json()["dry_run"] is True


def test_run_publishes_each_iterations_model_when_the_pipeline_names_a_model_repo(tmp_path, tiny_models):
    import yaml
    from huggingface_hub import ModelCard

    from builders.pipeline import load_pipeline, run_pipeline
    from tests.test_pipeline import _pipeline

    path = _pipeline(tmp_path, tiny_models)
    doc = yaml.safe_load(path.read_text())
    doc["publish"] = {
        "repo_id": "me/iterative-dpo",
        "dry_run": True,
        "local_dir": str(tmp_path / "ds"),
        "model_repo_id": "me/tiny-iterdpo-it{n}",
        "model_local_dir": str(tmp_path / "model-{n}"),
    }
    path.write_text(yaml.safe_dump(doc))
    cfg = load_pipeline(path)
    result = run_pipeline(Catalog(cfg.catalog), cfg, progress=False)
    assert result.staged_models == [tmp_path / "model-1", tmp_path / "model-2"]
    card = ModelCard.load(tmp_path / "model-2" / "README.md")
    assert card.data.datasets == ["me/iterative-dpo"]
    assert "| iteration 1 | `m1`" in card.text and "| iteration 2 | `m2`" in card.text  # the lineage
    # the reward of each iteration's test responses: iteration 2's were written by model 1
    assert "| 1 | `generator` | `tests.scorers:longer_is_better` | 2 | 6 |" in card.text
    assert "| 2 | `m1` | `tests.scorers:longer_is_better` | 2 | 6 |" in card.text
    bad = yaml.safe_load(path.read_text())
    bad["publish"]["model_repo_id"] = "no namespace {n}"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(InputError, match="publish.model_repo_id"):
        run_pipeline(Catalog(tmp_path / "other.duckdb"), load_pipeline(path), progress=False)
    assert not (tmp_path / "other.duckdb").exists()


def _usage_snippets(card: str) -> list[str]:
    usage = card[card.index("## Usage") : card.index("## Provenance")]
    return [block.split("\n```", 1)[0] for block in usage.split("```python\n")[1:]]


def test_the_cards_transformers_snippet_runs_on_the_staged_model(trained, tmp_path, capsys):
    result = publish_model(trained, 1, PublishModelConfig("me/tiny-iterdpo", local_dir=tmp_path / "m", dry_run=True))
    snippet = _usage_snippets((result.staged.folder / "README.md").read_text())[0]
    assert "return_dict=True" in snippet and "generate(**inputs" in snippet
    # the staged folder is what lands on the Hub: load it where the snippet names the repo
    code = snippet.replace('"me/tiny-iterdpo"', repr(str(result.staged.folder)))
    assert code != snippet
    capsys.readouterr()
    exec(compile(code.replace("max_new_tokens=128", "max_new_tokens=8"), "model_card_snippet", "exec"), {})
    assert capsys.readouterr().out.endswith("\n")  # it printed the decoded answer


def test_the_cards_vllm_snippet_runs_as_a_script_on_the_cpu(trained, tmp_path):
    import os
    import subprocess
    import sys

    if not os.environ.get("CI"):
        pytest.importorskip("vllm")
    result = publish_model(trained, 1, PublishModelConfig("me/tiny-iterdpo", local_dir=tmp_path / "m", dry_run=True))
    snippet = _usage_snippets((result.staged.folder / "README.md").read_text())[1]
    assert 'if __name__ == "__main__":' in snippet
    # the staged folder for the repo id; eager mode only to start in 20 s instead of 60 on a CPU
    code = snippet.replace('LLM("me/tiny-iterdpo")', f"LLM({str(result.staged.folder)!r}, enforce_eager=True)")
    assert code != snippet
    script = tmp_path / "snippet.py"
    script.write_text(code.replace("max_tokens=128", "max_tokens=8"))
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_base_model_names_the_hub_base_of_a_local_copy(trained, tmp_path, cli, catalog_path, tiny_models):
    import shutil

    from huggingface_hub import ModelCard

    shutil.copy(trained.path, catalog_path)
    plain = cli("publish-model", "me/x", "--iteration", "1", "--dry-run", "--local-dir", tmp_path / "plain")
    assert plain.code == 0, plain.err
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert card.data.get("base_model") is None
    assert (
        f"The base model was a local folder, `generator`; weights sha256 "
        f"`{weights_sha256(tiny_models / 'generator')[:12]}`."
    ) in card.text
    assert "--base-model HUB_ID` sets it" in card.text

    named = cli(
        "publish-model",
        "me/x",
        "--iteration",
        "1",
        "--dry-run",
        "--local-dir",
        tmp_path / "named",
        "--base-model",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    assert named.code == 0, named.err
    card = ModelCard.load(tmp_path / "named" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "| base | `HuggingFaceTB/SmolLM2-135M-Instruct` (a local copy, `generator`) |" in card.text
    assert "sets it" not in card.text

    bad = cli(
        "publish-model",
        "me/x",
        "--iteration",
        "1",
        "--dry-run",
        "--local-dir",
        tmp_path / "bad",
        "--base-model",
        str(tiny_models / "generator"),
    )
    assert bad.code == 1 and len(bad.err.strip().splitlines()) == 1 and "not a hub model id" in bad.err
    assert not (tmp_path / "bad").exists()


def test_a_gguf_imported_base_is_named_by_its_gguf_file_and_weights(tmp_path, tiny_models):
    """The quickstart's base: a folder `models import-gguf` wrote (gguf_source.json) is described by the GGUF it came
    from; with --base-model the card's metadata and lineage give the hub id."""
    import shutil

    from huggingface_hub import ModelCard

    from builders.publish_model import base_description
    from cards.model_card import render

    base = tmp_path / "smollm2"
    shutil.copytree(tiny_models / "generator", base)
    (base / "gguf_source.json").write_text(
        '{"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256": "' + "12" * 32 + '", "dtype": "bfloat16"}\n'
    )
    step = {
        "iteration": 1,
        "name": "iteration_1",
        "snapshot": "ab" * 32,
        "weights_sha256": "cd" * 32,
        "pairs": {"train": "ef" * 32},
        "dataset": None,
        "metrics": {},
    }
    for hub_id in (None, "HuggingFaceTB/SmolLM2-135M-Instruct"):
        text = render(
            repo_id="me/m",
            iteration=1,
            base=base_description(str(base), False, hub_id),
            license="mit",
            datasets=[],
            steps=[step],
            hyperparameters={},
            rewards=[],
            drift=[],
            prompt_format="",
            snapshot="ab" * 32,
            version="0",
        )
        (tmp_path / "README.md").write_text(text)
        card = ModelCard.load(tmp_path / "README.md")
        assert card.data.get("base_model") == hub_id
        assert (
            "The base model was a local folder, `smollm2`: `SmolLM2-135M-Instruct.Q4_1.gguf` (GGUF, sha256\n"
            "`121212121212`) converted to bfloat16 safetensors by `iterdpo models import-gguf`; weights sha256 "
            f"`{weights_sha256(base)[:12]}`."
        ) in text
        assert ("| base | `HuggingFaceTB/SmolLM2-135M-Instruct` (a local copy, `smollm2`) |" in text) == bool(hub_id)
