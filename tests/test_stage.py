"""The stage kernel on its own (builders/stage.py), with a counting scorer instead of a model: when work is
committed, what survives Ctrl-C and a failing commit, and run_stage's backend lifecycle and registration."""

from __future__ import annotations

import pyarrow as pa
import pytest

from builders.catalog import Catalog
from builders.stage import Finished, Producer, SplitWork, StageSpec, WorkArea, run_resumable, run_stage

UNITS = [f"{i:064x}" for i in range(6)]


def scored(units) -> Finished:
    return Finished(
        {u: None for u in units},
        pa.table(
            {"prompt_id": list(units), "response_index": [0] * len(units), "score": [float(int(u, 16)) for u in units]}
        ),
    )


def work(key: str = "k" * 64) -> WorkArea:
    return WorkArea(key, "scores", 1, "train", {"ranker": {"ranker": "counting"}})


def test_commit_seconds_0_commits_each_item_before_the_next_is_produced(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    seen = []

    def produce(todo):
        for u in todo:
            seen.append(set(catalog.work_units(work().key)))  # what is committed when the next unit starts
            yield scored([u])

    finished, _ = run_resumable(catalog, work(), UNITS[:3], produce, commit_seconds=0, progress=False, desc="t")
    assert finished == 3
    assert seen == [set(), {UNITS[0]}, {UNITS[0], UNITS[1]}]
    assert set(catalog.work_units(work().key)) == set(UNITS[:3])


def test_a_long_commit_interval_commits_once_at_the_end(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    seen = []

    def produce(todo):
        for u in todo:
            seen.append(len(catalog.work_units(work().key)))
            yield scored([u])

    run_resumable(catalog, work(), UNITS, produce, commit_seconds=3600, progress=False, desc="t")
    assert seen == [0] * len(UNITS)  # nothing committed while producing
    assert set(catalog.work_units(work().key)) == set(UNITS)


def test_ctrl_c_keeps_what_was_finished(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")

    def produce(todo):
        yield scored(todo[:2])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_resumable(catalog, work(), UNITS, produce, commit_seconds=3600, progress=False, desc="t")
    assert set(catalog.work_units(work().key)) == set(UNITS[:2])


def test_a_failing_commit_is_raised_once_and_not_retried_on_the_way_out(tmp_path, monkeypatch):
    catalog = Catalog(tmp_path / "c.duckdb")
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(catalog, "add_work", failing)
    with pytest.raises(OSError, match="disk full"):
        run_resumable(
            catalog, work(), UNITS, lambda todo: (scored([u]) for u in todo), commit_seconds=0, progress=False, desc="t"
        )
    assert calls == [1]


class Counting:
    """A backend that counts what the kernel asks of it."""

    built = closed = 0

    def __init__(self):
        Counting.built += 1

    def describe(self):
        return {"ranker": "counting"}

    def close(self):
        Counting.closed += 1


def run(catalog: Catalog, units, backend=None):
    seen = []

    def produce(b, items):
        seen.extend(items)
        yield scored(items)

    split = SplitWork("train", "s" * 64, {u: u for u in units}, [], lambda described, skipped: {"by": described})
    spec = StageSpec("rank", "scores", 1, "ranker", Producer(Counting, produce), commit_seconds=0)
    return run_stage(catalog, spec, [split], progress=False, backend=backend), seen


def test_run_stage_builds_the_backend_only_for_work_left_and_closes_only_its_own(tmp_path):
    Counting.built = Counting.closed = 0
    catalog = Catalog(tmp_path / "c.duckdb")
    first, seen = run(catalog, UNITS)
    assert (Counting.built, Counting.closed) == (1, 1)
    assert seen == UNITS and first.splits[0].processed == len(UNITS)
    snap = first.snapshots[0]
    assert snap.params["by"] == {"ranker": "counting"} and snap.rows == len(UNITS)

    again, seen = run(catalog, UNITS)  # everything done: no backend, the description its work recorded
    assert (Counting.built, Counting.closed) == (1, 1) and seen == []
    assert again.snapshots[0].id == snap.id and again.snapshots[0].params == snap.params

    given = Counting()
    more, seen = run(catalog, UNITS[:2] + [f"{9:064x}"], backend=given)
    assert seen == [f"{9:064x}"]  # only the unit without work
    assert Counting.closed == 1  # the caller's backend stays open
    assert more.snapshots[0].rows == 3
