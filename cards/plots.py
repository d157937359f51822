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
    """One panel per published split: histograms of chosen and rejected scores."""
    plt = _pyplot()
    names = list(splits)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        data = splits[name]
        ax.hist(data["score_chosen"], bins=20, alpha=0.6, label="chosen")
        ax.hist(data["score_rejected"], bins=20, alpha=0.6, label="rejected")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("reward-model score")
    axes[0][0].set_ylabel("pairs")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
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
