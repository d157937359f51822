"""The ranking stage: score every response with a reward model; register `scores` snapshots.

Rankers (the `Ranker` protocol):
- `pairrm` (default): PairRM on the maintained transformers DeBERTa-v2, loading llm-blender's checkpoint layout
  (ranker config.json + state dict). Same input format, truncation rules and score as llm-blender's `Blender.rank`:
  each ordered pair (i, j) is one pass over `[CLS] <|source|> x [SEP] [CLS] <|candidate1|> a [SEP] [CLS]
  <|candidate2|> b [SEP]`, C[i, j] = head(source, cand1) - head(source, cand2), and
  score_i = sum_j (C[i, j] - C[j, i]) / N (llm-blender's mean over the N columns of C - C^T). One difference: the
  candidate budget (412 + half the unused part of the 1224-token source budget) is computed per prompt, where
  llm-blender takes it from the longest source in its batch; so scores equal llm-blender's at one prompt per
  batch. Passes of many prompts are batched together by padded width, and on CPU the scores are bit-identical
  whatever the batch options (see `PairRM.score`).
- `llm-blender`: the library itself, one prompt per batch (the reference `pairrm` is tested against).
- `scalar`: any AutoModelForSequenceClassification reward model, one pass per response.
- `python`: `module:function(prompts, responses) -> scores` over flat, equal-length lists.
- `judge`: an LLM judge on a generation backend (builders/judge.py); a response it could not score has a null
  score, counted in the snapshot's `judge_counts`.

A prompt that is a conversation (or has the system prompt its generation was given) reaches every ranker as the
conversation the model was asked (builders.conversation: a list of {role, content}, the last a user turn); a string
prompt as its string. PairRM's source is then the rendered history within its source budget, oldest turns cut
first, the last user turn never.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import pyarrow as pa
    >>> from builders.catalog import Catalog
    >>> from builders.config import RankConfig
    >>> from builders.prompts import prompt_id
    >>> from builders.rank import rank
    >>> catalog = Catalog(Path(tempfile.mkdtemp()) / "catalog.duckdb")
    >>> pid = prompt_id("Name a colour.")
    >>> prompts = catalog.register("prompts", pa.table({"prompt_id": [pid], "prompt": ["Name a colour."],
    ...                                                 "source": [None]}), iteration=1, split="train")
    >>> answers = ["Blue.", "Red is a colour.", "I am not sure"]
    >>> _ = catalog.register("generations", pa.Table.from_pylist(
    ...     [{"prompt_id": pid, "response_index": i, "response": a, "finish_reason": "stop", "prompt_tokens": 4,
    ...       "completion_tokens": 3} for i, a in enumerate(answers)]), iteration=1, split="train", parents=[prompts.id])
    >>> cfg = RankConfig(ranker="python", ranker_model="builders.rewards:complete_concise_answer", splits=("train",))
    >>> result = rank(catalog, 1, cfg, progress=False)
    >>> [(s.split, s.snapshot.kind, s.snapshot.rows) for s in result.splits]
    [('train', 'scores', 3)]
    >>> scores = catalog.read(result.snapshots[0].id).to_pylist()
    >>> max(scores, key=lambda r: r["score"])["response_index"]  # a finished sentence beats an unfinished one
    1
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import pyarrow as pa

from builders import executor
from builders.backends.base import Ranker, check_device, device_for
from builders.backends.ray import ranker_resources
from builders.catalog import Catalog
from builders.config import RANKERS, ExecutorConfig, RankConfig, validate_rank_config
from builders.conversation import effective, messages_of
from builders.errors import InputError, IterdpoError
from builders.models import model_identity
from builders.stage import (
    Finished,
    Producer,
    SplitWork,
    StageResult,
    StageSpec,
    chunks,
    counted,
    hash_key,
    progress_bar,
    resolve_inputs,
    run_stage,
)


def validate_rank(cfg: RankConfig) -> None:
    """Every ranking option (builders/config.py), then the device and what the executor needs of this machine: all
    before any input is read or model loaded."""
    validate_rank_config(cfg)
    if cfg.ranker == "judge":
        from builders.judge import validate_judge

        validate_judge(cfg)
    if cfg.ranker != "python" and cfg.scale_out.executor == "local":  # on Ray, the device is the replicas'
        check_device(cfg.device)
    from builders.backends.ray import check_rank_executor

    check_rank_executor(cfg)  # the device on the replicas, an unreachable address, replicas that do not fit


def make_ranker(cfg: RankConfig) -> Ranker:
    """The local ranker `cfg` names (the executor decides where it runs: `producer`)."""
    if cfg.ranker == "pairrm":
        from builders.backends.pairrm import PairRM

        return PairRM(cfg.ranker_model, cfg.device, cfg.dtype, cfg.batch_tokens)
    if cfg.ranker == "llm-blender":
        from builders.backends.llm_blender import LlmBlender

        return LlmBlender(cfg.ranker_model, cfg.device)
    if cfg.ranker == "scalar":
        from builders.backends.scalar import ScalarRM

        return ScalarRM(cfg.ranker_model, cfg.device)
    if cfg.ranker == "python":
        from builders.backends.python import PythonScorer

        return PythonScorer(cfg.ranker_model)
    if cfg.ranker == "judge":
        from builders.judge import Judge

        return Judge(cfg)
    raise InputError(f"unknown ranker {cfg.ranker!r}; use one of {', '.join(RANKERS)}", option="ranker")


def producer(cfg: RankConfig, ranker: Ranker | None = None) -> Producer:
    """Ranking's model work for `cfg`, on its executor: a work item is (key, prompt, [(response_index, response)]).
    `ranker`: an already built local ranker to use (locally) instead of building one."""
    local = replace(cfg, scale_out=ExecutorConfig())  # what each Ray replica runs: the local ranker
    build = partial(make_ranker, local) if ranker is None or cfg.scale_out.executor != "local" else lambda: ranker
    if cfg.ranker == "judge":
        from builders.judge import produce as judge_produce

        run = partial(judge_produce, cfg.batch_prompts)
    else:
        run = partial(_produce, cfg.batch_prompts)
    return executor.producer(
        cfg.scale_out,
        build,
        run,
        chunk=cfg.batch_prompts,
        resources=partial(ranker_resources, cfg),
        label="rank",
    )


# ----------------------------------------------------------------------------------------------------------- stage
def ranker_identity(cfg: RankConfig) -> dict[str, Any]:
    if cfg.ranker == "python":
        return {"ranker_model": cfg.ranker_model}
    if cfg.ranker == "judge":
        from builders.judge import judge_identity

        return judge_identity(cfg)
    ident = model_identity(cfg.ranker_model)
    return {"ranker_model": ident.pop("model"), **{f"ranker_{k}": v for k, v in ident.items()}}


def grouped(table: pa.Table) -> tuple[list[str], dict[str, list[tuple[int, str]]]]:
    """prompt_id -> [(response_index, response)] in order, from a generations table (canonical order)."""
    by: dict[str, list[tuple[int, str]]] = {}
    for pid, idx, text in zip(
        table.column("prompt_id").to_pylist(),
        table.column("response_index").to_pylist(),
        table.column("response").to_pylist(),
    ):
        by.setdefault(pid, []).append((idx, text))
    return list(by), by


def check_finite(prompt_id: str, scores: Sequence[float]) -> None:
    for s in scores:
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise IterdpoError(f"the ranker returned a non-finite score ({s}) for prompt {prompt_id}")


def rank(
    catalog: Catalog,
    iteration: int,
    cfg: RankConfig = RankConfig(),
    from_refs: Sequence[str] = (),
    progress: bool = True,
    ranker: Ranker | None = None,
) -> StageResult:
    """Score every response of `iteration`'s generations; register a `scores` snapshot per split.
    Resumable like generation: scored prompts are committed as the run goes and skipped by a rerun."""
    validate_rank(cfg)
    sets = resolve_inputs(catalog, "generations", iteration, cfg.splits, from_refs)
    identity = ranker_identity(cfg)
    keyed = identity
    if cfg.ranker == "judge":
        from builders.judge import judge_counts, judge_key

        keyed = judge_key(identity)  # the template's content decides, not its name or path
    from builders.preferences import learned_from

    reward = learned_from(catalog, cfg)  # a reward model `reward train` made: a parent, so lineage reaches its labels
    settings: dict[str, Any] = {"ranker": cfg.ranker, "dtype": cfg.dtype}
    if cfg.ranker == "pairrm" and _on_gpu(cfg):
        # PairRM's scores are bit-identical across batch options on CPU (tested); GPU kernels may change with the
        # batch shape, so there the batch options are part of the key and a resumed run cannot mix them
        settings.update(batch_prompts=cfg.batch_prompts, batch_tokens=cfg.batch_tokens)

    def splits() -> Iterator[SplitWork]:
        for split, gen in sets.items():  # one split's generations in memory at a time
            system = gen.params.get("system_prompt")  # what generation asked the model, with the prompt
            key = hash_key(
                {
                    "stage": "rank",
                    "generations": gen.id,
                    **keyed,
                    **settings,
                    **({"system_prompt": system} if system else {}),
                }
            )
            prompts_snap = catalog.parent(gen, "prompts")
            if prompts_snap is None:
                raise InputError(
                    f"generations {gen.id[:12]} record no prompts snapshot: rank needs the prompts they "
                    f"answer (register them with parents=[the prompts snapshot])"
                )
            prompts = catalog.read(prompts_snap.id)
            prompt_text = {
                pid: effective(text, conv, system)
                for pid, text, conv in zip(
                    prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist(), messages_of(prompts)
                )
            }
            order, by = grouped(catalog.read(gen.id))
            items = {pid: (pid, prompt_text[pid], by[pid]) for pid in order}

            def params(
                described: dict[str, Any], skipped: int, key: str = key, gen_id: str = gen.id, units=tuple(order)
            ) -> dict[str, Any]:
                out = {
                    **identity,
                    **described,
                    "generations": gen_id,
                    "work_key": key,
                    **{k: v for k, v in settings.items() if k.startswith("batch_")},
                }
                if cfg.ranker == "judge":  # unscored responses, retries and failures, counted (never a silent 0)
                    out["judge_counts"] = judge_counts(catalog.work_units(key), units)
                return out

            yield SplitWork(split, key, items, [gen.id, *reward], params)

    spec = StageSpec("rank", "scores", iteration, "ranker", producer(cfg), cfg.commit_seconds)
    return run_stage(catalog, spec, splits(), progress=progress, backend=ranker)


def _on_gpu(cfg: RankConfig) -> bool:
    if cfg.scale_out.executor == "ray":
        from builders.backends.ray import ranker_on_gpu

        return ranker_on_gpu(cfg)
    return not device_for(cfg.device).startswith("cpu")


def _produce(
    batch_prompts: int, ranker: Ranker, items: Sequence[tuple[str, str, list[tuple[int, str]]]]
) -> Iterator[Finished]:
    """Scores of (key, prompt, [(response_index, response)]) items, `batch_prompts` prompts per call."""
    for chunk in chunks(items, batch_prompts):
        scores = ranker.score([prompt for _, prompt, _ in chunk], [[t for _, t in cands] for _, _, cands in chunk])
        rows: dict[str, list] = {"prompt_id": [], "response_index": [], "score": []}
        for (pid, _, cands), values in zip(chunk, scores):
            if len(values) != len(cands):
                raise IterdpoError(
                    f"the ranker returned {len(values)} scores for the {len(cands)} responses of prompt {pid}"
                )
            check_finite(pid, values)
            for (idx, _), value in zip(cands, values):
                rows["prompt_id"].append(pid)
                rows["response_index"].append(idx)
                rows["score"].append(float(value))
        yield Finished({pid: None for pid, _, _ in chunk}, pa.table(rows))


def score_all(
    cfg: RankConfig,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    ranker: Ranker | None = None,
    progress: bool = False,
    desc: str = "rank",
) -> list[list[float]]:
    """Scores of each prompt's candidates on `cfg`'s executor, outside the catalog (best-of-n), with the stages'
    progress bar."""
    run = producer(cfg, ranker)
    backend = run.build()
    got: dict[str, list[float]] = {}
    try:
        items = [(str(i), p, list(enumerate(c))) for i, (p, c) in enumerate(zip(prompts, candidates))]
        with progress_bar(len(items), desc, progress) as bar:
            for item in counted(run.run(backend, items), bar):
                for key, score in zip(item.rows.column("prompt_id").to_pylist(), item.rows.column("score").to_pylist()):
                    got.setdefault(key, []).append(score)
    finally:
        if ranker is None or cfg.scale_out.executor != "local":
            backend.close()
    return [got.get(str(i), []) for i in range(len(prompts))]
