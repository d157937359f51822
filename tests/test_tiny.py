"""Offline tiny models: deterministic, loadable, Mistral's prompt format, PairRM's folder layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from builders.config import TinyConfig
from builders.errors import InputError
from builders.tiny import PAIRRM_PREFIXES, build_tiny_models


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_weights(tiny_models: Path, tmp_path: Path):
    build_tiny_models(tmp_path / "again")
    assert _digest(tiny_models) == _digest(tmp_path / "again")
    build_tiny_models(tmp_path / "other", cfg=TinyConfig(seed=1))
    assert (
        _digest(tmp_path / "other")["generator/model.safetensors"]
        != _digest(tiny_models)["generator/model.safetensors"]
    )
    assert sum((tiny_models / f).stat().st_size for f in _digest(tiny_models)) < 5 * 2**20  # a few MB


def test_generator_loads_renders_mistral_format_and_generates(tiny_models: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / "generator")
    model = AutoModelForCausalLM.from_pretrained(tiny_models / "generator")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is DPO?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s>[INST] What is DPO? [/INST]"
    cfg = model.config
    assert cfg.model_type == "mistral" and cfg.head_dim == 32  # vLLM's CPU attention needs a supported head_dim
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=8, do_sample=True)
    assert out.shape[1] == ids.input_ids.shape[1] + 8 or tok.eos_token_id in out[0].tolist()


def test_ranker_has_llm_blenders_pairrm_layout(tiny_models: Path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    ranker = tiny_models / "ranker"
    cfg = json.loads((ranker / "config.json").read_text())
    assert cfg["ranker_type"] == "pairranker" and cfg["model_type"] == "deberta"
    assert (cfg["source_maxlength"], cfg["candidate_maxlength"]) == (1224, 412)
    backbone = ranker / cfg["model_name"]
    tok = AutoTokenizer.from_pretrained(backbone)
    state = load_file(ranker / "model.safetensors")
    emb = state["pretrained_model.embeddings.word_embeddings.weight"]
    assert emb.shape[0] == len(tok) + len(PAIRRM_PREFIXES)
    h = emb.shape[1]
    assert state["head_layer.1.weight"].shape == (h, 2 * h) and state["head_layer.4.weight"].shape == (1, h)
    enc = tok("source text", "candidate")
    assert enc.input_ids[0] == tok.cls_token_id and enc.input_ids[-1] == tok.sep_token_id


def test_refuses_to_overwrite_without_the_flag(tiny_models: Path, tmp_path: Path):
    target = tmp_path / "m"
    build_tiny_models(target)
    with pytest.raises(InputError, match="--overwrite"):
        build_tiny_models(target)
    build_tiny_models(target, overwrite=True)
    assert not [p for p in target.iterdir() if p.name.startswith(".tiny-")]  # no scratch left behind
