"""Combining scores: several scorers' scores of the same responses -> one score per response.

    >>> combine_scores(["p", "p", "p"], [[1.0, 2.0, 3.0], [30.0, 10.0, 20.0]], [1.0, 1.0], method="rank")
    [2.0, 1.5, 2.5]

`combine_scores` is pure (lists in, a list out), so `reward eval` can score a combination without a catalog.
Methods (higher combined score = better, as for every ranker):
- `zscore` (default): each component standardised over all the responses it scored (mean 0, population standard
  deviation 1; a constant component contributes 0 everywhere), then the weighted sum. Scales and offsets of the
  scorers cancel, so a weight says how much an axis counts.
- `rank`: per prompt, each component's rank of the response among that prompt's responses that every component
  scored (1 = lowest score, ties take their average rank), then the weighted mean sum(w*r) / sum(|w|) (a negative
  weight turns an axis round). Only the order within a prompt counts, never the size of a gap.
- `weighted-sum`: sum(w*score) of the raw scores: for scorers already on one scale.
A response that some component did not score gets None (unscored): `build` then treats it as missing.

The stage, `combine(catalog, iteration, CombineConfig(scores=("REF=WEIGHT", ...)))` (`iterdpo combine`), reads
scores snapshots of the same generations and registers one combined `scores` snapshot per split; its parents are
the generations and the components, its params the method, the weights and each component's ranker:

    >>> import tempfile
    >>> from pathlib import Path
    >>> import pyarrow as pa
    >>> from builders.catalog import Catalog
    >>> from builders.config import CombineConfig, RankConfig
    >>> from builders.prompts import prompt_id
    >>> from builders.rank import rank
    >>> catalog = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb")
    >>> pid = prompt_id("Name a colour.")
    >>> prompts = catalog.register("prompts", pa.table({"prompt_id": [pid], "prompt": ["Name a colour."],
    ...                                                 "source": [None]}), iteration=1, split="train")
    >>> answers = ["Blue.", "Red is a colour.", "I am not sure"]
    >>> _ = catalog.register("generations", pa.Table.from_pylist(
    ...     [{"prompt_id": pid, "response_index": i, "response": a, "finish_reason": "stop", "prompt_tokens": 4,
    ...       "completion_tokens": 3} for i, a in enumerate(answers)]), iteration=1, split="train", parents=[prompts.id])
    >>> axes = [rank(catalog, 1, RankConfig(ranker="python", ranker_model=f"builders.rewards:{f}", splits=("train",)),
    ...              progress=False).snapshots[0] for f in ("complete_concise_answer", "distinct_trigrams")]
    >>> cfg = CombineConfig(scores=(f"{axes[0].id}=1", f"{axes[1].id}=0.5"), method="rank", splits=("train",))
    >>> combined = combine(catalog, 1, cfg).snapshots[0]
    >>> combined.parents[1:] == [a.id for a in axes], combined.params["weights"]
    (True, [1.0, 0.5])
    >>> [round(r["score"], 3) for r in catalog.read(combined.id).to_pylist()]  # ranks 2, 3, 1 and a tie (2, 2, 2)
    [2.0, 2.667, 1.333]
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from builders.catalog import Catalog, Registration, Snapshot
from builders.config import COMBINE_METHODS as METHODS
from builders.config import CombineConfig, check_splits
from builders.errors import InputError
from builders.stage import SplitResult, StageResult


def combine_scores(
    prompt_ids: Sequence[str],
    components: Sequence[Sequence[float | None]],
    weights: Sequence[float],
    method: str = "zscore",
) -> list[float | None]:
    """The combined score of each response i: components[k][i] is component k's score of response i (None when
    it scored none), prompt_ids[i] the prompt of response i, weights[k] component k's weight."""
    check_combination(len(prompt_ids), components, weights, method)
    n = len(prompt_ids)
    complete = [i for i in range(n) if all(c[i] is not None for c in components)]
    out: list[float | None] = [None] * n
    if method == "weighted-sum":
        for i in complete:
            out[i] = math.fsum(w * c[i] for w, c in zip(weights, components))
    elif method == "zscore":
        standard = [_standardised(c) for c in components]
        for i in complete:
            out[i] = math.fsum(w * z[i] for w, z in zip(weights, standard))
    else:
        by_prompt: dict[str, list[int]] = {}
        for i in complete:
            by_prompt.setdefault(prompt_ids[i], []).append(i)
        total = math.fsum(abs(w) for w in weights)
        ranks: dict[int, float] = {i: 0.0 for i in complete}
        for members in by_prompt.values():
            for w, c in zip(weights, components):
                for i, r in zip(members, _ranks([c[i] for i in members])):
                    ranks[i] += w * r
        for i in complete:
            out[i] = ranks[i] / total
    return out


def check_combination(
    n: int, components: Sequence[Sequence[float | None]], weights: Sequence[float], method: str
) -> None:
    """Everything `combine_scores` needs of its arguments, checked before any number is computed."""
    if method not in METHODS:
        raise InputError(f"method {method!r} is not a combine method; use one of {', '.join(METHODS)}", option="method")
    if not components:
        raise InputError("combine needs at least one component", option="scores")
    if len(weights) != len(components):
        raise InputError(f"{len(weights)} weights for {len(components)} components", option="scores")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InputError(f"a weight must be a finite number, not {w!r}", option="scores")
    if not any(w != 0 for w in weights):
        raise InputError("every weight is 0: at least one component must count", option="scores")
    for k, c in enumerate(components):
        if len(c) != n:
            raise InputError(f"component {k + 1} has {len(c)} scores for {n} responses", option="scores")
        for s in c:
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
                raise InputError(f"component {k + 1} holds a non-finite score ({s!r})", option="scores")


def _standardised(scores: Sequence[float | None]) -> list[float | None]:
    """(s - mean) / population sd over the scored entries; 0 for every entry of a constant component."""
    values = [s for s in scores if s is not None]
    if not values or max(values) == min(values):  # compared exactly: a rounded sd of a constant is not 0
        return [None if s is None else 0.0 for s in scores]
    mean = math.fsum(values) / len(values)
    sd = math.sqrt(math.fsum((s - mean) ** 2 for s in values) / len(values))
    return [None if s is None else (s - mean) / sd for s in scores]


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, 1 = the lowest value; tied values share their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


# ------------------------------------------------------------------------------------------------------- the stage
# params of a scores snapshot that differ between the splits of one ranking (its inputs and counts): the rest says
# which ranker made it, and is how the other split's snapshot of a component is found
PER_SPLIT = ("generations", "work_key", "shard", "components", "responses", "unscored")


@dataclass(frozen=True)
class Component:
    """One axis: a reference to a scores snapshot (id, prefix, tag or selector) and its weight."""

    ref: str
    weight: float


def parse_component(text: str) -> Component:
    """SELECTOR_OR_ID=WEIGHT -> Component (the last `=` splits: a tag may hold one)."""
    ref, sep, weight = str(text).rpartition("=")
    if not sep or not ref.strip():
        raise InputError(f"scores {text!r}: give SELECTOR_OR_ID=WEIGHT, e.g. scores:1:train=1", option="scores")
    try:
        value = float(weight)
    except ValueError:
        raise InputError(f"scores {text!r}: the weight {weight!r} is not a number", option="scores") from None
    if not math.isfinite(value):
        raise InputError(f"scores {text!r}: the weight must be a finite number", option="scores")
    return Component(ref.strip(), value)


def ranker_signature(params: Mapping[str, Any]) -> dict[str, Any]:
    """What of a scores snapshot's params names the ranker (not the split's inputs or counts)."""
    return {k: v for k, v in params.items() if k not in PER_SPLIT}


def ranker_summary(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ranker of a scores snapshot as its params say (kind, model or function, identity): what a combined
    snapshot records of each component, and what build copies into the pairs' lineage."""
    return {k: v for k, v in params.items() if k.startswith("ranker") or k in ("function", "method", "weights")}


def validate_combine(cfg: CombineConfig) -> list[Component]:
    """Every option, checked before any snapshot is read."""
    if cfg.method not in METHODS:
        raise InputError(
            f"method {cfg.method!r} is not a combine method; use one of {', '.join(METHODS)}", option="method"
        )
    check_splits(cfg.splits)
    if not cfg.scores:
        raise InputError("scores: name at least one scores snapshot to combine, as SELECTOR_OR_ID=WEIGHT")
    components = [parse_component(c) for c in cfg.scores]
    if not any(c.weight != 0 for c in components):
        raise InputError("scores: every weight is 0; at least one axis must count", option="scores")
    return components


def resolve_components(
    catalog: Catalog, iteration: int, components: Sequence[Component], splits: Sequence[str]
) -> dict[str, list[Snapshot]]:
    """Each split's component snapshots, in the order given: a reference names one snapshot; the other split's is
    the newest complete scores snapshot of that split made by the same ranker (same params but inputs and counts)."""
    named: list[Snapshot] = []
    for c in components:
        snap = catalog.get(c.ref)
        if snap.kind != "scores" or snap.iteration != iteration or snap.split is None or snap.shard is not None:
            raise InputError(
                f"scores {c.ref}: a complete scores snapshot of iteration {iteration} is needed, not {snap.kind} "
                f"{snap.id[:12]} (iteration {snap.iteration}, split {snap.split}"
                + (f", shard {snap.shard})" if snap.shard else ")"),
                option="scores",
            )
        named.append(snap)
    out: dict[str, list[Snapshot]] = {}
    for split in splits:
        found = []
        for c, snap in zip(components, named):
            if snap.split != split:
                signature = ranker_signature(snap.params)
                match = next(
                    (
                        s
                        for s in reversed(catalog.list(kind="scores", iteration=iteration, split=split))
                        if s.shard is None and ranker_signature(s.params) == signature
                    ),
                    None,
                )
                if match is None:
                    raise InputError(
                        f"scores {c.ref} ({snap.split} {snap.id[:12]}) has no {split} split: rank the {split} "
                        f"prompts of iteration {iteration} with the same ranker, or combine only --split "
                        f"{snap.split}",
                        option="scores",
                    )
                snap = match
            found.append(snap)
        twice = next((s for i, s in enumerate(found) if s.id in {f.id for f in found[:i]}), None)
        if twice is not None:
            raise InputError(
                f"scores {twice.id[:12]} is named twice; give each axis once, with its weight", option="scores"
            )
        out[split] = found
    return out


def _generations(catalog: Catalog, snap: Snapshot) -> str:
    gen = catalog.parent(snap, "generations")
    if gen is None:
        raise InputError(
            f"scores {snap.id[:12]} records no generations snapshot it scored; combine scores that `iterdpo rank` "
            f"registered",
            option="scores",
        )
    return gen.id


def _column_of(catalog: Catalog, snap: Snapshot, keys: dict[tuple[str, int], int]) -> list[float | None]:
    """A component's score of each response of `keys` (None where it has none), aligned with `keys`."""
    out: list[float | None] = [None] * len(keys)
    for batch in catalog.read_batches(snap.id):
        for pid, idx, score in zip(*(batch.column(c).to_pylist() for c in ("prompt_id", "response_index", "score"))):
            at = keys.get((pid, idx))
            if at is not None:
                out[at] = score
    return out


def combine_snapshots(
    catalog: Catalog,
    iteration: int,
    components: Mapping[str, Sequence[Snapshot]],
    weights: Sequence[float],
    method: str,
) -> StageResult:
    """Combine each split's component snapshots (all of the same generations) and register one scores snapshot per
    split, all in one transaction (a bad split registers none). A response some component did not score gets no
    score row, and is counted in the params (`unscored`): `build` then counts its prompt as missing."""
    check_combination(0, [[] for _ in weights], weights, method)
    result = StageResult("combine", iteration)
    start = time.perf_counter()
    plans = []
    for split, snaps in components.items():  # checked for every split before any number is computed
        gens = {_generations(catalog, s) for s in snaps}
        if len(gens) > 1:
            raise InputError(
                f"scores of different generations in {split}: {', '.join(s.id[:12] for s in snaps)} score "
                f"generations {', '.join(sorted(g[:12] for g in gens))}; combine the scores of one generation run",
                option="scores",
            )
        plans.append((split, snaps, gens.pop()))
    items = []
    for split, snaps, gen in plans:
        keys: dict[tuple[str, int], int] = {}
        for batch in catalog.read_batches(gen, columns=("prompt_id", "response_index")):
            for pid, idx in zip(batch.column("prompt_id").to_pylist(), batch.column("response_index").to_pylist()):
                keys[(pid, idx)] = len(keys)
        order = list(keys)
        combined = combine_scores([p for p, _ in order], [_column_of(catalog, s, keys) for s in snaps], weights, method)
        kept = [(k, v) for k, v in zip(order, combined) if v is not None]
        rows = pa.table(
            {
                "prompt_id": [k[0] for k, _ in kept],
                "response_index": pa.array([k[1] for k, _ in kept], pa.int32()),
                "score": pa.array([v for _, v in kept], pa.float64()),
            }
        )
        params = {
            "ranker": "combine",
            "method": method,
            "weights": list(weights),
            "ranker_components": [{"weight": w, **ranker_summary(s.params)} for w, s in zip(weights, snaps)],
            "components": [s.id for s in snaps],
            "generations": gen,
            "responses": len(order),
            "unscored": len(order) - len(kept),
        }
        prompts = len({p for p, _ in order})
        result.splits.append(SplitResult(split, prompts, processed=prompts, drops={"unscored": len(order) - len(kept)}))
        # parents: the generations first (what build and the card follow), then each axis, in the order given
        items.append(Registration("scores", rows, iteration, split, (gen, *(s.id for s in snaps)), params))
    for split_result, snap in zip(result.splits, catalog.register_many(items)):
        split_result.snapshot = snap
    result.seconds = time.perf_counter() - start
    return result


def combine(catalog: Catalog, iteration: int, cfg: CombineConfig = CombineConfig()) -> StageResult:
    """Combine several scores snapshots of `iteration`'s generations (cfg.scores: SELECTOR_OR_ID=WEIGHT) into one
    `scores` snapshot per split of cfg.splits. The same components, weights and method give the same ids."""
    components = validate_combine(cfg)
    per_split = resolve_components(catalog, iteration, components, cfg.splits)
    return combine_snapshots(catalog, iteration, per_split, [c.weight for c in components], cfg.method)
