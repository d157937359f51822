"""Ranking benchmark on the tiny PairRM: native `pairrm` vs llm-blender, with real UltraFeedback lengths.

    python bench/rank.py [--prompts 200] [--n 5] [--n16-prompts 20] [--blender-batches 1,2,4,8]

For N = 5 (and N = 16 on fewer prompts): prompts/s of `pairrm` vs llm-blender at one prompt per batch (whose
scores it must equal within 1e-5) and vs llm-blender at its fastest batch size (goal >= 3x both), and the
forward passes per prompt (N(N-1) for both). Prompts and candidates are real UltraFeedback texts from
tests/data/ultrafeedback (prompts ~660 characters, responses ~1,500), so the truncation limits are hit as in
production. Throughput depends on shapes, not trained weights; on a GPU set --device cuda.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from builders.backends.llm_blender import LlmBlender  # noqa: E402
from builders.backends.pairrm import PairRM  # noqa: E402
from builders.tiny import build_tiny_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "tests" / "data" / "ultrafeedback"  # real UltraFeedback rows (MIT; README there)


def workload(prompts: int, n: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rows = [json.loads(line) for f in ("eval200.jsonl", "activeuf10.jsonl") for line in (SHARED / f).open()]
    responses = [r[k] for r in rows for k in ("chosen", "rejected") if isinstance(r.get(k), str)]
    rng = random.Random(seed)
    texts = [rows[i % len(rows)]["prompt"] for i in range(prompts)]
    return texts, [rng.sample(responses, n) for _ in texts]


def timed(fn, *args) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def compare(ranker_dir: Path, prompts: list[str], cands: list[list[str]], batches: list[int], device: str) -> None:
    n = len(cands[0])
    native = PairRM(str(ranker_dir), device=device)
    native.score(prompts[:1], cands[:1])  # warm-up: each method is timed after one untimed prompt
    native.passes = 0
    t_native, s_native = timed(native.score, prompts, cands)
    passes = native.passes / len(prompts)
    results = {}
    for bs in batches:
        blender = LlmBlender(str(ranker_dir), device=device, batch_size=bs)
        blender.score(prompts[:1], cands[:1])
        results[bs] = timed(blender.score, prompts, cands)
    diff = max(abs(a - b) for x, y in zip(s_native, results[1][1]) for a, b in zip(x, y))
    fastest = min(results, key=lambda b: results[b][0])
    rate = len(prompts) / t_native
    print(f"N={n}: {len(prompts)} prompts, {passes:.0f} forward passes per prompt (N(N-1) = {n * (n - 1)})")
    print(f"  pairrm (native, batched):      {t_native:8.2f} s  {rate:7.2f} prompts/s")
    for bs, (t, _) in sorted(results.items()):
        print(
            f"  llm-blender batch_size={bs:<3}      {t:8.2f} s  {len(prompts) / t:7.2f} prompts/s  "
            f"pairrm is {t / t_native:.2f}x"
        )
    print(
        f"  vs llm-blender at one prompt per batch: {results[1][0] / t_native:.2f}x (goal >= 3x), "
        f"max |score difference| {diff:.2e} (must be <= 1e-5)"
    )
    print(f"  vs llm-blender at its fastest batch size ({fastest}): {results[fastest][0] / t_native:.2f}x (goal >= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--n16-prompts", type=int, default=20)
    parser.add_argument("--blender-batches", default="1,2,4,8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ranker", type=Path, default=None, help="A PairRM folder (default: build the tiny one).")
    args = parser.parse_args()
    ranker = args.ranker or build_tiny_models(Path(tempfile.mkdtemp(prefix="iterdpo-rankbench-"))).ranker
    batches = [int(b) for b in args.blender_batches.split(",")]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, ranker {ranker}")
    compare(ranker, *workload(args.prompts, args.n), batches, args.device)
    if args.n16_prompts:
        compare(ranker, *workload(args.n16_prompts, 16, seed=1), batches, args.device)


if __name__ == "__main__":
    main()
