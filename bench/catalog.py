"""Catalog benchmark: registering a large pairs table vs writing the same table to Parquet, and storage growth.

    python bench/catalog.py [--rows 100000] [--workdir DIR]

Prints: seconds to register vs pyarrow.parquet.write_table of the same table in the same run (goal <= 1.5x);
catalog bytes after registering once, again identically (goal ~0 new bytes), and with 1% of rows changed
(goal <= 2% growth); peak RSS (goal < 2 GB). The table is synthetic but shaped like the real thing: prompt ~660
characters, 5 responses of ~1,500 characters and 5 scores per row, in the published `pairs` schema.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builders.catalog import Catalog  # noqa: E402

SHARED = Path(__file__).resolve().parents[1] / "tests" / "data" / "ultrafeedback" / "eval200.jsonl"
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "ultrafeedback_sample.jsonl"


def english_text(rng: np.random.Generator, words: int = 6_000_000) -> str:
    """Words drawn with their frequencies in real UltraFeedback text: compresses like English, without the long
    repeats that slicing one small real corpus would create."""
    source = SHARED if SHARED.exists() else BUNDLED
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    corpus = " ".join(
        v for r in rows for v in (r.get("prompt"), r.get("chosen"), r.get("rejected")) if isinstance(v, str)
    )
    counts = Counter(corpus.split())
    vocab = list(counts)
    freq = np.array([counts[w] for w in vocab], dtype=np.float64)
    picks = rng.choice(len(vocab), size=words, p=freq / freq.sum())
    return " ".join(map(vocab.__getitem__, picks.tolist()))


def synthetic_pairs(rows: int, seed: int = 0, chunk: int = 10_000) -> pa.Table:
    """Distinct strings cut from that text at random offsets and lengths; built chunk by chunk to spare memory."""
    rng = np.random.default_rng(seed)
    text = english_text(rng)

    def strings(n: int, mean: int) -> list[str]:
        lengths = rng.integers(mean // 2, mean * 3 // 2, n)
        starts = rng.integers(0, len(text) - mean * 2, n)
        return [text[s : s + k] for s, k in zip(starts, lengths)]

    def part(first: int, n: int) -> pa.Table:
        prompts = strings(n, 660)
        responses = strings(n * 5, 1500)
        scores = rng.normal(size=(n, 5))
        best, worst = scores.argmax(1), scores.argmin(1)
        resp = [responses[i * 5 : i * 5 + 5] for i in range(n)]

        def conv(i: int, j: int) -> list[dict]:
            return [{"content": prompts[i], "role": "user"}, {"content": resp[i][j], "role": "assistant"}]

        return pa.table(
            {
                "prompt_id": [f"{first + i:064x}" for i in range(n)],
                "prompt": prompts,
                "chosen": [conv(i, best[i]) for i in range(n)],
                "rejected": [conv(i, worst[i]) for i in range(n)],
                "all_generated_responses": resp,
                "all_rm_scores": scores.tolist(),
                "score_chosen": scores.max(1),
                "score_rejected": scores.min(1),
            }
        )

    return pa.concat_tables([part(i, min(chunk, rows - i)) for i in range(0, rows, chunk)]).combine_chunks()


def change_fraction(table: pa.Table, fraction: float) -> pa.Table:
    n = max(1, int(table.num_rows * fraction))
    step = table.num_rows // n
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[::step] = True
    edited = pc.if_else(
        pa.array(mask), pc.binary_join_element_wise(table.column("prompt"), " (edited)", ""), table.column("prompt")
    )
    return table.set_column(table.schema.get_field_index("prompt"), "prompt", edited)


def register_streaming(parquet: Path, catalog_path: Path) -> None:
    """Child process: register a Parquet file batch by batch, as a user registering a large file would."""
    t0 = time.perf_counter()
    reader = pq.ParquetFile(parquet).iter_batches(batch_size=5_000)
    Catalog(catalog_path).register("pairs", reader, iteration=1, split="train")
    print(f"{time.perf_counter() - t0:.2f} {peak_rss_gb():.3f}")


def peak_rss_gb() -> float:
    """This process's peak RSS. VmHWM, not getrusage: ru_maxrss survives fork+exec, so a child would report its
    parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--stream-register", nargs=2, type=Path, metavar=("PARQUET", "CATALOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_register:
        register_streaming(*args.stream_register)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="iterdpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    table = synthetic_pairs(args.rows)
    print(
        f"table: {args.rows:,} rows, {table.nbytes / 2**30:.2f} GiB in Arrow, built in {time.perf_counter() - t0:.1f}s"
    )
    rss_table = peak_rss_gb()

    t0 = time.perf_counter()
    pq.write_table(table, work / "pairs.parquet")
    t_parquet = time.perf_counter() - t0

    catalog = Catalog(work / "catalog.duckdb")
    t0 = time.perf_counter()
    first = catalog.register("pairs", table, iteration=1, split="train")
    t_register = time.perf_counter() - t0
    size_once = catalog.path.stat().st_size

    t0 = time.perf_counter()
    again = catalog.register("pairs", table, iteration=1, split="train")
    t_again = time.perf_counter() - t0
    size_again = catalog.path.stat().st_size
    assert again.id == first.id

    changed = change_fraction(table, 0.01)
    t0 = time.perf_counter()
    catalog.register("pairs", changed, iteration=1, split="train")
    t_changed = time.perf_counter() - t0
    size_changed = catalog.path.stat().st_size

    parquet_bytes = (work / "pairs.parquet").stat().st_size
    # row groups of 5,000 rows, so that reading the file batch by batch does not decode it whole
    pq.write_table(table, work / "pairs-rg.parquet", row_group_size=5_000)
    child = subprocess.run(
        [sys.executable, __file__, "--stream-register", str(work / "pairs-rg.parquet"), str(work / "streamed.duckdb")],
        capture_output=True,
        text=True,
        check=True,
    )
    t_stream, rss_stream = map(float, child.stdout.split())
    print(f"parquet write_table:       {t_parquet:7.2f} s   ({parquet_bytes / 2**20:,.0f} MiB)")
    print(
        f"catalog register:          {t_register:7.2f} s   ratio vs parquet {t_register / t_parquet:.2f}x (goal <= 1.5x)"
    )
    print(f"register again (no-op):    {t_again:7.2f} s")
    print(f"register with 1% changed:  {t_changed:7.2f} s")
    print(f"catalog bytes once:        {size_once:,} ({size_once / parquet_bytes:.2f}x the parquet file)")
    print(f"  again, identical:        +{size_again - size_once:,} bytes (goal ~0)")
    print(
        f"  1% rows changed:         +{size_changed - size_again:,} bytes = "
        f"{100 * (size_changed - size_again) / size_again:.2f}% growth (goal <= 2%)"
    )
    print(
        f"streamed from Parquet:     {t_stream:7.2f} s   peak RSS {rss_stream:.2f} GiB (goal < 2), "
        f"a fresh process registering the file batch by batch"
    )
    print(f"this process peak RSS:     {peak_rss_gb():.2f} GiB, of which building the input table: {rss_table:.2f} GiB")
    if args.workdir is None:
        import shutil

        shutil.rmtree(work)


if __name__ == "__main__":
    main()
