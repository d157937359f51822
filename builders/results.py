"""What a stage returns: per split, the snapshot it registered and its counts; the JSON that --json prints."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from builders.catalog import Snapshot


@dataclass
class SplitOutcome:
    """A stage's work on one split. Subclasses add their counts as fields."""

    split: str
    prompts: int
    snapshot: Snapshot | None = field(default=None, kw_only=True)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "snapshot"}
        out["snapshot"] = self.snapshot.to_json() if self.snapshot else None
        return out


@dataclass
class StageResult:
    iteration: int
    splits: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def snapshots(self) -> list[Snapshot]:
        return [s.snapshot for s in self.splits if s.snapshot]

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("splits", "seconds")}
        return {**out, "seconds": round(self.seconds, 2), "splits": [s.to_json() for s in self.splits]}
