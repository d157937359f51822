"""PNG plots for the dataset card: score distributions, and mean chosen/rejected length by iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def score_distributions(splits: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Chosen vs rejected reward-model scores per iteration: one panel per split kind (train, test), a pair of box
    plots per iteration (box: quartiles, line: median, triangle: mean, whiskers: 1.5 IQR), on one shared score
    axis, so a reader sees the margin and the drift across iterations at the card's width (~800 px)."""
    plt = _pyplot()
    by_kind: dict[str, dict[int, dict[str, list[float]]]] = {}
    for name, data in splits.items():
        kind, _, it = name.partition("_iteration_")
        by_kind.setdefault(kind, {})[int(it)] = data
    kinds = [k for k in ("train", "test") if k in by_kind] + sorted(set(by_kind) - {"train", "test"})
    its = sorted({i for k in kinds for i in by_kind[k]})
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(min(4.5 * len(kinds), 9) + 0.25 * len(its), 3.6), squeeze=False, sharey=True
    )
    colors = {"score_chosen": "#1f77b4", "score_rejected": "#ff7f0e"}
    for ax, kind in zip(axes[0], kinds):
        for offset, column in ((-0.18, "score_chosen"), (0.18, "score_rejected")):
            present = [i for i in its if i in by_kind[kind] and by_kind[kind][i][column]]
            box = ax.boxplot(
                [by_kind[kind][i][column] for i in present],
                positions=[i + offset for i in present],
                widths=0.32,
                patch_artist=True,
                showmeans=True,
                showfliers=True,
                meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 5},
                medianprops={"color": "black"},
                flierprops={"markersize": 3},
            )
            for patch in box["boxes"]:
                patch.set_facecolor(colors[column])
                patch.set_alpha(0.75)
        counts = ", ".join(f"{len(by_kind[kind][i]['score_chosen'])}" for i in its if i in by_kind[kind])
        ax.set_title(f"{kind} splits (pairs per iteration: {counts})", fontsize=10)
        ax.set_xticks(its)
        ax.set_xticklabels([str(i) for i in its])
        ax.set_xlim(min(its) - 0.6, max(its) + 0.6)
        ax.set_xlabel("iteration")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("reward-model score")
    from matplotlib.patches import Patch

    # above the panels, where it covers no box
    fig.legend(
        handles=[
            Patch(facecolor=colors["score_chosen"], alpha=0.75, label="chosen"),
            Patch(facecolor=colors["score_rejected"], alpha=0.75, label="rejected"),
        ],
        fontsize=9,
        loc="upper center",
        ncol=2,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def length_by_iteration(stats: dict[int, dict[str, Any]], path: Path) -> Path:
    """Mean chosen vs rejected length (characters) of the train split per iteration: the length drift to watch."""
    plt = _pyplot()
    its = sorted(stats)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(its, [stats[i]["chosen_length"]["mean"] for i in its], marker="o", label="chosen")
    ax.plot(its, [stats[i]["rejected_length"]["mean"] for i in its], marker="o", label="rejected")
    ax.set_xticks(its)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean length (characters)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
