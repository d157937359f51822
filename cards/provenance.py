"""What the catalog knows about how each published split was made: the snapshots up its lineage (prompt pool ->
prompt set -> generations -> scores -> pairs) and the model that generated it, read once at publish time for the
card's recipe table, prompt format and rebuild commands."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders.decontaminate import history
from builders.models import display_name, model_identity, weights_sha256

GGUF_SOURCE = "gguf_source.json"  # what `iterdpo models import-gguf` writes into the folder (builders/gguf.py)


@dataclass
class Model:
    """A model reference as the data recorded it, and what is known of its identity."""

    ref: str  # as recorded: a hub id, or a local folder's absolute path
    name: str  # how the card names it (never a path)
    local: bool
    revision: str | None = None  # a hub id's commit
    weights_sha256: str | None = None  # a local folder's weights (as a model snapshot hashes them)
    folder_sha256: str | None = None  # the folder digest the generations recorded (all its files)
    gguf: dict[str, Any] | None = None  # gguf_source.json of a folder `models import-gguf` wrote
    trained: Any = None  # the `model` snapshot when iterdpo trained it
    trained_row: dict[str, Any] | None = None

    def identity(self) -> str:
        """`revision X` / `weights X` (12 characters), as the card's recipe table shows it."""
        if self.revision:
            return f"revision {self.revision[:12]}"
        if self.weights_sha256:
            return f"weights {self.weights_sha256[:12]}"
        if self.folder_sha256:
            return f"folder {self.folder_sha256[:12]}"
        return "not recorded"


@dataclass
class Origin:
    """How one published split was made (None where the catalog lacks that step, e.g. hand-registered data)."""

    iteration: int
    split: str
    pairs: Any
    scores: Any = None
    generations: Any = None
    prompts: Any = None  # the iteration's prompt set
    pools: list[Any] = field(default_factory=list)  # what the set was drawn from
    generator: Model | None = None
    axes: list[Axis] = field(default_factory=list)  # a combined reward's components (builders/combine.py)
    # per pool, the pools it was derived from by decontaminate/dedup, oldest (the import) first, ending with it
    pool_lineage: list[list[Any]] = field(default_factory=list)

    @property
    def sampling(self) -> dict[str, Any]:
        return (self.generations.params.get("sampling") if self.generations else None) or self.pairs.params.get(
            "generator", {}
        ).get("sampling", {})


@dataclass
class Axis:
    """One component of a combined reward, and its mean score on the chosen and on the rejected responses."""

    scores: Any  # the component's scores snapshot
    weight: float
    chosen: float | None = None
    rejected: float | None = None

    @property
    def name(self) -> str:
        """The axis as the card names it: `kind: model or function`."""
        p = self.scores.params
        kind, ref = p.get("ranker"), p.get("function") or p.get("ranker_model")
        if kind == "combine":
            return f"combine ({p.get('method')})"
        ref = display_name(str(ref)) if ref else "?"
        return f"{kind}: {ref}" if kind else ref


def axes_of(catalog, scores, pairs) -> list[Axis]:
    """The components of a combined scores snapshot (none for any other), each with its mean score on the pairs'
    chosen and rejected responses: the axis whose means differ most is the one that decided."""
    if scores is None or scores.params.get("ranker") != "combine":
        return []
    weights = scores.params.get("weights") or []
    axes = [Axis(c, w) for c, w in zip(catalog.parents(scores, "scores"), weights)]
    # a pair names its responses by text; its prompt's scored response indices, in order, give their index
    indices: dict[str, list[int]] = {}
    for r in catalog.read(scores.id).select(["prompt_id", "response_index"]).to_pylist():
        indices.setdefault(r["prompt_id"], []).append(r["response_index"])
    picked: list[tuple[str, int, int]] = []
    for row in catalog.read(pairs.id).to_pylist():
        at = indices.get(row["prompt_id"], [])
        chosen, rejected = (
            _index_of(row, at, row[side][-1]["content"], row[f"score_{side}"]) for side in ("chosen", "rejected")
        )
        if chosen is not None and rejected is not None:
            picked.append((row["prompt_id"], chosen, rejected))
    for axis in axes:
        values = {(r["prompt_id"], r["response_index"]): r["score"] for r in catalog.read(axis.scores.id).to_pylist()}
        got = [(values.get((p, c)), values.get((p, r))) for p, c, r in picked]
        got = [(c, r) for c, r in got if c is not None and r is not None]
        if got:
            axis.chosen = sum(c for c, _ in got) / len(got)
            axis.rejected = sum(r for _, r in got) / len(got)
    return axes


def _index_of(row: dict[str, Any], indices: list[int], text: str, score: float) -> int | None:
    """The response index of a pairs row's response with that text and score (the row lists its prompt's scored
    responses in index order)."""
    pairs = zip(row["all_generated_responses"], row["all_rm_scores"])
    i = next((i for i, (r, v) in enumerate(pairs) if r == text and v == score), None)
    return indices[i] if i is not None and i < len(indices) else None


def _parent(catalog, snap, kind: str):
    """The parent of `snap` of that kind (by kind, not position), or None."""
    return catalog.parent(snap, kind) if snap is not None else None


def model_of(catalog, params: dict[str, Any], generations=None, cache: dict | None = None) -> Model:
    """The generator of a generations snapshot (or of its summary in a pairs snapshot's params)."""
    ref = str(params.get("model") or "?")
    key = (ref, params.get("model_sha256"), params.get("revision"))
    if cache is not None and key in cache:
        return cache[key]
    local = "model_sha256" in params or Path(ref).is_absolute()
    model = Model(
        ref, display_name(ref), local, revision=params.get("revision"), folder_sha256=params.get("model_sha256")
    )
    trained = _parent(catalog, generations, "model") if generations is not None else None
    if trained is not None:
        model.trained = trained
        model.trained_row = catalog.read(trained.id).to_pylist()[0]
        model.weights_sha256 = model.trained_row.get("weights_sha256")
    folder = Path(ref)
    if local and folder.is_dir() and model.folder_sha256:
        # the folder is still the one that generated (same digest): read its weights' hash and GGUF origin now
        try:
            same = model_identity(ref).get("model_sha256") == model.folder_sha256
        except Exception:  # unreadable: the card says what was recorded
            same = False
        if same:
            facts = local_facts(folder)
            model.weights_sha256 = model.weights_sha256 or facts["weights_sha256"]
            model.gguf = facts["gguf"]
    if cache is not None:
        cache[key] = model
    return model


def local_facts(folder: Path) -> dict[str, Any]:
    """A local model folder's weights sha256 (None without weight files) and, when `iterdpo models import-gguf`
    made it, its gguf_source.json."""
    folder = Path(folder)
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    gguf = None
    if (folder / GGUF_SOURCE).is_file():
        try:
            gguf = json.loads((folder / GGUF_SOURCE).read_text())
        except (OSError, ValueError):
            gguf = None
    return {"weights_sha256": weights_sha256(folder) if has_weights else None, "gguf": gguf}


def origins(catalog, snaps: dict[tuple[int, str], Any]) -> dict[tuple[int, str], Origin]:
    """The lineage of each published pairs snapshot, keyed like `snaps` ((iteration, split) -> pairs)."""
    out, cache = {}, {}
    for (it, split), pairs in snaps.items():
        o = Origin(it, split, pairs)
        o.scores = _parent(catalog, pairs, "scores")
        o.generations = _parent(catalog, o.scores, "generations")
        o.axes = axes_of(catalog, o.scores, pairs)
        o.prompts = _parent(catalog, o.generations, "prompts")
        if o.prompts is None and "prompts" in pairs.params:  # hand-built lineage: the pairs name their prompts
            o.prompts = catalog.get(pairs.params["prompts"])
        o.pools = catalog.parents(o.prompts, "prompts") if o.prompts is not None else []
        o.pool_lineage = [history(catalog, p) for p in o.pools]
        gen_params = (
            o.generations.params
            if o.generations is not None and o.generations.params.get("model")
            else pairs.params.get("generator", {})
        )
        if gen_params.get("model"):
            o.generator = model_of(catalog, gen_params, o.generations, cache)
        out[(it, split)] = o
    return out


# ------------------------------------------------------------------------------------------------- chat templates
def template_family(template: str) -> str:
    """A chat template's family by its markers (what a reader recognises)."""
    for marker, name in (
        ("<|im_start|>", "ChatML"),
        ("<|start_header_id|>", "Llama 3"),
        ("[INST]", "Mistral [INST]"),
        ("<start_of_turn>", "Gemma"),
        ("<|user|>", "Zephyr <|user|>"),
    ):
        if marker in template:
            return name
    return "custom"


def render_template(template: str) -> str | None:
    """One user turn `{prompt}` rendered by the template as the generator saw it (special tokens such as
    bos_token are not recorded, so they render empty); None when it does not render without the tokenizer."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered = render_jinja_template(
            [[{"role": "user", "content": "{prompt}"}]], chat_template=template, add_generation_prompt=True
        )
        text = rendered[0][0] if isinstance(rendered, tuple) else rendered
        return text.rstrip("\n")  # the generator's answer follows; a trailing newline shows as a blank line
    except Exception:  # a template that needs its tokenizer's variables or functions
        return None


def prompt_formats(origins_: dict[tuple[int, str], Origin]) -> list[dict[str, Any]]:
    """The chat template each iteration's generator used, one entry per distinct template: iterations, generator
    names, family, sha256 and the rendering of one user turn."""
    found: dict[str, dict[str, Any]] = {}
    for (it, _split), o in sorted(origins_.items()):
        params = o.generations.params if o.generations is not None else {}
        template, sha = params.get("chat_template"), params.get("chat_template_sha256")
        if params.get("backend") == "openai" and not template:
            key = "server"
            entry = found.setdefault(key, {"kind": "server", "iterations": [], "models": []})
        elif template or sha:
            key = sha or template
            entry = found.setdefault(
                key,
                {
                    "kind": "template",
                    "iterations": [],
                    "models": [],
                    "sha256": sha,
                    "family": template_family(template) if template else "not recorded",
                    "rendered": render_template(template) if template else None,
                },
            )
        else:
            entry = found.setdefault("unknown", {"kind": "unknown", "iterations": [], "models": []})
        if it not in entry["iterations"]:
            entry["iterations"].append(it)
        name = o.generator.name if o.generator else "?"
        if name not in entry["models"]:
            entry["models"].append(name)
    return list(found.values())
