"""The decontaminate stage: a prompt pool without the prompts that are (light paraphrases of) benchmark prompts.

Method (lexical; no embedding model can be had offline), `METHOD`:
1. Each prompt becomes its content words (builders/textnorm.py): lowercase, punctuation dropped, numbers written
   as words read as digits, stop words dropped, inflections stripped, common synonyms merged.
2. Each word weighs its inverse document frequency over the pool and the benchmarks together, so words most
   prompts share (instruction verbs, "explain your answer step by step", "could you provide a brief summary of")
   weigh little and topic words weigh much. A word that recurs across a benchmark's own prompts (its template) is
   weighed down too, by its document frequency inside the benchmarks.
3. A pool prompt matches a benchmark prompt when it holds at least `containment` of the benchmark prompt's weight
   (weighted containment: word order does not matter, so reordered clauses match) and the benchmark prompt accounts
   for at least `coverage` of the pool prompt's own weight (so a long prompt does not match a short question by
   holding its words by chance). Same normal text (case, spaces, punctuation aside) always matches.
Candidates come from an inverted index of the pool's words, read only for each benchmark prompt's rarest words
(prefix filtering), so the work grows with the benchmark, not with pool x benchmark.

What it misses: paraphrases that replace most topic words with others outside its synonym list, translations,
and a benchmark prompt buried in a long prompt (below `coverage`). Measured on a labelled set in bench/decontaminate.py
(figures in the README).

>>> import tempfile
>>> from pathlib import Path
>>> from builders.catalog import Catalog
>>> from builders.config import BUNDLED_PROMPTS, DecontaminateConfig
>>> from builders.prompts import import_prompts
>>> from builders.decontaminate import decontaminate
>>> catalog = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb")
>>> pool = import_prompts(catalog, str(BUNDLED_PROMPTS)).snapshot
>>> result = decontaminate(catalog, ["data/benchmarks/mt_bench.jsonl"], DecontaminateConfig())
>>> result.removed, result.snapshot.id == pool.id   # the bundled sample holds no MT-Bench prompt
(0, True)
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from builders.catalog import Catalog, Snapshot
from builders.config import DecontaminateConfig
from builders.errors import InputError
from builders.textnorm import content_words, normal_text

METHOD = "idf-weighted content-word containment (lexical), v1"
STAGE = "decontaminate"


@dataclass
class Benchmark:
    """A benchmark's prompts as read (stripped, empty ones skipped, duplicates once)."""

    source: str
    column: str
    ids: list[str]
    prompts: list[str]

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def sha256(self) -> str:
        """The content hash: sha256 of the sorted prompt ids, one a line (the same prompts in any file format or
        order give the same hash)."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "column": self.column, "rows": self.rows, "sha256": self.sha256}


@dataclass
class Match:
    prompt_id: str
    prompt: str
    benchmark: str  # the benchmark's source
    benchmark_prompt_id: str
    benchmark_prompt: str
    containment: float
    coverage: float

    def record(self, with_text: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["containment"] = round(self.containment, 4)
        out["coverage"] = round(self.coverage, 4)
        if not with_text:
            out.pop("prompt")
        return out


@dataclass
class DecontaminateResult:
    pool: Snapshot  # the pool it read
    snapshot: Snapshot | None  # the pool it registered (the same as `pool` when nothing matched; None: dry run)
    benchmarks: list[Benchmark]
    matches: list[Match]  # the best match of each removed prompt in each benchmark it matched
    config: DecontaminateConfig
    dry_run: bool = False
    removed_ids: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return len(self.removed_ids)

    def by_benchmark(self) -> dict[str, list[Match]]:
        out: dict[str, list[Match]] = {b.source: [] for b in self.benchmarks}
        for m in self.matches:
            out[m.benchmark].append(m)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot.to_json() if self.snapshot is not None else None,
            "pool": self.pool.id,
            "dry_run": self.dry_run,
            "method": METHOD,
            "thresholds": asdict(self.config),
            "pool_rows": self.pool.rows,
            "removed": self.removed,
            "benchmarks": [
                {**b.record(), "removed": [m.record() for m in self.by_benchmark()[b.source]]} for b in self.benchmarks
            ],
        }


# ------------------------------------------------------------------------------------------------------ matching
class Matcher:
    """Weighted containment of benchmark prompts in pool prompts (the module's docstring says how)."""

    def __init__(self, pool: Sequence[str], benchmarks: Sequence[Sequence[str]], cfg: DecontaminateConfig):
        self.cfg = cfg
        self.pool_words = [set(content_words(p)) for p in pool]
        self.pool_norm = [normal_text(p) for p in pool]
        self.bench_words = [[set(content_words(p)) for p in b] for b in benchmarks]
        self.bench_norm = [[normal_text(p) for p in b] for b in benchmarks]
        df: dict[str, int] = defaultdict(int)
        bench_df: dict[str, int] = defaultdict(int)
        for ws in self.pool_words:
            for w in ws:
                df[w] += 1
        for b in self.bench_words:
            for ws in b:
                for w in ws:
                    df[w] += 1
                    bench_df[w] += 1
        n = len(self.pool_words) + sum(len(b) for b in self.bench_words)
        # a word in k of the benchmark prompts is that benchmark's template when k > 2: weighed down by log k
        self.weight = {w: math.log(1 + n / d) / (1 + math.log(max(bench_df.get(w, 0), 2) / 2)) for w, d in df.items()}
        self.index: dict[str, list[int]] = defaultdict(list)
        for i, ws in enumerate(self.pool_words):
            for w in ws:
                self.index[w].append(i)
        self.by_norm: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(self.pool_norm):
            self.by_norm[t].append(i)

    def _mass(self, ws: set[str]) -> float:
        return sum(self.weight[w] for w in ws)

    def matches(self, b: int) -> dict[int, tuple[int, float, float]]:
        """Benchmark `b`'s matches: pool position -> (benchmark prompt position, containment, coverage), the best
        benchmark prompt for each pool prompt."""
        cfg, best = self.cfg, {}
        pool_mass = [None] * len(self.pool_words)
        for j, bws in enumerate(self.bench_words[b]):
            for i in self.by_norm.get(self.bench_norm[b][j], ()):
                best[i] = (j, 1.0, 1.0)
            bmass = self._mass(bws)
            if bmass == 0:
                continue
            need = cfg.containment * bmass
            # prefix filter: a pool prompt holding none of the heaviest (rarest) words, up to where the rest weigh
            # less than `need`, cannot reach it; so only the short posting lists of rare words are read
            heavy, rest, candidates = sorted(bws, key=lambda w: (-self.weight[w], w)), bmass, set()
            for w in heavy:
                if rest < need:
                    break
                candidates.update(self.index.get(w, ()))
                rest -= self.weight[w]
            for i in candidates:
                if i in best and best[i][1] == 1.0 and best[i][2] == 1.0:
                    continue
                inter = self._mass(bws & self.pool_words[i])
                if inter < need:
                    continue
                if pool_mass[i] is None:
                    pool_mass[i] = self._mass(self.pool_words[i])
                containment, coverage = inter / bmass, inter / pool_mass[i]
                if coverage >= cfg.coverage and (i not in best or containment > best[i][1]):
                    best[i] = (j, containment, coverage)
        return best


# -------------------------------------------------------------------------------------------------------- stage
def check_config(cfg: DecontaminateConfig) -> None:
    for name in ("containment", "coverage"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise InputError(f"{name} must be in (0, 1], not {value!r}", option=name)


def load_benchmark(source: str, column: str | None) -> Benchmark:
    """Read a benchmark as `prompts import` reads a source (file, folder, hub id[:split]); an empty one is an
    error (decontaminating against nothing would look like a clean result)."""
    from builders.prompts import prompts_table, read_source

    try:
        cols = read_source(source, column)
    except InputError as e:
        raise InputError(f"benchmark {e}", option=e.option) from None
    table, _empty, _dupes = prompts_table(cols)
    if table.num_rows == 0:
        raise InputError(f"benchmark {source}: no prompts in column {cols.column!r} (all empty or null)")
    return Benchmark(source, cols.column, table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist())


def pool_snapshot(catalog: Catalog, from_ref: str | None) -> Snapshot:
    if from_ref:
        snap = catalog.get(from_ref)
    else:
        snap = catalog.newest("prompts")
        if snap is None:
            raise InputError(
                f"no prompt pool in catalog {catalog.path}; import prompts first (iterdpo prompts import SOURCE)"
            )
    if snap.kind != "prompts":
        raise InputError(f"snapshot {snap.id[:12]} is a {snap.kind} snapshot, not a prompt pool")
    if snap.iteration is not None:
        raise InputError(
            f"snapshot {snap.id[:12]} is iteration {snap.iteration}'s {snap.split} prompt set, not a prompt pool"
        )
    return snap


def decontaminate(
    catalog: Catalog,
    against: Sequence[str],
    cfg: DecontaminateConfig = DecontaminateConfig(),
    column: str | None = None,
    from_ref: str | None = None,
    dry_run: bool = False,
) -> DecontaminateResult:
    """Remove from the pool (the newest, or `from_ref`) every prompt that matches a prompt of a benchmark in
    `against` (each read like `prompts import` reads a source, `column` naming the prompt column), and register
    what is left as a new pool whose parent is the pool it cleaned. Every input is checked before any work; a
    dry run registers nothing. Nothing matched: the pool is unchanged, and so is its id."""
    check_config(cfg)
    if not against:
        raise InputError("name at least one benchmark to check against", option="against")
    if len(set(against)) != len(against):
        raise InputError("a benchmark is named twice in against", option="against")
    pool_snap = pool_snapshot(catalog, from_ref)
    benchmarks = [load_benchmark(src, column) for src in against]
    pool = catalog.read(pool_snap.id)
    ids, texts = pool.column("prompt_id").to_pylist(), pool.column("prompt").to_pylist()
    matcher = Matcher(texts, [b.prompts for b in benchmarks], cfg)
    matches: list[Match] = []
    removed: set[str] = set()
    for bi, bench in enumerate(benchmarks):
        found = matcher.matches(bi)
        for i in sorted(found, key=lambda i: ids[i]):
            j, containment, coverage = found[i]
            matches.append(Match(ids[i], texts[i], bench.source, bench.ids[j], bench.prompts[j], containment, coverage))
            removed.add(ids[i])
    result = DecontaminateResult(pool_snap, None, benchmarks, matches, cfg, dry_run, sorted(removed))
    if dry_run:
        return result
    if not removed:
        result.snapshot = pool_snap
        return result
    keep = pc.invert(pc.is_in(pool.column("prompt_id"), value_set=pa.array(sorted(removed), pa.string())))
    params = {
        "stage": STAGE,
        "method": METHOD,
        "thresholds": asdict(cfg),
        "benchmarks": [b.record() for b in benchmarks],
        "pool_rows": pool.num_rows,
        "removed": len(removed),
        "removed_per_benchmark": {b.source: len(v) for b, v in zip(benchmarks, result.by_benchmark().values())},
        "removed_prompts": [m.record(with_text=False) for m in matches],
    }
    result.snapshot = catalog.register("prompts", pool.filter(keep), parents=[pool_snap.id], params=params)
    return result


def history(catalog: Catalog, pool: Snapshot) -> list[Snapshot]:
    """The pools a pool was derived from by decontaminate or dedup, oldest first, ending with `pool`; the first is
    the imported one (or a pool registered by hand)."""
    chain = [pool]
    while chain[-1].params.get("stage") in (STAGE, "dedup"):
        parent = catalog.parent(chain[-1], "prompts")
        if parent is None:
            break
        chain.append(parent)
    return chain[::-1]
