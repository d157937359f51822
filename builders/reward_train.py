"""`reward train`: a reward model from labelled preference pairs, with TRL's RewardTrainer (the loss is TRL's).

    train_reward(catalog, RewardTrainConfig(data="data/ultrafeedback_pairs.jsonl", base="quickstart/models/smollm2",
                                            output_dir=Path("models/my-reward")))

The pairs (builders/preferences.py) lose their ties (equal scores: no preference) and are split by prompt: a share
of the prompts is held out. The rest train an AutoModelForSequenceClassification (one label) on the conversations
prompt + answer, rendered with the base tokenizer's chat template: what the `scalar` ranker renders, so the saved
folder is a `--ranker scalar --ranker-model DIR`. After training, the held-out pairs are scored by that ranker
(builders/reward_eval.py: the numbers `reward eval` prints), and the model is registered as a `reward` snapshot
whose parent is the data it learned from (a catalog snapshot, or the file's pairs imported as a `preferences`
snapshot), so the lineage of scores it makes reaches the labels.

The folder is written beside the output dir and moved into place when complete, with builders/train.py's marker:
a rerun of the same training finishes a run killed after the move (registers it) and replaces its own
half-finished folder; any other non-empty folder is refused without --overwrite.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders import scratch as scratch_dirs
from builders.catalog import Catalog, Snapshot
from builders.config import REWARD_RECIPE, RankConfig, RewardTrainConfig, check_threads
from builders.errors import InputError, one_line
from builders.models import model_ref, weights_sha256
from builders.preferences import (
    REWARD_KIND,
    check_fraction,
    load_preferences,
    register_import,
    split_heldout,
    without_ties,
)
from builders.train import (
    _cpu_threads,
    _datasets_bars,
    _finish,
    _marker,
    _move_into_place,
    _Progress,
    _scratch_dir,
    load_recipe,
)

WHAT = REWARD_KIND  # the scratch folders' and the snapshot's kind name
# what the reward row's `metrics` holds: counts fixed by the data, the split and the recipe (same training, same id)
COUNTS = ("pairs", "ties_dropped", "train_pairs_used", "train_pairs_dropped", "heldout_pairs")


@dataclass
class RewardTrainResult:
    output_dir: Path
    metrics: dict[str, Any]  # counts, losses and the held-out evaluation
    snapshot: Snapshot | None = None
    data_snapshot: str | None = None  # the parent: the catalog data, or the file's import
    resumed: bool = False  # an earlier run of this training had written the model: registered, not trained
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "metrics": self.metrics,
            "snapshot": self.snapshot.to_json() if self.snapshot else None,
            "data_snapshot": self.data_snapshot,
            "resumed": self.resumed,
            "warnings": self.warnings,
        }


def _parser():
    from trl import ModelConfig, RewardConfig, TrlParser

    return TrlParser((RewardConfig, ModelConfig))


def load_reward_recipe(path: Path, overrides: dict[str, Any] | None = None):
    """(RewardConfig, ModelConfig, env, stored recipe text) of a recipe; checked like a DPO recipe
    (builders.train.load_recipe). On a CPU a recipe that leaves bf16 unset trains in float32 (RewardConfig's
    default, bf16, aborts there)."""
    import torch
    import yaml

    overrides = dict(overrides or {})
    if not torch.cuda.is_available():
        with contextlib.suppress(OSError, yaml.YAMLError):
            raw = yaml.safe_load(Path(path).read_text())
            if isinstance(raw, dict) and "bf16" not in raw and "fp16" not in raw:
                overrides["bf16"] = False
    args, model_args, env, stored = load_recipe(Path(path), overrides, parser=_parser())
    return args, model_args, env, stored


def _work(recipe_text: str, base: str, data_id: str, eval_fraction: float) -> dict[str, Any]:
    """What identifies one reward training (the marker's `work`): same recipe, base, data and split, same value."""
    return {
        "stage": "reward train",
        "recipe": recipe_text,
        "base_model": model_ref(base),
        "data": data_id,
        "eval_fraction": eval_fraction,
    }


def _conversations(table) -> Any:
    """TRL's conversational preference rows (explicit prompt): what RewardTrainer renders with the chat template."""
    import datasets

    return datasets.Dataset.from_dict({c: table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")})


def _load_base(base: str, args, model_args):
    """The tokenizer and the base as a one-label sequence classifier, or one line saying why they do not load."""
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from builders.models import resolve_folder

    folder = str(resolve_folder(base, "base model"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise InputError(f"base model {base!r} cannot be loaded ({one_line(e)})", option="base") from None
    if not tokenizer.chat_template and not args.chat_template_path:
        raise InputError(
            f"base model {base!r} has no chat template: the reward model is trained on prompt + answer "
            f"conversations, as the scalar ranker scores them; set chat_template_path in the recipe",
            option="base",
        )
    # RewardTrainer seeds before it loads a model by name, so its new score head is the same each run: likewise
    transformers.set_seed(args.seed)
    kwargs = {"num_labels": 1, "dtype": model_args.dtype, **(args.model_init_kwargs or {})}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    except Exception as e:
        raise InputError(f"base model {base!r} cannot be loaded ({one_line(e)})", option="base") from None
    return tokenizer, model


def train_reward(catalog: Catalog, cfg: RewardTrainConfig) -> RewardTrainResult:
    """Train a reward model on `cfg.data`; register it as a `reward` snapshot (and a file's pairs as `preferences`)."""
    from builders.reward_eval import evaluate_pairs

    check_threads(cfg.threads)
    check_fraction(cfg.eval_fraction)
    overrides: dict[str, Any] = {}
    if cfg.output_dir:
        overrides["output_dir"] = str(cfg.output_dir)
    recipe = Path(cfg.recipe) if cfg.recipe else REWARD_RECIPE
    args, model_args, env, recipe_text = load_reward_recipe(recipe, overrides)
    os.environ.update(env)
    base = cfg.base or model_args.model_name_or_path
    if not base:
        raise InputError(f"recipe {recipe} names no model_name_or_path; pass --base", option="base")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output dir {out} is a file; choose another --output-dir", option="output_dir")
    prefs = load_preferences(catalog, cfg.data)
    labelled, ties = without_ties(prefs.table)
    if labelled.num_rows == 0:
        raise InputError(f"preference data {cfg.data}: all {ties} pairs are ties (equal scores)", option="data")
    train_rows, heldout = split_heldout(labelled, cfg.eval_fraction)
    data_id = prefs.snapshots[0] if prefs.snapshots else prefs.content_id()
    work = _work(recipe_text, base, data_id, cfg.eval_fraction)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        marker = _marker(out)
        if marker is None or marker.get("work") != work:
            what = (
                "holds the model of another training (another recipe, base model, data or split)"
                if marker
                else "exists and is not empty"
            )
            raise InputError(
                f"output dir {out} {what}; pass --overwrite to replace it or choose another --output-dir",
                option="output_dir",
            )
        if prefs.imported:
            register_import(catalog, prefs)  # the parent the marker's registration names
        finished = _finish(catalog, out, marker, True, cfg.progress, kind=WHAT)
        if finished is not None:
            return RewardTrainResult(
                out, finished.metrics, finished.snapshot, data_id, resumed=True, warnings=finished.warnings
            )
    tokenizer, model = _load_base(base, args, model_args)

    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import RewardTrainer

    scratch = _scratch_dir(out, WHAT)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch_dirs.remove_stale(WHAT, out)
    shutil.rmtree(scratch, ignore_errors=True)
    args.output_dir = str(scratch)
    if cfg.threads is not None:
        import torch

        torch._C.set_num_threads(cfg.threads)  # torch's own setter (see builders.train)
    quiet = not cfg.trainer_logs
    if quiet:
        args.disable_tqdm = True
    train_ds = _conversations(train_rows)
    eval_ds = (
        _conversations(heldout)
        if heldout.num_rows and getattr(args.eval_strategy, "value", args.eval_strategy) != "no"
        else None
    )
    try:
        with contextlib.redirect_stdout(sys.stderr), _datasets_bars(enabled=not quiet):
            trainer = RewardTrainer(
                model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
            )
            if quiet:
                for callback in {PrinterCallback, ProgressCallback, DEFAULT_PROGRESS_CALLBACK}:
                    trainer.remove_callback(callback)
                if cfg.progress:
                    trainer.add_callback(_Progress())
            used = len(trainer.train_dataset)
            counts = {
                "pairs": prefs.table.num_rows,
                "ties_dropped": ties,
                "train_pairs_used": used,
                "train_pairs_dropped": train_rows.num_rows - used,
                "heldout_pairs": heldout.num_rows,
            }
            if used == 0:
                raise InputError(
                    f"all {train_rows.num_rows} train pairs are longer than max_length {args.max_length} tokens "
                    f"(RewardTrainer drops them); raise max_length in {recipe}",
                    option="recipe",
                )
            warnings = []
            if counts["train_pairs_dropped"]:
                warnings.append(
                    f"{counts['train_pairs_dropped']} of {train_rows.num_rows} train pairs dropped: longer than "
                    f"max_length {args.max_length} tokens (raise max_length in the recipe)"
                )
            if cfg.progress:
                for w in warnings:
                    print(f"Warning: {w}", file=sys.stderr, flush=True)
                print(f"training a reward model on {counts_line(counts)}", file=sys.stderr, flush=True)
            result = trainer.train()
            metrics: dict[str, Any] = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
            history = [h for h in trainer.state.log_history if "loss" in h]
            if history:
                metrics["first_loss"], metrics["last_loss"] = float(history[0]["loss"]), float(history[-1]["loss"])
            trainer.save_model(str(scratch))
            tokenizer.save_pretrained(str(scratch))
        metrics.update(counts)
        if heldout.num_rows:
            # the held-out pairs scored by the saved folder, as `--ranker scalar` loads it: the numbers
            # `reward eval` prints for this model
            report = evaluate_pairs(
                heldout, RankConfig(ranker="scalar", ranker_model=str(scratch)), progress=cfg.progress
            )
            metrics["heldout"] = {
                k: report[k] for k in ("accuracy", "standard_error", "pairs", "ties", "prefers_longer")
            }
        import pyarrow as pa

        row = {
            "path": str(out.resolve()),
            "weights_sha256": weights_sha256(scratch),
            "base_model": model_ref(base),
            "recipe": recipe_text,
            "metrics": json.dumps({k: counts[k] for k in COUNTS}, sort_keys=True),
        }
        params = {
            "recipe_path": str(recipe),
            "data": prefs.source,
            "eval_fraction": cfg.eval_fraction,
            "base_model": row["base_model"],
            "metrics": metrics,
            **_cpu_threads(),
        }
        if metrics.get("heldout"):
            params["heldout_accuracy"] = metrics["heldout"]["accuracy"]
        parents = [data_id]
        _move_into_place(
            scratch,
            out,
            {"work": work, "row": row, "params": params, "parents": parents, "warnings": warnings},
            written_by="iterdpo reward train",
        )
        if prefs.imported:
            register_import(catalog, prefs)
        snap = catalog.register(WHAT, pa.Table.from_pylist([row]), parents=parents, params=params)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return RewardTrainResult(out, metrics, snap, data_id, warnings=warnings)


def counts_line(counts: dict[str, Any]) -> str:
    """`140 pairs (3 over max_length dropped), 35 held out; 25 ties dropped`."""
    used, dropped = counts.get("train_pairs_used", 0), counts.get("train_pairs_dropped", 0)
    parts = [f"{used} pairs" + (f" ({dropped} over max_length dropped)" if dropped else "")]
    parts.append(f"{counts.get('heldout_pairs', 0)} held out")
    line = ", ".join(parts)
    return line + (f"; {counts['ties_dropped']} ties dropped" if counts.get("ties_dropped") else "")
