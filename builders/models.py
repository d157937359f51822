"""Model references: local folders or hub ids, and the identity a snapshot records for them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from builders.errors import InputError, one_line


def _files_digest(path: Path) -> str:
    """Identity of a local model folder: contents of small files, size and head/tail of large ones (weights)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 64 * 2**20:
                h.update(fh.read())
            else:
                h.update(fh.read(2**20))
                fh.seek(-(2**20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()


def weights_sha256(folder: Path) -> str:
    """The identity of a trained model: sha256 over its weight files (safetensors, else .bin), in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_ref(model: str) -> str:
    """How a snapshot records a model: a local folder by its absolute path (the same folder whatever the working
    directory), a hub id as is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def display_name(model: str) -> str:
    """How a model is named in anything published: a hub id as is, a local folder by its name (never a path)."""
    path = Path(model).expanduser()
    # a hub id is `name` or `namespace/name` (a dataset's may add `:split`); anything else is a local path
    if path.is_absolute() or path.exists() or model.count("/") > 1 or model.startswith((".", "~")):
        return path.name or model
    return model


def model_identity(model: str, revision: str | None = None) -> dict[str, Any]:
    """What the snapshot records about the model: a local folder's content digest, or a hub id's resolved commit."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model {model}: not a folder")
        return {"model": str(path.resolve()), "model_sha256": _files_digest(path)}
    import huggingface_hub
    from huggingface_hub import constants  # a submodule: `huggingface_hub.constants` is not an attribute in 2.x

    try:
        if constants.HF_HUB_OFFLINE:
            folder = huggingface_hub.snapshot_download(
                model, revision=revision, local_files_only=True, allow_patterns=["config.json"]
            )
            return {"model": model, "revision": Path(folder).name}
        return {"model": model, "revision": huggingface_hub.model_info(model, revision=revision).sha}
    except Exception as e:  # offline cache miss, unknown repo, no network: the user must fix the model argument
        raise InputError(f"model {model!r} cannot be loaded (not a local folder; hub: {one_line(e)})") from None


def served_identity(model: str) -> dict[str, Any]:
    """`model_identity` for the openai backend: a local folder as there; any other name is the one the server
    serves (`--model my-served-model`), resolved by the server, so neither the Hub nor the disk is asked. What the
    server reports about it (GET /v1/models) is recorded by the backend (OpenAIGenerator.describe)."""
    if Path(model).expanduser().exists():
        return model_identity(model)
    return {"model": model}


def resolve_folder(ref: str, what: str = "model") -> Path:
    """A local folder, or a hub repo's snapshot folder (downloaded, or found in the HF cache when offline)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{what} {ref}: not a folder")
        return path
    import huggingface_hub
    from huggingface_hub import constants

    try:
        return Path(huggingface_hub.snapshot_download(ref, local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as e:  # offline cache miss, unknown repo, no network: the user must fix the argument
        raise InputError(f"{what} {ref!r} cannot be loaded (not a local folder; hub: {one_line(e)})") from None
