"""The stage kernel: what every resumable stage does around its model work, written once.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import pyarrow as pa
    >>> from builders.catalog import Catalog
    >>> from builders.stage import Finished, Producer, SplitWork, StageSpec, hash_key, resolve_inputs, run_stage
    >>> catalog = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb")
    >>> _ = catalog.register("prompts", pa.table({"prompt_id": ["a" * 64], "prompt": ["Hi"], "source": [None]}),
    ...                      iteration=1, split="train")
    >>> inputs = resolve_inputs(catalog, "prompts", 1, ("train",))
    >>> class Echo:  # a backend: describe() goes into the params, close() is called at the end
    ...     def describe(self): return {"backend": "echo"}
    ...     def close(self): pass
    >>> def run(backend, items):  # work items -> Finished units with their rows
    ...     rows = [{"prompt_id": pid, "response_index": 0, "response": text.upper(), "finish_reason": "stop",
    ...              "prompt_tokens": 1, "completion_tokens": 1} for pid, text in items]
    ...     yield Finished({pid: None for pid, _ in items}, pa.Table.from_pylist(rows), tokens=len(rows))
    >>> spec = StageSpec("generate", "generations", 1, "generator", Producer(Echo, run), commit_seconds=5.0)
    >>> prompts = catalog.read(inputs["train"].id).to_pylist()
    >>> work = SplitWork("train", hash_key({"prompts": inputs["train"].id, "backend": "echo"}),
    ...                  {r["prompt_id"]: (r["prompt_id"], r["prompt"]) for r in prompts}, [inputs["train"].id],
    ...                  lambda described, skipped: {**described, "skipped": skipped})
    >>> result = run_stage(catalog, spec, [work], progress=False)
    >>> split = result.splits[0]
    >>> split.processed, split.snapshot.kind, split.snapshot.params["backend"]
    (1, 'generations', 'echo')
    >>> catalog.read(split.snapshot.id).column("response").to_pylist()
    ['HI']

A stage is a spec: what it makes (`kind`), the `Producer` of its model work (its backend, built only once a split
has work left, and the function that turns work items into `Finished` rows; the executor decides where that runs,
see builders/backends/ray.py:producer) and, per split, the work key, the work items and how the snapshot's params
read. `run_stage` does the rest for every stage: the units the work area lacks, `run_resumable`, the registration
with the backend's description, closing a backend it built, and the executor's statistics.

`run_resumable` commits what the producer finishes to the catalog's work area by time (`commit_seconds`) rather
than per batch, so a fast scorer is not slowed by one DuckDB transaction per 64 prompts and a slow model loses at
most a few seconds of work to a kill -9. A backend that keeps requests in flight (openai) keeps them in flight
while the kernel commits.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from builders.catalog import Catalog, Snapshot
from builders.errors import InputError

# Each input kind, and the stage that makes it (named in the error when an iteration has none).
LABELS = {"prompts": "prompt sets", "generations": "generations", "scores": "scores", "pairs": "pairs"}
MAKERS = {
    "prompts": ("split prompts", "prompts split"),
    "generations": ("generate", "generate --iteration {n}"),
    "scores": ("rank", "rank --iteration {n}"),
    "pairs": ("build pairs", "build --iteration {n}"),
}


def _make_first(kind: str, iteration: int) -> str:
    verb, command = MAKERS[kind]
    return f"{verb} first (iterdpo {command.format(n=iteration)})"


def resolve_inputs(
    catalog: Catalog,
    kind: str,
    iteration: int,
    splits: Sequence[str],
    from_refs: Sequence[str] = (),
    require_train: bool = False,
) -> dict[str, Snapshot]:
    """A stage's input snapshots per split: those named in `from_refs` (checked), else the newest complete one
    of `kind` for each split of `iteration`."""
    if from_refs:
        chosen = {}
        for ref in from_refs:
            snap = catalog.get(ref)
            if snap.kind != kind or snap.iteration != iteration or snap.split is None:
                raise InputError(
                    f"input {ref}: a {kind} snapshot of iteration {iteration} is needed, not "
                    f"{snap.kind} (iteration {snap.iteration}, split {snap.split})",
                    option="from_refs",
                )
            chosen[snap.split] = snap
        return chosen
    found = {s: snap for s in splits if (snap := catalog.newest(kind, iteration, s)) is not None}
    if not found:
        raise InputError(
            f"iteration {iteration} has no {LABELS[kind]} in catalog {catalog.path}; {_make_first(kind, iteration)}"
        )
    if require_train and "train" in splits and "train" not in found:
        raise InputError(f"iteration {iteration} has no train {LABELS[kind]}; {_make_first(kind, iteration)}")
    return found


def hash_key(spec: Mapping[str, Any]) -> str:
    """Everything that determines a stage's rows (never the batch size, shard or machine), hashed."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Finished:
    """Units a producer completed: `units` maps each to None or its info (e.g. {"skipped": "too_long"});
    `rows` holds their rows; `tokens` counts generated tokens (progress and summary)."""

    units: dict[str, Any]
    rows: pa.Table
    tokens: int = 0


@dataclass(frozen=True)
class WorkArea:
    """One split's work area in the catalog."""

    key: str
    kind: str
    iteration: int
    split: str
    params: Mapping[str, Any] = field(default_factory=dict)  # recorded when the work begins (e.g. the backend)


@dataclass
class SplitResult:
    """A stage's work on one split."""

    split: str
    prompts: int  # units of this split (of this shard)
    processed: int = 0  # done in this run (the rest were done before)
    skipped: int = 0  # too long for the model's context
    drops: dict[str, int] = field(default_factory=dict)  # build: prompts dropped, by reason
    snapshot: Snapshot | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "prompts": self.prompts,
            "processed": self.processed,
            "skipped": self.skipped,
            "drops": self.drops,
            "snapshot": self.snapshot.to_json() if self.snapshot else None,
        }


@dataclass
class StageResult:
    """What generate, rank and build return (and `--json` prints)."""

    stage: str
    iteration: int
    splits: list[SplitResult] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0  # generate: completion tokens produced in this run
    executor: dict[str, Any] | None = None  # the ray executor: replicas, nodes, the work split, start-up seconds

    @property
    def snapshots(self) -> list[Snapshot]:
        return [s.snapshot for s in self.splits if s.snapshot]

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "iteration": self.iteration,
            "seconds": round(self.seconds, 2),
            "tokens": self.tokens,
            "splits": [s.to_json() for s in self.splits],
            **({"executor": self.executor} if self.executor else {}),
        }


def run_resumable(
    catalog: Catalog,
    work: WorkArea,
    todo: Sequence[str],
    produce: Callable[[Sequence[str]], Iterable[Finished]],
    *,
    commit_seconds: float,
    progress: bool,
    desc: str,
) -> tuple[int, int]:
    """Run `produce` over the units not yet done and commit what it finishes, at most every `commit_seconds`
    (0: every item) and at the end. Returns (units finished, tokens). What was committed survives any kill."""
    bar = progress_bar(len(todo), desc, progress)
    pending: list[Finished] = []
    finished = tokens = 0
    last = time.perf_counter()

    def commit() -> None:
        nonlocal last
        if pending:
            units = {u: info for item in pending for u, info in item.units.items()}
            rows = pa.concat_tables([item.rows for item in pending])
            catalog.add_work(
                work.key, work.kind, rows, units, iteration=work.iteration, split=work.split, params=work.params
            )
            pending.clear()
        last = time.perf_counter()

    failed_commit = False
    try:
        for item in counted(produce(todo), bar):
            pending.append(item)
            finished += len(item.units)
            tokens += item.tokens
            if time.perf_counter() - last >= commit_seconds:
                failed_commit = True
                commit()
                failed_commit = False
    finally:
        try:
            if not failed_commit:
                commit()  # what was finished is kept, also when the producer failed or the user pressed Ctrl-C
        finally:
            bar.close()
    return finished, tokens


def progress_bar(total: int, desc: str, progress: bool):
    """The stages' progress bar on stderr: prompts done, prompts/s (and tok/s, see `counted`)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc=desc, disable=not progress, mininterval=1.0, dynamic_ncols=True)


def counted(items: Iterable[Finished], bar) -> Iterator[Finished]:
    """`items` as they come, each counted on `bar` (with tok/s once they carry generated tokens)."""
    tokens, t0 = 0, time.perf_counter()
    for item in items:
        tokens += item.tokens
        bar.update(len(item.units))
        if tokens:
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
        yield item


@dataclass(frozen=True)
class Producer:
    """A stage's model work, wherever it runs: `build()` makes the backend, `run(backend, items)` yields the
    `Finished` units of those work items (self-contained, so an executor can ship them), `stats(backend)` says how
    it ran (the ray executor's replicas and work split; None locally)."""

    build: Callable[[], Any]
    run: Callable[[Any, Sequence[Any]], Iterable[Finished]]
    stats: Callable[[Any], dict[str, Any] | None] = lambda backend: None


@dataclass(frozen=True)
class StageSpec:
    """What a stage makes and how: `role` names the backend's description in the work area's params."""

    stage: str  # generate, rank
    kind: str  # the snapshot kind it registers
    iteration: int
    role: str  # generator, ranker
    producer: Producer
    commit_seconds: float


@dataclass
class SplitWork:
    """One split's work: every unit (this shard's, in the snapshot's order) with the item the producer needs, the
    snapshot's parents, and its params given the backend's description and the units skipped (too long)."""

    split: str
    key: str
    items: dict[str, Any]
    parents: list[str]
    params: Callable[[dict[str, Any], int], dict[str, Any]]
    work_params: dict[str, Any] = field(default_factory=dict)  # recorded beside the description when work begins
    shard: str | None = None  # "K/N": the snapshot is one part of the stage's output (Snapshot.shard)


def run_stage(
    catalog: Catalog, spec: StageSpec, splits: Iterable[SplitWork], *, progress: bool = True, backend: Any = None
) -> StageResult:
    """Each split's missing units through `spec.producer`, committed as they finish, then its snapshot registered.
    The backend is built at the first split with work left (a rerun with nothing to do loads no model) and closed
    at the end unless the caller passed it; a split with no work left takes the description its work recorded."""
    result = StageResult(spec.stage, spec.iteration)
    start = time.perf_counter()
    owned = backend is None
    try:
        for sw in splits:
            done = catalog.work_units(sw.key)
            todo = [u for u in sw.items if u not in done]
            split_result = SplitResult(sw.split, len(sw.items))
            if todo and backend is None:
                backend = spec.producer.build()
            described = backend.describe() if backend is not None else None
            work = WorkArea(sw.key, spec.kind, spec.iteration, sw.split, {spec.role: described or {}, **sw.work_params})
            if todo:
                split_result.processed, tokens = run_resumable(
                    catalog,
                    work,
                    todo,
                    lambda units, items=sw.items, use=backend: spec.producer.run(use, [items[u] for u in units]),
                    commit_seconds=spec.commit_seconds,
                    progress=progress,
                    desc=f"{spec.stage} it{spec.iteration} {sw.split}",
                )
                result.tokens += tokens
            done = catalog.work_units(sw.key)
            split_result.skipped = sum(1 for u in sw.items if (done.get(u) or {}).get("skipped"))
            if described is None:
                described = catalog.work_params(sw.key).get(spec.role, {})
            split_result.snapshot = register_work(
                catalog, work, list(sw.items), sw.parents, sw.params(described, split_result.skipped), shard=sw.shard
            )
            result.splits.append(split_result)
    finally:
        if owned and backend is not None:
            backend.close()
    result.seconds = time.perf_counter() - start
    result.executor = spec.producer.stats(backend) if backend is not None else None
    return result


def register_work(
    catalog: Catalog,
    work: WorkArea,
    units: Sequence[str],
    parents: Sequence[str],
    params: Mapping[str, Any],
    shard: str | None = None,
) -> Snapshot:
    """The snapshot of a finished work area: its rows for `units` (all of them: this shard's), registered."""
    return catalog.register(
        work.kind,
        catalog.work_rows(work.key, units=units),
        iteration=work.iteration,
        split=work.split,
        parents=list(parents),
        params=dict(params),
        shard=shard,
    )


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
