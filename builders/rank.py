"""The ranking stage: score every response with a reward model; register `scores` snapshots.

Rankers (the `Ranker` protocol):
- `pairrm` (default): PairRM on the maintained transformers DeBERTa-v2, loading llm-blender's checkpoint layout
  (ranker config.json + state dict). Same input format, truncation rules and score as llm-blender's `Blender.rank`:
  each ordered pair (i, j) is one pass over `[CLS] <|source|> x [SEP] [CLS] <|candidate1|> a [SEP] [CLS]
  <|candidate2|> b [SEP]`, C[i, j] = head(source, cand1) - head(source, cand2), and
  score_i = sum_j (C[i, j] - C[j, i]) / N (llm-blender's mean over the N columns of C - C^T). One difference: the
  candidate budget (412 + half the unused part of the 1224-token source budget) is computed per prompt, where
  llm-blender takes it from the longest source in its batch; so scores equal llm-blender's at one prompt per
  batch. Passes of many prompts are batched together by padded width, and on CPU the scores are bit-identical
  whatever the batch options (see `PairRM.score`).
- `llm-blender`: the library itself, one prompt per batch (the reference `pairrm` is tested against).
- `scalar`: any AutoModelForSequenceClassification reward model, one pass per response.
- `python`: `module:function(prompts, responses) -> scores` over flat, equal-length lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow as pa

from builders.catalog import Catalog
from builders.config import RANKERS, RankConfig
from builders.errors import InputError, IterdpoError
from builders.models import model_identity, one_line, resolve_folder
from builders.results import SplitOutcome, StageResult

PAIRRM_PREFIXES = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")


class Ranker(Protocol):
    """Scores for each prompt's candidates (higher is better)."""

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]: ...

    def describe(self) -> dict[str, Any]: ...


# ------------------------------------------------------------------------------------------------- model loading
def _pairrm_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("ranker_type") != "pairranker" or "model_name" not in config:
        raise InputError(f"{folder} is not a PairRM folder: it needs llm-blender's config.json "
                         f"(ranker_type 'pairranker', model_name, source_maxlength, candidate_maxlength)")
    return config


def _backbone(folder: Path, model_name: str) -> str:
    """llm-blender's config names the backbone by hub id (microsoft/deberta-v3-large); a path relative to the
    ranker folder is looked up there first (how the offline tiny ranker and mirrored copies ship it)."""
    local = folder / model_name
    return str(local.resolve()) if local.exists() else model_name


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = ("auto", "float32", "float16", "bfloat16")


def check_device(device: str | None) -> None:
    """--device names a device this machine has (checked before any model loads)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"--device {device!r}: use cpu, cuda or cuda:N")


def validate_rank(cfg: RankConfig) -> None:
    """Every ranking option, checked before any input is read or model loaded."""
    if cfg.ranker not in RANKERS:
        raise InputError(f"unknown ranker {cfg.ranker!r}; use one of {', '.join(RANKERS)}")
    for split in cfg.splits:
        if split not in ("train", "test"):
            raise InputError(f"split must be train or test, not {split!r}")
    if cfg.dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    if not isinstance(cfg.batch_prompts, int) or cfg.batch_prompts < 1:
        raise InputError(f"--batch-prompts must be at least 1, not {cfg.batch_prompts}")
    if cfg.batch_tokens is not None and (not isinstance(cfg.batch_tokens, int) or cfg.batch_tokens < 1):
        raise InputError(f"--batch-tokens must be at least 1, not {cfg.batch_tokens}")
    if cfg.ranker != "python":
        check_device(cfg.device)


# --------------------------------------------------------------------------------------------------------- pairrm
PAD_MULTIPLE = 16  # a pass's width: the pair's length rounded up to this (a pair's shape is its own, see score)


def _padded_width(length: int) -> int:
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


class PairRM:
    def __init__(self, ref: str, device: str | None = None, dtype: str = "auto", batch_tokens: int | None = None):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.ref, self.folder = ref, resolve_folder(ref, "ranker model")
        cfg = _pairrm_config(self.folder)
        self.source_max = int(cfg["source_maxlength"])
        self.candidate_max = int(cfg["candidate_maxlength"])
        self.device = _device(device)
        self.batch_tokens = batch_tokens or (32768 if self.device.startswith("cuda") else 2048)
        backbone = _backbone(self.folder, cfg["model_name"])
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
        state = load_file(weights) if weights.exists() else torch.load(self.folder / "pytorch_model.bin",
                                                                       map_location="cpu", weights_only=True)
        h = model.config.hidden_size
        n_tasks = int(cfg.get("n_tasks", 1))
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(2 * h, h), torch.nn.Tanh(),
                                        torch.nn.Dropout(0.0), torch.nn.Linear(h, n_tasks))
        backbone_state = {k[len("pretrained_model."):]: v for k, v in state.items() if k.startswith("pretrained_model.")}
        missing, _ = model.load_state_dict(backbone_state, strict=False)
        head_state = {k[len("head_layer."):]: v for k, v in state.items() if k.startswith("head_layer.")}
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
        return {"ranker": "pairrm", "source_maxlength": self.source_max, "candidate_maxlength": self.candidate_max,
                "truncation": "per prompt", "dtype": self.dtype, "score": "sum_j (C[i,j] - C[j,i]) / N"}

    def encode(self, prompt: str, candidates: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the source and of each candidate, truncated as llm-blender does for a batch of one."""
        tok = self.tokenizer
        src = tok(PAIRRM_PREFIXES[0] + prompt.replace(self.sep, " "), max_length=self.source_max,
                  truncation=True)["input_ids"]
        budget = self.candidate_max + (self.source_max - len(src)) // 2
        texts = [PAIRRM_PREFIXES[3] + c.replace(self.sep, " ") for c in candidates]
        return src, tok(texts, max_length=budget, truncation=True)["input_ids"]

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
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
                hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
                for row, item in enumerate(batch):
                    src_enc, c1, c2 = hidden[row, 1], hidden[row, item[5]], hidden[row, item[6]]
                    left = self.head(torch.cat([src_enc, c1])[None])
                    right = self.head(torch.cat([src_enc, c2])[None])
                    cmp[item[1]][item[2]][item[3]] = (left - right).mean().float().item()
                self.passes += len(batch)
                start = end
        return [[sum(c[i][j] - c[j][i] for j in range(len(c))) / len(c) for i in range(len(c))] for c in cmp]


# ----------------------------------------------------------------------------------------------------- llm-blender
def apply_llm_blender_fixes() -> None:
    """llm-blender 0.0.2 targets transformers 4. Two shims, applied only when this backend loads:
    1. it imports transformers.utils.hub.TRANSFORMERS_CACHE (removed in transformers 5) and uses it as cache dir;
    2. its collator calls tokenizer.batch_encode_plus (removed in transformers 5), which is tokenizer(...) there."""
    import transformers.utils.hub as hub
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub.constants import HF_HUB_CACHE

        hub.TRANSFORMERS_CACHE = HF_HUB_CACHE
    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
            return self(batch_text_or_text_pairs, **kwargs)

        PreTrainedTokenizerBase.batch_encode_plus = batch_encode_plus


class LlmBlender:
    """The reference: llm-blender's own Blender.rank, one prompt per batch (its truncation is batch-dependent)."""

    def __init__(self, ref: str, device: str | None = None, batch_size: int = 1):
        apply_llm_blender_fixes()
        import llm_blender

        self.folder = resolve_folder(ref, "ranker model")
        cfg = _pairrm_config(self.folder)
        self.batch_size = batch_size
        self.blender = llm_blender.Blender()
        # llm-blender prints its progress to stdout, which belongs to `--json`
        with contextlib.redirect_stdout(sys.stderr):
            self.blender.loadranker(str(self.folder), device=_device(device),
                                    model_name=_backbone(self.folder, cfg["model_name"]))

    def describe(self) -> dict[str, Any]:
        return {"ranker": "llm-blender", "batch_size": self.batch_size, "llm_blender_version": "0.0.2"}

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            got = self.blender.rank(list(prompts[start:start + self.batch_size]),
                                    [list(c) for c in candidates[start:start + self.batch_size]],
                                    return_scores=True, batch_size=self.batch_size, disable_tqdm=True)
            out.extend([float(x) for x in row] for row in got)
        return out


# ----------------------------------------------------------------------------------------------- scalar and python
class ScalarRM:
    """AutoModelForSequenceClassification over (prompt, response), rendered with the chat template when the
    tokenizer has one (reward models trained on conversations), else as a text pair."""

    def __init__(self, ref: str, device: str | None = None, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = resolve_folder(ref, "ranker model")
        self.device, self.batch_size = _device(device), batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
        except Exception as e:
            raise InputError(f"scalar reward model {ref!r} cannot be loaded ({one_line(e)})") from None
        # transformers fills weights the checkpoint lacks (e.g. the score head of a plain backbone, or of a PairRM
        # folder) with random values and only warns: scores from them are noise, so refuse
        missing = sorted(info.get("missing_keys") or []) + sorted(k[0] if isinstance(k, tuple) else k
                                                                  for k in info.get("mismatched_keys") or [])
        if missing:
            heads = [k for k in missing if k.split(".")[0] in ("classifier", "score", "pooler", "v_head")]
            shown = ", ".join((heads or missing)[:3]) + (", ..." if len(missing) > 3 else "")
            raise InputError(f"scalar reward model {ref!r}: {len(missing)} weights are missing from its checkpoint "
                             f"and would be random ({shown}); it is not a trained sequence-classification reward model")
        self.model = model.to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.torch = torch

    def describe(self) -> dict[str, Any]:
        return {"ranker": "scalar", "chat_template": bool(self.tokenizer.chat_template)}

    def _inputs(self, prompts: list[str], responses: list[str]):
        tok = self.tokenizer
        if tok.chat_template:
            texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                             tokenize=False) for p, r in zip(prompts, responses)]
            return tok(texts, padding=True, truncation=True, return_tensors="pt", add_special_tokens=False)
        return tok(prompts, responses, padding=True, truncation=True, return_tensors="pt")

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        flat = [(p, c) for p, cands in zip(prompts, candidates) for c in cands]
        values: list[float] = []
        with self.torch.no_grad():
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start:start + self.batch_size]
                enc = self._inputs([p for p, _ in chunk], [c for _, c in chunk]).to(self.device)
                values.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        return _unflatten(values, candidates)


class PythonScorer:
    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise InputError(f"--ranker-model for the python ranker must be module:function, not {spec!r}")
        if os.getcwd() not in sys.path:  # `module:function` next to the user, as `python -m` would find it
            sys.path.insert(0, os.getcwd())
        try:
            self.fn: Callable = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise InputError(f"python scorer {spec!r} cannot be imported ({one_line(e)})") from None
        self.spec = spec

    def describe(self) -> dict[str, Any]:
        return {"ranker": "python", "function": self.spec}

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        flat_p = [p for p, cands in zip(prompts, candidates) for _ in cands]
        flat_r = [c for cands in candidates for c in cands]
        got = self.fn(flat_p, flat_r)
        try:
            values = [float(v) for v in got]
        except (TypeError, ValueError):
            raise InputError(f"python scorer {self.spec} must return a list of numbers, "
                             f"got {type(got).__name__}") from None
        if len(values) != len(flat_r):
            raise InputError(f"python scorer {self.spec} returned {len(values)} scores for {len(flat_r)} responses")
        return _unflatten(values, candidates)


def _unflatten(values: list[float], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
    out, at = [], 0
    for cands in candidates:
        out.append(values[at:at + len(cands)])
        at += len(cands)
    return out


def make_ranker(cfg: RankConfig) -> Ranker:
    validate_rank(cfg)
    if cfg.ranker == "pairrm":
        return PairRM(cfg.ranker_model, cfg.device, cfg.dtype, cfg.batch_tokens)
    if cfg.ranker == "llm-blender":
        return LlmBlender(cfg.ranker_model, cfg.device)
    if cfg.ranker == "scalar":
        return ScalarRM(cfg.ranker_model, cfg.device)
    if cfg.ranker == "python":
        return PythonScorer(cfg.ranker_model)
    raise InputError(f"unknown ranker {cfg.ranker!r}; use one of {', '.join(RANKERS)}")


# ----------------------------------------------------------------------------------------------------------- stage
@dataclass
class RankSplit(SplitOutcome):
    ranked: int = 0  # prompts scored in this run (the rest were done before)


class RankResult(StageResult):
    pass


def ranker_identity(cfg: RankConfig) -> dict[str, Any]:
    if cfg.ranker == "python":
        return {"ranker_model": cfg.ranker_model}
    ident = model_identity(cfg.ranker_model)
    return {"ranker_model": ident.pop("model"), **{f"ranker_{k}": v for k, v in ident.items()}}


def grouped(table: pa.Table) -> tuple[list[str], dict[str, list[tuple[int, str]]]]:
    """prompt_id -> [(response_index, response)] in order, from a generations table (canonical order)."""
    by: dict[str, list[tuple[int, str]]] = {}
    for pid, idx, text in zip(table.column("prompt_id").to_pylist(), table.column("response_index").to_pylist(),
                              table.column("response").to_pylist()):
        by.setdefault(pid, []).append((idx, text))
    return list(by), by


def check_finite(prompt_id: str, scores: Sequence[float]) -> None:
    for s in scores:
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise IterdpoError(f"the ranker returned a non-finite score ({s}) for prompt {prompt_id}")


def rank(catalog: Catalog, cfg: RankConfig, from_refs: Sequence[str] = (), progress: bool = True,
         ranker: Ranker | None = None) -> RankResult:
    """Score every response of iteration `cfg.iteration`'s generations; register a `scores` snapshot per split.
    Resumable like generation: scored prompts are committed in batches and skipped by a rerun."""
    from tqdm import tqdm

    validate_rank(cfg)
    sets = catalog.inputs("generations", cfg.iteration, cfg.splits, from_refs, "generations",
                          f"iterdpo generate --iteration {cfg.iteration}")
    identity = ranker_identity(cfg)
    result = RankResult(cfg.iteration)
    start = time.perf_counter()
    settings = {k: v for k, v in asdict(cfg).items() if k in ("ranker", "dtype")}
    if cfg.ranker == "pairrm" and not _device(cfg.device).startswith("cpu"):
        # PairRM's scores are bit-identical across batch options on CPU (tested); GPU kernels may change with the
        # batch shape, so there the batch options are part of the key and a resumed run cannot mix them
        settings.update(batch_prompts=cfg.batch_prompts, batch_tokens=cfg.batch_tokens)
    for split, gen in sets.items():
        key = hashlib.sha256(json.dumps({"stage": "rank", "generations": gen.id, **identity, **settings},
                                        sort_keys=True).encode()).hexdigest()
        gens = catalog.read(gen.id)
        prompts_snap = catalog.get(gen.parents[0])
        prompt_text = dict(zip(*(catalog.read(prompts_snap.id).column(c).to_pylist() for c in ("prompt_id", "prompt"))))
        order, by = grouped(gens)
        done = catalog.work_units(key)
        todo = [pid for pid in order if pid not in done]
        split_result = RankSplit(split, len(order))
        if todo and ranker is None:
            ranker = make_ranker(cfg)
        bar = tqdm(total=len(todo), unit="prompt", desc=f"rank it{cfg.iteration} {split}", disable=not progress,
                   mininterval=1.0, dynamic_ncols=True)
        try:
            for at in range(0, len(todo), cfg.batch_prompts):
                chunk = todo[at:at + cfg.batch_prompts]
                scores = ranker.score([prompt_text[p] for p in chunk], [[t for _, t in by[p]] for p in chunk])
                rows: dict[str, list] = {"prompt_id": [], "response_index": [], "score": []}
                for pid, values in zip(chunk, scores):
                    if len(values) != len(by[pid]):
                        raise IterdpoError(f"the ranker returned {len(values)} scores for the {len(by[pid])} "
                                           f"responses of prompt {pid}")
                    check_finite(pid, values)
                    for (idx, _), value in zip(by[pid], values):
                        rows["prompt_id"].append(pid)
                        rows["response_index"].append(idx)
                        rows["score"].append(float(value))
                catalog.add_work(key, "scores", pa.table(rows), {p: None for p in chunk}, iteration=cfg.iteration,
                                 split=split, params={"ranker": ranker.describe()})
                split_result.ranked += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
        described = ranker.describe() if ranker is not None else catalog.work_params(key).get("ranker", {})
        params = {**identity, **described, "generations": gen.id, "work_key": key,
                  **{k: v for k, v in settings.items() if k.startswith("batch_")}}
        split_result.snapshot = catalog.register("scores", catalog.work_rows(key, units=order),
                                                 iteration=cfg.iteration, split=split, parents=[gen.id], params=params)
        result.splits.append(split_result)
    result.seconds = time.perf_counter() - start
    return result
