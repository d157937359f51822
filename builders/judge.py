"""The `judge` ranker: an LLM judges each response with a prompt template, on a generation backend (transformers,
vllm or openai), and its verdict's token probabilities become the score.

- Templates: Jinja files. Shipped in builders/templates/judge/: `rubric` (pointwise, 1-9), `self-rewarding` (the
  additive 5-point prompt of Self-Rewarding Language Models, 0-5) and `pairwise` ([[A]] or [[B]]). A user template
  is any Jinja file with the variables `prompt` and `response` (pointwise) or `prompt`, `response_a`, `response_b`
  (pairwise); its first line may declare what it is: `{#- judge: pointwise 1-5 -#}` or `{#- judge: pairwise -#}`
  (without it: `judge_mode`, and the scale 1-9).
- Pointwise: the judge writes "Score: N"; the score is the expectation of N over the probabilities of the score
  tokens at that position (the backend's top logprobs, renormalised over the scale's values), not the sampled
  digit: a small judge that samples "5" for everything still ranks by how sure it is.
- Pairwise: every ordered pair (i, j) is judged with i as A and j as B, "[[A]]" or "[[B]]"; pref(i, j) =
  P(A) / (P(A) + P(B)) at the verdict token, C[i, j] = 2 pref(i, j) - 1, and, as PairRM aggregates,
  score_i = sum_j (C[i, j] - C[j, i]) / N: a judge's bias towards a position adds the same to C[i, j] and C[j, i]
  and cancels. A pair counts only when both of its orders were judged; N is 1 + the pairs counted for i.
- A judgement that cannot be parsed (no verdict, a score outside the scale, a score token the backend gave no
  probabilities for) is asked again `judge_retries` times with a new seed (not at temperature 0: the same answer
  would come back), then left unscored: its row holds a null score, and the snapshot's params count it
  (`judge_counts`); `build` drops prompts with fewer than 2 scored responses and counts them (`unscored`).
  A judge prompt too long for the judge's context is unscored the same way, and counted apart (`too_long`).
- Deterministic: each judgement's seed derives from (judge_seed, prompt_id, response indices, attempt), never from
  batch position, and the work key holds the judge model's identity, the template's content (not its path) and
  the judge's sampling; so the same judge, template and seed give the same scores snapshot id, resumed or not.

    >>> t = load_template("self-rewarding")
    >>> t.mode, t.values
    ('pointwise', ['0', '1', '2', '3', '4', '5'])
    >>> probs = {"4": 0.5, " 3": 0.25, "1": 0.25, "the": 0.1}  # the verdict token's top probabilities
    >>> parse_verdict(t, ["Because ...", " Score", ":", " ", "4"], [{}, {}, {}, {}, probs])
    3.0
    >>> parse_verdict(t, ["Score", ":", " ", "7"], [{}, {}, {}, {"7": 1.0}])
    'out_of_scale'
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from builders.config import BACKENDS, RankConfig, SamplingConfig
from builders.conversation import render_lines
from builders.errors import InputError, IterdpoError
from builders.schemas import KINDS
from builders.stage import Finished, chunks

TEMPLATES = Path(__file__).resolve().parent / "templates" / "judge"
JUDGE_MODES = ("pointwise", "pairwise")
DEFAULT_TEMPLATE = {"pointwise": "rubric", "pairwise": "pairwise"}
DEFAULT_SCALE = (1, 9)
# OpenAI's chat completions allow at most 20 top logprobs; every backend asks for as many
TOP_LOGPROBS = 20
_HEADER = re.compile(r'\A\{#-?\s*judge:\s*(\w+)(?:\s+(\d+)\s*-\s*(\d+))?(?:\s+answer="([^"]*)")?\s*-?#\}')
_VERDICT = {
    "pointwise": re.compile(r"score\s*[:=]\s*\**\s*(\d+)", re.IGNORECASE),
    "pairwise": re.compile(r"\[\[\s*([AB])(?![A-Za-z])"),
}
# why a judgement was not scored (judge_counts in the snapshot's params)
FAILURES = ("no_verdict", "out_of_scale", "split_token", "too_long")


# ------------------------------------------------------------------------------------------------------ templates
@dataclass(frozen=True)
class JudgeTemplate:
    name: str  # a shipped template's name, or the file given
    text: str
    mode: str
    scale: tuple[int, int] | None  # pointwise: the lowest and highest score
    answer: str = ""  # the judge's answer starts with this text (prefilled), e.g. "Score:"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def values(self) -> list[str]:
        """The verdict tokens' texts: the scale's numbers, or A and B."""
        if self.mode == "pairwise":
            return ["A", "B"]
        lo, hi = self.scale or DEFAULT_SCALE
        return [str(v) for v in range(lo, hi + 1)]

    def render(self, **variables: str) -> str:
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)
        return env.from_string(self.text).render(**variables).strip()


def shipped_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def load_template(ref: str | Path | None, mode: str | None = None) -> JudgeTemplate:
    """A shipped template by name, or a Jinja file; checked by rendering it (an unknown variable, a syntax error or
    a mode other than `mode` is an InputError)."""
    if mode is not None and mode not in JUDGE_MODES:
        raise InputError(f"judge_mode must be pointwise or pairwise, not {mode!r}", option="judge_mode")
    ref = str(ref) if ref is not None else DEFAULT_TEMPLATE[mode or "pointwise"]
    shipped = TEMPLATES / f"{ref}.jinja"
    path = shipped if "/" not in ref and shipped.is_file() else Path(ref).expanduser()
    if not path.is_file():
        raise InputError(
            f"unknown judge template {ref!r}: use one of {', '.join(shipped_templates())} or a Jinja file",
            option="judge_template",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"judge template {ref}: {getattr(e, 'strerror', None) or e}", option="judge_template"
        ) from None
    declared, scale, answer = None, None, ""
    if m := _HEADER.match(text.lstrip()):
        declared, answer = m.group(1), m.group(4) or ""
        if declared not in JUDGE_MODES:
            raise InputError(f"judge template {ref}: its header names mode {declared!r}; use pointwise or pairwise")
        if m.group(2) is not None:
            scale = (int(m.group(2)), int(m.group(3)))
            if declared != "pointwise" or scale[0] >= scale[1]:
                raise InputError(
                    f"judge template {ref}: the scale {scale[0]}-{scale[1]} is not LOW-HIGH of a pointwise one"
                )
    if declared and mode and declared != mode:
        raise InputError(
            f"judge template {ref} is {declared}, not {mode}: leave out judge_mode or give a {mode} template",
            option="judge_mode",
        )
    chosen = declared or mode or "pointwise"
    t = JudgeTemplate(ref, text, chosen, (scale or DEFAULT_SCALE) if chosen == "pointwise" else None, answer)
    sample = (
        {"prompt": "p", "response": "r"}
        if chosen == "pointwise"
        else {"prompt": "p", "response_a": "a", "response_b": "b"}
    )
    import jinja2

    try:
        t.render(**sample)
    except jinja2.TemplateError as e:
        needs = ", ".join(sample)
        raise InputError(
            f"judge template {ref}: {type(e).__name__}: {e} (a {chosen} template has the variables {needs})",
            option="judge_template",
        ) from None
    return t


# ------------------------------------------------------------------------------------------------------ verdicts
def verdict_probabilities(template: JudgeTemplate, top: dict[str, float]) -> dict[str, float]:
    """The probability of each verdict value at a position: the top tokens whose text (stripped) is that value."""
    out = dict.fromkeys(template.values, 0.0)
    for token, p in top.items():
        if (t := token.strip()) in out:
            out[t] += p
    return out


def parse_verdict(template: JudgeTemplate, pieces: Sequence[str], top: Sequence[dict[str, float]]) -> float | str:
    """The judgement's value from its tokens (`pieces`) and each position's top token probabilities: pointwise,
    the expected score; pairwise, P(A) / (P(A) + P(B)). A string: why it cannot be parsed (FAILURES)."""
    text = "".join(pieces)
    matches = list(_VERDICT[template.mode].finditer(text))
    if not matches:
        return "no_verdict"
    m = matches[-1]  # a judge that reasons first may quote the format before it concludes
    value = m.group(1).upper() if template.mode == "pairwise" else str(int(m.group(1)))
    if value not in template.values:
        return "out_of_scale"
    at, start = None, 0
    for k, piece in enumerate(pieces):  # the token that holds the verdict, whole
        if start <= m.start(1) < start + len(piece):
            at = k
            break
        start += len(piece)
    if at is None or pieces[at].strip().upper() != m.group(1).upper():
        return "split_token"  # e.g. "07": no single token's probability is the verdict's
    probs = verdict_probabilities(template, top[at])
    total = sum(probs.values())
    if total <= 0:
        return "split_token"
    if template.mode == "pairwise":
        return probs["A"] / total
    return sum(int(v) * p for v, p in probs.items()) / total


def pairwise_scores(n: int, pref: dict[tuple[int, int], float]) -> list[float | None]:
    """PairRM's aggregation over the pairs judged in both orders: pref[(i, j)] = P(A) with i as A, j as B."""
    out: list[float | None] = []
    for i in range(n):
        total, partners = 0.0, 0
        for j in range(n):
            if j != i and (i, j) in pref and (j, i) in pref:
                total += (2 * pref[(i, j)] - 1) - (2 * pref[(j, i)] - 1)
                partners += 1
        out.append(total / (partners + 1) if partners else None)
    return out


def judgement_seed(seed: int, *parts: Any) -> int:
    """A judgement's seed: from the run seed and what is judged (never the batch position)."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------------ backends
@dataclass
class Completion:
    """One judgement's answer: its tokens' texts and, per token, the top tokens' probabilities (the sampled one
    included)."""

    pieces: list[str]
    top: list[dict[str, float]]


def _merge(top: dict[str, float], token: str, p: float) -> None:
    top[token] = top.get(token, 0.0) + p


def _prefilled(gen, prompts, sampling: SamplingConfig, answer: str) -> list:
    """A local backend's requests with the judge's answer begun (`answer` after the chat template's generation
    prompt), or "too_long"."""
    out = gen.prepare(prompts, sampling)
    if not answer:
        return out
    ready = [r for r in out if not isinstance(r, str)]
    ids = gen.tokenizer([r.text + answer for r in ready], add_special_tokens=False)["input_ids"] if ready else []
    for r, one in zip(ready, ids):
        r.text, r.token_ids, r.prompt_tokens = r.text + answer, one, len(one)
    return [
        "too_long" if not isinstance(r, str) and r.prompt_tokens + sampling.max_tokens > gen.context_length else r
        for r in out
    ]


class _Engine:
    """What the three engines share: the generator they wrap (`self.gen`) describes and closes them."""

    gen: Any

    def describe(self) -> dict[str, Any]:
        return self.gen.describe()

    def close(self) -> None:
        self.gen.close()


class _TransformersEngine(_Engine):
    """The transformers generator, returning each generated token's distribution (raw logits, before the sampler's
    temperature and top-p)."""

    def __init__(self, model: str, answer: str):
        from builders.backends.transformers import TransformersGenerator

        self.gen, self.answer = TransformersGenerator(model), answer

    def prepare(self, prompts, sampling):
        return _prefilled(self.gen, prompts, sampling, self.answer)

    def complete(self, requests, s: SamplingConfig) -> list[Completion | None]:
        import torch

        tok, lm = self.gen.tokenizer, self.gen.lm
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        out: list[Completion | None] = []
        for req in requests:
            torch.manual_seed(req.seed)
            ids = torch.tensor([req.token_ids], device=self.gen.device)
            with torch.no_grad():
                res = lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=s.temperature > 0,
                    temperature=s.temperature if s.temperature > 0 else None,
                    top_p=s.top_p if s.temperature > 0 else None,
                    max_new_tokens=s.max_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            seq = res.sequences[0, ids.shape[1] :].tolist()
            kept = seq[: seq.index(eos)] if eos in seq else seq
            if not kept:
                out.append(Completion([], []))
                continue
            logp = torch.log_softmax(torch.stack(res.logits[: len(kept)])[:, 0, :].float(), dim=-1)
            best = logp.topk(min(TOP_LOGPROBS, logp.shape[-1]), dim=-1)
            names = tok.batch_decode([[i] for i in best.indices.flatten().tolist()] + [[i] for i in kept])
            width = best.indices.shape[1]
            tops = []
            for k, token in enumerate(kept):
                top: dict[str, float] = {}
                for name, lp in zip(names[k * width : (k + 1) * width], best.values[k].tolist()):
                    _merge(top, name, math.exp(lp))
                sampled = names[len(kept) * width + k]
                if token not in best.indices[k].tolist():  # a sampled token outside the top: its own probability
                    _merge(top, sampled, math.exp(logp[k, token].item()))
                tops.append(top)
            out.append(Completion(names[len(kept) * width :], tops))
        return out


class _VllmEngine(_Engine):
    """The vllm generator asking for each token's top logprobs (vLLM's are the model's raw distribution)."""

    def __init__(self, model: str, cfg, answer: str):
        from builders.backends.vllm import VllmGenerator

        self.gen, self.answer = VllmGenerator(model, None, None, cfg), answer

    def prepare(self, prompts, sampling):
        return _prefilled(self.gen, prompts, sampling, self.answer)

    def complete(self, requests, s: SamplingConfig) -> list[Completion | None]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                seed=r.seed,
                logprobs=TOP_LOGPROBS,
            )
            for r in requests
        ]
        outputs = self.gen.llm.generate([{"prompt_token_ids": r.token_ids} for r in requests], params, use_tqdm=False)
        tok = self.gen.tokenizer
        out: list[Completion | None] = []
        for o in outputs:
            sample = o.outputs[0]
            ids = list(sample.token_ids)
            if ids and ids[-1] == tok.eos_token_id:
                ids = ids[:-1]
            pieces, tops = [], []
            for k, token in enumerate(ids):
                entry = (sample.logprobs or [])[k] if sample.logprobs and k < len(sample.logprobs) else {}
                top: dict[str, float] = {}
                for tid, lp in entry.items():
                    name = lp.decoded_token if lp.decoded_token is not None else tok.decode([tid])
                    _merge(top, name, math.exp(lp.logprob))
                pieces.append(
                    entry[token].decoded_token
                    if token in entry and entry[token].decoded_token is not None
                    else tok.decode([token])
                )
                tops.append(top)
            out.append(Completion(pieces, tops))
        return out


class _OpenAIEngine(_Engine):
    """The openai generator asking for `logprobs` and `top_logprobs` in each chat completion. A template's begun
    answer is sent as a final assistant message that the server continues (vLLM's `continue_final_message`)."""

    def __init__(self, model: str, cfg, answer: str):
        from builders.backends.openai import OpenAIGenerator

        class JudgeClient(OpenAIGenerator):
            def _body(self, req, s):
                body = {**super()._body(req, s), "logprobs": True, "top_logprobs": TOP_LOGPROBS}
                if answer:
                    body["messages"] = [*body["messages"], {"role": "assistant", "content": answer}]
                    body.update(continue_final_message=True, add_generation_prompt=False)
                return body

        self.gen = JudgeClient(model, None, None, cfg)

    def prepare(self, prompts, sampling):
        return self.gen.prepare(prompts, sampling)

    def complete(self, requests, s: SamplingConfig) -> list[Completion | None]:
        out: list[Completion | None] = []
        for samples in self.gen.generate(requests, s):
            if not samples:  # the server refused the prompt as too long
                out.append(None)
                continue
            content = (samples[0].logprobs or {}).get("content") if isinstance(samples[0].logprobs, dict) else None
            if not isinstance(content, list):
                raise IterdpoError(
                    f"the server at {self.gen.cfg.base_url} returned no logprobs: the judge needs a server that "
                    f"answers `logprobs`/`top_logprobs` in chat completions (vLLM serve, OpenAI, TGI do)"
                )
            pieces, tops = [], []
            for entry in content:
                top: dict[str, float] = {}
                for alt in entry.get("top_logprobs") or []:
                    _merge(top, alt["token"], math.exp(alt["logprob"]))
                if entry["token"] not in top:
                    _merge(top, entry["token"], math.exp(entry["logprob"]))
                pieces.append(entry["token"])
                tops.append(top)
            out.append(Completion(pieces, tops))
        return out


def make_engine(cfg: RankConfig, answer: str = ""):
    if cfg.judge_backend == "transformers":
        return _TransformersEngine(cfg.ranker_model, answer)
    if cfg.judge_backend == "vllm":
        return _VllmEngine(cfg.ranker_model, cfg.judge_vllm, answer)
    if cfg.judge_backend == "openai":
        return _OpenAIEngine(cfg.ranker_model, cfg.judge_openai, answer)
    raise InputError(f"unknown judge backend {cfg.judge_backend!r}; use one of {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------------------------------ the ranker
def judge_sampling(cfg: RankConfig) -> SamplingConfig:
    return SamplingConfig(
        num_responses=1,
        temperature=cfg.judge_temperature,
        top_p=1.0,
        max_tokens=cfg.judge_max_tokens,
        seed=cfg.judge_seed,
    )


def validate_judge(cfg: RankConfig) -> JudgeTemplate:
    """Every judge option, before any model loads."""
    if cfg.judge_backend not in BACKENDS:
        raise InputError(
            f"unknown judge backend {cfg.judge_backend!r}; use one of {', '.join(BACKENDS)}", option="judge_backend"
        )
    template = load_template(cfg.judge_template, cfg.judge_mode)
    if isinstance(cfg.judge_retries, bool) or not isinstance(cfg.judge_retries, int) or cfg.judge_retries < 0:
        raise InputError(f"judge_retries must be 0 or more, not {cfg.judge_retries}", option="judge_retries")
    t = cfg.judge_temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise InputError(f"judge_temperature must be a number, 0 or more, not {t}", option="judge_temperature")
    if isinstance(cfg.judge_max_tokens, bool) or not isinstance(cfg.judge_max_tokens, int) or cfg.judge_max_tokens < 1:
        raise InputError(f"judge_max_tokens must be at least 1, not {cfg.judge_max_tokens}", option="judge_max_tokens")
    if cfg.judge_backend == "openai":
        from builders.backends.openai import validate_openai

        validate_openai(cfg.judge_openai)
    return template


def judge_identity(cfg: RankConfig) -> dict[str, Any]:
    """What decides a judge's scores (the work key and the snapshot's params): the judge model, the template's
    content and mode, the sampling, the retries. Not the template's path, nor the batch options."""
    from builders.models import model_identity, served_identity

    template = validate_judge(cfg)
    ident = (served_identity if cfg.judge_backend == "openai" else model_identity)(cfg.ranker_model)
    return {
        "ranker_model": ident.pop("model"),
        **{f"ranker_{k}": v for k, v in ident.items()},
        "judge": {
            "backend": cfg.judge_backend,
            "mode": template.mode,
            "scale": list(template.scale) if template.scale else None,
            "template": template.name if (TEMPLATES / f"{template.name}.jinja").is_file() else "file",
            "template_text": template.text,
            "template_sha256": template.sha256,
            "answer": template.answer,
            "temperature": cfg.judge_temperature,
            "max_tokens": cfg.judge_max_tokens,
            "seed": cfg.judge_seed,
            "retries": cfg.judge_retries,
            "top_logprobs": TOP_LOGPROBS,
        },
    }


def judge_key(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity less what names but does not decide (the shipped template's name: its text is there)."""
    judge = {k: v for k, v in identity["judge"].items() if k not in ("template", "template_text")}
    return {**identity, "judge": judge}


@dataclass
class Judged:
    """One prompt's judgement: a score (or None: unscored) per response, and what it took."""

    prompt_id: str
    scores: list[float | None]
    info: dict[str, Any] = field(default_factory=dict)


class Judge:
    """The judge as a ranker (`Ranker` protocol; `score` gives None for an unscored response)."""

    def __init__(self, cfg: RankConfig):
        self.cfg = cfg
        self.template = validate_judge(cfg)
        self.sampling = judge_sampling(cfg)
        self.engine = make_engine(cfg, self.template.answer)

    def judge(self, items: Sequence[tuple[str, str, list[tuple[int, str]]]]) -> list[Judged]:
        """Every judgement of these (prompt_id, prompt, [(response_index, response)]) items, batched, with retries."""
        t, pointwise = self.template, self.template.mode == "pointwise"
        asks: dict[tuple, str] = {}  # (prompt_id, index[, index]) -> the judge's prompt
        for pid, prompt, cands in items:
            if not isinstance(prompt, str):  # a conversation: its turns as lines, as PairRM's source reads them
                prompt = "\n".join(render_lines(prompt))
            if pointwise:
                for idx, text in cands:
                    asks[(pid, idx)] = t.render(prompt=prompt, response=text)
            else:
                for ia, a in cands:
                    for ib, b in cands:
                        if ia != ib:
                            asks[(pid, ia, ib)] = t.render(prompt=prompt, response_a=a, response_b=b)
        values: dict[tuple, float] = {}
        failed: dict[tuple, str] = {}
        retried: dict[str, int] = {}
        todo = list(asks)
        attempts = 1 + (self.cfg.judge_retries if self.sampling.temperature > 0 else 0)
        for attempt in range(attempts):
            if not todo:
                break
            if attempt:
                for key in todo:
                    retried[key[0]] = retried.get(key[0], 0) + 1
            keys = [json.dumps(list(k)) for k in todo]
            prepared = self.engine.prepare(
                [(k, asks[key], judgement_seed(self.cfg.judge_seed, *key, attempt)) for k, key in zip(keys, todo)],
                self.sampling,
            )
            ready = [(key, req) for key, req in zip(todo, prepared) if not isinstance(req, str)]
            for key, req in zip(todo, prepared):
                if isinstance(req, str):
                    failed[key] = "too_long"
            done = self.engine.complete([req for _, req in ready], self.sampling) if ready else []
            todo = []
            for (key, _), completion in zip(ready, done):
                got = (
                    "too_long"
                    if completion is None
                    else parse_verdict(t, [t.answer, *completion.pieces], [{}, *completion.top])
                )
                if isinstance(got, str):
                    failed[key] = got
                    if got != "too_long":
                        todo.append(key)
                else:
                    values[key] = got
                    failed.pop(key, None)
        out = []
        for pid, _, cands in items:
            if pointwise:
                scores = [values.get((pid, idx)) for idx, _ in cands]
            else:
                pos = {idx: n for n, (idx, _) in enumerate(cands)}
                pref = {(pos[k[1]], pos[k[2]]): v for k, v in values.items() if k[0] == pid}
                scores = pairwise_scores(len(cands), pref)
            reasons: dict[str, int] = {}
            for key, why in failed.items():
                if key[0] == pid:
                    reasons[why] = reasons.get(why, 0) + 1
            info = {
                "judgements": sum(1 for k in asks if k[0] == pid),
                "retried": retried.get(pid, 0),
                "failed": reasons,
                "unscored": sum(s is None for s in scores),
            }
            out.append(Judged(pid, scores, info))
        return out

    def score(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[list[float | None]]:
        items = [(str(i), p, list(enumerate(c))) for i, (p, c) in enumerate(zip(prompts, candidates))]
        return [j.scores for j in self.judge(items)]

    def describe(self) -> dict[str, Any]:
        return {"ranker": "judge", "judge_engine": self.engine.describe()}

    def close(self) -> None:
        self.engine.close()


def produce(
    batch_prompts: int, judge: Judge, items: Sequence[tuple[str, str, list[tuple[int, str]]]]
) -> Iterator[Finished]:
    """The rank stage's work for the judge: scores rows (null: unscored) and, per prompt, what the judging took."""
    schema = KINDS["scores"].schema
    for chunk in chunks(items, batch_prompts):
        rows: dict[str, list] = {"prompt_id": [], "response_index": [], "score": []}
        units = {}
        for (pid, _, cands), judged in zip(chunk, judge.judge(chunk)):
            for (idx, _), value in zip(cands, judged.scores):
                rows["prompt_id"].append(pid)
                rows["response_index"].append(idx)
                rows["score"].append(value)
            units[pid] = judged.info
        yield Finished(units, pa.table(rows, schema=schema))


def judge_counts(units: dict[str, Any], prompts: Sequence[str]) -> dict[str, Any]:
    """The split's totals of what the judging took (the snapshot's `judge_counts`)."""
    out: dict[str, Any] = {"judgements": 0, "retried": 0, "unscored_responses": 0, "failed": dict.fromkeys(FAILURES, 0)}
    for pid in prompts:
        info = units.get(pid) or {}
        out["judgements"] += info.get("judgements", 0)
        out["retried"] += info.get("retried", 0)
        out["unscored_responses"] += info.get("unscored", 0)
        for why, n in (info.get("failed") or {}).items():
            out["failed"][why] = out["failed"].get(why, 0) + n
    return out
