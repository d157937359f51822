"""DPO training of one iteration with TRL's DPOTrainer, from an alignment-handbook-style recipe (TRL `trl dpo` YAML).

    train(catalog, TrainConfig(iteration=1, recipe=Path("train/recipes/iteration_1.yaml")))

The dataset is the catalog's pairs of the iteration in the `trl` form (no Hub needed), unless `dataset` names a
staged folder or a hub id (then the recipe's dataset fields apply). The model is saved at the root of the output
dir and registered as a `model` snapshot whose parents are the pairs it was trained on, so the lineage shows which
model produced which data. One process trains in-process; several are launched by accelerate:

    accelerate launch --config_file train/accelerate/ddp.yaml -m train.dpo --iteration 1 --recipe R.yaml
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builders.catalog import Catalog, Snapshot
from builders.errors import InputError
from builders.models import one_line

RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class TrainConfig:
    iteration: int
    recipe: Path | None = None  # default: train/recipes/iteration_N.yaml
    model: str | None = None  # default: the recipe's model_name_or_path
    dataset: str | None = None  # default: the catalog's pairs of the iteration
    output_dir: Path | None = None  # default: the recipe's output_dir
    overwrite: bool = False


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    snapshot: Snapshot | None = None  # None on non-main processes of a distributed run

    def to_json(self) -> dict[str, Any]:
        return {"output_dir": str(self.output_dir), "metrics": self.metrics,
                "snapshot": self.snapshot.to_json() if self.snapshot else None}


def _parser():
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig))


def load_recipe(path: Path, overrides: dict[str, Any] | None = None):
    """Parse a recipe onto TRL's dataclasses; unknown keys, bad YAML or bad values fail here, before any work."""
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
    raw.update(overrides or {})
    parser = _parser()
    known = {f for dc in parser.dataclass_types for f in dc.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"recipe {path}: unknown key(s) {', '.join(unknown)} (TRL `trl dpo` options; renamed from "
                         f"alignment-handbook: torch_dtype -> dtype, dataset_mixer -> datasets, "
                         f"dataset_splits -> dataset_train_split/dataset_test_split)")
    import torch

    for flag in ("bf16", "fp16"):
        if raw.get(flag) and not torch.cuda.is_available():
            raise InputError(f"recipe {path} asks for {flag} but no CUDA GPU is available; set {flag}: false "
                             f"(see train/recipes/tiny-cpu.yaml)")
    try:
        script, training, model, mixture = parser.parse_dict(raw)
    except (ValueError, TypeError) as e:
        raise InputError(f"recipe {path}: {one_line(e)}") from None
    return script, training, model, mixture, {str(k): str(v) for k, v in env.items()}, text


def _weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _catalog_dataset(catalog: Catalog, iteration: int) -> tuple[Any, Any, list[str]]:
    import datasets

    from builders.pairs import to_trl

    train = catalog.newest("pairs", iteration, "train")
    if train is None:
        raise InputError(f"iteration {iteration} has no pairs in catalog {catalog.path}; run `iterdpo build "
                         f"--iteration {iteration}` (or pass --dataset)")
    test = catalog.newest("pairs", iteration, "test")
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
        raise InputError(f"dataset {ref!r} has no split {script.dataset_train_split!r} (splits: "
                         f"{', '.join(loaded)}); set dataset_train_split in the recipe")
    test = loaded[script.dataset_test_split] if script.dataset_test_split in loaded else None
    return loaded[script.dataset_train_split], test


def train(catalog: Catalog, cfg: TrainConfig) -> TrainResult:
    recipe_path = Path(cfg.recipe) if cfg.recipe else RECIPES / f"iteration_{cfg.iteration}.yaml"
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
    if rank == 0 and out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise InputError(f"output dir {out} exists and is not empty; pass --overwrite or choose --output-dir")
    if cfg.dataset:
        train_ds, test_ds = _hub_dataset(cfg.dataset, script)
        parents: list[str] = []
    else:
        train_ds, test_ds, parents = _catalog_dataset(catalog, cfg.iteration)
    if getattr(args.eval_strategy, "value", args.eval_strategy) == "no":
        test_ds = None

    from transformers import AutoTokenizer
    from trl import DPOTrainer

    args.model_init_kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision,
                              "attn_implementation": model_args.attn_implementation,
                              **(args.model_init_kwargs or {})}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    except Exception as e:
        raise InputError(f"model {model_args.model_name_or_path!r} cannot be loaded ({one_line(e)})") from None
    # the Trainer prints its logs on stdout, which belongs to --json: send them to stderr with the progress
    with contextlib.redirect_stdout(sys.stderr):
        trainer = DPOTrainer(model=model_args.model_name_or_path, args=args, train_dataset=train_ds,
                             eval_dataset=test_ds, processing_class=tokenizer)
        result = trainer.train()
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    history = [h for h in trainer.state.log_history if "loss" in h]
    if history:
        metrics["first_loss"], metrics["last_loss"] = float(history[0]["loss"]), float(history[-1]["loss"])
    if test_ds is not None:
        with contextlib.redirect_stdout(sys.stderr):
            metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    trainer.save_model(str(out))  # the model at the root of the output dir: a valid --model for `generate`
    snap = None
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        import pyarrow as pa

        row = {"path": str(out.resolve()), "weights_sha256": _weights_sha256(out),
               "base_model": model_args.model_name_or_path, "recipe": recipe_text,
               "metrics": json.dumps(metrics, sort_keys=True)}
        snap = catalog.register("model", pa.Table.from_pylist([row]), iteration=cfg.iteration, parents=parents,
                                params={"recipe_path": str(recipe_path), "dataset": cfg.dataset or "catalog",
                                        "world_size": trainer.args.world_size, "base_model": row["base_model"]})
    _end_distributed()
    return TrainResult(out, metrics, snap)


def _end_distributed() -> None:
    """Wait for every process, then close the process group: a gloo group left open aborts the process at exit
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":  # `accelerate launch -m train.dpo ARGS`: the `iterdpo train` command in each process
    from builders.cli import main

    main(["train", *sys.argv[1:]] if "--catalog" not in sys.argv[1:2] else
         [sys.argv[1], sys.argv[2], "train", *sys.argv[3:]])
