"""The command line contract: JSON shapes, one-line errors with exit 1, catalog unchanged on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders.catalog import Catalog
from tests.conftest import SAMPLE, run_iterdpo

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
    assert [s["id"] for s in cli("versions", "list", "--iteration", "2", "--split", "test", "--json").json()] == \
        [s["id"] for s in split if (s["iteration"], s["split"]) == (2, "test")]
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


@pytest.mark.parametrize(("args", "message"), [
    (["prompts", "split", "--train-size", "-3"], "train-size must be at least 1"),
    (["prompts", "split", "--test-size", "-1"], "test-size must be 0 or more"),
    (["prompts", "split", "--train-size", "500"], r"asked for 4500 prompts .* pool holds 210"),
    (["versions", "show", "deadbeef"], "no snapshot or tag 'deadbeef'"),
    (["versions", "show", "no-such-tag"], "no snapshot or tag 'no-such-tag'"),
    (["versions", "tag", "nothere", "x"], "no snapshot or tag 'nothere'"),
    (["versions", "diff", "aaaa", "bbbb"], "no snapshot or tag 'aaaa'"),
    (["versions", "export", "nothere", "out.parquet"], "no snapshot or tag 'nothere'"),
])
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
        con.execute("UPDATE rows_prompts SET prompt = 'x' WHERE prompt_id = (SELECT min(prompt_id) FROM rows_prompts)"
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
        lines = cli(*path, "--help", catalog=None).out.strip().splitlines()
        assert lines[-2].strip() == "Example:", f"`iterdpo {' '.join(path)} --help` does not end with an example"
        assert lines[-1].strip().startswith("iterdpo "), path


def test_selectors_name_the_newest_snapshot_of_a_kind(cli):
    pool = cli("prompts", "import", SAMPLE, "--json").json()
    split = cli("prompts", "split", "--iterations", "2", "--train-size", "20", "--test-size", "5", "--json").json()
    by = {(s["iteration"], s["split"]): s["id"] for s in split}
    assert cli("versions", "show", "prompts", "--json").json()["id"] == pool["id"]
    assert cli("versions", "show", "prompts:2:test", "--json").json()["id"] == by[(2, "test")]
    assert cli("versions", "show", "prompts:1", "--json").json()["id"] in (by[(1, "test")], by[(1, "train")])
    missing = cli("versions", "show", "generations:1:train")
    assert missing.code == 1 and "no generations:1:train snapshot" in missing.err
