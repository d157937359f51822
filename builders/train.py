"""DPO training of one iteration with TRL's DPOTrainer, from an alignment-handbook-style recipe (TRL `trl dpo` YAML).

    train(catalog, 1, TrainConfig(recipe=Path("train/recipes/iteration_1.yaml")))

The dataset is the catalog's pairs of the iteration in the `trl` form (no Hub needed), unless `dataset` names a
staged folder or a hub id (then the recipe's dataset fields apply). The model is saved at the root of the output
dir and registered as a `model` snapshot whose parents are the pairs it was trained on, so the lineage shows which
model produced which data. One process trains in-process; several are launched by accelerate through the
launcher train/dpo.py:

    accelerate launch --config_file train/accelerate/ddp.yaml -m train.dpo --iteration 1 --recipe R.yaml
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders import scratch as scratch_dirs
from builders.catalog import Catalog, Snapshot
from builders.config import RECIPES, SPLITS, TrainConfig, check_threads
from builders.errors import InputError, one_line
from builders.models import model_ref, weights_sha256


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]  # the Trainer's metrics and the pair counts (PAIR_COUNTS)
    snapshot: Snapshot | None = None  # None on non-main processes of a distributed run
    warnings: list[str] = field(default_factory=list)
    # True when an earlier run of the same training had written the model and was stopped before registering it:
    # its weights were verified and registered, nothing was trained
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "metrics": self.metrics,
            "snapshot": self.snapshot.to_json() if self.snapshot else None,
            "warnings": self.warnings,
            "resumed": self.resumed,
        }


# what the model row's `metrics` holds: counts fixed by the data, the recipe and the tokenizer, so the same training
# gives the same row (and snapshot id); losses and timings vary with the run and are params
PAIR_COUNTS = tuple(f"{split}_pairs_{what}" for split in ("train", "eval") for what in ("used", "dropped", "truncated"))
REDACTED = "<redacted>"
# in a model folder `train` wrote: which training wrote it (`work`) and what its registration holds, so the same
# command run again finishes it (after a kill between the move into place and the registration) instead of refusing
MODEL_MARKER = ".iterdpo-model.json"
# option names that hold secrets (hub_token, api_key, ...), not ones that merely mention tokens (pad_token,
# include_tokens_per_second)
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|credentials?)$", re.IGNORECASE)
_NOT_SECRET = ("pad_token", "eos_token", "bos_token", "unk_token")


def _parser():
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig))


def load_recipe(path: Path, overrides: dict[str, Any] | None = None, parser=None):
    """Parse a recipe onto TRL's dataclasses (`parser`: a TrlParser; default the `trl dpo` one); unknown keys, bad
    YAML or bad values fail here, before any work. Returns the parsed dataclasses, the `env:` block and the recipe
    as stored (`stored_recipe`)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"recipe {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise InputError(f"recipe {path}{where}: invalid YAML ({getattr(e, 'problem', None) or one_line(e)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"recipe {path}: expected a mapping of TRL options, found {type(raw).__name__}")
    env = raw.pop("env", None) or {}
    if not isinstance(env, dict):
        raise InputError(f"recipe {path}: `env` must be a mapping of variable names to values")
    stored = stored_recipe(raw, env)
    raw.update(overrides or {})
    dpo = parser is None
    parser = parser or _parser()
    known = {f for dc in parser.dataclass_types for f in dc.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        hint = (
            "TRL `trl dpo` options; renamed from alignment-handbook: torch_dtype -> dtype, dataset_mixer -> "
            "datasets, dataset_splits -> dataset_train_split/dataset_test_split"
            if dpo
            else f"options of {', '.join(dc.__name__ for dc in parser.dataclass_types)}"
        )
        raise InputError(f"recipe {path}: unknown key(s) {', '.join(unknown)} ({hint})")
    _check_values(path, raw, parser.dataclass_types)
    import torch

    for flag in ("bf16", "fp16"):
        # bf16 on a CPU is autocast (fp32 master weights, bf16 matmuls): allowed when the recipe says `use_cpu`, as
        # the quickstart's does (1.7x less CPU per step on AVX512-BF16 cores); a GPU recipe run on a machine without
        # one is refused, as is fp16 (no fast fp16 matmuls on CPUs)
        if raw.get(flag) and not torch.cuda.is_available() and not (flag == "bf16" and raw.get("use_cpu") is True):
            raise InputError(
                f"recipe {path} asks for {flag} but no CUDA GPU is available; set {flag}: false "
                f"(see train/recipes/tiny-cpu.yaml)"
                + (", or use_cpu: true for bf16 autocast on the CPU" if flag == "bf16" else "")
            )
    try:
        parsed = parser.parse_dict(raw)
    except (ValueError, TypeError) as e:
        raise InputError(f"recipe {path}: {one_line(e)}") from None
    return (*parsed, {str(k): str(v) for k, v in env.items()}, stored)


def stored_recipe(raw: dict[str, Any], env: dict[str, Any]) -> str:
    """The recipe as the model row keeps it (hashed into the snapshot id, exported): canonical YAML of its options,
    so comments and layout do not change the id, with the values of its `env:` block and of secret-looking options
    (hub_token, ...) replaced by a placeholder: a token in a recipe must not land in the catalog or an export."""
    import yaml

    def redact(key: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: redact(str(k), v) for k, v in value.items()}
        secret = _SECRET_KEY.search(key) and not key.lower().endswith(_NOT_SECRET)
        return REDACTED if secret and isinstance(value, str) and value else value

    out = {k: redact(str(k), v) for k, v in raw.items()}
    if env:
        out["env"] = {str(k): REDACTED for k in env}
    return yaml.safe_dump(out, sort_keys=True, allow_unicode=True)


def _check_values(path: Path, raw: dict[str, Any], dataclass_types) -> None:
    """TRL's parser does not check types (`learning_rate: fast` would only fail in the optimizer, after the model
    loaded): check numbers and flags here; YAML 1.1 reads `5e-7` (no dot) as text, so numeric text is converted."""
    hints: dict[str, Any] = {}
    for dc in dataclass_types:
        with contextlib.suppress(Exception):  # a field whose annotation cannot be resolved is left to TRL
            hints.update(typing.get_type_hints(dc))
    for key, value in list(raw.items()):
        hint = hints.get(key)
        if hint is None or value is None:
            continue
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(
            a is str
            or a is Any
            or typing.get_origin(a) is not None
            or isinstance(a, type)
            and issubclass(a, (str, dict, list))
            for a in args
            if a is not type(None)
        ):
            continue  # text, enums given as text, lists and mappings: TRL and transformers check those
        if bool in args:
            if not isinstance(value, bool):
                raise InputError(f"recipe {path}: {key} must be true or false, found {value!r}")
        elif int in args or float in args:
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    value = raw[key] = float(value) if float in args else int(value)
            ok = isinstance(value, (int, float)) if float in args else isinstance(value, int)
            if isinstance(value, bool) or not ok or (isinstance(value, float) and value != value):
                kind = "a number" if float in args else "a whole number"
                raise InputError(f"recipe {path}: {key} must be {kind}, found {value!r}")


def _catalog_dataset(catalog: Catalog, iteration: int, from_refs: Sequence[str] = ()) -> tuple[Any, Any, list[str]]:
    import datasets

    from builders.pairs import to_trl
    from builders.stage import resolve_inputs

    sets = resolve_inputs(catalog, "pairs", iteration, SPLITS, from_refs, require_train=True)
    if "train" not in sets:
        raise InputError(f"the inputs name no train pairs of iteration {iteration}", option="from_refs")
    train, test = sets["train"], sets.get("test")
    train_ds = datasets.Dataset(to_trl(catalog.read(train.id)))
    test_ds = datasets.Dataset(to_trl(catalog.read(test.id))) if test else None
    return train_ds, test_ds, [s.id for s in (train, test) if s]


def _hub_dataset(ref: str, script) -> tuple[Any, Any]:
    import datasets

    try:
        loaded = datasets.load_dataset(ref, name=script.dataset_config)
    except Exception as e:  # a missing path, an unknown hub id, a config that is not there
        raise InputError(f"dataset {ref!r} (config {script.dataset_config}) cannot be loaded ({one_line(e)})") from None
    if script.dataset_train_split not in loaded:
        raise InputError(
            f"dataset {ref!r} has no split {script.dataset_train_split!r} (splits: "
            f"{', '.join(loaded)}); set dataset_train_split in the recipe"
        )
    test = loaded[script.dataset_test_split] if script.dataset_test_split in loaded else None
    return loaded[script.dataset_train_split], test


def check_budget(recipe: Path | str, max_tokens: int, prompt_tokens: int | None = None) -> str | None:
    """Does the generation budget fit the recipe's training `max_length`? None when it does, or when the recipe
    chose its `truncation_mode` explicitly (then the recipe says what happens to longer pairs); otherwise a warning
    with the numbers. `prompt_tokens`: the longest rendered prompt, when known. Raises InputError for a recipe that
    does not parse. For the pipeline: call it per iteration when the config loads, before any work."""
    import yaml

    _, args, _, _, _, _ = load_recipe(Path(recipe), {"bf16": False, "fp16": False})  # precision is not the question
    if args.max_length is None:
        return None
    need = max_tokens + (prompt_tokens or 0)
    if need <= args.max_length:
        return None
    raw = yaml.safe_load(Path(recipe).read_text()) or {}
    if "truncation_mode" in raw:
        return None
    prompt = f" + {prompt_tokens} prompt tokens" if prompt_tokens else ""
    return (
        f"generation allows {max_tokens} new tokens{prompt} but recipe {recipe} trains at max_length "
        f"{args.max_length}: longer pairs are cut to {args.max_length} tokens ({args.truncation_mode}) and pairs "
        f"whose prompt alone reaches it are dropped (counted as train_pairs_dropped); set truncation_mode in the "
        f"recipe to make that choice explicit, or raise max_length"
    )


def pair_counts(before: Any, prepared: Any, max_length: int | None, split: str) -> dict[str, int]:
    """Pairs TRL's DPOTrainer kept and dropped (its `_prepare_dataset` filters out pairs whose tokenized prompt
    reaches max_length), and those it will truncate (prompt + the longer completion past max_length; the collator
    cuts them). Counted on the prepared dataset itself, so they are TRL's own numbers."""
    import pyarrow.compute as pc

    if not hasattr(before, "__len__") or not hasattr(prepared, "__len__"):
        return {}  # streaming datasets have no length
    used = len(prepared)
    truncated = 0
    if max_length is not None and used:
        table = prepared.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")[:]
        lengths = [pc.list_value_length(table.column(c)) for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
        longest = pc.add(lengths[0], pc.max_element_wise(lengths[1], lengths[2]))
        truncated = int(pc.sum(pc.greater(longest, max_length)).as_py() or 0)
    return {
        f"{split}_pairs_used": used,
        f"{split}_pairs_dropped": len(before) - used,
        f"{split}_pairs_truncated": truncated,
    }


def _scratch_dir(out: Path, what: str = "train") -> Path:
    """Where the model is written before it is moved to `out`: beside it (same filesystem: the move is a rename).
    Named after the launcher's pid in a distributed run (torchrun's agent is every local rank's parent), so every
    process agrees on it."""
    launcher = os.getppid() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else os.getpid()
    return out.parent / f"{scratch_dirs.prefix(what, out)}{launcher}"


def _work(iteration: int, recipe_text: str, base_model: str, dataset: str | None, parents: list[str]) -> dict[str, Any]:
    """What identifies one training, as its marker records it: the same command line on the same inputs gives the
    same value (a local dataset folder by its content, catalog pairs by their snapshot ids)."""
    data: Any = sorted(parents)
    if dataset:
        from builders.models import model_identity

        data = model_identity(dataset) if Path(dataset).expanduser().exists() else dataset  # a folder's digest
    return {"iteration": iteration, "recipe": recipe_text, "base_model": model_ref(base_model), "data": data}


def _marker(out: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out / MODEL_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _finish(
    catalog: Catalog, out: Path, marker: dict[str, Any], main: bool, progress: bool, kind: str = "model"
) -> TrainResult | None:
    """The model that an earlier run of this same training moved into `out` (then it was stopped before the model
    was registered, or it is being run again): its weights verified against the marker and registered, without
    training. None when they do not verify (then it is trained again, into the same folder)."""
    try:
        row, params, parents = dict(marker["row"]), dict(marker["params"]), list(marker["parents"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (out / "config.json").is_file() or weights_sha256(out) != row.get("weights_sha256"):
        return None
    snap = None
    if main:
        import pyarrow as pa

        if progress:
            print(
                f"{out} already holds the model of this training (weights verified): registering it, not "
                f"training again",
                file=sys.stderr,
                flush=True,
            )
        row["path"] = str(out.resolve())
        snap = catalog.register(
            kind, pa.Table.from_pylist([row]), iteration=marker["work"].get("iteration"), parents=parents, params=params
        )
    return TrainResult(out, dict(params.get("metrics") or {}), snap, list(marker.get("warnings") or []), resumed=True)


def _move_into_place(scratch: Path, out: Path, marker: dict[str, Any], written_by: str = "iterdpo train") -> None:
    """Make `out` the new model. A new or empty folder, or a model folder this function wrote (its marker), is
    replaced whole: the old one is set aside first and removed after the rename, so a crash leaves the old or the
    new model there. Any other folder (allowed by --overwrite) is a user's: our files replace theirs of the same
    name and nothing else there is touched."""
    (scratch / MODEL_MARKER).write_text(json.dumps({"written_by": written_by, **marker}, sort_keys=True) + "\n")
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        scratch.rename(out)
    elif (out / MODEL_MARKER).is_file():
        old = scratch.with_name(scratch.name + "-replaced")
        out.rename(old)
        scratch.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        (scratch / MODEL_MARKER).unlink()  # the folder stays the user's: a later run must not replace it whole
        # weights of another model there would be loaded beside ours (a single file next to new shards)
        for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json"):
            for stale in out.glob(pattern):
                if not (scratch / stale.name).exists():
                    stale.unlink()
        for f in sorted(p for p in scratch.rglob("*") if p.is_file()):
            (out / f.relative_to(scratch)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, out / f.relative_to(scratch))


class _Progress:
    """A progress bar on stderr (steps, loss) in place of the Trainer's own bar and metric dicts."""

    def __new__(cls):
        from tqdm.auto import tqdm
        from transformers import TrainerCallback

        class Progress(TrainerCallback):
            bar = None

            def on_train_begin(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    self.bar = tqdm(
                        total=state.max_steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True
                    )

            def on_step_end(self, args, state, control, **kwargs):
                if self.bar is not None:
                    self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if self.bar is not None and logs and "loss" in logs:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

            def on_train_end(self, args, state, control, **kwargs):
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None

        return Progress()


def train(
    catalog: Catalog, iteration: int, cfg: TrainConfig = TrainConfig(), from_refs: Sequence[str] = ()
) -> TrainResult:
    """DPO on the iteration's pairs: those named by `from_refs`, else the newest (or `cfg.dataset`)."""
    check_threads(cfg.threads)
    recipe_path = Path(cfg.recipe) if cfg.recipe else RECIPES / f"iteration_{iteration}.yaml"
    overrides: dict[str, Any] = {}
    if cfg.model:
        overrides["model_name_or_path"] = cfg.model
    if cfg.output_dir:
        overrides["output_dir"] = str(cfg.output_dir)
    script, args, model_args, _mixture, env, recipe_text = load_recipe(recipe_path, overrides)
    os.environ.update(env)
    if not model_args.model_name_or_path:
        raise InputError(f"recipe {recipe_path} names no model_name_or_path; pass --model")
    out = Path(args.output_dir)
    rank = int(os.environ.get("RANK", "0"))
    main = rank == 0
    if main and out.exists() and not out.is_dir():
        raise InputError(f"output dir {out} is a file; choose another --output-dir")
    if cfg.dataset:
        train_ds, test_ds = _hub_dataset(cfg.dataset, script)
        parents: list[str] = []
    else:
        train_ds, test_ds, parents = _catalog_dataset(catalog, iteration, from_refs)
    work = _work(iteration, recipe_text, model_args.model_name_or_path, cfg.dataset, parents)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        # only our own marker of this very training lets a rerun in without --overwrite: a user's folder, or the
        # model of another training (another recipe, base model or data: an earlier result), is never replaced
        marker = _marker(out)
        if marker is None or marker.get("work") != work:
            if main:
                what = (
                    "holds the model of another training (another recipe, base model or pairs)"
                    if marker
                    else "exists and is not empty"
                )
                raise InputError(
                    f"output dir {out} {what}; pass --overwrite to replace it or choose another --output-dir"
                )
        else:
            finished = _finish(catalog, out, marker, main, cfg.progress)
            if finished is not None:
                return finished
            # its weights do not verify (cut short, changed): this same training is run again into the folder
    if getattr(args.eval_strategy, "value", args.eval_strategy) == "no":
        test_ds = None

    from transformers import AutoTokenizer
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK  # ProgressCallback, or the notebook's
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOTrainer

    args.model_init_kwargs = {
        "dtype": model_args.dtype,
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        **(args.model_init_kwargs or {}),
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    except Exception as e:
        raise InputError(f"model {model_args.model_name_or_path!r} cannot be loaded ({one_line(e)})") from None
    # the model is written to a scratch folder beside `out` and moved into place when complete: a killed run
    # leaves no half-written `out` (and its scratch is removed by the next run)
    scratch = _scratch_dir(out)
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch_dirs.remove_stale("train", out)
        shutil.rmtree(scratch, ignore_errors=True)
    args.output_dir = str(scratch)
    if cfg.threads is not None:
        import torch

        # torch's own setter: an in-process vLLM engine (the quickstart's generator) replaces
        # torch.set_num_threads with a no-op for the rest of the process
        torch._C.set_num_threads(cfg.threads)
    quiet = not cfg.trainer_logs
    if quiet:
        args.disable_tqdm = True  # our bar instead; the Trainer's metric dicts go with its progress callbacks
    try:
        # the Trainer prints its logs on stdout, which belongs to --json: send them to stderr with the progress
        with contextlib.redirect_stdout(sys.stderr), _datasets_bars(enabled=not quiet):
            trainer = DPOTrainer(
                model=model_args.model_name_or_path,
                args=args,
                train_dataset=train_ds,
                eval_dataset=test_ds,
                processing_class=tokenizer,
            )
            if quiet:
                for callback in {PrinterCallback, ProgressCallback, DEFAULT_PROGRESS_CALLBACK}:
                    trainer.remove_callback(callback)
                if cfg.progress:
                    trainer.add_callback(_Progress())
            counts = {
                **pair_counts(train_ds, trainer.train_dataset, args.max_length, "train"),
                **(pair_counts(test_ds, trainer.eval_dataset, args.max_length, "eval") if test_ds is not None else {}),
            }
            if counts.get("train_pairs_used") == 0:
                raise InputError(
                    f"all {counts['train_pairs_dropped']} train pairs were dropped: their prompt alone "
                    f"reaches max_length {args.max_length} tokens; raise max_length in {recipe_path}"
                )
            warnings = _count_warnings(counts, args)
            if main and cfg.progress:
                for w in warnings:
                    print(f"Warning: {w}", file=sys.stderr, flush=True)
                print(f"training {counts_line(counts)}", file=sys.stderr, flush=True)
            result = trainer.train()
            metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
            history = [h for h in trainer.state.log_history if "loss" in h]
            if history:
                metrics["first_loss"], metrics["last_loss"] = float(history[0]["loss"]), float(history[-1]["loss"])
            if test_ds is not None:
                metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
        metrics.update(counts)
        trainer.save_model(str(scratch))  # every process: ZeRO-3 gathers the weights; the main one writes
        snap = None
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(scratch))
            weights = weights_sha256(scratch)  # of these weights alone, before they join a folder
            import pyarrow as pa

            row = {
                "path": str(out.resolve()),
                "weights_sha256": weights,
                "base_model": model_ref(model_args.model_name_or_path),
                "recipe": recipe_text,
                "metrics": json.dumps({k: counts[k] for k in PAIR_COUNTS if k in counts}, sort_keys=True),
            }
            params = {
                "recipe_path": str(recipe_path),
                "dataset": cfg.dataset or "catalog",
                "world_size": trainer.args.world_size,
                "base_model": row["base_model"],
                "metrics": metrics,
                **_cpu_threads(),
            }
            # the marker holds the registration too: a run stopped after the move is finished by the next one
            _move_into_place(
                scratch, out, {"work": work, "row": row, "params": params, "parents": parents, "warnings": warnings}
            )  # the model at the root of `out`
            if cfg.progress:
                print(f"model written to {out}; registering it", file=sys.stderr, flush=True)
            snap = catalog.register(
                "model", pa.Table.from_pylist([row]), iteration=iteration, parents=parents, params=params
            )
    finally:
        if main:
            shutil.rmtree(scratch, ignore_errors=True)  # left only by a failure: the model was moved
    _end_distributed()
    return TrainResult(out, metrics, snap, warnings)


def _cpu_threads() -> dict[str, int]:
    """torch's thread count of a training on a CPU (recorded for the card's rebuild commands: `--threads`)."""
    import torch

    return {} if torch.cuda.is_available() else {"cpu_threads": torch.get_num_threads()}


def _count_warnings(counts: dict[str, int], args) -> list[str]:
    out = []
    for split in ("train", "eval"):
        dropped, used = counts.get(f"{split}_pairs_dropped", 0), counts.get(f"{split}_pairs_used", 0)
        if dropped:
            out.append(
                f"{dropped} of {dropped + used} {split} pairs dropped: their prompt alone reaches max_length "
                f"{args.max_length} tokens (raise max_length in the recipe, or set truncation_mode: keep_end)"
            )
    return out


def counts_line(counts: dict[str, int]) -> str:
    """`10 of 12 pairs (2 dropped, 3 truncated at max_length)`; the eval split likewise when there is one."""
    parts = []
    for split, label in (("train", "pairs"), ("eval", "eval pairs")):
        if f"{split}_pairs_used" not in counts:
            continue
        used, dropped = counts[f"{split}_pairs_used"], counts[f"{split}_pairs_dropped"]
        extra = [
            f"{counts[f'{split}_pairs_{w}']} {w}" for w in ("dropped", "truncated") if counts[f"{split}_pairs_{w}"]
        ]
        parts.append(
            (f"{used} of {used + dropped} {label}" if dropped else f"{used} {label}")
            + (f" ({', '.join(extra)} at max_length)" if extra else "")
        )
    return ", ".join(parts) or "a streaming dataset"


@contextlib.contextmanager
def _datasets_bars(enabled: bool):
    """datasets' map/filter bars ("Tokenizing train dataset") are noise next to ours, unless --debug."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def _end_distributed() -> None:
    """Wait for every process, then close the process group: a gloo group left open aborts the process at exit
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
