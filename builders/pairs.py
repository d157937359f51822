"""The pairs stage: chosen = best response, rejected = worst (Snorkel's max-min), in the published schemas.

    build_pairs(catalog, 1, BuildConfig())  -> `pairs` snapshots for train and test

The `default` schema (snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset) is what the catalog stores; the `trl` view
(conversational prompt / chosen / rejected, which TRL's DPOTrainer loads directly) is derived from it by `to_trl`.
A prompt that is a conversation (or was generated with a system prompt) keeps Snorkel's schema: `prompt` is its
last user turn, `chosen`/`rejected` the whole conversation (system message included) plus the answer; in `trl`,
`prompt` is the whole message list.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from builders.catalog import Catalog, Registration, Snapshot
from builders.config import SPLITS, BuildConfig, validate_build
from builders.conversation import as_messages, effective
from builders.errors import InputError
from builders.schemas import KINDS, MESSAGE
from builders.stage import SplitResult, StageResult, resolve_inputs

DROP_REASONS = ("tie", "single_distinct", "below_margin", "missing")
# pairs rows are built and spooled in batches of about this many characters of text (a row repeats the prompt
# three times and holds every response): bounds build's memory however many prompts an iteration has
_SPOOL_CHARS = 16 * 2**20
_SCHEMA = KINDS["pairs"].schema

TRL_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("chosen", pa.list_(MESSAGE)),
        ("rejected", pa.list_(MESSAGE)),
    ]
)


def to_trl(pairs: pa.Table) -> pa.Table:
    """The `trl` config's rows: prompt = the conversation before the answer (system message and earlier turns
    included; [user] for a plain prompt), chosen = [assistant], rejected = [assistant], prompt_id.
    (A string prompt beside message-list chosen/rejected crashes TRL >= 1 DPOTrainer.)"""
    chosen = pairs.column("chosen").to_pylist()
    return pa.table(
        {
            "prompt_id": pairs.column("prompt_id"),
            "prompt": [conv[:-1] for conv in chosen],
            "chosen": [[conv[-1]] for conv in chosen],
            "rejected": [[conv[-1]] for conv in pairs.column("rejected").to_pylist()],
        },
        schema=TRL_SCHEMA,
    )


def select(responses: Sequence[str], scores: Sequence[float], cfg: BuildConfig) -> tuple[int, int] | str:
    """(chosen index, rejected index), or the reason the prompt is dropped. Ties in the ordering break towards the
    lower response index, so the choice is deterministic."""
    if len(set(responses)) < 2:
        return "single_distinct"
    adjusted = [s - cfg.length_penalty * len(r) for s, r in zip(scores, responses)]
    best = max(range(len(adjusted)), key=lambda i: (adjusted[i], -i))
    worst = min(range(len(adjusted)), key=lambda i: (adjusted[i], i))
    if responses[worst] == responses[best]:  # the lowest score is a copy of the best response
        others = [i for i in range(len(adjusted)) if responses[i] != responses[best]]
        worst = min(others, key=lambda i: (adjusted[i], i))
    margin = adjusted[best] - adjusted[worst]
    if margin <= 0 and not cfg.keep_ties:
        return "tie"
    if margin < cfg.min_margin:
        return "below_margin"
    return best, worst


def _input(catalog: Catalog, snap: Snapshot, kind: str) -> Snapshot:
    """The `kind` snapshot `snap` was made from."""
    found = catalog.parent(snap, kind)
    if found is None:
        raise InputError(
            f"{snap.kind} snapshot {snap.id[:12]} records no {kind} snapshot it was made from; "
            f"build pairs from scores that `iterdpo rank` registered"
        )
    return found


def _skipped_prompts(catalog: Catalog, gen: Snapshot) -> set[str]:
    """Prompts the generation stage skipped on purpose (too long for the context): known, not missing."""
    key = gen.params.get("work_key")
    units = catalog.work_units(key) if key else {}
    return {pid for pid, info in units.items() if info and info.get("skipped")}


def _groups(batches: Iterable[pa.RecordBatch], value: str) -> Iterator[tuple[str, dict[int, Any]]]:
    """(prompt_id, {response_index: value}) per prompt, from rows streaming in canonical order."""
    pid, acc = None, {}
    for batch in batches:
        values = batch.column(value).to_pylist()
        for p, idx, v in zip(*(batch.column(c).to_pylist() for c in ("prompt_id", "response_index")), values):
            if value == "score" and not math.isfinite(v):
                raise InputError(f"score of prompt {p} response {idx} is not finite ({v})")
            if p != pid:
                if pid is not None:
                    yield pid, acc
                pid, acc = p, {}
            acc[idx] = v
    if pid is not None:
        yield pid, acc


class _Cursor:
    """One prompt's group at a time from a stream in prompt_id order, for a merge join with the prompts."""

    def __init__(self, groups: Iterator[tuple[str, dict[int, Any]]]):
        self.groups = groups
        self.head = next(groups, None)

    def take(self, pid: str) -> dict[int, Any]:
        # prompt ids order the same in Python and DuckDB (code points = UTF-8 bytes)
        while self.head is not None and self.head[0] < pid:
            self.head = next(self.groups, None)
        if self.head is not None and self.head[0] == pid:
            found, self.head = self.head[1], next(self.groups, None)
            return found
        return {}


def _pairs_for_split(
    catalog: Catalog, scores_snap: Snapshot, cfg: BuildConfig, sink: pa.ipc.RecordBatchStreamWriter
) -> tuple[int, dict[str, int], dict[str, Any]]:
    """Write the split's pairs rows to `sink` in canonical order, batch by batch: prompts, generations and scores
    stream in prompt_id order and are merged one prompt at a time, so memory stays bounded by a batch."""
    gen = _input(catalog, scores_snap, "generations")
    prompts_snap = _input(catalog, gen, "prompts")
    texts = _Cursor(
        _groups(catalog.read_batches(gen.id, columns=("prompt_id", "response_index", "response")), "response")
    )
    scored = _Cursor(_groups(catalog.read_batches(scores_snap.id), "score"))
    skipped = _skipped_prompts(catalog, gen)
    system = gen.params.get("system_prompt")  # the conversation the model was asked includes it
    drops = {reason: 0 for reason in DROP_REASONS}
    drops["skipped_too_long"] = 0
    rows: dict[str, list] = {name: [] for name in _SCHEMA.names}
    prompt_count = kept = held = 0
    for batch in catalog.read_batches(prompts_snap.id, columns=("prompt_id", "prompt", "messages")):
        prompt_count += batch.num_rows
        for pid, prompt, conv in zip(*(batch.column(c).to_pylist() for c in ("prompt_id", "prompt", "messages"))):
            responses, values = texts.take(pid), scored.take(pid)
            if pid in skipped and not responses:
                drops["skipped_too_long"] += 1
                continue
            if not responses or set(responses) != set(values):
                drops["missing"] += 1
                continue
            order = sorted(responses)
            resp = [responses[i] for i in order]
            vals = [values[i] for i in order]
            picked = select(resp, vals, cfg)
            if isinstance(picked, str):
                drops[picked] += 1
                continue
            best, worst = picked
            history = as_messages(effective(prompt, conv, system))  # [user] for a plain prompt
            rows["prompt_id"].append(pid)
            rows["prompt"].append(prompt)  # a conversation's last user turn
            rows["chosen"].append([*history, {"content": resp[best], "role": "assistant"}])
            rows["rejected"].append([*history, {"content": resp[worst], "role": "assistant"}])
            rows["all_generated_responses"].append(resp)
            rows["all_rm_scores"].append(vals)
            rows["score_chosen"].append(vals[best])
            rows["score_rejected"].append(vals[worst])
            held += (
                len(prompt)
                + 2 * sum(len(m["content"]) for m in history)
                + sum(map(len, resp))
                + len(resp[best])
                + len(resp[worst])
            )
            if held >= _SPOOL_CHARS:
                kept += _flush(rows, sink)
                held = 0
    kept += _flush(rows, sink)
    lineage = {
        "scores": scores_snap.id,
        "generations": gen.id,
        "prompts": prompts_snap.id,
        "prompt_count": prompt_count,
        "generator": {
            k: gen.params.get(k)
            for k in ("model", "model_sha256", "revision", "backend", "sampling", "system_prompt")
            if k in gen.params
        },
        "ranker": {k: v for k, v in scores_snap.params.items() if k.startswith("ranker")},
    }
    return kept, drops, lineage


def _flush(rows: dict[str, list], sink: pa.ipc.RecordBatchStreamWriter) -> int:
    """Write the pairs rows held so far to `sink` and empty them; return how many there were."""
    n = len(rows["prompt_id"])
    if n:
        sink.write_table(pa.Table.from_pydict(rows, schema=_SCHEMA))
        for column in rows.values():
            column.clear()
    return n


def _spooled(path: Path) -> Iterator[pa.RecordBatch]:
    """The pairs rows spooled to `path`, read back one batch at a time (not memory-mapped: bounded RSS)."""
    with pa.OSFile(str(path)) as f, pa.ipc.open_stream(f) as reader:
        yield from reader


def build_pairs(
    catalog: Catalog, iteration: int, cfg: BuildConfig = BuildConfig(), from_refs: Sequence[str] = ()
) -> StageResult:
    """Select chosen/rejected per prompt for `iteration` and register its `pairs` snapshots (train and test) in
    one transaction. Every dropped prompt is counted by reason in the snapshot params."""
    validate_build(cfg)
    sets = resolve_inputs(catalog, "scores", iteration, SPLITS, from_refs, require_train=True)
    result = StageResult("build", iteration)
    items = []
    # Each split's pairs are spooled to a temporary Arrow file as they are built, and registered from it once every
    # split has passed its checks: bounded memory, and bad input registers nothing. (Registration holds the
    # catalog open for writing, so it cannot read the inputs meanwhile.)
    with tempfile.TemporaryDirectory(prefix="iterdpo-pairs-") as tmp:
        for split, scores_snap in sets.items():
            spool = Path(tmp) / f"{split}.arrows"
            with pa.OSFile(str(spool), "wb") as f, pa.ipc.new_stream(f, _SCHEMA) as sink:
                kept, drops, lineage = _pairs_for_split(catalog, scores_snap, cfg, sink)
            if drops["missing"] and not cfg.allow_partial:
                raise InputError(
                    f"{drops['missing']} of {lineage['prompt_count']} {split} prompts of iteration {iteration} have "
                    f"no generations or scores; finish generating and ranking them, or set allow_partial",
                    option="allow_partial",
                )
            if kept == 0:
                raise InputError(f"no {split} pairs left for iteration {iteration}: every prompt was dropped ({drops})")
            params = {"selection": asdict(cfg), "drops": drops, **lineage}
            result.splits.append(
                SplitResult(split, lineage["prompt_count"], processed=lineage["prompt_count"], drops=drops)
            )
            # the catalog stores each pair by reference to the prompts and generations rows holding its texts
            items.append(
                Registration(
                    "pairs",
                    _spooled(spool),
                    iteration=iteration,
                    split=split,
                    parents=(scores_snap.id,),
                    params=params,
                    texts_from=(lineage["prompts"], lineage["generations"]),
                )
            )
        for split_result, snap in zip(result.splits, catalog.register_many(items)):
            split_result.snapshot = snap
    return result
