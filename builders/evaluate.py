"""Inference-time PairRM best-of-N and AlpacaEval-style evaluation.

    best_of_n(BestOfNConfig(model=..., prompts=Path("alpaca_eval.json"), output=Path("model_outputs.json")))
    evaluate(Path("model_outputs.json"), reference=Path("gpt4_turbo.json"), ranker=RankConfig(iteration=0))

best-of-N reuses the generation and ranking backends (the same seeds, chat template and PairRM), keeps the
best-scored response per prompt and writes AlpacaEval's model_outputs.json (instruction, output, generator,
dataset) plus the selection scores.

eval reports AlpacaEval's avg_length (mean output length in characters) per generator; with a reference it also
reports the ranker's win rate against it, with a standard error, and a length-controlled win rate. The LC method
applies the idea of Dubois et al. (2024) to the ranker's preferences: fit a logistic regression
    P(output beats reference) = sigmoid(a + b * tanh((len_output - len_reference) / sd))
on the (soft: win 1, tie 0.5, loss 0) preferences, sd being the standard deviation of the length differences, and
report sigmoid(a) — the predicted win rate when both answers have the same length. (AlpacaEval's GLM also has an
instruction-difficulty term, fitted across many models; with one model and one reference it is omitted.)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from builders.config import RankConfig, SamplingConfig
from builders.errors import InputError


@dataclass(frozen=True)
class BestOfNConfig:
    model: str
    prompts: Path
    output: Path
    num_responses: int = 16
    backend: str = "transformers"
    sampling: SamplingConfig = SamplingConfig(num_responses=16)
    ranker: RankConfig = RankConfig(iteration=0)
    column: str | None = None
    generator_name: str | None = None  # default: the model folder's name + "-pairrm-best-of-N"


def _write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a temporary file beside the target, renamed."""
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"{path.parent}: no such folder")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # nothing half-written is left beside the target
        raise


def best_of_n(cfg: BestOfNConfig) -> dict[str, Any]:
    from builders.config import GenerateConfig
    from builders.generate import make_generator, prompt_seed, validate_sampling
    from builders.prompts import prompt_id, read_source
    from builders.rank import check_finite, make_ranker

    sampling = replace(cfg.sampling, num_responses=cfg.num_responses)
    validate_sampling(sampling)
    cols = read_source(str(cfg.prompts), cfg.column)
    prompts = [p.strip() for p in cols.prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise InputError(f"{cfg.prompts}: no prompts")
    generator = make_generator(GenerateConfig(iteration=0, model=cfg.model, backend=cfg.backend, sampling=sampling))
    try:
        prepared = generator.prepare([(prompt_id(p), p, prompt_seed(sampling.seed, prompt_id(p), cfg.num_responses))
                                      for p in prompts])
        requests = [r for r in prepared if not isinstance(r, str)]
        answered = dict(zip((r.prompt_id for r in requests), generator.generate(requests)))
    finally:
        generator.close()
    ranked = [(p, [s.text for s in answered[prompt_id(p)]]) for p in prompts if answered.get(prompt_id(p))]
    scores = make_ranker(cfg.ranker).score([p for p, _ in ranked], [c for _, c in ranked]) if ranked else []
    by_prompt = {}
    for (p, cands), values in zip(ranked, scores):
        check_finite(prompt_id(p), values)
        best = max(range(len(cands)), key=lambda i: (values[i], -i))
        by_prompt[p] = (cands[best], values[best], values)
    name = cfg.generator_name or f"{Path(cfg.model).name}-{cfg.ranker.ranker}-best-of-{cfg.num_responses}"
    rows = []
    for p in prompts:
        output, score, values = by_prompt.get(p, ("", None, []))
        rows.append({"instruction": p, "output": output, "generator": name, "dataset": "iterdpo",
                     "selection_score": score, "candidate_scores": values, **({"skipped": "too_long"} if score is None
                                                                               else {})})
    _write_json(cfg.output, rows)
    return {"output": str(cfg.output), "generator": name, "prompts": len(rows),
            "skipped_too_long": sum(1 for r in rows if r["selection_score"] is None)}


# ------------------------------------------------------------------------------------------------------------ eval
def _load_outputs(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected AlpacaEval's format, a JSON list of {{instruction, output, generator}}")
    for i, row in enumerate(data):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or \
                not isinstance(row.get("output"), str):
            raise InputError(f"{path}: record {i} lacks a text instruction and output")
    return data


def length_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by: dict[str, list[int]] = {}
    for row in rows:
        by.setdefault(str(row.get("generator", "unknown")), []).append(len(row["output"]))
    return {g: {"n": len(v), "avg_length": statistics.fmean(v), "median_length": float(statistics.median(v))}
            for g, v in by.items()}


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def length_controlled(prefs: list[float], length_diffs: list[float]) -> float:
    """sigmoid(a) of the logistic fit P(win) = sigmoid(a + b * tanh(diff / sd)), by Newton's method (soft labels,
    a tiny ridge so that a perfectly length-explained preference still gives a finite answer)."""
    sd = statistics.pstdev(length_diffs) or 1.0
    xs = [math.tanh(d / sd) for d in length_diffs]
    a = b = 0.0
    ridge = 1e-3
    for _ in range(100):
        ps = [_sigmoid(a + b * x) for x in xs]
        ga = sum(y - p for y, p in zip(prefs, ps)) - ridge * a
        gb = sum((y - p) * x for y, p, x in zip(prefs, ps, xs)) - ridge * b
        w = [p * (1 - p) for p in ps]
        haa = sum(w) + ridge
        hab = sum(wi * x for wi, x in zip(w, xs))
        hbb = sum(wi * x * x for wi, x in zip(w, xs)) + ridge
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if abs(da) + abs(db) < 1e-10:
            break
    return _sigmoid(a)


def evaluate(outputs: Path, reference: Path | None = None, ranker: RankConfig | None = None) -> dict[str, Any]:
    rows = _load_outputs(outputs)
    report: dict[str, Any] = {"outputs": str(outputs), "length": length_stats(rows)}
    if reference is None:
        return report
    from builders.rank import make_ranker

    refs = {}
    for row in _load_outputs(reference):
        refs.setdefault(row["instruction"].strip(), row["output"])
    pairs = [(r["instruction"], r["output"], refs[r["instruction"].strip()]) for r in rows
             if r["instruction"].strip() in refs]
    if not pairs:
        raise InputError(f"no instruction of {outputs} is in the reference {reference}")
    scorer = make_ranker(ranker or RankConfig(iteration=0))
    scores = scorer.score([p for p, _, _ in pairs], [[o, r] for _, o, r in pairs])
    prefs = [1.0 if s[0] > s[1] else 0.5 if s[0] == s[1] else 0.0 for s in scores]
    n = len(prefs)
    win = statistics.fmean(prefs)
    se = (statistics.stdev(prefs) / math.sqrt(n)) if n > 1 else 0.0
    lc = length_controlled(prefs, [len(o) - len(r) for _, o, r in pairs])
    report.update({
        "reference": str(reference), "ranker": scorer.describe(), "compared": n, "unmatched": len(rows) - n,
        "win_rate": 100 * win, "standard_error": 100 * se, "length_controlled_win_rate": 100 * lc,
        "reference_avg_length": statistics.fmean(len(r) for _, _, r in pairs),
    })
    return report
