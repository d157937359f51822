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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from builders.errors import InputError

METHODS = ("zscore", "rank", "weighted-sum")


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
        raise InputError(f"unknown combine method {method!r}; use one of {', '.join(METHODS)}", option="method")
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
