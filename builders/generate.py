"""The generation stage: N responses per prompt from the current model, resumable and shardable.

    generate(catalog, GenerateConfig(iteration=1, model="mistralai/Mistral-7B-Instruct-v0.2", backend="vllm"))

Backends (the `Generator` protocol): `vllm` (offline vllm.LLM, GPUs), `transformers` (CPU fallback, tests, the
quickstart), `openai` (any OpenAI-compatible server: vLLM serve, TGI, Together).

Reproducibility: each prompt's sampling seed comes from (run seed, prompt_id), never from its position in a batch,
so results do not depend on batch size, sharding or restarts. vLLM samples the n responses of a request with seeds
S..S+n-1; S is a multiple of n drawn from a 2^62 range, so two prompts' seed blocks are equal or disjoint, and equal
with negligible probability.

Resumability: finished prompts are committed to the catalog's work area batch by batch (keyed by the prompt set,
model, backend, template and sampling parameters); a rerun skips them, and the snapshot registered at the end is
the one an uninterrupted run registers.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from builders.catalog import Catalog, Snapshot
from builders.config import BACKENDS, BATCH_PROMPTS, GenerateConfig, SamplingConfig
from builders.backends.base import Generator, Request, Sample, call_sampling as _sampling
from builders.errors import InputError, IterdpoError
from builders.models import model_identity, one_line as _one_line
from builders.results import SplitOutcome, StageResult
from builders.schemas import KINDS


# --------------------------------------------------------------------------------------------------------- helpers
def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """"K/N" -> (K, N), K in 0..N-1 (a Slurm array's SLURM_ARRAY_TASK_ID fits as K)."""
    if spec is None:
        return None
    try:
        k_text, n_text = spec.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise InputError(f"--shard must look like K/N (e.g. 0/4), not {spec!r}") from None
    if n < 1 or not 0 <= k < n:
        raise InputError(f"--shard {spec}: need N >= 1 and 0 <= K < N")
    return k, n


def in_shard(prompt_id: str, shard: tuple[int, int] | None) -> bool:
    """A deterministic partition by prompt_id (its first 64 bits)."""
    return shard is None or int(prompt_id[:16], 16) % shard[1] == shard[0]


def prompt_seed(run_seed: int, prompt_id: str, num_responses: int) -> int:
    """The first of this prompt's `num_responses` consecutive seeds: a multiple of n below 2^62."""
    h = int.from_bytes(hashlib.sha256(f"{run_seed}:{prompt_id}".encode()).digest()[:8], "big")
    return (h % ((1 << 62) // num_responses)) * num_responses


def validate_sampling(s: SamplingConfig) -> None:
    """Used by generate, best-of-n and the pipeline: every sampling setting, before any work."""
    if not isinstance(s.num_responses, int) or s.num_responses < 1:
        raise InputError(f"--num-responses must be at least 1, not {s.num_responses}")
    if not isinstance(s.temperature, (int, float)) or not math.isfinite(s.temperature) or s.temperature < 0:
        raise InputError(f"--temperature must be a number, 0 or more, not {s.temperature}")
    if s.temperature == 0 and s.num_responses > 1:
        # temperature 0 is greedy decoding: the n responses would all be the same, and there is nothing to rank
        raise InputError(f"--temperature 0 is greedy decoding: its {s.num_responses} responses would be identical; "
                         f"use a temperature above 0, or --num-responses 1")
    if not isinstance(s.top_p, (int, float)) or not 0 < s.top_p <= 1:  # a NaN fails the comparison too
        raise InputError(f"--top-p must be in (0, 1], not {s.top_p}")
    if not isinstance(s.max_tokens, int) or s.max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1, not {s.max_tokens}")
    if not isinstance(s.seed, int):
        raise InputError(f"--seed must be an integer, not {s.seed!r}")


VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def validate_generate(cfg: GenerateConfig) -> None:
    """Every option of the generation stage, checked before any input is read or model loaded."""
    validate_sampling(cfg.sampling)
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}")
    for split in cfg.splits:
        if split not in ("train", "test"):
            raise InputError(f"split must be train or test, not {split!r}")
    parse_shard(cfg.shard)
    if cfg.batch_prompts is not None and (not isinstance(cfg.batch_prompts, int) or cfg.batch_prompts < 1):
        raise InputError(f"--batch-prompts must be at least 1, not {cfg.batch_prompts}")
    if cfg.backend == "vllm":
        v = cfg.vllm
        if v.tensor_parallel_size < 1:
            raise InputError(f"--tensor-parallel-size must be at least 1, not {v.tensor_parallel_size}")
        if v.dtype not in VLLM_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(VLLM_DTYPES)}, not {v.dtype!r}")
        if not 0 < v.gpu_memory_utilization <= 1:  # NaN fails too
            raise InputError(f"--gpu-memory-utilization must be in (0, 1], not {v.gpu_memory_utilization}")
        for name, value in (("--max-model-len", v.max_model_len), ("--max-num-seqs", v.max_num_seqs)):
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1, not {value}")
    if cfg.backend == "openai":
        from builders.openai_backend import validate_openai

        validate_openai(cfg.openai)


# ------------------------------------------------------------------------------------------------------ generators
class _Templated:
    """Shared by the local backends: the tokenizer, its chat template, and the context-length rule."""

    def __init__(self, model: str, sampling: SamplingConfig | None, chat_template: Path | None):
        from transformers import AutoTokenizer

        self.model = model
        self.sampling = sampling  # only a default for direct calls without sampling; the stage passes its own
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except Exception as e:
            raise InputError(f"model {model!r}: cannot load its tokenizer ({_one_line(e)})") from None
        if chat_template is not None:
            try:
                self.tokenizer.chat_template = Path(chat_template).read_text()
            except OSError as e:
                raise InputError(f"--chat-template {chat_template}: {e.strerror}") from None
        if not self.tokenizer.chat_template:
            raise InputError(f"model {model!r}: its tokenizer has no chat template; pass --chat-template FILE")
        self.context_length = 0  # set by the backend

    def prepare(self, prompts: Sequence[tuple[str, str, int]],
                sampling: SamplingConfig | None = None) -> list[Request | str]:
        """(prompt_id, prompt, seed) -> a rendered, tokenized Request, or "too_long" (no room for max_tokens)."""
        max_tokens = _sampling(sampling, self.sampling).max_tokens
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True) for _, p, _ in prompts]
        # one batched call (the fast tokenizer parallelises it); the template writes BOS itself
        all_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out: list[Request | str] = []
        for (pid, prompt, seed), text, ids in zip(prompts, texts, all_ids):
            too_long = len(ids) + max_tokens > self.context_length
            out.append("too_long" if too_long else Request(pid, prompt, seed, text, ids, len(ids)))
        return out

    def template_info(self) -> dict[str, Any]:
        template = self.tokenizer.chat_template
        return {"chat_template": template, "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()}


class TransformersGenerator(_Templated):
    """CPU fallback: one generate() call per prompt (its n samples together), seeded per prompt."""

    def __init__(self, model: str, sampling: SamplingConfig | None = None, chat_template: Path | None = None):
        super().__init__(model, sampling, chat_template)
        import torch
        from transformers import AutoModelForCausalLM

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        try:
            self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except Exception as e:
            raise InputError(f"model {model!r}: cannot load it ({_one_line(e)})") from None
        limits = [getattr(self.lm.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        self.context_length = min(x for x in limits if isinstance(x, int) and 0 < x < 10**8)

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig | None = None) -> list[list[Sample]]:
        import torch

        s = _sampling(sampling, self.sampling)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        out = []
        for req in requests:
            torch.manual_seed(req.seed)
            ids = torch.tensor([req.token_ids], device=self.device)
            with torch.no_grad():
                seqs = self.lm.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=s.temperature > 0,
                    temperature=s.temperature if s.temperature > 0 else None, top_p=s.top_p if s.temperature > 0 else None,
                    max_new_tokens=s.max_tokens, num_return_sequences=s.num_responses, pad_token_id=pad,
                    eos_token_id=eos,
                )
            samples = []
            for seq in seqs[:, ids.shape[1]:].tolist():
                stop = seq.index(eos) if eos in seq else None
                kept = seq[:stop] if stop is not None else seq
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
                samples.append(Sample(text, "stop" if stop is not None else "length",
                                      len(kept) + (1 if stop is not None else 0)))
            out.append(samples)
        return out

    def describe(self) -> dict[str, Any]:
        return {"backend": "transformers", "device": self.device, "context_length": self.context_length,
                **self.template_info()}

    def close(self) -> None:
        self.lm = None


class VllmGenerator(_Templated):
    """Offline vllm.LLM: every request carries its own seed; tensor parallel across GPUs."""

    def __init__(self, model: str, sampling: SamplingConfig, chat_template: Path | None, cfg):
        super().__init__(model, sampling, chat_template)
        from builders.vllm_engine import start_llm

        self.llm = start_llm(model, cfg)  # CPU defaults, quiet start-up, root cause in the error
        self.context_length = self.llm.llm_engine.model_config.max_model_len

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams

        s = _sampling(sampling, self.sampling)
        params = [SamplingParams(n=s.num_responses, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                 seed=r.seed) for r in requests]
        outputs = self.llm.generate([{"prompt_token_ids": r.token_ids} for r in requests], params, use_tqdm=False)
        return [[Sample(o.text, o.finish_reason or "stop", len(o.token_ids)) for o in out.outputs] for out in outputs]

    def describe(self) -> dict[str, Any]:
        return {"backend": "vllm", "context_length": self.context_length, **self.template_info()}

    def close(self) -> None:
        from builders.vllm_engine import shutdown_llm

        if self.llm is not None:
            shutdown_llm(self.llm)
        self.llm = None


def make_generator(cfg: GenerateConfig) -> Generator:
    if cfg.backend == "transformers":
        return TransformersGenerator(cfg.model, cfg.sampling, cfg.chat_template)
    if cfg.backend == "vllm":
        return VllmGenerator(cfg.model, cfg.sampling, cfg.chat_template, cfg.vllm)
    if cfg.backend == "openai":
        from builders.openai_backend import OpenAIGenerator

        return OpenAIGenerator(cfg.model, cfg.sampling, cfg.chat_template, cfg.openai)
    raise InputError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------------------------------------- stage
@dataclass
class SplitResult(SplitOutcome):
    generated: int = 0  # prompts generated in this run (the rest were done before)
    skipped_too_long: int = 0


@dataclass
class GenerateResult(StageResult):
    completion_tokens: int = 0


def work_key(prompts: Snapshot, identity: dict[str, Any], backend: str, template_sha: str | None,
             sampling: SamplingConfig) -> str:
    """Everything that determines the responses (not the shard, batch size or machine)."""
    spec = {"stage": "generate", "prompts": prompts.id, "model": identity, "backend": backend,
            "chat_template_sha256": template_sha, "sampling": asdict(sampling)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _template_sha(cfg: GenerateConfig) -> str | None:
    """The chat template decides the rendered prompt, so it is part of the work key; read without loading weights."""
    if cfg.chat_template is not None:
        try:
            return hashlib.sha256(Path(cfg.chat_template).read_bytes()).hexdigest()
        except OSError as e:
            raise InputError(f"--chat-template {cfg.chat_template}: {e.strerror}") from None
    if cfg.backend == "openai":
        return None  # the server applies its own template
    from transformers import AutoTokenizer

    try:
        template = AutoTokenizer.from_pretrained(cfg.model).chat_template
    except Exception as e:
        raise InputError(f"model {cfg.model!r}: cannot load its tokenizer ({_one_line(e)})") from None
    if not template:
        raise InputError(f"model {cfg.model!r}: its tokenizer has no chat template; pass --chat-template FILE")
    return hashlib.sha256(template.encode()).hexdigest()


def _rows(requests: Sequence[Request], samples: Sequence[Sequence[Sample]]) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in KINDS["generations"].columns}
    for req, outs in zip(requests, samples):
        for i, smp in enumerate(outs):
            cols["prompt_id"].append(req.prompt_id)
            cols["response_index"].append(i)
            cols["response"].append(smp.text)
            cols["finish_reason"].append(smp.finish_reason)
            cols["prompt_tokens"].append(req.prompt_tokens)
            cols["completion_tokens"].append(smp.completion_tokens)
    return pa.Table.from_pydict(cols, schema=KINDS["generations"].schema)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def generate(catalog: Catalog, cfg: GenerateConfig, from_refs: Sequence[str] = (), progress: bool = True,
             generator: Generator | None = None) -> GenerateResult:
    """Generate `num_responses` responses for each prompt of iteration `cfg.iteration`'s prompt sets and register
    a `generations` snapshot per split (a shard snapshot with --shard). Resumable: finished prompts are kept."""
    validate_generate(cfg)
    shard = parse_shard(cfg.shard)
    sets = catalog.inputs("prompts", cfg.iteration, cfg.splits, from_refs, "prompt sets", "iterdpo prompts split",
                          require_train=True)
    identity = model_identity(cfg.model)
    producer = _model_snapshot(catalog, identity)
    given = generator.describe().get("chat_template_sha256") if generator is not None else None
    template_sha = given or _template_sha(cfg)
    batch = cfg.batch_prompts or BATCH_PROMPTS[cfg.backend]
    result = GenerateResult(cfg.iteration)
    start = time.perf_counter()
    owned = generator is None
    try:
        for split, prompts_snap in sets.items():
            key = work_key(prompts_snap, identity, cfg.backend, template_sha, cfg.sampling)
            prompts = catalog.read(prompts_snap.id)
            mine = [(pid, text) for pid, text in zip(prompts.column("prompt_id").to_pylist(),
                                                      prompts.column("prompt").to_pylist()) if in_shard(pid, shard)]
            done = catalog.work_units(key)
            todo = [(pid, text) for pid, text in mine if pid not in done]
            split_result = SplitResult(split, len(mine))
            if todo:
                if generator is None:
                    generator = make_generator(cfg)
                result.completion_tokens += _run_batches(catalog, generator, cfg, key, split, prompts_snap, todo,
                                                         batch, split_result, progress)
            done = catalog.work_units(key)
            units = [pid for pid, _ in mine]
            skipped = sum(1 for pid in units if (done.get(pid) or {}).get("skipped"))
            rows = catalog.work_rows(key, units=units)
            params = {
                **identity, "backend": cfg.backend, "sampling": asdict(cfg.sampling),
                "seed_rule": "sha256(f'{seed}:{prompt_id}')[:8] mod floor(2^62/n), times n; responses use S..S+n-1",
                "skipped_too_long": skipped, "work_key": key, "prompts": prompts_snap.id,
                **({"shard": cfg.shard} if shard else {}),
                **(generator.describe() if generator is not None else _recorded_describe(catalog, key)),
            }
            split_result.skipped_too_long = skipped
            split_result.snapshot = catalog.register("generations", rows, iteration=cfg.iteration, split=split,
                                                     parents=[prompts_snap.id, *producer], params=params)
            result.splits.append(split_result)
    finally:
        if owned and generator is not None:
            generator.close()
    result.seconds = time.perf_counter() - start
    return result


def _model_snapshot(catalog: Catalog, identity: dict[str, Any]) -> list[str]:
    """The `model` snapshot of the generator, when iterdpo trained it: lineage from model to the data it made."""
    for snap in reversed(catalog.list(kind="model")):
        if catalog.read(snap.id).column("path")[0].as_py() == identity.get("model"):
            return [snap.id]
    return []


def _recorded_describe(catalog: Catalog, key: str) -> dict[str, Any]:
    """When every prompt was already done, the backend's description was recorded with the work."""
    return catalog.work_params(key).get("generator", {})


def _run_batches(catalog: Catalog, generator: Generator, cfg: GenerateConfig, key: str, split: str,
                 prompts_snap: Snapshot, todo: list[tuple[str, str]], batch: int, split_result: SplitResult,
                 progress: bool) -> int:
    from tqdm import tqdm

    n = cfg.sampling.num_responses
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="prompt", desc=f"generate it{cfg.iteration} {split}", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    work_params = {"generator": generator.describe(), "prompts": prompts_snap.id}
    try:
        for chunk in _chunks(todo, batch):
            requests, units = [], {}
            prepared = generator.prepare([(pid, text, prompt_seed(cfg.sampling.seed, pid, n)) for pid, text in chunk],
                                         cfg.sampling)
            for (pid, _), item in zip(chunk, prepared):
                if isinstance(item, str):
                    units[pid] = {"skipped": item}
                else:
                    requests.append(item)
                    units[pid] = None
            answered = generator.generate(requests, cfg.sampling) if requests else []
            kept, samples = [], []
            for req, outs in zip(requests, answered):
                if not outs:  # the server refused the prompt as longer than its context
                    units[req.prompt_id] = {"skipped": "too_long"}
                    continue
                if len(outs) != n:
                    raise IterdpoError(f"the backend returned {len(outs)} responses for prompt {req.prompt_id}, not {n}")
                kept.append(req)
                samples.append(outs)
            catalog.add_work(key, "generations", _rows(kept, samples), units, iteration=cfg.iteration,
                             split=split, params=work_params)
            split_result.generated += len(chunk)
            tokens += sum(s.completion_tokens or 0 for outs in samples for s in outs)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.update(len(chunk))
            bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s")
    finally:
        bar.close()
    return tokens
