"""Every bench script imports: a bench that names what left the library fails here, not in a user's hands."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


def test_there_are_bench_scripts():
    assert len(BENCH) >= 5, BENCH


@pytest.mark.parametrize("script", BENCH, ids=[p.name for p in BENCH])
def test_bench_script_imports(script: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # module level only: main() runs under `if __name__ == "__main__"`
    if '__name__ == "__main__"' in script.read_text():  # a script (trivial_scorer.py is a scorer it imports)
        assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
