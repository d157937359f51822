"""Publishing: the staged folder loads with `datasets` and TRL, the card parses, and the upload protocol against a
local HTTP server that answers the Hub endpoints huggingface_hub calls."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from builders.catalog import Catalog
from builders.config import PublishConfig
from builders.errors import InputError, IterdpoError
from builders.pairs import to_trl
from builders.publish import publish, snapshot_set_id
from tests.conftest import built_catalog

TOKEN = "hf_secretTOKENvalue123"


@pytest.fixture
def built(tmp_path) -> Catalog:
    return built_catalog(tmp_path / "c.duckdb", n_prompts=8)


def test_dry_run_stages_a_folder_that_datasets_loads_exactly(built, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    staged = tmp_path / "staged"
    result = publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True))
    assert result.dry_run and result.commit is None
    assert (staged / "README.md").exists() and (staged / "plots" / "score_distributions.png").stat().st_size > 1000
    import datasets

    pairs = built.read(built.newest("pairs", 1, "train").id)
    default = datasets.load_dataset(str(staged), "default")
    assert list(default) == ["train_iteration_1"]
    assert default["train_iteration_1"].to_list() == pairs.to_pylist()
    trl = datasets.load_dataset(str(staged), "trl")
    assert trl["train_iteration_1"].to_list() == to_trl(pairs).to_pylist()
    # the card: YAML that huggingface_hub parses, with both configs, and the provenance
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(staged / "README.md")
    assert {c["config_name"] for c in card.data.configs} == {"default", "trl"}
    assert card.data.license == "apache-2.0" and "dpo" in card.data.tags
    assert result.staged.set_id in card.text and result.staged.set_id == snapshot_set_id(
        list(result.staged.snapshots.values())
    )
    assert "iterdpo build --iteration 1" in card.text
    # staging again into the same folder is allowed (it is ours); a foreign folder is not
    publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="was not staged by iterdpo"):
        publish(built, PublishConfig("me/iterative-dpo", local_dir=foreign, dry_run=True))


def _datasets_warnings(load) -> list[str]:
    """The warnings `datasets` logs while `load()` runs (its logger does not propagate to pytest's caplog)."""
    import logging

    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        load()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return records


def _local_catalog(path, tiny_models, source) -> Catalog:
    """Pairs whose recorded prompt file, generator and ranker are local folders, as `generate` and `rank` record
    them (absolute paths)."""
    import pyarrow as pa

    from builders.config import BuildConfig
    from builders.pairs import build_pairs
    from builders.prompts import prompt_id

    catalog = Catalog(path)
    prompts = [f"Question {i}: why is the sky blue?" for i in range(8)]
    table = pa.table({"prompt_id": [prompt_id(p) for p in prompts], "prompt": prompts, "source": [None] * 8})
    pool = catalog.register("prompts", table, params={"source": str(source)})
    split = catalog.register(
        "prompts",
        table,
        iteration=1,
        split="train",
        parents=[pool.id],
        params={"seed": 42, "iterations": 1, "train_size": 8, "test_size": 0},
    )
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
                for pid in table["prompt_id"].to_pylist()
                for i in range(3)
            ]
        ),
        iteration=1,
        split="train",
        parents=[split.id],
        params={
            "model": str(tiny_models / "generator"),
            "model_sha256": "ab" * 32,
            "backend": "transformers",
            "sampling": {"num_responses": 3, "temperature": 0.7, "top_p": 1.0, "max_tokens": 16, "seed": 42},
        },
    )
    scores = catalog.register(
        "scores",
        pa.Table.from_pylist(
            [
                {"prompt_id": pid, "response_index": i, "score": float(i)}
                for pid in table["prompt_id"].to_pylist()
                for i in range(3)
            ]
        ),
        iteration=1,
        split="train",
        parents=[gen.id],
        params={"ranker_model": str(tiny_models / "ranker"), "ranker_model_sha256": "cd" * 32},
    )
    assert scores.rows == 24
    build_pairs(catalog, 1, BuildConfig())
    return catalog


def test_staged_files_are_what_datasets_writes_and_reads_back_without_warnings(tmp_path, tiny_models):
    import datasets
    import pyarrow.parquet as pq
    import yaml
    from huggingface_hub import DatasetCard

    source = tmp_path / "my_prompts.jsonl"
    built = _local_catalog(tmp_path / "local.duckdb", tiny_models, source)
    staged = tmp_path / "staged"
    publish(
        built,
        PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True, license="cc-by-4.0", max_row_group_bytes=600),
    )  # a tiny bound: several row groups on 8 rows
    card = DatasetCard.load(staged / "README.md")
    assert card.data.pretty_name and card.data.license == "cc-by-4.0" and "`cc-by-4.0`" in card.text
    text = (staged / "README.md").read_text()
    # the prompt file, the generator and the ranker appear by name, never by this machine's path
    assert str(tmp_path) not in text and str(tiny_models) not in text and "/tmp/" not in text
    assert "`generator`" in text and "`ranker`" in text
    # the rebuild script asks for the local inputs by name, in variables it checks before any work
    assert (
        'iterdpo prompts import "$PROMPTS_FILE"' in text
        and "set PROMPTS_FILE to your copy of the prompt file my_prompts.jsonl" in text
    )
    assert '--model "$BASE_MODEL"' in text and '--ranker-model "$RANKER_MODEL"' in text
    for config in ("default", "trl"):
        parquet = pq.ParquetFile(staged / config / "train_iteration_1-00000-of-00001.parquet")
        features = json.loads(parquet.schema_arrow.metadata[b"huggingface"])["info"]["features"]
        assert datasets.Features.from_dict(features).arrow_schema.types == parquet.schema_arrow.types
        groups = [parquet.read_row_group(i) for i in range(parquet.num_row_groups)]
        assert len(groups) > 1 and all(g.nbytes <= 600 or g.num_rows == 1 for g in groups)
    loaded = {}
    warnings = _datasets_warnings(
        lambda: loaded.update(
            {c: datasets.load_dataset(str(staged), c, split="train_iteration_1") for c in ("default", "trl")}
        )
    )
    assert warnings == []
    # num_bytes in the card is what datasets records when it loads the same files without the card
    info = {i["config_name"]: i for i in card.data.dataset_info}
    for config in ("default", "trl"):
        bare = datasets.load_dataset("parquet", data_files={"x": str(staged / config / "*.parquet")}, split="x")
        split = info[config]["splits"][0]
        assert split == {"name": "train_iteration_1", "num_bytes": bare.info.splits["x"].num_bytes, "num_examples": 8}
        assert loaded[config].num_rows == 8
    # the same load with a split lacking num_bytes is what datasets warns about (so the check above can fail)
    meta, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    header = yaml.safe_load(meta)
    del header["dataset_info"][1]["splits"][0]["num_bytes"]
    (staged / "README.md").write_text("---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n" + body)
    warned = _datasets_warnings(lambda: datasets.load_dataset(str(staged), "trl", split="train_iteration_1"))
    assert any("Ignoring part of dataset_info" in w for w in warned)


def test_default_config_trains_the_way_the_card_says(built, tmp_path, tiny_models):
    """The card's recipe for `default`: only chosen and rejected (TRL's dataset mixture `columns`, the handbook's
    Zephyr pattern); TRL takes the prompt from their shared start."""
    import trl
    from transformers import AutoTokenizer
    from trl.scripts.utils import DatasetConfig

    staged = tmp_path / "staged"
    publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True))
    text = (staged / "README.md").read_text()
    assert "columns: [chosen, rejected]" in text and "test_iteration_N` split there leaks" in text
    mixture = trl.DatasetMixtureConfig(
        datasets=[
            DatasetConfig(path=str(staged), name="default", split="train_iteration_1", columns=["chosen", "rejected"])
        ]
    )
    ds = trl.get_dataset(mixture)["train"]
    assert ds.column_names == ["chosen", "rejected"] and len(ds) == 8
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=256,
        save_strategy="no",
        disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(tiny_models / "generator")
    trainer = trl.DPOTrainer(model=str(tiny_models / "generator"), args=args, train_dataset=ds, processing_class=tok)
    assert trainer.train_dataset[0]["prompt_ids"]  # the prompt was recovered from the conversations
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0


def test_local_dir_of_a_user_is_refused_and_left_untouched(built, tmp_path):
    mine = tmp_path / "mine"
    (mine / ".git").mkdir(parents=True)
    (mine / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (mine / "my_notes.txt").write_text("notes")
    (mine / "README.md").write_text("A dataset built with iterdpo, by hand.\n")  # the card's words are no licence
    before = sorted((p.relative_to(mine), p.read_bytes()) for p in mine.rglob("*") if p.is_file())
    with pytest.raises(InputError, match="not staged by iterdpo"):
        publish(built, PublishConfig("me/iterative-dpo", local_dir=mine, dry_run=True))
    assert sorted((p.relative_to(mine), p.read_bytes()) for p in mine.rglob("*") if p.is_file()) == before


def test_restaging_replaces_only_iterdpos_own_files(built, tmp_path):
    staged = tmp_path / "staged"
    first = publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True)).staged
    # the user turns the staged folder into a clone and keeps notes in it; an old file of ours goes stale
    (staged / ".git").mkdir()
    (staged / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (staged / "my_notes.txt").write_text("notes")
    marker = json.loads((staged / ".iterdpo-staged.json").read_text())
    (staged / "default" / "stale.parquet").write_bytes(b"old")
    marker["files"].append("default/stale.parquet")
    (staged / ".iterdpo-staged.json").write_text(json.dumps(marker))
    second = publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True)).staged
    assert second.files == first.files
    assert (staged / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (staged / "my_notes.txt").read_text() == "notes"
    assert not (staged / "default" / "stale.parquet").exists()
    assert all((staged / f).is_file() for f in second.files)
    assert ".iterdpo-staged.json" not in second.files  # the marker is local: never uploaded


def test_staging_the_same_snapshots_again_is_a_no_op_until_the_folder_or_options_change(built, tmp_path):
    staged = tmp_path / "staged"
    first = publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True)).staged
    mtimes = {f: (staged / f).stat().st_mtime_ns for f in first.files}
    again = publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True)).staged
    assert (again.files, again.set_id, again.snapshots) == (first.files, first.set_id, first.snapshots)
    assert {f: (staged / f).stat().st_mtime_ns for f in first.files} == mtimes  # nothing rewritten
    (staged / "README.md").write_text("edited by hand\n")  # a damaged folder is staged again
    publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True))
    assert (staged / "README.md").read_text().startswith("---")
    other = publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True, license="mit")).staged
    assert "license: mit" in (staged / "README.md").read_text() and other.files == first.files


def test_scratch_folders_of_a_killed_staging_are_removed(built, tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f".iterdpo-staging-staged-{dead.pid}-abc"
    (leftover / "default").mkdir(parents=True)
    publish(built, PublishConfig("me/iterative-dpo", local_dir=tmp_path / "staged", dry_run=True))
    assert not leftover.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".iterdpo-staging")] == []


def test_trl_config_passes_dpo_trainer_dataset_preparation(built, tmp_path, tiny_models):
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staged = tmp_path / "staged"
    publish(built, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True))
    ds = datasets.load_dataset(str(staged), "trl", split="train_iteration_1")
    tok = AutoTokenizer.from_pretrained(tiny_models / "generator")
    model = AutoModelForCausalLM.from_pretrained(tiny_models / "generator")
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        report_to=[],
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=256,
    )
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    prepared = trainer.train_dataset
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(prepared.column_names) and len(prepared) > 0
    row = prepared[0]
    assert row["prompt_ids"][0] == tok.bos_token_id and row["chosen_ids"] and row["rejected_ids"]


def test_bad_publish_inputs(built, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="invalid repo id"):
        publish(built, PublishConfig("not a repo!", dry_run=True))
    with pytest.raises(InputError, match="iteration\\(s\\) 2 have no pairs"):
        publish(built, PublishConfig("me/x", iterations=(2,), dry_run=True))
    with pytest.raises(InputError, match="nothing built"):
        publish(Catalog(tmp_path / "empty.duckdb"), PublishConfig("me/x", dry_run=True))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("builders.hub.token", lambda: None)
    with pytest.raises(InputError, match="no Hugging Face token: run `hf auth login` or set HF_TOKEN"):
        publish(built, PublishConfig("me/x"))


# ------------------------------------------------------------------------------------------------ a fake Hub server
class FakeHub(BaseHTTPRequestHandler):
    state: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body=None):
        payload = json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drop(self):
        """Close the connection without an answer: what a dropped connection looks like to the client."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self, method: str):
        st = self.state
        body = self._body() if method == "POST" else b""
        st["requests"].append((method, self.path, self.headers.get("Authorization")))
        path = self.path.split("?")[0]
        for part in list(st["drop_once"]):  # scripted: the first request to a matching path loses its connection
            if part in path:
                st["drop_once"].remove(part)
                return self._drop()
        for part, status in list(st["fail_once"].items()):
            if part in path:
                del st["fail_once"][part]
                return self._reply(status, {"error": "scripted failure"})
        if st.get("status_once"):
            status = st.pop("status_once")
            return self._reply(status, {"error": "scripted failure"})
        if st.get("status_always"):
            return self._reply(st["status_always"], {"error": "scripted failure"})
        if path == "/api/whoami-v2":
            return self._reply(
                200,
                {"type": "user", "name": "me", "auth": {"type": "access_token", "accessToken": {"role": st["role"]}}},
            )
        if "/commits/" in path:  # the revision's history, newest first
            return self._reply(
                200,
                [
                    {
                        "id": oid,
                        "authors": [{"user": "me"}],
                        "date": "2026-12-01T00:00:00.000Z",
                        "title": header["summary"],
                        "message": header.get("description", ""),
                    }
                    for oid, header in reversed(st["history"])
                ],
            )
        if path.endswith("/refs"):
            head = st["history"][-1][0] if st["history"] else "0" * 40
            return self._reply(
                200,
                {
                    "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": head}],
                    "converts": [],
                    "pullRequests": [],
                    "tags": [
                        {"name": body["tag"], "ref": f"refs/tags/{body['tag']}", "targetCommit": oid}
                        for oid, body in st["tags"]
                    ],
                },
            )
        if path == "/api/repos/create":
            st["repos"].add(json.loads(body)["name"])
            st["create_body"] = json.loads(body)
            host = f"http://{self.headers['Host']}"
            return self._reply(
                200, {"url": f"{host}/datasets/{json.loads(body)['organization']}/{json.loads(body)['name']}"}
            )
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/tree/" in path:
            return self._reply(200, [{"type": "file", "path": p, "size": 1, "oid": "0" * 40} for p in st["files"]])
        if path.endswith("/preupload/main"):
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            st["commits"].append(lines)
            for line in lines:
                if line["key"] == "file":
                    st["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] == "deletedFile":
                    st["files"].pop(line["value"]["path"], None)
            oid = f"{len(st['commits']):040x}"
            st["history"].append((oid, next(line["value"] for line in lines if line["key"] == "header")))
            if st.get("lose_commit_answer"):  # applied, but the client never hears so
                how = st.pop("lose_commit_answer")
                return self._drop() if how == "drop" else self._reply(how, {"error": "scripted failure"})
            return self._reply(
                200,
                {
                    "commitUrl": f"http://{self.headers['Host']}/datasets/me/iterative-dpo/commit/{oid}",
                    "commitOid": oid,
                },
            )
        if "/tag/" in path:
            st["tags"].append((path.rsplit("/", 1)[-1], json.loads(body)))
            return self._reply(200, {})
        return self._reply(404, {"error": f"unknown endpoint {method} {path}"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


@pytest.fixture
def hub(monkeypatch):
    state = {
        "requests": [],
        "repos": set(),
        "files": {},
        "commits": [],
        "tags": [],
        "history": [],
        "role": "write",
        "drop_once": [],
        "fail_once": {},
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Hub", (FakeHub,), {"state": state}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this server is local
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("builders.hub.token", lambda: TOKEN)
    yield state
    server.shutdown()


def _cfg(tmp_path, **kw) -> PublishConfig:
    return PublishConfig("me/iterative-dpo", local_dir=tmp_path / "staged", backoff=0.01, **kw)


def test_upload_is_one_commit_then_a_tag_and_republishing_is_a_noop(built, tmp_path, hub):
    hub["files"][".gitattributes"] = b"*.parquet filter=lfs"
    hub["files"]["default/train_iteration_9-00000-of-00001.parquet"] = b"old"  # an earlier publication's
    hub["files"]["evals/alpaca_eval.json"] = b"{}"  # the user's: never deleted
    result = publish(built, _cfg(tmp_path))
    assert len(hub["commits"]) == 1
    ops = hub["commits"][0]
    added = sorted(op["value"]["path"] for op in ops if op["key"] == "file")
    assert added == sorted(result.staged.files)
    assert [op["value"]["path"] for op in ops if op["key"] == "deletedFile"] == [
        "default/train_iteration_9-00000-of-00001.parquet"
    ]
    header = next(op["value"] for op in ops if op["key"] == "header")
    assert header["description"].endswith("License: apache-2.0")  # the licence is recorded with the publication
    staged = result.staged.folder
    assert all(hub["files"][rel] == (staged / rel).read_bytes() for rel in result.staged.files)  # what landed
    assert hub["tags"] == [
        ("1".rjust(40, "0"), {"tag": result.staged.set_id, "message": f"iterdpo snapshot set {result.staged.set_id}"})
    ]
    repo_calls = [r for r in hub["requests"] if r[1].startswith(("/api/datasets/", "/api/repos/"))]
    assert repo_calls and all(auth == f"Bearer {TOKEN}" for _, _, auth in repo_calls)
    # again: nothing sent, the catalog says it is published
    before = len(hub["requests"])
    mtimes = {p: p.stat().st_mtime_ns for p in staged.rglob("*")}
    again = publish(built, _cfg(tmp_path))
    assert again.already_published and again.commit == result.commit and len(hub["requests"]) == before
    assert (
        again.staged.folder is None and {p: p.stat().st_mtime_ns for p in staged.rglob("*")} == mtimes
    )  # not restaged
    # the token is nowhere on disk
    for path in [built.path, *staged.rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes()


def test_a_500_is_retried(built, tmp_path, hub):
    hub["status_once"] = 500
    result = publish(built, _cfg(tmp_path))
    assert result.commit and len(hub["commits"]) == 1


def test_401_fails_cleanly_and_records_nothing(built, tmp_path, hub):
    hub["status_always"] = 401
    with pytest.raises(IterdpoError, match="HTTP 401.*hf auth login") as err:
        publish(built, _cfg(tmp_path))
    assert TOKEN not in str(err.value)
    assert hub["commits"] == []
    with built.connect() as con:
        assert con.execute("SELECT count(*) FROM publications").fetchall()[0][0] == 0
    hub.pop("status_always")
    assert publish(built, _cfg(tmp_path)).commit  # and a later try publishes


def test_a_failed_tag_is_added_by_the_next_publish(built, tmp_path, hub):
    handler_state = hub

    original = FakeHub._handle

    def no_tags(self, method):
        if "/tag/" in self.path and handler_state.get("refuse_tags"):
            self._body()
            return self._reply(403, {"error": "no"})
        return original(self, method)

    FakeHub._handle = no_tags
    try:
        hub["refuse_tags"] = True
        with pytest.raises(IterdpoError, match="commit .* landed; rerun `iterdpo publish` to tag it"):
            publish(built, _cfg(tmp_path))
        assert len(hub["commits"]) == 1 and hub["tags"] == []
        hub["refuse_tags"] = False
        again = publish(built, _cfg(tmp_path))
        assert len(hub["commits"]) == 1 and len(hub["tags"]) == 1  # no second commit, only the tag
        assert again.tag == again.staged.set_id and again.already_published
        assert publish(built, _cfg(tmp_path)).already_published and len(hub["tags"]) == 1
    finally:
        FakeHub._handle = original


def test_persistent_server_errors_give_up_without_recording(built, tmp_path, hub):
    hub["status_always"] = 503
    with pytest.raises(IterdpoError, match="nothing was published"):
        publish(built, PublishConfig("me/iterative-dpo", local_dir=tmp_path / "s", backoff=0.001, max_retries=2))
    with built.connect() as con:
        assert con.execute("SELECT count(*) FROM publications").fetchall()[0][0] == 0


def test_cli_publish_dry_run_json(cli, built, tmp_path, catalog_path):
    import shutil

    shutil.copy(built.path, catalog_path)
    out = cli("publish", "me/iterative-dpo", "--local-dir", tmp_path / "cli-staged", "--dry-run", "--json")
    assert out.code == 0, out.err
    doc = out.json()
    assert doc["dry_run"] and (tmp_path / "cli-staged" / "README.md").exists() and doc["license"] == "apache-2.0"
    bad = cli("publish", "me/iterative-dpo", "--iterations", "one", "--dry-run")
    assert bad.code == 2
    licensed = cli(
        "publish", "me/iterative-dpo", "--local-dir", tmp_path / "cli-staged", "--dry-run", "--license", "mit"
    )
    assert licensed.code == 0, licensed.err
    assert "license: mit" in (tmp_path / "cli-staged" / "README.md").read_text()
    bad = cli("publish", "me/iterative-dpo", "--dry-run", "--license", "my licence")
    assert bad.code == 2 and "not a licence id" in bad.err


def test_staged_parquet_streams_to_the_same_bytes_as_datasets_writes_the_whole_table(built, tmp_path):
    """Staging streams the snapshot a few rows at a time; the files are byte for byte what `Dataset.to_parquet`
    writes from the whole table (the writer before streaming), row groups included."""
    import dataclasses

    import datasets
    import pyarrow.parquet as pq

    pairs = built.read(built.newest("pairs", 1, "train").id)
    limit = pairs.nbytes // 3  # several row groups in each config
    streamed = Catalog(built.path, dataclasses.replace(built.config, chunk_rows=2))  # batches of 2 rows
    staged = tmp_path / "staged"
    publish(streamed, PublishConfig("me/iterative-dpo", local_dir=staged, dry_run=True, max_row_group_bytes=limit))
    for config, table in (("default", pairs), ("trl", to_trl(pairs))):
        reference = tmp_path / f"{config}.parquet"
        datasets.Dataset(table).to_parquet(str(reference), batch_size=table.num_rows * limit // table.nbytes)
        ours = staged / config / "train_iteration_1-00000-of-00001.parquet"
        assert pq.ParquetFile(ours).num_row_groups >= 2
        assert ours.read_bytes() == reference.read_bytes()


# ------------------------------------------------------------------------------------------- Hub faults (issue 20)
def _publications(catalog: Catalog) -> list[tuple]:
    with catalog.connect() as con:
        return con.execute("SELECT commit_id, tag FROM publications").fetchall()


def test_a_dropped_connection_is_retried(built, tmp_path, hub):
    # huggingface_hub 2.x raises httpx2's RemoteProtocolError for a connection closed without an answer
    hub["drop_once"] += ["/api/repos/create", "/commit/"]
    result = publish(built, _cfg(tmp_path))
    assert hub["drop_once"] == []  # both drops happened, and were retried
    assert len(hub["commits"]) == 1 and result.commit == hub["history"][0][0] and result.tag == result.staged.set_id


@pytest.mark.parametrize("lost", [500, "drop"])
def test_a_commit_whose_answer_is_lost_is_not_sent_again(built, tmp_path, hub, lost):
    hub["lose_commit_answer"] = lost  # the Hub applies the commit, then answers 500 or drops the connection
    result = publish(built, _cfg(tmp_path))
    assert len(hub["commits"]) == 1  # the retry found the commit in the history instead of committing again
    assert result.commit == hub["history"][0][0] and not result.already_published
    assert [oid for oid, _ in hub["tags"]] == [result.commit]
    assert _publications(built) == [(result.commit, result.staged.set_id)]


def test_a_rerun_finds_a_commit_that_landed_unrecorded(built, tmp_path, hub):
    # the answer of the commit is lost and no retry is left (or the process was killed while it was in flight):
    # the Hub has the commit, the catalog does not
    hub["lose_commit_answer"] = "drop"
    with pytest.raises(IterdpoError, match="if it reached the Hub, rerun `iterdpo publish`"):
        publish(built, _cfg(tmp_path, max_retries=0))
    assert len(hub["commits"]) == 1 and hub["tags"] == [] and _publications(built) == []
    again = publish(built, _cfg(tmp_path))
    assert len(hub["commits"]) == 1  # not committed a second time
    assert again.already_published and again.commit == hub["history"][0][0] and again.tag == again.staged.set_id
    assert [oid for oid, _ in hub["tags"]] == [again.commit]
    assert _publications(built) == [(again.commit, again.tag)]


def test_a_commit_tagged_on_the_hub_is_published_even_if_the_catalog_lost_it(built, tmp_path, hub):
    first = publish(built, _cfg(tmp_path))
    with built.atomic() as con:  # the record is gone (an older catalog copy, a restore)
        con.execute("DELETE FROM publications")
    requests = len(hub["requests"])
    again = publish(built, _cfg(tmp_path))
    assert again.already_published and again.commit == first.commit and len(hub["commits"]) == 1
    assert not any("/commit/" in path or "/tag/" in path for _, path, _ in hub["requests"][requests:])
    assert _publications(built) == [(first.commit, first.tag)]


@pytest.mark.parametrize("refusal", ["read-only", 401])
def test_the_token_is_checked_before_anything_is_staged(built, tmp_path, hub, refusal):
    if refusal == 401:
        hub["fail_once"]["/api/whoami-v2"] = 401
    else:
        hub["role"] = "read"
    cfg = _cfg(tmp_path)
    with pytest.raises(IterdpoError, match="HTTP 401.*hf auth login" if refusal == 401 else "token is read-only"):
        publish(built, cfg)
    assert not cfg.local_dir.exists()  # nothing staged
    assert [path for _, path, _ in hub["requests"]] == ["/api/whoami-v2"] and _publications(built) == []


def test_huggingface_hub_retry_lines_stay_off_stderr(built, tmp_path, hub):
    """huggingface_hub retries some requests itself and logs each retry; the CLI keeps stderr to its own lines."""
    import huggingface_hub.constants as constants

    from tests.conftest import run_iterdpo

    hub["fail_once"]["/preupload/"] = 503  # huggingface_hub's own backoff retries this one, and logs it
    done = run_iterdpo(
        "--catalog",
        built.path,
        "publish",
        "me/iterative-dpo",
        "--local-dir",
        tmp_path / "staged",
        env={"HF_ENDPOINT": constants.ENDPOINT, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN},
    )
    assert done.returncode == 0, done.stderr
    assert hub["fail_once"] == {} and len(hub["commits"]) == 1  # the 503 happened and was retried
    assert "Retrying" not in done.stderr and "thrown while requesting" not in done.stderr, done.stderr
    assert done.stdout.startswith("staged ") and "published me/iterative-dpo@main" in done.stdout
