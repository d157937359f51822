"""Publishing: stage the Hub dataset repo (Parquet per config and split, card, plots), then upload it as ONE commit
and tag that revision with the snapshot set id.

    publish(catalog, PublishConfig("me/ultrafeedback-iterative-dpo", dry_run=True, local_dir=Path("staged")))

The staged folder is exactly what lands on the Hub. Republishing the same snapshots to the same repo revision is a
no-op (the catalog's publications table); a failure leaves no partial commit (the Hub applies a commit whole) and
records nothing. The token comes from HF_TOKEN or `hf auth login`, as huggingface_hub finds it, and is never
logged, written or put in a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

from builders import __version__
from builders.catalog import Catalog, Snapshot
from builders.config import PublishConfig
from builders.errors import InputError, IterdpoError
from builders.pairs import TRL_SCHEMA, to_trl
from builders.schemas import KINDS

MARKER = ".iterdpo-staged.json"  # in a staged folder: the files iterdpo wrote there (the only ones it may replace)


def split_name(split: str, iteration: int) -> str:
    return f"{split}_iteration_{iteration}"


def snapshot_set_id(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


@dataclass
class StagedRepo:
    folder: Path
    files: list[str]
    snapshots: dict[str, str]  # split name -> pairs snapshot id
    set_id: str

    def to_json(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "files": self.files, "snapshots": self.snapshots, "set_id": self.set_id}


@dataclass
class PublishResult:
    repo_id: str
    revision: str
    staged: StagedRepo
    dry_run: bool = False
    already_published: bool = False
    commit: str | None = None
    tag: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "dry_run": self.dry_run,
                "already_published": self.already_published, "commit": self.commit, "tag": self.tag,
                **self.staged.to_json()}


def validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id as hub_validate

    try:
        hub_validate(repo_id)
    except HFValidationError as e:
        raise InputError(f"invalid repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise InputError(f"invalid repo id {repo_id!r}: use namespace/name (your user or organisation)")


def published_snapshots(catalog: Catalog, iterations: tuple[int, ...] | None) -> dict[tuple[int, str], Snapshot]:
    """The newest complete pairs snapshot per (iteration, split) for the requested iterations."""
    found = {(s.iteration, s.split): s for s in catalog.list(kind="pairs") if s.iteration is not None
             and "shard" not in s.params}  # list is oldest first: later ones win
    built = sorted({it for it, _ in found})
    wanted = list(iterations) if iterations else built
    if not wanted:
        raise InputError(f"nothing built in catalog {catalog.path}: run `iterdpo build --iteration N` first")
    missing = [it for it in wanted if (it, "train") not in found]
    if missing:
        raise InputError(f"iteration(s) {', '.join(map(str, missing))} have no pairs (built: "
                         f"{', '.join(map(str, built)) or 'none'}); run `iterdpo build --iteration N`")
    return {(it, split): found[(it, split)] for it in sorted(wanted) for split in ("train", "test")
            if (it, split) in found}


def _features() -> dict[str, Any]:
    from datasets import Features

    return {"default": Features.from_arrow_schema(KINDS["pairs"].schema)._to_yaml_list(),
            "trl": Features.from_arrow_schema(TRL_SCHEMA)._to_yaml_list()}


def stage_repo(catalog: Catalog, repo_id: str, iterations: tuple[int, ...] | None, local_dir: Path | None,
               license: str = "mit") -> StagedRepo:
    """Write the repo folder. It is built in a scratch folder and moved into place, so it is whole or absent."""
    from cards import plots
    from cards.card import SplitInfo, render
    from cards.stats import pair_stats

    validate_repo_id(repo_id)
    snaps = published_snapshots(catalog, iterations)
    target = Path(local_dir) if local_dir else Path(tempfile.mkdtemp(prefix="iterdpo-publish-")) / "repo"
    owned = _owned_files(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(target)
    scratch = Path(tempfile.mkdtemp(prefix=f"{_scratch_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        files, infos, score_data = [], [], {}
        for (it, split), snap in snaps.items():
            name = split_name(split, it)
            table = catalog.read(snap.id)
            for config, data in (("default", table), ("trl", to_trl(table))):
                rel = f"{config}/{name}-00000-of-00001.parquet"
                (scratch / config).mkdir(exist_ok=True)
                pq.write_table(data, scratch / rel)
                files.append(rel)
            infos.append(SplitInfo(name, it, table.num_rows, snap.params.get("prompt_count", table.num_rows),
                                   (scratch / f"default/{name}-00000-of-00001.parquet").stat().st_size,
                                   snap.params.get("drops", {}), pair_stats(table), snap.id, snap.params))
            score_data[name] = {"score_chosen": table.column("score_chosen").to_pylist(),
                                "score_rejected": table.column("score_rejected").to_pylist()}
        (scratch / "plots").mkdir()
        plots.score_distributions(score_data, scratch / "plots" / "score_distributions.png")
        plots.length_by_iteration({i.iteration: i.stats for i in infos if i.name.startswith("train_")},
                                  scratch / "plots" / "length_by_iteration.png")
        files += ["plots/score_distributions.png", "plots/length_by_iteration.png"]
        ids = {i.name: i.snapshot for i in infos}
        set_id = snapshot_set_id(list(ids.values()))
        split_params = _split_params(catalog, snaps)
        card = render(repo_id, infos, _features(), set_id, __version__, split_params, license)
        # The reward on test prompts per iteration (cards/rewards.py), as its own block before Provenance.
        from cards.rewards import add_to_card

        card, reward_files = add_to_card(catalog, card, scratch, sorted({it for it, _ in snaps}))
        files += reward_files
        (scratch / "README.md").write_text(card)
        files.append("README.md")
        (scratch / MARKER).write_text(json.dumps({"files": sorted(files)}, indent=1) + "\n")
        _place(scratch, target, owned)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return StagedRepo(target, sorted(files), ids, set_id)


def _owned_files(target: Path) -> list[str] | None:
    """The files an earlier staging wrote into `target` (its marker lists them); None for a new or empty folder.
    A folder with other content and no marker is the user's: refused, never cleared."""
    if not target.exists() or not any(target.iterdir()):
        return None
    if not target.is_dir():
        raise InputError(f"--local-dir {target} is a file; choose an empty or new folder")
    try:
        return list(json.loads((target / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{target} is not empty and was not staged by iterdpo (no {MARKER}); choose an empty or "
                         f"new --local-dir") from None


def _place(scratch: Path, target: Path, owned: list[str] | None) -> None:
    """Move the staged files into `target`. A new folder is renamed into place whole; in a folder staged before,
    only iterdpo's own files (the old marker's list) are replaced or removed, so a user's files there (a git
    clone's .git, notes) are never touched."""
    if owned is None:
        if target.exists():
            target.rmdir()  # empty (checked by _owned_files)
        scratch.rename(target)
        return
    new = [str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file()]
    for rel in set(owned) - set(new):
        (target / rel).unlink(missing_ok=True)
    for rel in sorted(new, key=lambda r: r == MARKER):  # the marker last: it lists what is in place
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / rel, target / rel)
    for rel in {str(Path(r).parent) for r in owned} - {"."}:
        with contextlib.suppress(OSError):
            (target / rel).rmdir()  # only if it is now empty


def _scratch_prefix(target: Path) -> str:
    return f".iterdpo-staging-{target.name}-"


def _remove_stale_scratch(target: Path) -> None:
    """Scratch folders of a staging that was killed (kill -9 skips every cleanup): their process is gone."""
    for old in target.parent.glob(f"{_scratch_prefix(target)}*"):
        pid = old.name[len(_scratch_prefix(target)):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _split_params(catalog: Catalog, snaps: dict[tuple[int, str], Snapshot]) -> dict[str, Any]:
    """How the prompts were split and where the pool came from (for the card's rebuild commands)."""
    first = snaps[min(snaps)]
    prompts = catalog.get(first.params["prompts"]) if "prompts" in first.params else None
    if prompts is None:
        return {}
    out = dict(prompts.params)
    if prompts.parents:
        out["source"] = catalog.get(prompts.parents[0]).params.get("source")
    return out


# ---------------------------------------------------------------------------------------------------------- upload
def _hub_error(e: Exception) -> tuple[bool, str]:
    """(retryable, one-line message without secrets) for an exception from huggingface_hub or the network."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return False, "HF_HUB_OFFLINE is set: unset it to upload (or use --dry-run)"
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return False, (f"the Hub refused the request (HTTP {status}): check your token "
                           f"(`hf auth login` or HF_TOKEN) and its write access")
        return (status is None or status >= 500 or status == 429), f"HTTP {status}: {str(e).splitlines()[0][:200]}"
    if isinstance(e, (httpx.TransportError, ConnectionError, TimeoutError, OSError)):
        return True, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'network error'}"
    return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _retry(what: str, call: Callable[[], Any], cfg: PublishConfig, landed: str | None = None) -> Any:
    delay = cfg.backoff
    for attempt in range(cfg.max_retries + 1):
        try:
            return call()
        except Exception as e:  # classified below: retryable network/5xx, or a final error
            retryable, message = _hub_error(e)
            if not retryable or attempt == cfg.max_retries:
                after = (f"commit {landed} landed; rerun `iterdpo publish` to tag it" if landed
                         else "nothing was published")
                raise IterdpoError(f"{what} failed: {message}; {after}") from None
        time.sleep(delay * (0.5 + random.random()))
        delay *= 2


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def publish(catalog: Catalog, cfg: PublishConfig) -> PublishResult:
    """Stage the repo; unless dry-run, upload it as one commit, tag it, and record the publication."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    staged = stage_repo(catalog, cfg.repo_id, cfg.iterations, cfg.local_dir, cfg.license)
    result = PublishResult(cfg.repo_id, cfg.revision, staged, dry_run=cfg.dry_run)
    if cfg.dry_run:
        return result
    endpoint = constants.ENDPOINT
    prior = catalog.publication(staged.set_id, cfg.repo_id, cfg.revision, endpoint)
    if prior and prior["tag"]:
        result.already_published, result.commit, result.tag = True, prior["commit"], prior["tag"]
        return result
    token = _token()
    if not token:
        raise InputError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (or use --dry-run)")
    api = HfApi(endpoint=endpoint, token=token)
    kind = "dataset"
    tag = staged.set_id

    def tag_commit(oid: str) -> None:
        _retry("tagging the commit", lambda: api.create_tag(cfg.repo_id, tag=tag, revision=oid, repo_type=kind,
                                                            tag_message=f"iterdpo snapshot set {tag}", exist_ok=True),
               cfg, landed=oid)
        catalog.set_publication_tag(staged.set_id, cfg.repo_id, cfg.revision, endpoint, tag)
        result.commit, result.tag = oid, tag

    if prior:  # the commit landed earlier but its tag did not: only the tag is missing
        result.already_published = True
        tag_commit(prior["commit"])
        return result
    _retry("creating the repo", lambda: api.create_repo(cfg.repo_id, repo_type=kind, private=cfg.private,
                                                        exist_ok=True), cfg)
    if cfg.revision != "main":
        _retry("creating the branch", lambda: api.create_branch(cfg.repo_id, repo_type=kind, branch=cfg.revision,
                                                                exist_ok=True), cfg)
    existing = _retry("listing the repo", lambda: api.list_repo_files(cfg.repo_id, repo_type=kind,
                                                                      revision=cfg.revision), cfg)
    keep = set(staged.files) | {".gitattributes"}
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(staged.folder / rel)) for rel in staged.files]
    operations += [CommitOperationDelete(path_in_repo=path) for path in existing if path not in keep]

    def commit():
        ops = [CommitOperationAdd(path_in_repo=op.path_in_repo, path_or_fileobj=op.path_or_fileobj)
               if isinstance(op, CommitOperationAdd) else op for op in operations]  # an Add is single-use
        return api.create_commit(cfg.repo_id, ops, repo_type=kind, revision=cfg.revision,
                                 commit_message=f"iterdpo: publish snapshot set {staged.set_id[:12]}",
                                 commit_description=f"Snapshots: {json.dumps(staged.snapshots)}")

    info = _retry("the commit", commit, cfg)
    # recorded at once (the commit is on the Hub); the tag follows, and a rerun adds it if it failed
    catalog.record_publication(staged.set_id, cfg.repo_id, cfg.revision, info.oid, None,
                               list(staged.snapshots.values()), endpoint)
    tag_commit(info.oid)
    return result
