"""`models import-gguf`: a GGUF checkpoint becomes a plain model folder that transformers loads and generates with.

The GGUF is written here with the `gguf` package (llama.cpp's format, Llama architecture, the tiny generator's
byte-level BPE vocabulary and chat template, random F32 weights): seconds instead of the 98 MB SmolLM2 file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders.config import GgufImportConfig
from builders.errors import InputError
from builders.gguf import SOURCE_FILE, file_sha256, import_gguf

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

HIDDEN, HEADS, LAYERS, FFN = 64, 2, 2, 128
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_gguf(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Llama in GGUF, tokenizer and chat template in its metadata, output head tied (as SmolLM2's)."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["id"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(3)
    w.add_chat_template(TEMPLATE)

    def add(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    add("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{name}.weight", HIDDEN, HIDDEN)
        add(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_models / "generator")


def test_import_gives_a_folder_transformers_loads_and_generates_with(tiny_gguf, tmp_path, cli):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    result = cli("models", "import-gguf", str(tiny_gguf), str(out), "--json")
    assert result.code == 0, result.err
    info = result.json()
    assert info["gguf_sha256"] == file_sha256(tiny_gguf) and info["architecture"] == "LlamaForCausalLM"
    source = json.loads((out / SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == info["gguf_sha256"]  # the model's identity: the file it came from
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".model.*"))  # no scratch left

    tok = AutoTokenizer.from_pretrained(out)
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert tok.chat_template == TEMPLATE and tok.eos_token_id == 2
    # the weights are the GGUF's: transformers reading the GGUF directly gives the same logits
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "write a short poem"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, direct(ids).logits, atol=2e-2)  # bfloat16 weights
        new = lm.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=3)
    assert new.shape[1] == ids.shape[1] + 5 or new[0, -1].item() == 2


def test_bad_inputs_fail_before_any_work_and_leave_nothing(tiny_gguf, tmp_path, cli):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    result = cli("models", "import-gguf", str(not_gguf), str(tmp_path / "a"))
    assert result.code == 1 and "not a GGUF file" in result.err and not (tmp_path / "a").exists()
    result = cli("models", "import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "a"))
    assert result.code == 1 and "no such file" in result.err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = cli("models", "import-gguf", str(tiny_gguf), str(busy))
    assert result.code == 1 and "--overwrite" in result.err
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(InputError, match="dtype 'float99': the weights are saved as bfloat16, float16, float32"):
        import_gguf(tiny_gguf, tmp_path / "b", GgufImportConfig(dtype="float99"))
    assert not (tmp_path / "b").exists()

    # --overwrite never clears a folder the import did not make...
    result = cli("models", "import-gguf", str(tiny_gguf), str(busy), "--overwrite")
    assert result.code == 1 and "not made by" in result.err and [p.name for p in busy.iterdir()] == ["notes.txt"]
    # ...and replaces one it did, whole
    done = import_gguf(tiny_gguf, tmp_path / "ours")
    (done.folder / "stale.txt").write_text("old")
    again = import_gguf(tiny_gguf, tmp_path / "ours", GgufImportConfig(overwrite=True))
    assert (again.folder / "config.json").exists() and not (again.folder / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".iterdpo-gguf-")]  # no scratch left


@pytest.mark.parametrize("dtype", ["int8", "bool", "float99"])
def test_a_dtype_the_weights_cannot_be_saved_in_fails_before_the_dequantization(
    tiny_gguf, tmp_path, cli, monkeypatch, dtype
):
    """int8 is a torch dtype, so it used to pass the check and fail after the whole GGUF was dequantized."""
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the GGUF was read before the dtype was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    result = cli("models", "import-gguf", str(tiny_gguf), str(tmp_path / "m"), "--dtype", dtype)
    assert result.code == 1 and result.out == "" and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith(f"Error: --dtype {dtype!r}: the weights are saved as bfloat16, float16, float32")
    assert list(tmp_path.iterdir()) == []


def test_import_reads_the_gguf_file_once_and_leaves_the_libraries_as_they_were(tiny_gguf, tmp_path, monkeypatch):
    """transformers alone parses the file 4 times per import (config, tokenizer, model config, tensors): SmolLM2's
    import spent two thirds of its time there. The same folder comes out of one parse."""
    import transformers.configuration_utils as config_utils
    import transformers.modeling_gguf_pytorch_utils as loader

    parsed = []
    real_reader = gguf.GGUFReader

    def counting_reader(path, *args, **kwargs):
        parsed.append(str(path))
        return real_reader(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    before = (gguf.GGUFReader, gguf.get_tensor_name_map, loader.load_gguf_checkpoint, config_utils.load_gguf_checkpoint)
    once = import_gguf(tiny_gguf, tmp_path / "once")
    assert len(parsed) == 1
    assert (
        gguf.GGUFReader,
        gguf.get_tensor_name_map,
        loader.load_gguf_checkpoint,
        config_utils.load_gguf_checkpoint,
    ) == before  # nothing patched stays patched

    # the folder equals what transformers' own four reads give (the tokenizer and weights, byte for byte)
    import torch
    from transformers import AutoConfig, AutoTokenizer

    direct_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert len(parsed) > 1  # outside an import, transformers parses again
    assert AutoTokenizer.from_pretrained(once.folder).get_vocab() == direct_tok.get_vocab()
    direct_cfg = AutoConfig.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert AutoConfig.from_pretrained(once.folder).num_hidden_layers == direct_cfg.num_hidden_layers == LAYERS
    from safetensors.torch import load_file

    weights = load_file(once.folder / "model.safetensors")
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert not any(torch.isnan(w.float()).any() for w in weights.values())  # no uninitialised weight was saved
