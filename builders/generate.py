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
model, backend, template, sampling parameters and system prompt); a rerun skips them, and the snapshot registered at the end is
the one an uninterrupted run registers.
"""

from __future__ import annotations

import hashlib
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
    parse_shard,
    validate_generate_config,
    validate_sampling,  # noqa: F401 - builders/pipeline.py imports it from here
)
from builders.conversation import effective, has_own_system, messages_of, resolve_system_prompt
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


def in_shard(prompt_id: str, shard: tuple[int, int] | None) -> bool:
    """A deterministic partition by prompt_id (its first 64 bits)."""
    return shard is None or int(prompt_id[:16], 16) % shard[1] == shard[0]


def prompt_seed(run_seed: int, prompt_id: str, num_responses: int) -> int:
    """The first of this prompt's `num_responses` consecutive seeds: a multiple of n below 2^62."""
    h = int.from_bytes(hashlib.sha256(f"{run_seed}:{prompt_id}".encode()).digest()[:8], "big")
    return (h % ((1 << 62) // num_responses)) * num_responses


def validate_generate(cfg: GenerateConfig) -> None:
    """Every option (builders/config.py), then what the executor needs of this machine (an unreachable address,
    replicas it cannot hold): all before any input is read or model loaded."""
    validate_generate_config(cfg)
    resolve_system_prompt(cfg.system_prompt)  # an @FILE that cannot be read
    from builders.backends.ray import check_generate_executor

    check_generate_executor(cfg)


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
    prompts: Snapshot,
    identity: dict[str, Any],
    backend: str,
    template_sha: str | None,
    sampling: SamplingConfig,
    system_prompt: str | None = None,
) -> str:
    """Everything that determines the responses (not the shard, batch size or machine). The system prompt is in
    the key only when there is one, so a run without keeps the key (and resumes the work) of earlier versions."""
    key = {
        "stage": "generate",
        "prompts": prompts.id,
        "model": identity,
        "backend": backend,
        "chat_template_sha256": template_sha,
        "sampling": asdict(sampling),
    }
    if system_prompt:
        key["system_prompt"] = system_prompt
    return hash_key(key)


def _template_sha(cfg: GenerateConfig, conversations: bool = False) -> str | None:
    """The chat template decides the rendered prompt, so it is part of the work key; read without loading weights.
    With `conversations` (a system prompt, or prompts that are conversations) it must render them: checked here,
    before any model loads."""
    if cfg.chat_template is not None:
        try:
            data = Path(cfg.chat_template).read_bytes()
        except OSError as e:
            raise InputError(f"chat_template {cfg.chat_template}: {e.strerror}", option="chat_template") from None
        if conversations and cfg.backend != "openai":
            from transformers import AutoTokenizer

            from builders.backends.transformers import check_template

            try:
                tok = AutoTokenizer.from_pretrained(cfg.model)
            except Exception as e:
                raise InputError(f"model {cfg.model!r}: cannot load its tokenizer ({one_line(e)})") from None
            tok.chat_template = data.decode("utf-8", "replace")
            check_template(tok, f"chat_template {cfg.chat_template}")
        return hashlib.sha256(data).hexdigest()
    if cfg.backend == "openai":
        return None  # the server applies its own template
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except Exception as e:
        raise InputError(f"model {cfg.model!r}: cannot load its tokenizer ({one_line(e)})") from None
    template = tokenizer.chat_template
    if not template:
        raise InputError(
            f"model {cfg.model!r}: its tokenizer has no chat template; give a chat_template file",
            option="chat_template",
        )
    if conversations:
        from builders.backends.transformers import check_template

        check_template(tokenizer, f"model {cfg.model!r}")
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
    system = resolve_system_prompt(cfg.system_prompt)
    conversations = bool(system) or any(_has_conversations(catalog, s) for s in sets.values())
    given = generator.describe().get("chat_template_sha256") if generator is not None else None
    template_sha = given or _template_sha(cfg, conversations)

    def splits() -> Iterator[SplitWork]:
        for split, prompts_snap in sets.items():  # one split's prompts in memory at a time
            key = work_key(prompts_snap, identity, cfg.backend, template_sha, cfg.sampling, system)
            prompts = catalog.read(prompts_snap.id)
            messages = messages_of(prompts)
            items = {
                pid: (pid, effective(text, conv, system))
                for pid, text, conv in zip(
                    prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist(), messages
                )
                if in_shard(pid, shard)
            }
            ids = prompts.column("prompt_id").to_pylist()
            # this run's prompts (its shard) whose own system message is kept instead of the system prompt
            own_system = (
                sum(has_own_system(m) for pid, m in zip(ids, messages) if in_shard(pid, shard)) if system else 0
            )

            def params(
                described: dict[str, Any],
                skipped: int,
                key: str = key,
                prompts_id: str = prompts_snap.id,
                own_system: int = own_system,
            ) -> dict[str, Any]:
                return {
                    **identity,
                    "backend": cfg.backend,
                    "sampling": asdict(cfg.sampling),
                    "seed_rule": "sha256(f'{seed}:{prompt_id}')[:8] mod floor(2^62/n), times n; responses use S..S+n-1",
                    "skipped_too_long": skipped,
                    "work_key": key,
                    "prompts": prompts_id,
                    # ranking and pairs read it here: they see the conversation the model was asked
                    # (prompts whose conversation has its own system message keep it, and are counted)
                    **({"system_prompt": system, "system_prompt_kept_own": own_system} if system else {}),
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


def _has_conversations(catalog: Catalog, prompts: Snapshot) -> bool:
    """Whether a prompt set holds a conversation (a non-null `messages`); reads that column only."""
    return any(b.column(0).null_count < b.num_rows for b in catalog.read_batches(prompts.id, columns=("messages",)))


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
