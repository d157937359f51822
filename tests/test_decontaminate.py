"""`prompts decontaminate` as a user runs it: a pool of real UltraFeedback prompts with planted copies and
paraphrases of real benchmark prompts (MT-Bench, data/benchmarks/) and prompts that only share a stock phrase with
one; the cleaned pool's lineage and params, the split drawn from it, the dataset card's section, reruns, bad input."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from builders.catalog import Catalog
from builders.config import BuildConfig, PublishConfig
from builders.prompts import prompt_id
from tests.conftest import ROOT, SAMPLE
from tests.test_cards import _shims

MT_BENCH = ROOT / "data" / "benchmarks" / "mt_bench.jsonl"
MT = {json.loads(line)["question_id"]: json.loads(line)["prompt"] for line in MT_BENCH.read_text().splitlines()}
OWN_EVAL = [  # a user's own eval set, in another column
    "Could you provide a brief summary of the plot of Hamlet?",
    "Name the planets of the solar system in order from the Sun.",
]
PLANTED = {
    "exact": [MT[104].upper(), "  " + MT[122].replace(" ", "   ")],  # case and spacing aside, MT-Bench's text
    "paraphrase": [
        "What is the probability of rolling a total of at least three when you roll two dice?",  # MT-Bench 114
        "David has 3 sisters, and each of them has 1 brother. How many brothers does David have?",  # 104
        "Summarize the plot of Hamlet briefly.",  # the user's eval set
        "List the solar system's planets in order, starting from the Sun.",
    ],
    "stock": [
        "Could you provide a brief summary of the causes of the French Revolution?",
        "Could you write a captivating short story beginning with the sentence: The last train left without its driver.",
        "Given that f(x) = 2x^2 + 7x - 1, find the value of f(3).",  # MT-Bench 120's template, other numbers
    ],
}


@pytest.fixture
def planted(tmp_path: Path) -> dict[str, Path]:
    pool = tmp_path / "pool.jsonl"
    lines = SAMPLE.read_text().splitlines()
    lines += [json.dumps({"prompt": p}) for group in PLANTED.values() for p in group]
    pool.write_text("\n".join(lines) + "\n")
    own = tmp_path / "own_eval.jsonl"
    own.write_text("".join(json.dumps({"question": q, "id": i}) + "\n" for i, q in enumerate(OWN_EVAL)))
    return {"pool": pool, "own": own}


def _ids(texts) -> set[str]:
    return {prompt_id(t) for t in texts}


def test_exact_copies_and_paraphrases_are_removed_stock_phrases_kept_and_recorded(cli, catalog_path, planted):
    imported = cli("prompts", "import", planted["pool"], "--json").json()
    out = cli("prompts", "decontaminate", "--against", MT_BENCH, "--against", planted["own"], "--json")
    assert out.code == 0, out.err
    report = out.json()
    removed = {m["prompt_id"] for b in report["benchmarks"] for m in b["removed"]}
    assert removed == _ids(PLANTED["exact"] + PLANTED["paraphrase"])
    assert not removed & _ids(PLANTED["stock"])
    # each removed prompt with the benchmark prompt it matched, under its benchmark
    by_bench = {Path(b["source"]).name: b for b in report["benchmarks"]}
    assert by_bench["mt_bench.jsonl"]["rows"] == 80 and by_bench["own_eval.jsonl"]["rows"] == 2
    assert by_bench["own_eval.jsonl"]["column"] == "question"
    hamlet = next(m for m in by_bench["own_eval.jsonl"]["removed"] if "Hamlet" in m["prompt"])
    assert hamlet["benchmark_prompt"] == OWN_EVAL[0] and hamlet["benchmark_prompt_id"] == prompt_id(OWN_EVAL[0])

    catalog = Catalog(catalog_path)
    snap = catalog.get(report["snapshot"]["id"])
    assert snap.kind == "prompts" and snap.iteration is None and snap.rows == imported["rows"] - len(removed)
    assert catalog.parent(snap, "prompts").id == imported["id"]
    assert {m["prompt_id"] for m in snap.params["removed_prompts"]} == removed
    assert snap.params["thresholds"] == {"containment": 0.75, "coverage": 0.45}
    bench = {Path(b["source"]).name: b for b in snap.params["benchmarks"]}
    assert bench["mt_bench.jsonl"]["rows"] == 80 and len(bench["mt_bench.jsonl"]["sha256"]) == 64
    assert not _ids(catalog.read(snap.id).column("prompt").to_pylist()) & removed

    # `prompts split` draws from the newest pool: the cleaned one
    sets = cli("prompts", "split", "--iterations", 1, "--train-size", 100, "--test-size", 10, "--json").json()
    assert all(s["parents"] == [snap.id] for s in sets)

    # the same command again: nothing left to remove, the same pool, nothing registered
    before = len(catalog.list())
    again = cli("prompts", "decontaminate", "--against", MT_BENCH, "--against", planted["own"], "--json").json()
    assert again["removed"] == 0 and again["snapshot"]["id"] == snap.id and len(catalog.list()) == before
    # and from the original pool: the same content, the same id
    again = cli(
        "prompts", "decontaminate", "--against", MT_BENCH, "--against", planted["own"], "--from", imported["id"]
    )
    assert again.code == 0 and f"registered pool {snap.id}" in again.out and len(catalog.list()) == before


def test_the_human_report_lists_each_removed_prompt_with_its_match(cli, planted):
    cli("prompts", "import", planted["pool"])
    out = cli("prompts", "decontaminate", "--against", planted["own"])
    assert out.code == 0, out.err
    assert "own_eval.jsonl: 2 prompts" in out.out and ": 2 removed" in out.out
    assert "- Summarize the plot of Hamlet briefly." in out.out
    assert f"~ {OWN_EVAL[0]}" in out.out and "registered pool" in out.out


def test_dry_run_reports_and_registers_nothing(cli, catalog_path, planted):
    cli("prompts", "import", planted["pool"])
    before = Catalog(catalog_path).list()
    out = cli("prompts", "decontaminate", "--against", MT_BENCH, "--dry-run", "--json")
    assert out.code == 0 and out.json()["removed"] == 4 and out.json()["snapshot"] is None
    assert Catalog(catalog_path).list() == before


def test_the_benchmark_hash_is_its_content_whatever_the_file_format(cli, planted, tmp_path):
    import pyarrow.csv as pacsv

    csv = tmp_path / "own_eval.csv"
    pacsv.write_csv(pa.table({"question": OWN_EVAL[::-1]}), csv)
    cli("prompts", "import", planted["pool"])
    a = cli("prompts", "decontaminate", "--against", planted["own"], "--dry-run", "--json").json()
    b = cli("prompts", "decontaminate", "--against", csv, "--dry-run", "--json").json()
    assert a["benchmarks"][0]["sha256"] == b["benchmarks"][0]["sha256"]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty", "the file is empty"),
        ("blank", "no prompts in column 'prompt'"),
        ("column", "no column 'nope'"),
        ("missing", "no such file"),
    ],
)
def test_bad_benchmarks_are_one_line_exit_1_and_nothing_registered(
    cli, catalog_path, planted, tmp_path, setup, message
):
    cli("prompts", "import", planted["pool"])
    before = Catalog(catalog_path).list()
    args = {
        "empty": ["--against", MT_BENCH, "--against", tmp_path / "empty.jsonl"],
        "blank": ["--against", MT_BENCH, "--against", tmp_path / "blank.jsonl"],
        "column": ["--against", MT_BENCH, "--column", "nope"],
        "missing": ["--against", MT_BENCH, "--against", tmp_path / "nowhere.jsonl"],
    }[setup]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"prompt": "  "}\n{"prompt": null}\n')
    out = cli("prompts", "decontaminate", *args)
    assert out.code == 1 and message in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err
    assert Catalog(catalog_path).list() == before


def test_bad_thresholds_and_no_pool_are_one_line(cli, planted):
    out = cli("prompts", "decontaminate", "--against", MT_BENCH)
    assert out.code == 1 and "import prompts first" in out.err
    cli("prompts", "import", planted["pool"])
    out = cli("prompts", "decontaminate", "--against", MT_BENCH, "--containment", 1.5)
    assert out.code == 1 and "--containment must be in (0, 1]" in out.err, out.err
    out = cli("prompts", "decontaminate", "--against", MT_BENCH, "--against", MT_BENCH)
    assert out.code == 1 and "named twice in --against" in out.err
    cli("prompts", "split", "--iterations", 1, "--train-size", 5, "--test-size", 0)
    out = cli("prompts", "decontaminate", "--against", MT_BENCH, "--from", "prompts:1:train")
    assert out.code == 1 and "iteration 1's train prompt set, not a prompt pool" in out.err, out.err


# ------------------------------------------------------------------------------------------------------ the card
def _pairs(catalog: Catalog) -> None:
    """Generations and scores by hand for iteration 1's train set (a hub model recorded, nothing run), then pairs."""
    from builders.pairs import build_pairs

    prompts = catalog.newest("prompts", 1, "train")
    ids = catalog.read(prompts.id).column("prompt_id").to_pylist()
    gen = catalog.register(
        "generations",
        pa.Table.from_pylist(
            [
                {
                    "prompt_id": pid,
                    "response_index": i,
                    "response": "word " * (i + 1),
                    "finish_reason": "stop",
                    "prompt_tokens": 5,
                    "completion_tokens": i + 1,
                }
                for pid in ids
                for i in range(3)
            ]
        ),
        iteration=1,
        split="train",
        parents=[prompts.id],
        params={
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "backend": "transformers",
            "sampling": {"num_responses": 3, "temperature": 0.7, "top_p": 1.0, "max_tokens": 64, "seed": 42},
        },
    )
    catalog.register(
        "scores",
        pa.Table.from_pylist(
            [{"prompt_id": pid, "response_index": i, "score": float(i)} for pid in ids for i in range(3)]
        ),
        iteration=1,
        split="train",
        parents=[gen.id],
        params={"ranker": "python", "ranker_model": "tests.scorers:longer_is_better"},
    )
    build_pairs(catalog, 1, BuildConfig())


def _card(catalog: Catalog, folder: Path) -> str:
    from builders.publish import publish

    publish(catalog, PublishConfig("me/clean", local_dir=folder, dry_run=True))
    return (folder / "README.md").read_text()


def test_the_card_says_what_the_pool_was_decontaminated_against_and_rebuilds_it(cli, catalog_path, planted, tmp_path):
    cli("prompts", "import", planted["pool"])
    cli("prompts", "decontaminate", "--against", MT_BENCH, "--against", planted["own"])
    cli("prompts", "dedup")
    cli("prompts", "split", "--iterations", 1, "--train-size", 8, "--test-size", 0)
    catalog = Catalog(catalog_path)
    _pairs(catalog)
    card = _card(catalog, tmp_path / "staged")
    section = card[card.index("## Decontamination") : card.index("## Chosen vs rejected")]
    assert "checked against 2 benchmarks" in section and "6 prompts removed" in section
    assert "| `mt_bench.jsonl` | 80 |" in section and "| 4 |" in section
    assert "| `own_eval.jsonl` | 2 |" in section and "| 2 |" in section
    assert "idf-weighted content-word containment" in section and "0.75" in section
    assert str(tmp_path) not in card  # the benchmark is named, never by this machine's path
    script = card[card.index("Rebuild with iterdpo") :].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert "iterdpo prompts decontaminate --against" in script and "--containment 0.75 --coverage 0.45" in script
    assert ': "${BENCHMARK_FILE:?' in script and str(tmp_path) not in script
    # the script's prompt steps, run in an empty folder, register the same pools and prompt set again
    lines = script.splitlines()
    prompt_steps = lines[: next(i for i, line in enumerate(lines) if "prompts split" in line) + 1]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "rebuild.sh").write_text("\n".join(prompt_steps) + "\n")
    files = {"PROMPTS_FILE": planted["pool"], "BENCHMARK_FILE": MT_BENCH, "BENCHMARK_FILE_2": planted["own"]}
    env = {**os.environ, **_shims(tmp_path / "bin"), **{k: str(v) for k, v in files.items()}}
    done = subprocess.run(["bash", "rebuild.sh"], cwd=fresh, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rebuilt = Catalog(fresh / "catalog.duckdb")
    assert [s.id for s in rebuilt.list("prompts")] == [s.id for s in catalog.list("prompts")]


def test_a_card_of_a_pool_never_decontaminated_says_so(cli, catalog_path, planted, tmp_path):
    cli("prompts", "import", planted["pool"])
    cli("prompts", "split", "--iterations", 1, "--train-size", 8, "--test-size", 0)
    catalog = Catalog(catalog_path)
    _pairs(catalog)
    card = _card(catalog, tmp_path / "staged")
    section = card[card.index("## Decontamination") : card.index("## Chosen vs rejected")]
    assert "The prompts were not decontaminated" in section and "benchmark" in section
