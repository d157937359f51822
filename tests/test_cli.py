"""The command line contract: JSON shapes, one-line errors with exit 1, catalog unchanged on bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from builders.catalog import Catalog
from tests.conftest import ROOT, SAMPLE, run_iterdpo

SNAPSHOT_KEYS = {"id", "kind", "iteration", "split", "rows", "parents", "params", "created_at"}


def state(path: Path):
    """The catalog's logical content: what must not change when a command fails."""
    if not path.exists():
        return None
    return [(s.id, s.rows, tuple(s.tags)) for s in Catalog(path).list()]


def test_import_split_list_show_json_shapes(cli, catalog_path: Path, tmp_path: Path):
    imported = cli("prompts", "import", SAMPLE, "--json")
    assert imported.code == 0, imported.err
    pool = imported.json()
    assert SNAPSHOT_KEYS <= set(pool) and pool["kind"] == "prompts" and pool["rows"] == 210
    split = cli("prompts", "split", "--iterations", "2", "--train-size", "20", "--test-size", "5", "--json").json()
    assert isinstance(split, list) and len(split) == 4 and all(SNAPSHOT_KEYS <= set(s) for s in split)
    assert all(s["parents"] == [pool["id"]] for s in split)
    listed = cli("versions", "list", "--json").json()
    assert [s["id"] for s in listed] == [pool["id"]] + [s["id"] for s in split]
    assert [s["id"] for s in cli("versions", "list", "--iteration", "2", "--split", "test", "--json").json()] == [
        s["id"] for s in split if (s["iteration"], s["split"]) == (2, "test")
    ]
    shown = cli("versions", "show", pool["id"][:10], "--json").json()
    assert shown["id"] == pool["id"]
    tagged = cli("versions", "tag", pool["id"], "pool-v1", "--json").json()
    assert tagged["tags"] == ["pool-v1"]
    diff = cli("versions", "diff", split[0]["id"], split[2]["id"], "--json").json()
    assert len(diff["added"]) == len(diff["removed"]) == 5
    exported = cli("versions", "export", "pool-v1", tmp_path / "pool.parquet", "--json").json()
    assert exported["rows"] == 210 and pq.read_table(tmp_path / "pool.parquet").num_rows == 210
    verified = cli("versions", "verify", "--json").json()
    assert verified["ok"] and verified["snapshots"] == 5


def test_human_output_and_version(cli):
    assert cli("prompts", "import", SAMPLE).out.startswith("imported 210 prompts")
    assert "prompts" in cli("versions", "list").out
    version = cli("--version", catalog=None)
    assert version.code == 0 and re.search(r"iterdpo, version \d", version.out)


def test_catalog_from_environment(tmp_path: Path):
    where = tmp_path / "env.duckdb"
    done = run_iterdpo("prompts", "import", SAMPLE, "--json", env={"ITERDPO_CATALOG": str(where)})
    assert done.returncode == 0, done.stderr
    assert where.exists() and json.loads(done.stdout)["rows"] == 210


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the message's expected part)."""
    (tmp / "empty.jsonl").write_text("")
    (tmp / "badline.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "ok2"}\n{"prompt": oops}\n')
    (tmp / "nocol.jsonl").write_text('{"text2": "a", "answer": "b"}\n')
    (tmp / "notext.jsonl").write_text('{"prompt": "fine"}\n{"prompt": 42}\n')
    (tmp / "allempty.jsonl").write_text('{"prompt": "  "}\n{"prompt": null}\n')
    (tmp / "latin1.jsonl").write_bytes('{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    pq.write_table(pa.table({"prompt": ["a"]}), tmp / "really_parquet.jsonl")
    (tmp / "really_text.parquet").write_text('{"prompt": "a"}\n')
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp / "intcol.parquet")
    (tmp / "p.txt").write_text("a prompt\n")
    return {
        "missing": (tmp / "nope.jsonl", "nope.jsonl: no such file"),
        "empty": (tmp / "empty.jsonl", "empty.jsonl: the file is empty"),
        "invalid json line": (tmp / "badline.jsonl", "badline.jsonl:3: invalid JSON"),
        "no prompt column": (tmp / "nocol.jsonl", "no prompt-like column .*columns found: text2, answer"),
        "not text": (tmp / "notext.jsonl", "notext.jsonl:2: column 'prompt' is not text"),
        "nothing left": (tmp / "allempty.jsonl", "no prompts left: all 2 values"),
        "non-utf8": (tmp / "latin1.jsonl", "latin1.jsonl:2: not valid UTF-8"),
        "parquet named jsonl": (tmp / "really_parquet.jsonl", "looks like a Parquet file"),
        "text named parquet": (tmp / "really_text.parquet", "not a readable Parquet file"),
        "int column": (tmp / "intcol.parquet", "column 'prompt' is not text"),
        "unknown type": (tmp / "p.txt", "unsupported file type .txt"),
    }


def test_every_bad_import_is_one_line_exit_1_and_leaves_the_catalog_unchanged(cli, catalog_path: Path, tmp_path: Path):
    assert cli("prompts", "import", SAMPLE).code == 0
    before = state(catalog_path)
    for name, (path, message) in _bad_files(tmp_path).items():
        result = cli("prompts", "import", path)
        assert result.code == 1, name
        assert result.out == "", name
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (name, result.err)
        assert re.search(message, lines[0]), (name, lines[0])
        assert state(catalog_path) == before, name


def test_a_failed_first_import_creates_no_catalog(cli, catalog_path: Path, tmp_path: Path):
    result = cli("prompts", "import", tmp_path / "missing.jsonl")
    assert result.code == 1 and not catalog_path.exists()


def test_column_option_errors_list_the_columns(cli, tmp_path: Path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"instruction": "hi", "source": "x"}\n')
    result = cli("prompts", "import", src, "--column", "prompt")
    assert result.code == 1 and "no column 'prompt'; columns found: instruction, source" in result.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prompts", "split", "--train-size", "-3"], "train-size must be at least 1"),
        (["prompts", "split", "--test-size", "-1"], "test-size must be 0 or more"),
        (["prompts", "split", "--train-size", "500"], r"asked for 4500 prompts .* pool holds 210"),
        (["versions", "show", "deadbeef"], "no snapshot or tag 'deadbeef'"),
        (["versions", "show", "no-such-tag"], "no snapshot or tag 'no-such-tag'"),
        (["versions", "tag", "nothere", "x"], "no snapshot or tag 'nothere'"),
        (["versions", "diff", "aaaa", "bbbb"], "no snapshot or tag 'aaaa'"),
        (["versions", "export", "nothere", "out.parquet"], "no snapshot or tag 'nothere'"),
    ],
)
def test_bad_split_sizes_and_unknown_ids_are_one_line_errors(cli, catalog_path: Path, args, message):
    assert cli("prompts", "import", SAMPLE).code == 0
    before = state(catalog_path)
    result = cli(*args)
    assert result.code == 1
    assert re.fullmatch(rf"Error: .*{message}.*\n", result.err), result.err
    assert state(catalog_path) == before


def test_corrupt_and_newer_catalogs_are_one_line_errors(cli, tmp_path: Path):
    corrupt = tmp_path / "corrupt.duckdb"
    corrupt.write_bytes(b"\x00garbage" * 500)
    result = cli("versions", "list", catalog=corrupt)
    assert result.code == 1 and "cannot be opened" in result.err and len(result.err.splitlines()) == 1
    assert corrupt.read_bytes() == b"\x00garbage" * 500

    newer = tmp_path / "newer.duckdb"
    assert cli("prompts", "import", SAMPLE, catalog=newer).code == 0
    with Catalog(newer).connect() as con:
        con.execute("UPDATE iterdpo_meta SET value = '99' WHERE key = 'schema_version'").fetchall()
    result = cli("versions", "list", catalog=newer)
    assert result.code == 1 and "schema version 99, newer than this iterdpo" in result.err


def test_a_user_error_in_a_fresh_process_prints_exactly_one_line(tmp_path: Path):
    done = run_iterdpo("--catalog", tmp_path / "c.duckdb", "prompts", "import", tmp_path / "missing.jsonl")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("Error: ")
    debug = run_iterdpo("--debug", "--catalog", tmp_path / "c.duckdb", "prompts", "import", tmp_path / "missing.jsonl")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_usage_errors_are_clicks_exit_2(cli):
    assert cli("prompts", "split", "--train-size", "many").code == 2
    assert cli("no-such-command").code == 2


def test_verify_exits_1_on_a_tampered_catalog(cli, catalog_path: Path):
    assert cli("prompts", "import", SAMPLE).code == 0
    with Catalog(catalog_path).connect() as con:
        con.execute(
            "UPDATE rows_prompts SET prompt = 'x' WHERE prompt_id = (SELECT min(prompt_id) FROM rows_prompts)"
        ).fetchall()
    result = cli("versions", "verify")
    assert result.code == 1 and "PROBLEMS" in result.out


def test_every_command_help_ends_with_a_runnable_example(cli):
    from builders.cli import cli as group

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, path + [name])

    for path, _ in walk(group, []):
        lines = [line.strip() for line in cli(*path, "--help", catalog=None).out.strip().splitlines()]
        assert "Example:" in lines, f"`iterdpo {' '.join(path)} --help` does not end with an example"
        commands = lines[
            len(lines) - lines[::-1].index("Example:") :
        ]  # one command per line (tests/test_examples.py runs them)
        assert commands and all(c.startswith("iterdpo ") for c in commands), path


def test_selectors_name_the_newest_snapshot_of_a_kind(cli):
    pool = cli("prompts", "import", SAMPLE, "--json").json()
    split = cli("prompts", "split", "--iterations", "2", "--train-size", "20", "--test-size", "5", "--json").json()
    by = {(s["iteration"], s["split"]): s["id"] for s in split}
    assert cli("versions", "show", "prompts", "--json").json()["id"] == pool["id"]
    assert cli("versions", "show", "prompts:2:test", "--json").json()["id"] == by[(2, "test")]
    assert cli("versions", "show", "prompts:1", "--json").json()["id"] in (by[(1, "test")], by[(1, "train")])
    missing = cli("versions", "show", "generations:1:train")
    assert missing.code == 1 and "no generations:1:train snapshot" in missing.err


@pytest.mark.parametrize(
    "args",
    [
        ["versions", "list"],
        ["versions", "show", "prompts"],
        ["versions", "diff", "abcd", "abce"],
        ["versions", "export", "prompts", "out.parquet"],
        ["versions", "verify"],
        ["versions", "gc"],
        ["versions", "tag", "prompts", "pool-v1"],
    ],
)
def test_commands_on_a_missing_catalog_fail_in_one_line_and_create_nothing(cli, tmp_path: Path, args):
    missing = tmp_path / "no" / "catalog.duckdb"
    result = cli(*args, catalog=missing)
    assert result.code == 1 and result.out == ""
    assert re.fullmatch(r"Error: catalog .*catalog\.duckdb does not exist.*\n", result.err), result.err
    assert not missing.exists() and not missing.parent.exists()


def _as_a_user_who_cannot_write(*args: str) -> subprocess.CompletedProcess:
    """`iterdpo ARGS` in a fresh process that file modes apply to (root keeps its uid but drops the capability to
    override them)."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root writes read-only files and setpriv is not there to drop that capability")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "builders.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_read_commands_work_on_a_read_only_catalog(cli, catalog_path: Path, tmp_path: Path):
    pool = cli("prompts", "import", SAMPLE, "--json").json()
    tmp_path.chmod(0o755)
    catalog_path.chmod(0o444)
    try:

        def run(*args):
            return _as_a_user_who_cannot_write("--catalog", catalog_path, *args)

        listed = run("versions", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [s["id"] for s in json.loads(listed.stdout)] == [pool["id"]]
        assert json.loads(run("versions", "show", "prompts", "--json").stdout)["id"] == pool["id"]
        assert json.loads(run("versions", "verify", "--json").stdout)["ok"]
        assert run("versions", "diff", "prompts", pool["id"][:8]).returncode == 0
        assert run("versions", "export", "prompts", tmp_path / "p.jsonl").returncode == 0
        assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 210
        tagged = run("versions", "tag", "prompts", "pool-v1")  # a write: refused in one line
        assert tagged.returncode == 1 and len(tagged.stderr.splitlines()) == 1, tagged.stderr
    finally:
        catalog_path.chmod(0o644)


def test_tag_that_shadows_a_selector_or_prefix_is_refused(cli, catalog_path: Path):
    pool = cli("prompts", "import", SAMPLE, "--json").json()
    cli("prompts", "split", "--iterations", "1", "--train-size", "20", "--test-size", "5")
    before = state(catalog_path)
    for name in ("prompts", "generations:1:train", pool["id"][:6]):
        result = cli("versions", "tag", "prompts:1:train", name)
        assert result.code == 1 and len(result.err.splitlines()) == 1 and "reads as" in result.err, result.err
        assert state(catalog_path) == before
    assert cli("versions", "show", "prompts", "--json").json()["id"] == pool["id"]


def test_merge_with_one_bad_source_merges_nothing(cli, catalog_path: Path, tmp_path: Path):
    assert cli("prompts", "import", SAMPLE).code == 0
    good = tmp_path / "good.duckdb"
    cli("prompts", "import", SAMPLE, catalog=good)
    assert (
        cli("prompts", "split", "--iterations", "1", "--train-size", "20", "--test-size", "5", catalog=good).code == 0
    )
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    before = state(catalog_path)
    result = cli("versions", "merge", good, bad)
    assert result.code == 1 and len(result.err.splitlines()) == 1 and "bad.txt" in result.err
    assert state(catalog_path) == before
    assert cli("versions", "merge", good, "--json").json()["merged"][0]["snapshots"] == 2


def test_gc_after_an_interrupted_registration(cli, catalog_path: Path, monkeypatch):
    assert cli("prompts", "import", SAMPLE).code == 0
    catalog = Catalog(catalog_path)
    rows = pa.table({"prompt_id": ["f" * 64], "prompt": ["an orphan"], "source": pa.array([None], pa.string())})

    def crash(self, con, item, sid, hashes):
        raise KeyboardInterrupt

    monkeypatch.setattr(Catalog, "_record", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog.register("prompts", rows)
    monkeypatch.undo()
    before = {s.id: catalog.read(s.id) for s in catalog.list()}
    verified = cli("versions", "verify")
    assert verified.code == 0 and "1 rows of interrupted registrations" in verified.out
    assert "`iterdpo versions gc` removes them" in verified.out
    assert cli("versions", "gc", "--dry-run", "--json").json()["rows_removed"] == 1
    report = cli("versions", "gc", "--json").json()
    assert report["rows_removed"] == 1 and report["rows_removed_by_kind"]["prompts"] == 1
    assert "removed 0 rows" in cli("versions", "gc").out
    assert cli("versions", "verify", "--json").json()["unreferenced_rows"] == 0
    assert all(catalog.read(sid).equals(t) for sid, t in before.items()) and len(catalog.list()) == len(before)


def _run_config(tmp: Path, tiny: Path, **sections) -> Path:
    doc = {
        "prompts": {"source": str(SAMPLE)},
        "split": {"iterations": 1, "train_size": 4, "test_size": 2, "seed": 5},
        "generation": {
            "model": str(tiny / "generator"),
            "backend": "transformers",
            "sampling": {"num_responses": 2, "max_tokens": 8},
        },
        "ranking": {"ranker": "python", "ranker_model": "tests.scorers:longer_is_better"},
        "training": {"recipe": str(ROOT / "train/recipes/tiny-cpu.yaml"), "output_dir": str(tmp / "m{n}")},
    }
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        doc[section] = {**doc.get(section, {}), key: value}
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"generation__backend": "tensorflow"}, "generation.backend: unknown backend 'tensorflow'"),
        ({"generation__sampling": {"num_responses": 0}}, "generation.sampling: num_responses must be at least 1"),
        ({"generation__sampling": {"top_p": 1.5}}, "generation.sampling: top_p must be in"),
        ({"generation__model": "/nowhere/model"}, "generation.model: model '/nowhere/model'"),
        (
            {"generation__backend": "openai", "generation__openai": {"concurrency": 0}},
            "generation: .*concurrency must be at least 1",
        ),
        ({"generation__sampling": {"temperature": 0.0, "num_responses": 2}}, "generation.sampling: .*greedy decoding"),
        ({"ranking__ranker": "bogus"}, "ranking.ranker: unknown ranker 'bogus'"),
        ({"ranking__dtype": "float128"}, "ranking: .*dtype"),
        ({"ranking__ranker_model": "tests.scorers:no_such"}, "ranking.ranker_model: "),
        ({"selection__selection": "best-of"}, "selection: unknown selection 'best-of'"),
        ({"selection__length_penalty": -1.0}, "selection: length_penalty must be"),
        ({"training__recipe": "/nowhere/iteration_{n}.yaml"}, "training.recipe: recipe /nowhere/iteration_1.yaml"),
        ({"training__recipe": "train/recipes/iteration_{it}.yaml"}, "training.recipe .*use \\{n\\}"),
        ({"prompts__source": "/nowhere/prompts.jsonl"}, "prompts.source: /nowhere/prompts.jsonl: no such file"),
        ({"split__train_size": 5000}, "split: asked for"),
        (
            {"generation__commit_seconds": -1},
            "generation: commit_seconds must be a finite number of seconds, 0 or more",
        ),
        ({"generation__commit_seconds": float("nan")}, "generation: commit_seconds must be .*, not nan"),
        ({"ranking__commit_seconds": float("inf")}, "ranking: commit_seconds must be .*, not inf"),
        ({"training__threads": 0}, "training.threads: threads must be at least 1 .*not 0"),
        ({"training__threads": -1}, "training.threads: threads must be at least 1 .*not -1"),
        ({"publish__license": "my licence"}, "publish.license: license 'my licence' is not a licence id"),
        ({"publish__model_license": "my licence"}, "publish.model_license: license 'my licence' is not a licence id"),
        ({"publish__revision": ""}, "publish.revision: revision '' is not a branch name"),
        ({"publish__model_revision": "a b"}, "publish.model_revision: revision 'a b' is not a branch name"),
    ],
)
def test_run_checks_the_whole_pipeline_before_registering_anything(
    cli, catalog_path: Path, tmp_path: Path, tiny_models: Path, change, message
):
    config = _run_config(tmp_path, tiny_models, **change)
    result = cli("run", config)
    assert result.code == 1 and result.out == "", result.err
    assert re.fullmatch(rf"Error: .*bad\.yaml: {message}.*\n", result.err), result.err
    assert not catalog_path.exists() and not (tmp_path / "m1").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf"])
@pytest.mark.parametrize("command", ["generate", "rank"])
def test_a_commit_interval_that_is_not_a_finite_number_of_seconds_fails_before_any_work(
    cli, catalog_path: Path, tiny_models: Path, command, value
):
    from tests.conftest import generations_catalog

    generations_catalog(catalog_path, n_prompts=2)
    before = state(catalog_path)
    args = {
        "generate": [
            "generate",
            "--iteration",
            "1",
            "--model",
            tiny_models / "generator",
            "--num-responses",
            "2",
            "--max-tokens",
            "4",
        ],
        "rank": ["rank", "--iteration", "1", "--ranker", "python", "--ranker-model", "tests.scorers:longer_is_better"],
    }[command]
    result = cli(*args, "--commit-seconds", value)
    assert result.code == 1 and result.out == "" and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith("Error: --commit-seconds must be a finite number of seconds, 0 or more"), result.err
    assert state(catalog_path) == before
    with Catalog(catalog_path).connect() as con:
        assert con.execute("SELECT count(*) FROM work_units").fetchone()[0] == 0
    if value == "-1":  # 0 means "commit every finished batch": meaningful, and accepted
        assert cli(*args, "--commit-seconds", "0").code == 0


@pytest.mark.parametrize(
    ("command", "option", "bad", "good", "message"),
    [
        ("publish", "--iterations", ",,", "1", "--iterations names no iteration"),
        ("publish", "--iterations", "", "1", "--iterations names no iteration"),
        ("publish", "--iterations", "1,0", "1", "--iterations must be numbers 1 or more, not 0"),
        ("publish", "--revision", "", "dev/ablation-1", "--revision '' is not a branch name"),
        ("publish", "--revision", "my branch", "dev/ablation-1", "--revision 'my branch' is not a branch name"),
        ("publish", "--revision", "v1..2", "dev/ablation-1", "--revision 'v1..2' is not a branch name"),
        ("publish-model", "--revision", "", None, "--revision '' is not a branch name"),
    ],
)
def test_publish_options_that_name_nothing_fail_before_anything_is_staged(
    cli, catalog_path: Path, tmp_path: Path, command, option, bad, good, message
):
    from tests.conftest import built_catalog

    built_catalog(catalog_path, n_prompts=4)
    before = state(catalog_path)
    staged = tmp_path / "staged"
    target = ["publish", "me/x"] if command == "publish" else ["publish-model", "me/x", "--iteration", "1"]
    result = cli(*target, option, bad, "--dry-run", "--local-dir", staged)
    assert result.code == 1 and result.out == "" and len(result.err.splitlines()) == 1, result.err
    assert result.err.startswith(f"Error: {message}"), result.err
    assert state(catalog_path) == before and not staged.exists()
    if good is not None:  # the same command with a good value stages the folder
        assert cli(*target, option, good, "--dry-run", "--local-dir", staged).code == 0
        assert (staged / "README.md").exists()


def test_the_catalog_flag_wins_over_the_pipelines_catalog_key(tmp_path, catalog_path, cli, monkeypatch):
    import builders.pipeline
    from builders.errors import InputError

    def where_it_would_run(catalog, cfg, where):
        raise InputError(f"would run on {catalog.path}")

    monkeypatch.setattr(builders.pipeline, "run_pipeline", where_it_would_run)
    monkeypatch.setenv("ITERDPO_CATALOG", str(tmp_path / "from-env.duckdb"))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"catalog: {tmp_path / 'from-yaml.duckdb'}\n")
    assert f"would run on {catalog_path}" in cli("run", pipeline).err  # the flag typed for this command
    assert "from-yaml.duckdb" in cli("run", pipeline, catalog=None).err  # the file's key beats the environment
    pipeline.write_text("split: {iterations: 1}\n")
    assert "from-env.duckdb" in cli("run", pipeline, catalog=None).err
