"""Scratch folders beside a target: work is written there and moved into place whole (a rename on the same
filesystem). Each is named `.iterdpo-{what}-{target name}-{pid}[-...]`, so the scratch of a process that was
killed (kill -9 skips every cleanup) is recognised and removed by the next run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def prefix(what: str, target: Path) -> str:
    return f".iterdpo-{what}-{target.name}-"


def remove_stale(what: str, target: Path) -> None:
    """Remove the scratch folders of `target` whose process is gone."""
    for old in target.parent.glob(f"{prefix(what, target)}*"):
        pid = old.name[len(prefix(what, target)) :].split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
