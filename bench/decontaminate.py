"""Precision and recall of `prompts decontaminate` on a labelled set built from real benchmark prompts.

    python bench/decontaminate.py [--containment 0.75] [--coverage 0.45] [--show] [--scale 64000]

tests/data/decontamination/labelled.jsonl: 90 pool prompts, each labelled with the benchmark prompt it was made
from (MT-Bench and Vicuna-bench first turns, data/benchmarks/): `exact` (the same text with case, spacing or
punctuation changed, or a short wrapper around it) and `paraphrase` (numbers as words or digits, synonyms,
reordered clauses) are contaminated; `stock` (another question sharing a stock phrase with a benchmark prompt),
`near-topic` (the same task on another topic or other numbers) and `unrelated` (real UltraFeedback prompts) are not.
The pool is those prompts plus the 210 bundled UltraFeedback prompts (data/ultrafeedback_sample.jsonl), which set
the word weights as a real pool does and whose removals are printed (none is a benchmark prompt: each one removed
counts as a false positive). Prints recall per contaminated label, false positives per clean label, precision and
recall overall, the time, and the same figures for the usual one-off script (any shared word 8-gram, as open-r1's).
The thresholds were chosen on labelled.jsonl; holdout.jsonl (26 more prompts of the same kinds, written after
that) is measured the same way and was never tuned on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builders.catalog import Catalog  # noqa: E402
from builders.config import BUNDLED_PROMPTS, DecontaminateConfig  # noqa: E402
from builders.decontaminate import decontaminate  # noqa: E402
from builders.prompts import import_prompts, prompt_id  # noqa: E402
from builders.textnorm import words  # noqa: E402

LABELLED = ROOT / "tests" / "data" / "decontamination" / "labelled.jsonl"
HOLDOUT = ROOT / "tests" / "data" / "decontamination" / "holdout.jsonl"
BENCHMARKS = [ROOT / "data" / "benchmarks" / "mt_bench.jsonl", ROOT / "data" / "benchmarks" / "vicuna_bench.jsonl"]


def ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    """Word n-grams (the whole text when it is shorter)."""
    return {tuple(ws[i : i + n]) for i in range(max(len(ws) - n + 1, 1))} if ws else set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--containment", type=float, default=DecontaminateConfig.containment)
    ap.add_argument("--coverage", type=float, default=DecontaminateConfig.coverage)
    ap.add_argument("--show", action="store_true", help="print every miss and false positive")
    ap.add_argument("--scale", type=int, default=0, help="time a pool of this many synthetic prompts instead")
    args = ap.parse_args()
    cfg = DecontaminateConfig(args.containment, args.coverage)
    if args.scale:
        return scale(args.scale, cfg)
    for path, what in (
        (LABELLED, "the set the thresholds were chosen on"),
        (HOLDOUT, "held out: written after the thresholds were chosen, never tuned on"),
    ):
        print(f"== {path.name} ({what})")
        evaluate([json.loads(line) for line in path.read_text().splitlines() if line.strip()], cfg, args.show)


def scale(n: int, cfg: DecontaminateConfig) -> None:
    """Wall time and peak RSS of the stage on `n` prompts made of real UltraFeedback sentences (bench/dedup.py)."""
    import importlib.util
    import resource

    spec = importlib.util.spec_from_file_location("bench_dedup", Path(__file__).with_name("dedup.py"))
    dedup_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dedup_bench)
    prompts, _ = dedup_bench.synthetic(n, 0)
    work = Path(tempfile.mkdtemp())
    (work / "pool.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    catalog = Catalog(work / "catalog.duckdb")
    import_prompts(catalog, str(work / "pool.jsonl"))
    start, cpu = time.perf_counter(), time.process_time()
    result = decontaminate(catalog, [str(b) for b in BENCHMARKS], cfg, dry_run=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{result.pool.rows} prompts against {sum(b.rows for b in result.benchmarks)} benchmark prompts: "
        f"{seconds:.1f} s wall, {cpu:.1f} s CPU (load average {os.getloadavg()[0]:.1f}), peak RSS {rss:.0f} MiB, "
        f"{result.removed} matched"
    )


def evaluate(cases: list[dict], cfg: DecontaminateConfig, show: bool) -> None:
    work = Path(tempfile.mkdtemp())
    pool_file = work / "pool.jsonl"
    sample = [json.loads(line)["prompt"] for line in BUNDLED_PROMPTS.read_text().splitlines() if line.strip()]
    with pool_file.open("w") as f:
        for text in [c["prompt"] for c in cases] + sample:
            f.write(json.dumps({"prompt": text}) + "\n")
    catalog = Catalog(work / "catalog.duckdb")
    import_prompts(catalog, str(pool_file))
    start = time.perf_counter()
    result = decontaminate(catalog, [str(b) for b in BENCHMARKS], cfg, dry_run=True)
    seconds = time.perf_counter() - start
    removed = set(result.removed_ids)
    labelled_ids = {prompt_id(c["prompt"]) for c in cases}
    tp = fp = fn = 0
    per = Counter()
    total = Counter(c["label"] for c in cases)
    misses, false_pos = [], []
    for c in cases:
        hit = prompt_id(c["prompt"]) in removed
        per[c["label"]] += hit
        if c["contaminated"]:
            tp += hit
            fn += not hit
            if not hit:
                misses.append(c)
        else:
            fp += hit
            if hit:
                false_pos.append(c)
    background = [m for m in result.matches if m.prompt_id not in labelled_ids]
    fp_all = fp + len({m.prompt_id for m in background})
    print(
        f"pool {result.pool.rows} prompts ({len(cases)} labelled + {len(sample)} UltraFeedback), benchmarks "
        f"{', '.join(f'{Path(b.source).stem} ({b.rows})' for b in result.benchmarks)}; containment "
        f"{cfg.containment}, coverage {cfg.coverage}; {seconds:.2f} s"
    )
    for label in ("exact", "paraphrase"):
        print(f"  {label:<11} removed {per[label]:>3} / {total[label]:<3} (recall {per[label] / total[label]:.2f})")
    for label in ("stock", "near-topic", "unrelated"):
        print(f"  {label:<11} removed {per[label]:>3} / {total[label]:<3} (false positives)")
    print(f"  UltraFeedback sample: removed {len(background)} / {len(sample)} (false positives)")
    precision = tp / (tp + fp_all) if tp + fp_all else 1.0
    print(f"precision {precision:.3f}  recall {tp / (tp + fn):.3f}  (tp {tp}, fp {fp_all}, fn {fn})")
    # the usual one-off script, for comparison: any shared word 8-gram (open-r1's decontaminate.py), on the same
    # normal words (case and punctuation aside)
    grams = set()
    for b in result.benchmarks:
        for text in b.prompts:
            grams |= ngrams(words(text), 8)
    hit = {c["prompt"] for c in cases if ngrams(words(c["prompt"]), 8) & grams}
    bg = sum(1 for t in sample if ngrams(words(t), 8) & grams and prompt_id(t) not in labelled_ids)
    b_tp = sum(1 for c in cases if c["contaminated"] and c["prompt"] in hit)
    b_fp = sum(1 for c in cases if not c["contaminated"] and c["prompt"] in hit) + bg
    b_per = Counter(c["label"] for c in cases if c["prompt"] in hit)
    print(
        "baseline, any shared 8-gram: "
        + ", ".join(f"{label} {b_per[label]}/{total[label]}" for label in total)
        + f"; precision {b_tp / (b_tp + b_fp) if b_tp + b_fp else 1.0:.3f}  recall {b_tp / (tp + fn):.3f}"
    )
    if show:
        for c in misses:
            print(f"MISS [{c['label']}] {c['benchmark']}: {c['prompt'][:100]!r}")
        for c in false_pos:
            print(f"FALSE POSITIVE [{c['label']}] {c['benchmark']}: {c['prompt'][:100]!r}")
        for m in background:
            print(f"FALSE POSITIVE [uf] {m.prompt[:80]!r} ~ {m.benchmark_prompt[:80]!r}")


if __name__ == "__main__":
    main()
