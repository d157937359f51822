"""Prompts that are conversations, and system prompts: import, generate, rank, build, publish and DPO training
on them, as a user runs them (builders/conversation.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builders.catalog import Catalog
from builders.errors import InputError
from builders.prompts import import_prompts

SYSTEM = "You are a pirate."
PERSONA = "Be concise and kind."


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# a 3-turn conversation with its own system prompt, 3-turn ones without, a one-turn conversation (= its string),
# a plain string, and a system prompt with one turn
CONVERSATIONS = [
    [
        _msg("system", SYSTEM),
        _msg("user", "Name a colour."),
        _msg("assistant", "Blue, matey."),
        _msg("user", "And another one? "),
    ],
    [_msg("user", "Give me a number."), _msg("assistant", "Seven."), _msg("user", "Double it.")],
    [_msg("user", "Write a haiku about rivers.")],
    "Explain recursion briefly.",
    [_msg("system", "Answer in French."), _msg("user", "What is the capital of Italy?")],
    [
        _msg("user", "List three fruits."),
        _msg("assistant", "Apple, pear, plum."),
        _msg("user", "Now three vegetables."),
    ],
]


def _write_jsonl(path: Path, values: list, column: str = "messages") -> Path:
    path.write_text("".join(json.dumps({column: v}) + "\n" for v in values))
    return path


def documented_id(messages: list[dict[str, str]]) -> str:
    """The README's definition, written out independently of builders.conversation."""
    pairs = [[m["role"], m["content"].strip()] for m in messages]
    text = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(b"\xff" + text.encode("utf-8")).hexdigest()


def test_conversation_ids_rows_and_string_prompts_unchanged(tmp_path: Path, catalog: Catalog):
    src = _write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    result = import_prompts(catalog, str(src))
    assert (result.column, result.read, result.conversations) == ("messages", 6, 4)
    rows = {r["prompt_id"]: r for r in catalog.read(result.snapshot.id).to_pylist()}
    sha = hashlib.sha256
    # strings, and a conversation of one user turn, are the string prompt: sha256 of the stripped text, no messages
    for text in ("Write a haiku about rivers.", "Explain recursion briefly."):
        row = rows[sha(text.encode()).hexdigest()]
        assert row["prompt"] == text and row["messages"] is None
    # a conversation: the documented id, its last user turn as `prompt`, the whole (stripped) as `messages`
    first = rows[documented_id(CONVERSATIONS[0])]
    assert first["prompt"] == "And another one?"
    assert first["messages"][0] == {"content": SYSTEM, "role": "system"} and len(first["messages"]) == 4
    assert first["messages"][-1] == {"content": "And another one?", "role": "user"}
    assert len(rows) == 6
    # the same prompts again, as Parquet (a list<struct> column, as `datasets` writes messages): the same snapshot
    table = pa.table({"messages": [v if isinstance(v, list) else [_msg("user", v)] for v in CONVERSATIONS]})
    pq.write_table(table, tmp_path / "chats.parquet")
    again = import_prompts(catalog, str(tmp_path / "chats.parquet"))
    assert again.snapshot.id == result.snapshot.id and len(catalog.list()) == 1
    # a pool of string prompts has the same id whether or not the catalog knows conversations: the pinned ids
    # (tests/test_pinned_ids.py) hold, and a `messages` column of nulls is the same snapshot as none
    plain = pa.table({"prompt_id": [sha(b"Hi").hexdigest()], "prompt": ["Hi"], "source": pa.array([None], pa.string())})
    with_nulls = plain.append_column(
        "messages", pa.nulls(1, catalog.read(result.snapshot.id).schema.field("messages").type)
    )
    assert catalog.register("prompts", plain).id == catalog.register("prompts", with_nulls).id


@pytest.mark.parametrize(
    "bad, message",
    [
        ([_msg("user", "Hi"), _msg("assistant", "Hello!")], "ends with an assistant turn"),
        ([_msg("user", "Hi"), _msg("tool", "42"), _msg("user", "So?")], "unknown role 'tool'"),
        ([_msg("user", "Hi"), _msg("system", "Be brief."), _msg("user", "So?")], "only the first message"),
        ([_msg("user", "Hi"), _msg("user", "Hello?")], "turns alternate user/assistant"),
        ([_msg("system", "Be brief.")], "needs a user turn"),
        ([{"role": "user", "text": "Hi"}], "keys other than role and content"),
    ],
)
def test_a_bad_conversation_is_one_line_exit_1_and_registers_nothing(tmp_path: Path, cli, catalog_path, bad, message):
    src = _write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[1], bad])
    r = cli("prompts", "import", src)
    assert r.code == 1 and r.out == ""
    assert r.err.count("\n") == 1 and message in r.err and f"{src}:2" in r.err, r.err
    assert not catalog_path.exists() or Catalog(catalog_path).list() == []


def test_a_3_turn_conversation_with_a_system_prompt_from_import_to_dpo_training(
    tmp_path: Path, cli, catalog_path, tiny_models, monkeypatch
):
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    persona = tmp_path / "persona.txt"
    persona.write_text(PERSONA + "\n")
    assert cli("prompts", "import", src).code == 0
    assert cli("prompts", "split", "--iterations", "1", "--train-size", "4", "--test-size", "2").code == 0
    gen_args = ["generate", "--iteration", "1", "--model", tiny_models / "generator", "--num-responses", "3"]
    gen_args += ["--max-tokens", "8", "--system-prompt", f"@{persona}", "--json"]
    r = cli(*gen_args)
    assert r.code == 0, r.err
    gens = [s["snapshot"] for s in r.json()["splits"]]
    assert all(g["params"]["system_prompt"] == PERSONA for g in gens)
    # the two conversations that have their own system message keep it, and are counted
    assert sum(g["params"]["system_prompt_kept_own"] for g in gens) == 2
    rerun = cli(*gen_args)  # the same inputs and system prompt: nothing to do, the same snapshots
    assert [s["snapshot"]["id"] for s in rerun.json()["splits"]] == [g["id"] for g in gens]

    catalog = Catalog(catalog_path)
    expected = {}  # prompt_id -> the conversation the model was asked
    for s in ("train", "test"):
        for row in catalog.read(f"prompts:1:{s}").to_pylist():
            conv = row.get("messages") or [{"content": row["prompt"], "role": "user"}]
            if conv[0]["role"] != "system":
                conv = [{"content": PERSONA, "role": "system"}, *conv]
            expected[row["prompt_id"]] = conv

    # the python ranker receives each prompt's messages (the system prompt included)
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("ITERDPO_TEST_SEEN", str(seen))
    r = cli("rank", "--iteration", "1", "--ranker", "python", "--ranker-model", "tests.scorers:records_prompts")
    assert r.code == 0, r.err
    got = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(got) == 18 and all(isinstance(p, list) for p in got)
    assert {json.dumps(p) for p in got} == {json.dumps(c) for c in expected.values()}
    # PairRM scores them too (its source: the rendered history, tested below); the pairs are built from these
    r = cli("rank", "--iteration", "1", "--ranker-model", tiny_models / "ranker")
    assert r.code == 0, r.err
    r = cli("build", "--iteration", "1", "--json")
    assert r.code == 0, r.err
    staged = tmp_path / "staged"
    assert cli("publish", "me/chats", "--dry-run", "--local-dir", staged).code == 0
    assert f"--system-prompt '{PERSONA}'" in (staged / "README.md").read_text()  # the rebuild commands

    # `default`: Snorkel's schema; prompt = the last user turn, chosen/rejected = the whole conversation + answer
    default = datasets.load_dataset(str(staged), "default", split="train_iteration_1")
    trl_rows = datasets.load_dataset(str(staged), "trl", split="train_iteration_1")
    assert len(default) == len(trl_rows) == 4
    for row in default:
        conv = expected[row["prompt_id"]]
        assert row["prompt"] == conv[-1]["content"]
        for side in ("chosen", "rejected"):
            assert row[side][:-1] == conv and row[side][-1]["role"] == "assistant"
    # `trl`: prompt = the full message list, system included; one assistant message each side
    multi = 0
    for row in trl_rows:
        assert row["prompt"] == expected[row["prompt_id"]]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        multi += len(row["prompt"]) > 2
    assert multi >= 1  # a multi-turn conversation is among the training rows

    # TRL's DPOTrainer trains on it, every row kept, each prompt tokenized from its whole conversation
    tok = AutoTokenizer.from_pretrained(tiny_models / "generator")
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        use_cpu=True,
        report_to=[],
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=1024,
        save_strategy="no",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_models / "generator")
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=trl_rows, processing_class=tok)
    prepared = trainer.train_dataset
    assert len(prepared) == len(trl_rows)
    for row, prompt in zip(prepared, trl_rows["prompt"]):
        rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert all(m["content"] in rendered for m in prompt)  # Mistral's template folds the system message in
        assert row["prompt_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert trainer.train().global_step == 1


def test_pairrm_source_is_the_history_cut_from_the_oldest_turns(tiny_models):
    from builders.backends.pairrm import PairRM

    rm = PairRM(str(tiny_models / "ranker"), device="cpu")
    short = [_msg("system", SYSTEM), _msg("user", "Name a colour."), _msg("assistant", "Blue."), _msg("user", "More?")]
    assert rm.source_text(short) == "SYSTEM: You are a pirate.\nUSER: Name a colour.\nAssistant: Blue.\nUSER: More?"
    assert rm.source_text("Name a colour.") == "Name a colour."  # a string prompt's source is unchanged

    def length(text: str) -> int:
        return len(rm.tokenizer("<|source|>" + text)["input_ids"])

    long_turn = " ".join(["the river answers the city"] * 150)  # each over half of the 1224-token budget
    conv = [_msg("system", long_turn), _msg("user", long_turn), _msg("assistant", "Blue."), _msg("user", "More?")]
    source = rm.source_text(conv)
    assert source == f"USER: {long_turn}\nAssistant: Blue.\nUSER: More?"  # the oldest turn (the system) cut
    assert length(source) <= rm.source_max < length("\n".join(["SYSTEM: " + long_turn, source]))
    huge = [_msg("user", "Hi"), _msg("assistant", long_turn * 3), _msg("user", "Why?")]
    assert rm.source_text(huge) == "USER: Why?"  # the last user turn is never cut
    a, b = rm.score([conv, "More?"], [["Red.", "Green, matey."], ["Red.", "Green, matey."]])
    assert a != b  # the history reaches the model


def test_the_scalar_ranker_renders_the_whole_conversation(tmp_path: Path, tiny_models):
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    from builders.backends.scalar import ScalarRM
    from builders.tiny import MISTRAL_CHAT_TEMPLATE

    backbone = tiny_models / "ranker" / "backbone"
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(DebertaV2Config.from_pretrained(backbone, num_labels=1)).save_pretrained(
        tmp_path / "rm"
    )
    tok = AutoTokenizer.from_pretrained(backbone)
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "rm")
    rm = ScalarRM(str(tmp_path / "rm"), device="cpu")
    conv = CONVERSATIONS[0]
    ids = rm._inputs([conv], ["Red."])["input_ids"][0].tolist()
    text = tok.apply_chat_template([*conv, _msg("assistant", "Red.")], tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and SYSTEM in text
    (with_history,), (alone,) = rm.score([conv, "And another one?"], [["Red."], ["Red."]])
    assert with_history != alone


NO_SYSTEM_TEMPLATE = (  # renders user and assistant turns only: a system message would be lost
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
REFUSING_TEMPLATE = (  # Mistral v0.1's: refuses anything but alternating user/assistant
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template, message",
    [(NO_SYSTEM_TEMPLATE, "drops the system message"), (REFUSING_TEMPLATE, "cannot render the conversation")],
)
def test_a_template_without_a_system_role_is_a_clear_error_before_any_work(
    tmp_path: Path, cli, catalog_path, tiny_models, template, message
):
    (tmp_path / "t.jinja").write_text(template)
    src = _write_jsonl(tmp_path / "p.jsonl", ["Name a colour.", "Name a city.", "Name a river."], column="prompt")
    assert cli("prompts", "import", src).code == 0
    assert cli("prompts", "split", "--iterations", "1", "--train-size", "2", "--test-size", "1").code == 0
    base = [
        "generate",
        "--iteration",
        "1",
        "--model",
        tiny_models / "generator",
        "--chat-template",
        tmp_path / "t.jinja",
    ]
    r = cli(*base, "--num-responses", "2", "--max-tokens", "4", "--system-prompt", PERSONA)
    assert r.code == 1 and r.err.count("\n") == 1 and message in r.err, r.err
    assert Catalog(catalog_path).list(kind="generations") == []
    with Catalog(catalog_path).connect() as con:
        assert con.execute("SELECT count(*) FROM work").fetchall()[0][0] == 0  # no work started
    r = cli(*base[:-2], "--num-responses", "2", "--max-tokens", "4", "--system-prompt", f"@{tmp_path / 'none.txt'}")
    assert r.code == 1 and "none.txt" in r.err and r.err.count("\n") == 1


def test_a_catalog_of_schema_2_reads_as_it_is_and_upgrades_at_its_first_write(tmp_path: Path):
    from builders.catalog import SCHEMA_VERSION

    old = tmp_path / "v2.duckdb"
    pool = import_prompts(Catalog(old), str(_write_jsonl(tmp_path / "p.jsonl", ["Hi", "Hello"], "prompt"))).snapshot
    con = duckdb.connect(str(old))  # what iterdpo before schema 3 wrote: no messages column
    con.execute("ALTER TABLE rows_prompts DROP COLUMN messages")
    con.execute("UPDATE iterdpo_meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    raw = old.read_bytes()
    catalog = Catalog(old)
    table = catalog.read(pool.id)  # read-only: as it is, messages null
    assert sorted(table.column("prompt").to_pylist()) == ["Hello", "Hi"]
    assert "messages" not in table.column_names and catalog.verify()["ok"]  # string prompts read as before
    merged = Catalog(tmp_path / "merged.duckdb")
    merged.merge([old])
    assert merged.read(pool.id).equals(table) and old.read_bytes() == raw
    # the first write upgrades it; conversations can then be imported beside the old rows
    chats = import_prompts(catalog, str(_write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)))
    with catalog.connect(read_only=True) as c:
        assert c.execute("SELECT value FROM iterdpo_meta WHERE key = 'schema_version'").fetchone()[0] == str(
            SCHEMA_VERSION
        )
    assert catalog.read(pool.id).equals(table) and catalog.read(chats.snapshot.id).num_rows == 6
    assert catalog.verify()["ok"]


def test_system_prompt_resolution():
    from builders.conversation import resolve_system_prompt

    assert resolve_system_prompt(None) is None and resolve_system_prompt("  ") is None
    assert resolve_system_prompt(" Be brief. ") == "Be brief."
    with pytest.raises(InputError, match="no such file|No such file"):
        resolve_system_prompt("@/nonexistent/persona.txt")


def test_a_pipeline_sets_the_system_prompt_of_its_generation(tmp_path: Path):
    from builders.pipeline import load_pipeline

    text = (Path(__file__).parents[1] / "pipelines" / "quickstart.yaml").read_text()
    marked = text.replace("generation:\n", f"generation:\n  system_prompt: '@{tmp_path / 'persona.txt'}'\n", 1)
    (tmp_path / "p.yaml").write_text(marked)
    assert load_pipeline(tmp_path / "p.yaml").generation.system_prompt == f"@{tmp_path / 'persona.txt'}"
    assert load_pipeline(Path(__file__).parents[1] / "pipelines" / "quickstart.yaml").generation.system_prompt is None


def test_a_split_draws_from_a_pool_of_strings_and_a_pool_of_conversations_together(tmp_path: Path, catalog: Catalog):
    from builders.config import SplitConfig
    from builders.prompts import split_prompts

    strings = import_prompts(catalog, str(_write_jsonl(tmp_path / "s.jsonl", ["Hi", "Hello", "Hey"], "prompt")))
    chats = import_prompts(catalog, str(_write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)))
    sets = split_prompts(
        catalog, SplitConfig(iterations=1, train_size=7, test_size=1), [strings.snapshot.id, chats.snapshot.id]
    )
    rows = [r for s in sets for r in catalog.read(s.id).to_pylist()]
    pool = {r["prompt_id"]: r for p in (strings, chats) for r in catalog.read(p.snapshot.id).to_pylist()}
    assert len(rows) == 8 and len({r["prompt_id"] for r in rows}) == 8
    for r in rows:  # each drawn as it is in its pool: a conversation with its messages, a string without
        assert (
            r.get("messages") == pool[r["prompt_id"]].get("messages") and r["prompt"] == pool[r["prompt_id"]]["prompt"]
        )
    assert sum(r.get("messages") is not None for r in rows) >= 3


def test_the_openai_backend_sends_the_conversation_and_the_system_prompt(tmp_path: Path, catalog: Catalog):
    """The fake server's long answers depend on every message's content: what it was sent shows in the rows."""
    from bench.fake_openai import FakeOpenAI
    from builders.config import GenerateConfig, OpenAIConfig, SamplingConfig, SplitConfig
    from builders.generate import generate
    from builders.prompts import split_prompts

    import_prompts(catalog, str(_write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)))
    split_prompts(catalog, SplitConfig(iterations=1, train_size=6, test_size=0))
    with FakeOpenAI(text="long") as fake:

        def responses(system: str | None) -> dict[str, str]:
            cfg = GenerateConfig(
                model="served-model",
                backend="openai",
                splits=("train",),
                system_prompt=system,
                sampling=SamplingConfig(num_responses=1, max_tokens=16),
                openai=OpenAIConfig(base_url=fake.url, concurrency=2, backoff=0.01),
            )
            snap = generate(catalog, 1, cfg, progress=False).snapshots[0]
            return dict(zip(*(catalog.read(snap.id).column(c).to_pylist() for c in ("prompt_id", "response"))))

        plain, persona = responses(None), responses(PERSONA)
    pirate = documented_id(CONVERSATIONS[0])  # has its own system message: kept, so the same request
    assert plain[pirate] == persona[pirate]
    assert all(plain[pid] != persona[pid] for pid in plain if pid != documented_id(CONVERSATIONS[4]) and pid != pirate)
