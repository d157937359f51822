"""The reward on test prompts per iteration: did the loop make the model better by its own reward?

Iteration n's test responses are written by the model of iteration n (the base model for n = 1, the model
trained in iteration n - 1 after that) and scored by the iteration's reward model, on prompts no model trained on.
The table is read from the catalog's `scores` snapshots and the `generations` snapshots they were computed from
(never re-scored here). The standard error is over prompts (the mean of each prompt's responses, then the standard
error of those means): responses to one prompt are not independent, and every iteration has its own prompts.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from builders.models import display_name

CARD_ANCHOR = "\n## Provenance"  # the block goes before this heading of the dataset card
PLOT = "plots/test_reward_by_iteration.png"


def test_reward_table(
    catalog, iterations: list[int] | None = None, pinned: dict[int, str] | None = None
) -> list[dict[str, Any]]:
    """One row per iteration with scored test responses: reward mean and standard error, mean length in tokens,
    share cut by max_tokens, and who wrote the responses. `pinned`: the scores snapshot to read per iteration
    (those a publication's pairs were built from); otherwise the iteration's newest."""
    rows = []
    wanted = (
        iterations
        if iterations is not None
        else sorted({s.iteration for s in catalog.list(kind="scores") if s.split == "test" and s.iteration is not None})
    )
    for n in wanted:
        scores_snap = catalog.get(pinned[n]) if pinned and n in pinned else catalog.newest("scores", n, "test")
        gen_snap = catalog.parent(scores_snap, "generations") if scores_snap is not None else None
        if gen_snap is None:
            continue
        scores = catalog.read(scores_snap.id).to_pylist()
        gens = {(g["prompt_id"], g["response_index"]): g for g in catalog.read(gen_snap.id).to_pylist()}
        per_prompt: dict[str, list[float]] = defaultdict(list)
        tokens, cut = [], 0
        for s in scores:
            g = gens[(s["prompt_id"], s["response_index"])]
            per_prompt[s["prompt_id"]].append(float(s["score"]))
            tokens.append(g["completion_tokens"] or 0)
            cut += g["finish_reason"] == "length"
        means = [statistics.fmean(v) for v in per_prompt.values()]
        se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
        axes = _axes(catalog, scores_snap)
        rows.append(
            {
                "iteration": n,
                "model": display_name(str(gen_snap.params.get("model", "?"))),
                "prompts": len(means),
                "responses": len(scores),
                "reward_mean": statistics.fmean(means) if means else float("nan"),
                "reward_se": se,
                "mean_tokens": statistics.fmean(tokens) if tokens else float("nan"),
                "cut_share": cut / len(scores) if scores else float("nan"),
                "ranker": display_name(
                    str(
                        scores_snap.params.get("function")
                        or scores_snap.params.get("ranker_model")
                        or scores_snap.params.get("ranker", "?")
                    )
                ),
                "scores": scores_snap.id,
                "generations": gen_snap.id,
                **({"axes": axes} if axes else {}),
            }
        )
    return rows


def _mean_se(scores: list[dict[str, Any]]) -> tuple[float, float]:
    """The mean over prompts of each prompt's mean score, and its standard error."""
    per_prompt: dict[str, list[float]] = defaultdict(list)
    for s in scores:
        per_prompt[s["prompt_id"]].append(float(s["score"]))
    means = [statistics.fmean(v) for v in per_prompt.values()]
    se = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
    return (statistics.fmean(means) if means else float("nan")), se


def _axes(catalog, scores_snap) -> list[dict[str, Any]]:
    """A combined reward's axes (builders/combine.py), each with its own mean ± se on the same responses: a zscore
    or rank combination is standardised within each iteration, so only its axes compare across iterations."""
    if scores_snap.params.get("ranker") != "combine":
        return []
    from cards.provenance import Axis

    out = []
    for snap, weight in zip(catalog.parents(scores_snap, "scores"), scores_snap.params.get("weights") or []):
        mean, se = _mean_se(catalog.read(snap.id).to_pylist())
        out.append({"axis": Axis(snap, weight).name, "weight": weight, "reward_mean": mean, "reward_se": se})
    return out


def text_table(rows: list[dict[str, Any]]) -> list[str]:
    """Plain-text lines for the terminal."""
    out = [
        f"{'iteration':>9}  {'written by':<14} {'prompts':>7}  {'reward (mean ± se)':>18}  {'tokens':>6}  {'cut':>5}"
    ]
    for r in rows:
        out.append(
            f"{r['iteration']:>9}  {r['model'][:14]:<14} {r['prompts']:>7}  "
            f"{r['reward_mean']:>10.3f} ± {r['reward_se']:.3f}  {r['mean_tokens']:>6.1f}  "
            f"{100 * r['cut_share']:>4.0f}%"
        )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Reward on test prompts by iteration",
        "",
        "Iteration n's test prompts (never trained on) answered by the model of iteration n (the base model at "
        "n = 1), scored by the reward model of the recipe (`" + (rows[0]["ranker"] if rows else "?") + "`). "
        "Standard error over prompts; cut = share of responses stopped by max_tokens.",
        "",
        "| iteration | written by | prompts | reward (mean ± se) | mean tokens | cut |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['iteration']} | `{r['model']}` | {r['prompts']} | {r['reward_mean']:.3f} ± "
            f"{r['reward_se']:.3f} | {r['mean_tokens']:.1f} | {100 * r['cut_share']:.0f}% |"
        )
    if any(r.get("axes") for r in rows):
        lines += [
            "",
            "The reward is a combination (`iterdpo combine`); a zscore or rank combination is standardised within "
            "each iteration, so compare its axes across iterations:",
            "",
            "| iteration | axis | weight | reward (mean ± se) |",
            "|---:|---|---:|---:|",
        ]
        for r in rows:
            for a in r.get("axes", []):
                lines.append(
                    f"| {r['iteration']} | `{a['axis']}` | {a['weight']:g} | {a['reward_mean']:.3f} ± "
                    f"{a['reward_se']:.3f} |"
                )
    lines += ["", f"![Reward on test prompts by iteration]({PLOT})", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from cards.plots import _pyplot

    plt = _pyplot()
    its = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar(its, [r["reward_mean"] for r in rows], yerr=[2 * r["reward_se"] for r in rows], marker="o", capsize=4)
    ax.set_xticks(its)
    ax.set_xlabel("iteration (test responses by its model)")
    ax.set_ylabel("mean reward (± 2 se)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_to_card(
    catalog, card: str, folder: Path, iterations: list[int], pinned: dict[int, str] | None = None
) -> tuple[str, list[str]]:
    """The dataset card with the reward block inserted before its Provenance section, and the files written
    (the plot); unchanged when no published iteration (or the one after the last) has scored test responses.
    `pinned`: the test scores snapshots the published pairs were built from, per iteration."""
    last = max(iterations) if iterations else 0
    rows = test_reward_table(catalog, list(range(1, last + 2)), pinned)
    if not rows:
        return card, []
    (folder / "plots").mkdir(exist_ok=True)
    plot(rows, folder / PLOT)
    block = markdown(rows)
    at = card.find(CARD_ANCHOR)
    card = card[:at] + "\n" + block + card[at:] if at >= 0 else card.rstrip("\n") + "\n\n" + block
    return card, [PLOT]
