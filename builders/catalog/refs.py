"""Pairs rows stored by reference: a pairs row built from catalog rows stores, instead of its prompt, chosen,
rejected and all_generated_responses (NULL), the row_hash of the prompts row holding its prompt, the row_hash of each
generations row holding its responses (in response order), and the positions of chosen and rejected among them
(store.REF_COLUMNS). Reads rebuild the full row (`expand`); its stored row_hash is still the full row's. Hashes, not
row ids: they stay valid across `merge`, which copies every row of a source, so the referenced rows always come along.

The references are derived here, from the source snapshots a registration names (`Sources`), never built by a
stage: a row is stored by reference only if what its references rebuild is exactly the row (every referenced row
present and holding the same text, byte for byte); any other row is stored in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from builders.catalog.db import fetch_arrow
from builders.catalog.hashing import row_hashes
from builders.catalog.store import REF_COLUMNS, REF_SCHEMA, has_refs, key_range, rows_table, select_columns
from builders.errors import CatalogError
from builders.schemas import KINDS

# the columns a referencing row leaves NULL
REFERENCED = ("prompt", "chosen", "rejected", "all_generated_responses")
# pairs rows rebuilt at a time to check their references (~10 kB each)
_CHECK_ROWS = 1_000


@dataclass(frozen=True)
class Sources:
    """The snapshots (by their seq in this file) whose rows may hold the texts of the pairs rows being stored."""

    prompts: int
    generations: int


# ----------------------------------------------------------------------------------------------------- reading
def needed(kind: str, columns: Sequence[str]) -> bool:
    """Whether reading `columns` of `kind` rows needs their references (to rebuild texts stored by reference)."""
    return kind == "pairs" and any(c in REFERENCED for c in columns)


def select_list(con: duckdb.DuckDBPyConnection, alias: str = "r") -> str:
    """The reference columns of `alias` (a rows_pairs) for a SELECT list; NULLs where the file has none (version 1)."""
    if has_refs(con):
        return ", ".join(f"{alias}.{name}" for name in REF_COLUMNS)
    return ", ".join(f"NULL::{sql_type} AS {name}" for name, sql_type in REF_COLUMNS.items())


def expand(con: duckdb.DuckDBPyConnection, table: pa.Table) -> pa.Table:
    """`table` (pairs columns, any others such as row_hash, and the reference columns) with every referencing row
    rebuilt in full from the rows it refers to, and the reference columns dropped. Row order is kept. A referenced
    row that is not in the catalog is a CatalogError."""
    out_names = [c for c in table.column_names if c not in REF_COLUMNS]
    refd = pc.is_valid(table.column("prompt_ref")).to_numpy(zero_copy_only=False)
    if not refd.any():
        return table.select(out_names)
    at = np.flatnonzero(refd)
    part = table.take(pa.array(at, pa.int64()))
    prompt_refs = part.column("prompt_ref").combine_chunks()
    response_refs = part.column("response_refs").combine_chunks()
    flat_refs = pc.list_flatten(response_refs)

    def texts(kind: str, column: str, wanted: pa.Array) -> pa.Array:
        # the row ids first (a scan of the hashes only), then the texts of those ids: the rows of a batch are
        # stored near each other, so the id range lets DuckDB skip the other blocks of (long) texts
        rt = rows_table(kind)
        con.register("_wanted", pa.table({"h": pc.unique(wanted)}))
        try:
            ids = fetch_arrow(con, f"SELECT r.row_id FROM {rt} r SEMI JOIN _wanted w ON r.row_hash = w.h")
        finally:
            con.unregister("_wanted")
        where, params = key_range(ids, "row_id", "r")
        con.register("_ids", ids)
        try:
            found = fetch_arrow(
                con,
                f"SELECT r.row_hash, r.{column} FROM {rt} r SEMI JOIN _ids i ON r.row_id = i.row_id WHERE {where}",
                params,
            )
        finally:
            con.unregister("_ids")
        taken = found.column(1).take(pc.index_in(wanted, value_set=found.column(0).combine_chunks()))
        if taken.null_count:
            raise CatalogError(
                f"{taken.null_count} texts of pairs rows refer to {kind} rows that are not in the "
                f"catalog (see `iterdpo versions verify`)"
            )
        return taken.combine_chunks().cast(pa.string())

    prompt = texts("prompts", "prompt", prompt_refs)
    responses = texts("generations", "response", flat_refs)
    offsets = response_refs.offsets
    if response_refs.offset or offsets[0].as_py():
        offsets = pc.subtract(offsets, offsets[0])
    built = _assemble(
        prompt, pa.ListArray.from_arrays(offsets, responses), part.column("chosen_ref"), part.column("rejected_ref")
    )
    full = pa.array(np.flatnonzero(~refd), pa.int64())
    columns = []
    for name in out_names:
        col = table.column(name)
        if name in built:
            rebuilt = built[name].cast(col.type)
            merged = pa.concat_arrays([col.combine_chunks().take(full), rebuilt]) if len(full) else rebuilt
            columns.append(merged)
        else:
            columns.append(col)
    # rows were split into full ones, then rebuilt ones: put the rebuilt columns back in the table's order
    order = np.empty(len(refd), dtype=np.int64)
    order[np.concatenate([np.flatnonzero(~refd), at])] = np.arange(len(refd))
    order = pa.array(order)
    return pa.Table.from_arrays(
        [c.take(order) if name in built else c for name, c in zip(out_names, columns)], names=out_names
    )


# ----------------------------------------------------------------------------------------------------- storing
def by_reference(con: duckdb.DuckDBPyConnection, rows: pa.Table, hashes: list[bytes], sources: Sources) -> pa.Table:
    """`rows` (pairs, about to be stored; `hashes` theirs) as they are stored: a row whose references into
    `sources` rebuild it exactly (_references_match) with its texts NULL and its references set, any other row in
    full (no reference columns set)."""
    refs = _derive(con, rows, sources)
    count = pc.list_value_length(refs.column("response_refs")).fill_null(0)
    candidate = pc.is_valid(refs.column("prompt_ref"))
    for index in ("chosen_ref", "rejected_ref"):  # positions within the references (else stored in full)
        value = refs.column(index).fill_null(-1)
        candidate = pc.and_(candidate, pc.and_(pc.greater_equal(value, 0), pc.less(value, count)))
    candidate = candidate.to_numpy(zero_copy_only=False)
    if not candidate.any():
        return rows
    exact = np.zeros(rows.num_rows, dtype=bool)
    candidates = np.flatnonzero(candidate)
    # a slice at a time: the assembled rows are held only for the check
    for lo in range(0, len(candidates), _CHECK_ROWS):
        at = pa.array(candidates[lo : lo + _CHECK_ROWS], pa.int64())
        part, ref = rows.take(at), refs.take(at)
        exact[at.to_numpy()] = _references_match(con, part, ref, [hashes[i] for i in at.to_pylist()])
    if not exact.any():
        return rows
    keep = pa.array(exact)
    out = rows
    for name in REFERENCED:
        col = out.column(name)
        out = out.set_column(out.column_names.index(name), name, pc.if_else(keep, pa.nulls(len(col), col.type), col))
    for name in REF_SCHEMA.names:
        col = refs.column(name)
        out = out.append_column(name, pc.if_else(keep, col, pa.nulls(len(col), col.type)))
    return out


def _derive(con: duckdb.DuckDBPyConnection, rows: pa.Table, sources: Sources) -> pa.Table:
    """The candidate references of pairs `rows` (REF_SCHEMA; null where there is none): the `sources.prompts` row of
    each row's prompt_id, the `sources.generations` rows of its prompt_id in response order, and the position among
    its all_generated_responses of chosen's and of rejected's answer (the first equal one: equal texts rebuild the
    same row). Whether they rebuild the row is checked afterwards (_references_match)."""
    pids = rows.column("prompt_id").combine_chunks()
    wanted = pa.table({"prompt_id": pc.unique(pids)})
    # a batch holds consecutive prompt ids (canonical order): their range lets the scans skip other blocks
    where, params = key_range(wanted, "prompt_id", "r")
    con.register("_pids", wanted)
    try:

        def hashes(kind: str, seq: int, order: str) -> pa.Table:
            return fetch_arrow(
                con,
                f"SELECT r.prompt_id, r.row_hash FROM snapshot_rows s JOIN {rows_table(kind)} r "
                f"ON s.row_id = r.row_id WHERE s.seq = ? AND {where} "
                f"AND r.prompt_id IN (SELECT prompt_id FROM _pids) ORDER BY {order}",
                [seq, *params],
            )

        prompts = hashes("prompts", sources.prompts, "r.prompt_id")
        gens = hashes("generations", sources.generations, "r.prompt_id, r.response_index")
    finally:
        con.unregister("_pids")
    if prompts.num_rows:
        prompt_ref = (
            prompts.column(1).combine_chunks().take(pc.index_in(pids, value_set=prompts.column(0).combine_chunks()))
        )
    else:
        prompt_ref = pa.nulls(len(pids), pa.binary())
    # the generations rows of each prompt (sorted by prompt, then response): one list per run of a prompt id
    runs = pc.run_end_encode(gens.column(0).combine_chunks()) if gens.num_rows else None
    if runs is None:
        response_refs = pa.nulls(len(pids), REF_SCHEMA.field("response_refs").type)
    else:
        offsets = pa.array(np.concatenate([[0], runs.run_ends.to_numpy(zero_copy_only=False)]).astype(np.int32))
        grouped = pa.ListArray.from_arrays(offsets, gens.column(1).combine_chunks())
        response_refs = grouped.take(pc.index_in(pids, value_set=runs.values))
    responses = rows.column("all_generated_responses").combine_chunks()
    return pa.Table.from_arrays(
        [
            prompt_ref,
            response_refs,
            _position(responses, _answer(rows.column("chosen"))),
            _position(responses, _answer(rows.column("rejected"))),
        ],
        schema=REF_SCHEMA,
    )


def _answer(conversation: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The content of each conversation's second message (the answer of [user, assistant]); null unless it has
    exactly two."""
    conv = conversation.combine_chunks() if isinstance(conversation, pa.ChunkedArray) else conversation
    two = pc.equal(pc.list_value_length(conv), 2).fill_null(False).to_numpy(zero_copy_only=False)
    at = np.flatnonzero(two)
    answers = pc.struct_field(pc.list_element(conv.take(pa.array(at, pa.int64())), 1), "content")
    index = np.full(len(conv), -1, np.int64)
    index[at] = np.arange(len(at))
    return answers.take(pa.array(index, mask=index < 0))


def _position(responses: pa.ListArray, texts: pa.Array) -> pa.Array:
    """Per row: the position of the first of its `responses` equal to its text (null if none)."""
    n = len(responses)
    flat = pc.list_flatten(responses)
    parent = pc.list_parent_indices(responses).to_numpy(zero_copy_only=False)
    found = np.full(n, -1, np.int64)
    if len(flat):
        # flattened values are grouped by row in order: a value's position is its distance to its row's first
        within = np.arange(len(flat)) - np.searchsorted(parent, parent, side="left")
        equal = pc.equal(flat, texts.take(pa.array(parent))).fill_null(False).to_numpy(zero_copy_only=False)
        hits = np.flatnonzero(equal)
        rows_hit, first = np.unique(parent[hits], return_index=True)
        found[rows_hit] = within[hits[first]]
    return pa.array(found.astype(np.int32), pa.int32(), mask=found < 0)


def _references_match(
    con: duckdb.DuckDBPyConnection, part: pa.Table, refs: pa.Table, hashes: list[bytes]
) -> np.ndarray:
    """Per row: whether the row is exactly what its references rebuild. Its chosen and rejected are its prompt
    and the referenced responses (the row assembled from its own texts has its hash), and each referenced row
    holds the same text: that row's stored hash, recomputed with this row's text in place of its own, is
    unchanged (so the long texts of the referenced rows need not be read)."""
    responses = part.column("all_generated_responses").combine_chunks()
    same_count = pc.equal(
        pc.list_value_length(responses).fill_null(-1),
        pc.list_value_length(refs.column("response_refs").combine_chunks()),
    )
    ok = same_count.fill_null(False).to_numpy(zero_copy_only=False).copy()
    ok &= pc.greater(pc.list_value_length(responses).fill_null(0), 0).to_numpy(zero_copy_only=False)
    if not ok.any():
        return ok
    keep = pa.array(np.flatnonzero(ok), pa.int64())
    part, refs = part.take(keep), refs.take(keep)
    prompt = part.column("prompt").combine_chunks()
    responses = part.column("all_generated_responses").combine_chunks()
    assembled = _assemble(prompt, responses, refs.column("chosen_ref"), refs.column("rejected_ref"))
    whole = part.select([c for c in part.column_names if c not in assembled])
    for name, column in assembled.items():
        whole = whole.append_column(name, column.cast(part.schema.field(name).type))
    good = np.array(
        [a == b for a, b in zip(row_hashes(whole.select(part.column_names)), (hashes[i] for i in keep.to_pylist()))]
    )
    good &= _same_texts(con, "prompts", "prompt", refs.column("prompt_ref").combine_chunks(), prompt)
    flat = _same_texts(
        con, "generations", "response", pc.list_flatten(refs.column("response_refs")), pc.list_flatten(responses)
    )
    lengths = pc.list_value_length(responses).to_numpy(zero_copy_only=False)
    good &= np.logical_and.reduceat(flat, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    ok[ok] = good
    return ok


def _assemble(
    prompt: pa.Array, responses: pa.ListArray, chosen: pa.ChunkedArray | pa.Array, rejected: pa.ChunkedArray | pa.Array
) -> dict[str, pa.Array]:
    """The REFERENCED columns of pairs rows from their texts: prompt, chosen and rejected ([{prompt, user},
    {the response at the position, assistant}]) and all_generated_responses."""
    n = len(prompt)
    offsets = responses.offsets
    if responses.offset or offsets[0].as_py():
        offsets = pc.subtract(offsets, offsets[0])
    flat = pc.list_flatten(responses)
    pairs_offsets = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))
    roles = _interleave(pa.array(["user"] * n), pa.array(["assistant"] * n))

    def turn(index) -> pa.Array:
        if isinstance(index, pa.ChunkedArray):
            index = index.combine_chunks()
        answer = flat.take(pc.add(offsets.slice(0, n), index.cast(pa.int32())))
        messages = pa.StructArray.from_arrays([_interleave(prompt, answer), roles], names=["content", "role"])
        return pa.ListArray.from_arrays(pairs_offsets, messages)

    return {
        "prompt": prompt,
        "chosen": turn(chosen),
        "rejected": turn(rejected),
        "all_generated_responses": pa.ListArray.from_arrays(offsets, flat.cast(pa.string())),
    }


def _same_texts(con: duckdb.DuckDBPyConnection, kind: str, column: str, refs: pa.Array, texts: pa.Array) -> np.ndarray:
    """Per reference: whether the `kind` row of that hash is stored and holds `texts` (byte for byte): its other
    (short) columns are read and its hash recomputed with the text."""
    k = KINDS[kind]
    rt = rows_table(kind)
    con.register("_wanted", pa.table({"h": pc.unique(refs)}))
    try:
        others = select_columns(con, k, [c for c in k.columns if c != column])
        stored = fetch_arrow(con, f"SELECT r.row_hash, {others} FROM {rt} r SEMI JOIN _wanted w ON r.row_hash = w.h")
    finally:
        con.unregister("_wanted")
    at = pc.index_in(refs, value_set=stored.column(0).combine_chunks())
    found = at.is_valid().to_numpy(zero_copy_only=False)
    if not found.any():
        return found
    rows = stored.take(at.fill_null(0))
    table = pa.table({c: (texts if c == column else rows.column(c)) for c in k.columns}).cast(k.schema)
    same = np.array([a == b for a, b in zip(row_hashes(table), refs.to_pylist())])
    return found & same


def _interleave(a: pa.Array, b: pa.Array) -> pa.Array:
    """a0, b0, a1, b1, ..."""
    both = pa.concat_arrays([a.cast(pa.string()), b.cast(pa.string())])
    n = len(a)
    return both.take(pa.array(np.stack([np.arange(n), np.arange(n) + n], axis=1).reshape(-1)))
