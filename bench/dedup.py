"""`prompts dedup` on a 64k-prompt pool: wall time, peak RSS, and how many of the planted near-duplicates it finds.

    OMP_NUM_THREADS=1 python bench/dedup.py [--prompts 64000] [--planted 4000] [--threshold 0.8]

The pool is synthesised from real UltraFeedback prompts (tests/data/ultrafeedback/*.jsonl and
data/ultrafeedback_sample.jsonl): each prompt is 3 sentences drawn from different real prompts (so two prompts
rarely share more than one sentence), and `--planted` of them are variants of another prompt of the pool: case
changed, whitespace and punctuation changed, a word added, or a word dropped. Prints the time of the import, of
dedup (the stage: read the pool, MinHash, LSH, verify, register) and of the grouping alone, the process's peak
RSS, the planted pairs found and the groups found beyond them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builders.catalog import Catalog  # noqa: E402
from builders.config import DedupConfig  # noqa: E402
from builders.dedup import dedup, near_duplicate_groups, shingles  # noqa: E402
from builders.prompts import import_prompts, prompt_id  # noqa: E402

SOURCES = [
    ROOT / "tests" / "data" / "ultrafeedback" / "eval200.jsonl",
    ROOT / "tests" / "data" / "ultrafeedback" / "activeuf10.jsonl",
    ROOT / "data" / "ultrafeedback_sample.jsonl",
]


def real_sentences() -> list[list[str]]:
    """The real prompts' sentences, per prompt (prompts of one sentence count once)."""
    seen, out = set(), []
    for path in SOURCES:
        for line in path.read_text().splitlines():
            text = json.loads(line)["prompt"].strip()
            if text in seen:
                continue
            seen.add(text)
            parts = [s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if len(s.strip()) > 15]
            if parts:
                out.append(parts)
    return out


def variant(text: str, rng: random.Random) -> str:
    kind = rng.randrange(4)
    words = text.split()
    if kind == 0:
        return text.upper() if rng.random() < 0.5 else text.lower()
    if kind == 1:
        return "  " + re.sub(r"[,.;:!?]", lambda m: rng.choice(["", " " + m.group(0), m.group(0) * 2]), text) + " "
    if kind == 2:
        words.insert(rng.randrange(len(words) + 1), rng.choice(["please", "briefly", "now", "again"]))
    elif len(words) > 12:
        del words[rng.randrange(len(words))]
    else:
        return text + "?"
    return " ".join(words)


def synthetic(n: int, planted: int, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """`n` prompts, `planted` of them variants of another one; and the planted (original, variant) pairs."""
    rng = random.Random(seed)
    sentences = real_sentences()
    flat = [(i, s) for i, parts in enumerate(sentences) for s in parts]
    prompts, seen = [], set()
    while len(prompts) < n - planted:
        picks = rng.sample(flat, 3)
        if len({i for i, _ in picks}) < 3:
            continue
        text = " ".join(s for _, s in picks)
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    pairs = []
    for original in rng.sample(prompts, planted):
        v = variant(original, rng)
        if v.strip() != original and v.strip() not in seen:
            seen.add(v.strip())
            prompts.append(v)
            pairs.append((original, v))
    rng.shuffle(prompts)
    return prompts, pairs


def rss_now() -> float:
    """This process's resident memory now, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64_000)
    ap.add_argument("--planted", type=int, default=4_000)
    ap.add_argument("--threshold", type=float, default=DedupConfig.threshold)
    args = ap.parse_args()
    prompts, pairs = synthetic(args.prompts, args.planted)
    work = Path(tempfile.mkdtemp())
    pool = work / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    catalog = Catalog(work / "catalog.duckdb")
    t0 = time.perf_counter()
    imported = import_prompts(catalog, str(pool)).snapshot
    t1 = time.perf_counter()
    before = rss_now()
    c1 = time.process_time()
    result = dedup(catalog, DedupConfig(threshold=args.threshold))
    cpu = time.process_time() - c1
    t2 = time.perf_counter()
    texts = catalog.read(imported.id).column("prompt").to_pylist()
    t3 = time.perf_counter()
    near_duplicate_groups(texts, DedupConfig(threshold=args.threshold))
    t4 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    group_of = {pid: gi for gi, g in enumerate(result.groups) for pid in g}
    found = sum(
        1
        for a, b in pairs
        if prompt_id(a) in group_of and group_of.get(prompt_id(a)) == group_of.get(prompt_id(b.strip()))
    )

    def jaccard(a: str, b: str) -> float:
        x, y = shingles(a), shingles(b)
        return len(x & y) / len(x | y)

    above = [(a, b) for a, b in pairs if jaccard(a, b) >= args.threshold]
    found_above = sum(1 for a, b in above if group_of.get(prompt_id(a), -1) == group_of.get(prompt_id(b.strip()), -2))
    planted_groups = {group_of[prompt_id(a)] for a, b in pairs if prompt_id(a) in group_of}
    print(
        f"{imported.rows} prompts ({len(pairs)} planted variants), threshold {args.threshold}: import {t1 - t0:.1f} s, "
        f"dedup stage {t2 - t1:.1f} s wall, {cpu:.1f} s CPU (grouping alone {t4 - t3:.1f} s), RSS {before:.0f} MiB before the stage, "
        f"peak {rss:.0f} MiB"
    )
    print(f"load average {os.getloadavg()[0]:.1f} (wall times suffer when other work shares the cores; CPU time less)")
    print(
        f"planted pairs found {found} / {len(pairs)} ({found_above} / {len(above)} of those at or above the "
        f"threshold by exact Jaccard: the rest are variants that change more shingles than it allows); "
        f"{len(result.groups)} groups, {result.removed} prompts removed; "
        f"groups beyond the planted ones: {len(set(range(len(result.groups))) - planted_groups)}"
    )


if __name__ == "__main__":
    main()
