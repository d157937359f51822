"""Generation benchmark: vLLM vs transformers, and the stage's overhead over bare vLLM (tiny generator, or --model).

    VLLM_CPU_KVCACHE_SPACE=1 python bench/generate.py [--prompts 200] [--responses 5] [--tokens 64]
    python bench/generate.py --model quickstart/models/smollm2 --prompts 24   # a real shape (SmolLM2-135M)

Prints, from one run: start-up seconds of each backend; tokens/s of the `generate` stage with the vllm backend vs
the transformers backend (goal >= 8x, start-up excluded); and the stage's wall time over a bare `LLM.generate` of
the same requests (same token ids, sampling params and seeds) on the same engine (goal <= 10% overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from builders.backends.transformers import TransformersGenerator  # noqa: E402
from builders.backends.vllm import VllmGenerator  # noqa: E402
from builders.catalog import Catalog  # noqa: E402
from builders.config import GenerateConfig, SamplingConfig, SplitConfig, VllmConfig  # noqa: E402
from builders.generate import generate, prompt_seed  # noqa: E402
from builders.prompts import import_prompts, split_prompts  # noqa: E402
from builders.tiny import build_tiny_models  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "ultrafeedback_sample.jsonl"


def fresh_catalog(root: Path, name: str, prompts: int) -> Catalog:
    catalog = Catalog(root / f"{name}.duckdb")
    import_prompts(catalog, str(SAMPLE))
    split_prompts(catalog, SplitConfig(iterations=1, train_size=prompts, test_size=0, seed=0))
    return catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--responses", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--model",
        default=None,
        help="a model folder instead of the tiny generator (e.g. the quickstart's quickstart/models/smollm2)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="iterdpo-genbench-"))
    model = Path(args.model) if args.model else build_tiny_models(root / "models").generator
    sampling = SamplingConfig(num_responses=args.responses, temperature=0.7, max_tokens=args.tokens, seed=1)
    base = GenerateConfig(model=str(model), splits=("train",), sampling=sampling)

    t0 = time.perf_counter()
    hf = TransformersGenerator(str(model), sampling)
    hf_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_run = generate(fresh_catalog(root, "hf", args.prompts), 1, base, progress=False, generator=hf)
    hf_wall = time.perf_counter() - t0
    hf_rate = hf_run.tokens / hf_wall

    # all prompts' sequences in one decoding batch (vLLM-CPU's default caps it at 256)
    vcfg = replace(
        base,
        backend="vllm",
        vllm=VllmConfig(enforce_eager=True, max_model_len=4096, max_num_seqs=args.prompts * args.responses),
    )
    t0 = time.perf_counter()
    engine = VllmGenerator(str(model), sampling, None, vcfg.vllm)
    vllm_start = time.perf_counter() - t0

    # bare LLM.generate of the very requests the stage sends (warm-up first, so both runs are warm)
    from vllm import SamplingParams

    catalog = fresh_catalog(root, "vllm", args.prompts)
    prompts = catalog.read(catalog.newest("prompts", 1, "train").id).to_pylist()
    requests = engine.prepare(
        [(p["prompt_id"], p["prompt"], prompt_seed(1, p["prompt_id"], args.responses)) for p in prompts]
    )
    requests = [r for r in requests if not isinstance(r, str)]
    params = [
        SamplingParams(n=args.responses, temperature=0.7, top_p=1.0, max_tokens=args.tokens, seed=r.seed)
        for r in requests
    ]
    engine.llm.generate([{"prompt_token_ids": r.token_ids} for r in requests[:8]], params[:8], use_tqdm=False)
    # alternate bare and stage runs (3 each, medians); each run starts from an empty prefix cache, and each stage
    # run from an empty catalog, so it really generates
    bare_walls, stage_walls, v_run, bare_tokens = [], [], None, 0
    for i in range(3):
        engine.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        bare_out = engine.llm.generate([{"prompt_token_ids": r.token_ids} for r in requests], params, use_tqdm=False)
        bare_walls.append(time.perf_counter() - t0)
        bare_tokens = sum(len(o.token_ids) for out in bare_out for o in out.outputs)
        engine.llm.reset_prefix_cache()
        run_catalog = catalog if i == 0 else fresh_catalog(root, f"vllm{i}", args.prompts)
        t0 = time.perf_counter()
        v_run = generate(run_catalog, 1, vcfg, progress=False, generator=engine)
        stage_walls.append(time.perf_counter() - t0)
    bare_wall, v_wall = sorted(bare_walls)[1], sorted(stage_walls)[1]
    v_rate = v_run.tokens / v_wall
    engine.close()

    n = args.prompts
    print(
        f"workload: {n} prompts x {args.responses} responses x <= {args.tokens} tokens, "
        f"{model.name if args.model else 'tiny Mistral'} on {os.cpu_count()} CPU cores "
        f"({len(requests)} prompts fit the context)"
    )
    print(f"start-up:      transformers {hf_start:6.2f} s   vllm {vllm_start:6.2f} s")
    print(f"transformers:  {hf_run.tokens:>7,} tokens in {hf_wall:7.2f} s = {hf_rate:9,.0f} tok/s")
    print(
        f"vllm (stage):  {v_run.tokens:>7,} tokens in {v_wall:7.2f} s = {v_rate:9,.0f} tok/s   "
        f"{v_rate / hf_rate:.1f}x transformers (goal >= 8x)"
    )
    print(
        f"bare LLM.generate: {bare_tokens:,} tokens in {bare_wall:.2f} s;  stage overhead "
        f"{100 * (v_wall - bare_wall) / bare_wall:+.1f}% (goal <= 10%)"
    )
    print(f"identical outputs: {v_run.tokens == bare_tokens}")


if __name__ == "__main__":
    main()
