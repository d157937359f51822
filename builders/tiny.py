"""Tiny random models built offline, for tests, the quickstart and benches (throughput depends on shapes only).

    build_tiny_models(DIR) -> DIR/generator  Mistral-architecture causal LM + byte-level BPE tokenizer trained here,
                                             Mistral's chat template (`<s>[INST] {prompt} [/INST]`); vLLM-CPU shaped
                              DIR/ranker     PairRM in llm-blender's folder layout: config.json (its RankerConfig)
                                             + model.safetensors (CrossCompareReranker state dict); the DeBERTa-v3-style
                                             backbone and tokenizer in DIR/ranker/backbone (config's model_name)
Deterministic from the seed; no network.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from builders.backends.pairrm import BACKBONE_PREFIX, HEAD_PREFIX, PAIRRM_PREFIXES, pairwise_head
from builders.config import TinyConfig
from builders.errors import InputError

# Mistral-7B-Instruct-v0.2's prompt format, with its system-message handling.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message %}{{- '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# llm-blender's CrossCompareCollator adds these to the backbone tokenizer when it loads a PairRM ranker; the
# ranker's embedding matrix is sized for them.

_WORDS = (
    "the a an this that my our your their cat dog robot friend teacher student model assistant city river sun "
    "engineer doctor farmer market team story answer plan reason recipe function list step proof poem letter code "
    "question result number data table file error test value time day year world people water food music history "
    "explains builds writes finds compares ranks likes needs solves describes improves answers learns checks "
    "summarizes plans makes gives takes uses shows tells asks helps works runs reads quickly carefully clearly "
    "simply politely briefly first then next finally because however therefore also only very more most best "
    "good great small large new old short long simple hard easy important different possible and or but if "
    "when where why how what which who is are was were be been have has do does can could should would will "
    "in on at to for of with from by about as into over after before between under please write give tell "
    "explain list describe summarize create generate translate classify python java sql html css json"
).split()


def corpus(seed: int, lines: int = 3000) -> list[str]:
    """Synthetic English-like text, plus the chat markers, digits and punctuation (tokenizer training only)."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","]))
    out += ["[INST] Write a short story. [/INST] Once upon a time."] * 20
    out += ["0 1 2 3 4 5 6 7 8 9 10 100 2024 , . ! ? : ; ' \" ( ) [ ] { } - + = * / # % $ @ & < > _"] * 10
    return out


def _batches(lines: list[str], size: int = 256):
    for i in range(0, len(lines), size):
        yield lines[i : i + size]


def _portable(out_dir: Path, **overrides) -> None:
    # transformers 5 writes tokenizer_class "TokenizersBackend"; the generic fast class name loads everywhere (vLLM too)
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.update(overrides)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@dataclass
class TinyModels:
    generator: Path
    ranker: Path
    seconds: float
    generator_params: int
    ranker_params: int

    def to_json(self) -> dict:
        return {
            "generator": str(self.generator),
            "ranker": str(self.ranker),
            "seconds": round(self.seconds, 2),
            "generator_params": self.generator_params,
            "ranker_params": self.ranker_params,
        }


def build_generator(out_dir: Path, cfg: TinyConfig = TinyConfig()) -> int:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.gen_vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_batches(corpus(cfg.seed)), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # BOS on plain encodes, like Mistral's tokenizer; the chat template writes its own bos_token
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=cfg.gen_max_positions,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = MISTRAL_CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    # Llama/Mistral tokenizers return no token_type_ids (generate() rejects them)
    _portable(out_dir, model_input_names=["input_ids", "attention_mask"])

    torch.manual_seed(cfg.seed)
    mcfg = MistralConfig(
        vocab_size=len(hf),
        hidden_size=cfg.gen_hidden_size,
        intermediate_size=cfg.gen_intermediate_size,
        num_hidden_layers=cfg.gen_layers,
        num_attention_heads=cfg.gen_heads,
        num_key_value_heads=cfg.gen_kv_heads,
        head_dim=cfg.gen_head_dim,
        max_position_embeddings=cfg.gen_max_positions,
        sliding_window=None,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    model = MistralForCausalLM(mcfg).to(torch.float32)
    model.generation_config.pad_token_id = hf.pad_token_id
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def build_ranker(out_dir: Path, cfg: TinyConfig = TinyConfig()) -> int:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import DebertaV2Config, DebertaV2Model, PreTrainedTokenizerFast

    backbone = out_dir / "backbone"
    # A SentencePiece-style subword model (Metaspace) like deberta-v3's. BPE rather than Unigram: the Unigram
    # trainer orders equal-score pieces differently from run to run, and the files must be identical for a seed.
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]  # deberta-v3's ids: pad 0, cls 1, sep 2, unk 3
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.rank_vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,?!'\u2581"),
    )
    tok.train_from_iterator(_batches(corpus(cfg.seed + 1)), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    # DeBERTa-v3 post-processing, which PairRM's collator relies on: [CLS] A [SEP] (B [SEP])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        model_max_length=2048,
    )
    hf.save_pretrained(backbone)
    _portable(backbone)

    torch.manual_seed(cfg.seed)
    dcfg = DebertaV2Config(
        vocab_size=len(hf),
        hidden_size=cfg.rank_hidden_size,
        num_hidden_layers=cfg.rank_layers,
        num_attention_heads=cfg.rank_heads,
        intermediate_size=cfg.rank_intermediate_size,
        max_position_embeddings=cfg.rank_max_positions,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        layer_norm_eps=1e-7,
        max_relative_positions=-1,
        type_vocab_size=0,
        pad_token_id=hf.pad_token_id,
    )
    model = DebertaV2Model(dcfg)
    model.save_pretrained(backbone)

    # The ranker checkpoint: backbone with embeddings grown by the 4 prefix tokens, plus the pairwise head
    # (Dropout, Linear(2H, H), Tanh, Dropout, Linear(H, n_tasks)), named as CrossCompareReranker names them.
    model.resize_token_embeddings(len(hf) + len(PAIRRM_PREFIXES), mean_resizing=False)
    h = cfg.rank_hidden_size
    state = {f"{BACKBONE_PREFIX}{k}": v.contiguous() for k, v in model.state_dict().items()}
    state.update({f"{HEAD_PREFIX}{k}": v for k, v in pairwise_head(h).state_dict().items()})
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    ranker_config = {
        "ranker_type": "pairranker",
        "model_type": "deberta",
        "model_name": "backbone",
        "cache_dir": None,
        "load_checkpoint": None,
        "source_maxlength": cfg.source_maxlength,
        "candidate_maxlength": cfg.candidate_maxlength,
        "n_tasks": 1,
        "num_pos": 5,
        "num_neg": 5,
        "sub_sampling_mode": "all_pair",
        "sub_sampling_ratio": 0.4,
        "loss_type": "instructgpt",
        "reduce_type": "linear",
        "inference_mode": "bubble",
        "drop_out": 0.05,
        "fp16": False,
    }
    (out_dir / "config.json").write_text(json.dumps(ranker_config, indent=2) + "\n")
    return sum(v.numel() for v in state.values())


def build_tiny_models(directory: str | Path, cfg: TinyConfig = TinyConfig(), overwrite: bool = False) -> TinyModels:
    """Build DIR/generator and DIR/ranker. Refuses a non-empty target unless `overwrite`.

    Builds in a scratch folder beside the target and moves it into place, so a failure leaves nothing half-written."""
    root = Path(directory)
    gen, rank = root / "generator", root / "ranker"
    for d in (gen, rank):
        if d.exists() and (d.is_file() or any(d.iterdir())) and not overwrite:
            raise InputError(f"{d} exists and is not empty; pass --overwrite to rebuild it")
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".tiny-") as scratch:
        tmp_gen, tmp_rank = Path(scratch) / "generator", Path(scratch) / "ranker"
        tmp_gen.mkdir()
        tmp_rank.mkdir()
        n_gen = build_generator(tmp_gen, cfg)
        n_rank = build_ranker(tmp_rank, cfg)
        for src, dst in ((tmp_gen, gen), (tmp_rank, rank)):
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            src.rename(dst)
    return TinyModels(gen, rank, time.perf_counter() - start, n_gen, n_rank)
