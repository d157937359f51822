"""The dedup stage: a prompt pool without near-duplicate prompts, one kept per group.

Two prompts are near-duplicates when their normal texts (builders/textnorm.py: case, whitespace and punctuation
aside, numbers as digits) are equal, or when the Jaccard similarity of their word 3-gram shingles is at least
`threshold`. Candidate pairs come from datasketch's MinHash LSH (so the work grows with the pool, not its square);
each candidate pair is then verified by its exact Jaccard, so LSH can miss a pair (rarely, near the threshold) but
never groups two prompts below it. Groups are the connected components of the verified pairs; each keeps its
smallest prompt_id (deterministic, whatever the pool's order) and drops the rest, listed in the params.

Caveat: templated prompts that share a long instruction and differ only by a short input (a word, a number) are
near-copies by this measure; raise `threshold` to keep them apart (the groups in the params show what was merged).

>>> import tempfile
>>> from pathlib import Path
>>> import pyarrow as pa
>>> from builders.catalog import Catalog
>>> from builders.config import DedupConfig
>>> from builders.dedup import dedup
>>> from builders.prompts import prompt_id
>>> catalog = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb")
>>> texts = ["Name three rivers in Europe.", "name three rivers in europe", "Why is the sky blue?"]
>>> pool = catalog.register("prompts", pa.table({"prompt_id": [prompt_id(t) for t in texts], "prompt": texts,
...                                              "source": [None] * 3}))
>>> result = dedup(catalog, DedupConfig())
>>> result.snapshot.rows, result.removed, [len(g) for g in result.groups]
(2, 1, [2])
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builders.catalog import Catalog, Snapshot
from builders.config import DedupConfig
from builders.errors import InputError
from builders.textnorm import normal_text, words

STAGE = "dedup"
SHINGLE = 3  # words per shingle
LSH_MARGIN = 0.1  # how far below the threshold the LSH bands aim
METHOD = f"MinHash LSH (datasketch) over word {SHINGLE}-gram shingles of the normal text, verified by exact Jaccard"


@dataclass
class DedupResult:
    pool: Snapshot
    snapshot: Snapshot | None  # None: a dry run; the pool itself when nothing was a duplicate
    groups: list[list[str]]  # prompt ids per group of near-duplicates, the kept one (the smallest) first
    config: DedupConfig
    dry_run: bool = False

    @property
    def removed(self) -> int:
        return sum(len(g) - 1 for g in self.groups)

    def to_json(self, texts: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot.to_json() if self.snapshot is not None else None,
            "pool": self.pool.id,
            "dry_run": self.dry_run,
            "method": METHOD,
            "threshold": self.config.threshold,
            "pool_rows": self.pool.rows,
            "removed": self.removed,
            "groups": [
                {"kept": g[0], "removed": g[1:], **({"prompts": [texts[i] for i in g]} if texts else {})}
                for g in self.groups
            ],
        }


def shingles(text: str) -> set[int]:
    """A prompt's word 3-grams (its words, when it has fewer than 3), each as its CRC-32 (a set of ints takes a
    fraction of the memory of the strings; a collision between two shingles is about one in 4 billion)."""
    ws = words(text)
    grams = [" ".join(ws[i : i + SHINGLE]) for i in range(max(len(ws) - SHINGLE + 1, 1))] if ws else []
    return {zlib.crc32(g.encode()) for g in grams}


def check_config(cfg: DedupConfig) -> None:
    if not (isinstance(cfg.threshold, (int, float)) and 0 < cfg.threshold <= 1):
        raise InputError(f"threshold must be in (0, 1], not {cfg.threshold!r}", option="threshold")
    if not isinstance(cfg.num_perm, int) or cfg.num_perm < 16:
        raise InputError(f"num_perm must be an integer of at least 16, not {cfg.num_perm!r}", option="num_perm")


def near_duplicate_groups(texts: Sequence[str], cfg: DedupConfig = DedupConfig()) -> list[list[int]]:
    """Positions of near-duplicate texts grouped (groups of 2 or more, each sorted), by the module's method."""
    from datasketch import MinHash, MinHashLSH

    check_config(cfg)
    # each prompt's shingles as a sorted uint32 array: 4 bytes a shingle, where a Python set of ints takes ~60
    sets = [np.fromiter(sorted(shingles(t)), dtype=np.uint32) for t in texts]
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    by_text: dict[bytes, int] = {}
    unique: list[int] = []
    for i, t in enumerate(texts):  # equal normal texts (case, spaces, punctuation aside): grouped without hashing
        key = hashlib.sha1(normal_text(t).encode()).digest()
        if key in by_text:
            union(by_text[key], i)
        else:
            by_text[key] = i
            unique.append(i)
    if cfg.threshold < 1:
        # the LSH bands are set for a lower similarity than the threshold, weighing misses above false candidates:
        # a candidate costs one exact Jaccard, a miss is a duplicate left in (at the threshold itself, bands tuned
        # for it find only about half the pairs)
        lsh = MinHashLSH(
            threshold=max(cfg.threshold - LSH_MARGIN, 0.05),
            num_perm=cfg.num_perm,
            weights=(0.2, 0.8),
            hashfunc=_band_key,  # 8-byte band keys instead of 8 bytes per row of the band
        )
        # one MinHash at a time (the LSH keeps only its band keys); the shingles are already 32-bit hashes
        hashes = MinHash.generator((sets[i] for i in unique), num_perm=cfg.num_perm, seed=1, hashfunc=int)
        for i, mh in zip(unique, hashes):
            for j in lsh.query(mh):
                a, b = sets[i], sets[j]
                inter = len(np.intersect1d(a, b, assume_unique=True))
                if inter and inter / (len(a) + len(b) - inter) >= cfg.threshold:
                    union(i, j)
            lsh.insert(i, mh)
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _band_key(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def dedup(
    catalog: Catalog, cfg: DedupConfig = DedupConfig(), from_ref: str | None = None, dry_run: bool = False
) -> DedupResult:
    """Drop near-duplicates from the pool (the newest, or `from_ref`), keeping the smallest prompt_id of each
    group, and register what is left as a pool whose parent is the pool it read (unchanged pool, unchanged id)."""
    from builders.decontaminate import pool_snapshot

    check_config(cfg)
    pool_snap = pool_snapshot(catalog, from_ref)
    pool = catalog.read(pool_snap.id)
    ids, texts = pool.column("prompt_id").to_pylist(), pool.column("prompt").to_pylist()
    groups = sorted(sorted(ids[i] for i in g) for g in near_duplicate_groups(texts, cfg))
    result = DedupResult(pool_snap, None, groups, cfg, dry_run)
    if dry_run:
        return result
    if not groups:
        result.snapshot = pool_snap
        return result
    dropped = sorted(i for g in groups for i in g[1:])
    keep = pc.invert(pc.is_in(pool.column("prompt_id"), value_set=pa.array(dropped, pa.string())))
    params = {
        "stage": STAGE,
        "method": METHOD,
        "threshold": cfg.threshold,
        "num_perm": cfg.num_perm,
        "pool_rows": pool.num_rows,
        "groups_found": len(groups),
        "removed": len(dropped),
        "groups": [{"kept": g[0], "removed": g[1:]} for g in groups],
    }
    result.snapshot = catalog.register("prompts", pool.filter(keep), parents=[pool_snap.id], params=params)
    return result
