"""Statistics of published pairs: rows, chosen vs rejected lengths and scores, drops and ties, per split."""

from __future__ import annotations

import statistics
from typing import Any

import pyarrow as pa


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0}
    return {
        "mean": statistics.fmean(values),
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def pair_stats(pairs: pa.Table) -> dict[str, Any]:
    """Length (characters) and score statistics of chosen vs rejected responses in a `pairs` table."""
    chosen = [float(len(conv[-1]["content"])) for conv in pairs.column("chosen").to_pylist()]
    rejected = [float(len(conv[-1]["content"])) for conv in pairs.column("rejected").to_pylist()]
    return pair_stats_of(
        chosen, rejected, pairs.column("score_chosen").to_pylist(), pairs.column("score_rejected").to_pylist()
    )


def pair_stats_of(chosen: list[float], rejected: list[float], sc: list[float], sr: list[float]) -> dict[str, Any]:
    """pair_stats from the chosen and rejected responses' lengths and scores, one value per pair (what a caller
    streaming the pairs collects, without holding the texts)."""
    rows = len(chosen)
    return {
        "rows": rows,
        "chosen_length": _summary(chosen),
        "rejected_length": _summary(rejected),
        "chosen_longer": sum(c > r for c, r in zip(chosen, rejected)) / max(rows, 1),
        "score_chosen": _summary(sc),
        "score_rejected": _summary(sr),
        "margin": _summary([a - b for a, b in zip(sc, sr)]),
    }
