"""The Hub side of publishing, shared by datasets (`publish`) and models (`publish-model`).

Staging: a repo folder is built in a scratch folder beside its target and moved into place, so it is whole or
absent. A folder iterdpo staged before holds a marker listing the files iterdpo wrote there; only those are ever
replaced or removed, and a non-empty folder without the marker is the user's and is refused.

Upload: ONE commit with every staged file (stale files of earlier publications deleted in it), then a tag. The
publication is recorded as soon as the commit lands, so a failed tag is added by the next run without a second
commit, and publishing the same snapshots to the same repo revision again sends nothing. A commit whose answer was
lost (a 5xx or a dropped connection after the Hub applied it, or the process killed while it was in flight) is
found in the revision's history by the snapshot set id its message carries, before any commit is sent again. The
token comes from HF_TOKEN or `hf auth login`, as huggingface_hub finds it, is checked with the Hub before anything
is staged (`check_token`), and is never logged, written or put in a message.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builders import scratch as scratch_dirs
from builders.catalog import Catalog
from builders.errors import InputError, IterdpoError, one_line

MARKER = ".iterdpo-staged.json"  # in a staged folder: the files iterdpo wrote there (the only ones it may replace)


def snapshot_set_id(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------- staging
@dataclass
class Staging:
    folder: Path  # the scratch folder to write into
    target: Path  # where it lands
    files: list[str] = field(default_factory=list)  # relative paths written (what is uploaded)


@contextlib.contextmanager
def staging(
    local_dir: Path | None, prefix: str = "iterdpo-publish-", stamp: dict[str, Any] | None = None
) -> Iterator[Staging]:
    """Yield a scratch folder; when the block ends without error its files are moved into `local_dir` (default: a
    new temporary folder). The block appends every file it writes to `files`. `stamp` (what decided the content,
    e.g. the snapshot set id) is recorded in the marker with each file's size, for `staged_as`."""
    target = Path(local_dir) if local_dir else Path(tempfile.mkdtemp(prefix=prefix)) / "repo"
    owned = _owned_files(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch_dirs.remove_stale("staging", target)
    scratch = Path(
        tempfile.mkdtemp(prefix=f"{scratch_dirs.prefix('staging', target)}{os.getpid()}-", dir=target.parent)
    )
    try:
        st = Staging(scratch, target)
        yield st
        marker: dict[str, Any] = {"files": sorted(st.files)}
        if stamp is not None:
            marker.update(stamp=stamp, sizes={f: (scratch / f).stat().st_size for f in st.files})
        (scratch / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        _place(scratch, target, owned)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def staged_as(local_dir: Path | None, stamp: dict[str, Any]) -> list[str] | None:
    """The files of `local_dir` when an earlier staging with this same stamp left them all in place (same sizes);
    None when the folder must be staged (again). Staging the same snapshots twice is then a no-op in seconds."""
    if local_dir is None:
        return None
    try:
        marker = json.loads((Path(local_dir) / MARKER).read_text())
        if marker.get("stamp") != json.loads(json.dumps(stamp)):  # as stored: tuples become lists
            return None
        sizes = marker["sizes"]
        files = list(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for rel in files:
        path = Path(local_dir) / rel
        if not path.is_file() or path.stat().st_size != sizes.get(rel):
            return None
    return files


def _owned_files(target: Path) -> list[str] | None:
    """The files an earlier staging wrote into `target` (its marker lists them); None for a new or empty folder.
    A folder with other content and no marker is the user's: refused, never cleared."""
    if not target.exists():
        return None
    if not target.is_dir():
        raise InputError(f"local_dir {target} is a file; choose an empty or new folder", option="local_dir")
    if not any(target.iterdir()):
        return None
    try:
        return list(json.loads((target / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"{target} is not empty and was not staged by iterdpo (no {MARKER}); choose an empty or new --local-dir"
        ) from None


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


# ---------------------------------------------------------------------------------------------------------- upload
@dataclass(frozen=True)
class HubTarget:
    repo_id: str
    repo_type: str  # "dataset" or "model"
    revision: str = "main"  # the branch to commit to
    private: bool = False
    max_retries: int = 5  # network errors and 5xx, with exponential backoff
    backoff: float = 1.0
    command: str = "iterdpo publish"  # named in "rerun ... to tag it"
    # the remote files iterdpo owns (fnmatch patterns; one without a folder: root files only): stale ones are
    # deleted in the commit, any other file of the repo (a user's eval results, docs) is left alone
    managed: tuple[str, ...] = ("*",)
    license: str | None = None  # recorded in the commit description


@dataclass
class Uploaded:
    already_published: bool
    commit: str | None = None
    tag: str | None = None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The network failures of huggingface_hub's HTTP client (a refused or dropped connection, a timeout, a reply
    cut off): httpx2's since huggingface_hub 1.x moved to it, httpx's for older releases."""
    found: list[type[Exception]] = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(__import__(module).TransportError)
    return tuple(found)


def hub_error(e: Exception) -> tuple[bool, str]:
    """(retryable, one-line message without secrets) for an exception from huggingface_hub or the network."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return False, "HF_HUB_OFFLINE is set: unset it to upload (or use --dry-run)"
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return False, (
                f"the Hub refused the request (HTTP {status}): check your token "
                f"(`hf auth login` or HF_TOKEN) and its write access"
            )
        return (status is None or status >= 500 or status == 429), f"HTTP {status}: {one_line(str(e), 200)}"
    if isinstance(e, (*_transport_errors(), ConnectionError, TimeoutError, OSError)):
        return True, f"{type(e).__name__}: {one_line(str(e), 200) or 'network error'}"
    return False, f"{type(e).__name__}: {one_line(str(e), 200)}"


def retry(
    what: str, call: Callable[[], Any], target: HubTarget, landed: str | None = None, after: str | None = None
) -> Any:
    """`call()`, retried on network errors and 5xx with exponential backoff; a final failure is one line saying
    what state the repo is in (`after`, default: nothing was published)."""
    delay = target.backoff
    for attempt in range(target.max_retries + 1):
        try:
            return call()
        except Exception as e:  # classified below: retryable network/5xx, or a final error
            retryable, message = hub_error(e)
            if not retryable or attempt == target.max_retries:
                after = (
                    f"commit {landed} landed; rerun `{target.command}` to tag it"
                    if landed
                    else after or "nothing was published"
                )
                raise IterdpoError(f"{what} failed: {message}; {after}") from None
        time.sleep(delay * (0.5 + random.random()))
        delay *= 2


def token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def check_token(target: HubTarget) -> str:
    """The token, checked with the Hub (whoami) before anything is staged, so a missing, refused or read-only token
    fails in seconds rather than after the whole folder is written."""
    from huggingface_hub import HfApi, constants

    secret = token()
    if not secret:
        raise InputError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (or use --dry-run)")
    api = HfApi(endpoint=constants.ENDPOINT, token=secret)
    info = retry("checking the Hugging Face token", lambda: api.whoami(token=secret), target)
    role = ((info or {}).get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise InputError(
            "the Hugging Face token is read-only: create one with write access "
            "(https://huggingface.co/settings/tokens) and `hf auth login` with it, or set HF_TOKEN"
        )
    return secret


def _owned(path: str, pattern: str) -> bool:
    """A pattern without a folder matches files at the repo's root only (`*.json`: config.json, not evals/x.json)."""
    return fnmatch.fnmatchcase(path, pattern) and ("/" in pattern or "/" not in path)


def commit_title(set_id: str) -> str:
    return f"iterdpo: publish snapshot set {set_id[:12]}"


def landed_commit(api, target: HubTarget, set_id: str) -> tuple[str, bool] | None:
    """(commit, tagged) of this snapshot set's commit in the target revision's history, if one landed: its message
    carries the set id (older publications: the title with its first 12 characters). None when none did."""
    commits = api.list_repo_commits(target.repo_id, repo_type=target.repo_type, revision=target.revision)
    oid = next(
        (c.commit_id for c in commits if set_id in f"{c.title}\n{c.message}" or c.title == commit_title(set_id)), None
    )
    if oid is None:
        return None
    tags = api.list_repo_refs(target.repo_id, repo_type=target.repo_type).tags
    return oid, any(t.name == set_id and t.target_commit == oid for t in tags)


def recorded(catalog: Catalog, target: HubTarget, set_id: str) -> dict[str, Any] | None:
    """The catalog's record of this snapshot set's publication to the target repo revision (on this endpoint)."""
    from huggingface_hub import constants

    return catalog.publication(set_id, target.repo_id, target.revision, constants.ENDPOINT)


def upload(
    catalog: Catalog, target: HubTarget, folder: Path, files: list[str], set_id: str, snapshots: dict[str, str]
) -> Uploaded:
    """Commit `files` of `folder` to the repo as one commit, tag it `set_id`, and record the publication."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    endpoint = constants.ENDPOINT
    repo_id, kind, revision = target.repo_id, target.repo_type, target.revision
    prior = recorded(catalog, target, set_id)
    if prior and prior["tag"]:
        return Uploaded(True, prior["commit"], prior["tag"])
    secret = token()
    if not secret:
        raise InputError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (or use --dry-run)")
    api = HfApi(endpoint=endpoint, token=secret)

    def tag_commit(oid: str, already: bool) -> Uploaded:
        retry(
            "tagging the commit",
            lambda: api.create_tag(
                repo_id,
                tag=set_id,
                revision=oid,
                repo_type=kind,
                tag_message=f"iterdpo snapshot set {set_id}",
                exist_ok=True,
            ),
            target,
            landed=oid,
        )
        catalog.set_publication_tag(set_id, repo_id, revision, endpoint, set_id)
        return Uploaded(already, oid, set_id)

    if prior:  # the commit landed earlier but its tag did not: only the tag is missing
        return tag_commit(prior["commit"], True)
    retry(
        "creating the repo",
        lambda: api.create_repo(repo_id, repo_type=kind, private=target.private, exist_ok=True),
        target,
    )
    if revision != "main":
        retry(
            "creating the branch",
            lambda: api.create_branch(repo_id, repo_type=kind, branch=revision, exist_ok=True),
            target,
        )
    # an earlier run's commit whose answer was lost (or whose process was killed) is on the Hub but not in the
    # catalog: record it instead of committing the same files a second time
    landed = retry("reading the repo's history", lambda: landed_commit(api, target, set_id), target)
    if landed is not None:
        oid, tagged = landed
        catalog.record_publication(
            set_id, repo_id, revision, oid, set_id if tagged else None, list(snapshots.values()), endpoint
        )
        return Uploaded(True, oid, set_id) if tagged else tag_commit(oid, True)
    existing = retry(
        "listing the repo", lambda: api.list_repo_files(repo_id, repo_type=kind, revision=revision), target
    )
    keep = set(files) | {".gitattributes"}
    deletes = [
        CommitOperationDelete(path_in_repo=path)
        for path in existing
        if path not in keep and any(_owned(path, pattern) for pattern in target.managed)
    ]

    tries = 0

    def commit() -> str:
        nonlocal tries
        tries += 1
        # the previous try may have landed with its answer lost (a 500, a dropped connection): look before resending
        if tries > 1 and (again := landed_commit(api, target, set_id)) is not None:
            return again[0]
        adds = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files]  # single-use
        return api.create_commit(
            repo_id,
            adds + deletes,
            repo_type=kind,
            revision=revision,
            commit_message=commit_title(set_id),
            commit_description=f"Snapshot set: {set_id}\nSnapshots: {json.dumps(snapshots)}"
            + (f"\nLicense: {target.license}" if target.license else ""),
        ).oid

    oid = retry(
        "the commit",
        commit,
        target,
        after=f"if it reached the Hub, rerun `{target.command}`: it finds the commit and tags it, without "
        f"sending it again",
    )
    # recorded at once (the commit is on the Hub); the tag follows, and a rerun adds it if it failed
    catalog.record_publication(set_id, repo_id, revision, oid, None, list(snapshots.values()), endpoint)
    return tag_commit(oid, False)
