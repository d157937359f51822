"""Commit benchmark: milliseconds per `Catalog.add_work` of a fixed batch as the catalog grows.

    python bench/commit.py [--sizes 0,2000,60000] [--repeats 7] [--workdir DIR]

The catalog grows as the recipe's does: per iteration of N prompts, a generation work key (5 responses of ~1,500
characters per prompt) and a scores work key, both registered as snapshots. At each size (total prompts over all
iterations so far; 60,000 = 3 iterations x 20,000), it times, median of --repeats:
  - add_work of a fresh generation batch (64 prompts x 5 responses) into the newest iteration's generation work;
  - add_work of a fresh scores batch (64 prompts x 5 scores) into the newest iteration's scores work;
  - replaying those generation batches (a no-op);
  - an empty transaction (open the file, check the schema, begin, commit, release it): the fixed per-call cost;
  - a bare duckdb.connect + close of the file: what opening a file for each transaction costs by itself (the
    catalog attaches it to one DuckDB instance per process instead).
Batches hold consecutive prompts in canonical (prompt_id) order, as stages commit them: the newest iteration's
stage is timed as it finishes its last prompts. The goal is that every figure stays flat from the empty catalog to the largest one.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.catalog import english_text  # noqa: E402
from builders.catalog import Catalog  # noqa: E402

RESPONSES = 5
BATCH = 64
GROW_BATCH = 2_000  # prompts per add_work while growing the catalog (growth itself is not timed)


class Rows:
    """Synthetic generation and score rows: distinct prompt ids, responses cut from English-like text."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.text = english_text(self.rng, words=2_000_000)
        self.next_prompt = 0

    def prompt_ids(self, n: int) -> list[str]:
        """A stage's prompt ids in the order stages commit them: canonical (sorted), as snapshots are read."""
        first, self.next_prompt = self.next_prompt, self.next_prompt + n
        return sorted(hashlib.sha256(str(i).encode()).hexdigest() for i in range(first, first + n))

    def generations(self, pids: list[str]) -> pa.Table:
        n = len(pids) * RESPONSES
        lengths = self.rng.integers(750, 2250, n)
        starts = self.rng.integers(0, len(self.text) - 2500, n)
        return pa.table(
            {
                "prompt_id": [p for p in pids for _ in range(RESPONSES)],
                "response_index": pa.array([i for _ in pids for i in range(RESPONSES)], pa.int32()),
                "response": [self.text[s : s + k] for s, k in zip(starts.tolist(), lengths.tolist())],
                "finish_reason": ["stop"] * n,
                "prompt_tokens": pa.array(self.rng.integers(50, 400, n), pa.int32()),
                "completion_tokens": pa.array(lengths // 4, pa.int32()),
            }
        )

    def scores(self, pids: list[str]) -> pa.Table:
        return pa.table(
            {
                "prompt_id": [p for p in pids for _ in range(RESPONSES)],
                "response_index": pa.array([i for _ in pids for i in range(RESPONSES)], pa.int32()),
                "score": self.rng.normal(size=len(pids) * RESPONSES),
            }
        )


def work_key(iteration: int, kind: str) -> str:
    return hashlib.sha256(f"bench {kind} {iteration}".encode()).hexdigest()


def grow(catalog: Catalog, rows: Rows, iteration: int, pids_all: list[str]) -> None:
    """One iteration of prompts: generation and scores work, each registered as a snapshot."""
    gen_key, score_key = work_key(iteration, "generations"), work_key(iteration, "scores")
    for at in range(0, len(pids_all), GROW_BATCH):
        pids = pids_all[at : at + GROW_BATCH]
        catalog.add_work(
            gen_key, "generations", rows.generations(pids), {p: None for p in pids}, iteration=iteration, split="train"
        )
        catalog.add_work(
            score_key, "scores", rows.scores(pids), {p: None for p in pids}, iteration=iteration, split="train"
        )
    for kind, key in (("generations", gen_key), ("scores", score_key)):
        catalog.register(kind, catalog.work_rows(key), iteration=iteration, split="train")


def ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(catalog: Catalog, rows: Rows, iteration: int, spare: list[str], repeats: int) -> dict[str, float]:
    """Time add_work of the next batches of the newest iteration's stage (`spare`: its prompts not committed yet)."""
    gen_key, score_key = work_key(iteration, "generations"), work_key(iteration, "scores")
    blocks = [spare[i * BATCH : (i + 1) * BATCH] for i in range(repeats)]
    gens = [rows.generations(pids) for pids in blocks]  # built outside the timed part

    def timed(key: str, kind: str, tables: list[pa.Table]) -> float:
        out = []
        for pids, table in zip(blocks, tables):
            t0 = time.perf_counter()
            catalog.add_work(key, kind, table, {p: None for p in pids}, iteration=iteration, split="train")
            out.append((time.perf_counter() - t0) * 1000)
        return statistics.median(out)

    gen_ms = timed(gen_key, "generations", gens)
    score_ms = timed(score_key, "scores", [rows.scores(pids) for pids in blocks])
    replay_ms = timed(gen_key, "generations", gens)

    def empty_transaction() -> None:
        with catalog.atomic():
            pass

    def bare_open() -> None:
        duckdb.connect(str(catalog.path)).close()

    return {
        "generations": gen_ms,
        "scores": score_ms,
        "replay": replay_ms,
        "transaction": ms(empty_transaction, repeats),
        "open_close": ms(bare_open, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="0,2000,60000",
        help="catalog sizes in prompts; above 20,000 they grow in iterations of 20,000",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="iterdpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(work / "commit.duckdb")
    rows = Rows()
    reserve = args.repeats * BATCH
    have, iteration = 0, 1
    spare = rows.prompt_ids(reserve)
    print(f"ms per call, median of {args.repeats}; batch = {BATCH} prompts x {RESPONSES} responses of ~1,500 chars")
    print(
        f"{'catalog prompts':>16} {'MiB':>6} {'add gens':>9} {'add scores':>11} {'replay':>7} "
        f"{'empty txn':>10} {'connect+close':>14} {'grow s':>7}"
    )
    for size in sizes:
        t0 = time.perf_counter()
        while have < size:
            # iterations of up to 20,000 prompts, as the recipe's (3 x 20k = 60k)
            step = min(size - have, 20_000)
            iteration += 1
            # the timed batches continue this iteration's stage: its last prompts in canonical order
            ids = rows.prompt_ids(step + reserve)
            grow(catalog, rows, iteration, ids[:step])
            spare = ids[step:]
            have += step
        grown = time.perf_counter() - t0
        r = measure(catalog, rows, iteration, spare, args.repeats)
        mib = catalog.path.stat().st_size / 2**20 if catalog.exists() else 0.0
        print(
            f"{have:>16,} {mib:>6.0f} {r['generations']:>9.1f} {r['scores']:>11.1f} {r['replay']:>7.1f} "
            f"{r['transaction']:>10.1f} {r['open_close']:>14.1f} {grown:>7.1f}",
            flush=True,
        )
    if args.workdir is None:
        import shutil

        shutil.rmtree(work)


if __name__ == "__main__":
    main()
