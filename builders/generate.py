"""The generation stage: N responses per prompt from the current model, resumable and shardable.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from builders.catalog import Catalog
    >>> from builders.config import BUNDLED_PROMPTS, GenerateConfig, SamplingConfig, SplitConfig
    >>> from builders.generate import generate
    >>> from builders.prompts import import_prompts, split_prompts
    >>> catalog = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb")
    >>> _ = import_prompts(catalog, str(BUNDLED_PROMPTS))
    >>> _ = split_prompts(catalog, SplitConfig(iterations=1, train_size=3, test_size=1))
    >>> cfg = GenerateConfig(model=str(TINY / "generator"),  # a folder from `iterdpo tiny-models TINY`
    ...                      sampling=SamplingConfig(num_responses=2, max_tokens=8))
    >>> result = generate(catalog, 1, cfg, progress=False)
    >>> [(s.split, s.processed, s.snapshot.kind, s.snapshot.rows) for s in result.splits]
    [('train', 3, 'generations', 6), ('test', 1, 'generations', 2)]
    >>> generate(catalog, 1, cfg, progress=False).splits[0].processed  # a rerun: every prompt is done
    0

On GPUs: `GenerateConfig(model="mistralai/Mistral-7B-Instruct-v0.2", backend="vllm")`.

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
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from builders import executor
from builders.backends.base import Generator, Request, Sample
from builders.backends.ray import generator_resources
from builders.catalog import Catalog, Snapshot
from builders.config import (
    BACKENDS,
    BATCH_PROMPTS,
    ExecutorConfig,
    GenerateConfig,
    SamplingConfig,
    check_commit_seconds,
    check_splits,
)
from builders.errors import InputError, IterdpoError, one_line
from builders.models import model_identity, served_identity
from builders.schemas import KINDS
from builders.stage import (
    Finished,
    Producer,
    SplitWork,
    StageResult,
    StageSpec,
    chunks,
    hash_key,
    resolve_inputs,
    run_stage,
)


# --------------------------------------------------------------------------------------------------------- helpers
def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """ "K/N" -> (K, N), K in 0..N-1 (a Slurm array's SLURM_ARRAY_TASK_ID fits as K)."""
    if spec is None:
        return None
    try:
        k_text, n_text = spec.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise InputError(f"shard must look like K/N (e.g. 0/4), not {spec!r}", option="shard") from None
    if n < 1 or not 0 <= k < n:
        raise InputError(f"shard {spec}: need N >= 1 and 0 <= K < N", option="shard")
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
        raise InputError(f"num_responses must be at least 1, not {s.num_responses}", option="num_responses")
    if not isinstance(s.temperature, (int, float)) or not math.isfinite(s.temperature) or s.temperature < 0:
        raise InputError(f"temperature must be a number, 0 or more, not {s.temperature}", option="temperature")
    if s.temperature == 0 and s.num_responses > 1:
        # temperature 0 is greedy decoding: the n responses would all be the same, and there is nothing to rank
        raise InputError(
            f"temperature 0 is greedy decoding: its {s.num_responses} responses would be identical; "
            f"use a temperature above 0, or num_responses 1",
            option="temperature",
        )
    if not isinstance(s.top_p, (int, float)) or not 0 < s.top_p <= 1:  # a NaN fails the comparison too
        raise InputError(f"top_p must be in (0, 1], not {s.top_p}", option="top_p")
    if not isinstance(s.max_tokens, int) or s.max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, not {s.max_tokens}", option="max_tokens")
    if not isinstance(s.seed, int):
        raise InputError(f"seed must be an integer, not {s.seed!r}", option="seed")


VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def validate_generate(cfg: GenerateConfig) -> None:
    """Every option of the generation stage, checked before any input is read or model loaded."""
    validate_sampling(cfg.sampling)
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}")
    check_splits(cfg.splits)
    parse_shard(cfg.shard)
    if cfg.batch_prompts is not None and (not isinstance(cfg.batch_prompts, int) or cfg.batch_prompts < 1):
        raise InputError(f"batch_prompts must be at least 1, not {cfg.batch_prompts}", option="batch_prompts")
    check_commit_seconds(cfg.commit_seconds)
    if cfg.backend == "vllm":
        v = cfg.vllm
        if v.tensor_parallel_size < 1:
            raise InputError(
                f"tensor_parallel_size must be at least 1, not {v.tensor_parallel_size}", option="tensor_parallel_size"
            )
        if v.dtype not in VLLM_DTYPES:
            raise InputError(f"dtype must be one of {', '.join(VLLM_DTYPES)}, not {v.dtype!r}", option="dtype")
        if not 0 < v.gpu_memory_utilization <= 1:  # NaN fails too
            raise InputError(
                f"gpu_memory_utilization must be in (0, 1], not {v.gpu_memory_utilization}",
                option="gpu_memory_utilization",
            )
        for name, value in (
            ("max_model_len", v.max_model_len),
            ("max_num_seqs", v.max_num_seqs),
            ("cpu_threads", v.cpu_threads),
        ):
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1, not {value}", option=name)
    if cfg.backend == "openai":
        from builders.backends.openai import validate_openai

        validate_openai(cfg.openai)
    from builders.backends.ray import check_generate_executor, validate_executor

    validate_executor(cfg.scale_out)
    check_generate_executor(cfg)  # an unreachable address, or replicas this machine cannot hold


# ------------------------------------------------------------------------------------------------------ generators
def make_generator(cfg: GenerateConfig) -> Generator:
    """The local backend `cfg` names (the executor decides where it runs: `producer`)."""
    if cfg.backend == "transformers":
        from builders.backends.transformers import TransformersGenerator

        return TransformersGenerator(cfg.model, cfg.sampling, cfg.chat_template)
    if cfg.backend == "vllm":
        from builders.backends.vllm import VllmGenerator

        return VllmGenerator(cfg.model, cfg.sampling, cfg.chat_template, cfg.vllm)
    if cfg.backend == "openai":
        from builders.backends.openai import OpenAIGenerator

        return OpenAIGenerator(cfg.model, cfg.sampling, cfg.chat_template, cfg.openai)
    raise InputError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}")


def producer(cfg: GenerateConfig) -> Producer:
    """Generation's model work for `cfg`, on its executor: work items are (prompt_id, prompt)."""
    local = replace(cfg, scale_out=ExecutorConfig())  # what each Ray replica runs: the local backend
    return executor.producer(
        cfg.scale_out,
        partial(make_generator, local),
        partial(_produce, local),
        chunk=cfg.batch_prompts or BATCH_PROMPTS[cfg.backend],
        resources=partial(generator_resources, cfg),
        label="generate",
    )


# ----------------------------------------------------------------------------------------------------------- stage
def work_key(
    prompts: Snapshot, identity: dict[str, Any], backend: str, template_sha: str | None, sampling: SamplingConfig
) -> str:
    """Everything that determines the responses (not the shard, batch size or machine)."""
    return hash_key(
        {
            "stage": "generate",
            "prompts": prompts.id,
            "model": identity,
            "backend": backend,
            "chat_template_sha256": template_sha,
            "sampling": asdict(sampling),
        }
    )


def _template_sha(cfg: GenerateConfig) -> str | None:
    """The chat template decides the rendered prompt, so it is part of the work key; read without loading weights."""
    if cfg.chat_template is not None:
        try:
            return hashlib.sha256(Path(cfg.chat_template).read_bytes()).hexdigest()
        except OSError as e:
            raise InputError(f"chat_template {cfg.chat_template}: {e.strerror}", option="chat_template") from None
    if cfg.backend == "openai":
        return None  # the server applies its own template
    from transformers import AutoTokenizer

    try:
        template = AutoTokenizer.from_pretrained(cfg.model).chat_template
    except Exception as e:
        raise InputError(f"model {cfg.model!r}: cannot load its tokenizer ({one_line(e)})") from None
    if not template:
        raise InputError(
            f"model {cfg.model!r}: its tokenizer has no chat template; give a chat_template file",
            option="chat_template",
        )
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


def generate(
    catalog: Catalog,
    iteration: int,
    cfg: GenerateConfig,
    from_refs: Sequence[str] = (),
    progress: bool = True,
    generator: Generator | None = None,
) -> StageResult:
    """Generate `num_responses` responses for each prompt of `iteration`'s prompt sets and register a
    `generations` snapshot per split (a shard snapshot with `shard`). Resumable: finished prompts are kept."""
    validate_generate(cfg)
    shard = parse_shard(cfg.shard)
    sets = resolve_inputs(catalog, "prompts", iteration, cfg.splits, from_refs, require_train=True)
    # a served name (openai) is the server's to resolve: no Hub or disk lookup, which would fail for it
    identity = served_identity(cfg.model) if cfg.backend == "openai" else model_identity(cfg.model)
    producer_of = _model_snapshot(catalog, identity)
    given = generator.describe().get("chat_template_sha256") if generator is not None else None
    template_sha = given or _template_sha(cfg)

    def splits() -> Iterator[SplitWork]:
        for split, prompts_snap in sets.items():  # one split's prompts in memory at a time
            key = work_key(prompts_snap, identity, cfg.backend, template_sha, cfg.sampling)
            prompts = catalog.read(prompts_snap.id)
            items = {
                pid: (pid, text)
                for pid, text in zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist())
                if in_shard(pid, shard)
            }

            def params(
                described: dict[str, Any], skipped: int, key: str = key, prompts_id: str = prompts_snap.id
            ) -> dict[str, Any]:
                return {
                    **identity,
                    "backend": cfg.backend,
                    "sampling": asdict(cfg.sampling),
                    "seed_rule": "sha256(f'{seed}:{prompt_id}')[:8] mod floor(2^62/n), times n; responses use S..S+n-1",
                    "skipped_too_long": skipped,
                    "work_key": key,
                    "prompts": prompts_id,
                    **_engine(cfg),
                    **described,
                }

            yield SplitWork(
                split,
                key,
                items,
                [prompts_snap.id, *producer_of],
                params,
                work_params={"prompts": prompts_snap.id},
                shard=cfg.shard if shard else None,
            )

    spec = StageSpec("generate", "generations", iteration, "generator", producer(cfg), cfg.commit_seconds)
    return run_stage(catalog, spec, splits(), progress=progress, backend=generator)


def _engine(cfg: GenerateConfig) -> dict[str, Any]:
    """How the engine ran, beyond the work key, for the card's rebuild commands: vLLM's options (eager and compiled
    runs sample differently on a CPU) and, for a local run on a CPU, torch's thread count (so do 1 and 2 threads)."""
    import sys

    out: dict[str, Any] = {"vllm": asdict(cfg.vllm)} if cfg.backend == "vllm" else {}
    torch = sys.modules.get("torch")  # loaded by the local backends; the openai backend's server did the work
    if (
        cfg.backend != "openai"
        and cfg.scale_out.executor == "local"
        and torch is not None
        and not torch.cuda.is_available()
    ):
        out["cpu_threads"] = torch.get_num_threads()
    return out


def _model_snapshot(catalog: Catalog, identity: dict[str, Any]) -> list[str]:
    """The `model` snapshot of the generator, when iterdpo trained it: lineage from model to the data it made."""
    for snap in reversed(catalog.list(kind="model")):
        if catalog.read(snap.id).column("path")[0].as_py() == identity.get("model"):
            return [snap.id]
    return []


def _finish(
    requests: Sequence[Request], answered: Sequence[Sequence[Sample]], units: dict[str, Any], n: int
) -> Finished:
    """Rows and units of answered requests; a request answered with no samples was refused as too long."""
    kept, samples = [], []
    for req, outs in zip(requests, answered):
        if not outs:
            units[req.prompt_id] = {"skipped": "too_long"}
            continue
        if len(outs) != n:
            raise IterdpoError(f"the backend returned {len(outs)} responses for prompt {req.prompt_id}, not {n}")
        kept.append(req)
        samples.append(outs)
    # a server's usage total counts even where the rows cannot say which sample had how many (n > 1)
    tokens = sum(
        req.completion_tokens if req.completion_tokens is not None else sum(s.completion_tokens or 0 for s in outs)
        for req, outs in zip(kept, samples)
    )
    return Finished(units, _rows(kept, samples), tokens)


def _produce(cfg: GenerateConfig, generator: Generator, todo: Sequence[tuple[str, str]]) -> Iterator[Finished]:
    """Finished prompts, as the local backend answers them: a backend with `stream` (openai) keeps its requests in
    flight across the stage's commits; the others answer `batch_prompts` prompts per call."""
    n = cfg.sampling.num_responses
    seeded = [(pid, text, prompt_seed(cfg.sampling.seed, pid, n)) for pid, text in todo]
    stream = getattr(generator, "stream", None)
    if stream is not None:
        for req, outs in stream(seeded, cfg.sampling):
            yield _finish([req], [outs], {req.prompt_id: None}, n)
        return
    for chunk in chunks(seeded, cfg.batch_prompts or BATCH_PROMPTS[cfg.backend]):
        requests, units = [], {}
        for (pid, _, _), item in zip(chunk, generator.prepare(chunk, cfg.sampling)):
            if isinstance(item, str):
                units[pid] = {"skipped": item}
            else:
                requests.append(item)
                units[pid] = None
        answered = generator.generate(requests, cfg.sampling) if requests else []
        yield _finish(requests, answered, units, n)
