"""Declared row schemas of every snapshot kind (DESIGN.md, "Snapshots, rows, keys").

Like `datasets.Features`: one declaration per kind that the catalog, exports and checks all read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from builders.errors import InputError

MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])


@dataclass(frozen=True)
class Kind:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]  # canonical order and the identity of a row within a snapshot
    # trailing nullable columns added after ids were pinned: a row may omit them (null), and a null adds nothing to
    # the row's hash (builders.catalog.hashing), so rows without them keep their hash and every snapshot its id
    optional: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return self.schema.names


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "prompts",
            # a conversation: `prompt` is its last user turn, `messages` the whole (builders.conversation)
            pa.schema(
                [
                    ("prompt_id", pa.string()),
                    ("prompt", pa.string()),
                    ("source", pa.string()),
                    ("messages", pa.list_(MESSAGE)),
                ]
            ),
            ("prompt_id",),
            optional=("messages",),
        ),
        Kind(
            "generations",
            pa.schema(
                [
                    ("prompt_id", pa.string()),
                    ("response_index", pa.int32()),
                    ("response", pa.string()),
                    ("finish_reason", pa.string()),
                    ("prompt_tokens", pa.int32()),
                    ("completion_tokens", pa.int32()),
                ]
            ),
            ("prompt_id", "response_index"),
        ),
        Kind(
            "scores",
            pa.schema([("prompt_id", pa.string()), ("response_index", pa.int32()), ("score", pa.float64())]),
            ("prompt_id", "response_index"),
        ),
        Kind(
            "pairs",
            pa.schema(
                [
                    ("prompt_id", pa.string()),
                    ("prompt", pa.string()),
                    ("chosen", pa.list_(MESSAGE)),
                    ("rejected", pa.list_(MESSAGE)),
                    ("all_generated_responses", pa.list_(pa.string())),
                    ("all_rm_scores", pa.list_(pa.float64())),
                    ("score_chosen", pa.float64()),
                    ("score_rejected", pa.float64()),
                ]
            ),
            ("prompt_id",),
        ),
        Kind(
            "model",
            # only what identifies the model, so the same training twice is the same snapshot id: the run's losses
            # and timings are params (builders.train)
            pa.schema(
                [
                    ("path", pa.string()),  # where it is: generate and the pipeline find the model by it
                    ("weights_sha256", pa.string()),
                    ("base_model", pa.string()),
                    ("recipe", pa.string()),  # canonical YAML, secrets (env values, *token*) redacted
                    ("metrics", pa.string()),  # JSON text: the pair counts (train/eval_pairs_used/dropped/truncated)
                ]
            ),
            ("weights_sha256",),
        ),
        Kind(
            "preferences",
            # labelled pairs imported from a file or hub dataset (`reward train`/`reward eval` data): one row per
            # pair, as the source has it (ties included: the stages that read them count and drop those)
            pa.schema(
                [
                    ("prompt_id", pa.string()),
                    ("pair_index", pa.int32()),  # the pair's position among its prompt's pairs, in source order
                    ("prompt", pa.list_(MESSAGE)),  # the turns before the answer (a string prompt: one user turn)
                    ("chosen", pa.list_(MESSAGE)),  # the preferred answer's turn(s)
                    ("rejected", pa.list_(MESSAGE)),
                    ("score_chosen", pa.float64()),  # null where the source has no scores
                    ("score_rejected", pa.float64()),
                ]
            ),
            ("prompt_id", "pair_index"),
        ),
        Kind(
            "reward",
            # a reward model trained by `reward train` (builders/reward_train.py): the `model` kind's columns; its
            # parents are the preference data it learned from, its held-out accuracy is in the params
            pa.schema(
                [
                    ("path", pa.string()),
                    ("weights_sha256", pa.string()),
                    ("base_model", pa.string()),
                    ("recipe", pa.string()),  # canonical YAML of the RewardConfig recipe, secrets redacted
                    ("metrics", pa.string()),  # JSON text: the pair counts (train/eval pairs, ties, over max_length)
                ]
            ),
            ("weights_sha256",),
        ),
    )
}

SPLITS = ("train", "test")
# every optional column of any kind (their nulls add nothing to a row hash)
OPTIONAL_COLUMNS = frozenset(c for k in KINDS.values() for c in k.optional)


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise InputError(f"unknown snapshot kind {name!r}; kinds are: {', '.join(KINDS)}") from None


def without_unused(table: pa.Table, k: Kind) -> pa.Table:
    """`table` without the optional columns that are null in every row (what a snapshot read returns)."""
    unused = [c for c in k.optional if c in table.column_names and table.column(c).null_count == table.num_rows]
    return table.drop_columns(unused) if unused else table


def conform(table: pa.Table, k: Kind) -> pa.Table:
    """Return `table` with exactly the kind's columns, in order and types (an absent optional column as nulls); a
    clear error otherwise."""
    for name in k.optional:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, k.schema.field(name).type))
    missing = [c for c in k.columns if c not in table.column_names]
    if missing:
        raise InputError(f"{k.name} rows lack column(s) {', '.join(missing)}; expected {', '.join(k.columns)}")
    try:
        return table.select(k.columns).cast(k.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise InputError(f"{k.name} rows do not match the schema {k.schema.to_string()!r}: {e}") from None
