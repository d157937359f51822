"""Every `--help` example and every README command block runs as written after `make quickstart`, and none of them
changes the quickstart's results (issue 20: `train --help`'s example, run after the quickstart, replaced the trained
quickstart/models/iteration_1 with a tiny model).

The working directory is what `make quickstart` leaves in a checkout: data/, train/ and pipelines/ as in the
repository, and quickstart/ made by `iterdpo quickstart --workdir quickstart` itself, on the tiny generator laid
where the quickstart imports SmolLM2 (quickstart/models/smollm2: the import is skipped when a model is there). So it
is the quickstart's own pipeline, sizes, vLLM backend and recipe, and `iterdpo run pipelines/quickstart.yaml` or the
quickstart again find every step done. `iterdpo` and `python` on PATH are this checkout's (tests/forkserver.py:
each command a process of its own, forked with torch, transformers and TRL imported); no token, offline.

Each example runs in that directory with the catalog it names, and must exit 0 and leave every file of quickstart/
(and the repository files beside it) byte for byte as they were. A README block that needs the network, GPUs or a
file of the user's is listed in README_SKIPPED with the reason, and reported as skipped; every other block runs.
Only ```bash and ```python blocks are examples (```yaml blocks are recipe fragments; bare ones show output).

Cost (the suite's longest file): the quickstart fixture (a fresh process, as `make quickstart`: 4 vLLM start-ups,
3 tiny DPO runs), then ~30 commands, of which `models import-gguf` (converting the real SmolLM2 GGUF), best-of-n,
generate, train and the README's Python API block take most. Forked with the imports done, the commands spend
their time on their own work: 6-10 s less each for those that load a model.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from tests.conftest import ROOT

# a command whose --help example cannot run here (the network, GPUs): its name -> why. None today.
HELP_SKIPPED: dict[str, str] = {}
# (a string that identifies the block, why it cannot run after `make quickstart` on this machine)
README_SKIPPED = [
    (
        "make test",
        "`make quickstart` is the set-up itself (this test's working directory is what it leaves) and "
        "`make test` the whole suite",
    ),
    ("pip install", "installs packages: needs the network"),
    ("pipelines/snorkel.yaml", "the full-scale loop: Mistral-7B and UltraFeedback from the Hub, on GPUs"),
    ("openbmb/UltraFeedback", "imports UltraFeedback from the Hub: needs the network"),
    ("llm-blender/PairRM", "PairRM and AlpacaEval files from the Hub, publishing to the Hub, on GPUs"),
    ("#SBATCH", "a Slurm job script for a GPU cluster (Mistral-7B from the Hub)"),
    ("OPENAI_API_KEY", "an OpenAI-compatible server and its key: needs the network"),
    ("ray start", "a Ray cluster of GPU nodes (Mistral-7B from the Hub)"),
    ("mistralai/", "Mistral-7B from the Hub, on GPUs"),
    (
        "train/recipes/iteration_1.yaml",
        "the Snorkel recipes: bf16 on GPUs, Mistral-7B and the published dataset from the Hub",
    ),
]


def _help_examples() -> list[tuple[str, str]]:
    """(the commands whose --help shows it, the example's script) for every command of the group, each distinct
    example once."""
    from builders.cli import cli

    def walk(cmd: click.Command, path: list[str]):
        yield path, cmd
        for name in sorted(getattr(cmd, "commands", {})):
            yield from walk(cmd.commands[name], path + [name])

    scripts: dict[str, list[str]] = {}
    for path, cmd in walk(cli, ["iterdpo"]):
        assert cmd.epilog and "Example:\n" in cmd.epilog, f"`{' '.join(path)} --help` has no example"
        script = "\n".join(line.strip() for line in cmd.epilog.split("Example:\n", 1)[1].splitlines())
        scripts.setdefault(script, []).append(" ".join(path))
    return [(", ".join(names), script) for script, names in scripts.items()]


def _readme_blocks() -> list[tuple[str, str, str]]:
    """(where: README line, language, text) of every ```bash and ```python block."""
    text = (ROOT / "README.md").read_text()
    return [
        (f"README.md:{text[: m.start()].count(chr(10)) + 1}", m.group(1), m.group(2))
        for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.S | re.M)
    ]


HELP_EXAMPLES = _help_examples()
README_BLOCKS = _readme_blocks()


@dataclass
class Checkout:
    root: Path
    env: dict[str, str]
    before: dict[str, str]  # sha256 of each file that must not change

    def run(self, script: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def digest(self) -> dict[str, str]:
        """The quickstart's results and the repository files beside them."""
        out = {}
        for top in ("quickstart", "train", "pipelines", "data/ultrafeedback_sample.jsonl"):
            base = self.root / top
            for path in sorted(base.rglob("*")) if base.is_dir() else [base]:
                if path.is_file():
                    out[str(path.relative_to(self.root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out

    def assert_unchanged(self, what: str) -> None:
        now = self.digest()
        changed = sorted(p for p in set(now) | set(self.before) if now.get(p) != self.before.get(p))
        assert not changed, f"{what} changed the quickstart's results: {changed[:10]}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, tiny_models, shell_bin) -> Checkout:
    root = tmp_path_factory.mktemp("checkout")
    (root / "data").mkdir()
    for name in ("ultrafeedback_sample.jsonl", "ultrafeedback_pairs.jsonl"):  # the prompts; the labelled pairs
        shutil.copy(ROOT / "data" / name, root / "data")
    shutil.copytree(ROOT / "data" / "benchmarks", root / "data" / "benchmarks")  # prompts decontaminate's examples
    for folder in ("train", "pipelines"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_models / "generator", root / "quickstart" / "models" / "smollm2")
    env = {k: v for k, v in os.environ.items() if k not in ("ITERDPO_CATALOG", "HF_TOKEN", "PYTHONPATH")}
    env.update(
        PATH=f"{shell_bin}{os.pathsep}{env['PATH']}",  # this checkout's `iterdpo` and `python`, imports ready
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    made = Checkout(root, env, {})
    # what `make quickstart` runs, in a fresh interpreter of its own
    done = made.run(f'"{sys.executable}" -m builders.cli quickstart --workdir quickstart', timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "quickstart" / "models" / "iteration_3" / "model.safetensors").is_file()
    made.before = made.digest()
    return made


@pytest.mark.parametrize("commands, script", [pytest.param(c, s, id=c) for c, s in HELP_EXAMPLES])
def test_help_example_runs_after_the_quickstart_and_keeps_its_results(checkout, commands, script):
    if commands in HELP_SKIPPED:
        pytest.skip(f"`{commands} --help`: {HELP_SKIPPED[commands]}")
    assert "--overwrite" not in script, f"`{commands} --help`'s example replaces a folder: write somewhere new"
    done = checkout.run(script)
    assert done.returncode == 0, f"`{commands} --help`'s example failed:\n{script}\n{done.stderr[-3000:]}"
    checkout.assert_unchanged(f"`{commands} --help`'s example")
    if "import-gguf" in script:  # a 270 MB copy of SmolLM2 that nothing else reads
        shutil.rmtree(checkout.root / "models" / "smollm2")


@pytest.mark.parametrize("where, language, block", [pytest.param(*b, id=b[0]) for b in README_BLOCKS])
def test_readme_example_runs_after_the_quickstart_and_keeps_its_results(checkout, tmp_path, where, language, block):
    reasons = [reason for needle, reason in README_SKIPPED if needle in block]
    if reasons:
        pytest.skip(f"{where}: {reasons[0]}")
    if language == "python":
        script = tmp_path / "example.py"
        script.write_text(block)
        done = checkout.run(f'python "{script}"')
    else:
        done = checkout.run(block)
    assert done.returncode == 0, f"{where} failed:\n{block}\n{done.stderr[-3000:]}"
    checkout.assert_unchanged(where)


def test_every_skip_names_an_example():
    """A stale entry would hide nothing today but could hide a new example tomorrow."""
    for needle, _ in README_SKIPPED:
        assert any(needle in block for _, _, block in README_BLOCKS), f"README_SKIPPED: no block holds {needle!r}"
    assert set(HELP_SKIPPED) <= {commands for commands, _ in HELP_EXAMPLES}
