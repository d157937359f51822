"""The prompts stage: import a prompt pool, then draw disjoint per-iteration train/test prompt sets.

>>> import tempfile
>>> from pathlib import Path
>>> from builders.catalog import Catalog
>>> from builders.config import BUNDLED_PROMPTS, SplitConfig
>>> from builders.prompts import import_prompts, split_prompts
>>> catalog = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb")
>>> pool = import_prompts(catalog, str(BUNDLED_PROMPTS))  # or a hub id: "openbmb/UltraFeedback"
>>> pool.snapshot.kind, pool.snapshot.iteration, pool.snapshot.rows, pool.duplicates
('prompts', None, 210, 0)
>>> sets = split_prompts(catalog, SplitConfig(iterations=2, train_size=50, test_size=10))
>>> sorted((s.iteration, s.split, s.rows) for s in sets)
[(1, 'test', 10), (1, 'train', 50), (2, 'test', 10), (2, 'train', 50)]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from builders.catalog import Catalog, Registration, Snapshot
from builders.config import PROMPT_COLUMNS, SplitConfig
from builders.conversation import canonical, conversation_id
from builders.errors import InputError, one_line
from builders.schemas import KINDS, conform

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv")


def prompt_id(text: str) -> str:
    """sha256 hex of the stripped prompt text, as HuggingFaceH4/ultrafeedback_binarized computes it."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


@dataclass
class ImportResult:
    snapshot: Snapshot
    source: str
    column: str
    read: int
    skipped_empty: int
    duplicates: int
    conversations: int = 0  # prompts that are conversations (builders.conversation)
    by_source: dict[str, Any] = field(default_factory=dict)  # --include-source/--exclude-source: names, counts

    def to_json(self) -> dict[str, Any]:
        out = self.snapshot.to_json()
        out["import"] = {k: v for k, v in asdict(self).items() if k != "snapshot"}
        return out


# ------------------------------------------------------------------------------------------------------- reading
@dataclass
class _Columns:
    """A source read into columns: the prompt column's values (strings, or conversations: lists of messages), the
    source column's, and every column name; `lines`: each value's line in a JSONL file."""

    prompts: list[Any]
    sources: list[Any] | None
    column: str
    names: list[str]
    lines: list[int] | None = None


def _pick_column(names: Sequence[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in names:
            raise InputError(f"{where}: no column {column!r}; columns found: {', '.join(names) or '(none)'}")
        return column
    for candidate in PROMPT_COLUMNS:
        if candidate in names:
            return candidate
    raise InputError(
        f"{where}: no prompt-like column ({', '.join(PROMPT_COLUMNS)}); columns found: "
        f"{', '.join(names) or '(none)'}; choose one with --column"
    )


def _sniff_binary(path: Path, head: bytes) -> None:
    """A text-format file whose bytes say otherwise gets a clear error instead of a parser's confusion."""
    if head.startswith(b"PAR1"):
        raise InputError(f"{path}: looks like a Parquet file, not {path.suffix} (rename it to .parquet)")
    if b"\x00" in head:
        raise InputError(f"{path}: binary content, not a {path.suffix} text file")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None


def _records_to_columns(records: list[Any], column: str | None, path: Path, line_of: list[int] | None) -> _Columns:
    names: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            where = f"{path}:{line_of[i]}" if line_of else f"{path} (record {i + 1})"
            raise InputError(f"{where}: expected a JSON object per record, found {type(rec).__name__}")
        for key in rec:
            if key not in names:
                names.append(key)
    col = _pick_column(names, column, str(path))
    prompts = []
    for i, rec in enumerate(records):
        value = rec.get(col)
        if value is not None and not isinstance(value, (str, list)):  # a list: a conversation
            where = f"{path}:{line_of[i]}" if line_of else f"{path} (record {i + 1})"
            raise InputError(
                f"{where}: column {col!r} is not text or a conversation (found {type(value).__name__}); "
                f"choose another with --column"
            )
        prompts.append(value)
    sources = [_as_source(rec.get("source")) for rec in records] if "source" in names else None
    return _Columns(prompts, sources, col, names, line_of)


def _as_source(value: Any) -> str | None:
    return None if value is None else str(value)


def _read_jsonl(path: Path, data: bytes, column: str | None) -> _Columns:
    records, lines = [], []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        text = _decode_line(path, n, raw)
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        lines.append(n)
    return _records_to_columns(records, column, path, lines)


def _decode_line(path: Path, n: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _read_json(path: Path, data: bytes, column: str | None) -> _Columns:
    text = _decode(path, data)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, dict) and all(isinstance(v, list) for v in doc.values()) and doc:
        lengths = {len(v) for v in doc.values()}
        if len(lengths) != 1:
            raise InputError(f"{path}: a column-oriented JSON object needs lists of equal length")
        keys = list(doc)
        doc = [dict(zip(keys, values)) for values in zip(*doc.values())]
    if not isinstance(doc, list):
        raise InputError(f"{path}: expected a JSON list of records or an object of columns, found {type(doc).__name__}")
    return _records_to_columns(doc, column, path, None)


def _arrow_to_columns(table: pa.Table, column: str | None, where: str) -> _Columns:
    names = table.column_names
    col = _pick_column(names, column, where)
    typ = table.schema.field(col).type
    text = pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)
    conversation = (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_struct(typ.value_type)
    if not (text or conversation):
        raise InputError(
            f"{where}: column {col!r} is not text or a conversation (type {typ}); choose another with --column"
        )
    sources = None
    if "source" in names:
        sources = [_as_source(v) for v in table.column("source").to_pylist()]
    return _Columns(table.column(col).to_pylist(), sources, col, names)


def _read_parquet(path: Path, column: str | None) -> _Columns:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({one_line(str(e))})") from None
    return _arrow_to_columns(table, column, str(path))


def _read_csv(path: Path, data: bytes, column: str | None) -> _Columns:
    import pyarrow.csv as pacsv

    _decode(path, data)  # a precise line number for bad bytes, which Arrow's message lacks
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: not a readable CSV file ({one_line(str(e))})") from None
    return _arrow_to_columns(table, column, str(path))


def _read_local(path: Path, column: str | None) -> _Columns:
    if path.is_dir():
        return _read_datasets_dir(path, column)
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(LOCAL_FORMATS)}")
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: the file is empty")
    if suffix == ".parquet":
        return _read_parquet(path, column)
    _sniff_binary(path, data[:4096])
    if suffix == ".jsonl":
        return _read_jsonl(path, data, column)
    if suffix == ".json":
        return _read_json(path, data, column)
    return _read_csv(path, data, column)


def _read_datasets_dir(path: Path, column: str | None) -> _Columns:
    """A folder saved by `datasets` (save_to_disk) or laid out like a Hub dataset repo."""
    import datasets

    try:
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
    except Exception as e:  # datasets raises many types; the user needs the path and the reason
        raise InputError(f"{path}: cannot load as a dataset folder ({one_line(e)})") from None
    return _dataset_to_columns(ds, None, column, str(path))


def _dataset_to_columns(ds: Any, split: str | None, column: str | None, where: str) -> _Columns:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            split = "train" if "train" in ds else (names[0] if len(names) == 1 else None)
            if split is None:
                raise InputError(f"{where}: has splits {', '.join(names)}; pick one as {where}:SPLIT")
        if split not in ds:
            raise InputError(f"{where}: no split {split!r}; splits: {', '.join(names)}")
        ds = ds[split]
    return _arrow_to_columns(ds.with_format("arrow")[:], column, where)


def _read_hub(source: str, column: str | None) -> _Columns:
    import datasets

    repo, _, split = source.partition(":")
    try:
        if not split:
            names = datasets.get_dataset_split_names(repo)
            split = "train" if "train" in names else (names[0] if len(names) == 1 else "")
            if not split:
                raise InputError(f"{repo}: has splits {', '.join(names)}; pick one as {repo}:SPLIT")
        ds = datasets.load_dataset(repo, split=split)
    except InputError:
        raise
    except Exception as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
        raise InputError(f"cannot load hub dataset {source!r}{offline}: {one_line(e)}") from None
    return _dataset_to_columns(ds, None, column, source)


def looks_local(source: str) -> bool:
    return (
        os.path.exists(source)
        or source.startswith((".", "/", "~"))
        or Path(source).suffix.lower() in LOCAL_FORMATS
        or source.count("/") > 1
    )


def read_source(source: str, column: str | None = None) -> _Columns:
    """Read a prompt source: a local file or folder, or a hub dataset id with an optional `:split`."""
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        return _read_local(path, column)
    return _read_hub(source, column)


# -------------------------------------------------------------------------------------------------------- stages
def prompts_table(cols: _Columns, where: str = "prompts") -> tuple[pa.Table, int, int]:
    """Strip, drop empty/null prompts, dedupe by prompt_id (first wins). Returns (table, empty, duplicates).
    A conversation is checked and made canonical (builders.conversation: its id, its last user turn as `prompt`,
    the whole as `messages`); a malformed one is an InputError naming its record."""
    seen: set[str] = set()
    ids, texts, sources, messages = [], [], [], []
    empty = dupes = 0
    for i, value in enumerate(cols.prompts):
        if isinstance(value, str) or value is None:
            prompt: Any = value.strip() if isinstance(value, str) else ""
        else:
            at = f"{where}:{cols.lines[i]}" if cols.lines else f"{where} (record {i + 1})"
            prompt = canonical(value, f"{at}: column {cols.column!r}") or ""
        if not prompt:
            empty += 1
            continue
        pid = prompt_id(prompt) if isinstance(prompt, str) else conversation_id(prompt)
        if pid in seen:
            dupes += 1
            continue
        seen.add(pid)
        ids.append(pid)
        texts.append(prompt if isinstance(prompt, str) else prompt[-1]["content"])
        messages.append(None if isinstance(prompt, str) else prompt)
        sources.append(cols.sources[i] if cols.sources is not None else None)
    columns: dict[str, Any] = {"prompt_id": ids, "prompt": texts, "source": pa.array(sources, pa.string())}
    if any(m is not None for m in messages):
        columns["messages"] = pa.array(messages, KINDS["prompts"].schema.field("messages").type)
    return pa.table(columns), empty, dupes


def import_prompts(
    catalog: Catalog,
    source: str,
    column: str | None = None,
    include_sources: Sequence[str] = (),
    exclude_sources: Sequence[str] = (),
) -> ImportResult:
    """Import a prompt pool from `source` and register it as a `prompts` snapshot (idempotent). `include_sources`
    / `exclude_sources`: keep only, or drop, the prompts of those `source` values (builders/sources.py)."""
    from builders.sources import filter_sources

    cols = read_source(source, column)
    table, empty, dupes = prompts_table(cols, source)
    table, by_source = filter_sources(table, include_sources, exclude_sources, source)
    if table.num_rows == 0:
        raise InputError(
            f"{source}: no prompts left: all {len(cols.prompts)} values of column {cols.column!r} are empty or null"
        )
    params = {
        "source": source,
        "column": cols.column,
        "read": len(cols.prompts),
        "skipped_empty": empty,
        "duplicates": dupes,
        **by_source,
    }
    messages = table.column("messages") if "messages" in table.column_names else None
    conversations = len(messages) - messages.null_count if messages is not None else 0
    if conversations:
        params["conversations"] = conversations
    snap = catalog.register("prompts", table, params=params)
    return ImportResult(snap, source, cols.column, len(cols.prompts), empty, dupes, conversations, by_source)


def _pool(catalog: Catalog, refs: Sequence[str]) -> tuple[pa.Table, list[str]]:
    snaps = [catalog.get(r) for r in refs]
    if not snaps:
        newest = catalog.newest("prompts")
        if newest is None:
            raise InputError(
                f"no prompt pool in catalog {catalog.path}; import prompts first (iterdpo prompts import SOURCE)"
            )
        snaps = [newest]
    for s in snaps:
        if s.kind != "prompts":
            raise InputError(f"snapshot {s.id[:12]} is a {s.kind} snapshot, not prompts")
    # every pool with the kind's columns: a pool of strings reads without `messages`, a pool of conversations with
    tables = [conform(catalog.read(s.id), KINDS["prompts"]) for s in snaps]
    pool = pa.concat_tables(tables)
    if len(tables) > 1:  # the union of several pools: a prompt present in two counts once
        import polars as pl

        pool = pl.from_arrow(pool).unique(subset=["prompt_id"], keep="first", maintain_order=True).to_arrow()
    return pool, [s.id for s in snaps]


def draw_order(prompt_ids: Sequence[str], seed: int) -> list[int]:
    """Positions ordered by sha256(seed:prompt_id): deterministic, independent of library versions and of the
    pool's order, and stable for prompts already drawn when the pool grows."""
    keys = [hashlib.sha256(f"{seed}:{pid}".encode()).digest() for pid in prompt_ids]
    return sorted(range(len(prompt_ids)), key=keys.__getitem__)


def plan_split(pool: pa.Table, cfg: SplitConfig) -> dict[tuple[int, str], pa.Table]:
    """Disjoint sets: iteration i takes block i of the seeded order; its first `test_size` prompts are the test set.

    Blocks make iteration i's sets independent of how many iterations are drawn."""
    for name in ("iterations", "train_size"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    if cfg.test_size < 0:
        raise InputError(f"test-size must be 0 or more, not {cfg.test_size}")
    block = cfg.train_size + cfg.test_size
    need = cfg.iterations * block
    if need > pool.num_rows:
        raise InputError(
            f"asked for {need} prompts ({cfg.iterations} iterations x ({cfg.train_size} train + {cfg.test_size} test)) "
            f"but the pool holds {pool.num_rows}"
        )
    order = draw_order(pool.column("prompt_id").to_pylist(), cfg.seed)
    sets: dict[tuple[int, str], pa.Table] = {}
    for i in range(cfg.iterations):
        start = i * block
        if cfg.test_size:
            sets[(i + 1, "test")] = pool.take(order[start : start + cfg.test_size])
        sets[(i + 1, "train")] = pool.take(order[start + cfg.test_size : start + block])
    return sets


def split_prompts(catalog: Catalog, cfg: SplitConfig = SplitConfig(), from_refs: Sequence[str] = ()) -> list[Snapshot]:
    """Draw and register the per-iteration prompt sets (all in one transaction)."""
    pool, pool_ids = _pool(catalog, from_refs)
    sets = plan_split(pool, cfg)
    params = {
        "seed": cfg.seed,
        "iterations": cfg.iterations,
        "train_size": cfg.train_size,
        "test_size": cfg.test_size,
        "pool_rows": pool.num_rows,
    }
    items = [
        Registration("prompts", table, iteration=it, split=split, parents=tuple(pool_ids), params=params)
        for (it, split), table in sorted(sets.items())
    ]
    return catalog.register_many(items)
