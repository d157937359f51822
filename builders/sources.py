"""Prompt sources: keep or drop a pool's prompts by the dataset they came from (UltraFeedback's `source` column:
`evol_instruct`, `false_qa`, `flan_v2_niv2`, `sharegpt`, `truthful_qa`, `ultrachat`, ...).

UltraFeedback's `truthful_qa` prompts are TruthfulQA's questions, and HuggingFaceH4's ultrafeedback_binarized drops
that source; `--exclude-source truthful_qa` does the same at import. A name that is not among the source's values is
an error that lists them (a typo must not leave the prompts in), as is filtering a source without a `source` column.

>>> import pyarrow as pa
>>> from builders.sources import filter_sources
>>> t = pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "source": ["sharegpt", "truthful_qa", None]})
>>> kept, counts = filter_sources(t, exclude=["truthful_qa"])
>>> kept.column("prompt_id").to_pylist(), counts
(['a', 'c'], {'exclude_sources': ['truthful_qa'], 'excluded_by_source': {'truthful_qa': 1}})
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from builders.errors import InputError

UNKNOWN = "(no source)"  # how the counts name prompts whose source is null


def filter_sources(
    table: pa.Table, include: Sequence[str] = (), exclude: Sequence[str] = (), where: str = "the source"
) -> tuple[pa.Table, dict[str, Any]]:
    """The rows of `table` (a prompts table) whose `source` is in `include` (when given) and not in `exclude`, and
    the params that record it: the names and the prompts dropped per source. Checked before any work."""
    if not include and not exclude:
        return table, {}
    if include and exclude:
        raise InputError("give --include-source or --exclude-source, not both", option="include_sources")
    sources = table.column("source").to_pylist()
    counts = Counter(s if s is not None else UNKNOWN for s in sources)
    if set(counts) == {UNKNOWN}:
        raise InputError(f"{where}: has no `source` values to filter on (no source column, or every value is null)")
    for name in (*include, *exclude):
        if name not in counts:
            found = ", ".join(sorted(k for k in counts if k != UNKNOWN))
            raise InputError(f"{where}: no prompts with source {name!r}; sources found: {found}")
    names = sorted(set(include or exclude))
    member = pc.fill_null(pc.is_in(table.column("source"), value_set=pa.array(names, pa.string())), False)
    if include:
        kept = table.filter(member)
        dropped = {k: v for k, v in sorted(counts.items()) if k not in names}
        return kept, {"include_sources": names, "excluded_by_source": dropped}
    kept = table.filter(pc.invert(member))
    if kept.num_rows == 0:
        raise InputError(f"{where}: no prompts left: every prompt's source is among {', '.join(names)}")
    return kept, {"exclude_sources": names, "excluded_by_source": {k: counts[k] for k in names}}
