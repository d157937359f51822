"""Labelled preference pairs: what `reward train` learns from and `reward eval` checks a scorer against.

A source is a local file (.jsonl, .json, .parquet, or a `datasets` folder), a hub dataset id (`id[:split]`), or a
catalog snapshot (id, tag or selector) of `pairs` (built by `build`) or `preferences` (an earlier import). Each row
has `chosen` and `rejected`: strings, or message lists ({role, content}); an optional `prompt` (a string or a message
list; without one, the turns chosen and rejected share are the prompt). Scores, when the source has them, are
`score_chosen`/`score_rejected` (top level, or under `metadata` as some UltraFeedback exports nest them). Every pair
is normalised to the `preferences` row: the prompt's turns, the chosen and the rejected answer's turns.

    >>> rows = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A car.", "score_chosen": 8,
    ...          "score_rejected": 2}, {"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 5,
    ...          "score_rejected": 5}]
    >>> table = preferences_table(rows, "example")
    >>> table.num_rows, table.column("chosen")[0].as_py()
    (2, [{'content': 'Blue.', 'role': 'assistant'}])
    >>> labelled, ties = without_ties(table)
    >>> labelled.num_rows, ties
    (1, 1)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from builders.catalog import Catalog, Snapshot, row_hashes, snapshot_id, sort_order
from builders.errors import InputError, NotFound, one_line
from builders.models import weights_sha256
from builders.prompts import prompt_id
from builders.schemas import KINDS, conform

if TYPE_CHECKING:
    from builders.config import RankConfig

KIND = KINDS["preferences"]
# the catalog kinds a source snapshot may be
DATA_KINDS = ("pairs", "preferences")


@dataclass
class Preferences:
    """The pairs of one source, as `preferences` rows, and where they came from."""

    table: pa.Table
    source: str
    snapshots: list[str] = field(default_factory=list)  # the catalog snapshot(s) read ([] for a file or hub data)

    @property
    def imported(self) -> bool:
        """A file or hub dataset: registered as a `preferences` snapshot when a stage records its lineage."""
        return not self.snapshots

    def content_id(self) -> str:
        """The id the `preferences` snapshot of these rows has (or will have once registered)."""
        table = conform(self.table, KIND)
        hashes = row_hashes(table)
        return snapshot_id(KIND.name, None, None, (hashes[i] for i in sort_order(table, KIND).to_pylist()))


# ---------------------------------------------------------------------------------------------------------- reading
def load_preferences(catalog: Catalog | None, source: str) -> Preferences:
    """The pairs of `source` (a local file or folder, a catalog snapshot, or a hub dataset id[:split])."""
    path = Path(source).expanduser()
    if path.exists():
        return Preferences(preferences_table(_read_local(path), source), source)
    if catalog is not None:
        try:
            snap = catalog.get(source)
        except NotFound:
            snap = None
        if snap is not None:
            return Preferences(snapshot_table(catalog, snap), source, [snap.id])
    if source.startswith((".", "/", "~")) or path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        raise InputError(f"preference data {source}: no such file", option="data")
    return Preferences(preferences_table(_read_hub(source), source), source)


def snapshot_table(catalog: Catalog, snap: Snapshot) -> pa.Table:
    """A `pairs` or `preferences` snapshot's rows as `preferences` rows."""
    if snap.kind not in DATA_KINDS:
        raise InputError(
            f"snapshot {snap.id[:12]} is a {snap.kind} snapshot; preference data is a pairs or preferences "
            f"snapshot, or a file",
            option="data",
        )
    rows = catalog.read(snap.id)
    if snap.kind == "preferences":
        return conform(rows, KIND)
    return preferences_table(
        rows.select(["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]).to_pylist(), snap.id[:12]
    )


def _read_local(path: Path) -> list[dict[str, Any]]:
    try:
        if path.is_dir():
            import datasets

            loaded = (
                datasets.load_from_disk(str(path))
                if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                else datasets.load_dataset(str(path))
            )
            return _first_split(loaded, str(path)).to_list()
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
    except InputError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, pa.ArrowException) as e:
        raise InputError(f"preference data {path}: cannot be read ({one_line(e)})", option="data") from None
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise InputError(f"preference data {path}:{n}: not JSON ({one_line(e)})", option="data") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InputError(f"preference data {path}: not JSON ({one_line(e)})", option="data") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise InputError(f"preference data {path}: expected a JSON list of pairs", option="data")
        return data
    raise InputError(
        f"preference data {path}: unknown file type {suffix or '(none)'}; use .jsonl, .json or .parquet",
        option="data",
    )


def _first_split(loaded: Any, where: str, split: str | None = None) -> Any:
    if not hasattr(loaded, "keys"):
        return loaded
    if split is not None:
        if split not in loaded:
            raise InputError(
                f"preference data {where}: no split {split!r} (splits: {', '.join(loaded)})", option="data"
            )
        return loaded[split]
    return loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]


def _read_hub(source: str) -> list[dict[str, Any]]:
    import datasets

    repo, _, split = source.partition(":")
    try:
        loaded = datasets.load_dataset(repo)
    except Exception as e:  # offline, unknown repo, a file that is not there
        raise InputError(f"preference data {source!r} cannot be loaded ({one_line(e)})", option="data") from None
    return _first_split(loaded, source, split or None).to_list()


# ---------------------------------------------------------------------------------------------------- normalising
def preferences_table(records: Sequence[Any], where: str) -> pa.Table:
    """`preferences` rows from records with chosen/rejected (and optional prompt and scores); one line naming the
    row for anything that is not a preference pair."""
    if not records:
        raise InputError(f"preference data {where} holds no pairs", option="data")
    first = records[0]
    if not isinstance(first, dict) or "chosen" not in first or "rejected" not in first:
        found = ", ".join(sorted(first)) if isinstance(first, dict) else type(first).__name__
        raise InputError(
            f"preference data {where} has no chosen/rejected columns (found: {found}); each pair needs `chosen` and "
            f"`rejected` (strings or message lists) and, for strings, a `prompt`",
            option="data",
        )
    cols: dict[str, list] = {name: [] for name in KIND.columns}
    seen: dict[str, int] = {}
    for n, rec in enumerate(records, start=1):
        try:
            prompt, chosen, rejected = _pair(rec)
            scores = [_score(rec, side) for side in ("score_chosen", "score_rejected")]
        except ValueError as e:
            raise InputError(f"preference data {where}, row {n}: {e}", option="data") from None
        pid = conversation_id(prompt)
        cols["prompt_id"].append(pid)
        cols["pair_index"].append(seen.get(pid, 0))
        seen[pid] = seen.get(pid, 0) + 1
        cols["prompt"].append(prompt)
        cols["chosen"].append(chosen)
        cols["rejected"].append(rejected)
        cols["score_chosen"].append(scores[0])
        cols["score_rejected"].append(scores[1])
    return pa.Table.from_pydict(cols, schema=KIND.schema)


def conversation_id(prompt: list[dict[str, str]]) -> str:
    """A one-turn prompt's id is its text's (`prompt_id`, as everywhere in iterdpo); a longer conversation's is the
    sha256 of its turns as canonical JSON."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt_id(prompt[0]["content"])
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _messages(value: Any, role: str, what: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"content": value, "role": role}]
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        return [{"content": m["content"], "role": m["role"]} for m in value]
    raise ValueError(f"{what} must be a string or a non-empty list of {{role, content}} messages, not {value!r:.80}")


def _pair(rec: Any) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        raise ValueError("no chosen/rejected")
    chosen = _messages(rec["chosen"], "assistant", "chosen")
    rejected = _messages(rec["rejected"], "assistant", "rejected")
    raw_prompt = rec.get("prompt")
    if raw_prompt is not None and raw_prompt != "":
        prompt = _messages(raw_prompt, "user", "prompt")
        # the ultrafeedback_binarized layout: chosen/rejected repeat the prompt's turns before the answer
        for answer in (chosen, rejected):
            if answer[: len(prompt)] == prompt and len(answer) > len(prompt):
                del answer[: len(prompt)]
    elif isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise ValueError("no prompt: give a `prompt`, or message lists that start with the prompt's turns")
    else:
        raise ValueError("no prompt: string answers need a `prompt` column")
    if not any(m["content"].strip() for m in prompt):
        raise ValueError("the prompt is empty")
    return prompt, chosen, rejected


def _score(rec: dict[str, Any], name: str) -> float | None:
    value = rec.get(name)
    if value is None and isinstance(rec.get("metadata"), dict):
        value = rec["metadata"].get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, not {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------------------- choosing
def without_ties(table: pa.Table) -> tuple[pa.Table, int]:
    """The pairs whose labels prefer one answer (scores equal: a tie, no preference), and the number of ties."""
    sc, sr = table.column("score_chosen"), table.column("score_rejected")
    tie = pc.fill_null(pc.equal(sc, sr), False)
    return table.filter(pc.invert(tie)), int(pc.sum(tie).as_py() or 0)


def heldout_prompts(prompt_ids: Sequence[str], fraction: float) -> set[str]:
    """The prompts held out for evaluation: `fraction` of the distinct prompts (at least one when fraction > 0),
    the first by sha256 of their id, so the choice depends on the prompts alone (not their order, nor the data
    beside them) and no prompt is on both sides."""
    check_fraction(fraction)
    distinct = sorted(set(prompt_ids), key=lambda p: hashlib.sha256(f"heldout:{p}".encode()).hexdigest())
    if fraction == 0:
        return set()
    if len(distinct) < 2:
        raise InputError(
            f"eval_fraction {fraction} needs pairs of at least 2 prompts to hold some out; this data has "
            f"{len(distinct)} (or set it to 0)",
            option="eval_fraction",
        )
    k = min(max(1, round(fraction * len(distinct))), len(distinct) - 1)
    return set(distinct[:k])


def split_heldout(table: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(train, held-out) pairs, by prompt (`heldout_prompts`)."""
    held = heldout_prompts(table.column("prompt_id").to_pylist(), fraction)
    mask = pc.is_in(table.column("prompt_id"), pa.array(sorted(held), pa.string()))
    return table.filter(pc.invert(mask)), table.filter(mask)


def check_fraction(fraction: Any) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise InputError(
            f"eval_fraction must be a number from 0 (hold nothing out) to below 1, not {fraction!r}",
            option="eval_fraction",
        )


def register_import(catalog: Catalog, prefs: Preferences) -> Snapshot:
    """A file's or hub dataset's pairs as a `preferences` snapshot (the same content: the same id, a no-op)."""
    return catalog.register(
        KIND.name, prefs.table, params={"source": prefs.source, "pairs": prefs.table.num_rows, "stage": "import"}
    )


def prompt_text(prompt: list[dict[str, str]]) -> str:
    """The prompt as rankers take it (a string): the text of a one-turn prompt; of a conversation, its last user
    turn (the rankers score an answer to one prompt)."""
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def answer_text(answer: list[dict[str, str]]) -> str:
    """An answer's text as rankers take it: its turns' contents (one turn: that turn's text)."""
    return "\n\n".join(m["content"] for m in answer)


# ------------------------------------------------- reward snapshots: the pairs a reward model held out, and its model
REWARD_KIND = "reward"  # what `reward train` registers (builders/reward_train.py)


def heldout_of(catalog: Catalog, reward: Snapshot) -> tuple[Preferences, Any]:
    """A reward snapshot's held-out pairs (recomputed from its parent data and its eval_fraction), and the data."""
    parents = catalog.parents(reward)
    if not parents:
        raise InputError(f"reward snapshot {reward.id[:12]} records no training data", option="data")
    prefs = Preferences(snapshot_table(catalog, parents[0]), parents[0].id, [parents[0].id])
    labelled, _ = without_ties(prefs.table)
    _, heldout = split_heldout(labelled, float(reward.params.get("eval_fraction", 0)))
    if heldout.num_rows == 0:
        raise InputError(f"reward snapshot {reward.id[:12]} held no pairs out (eval_fraction 0)", option="data")
    return prefs, heldout


def model_path(catalog: Catalog, reward: Snapshot) -> str:
    return catalog.read(reward.id).column("path")[0].as_py()


def learned_from(catalog: Catalog, cfg: RankConfig) -> list[str]:
    """[the `reward` snapshot] of a scalar ranker whose model `reward train` made (matched by the sha256 of its
    weights, wherever the folder is now), else []: `rank` records it as a parent of the scores."""
    if cfg.ranker != "scalar" or not Path(cfg.ranker_model).expanduser().is_dir():
        return []
    snaps = catalog.list(kind=REWARD_KIND)
    if not snaps:
        return []
    digest = weights_sha256(Path(cfg.ranker_model).expanduser())
    for snap in reversed(snaps):
        if catalog.read(snap.id).column("weights_sha256")[0].as_py() == digest:
            return [snap.id]
    return []
