"""Snapshot ids are content addresses that users' catalogs, tags, publications and scripts hold on to: the same
inputs, seeds and models must give byte-identical snapshots from one version of iterdpo to the next.

This pins the ids of a small pipeline (bundled prompts, the seeded tiny models, 1 iteration, transformers generation,
PairRM and a python scorer, pairs from each). A failure here means rows or ids changed: a BREAKING change for every
existing catalog (a rerun no longer resumes or deduplicates; published ids no longer match). Change the literals only
for a deliberate, announced change of the row or id definition (DESIGN.md), never to make a refactor pass.
To recompute them, run this file with ITERDPO_PRINT_PINNED_IDS=1 and copy the printed dict (run it twice: the values
must not move between runs):
    ITERDPO_PRINT_PINNED_IDS=1 python -m pytest -q -s tests/test_pinned_ids.py
"""

from __future__ import annotations

import os

from builders.catalog import Catalog
from builders.config import BuildConfig, GenerateConfig, RankConfig, SamplingConfig, SplitConfig
from builders.generate import generate
from builders.pairs import build_pairs
from builders.prompts import import_prompts, split_prompts
from builders.rank import rank
from tests.conftest import SAMPLE

PINNED = {
    "prompts": {
        "pool": "0d4eb3bd1111d7e6df23866d7d63a3f2c976dad0510e7dc9fa64aea1a0fc0fb3",
        "train": "90cd71d702e49bd9d10a2e5c089ebe5019a8480714c73b80a591ce0ac62abb68",
        "test": "709c9f6f930629c206caae2f51cec49247dbadcfea922752ef2db6013441231c",
    },
    "generations": {
        "train": "454752129c13b6a031fd264f1325ce8de169365cd09e11352f62773011dd5aeb",
        "test": "5ca92982b7ad225caea9060c27c75e29f03bbce95a4a6152cf5a115f0f71f03b",
    },
    "scores/pairrm": {
        "train": "207e3830ff7b67fe6b11b7d94ea86f60a03e5aa5b5df72c9f7fdf3647281025d",
        "test": "279c7179cd4d3d757df693acfa3569fcd36d6ea4593fdfcf35204df3c9b0b5e1",
    },
    "pairs/pairrm": {
        "train": "61e7dfd7c10a559d5164d93c7e3b250c08c1ca3b2a671854fe381af6737869fb",
        "test": "81f1f43aaa15d0f19bc2631c4bb89015ddf88e1fdf4769d506478a1c76eb2f6b",
    },
    "scores/python": {
        "train": "ff03dda5a62510f3686dc6707d918a3329a73e9e00f81a55824ef795d7534bb0",
        "test": "6ed3040ebf6e78c9776be5a6ccb70e3a0181c2148ce3486d4764aa5110dbd7f8",
    },
    "pairs/python": {
        "train": "d834210cce375d28a43a81aa99755c49f8ed8e84bf81c00e04c947dacec673e9",
        "test": "6f99b03eeee8745b327149f83ed806176467be2e07d745b3787a993f94e7b0e2",
    },
}


def _ids(catalog: Catalog, kind: str) -> dict[str, str]:
    return {s.split or "pool": s.id for s in catalog.list(kind=kind)}


def test_a_small_pipeline_gives_the_pinned_snapshot_ids(tmp_path, tiny_models):
    catalog = Catalog(tmp_path / "catalog.duckdb")
    import_prompts(catalog, str(SAMPLE))
    split_prompts(catalog, SplitConfig(iterations=1, train_size=4, test_size=2, seed=5))
    generate(
        catalog,
        1,
        GenerateConfig(
            model=str(tiny_models / "generator"),
            backend="transformers",
            sampling=SamplingConfig(num_responses=3, max_tokens=16, seed=5),
        ),
        progress=False,
    )
    got: dict[str, object] = {"prompts": _ids(catalog, "prompts"), "generations": _ids(catalog, "generations")}
    seen: set[str] = set()
    for name, cfg in {
        "pairrm": RankConfig(ranker="pairrm", ranker_model=str(tiny_models / "ranker")),
        "python": RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better"),
    }.items():
        rank(catalog, 1, cfg, progress=False)
        scores = {s.split: s.id for s in catalog.list(kind="scores") if s.id not in seen}
        build_pairs(catalog, 1, BuildConfig(), from_refs=list(scores.values()))
        pairs = {s.split: s.id for s in catalog.list(kind="pairs") if s.id not in seen}
        got[f"scores/{name}"], got[f"pairs/{name}"] = scores, pairs
        seen |= {*scores.values(), *pairs.values()}
    if os.environ.get("ITERDPO_PRINT_PINNED_IDS"):
        print("\nPINNED =", got)
    assert got == PINNED
