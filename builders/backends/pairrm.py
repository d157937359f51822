"""PairRM (llm-blender/PairRM) on the maintained transformers DeBERTa-v2, loading llm-blender's checkpoint layout.

The layout (config.json with ranker_type "pairranker", the backbone named by `model_name`, a state dict with the
backbone under `pretrained_model.` and the pairwise head under `head_layer.`) is defined here once; builders/tiny.py
writes its offline tiny ranker with it. Scoring rules: see builders/rank.py's module docstring.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builders.backends.base import device_for
from builders.conversation import fit_history
from builders.errors import InputError, one_line
from builders.models import resolve_folder

PAIRRM_PREFIXES = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")
BACKBONE_PREFIX, HEAD_PREFIX = "pretrained_model.", "head_layer."


def pairwise_head(hidden: int, n_tasks: int = 1):
    """CrossCompareReranker's head: Dropout, Linear(2H, H), Tanh, Dropout, Linear(H, n_tasks) (state keys 1 and 4)."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Dropout(0.0),
        torch.nn.Linear(2 * hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.0),
        torch.nn.Linear(hidden, n_tasks),
    )


def pairrm_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("ranker_type") != "pairranker" or "model_name" not in config:
        raise InputError(
            f"{folder} is not a PairRM folder: it needs llm-blender's config.json "
            f"(ranker_type 'pairranker', model_name, source_maxlength, candidate_maxlength)"
        )
    return config


def backbone_ref(folder: Path, model_name: str) -> str:
    """llm-blender's config names the backbone by hub id (microsoft/deberta-v3-large); a path relative to the
    ranker folder is looked up there first (how the offline tiny ranker and mirrored copies ship it)."""
    local = folder / model_name
    return str(local.resolve()) if local.exists() else model_name


PAD_MULTIPLE = 16  # a pass's width: the pair's length rounded up to this (a pair's shape is its own, see score)


def _padded_width(length: int) -> int:
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


class PairRM:
    def __init__(self, ref: str, device: str | None = None, dtype: str = "auto", batch_tokens: int | None = None):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.ref, self.folder = ref, resolve_folder(ref, "ranker model")
        cfg = pairrm_config(self.folder)
        self.source_max = int(cfg["source_maxlength"])
        self.candidate_max = int(cfg["candidate_maxlength"])
        self.device = device_for(device)
        self.batch_tokens = batch_tokens or (32768 if self.device.startswith("cuda") else 2048)
        backbone = backbone_ref(self.folder, cfg["model_name"])
        try:
            tok = AutoTokenizer.from_pretrained(backbone)
            # the checkpoint holds every backbone weight: build from the config, no 1.7 GB download of deberta-v3
            model = AutoModel.from_config(AutoConfig.from_pretrained(backbone))
        except Exception as e:
            raise InputError(f"PairRM backbone {backbone!r} cannot be loaded ({one_line(e)})") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.sep = tok.sep_token if tok.sep_token is not None else tok.eos_token
        if len(tok.encode(self.sep)) == 1:
            raise InputError(f"PairRM backbone {backbone!r}: its tokenizer adds no [CLS]/[SEP] (not DeBERTa-like)")
        tok.add_tokens(list(PAIRRM_PREFIXES))  # what llm-blender's collator does, in its order
        self.src_id, self.c1_id, self.c2_id, self.cand_id = (tok.convert_tokens_to_ids(t) for t in PAIRRM_PREFIXES)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        weights = self.folder / "model.safetensors"
        state = (
            load_file(weights)
            if weights.exists()
            else torch.load(self.folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        )
        h = model.config.hidden_size
        n_tasks = int(cfg.get("n_tasks", 1))
        self.head = pairwise_head(h, n_tasks)
        backbone_state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        missing, _ = model.load_state_dict(backbone_state, strict=False)
        head_state = {k[len(HEAD_PREFIX) :]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        try:
            self.head.load_state_dict(head_state)
        except RuntimeError as e:
            raise InputError(f"{self.folder}: the checkpoint's pairwise head does not fit ({one_line(e)})") from None
        if missing:
            raise InputError(f"{self.folder}: the checkpoint lacks backbone weights ({', '.join(missing[:3])}, ...)")
        if dtype == "auto":
            dtype = "float16" if self.device.startswith("cuda") and cfg.get("fp16", True) else "float32"
        self.dtype = dtype
        torch_dtype = getattr(torch, dtype)
        self.model = model.to(self.device, torch_dtype).eval()
        self.head = self.head.to(self.device, torch_dtype).eval()
        self.tokenizer = tok
        self.passes = 0

    def describe(self) -> dict[str, Any]:
        return {
            "ranker": "pairrm",
            "source_maxlength": self.source_max,
            "candidate_maxlength": self.candidate_max,
            "truncation": "per prompt",
            "dtype": self.dtype,
            "score": "sum_j (C[i,j] - C[j,i]) / N",
        }

    def close(self) -> None:
        pass  # the weights go with the object; nothing else to release

    def source_text(self, prompt: Any) -> str:
        """The source segment's text: a string prompt as it is; a conversation as its rendered history within the
        source budget, the oldest turns cut first and the last user turn never (builders.conversation)."""
        tok = self.tokenizer

        def length(text: str) -> int:
            return len(tok(PAIRRM_PREFIXES[0] + text.replace(self.sep, " "))["input_ids"])

        return fit_history(prompt, length, self.source_max)

    def encode(self, prompt: Any, candidates: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the source and of each candidate, truncated as llm-blender does for a batch of one."""
        tok = self.tokenizer
        text = self.source_text(prompt)
        src = tok(PAIRRM_PREFIXES[0] + text.replace(self.sep, " "), max_length=self.source_max, truncation=True)[
            "input_ids"
        ]
        budget = self.candidate_max + (self.source_max - len(src)) // 2
        texts = [PAIRRM_PREFIXES[3] + c.replace(self.sep, " ") for c in candidates]
        return src, tok(texts, max_length=budget, truncation=True)["input_ids"]

    def score(self, prompts: Sequence[Any], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        import torch

        pairs = []  # (length, prompt index, i, j, ids, cand1 position, cand2 position)
        for p, (prompt, cands) in enumerate(zip(prompts, candidates)):
            src, cand_ids = self.encode(prompt, cands)
            firsts = [[self.c1_id if t == self.cand_id else t for t in c] for c in cand_ids]
            seconds = [[self.c2_id if t == self.cand_id else t for t in c] for c in cand_ids]
            for i in range(len(cands)):
                for j in range(len(cands)):
                    if i != j:
                        ids = src + firsts[i] + seconds[j]
                        pairs.append((len(ids), p, i, j, ids, len(src) + 1, len(src) + len(firsts[i]) + 1))
        # Bit-identical whatever the batching (--batch-prompts, --batch-tokens, the other prompts of a batch): every
        # pair is padded to a width that depends on its own length only, a pass holds pairs of one width (on CPU the
        # backbone's rows then do not depend on how many share the pass), and the small head runs one row at a time
        # (its matrix kernel differs with the row count).
        pairs = [(_padded_width(p[0]), *p[1:]) + (p[0],) for p in pairs]
        pairs.sort(key=lambda x: x[0])  # one width per pass, similar widths together
        cmp = [[[0.0] * len(c) for _ in c] for c in candidates]
        start = 0
        with torch.no_grad():
            while start < len(pairs):
                width = pairs[start][0]
                end = start + 1
                while end < len(pairs) and pairs[end][0] == width and width * (end - start + 1) <= self.batch_tokens:
                    end += 1
                batch = pairs[start:end]
                ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, item in enumerate(batch):
                    ids[row, : item[7]] = torch.tensor(item[4])
                    mask[row, : item[7]] = 1
                hidden = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state
                for row, item in enumerate(batch):
                    src_enc, c1, c2 = hidden[row, 1], hidden[row, item[5]], hidden[row, item[6]]
                    left = self.head(torch.cat([src_enc, c1])[None])
                    right = self.head(torch.cat([src_enc, c2])[None])
                    cmp[item[1]][item[2]][item[3]] = (left - right).mean().float().item()
                self.passes += len(batch)
                start = end
        return [[sum(c[i][j] - c[j][i] for j in range(len(c))) / len(c) for i in range(len(c))] for c in cmp]
