"""Peak memory of the read paths: `versions export`, `versions verify`, `build` and `publish --dry-run`.

    python bench/memory.py [--prompts 2000 20000] [--workdir DIR]

For each size, builds a synthetic catalog with the Python API (iteration 1, train: prompts of ~660 characters,
5 responses of ~1,500 characters each, one score per response), then runs each command in a fresh process and
prints its wall time and peak RSS. Goal (issue 16): peak RSS flat from 2k to 20k prompts, under 600 MB at 20k.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.catalog import english_text  # noqa: E402
from builders.catalog import Catalog  # noqa: E402

RESPONSES = 5


def build_catalog(path: Path, prompts: int, seed: int = 0, chunk: int = 2_000) -> None:
    """prompts -> generations -> scores snapshots of iteration 1 (train), registered batch by batch."""
    rng = np.random.default_rng(seed)
    text = english_text(rng, words=3_000_000)

    def strings(n: int, mean: int) -> list[str]:
        lengths = rng.integers(mean // 2, mean * 3 // 2, n)
        starts = rng.integers(0, len(text) - mean * 2, n)
        return [text[s : s + k] for s, k in zip(starts, lengths)]

    prompt_texts = [f"{i}: {s}" for i, s in enumerate(strings(prompts, 660))]  # distinct
    ids = [hashlib.sha256(p.encode()).hexdigest() for p in prompt_texts]
    # the stages work through prompts in canonical order, so their rows are stored in that order too
    ids, prompt_texts = map(list, zip(*sorted(zip(ids, prompt_texts))))
    cat = Catalog(path)
    p = cat.register(
        "prompts",
        pa.table({"prompt_id": ids, "prompt": prompt_texts, "source": ["bench"] * prompts}),
        iteration=1,
        split="train",
        params={"bench": True},
    )

    def generations():
        for start in range(0, prompts, chunk):
            part = ids[start : start + chunk]
            n = len(part) * RESPONSES
            yield pa.record_batch(
                {
                    "prompt_id": [pid for pid in part for _ in range(RESPONSES)],
                    "response_index": pa.array(list(range(RESPONSES)) * len(part), pa.int32()),
                    "response": strings(n, 1500),
                    "finish_reason": ["stop"] * n,
                    "prompt_tokens": pa.array(rng.integers(50, 300, n), pa.int32()),
                    "completion_tokens": pa.array(rng.integers(100, 600, n), pa.int32()),
                }
            )

    def scores():
        for start in range(0, prompts, chunk):
            part = ids[start : start + chunk]
            n = len(part) * RESPONSES
            yield pa.record_batch(
                {
                    "prompt_id": [pid for pid in part for _ in range(RESPONSES)],
                    "response_index": pa.array(list(range(RESPONSES)) * len(part), pa.int32()),
                    "score": rng.normal(size=n),
                }
            )

    g = cat.register(
        "generations", generations(), iteration=1, split="train", parents=[p.id], params={"model": "bench"}
    )
    cat.register("scores", scores(), iteration=1, split="train", parents=[g.id], params={"ranker": "bench"})


# each command in a fresh interpreter, so that its peak RSS is its own; in this order (verify checks the pairs too)
COMMANDS = {
    "export": "from builders.export import export_snapshot; "
    "export_snapshot(cat, 'generations:1:train', work / 'generations.parquet')",
    "export-jsonl": "from builders.export import export_snapshot; "
    "export_snapshot(cat, 'generations:1:train', work / 'generations.jsonl')",
    "build": "from builders.config import BuildConfig; from builders.pairs import build_pairs; "
    "print(build_pairs(cat, 1, BuildConfig()).splits[0].snapshot.id, file=sys.stderr)",
    "verify": "assert cat.verify()['ok']",
    "export-pairs": "from builders.export import export_snapshot; "
    "export_snapshot(cat, 'pairs:1:train', work / 'pairs.parquet')",
    "publish": "from builders.config import PublishConfig; from builders.publish import publish; "
    "import shutil; shutil.rmtree(work / 'staged', ignore_errors=True); "
    "publish(cat, PublishConfig('bench/memory', dry_run=True, local_dir=work / 'staged'))",
}

CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from builders.catalog import Catalog
work = Path({work!r}); cat = Catalog(work / 'catalog.duckdb')
t = time.perf_counter()
{code}
wall = time.perf_counter() - t
# VmHWM: this process's own peak (ru_maxrss would also count the parent's RSS at fork)
hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))
print(wall, int(hwm.split()[1]) / 1024)
"""


def run(work: Path, name: str) -> tuple[float, float]:
    code = CHILD.format(root=str(ROOT), work=str(work), code=COMMANDS[name])
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"},
    )
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr}")
    wall, rss = out.stdout.split()[-2:]
    return float(wall), float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[2_000, 20_000])
    ap.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    ap.add_argument("--workdir", type=Path, help="keep the catalogs here (reused when present)")
    args = ap.parse_args()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="iterdpo-memory-"))
    results = {}
    for n in args.prompts:
        work = base / f"p{n}"
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "catalog.duckdb").exists():
            t = time.perf_counter()
            build_catalog(work / "catalog.duckdb", n)
            print(
                f"{n} prompts: catalog built in {time.perf_counter() - t:.1f}s "
                f"({(work / 'catalog.duckdb').stat().st_size / 1e6:.0f} MB)",
                flush=True,
            )
        for name in args.commands:
            wall, rss = run(work, name)
            results.setdefault(name, {})[n] = (wall, rss)
            print(f"{n:>6} prompts  {name:<13} {wall:6.1f}s  peak RSS {rss:6.0f} MB", flush=True)
    print(
        json.dumps(
            {
                name: {str(n): {"seconds": round(w, 2), "peak_rss_mb": round(r)} for n, (w, r) in by.items()}
                for name, by in results.items()
            }
        )
    )


if __name__ == "__main__":
    main()
