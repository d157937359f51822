"""Inference-time PairRM best-of-N and AlpacaEval-style evaluation.

    best_of_n(BestOfNConfig(prompts=Path("alpaca_eval.json"), output=Path("model_outputs.json"),
                            generation=GenerateConfig(model="my/model")), progress=False)

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from builders.config import RankConfig
    >>> from builders.evaluate import evaluate
    >>> work = Path(tempfile.mkdtemp())
    >>> def write(name, generator, outputs):
    ...     rows = [{"instruction": i, "output": o, "generator": generator} for i, o in outputs]
    ...     (work / name).write_text(json.dumps(rows))
    >>> write("outputs.json", "mine", [("Name a colour.", "Blue is a colour."), ("Say hi.", "Hi")])
    >>> write("reference.json", "ref", [("Name a colour.", "Blue"), ("Say hi.", "Hello there.")])
    >>> evaluate(work / "outputs.json")["length"]  # no reference: length statistics only, no model
    {'mine': {'n': 2, 'avg_length': 9.5, 'median_length': 9.5}}
    >>> ranker = RankConfig(ranker="python", ranker_model="builders.rewards:complete_concise_answer")
    >>> report = evaluate(work / "outputs.json", reference=work / "reference.json", ranker=ranker)
    >>> report["compared"], report["win_rate"], report["standard_error"]
    (2, 50.0, 50.0)

best-of-N reuses the generation and ranking backends (the same seeds, chat template and PairRM), keeps the
best-scored response per prompt and writes AlpacaEval's model_outputs.json: one row per input row with only scalar
fields (instruction and dataset exactly as the input has them, output, generator), since AlpacaEval joins on the
exact instruction and deduplicates rows with pandas. Every candidate and its score go to a sidecar file beside it,
`<stem>.candidates.jsonl`.

eval reports AlpacaEval's avg_length (mean output length in characters) per generator; with a reference it also
reports the ranker's win rate against it, with a standard error, and a length-controlled win rate with its
standard error. The LC method follows AlpacaEval's `length_controlled_minimal` GLM (Dubois et al. 2024) on the
ranker's preferences (soft: win 1, tie 0.5, loss 0):
    P(output beats reference) = sigmoid(a + b * tanh((len_output - len_reference) / sd))
sd being the sample standard deviation of the length differences, and reports sigmoid(a), the predicted win rate
at equal lengths. Where AlpacaEval picks an L1 penalty on a and b by 5-fold cross-validation (which, at a few
dozen prompts, often zeroes both and reports 50), the length weight b here has a Gaussian prior N(0, 1.5^2)
(LengthControlConfig) and a is free: the fit is a maximum a posteriori by Newton's method. With few prompts the
length weight shrinks toward 0 and the LC rate toward the raw win rate; from a few hundred prompts on the prior
hardly matters and the figure is AlpacaEval's (within 0.2 points at 805 prompts on synthetic preferences: see
tests/test_length_control.py and bench/length_control.py). Its standard error is a bootstrap over prompts (1000
resamples with a fixed seed, the same fit on each, sd fixed), so it is reproducible and covers both the preference
noise and the length fit. (AlpacaEval's own `lc_standard_error` is the spread of the per-prompt predictions, which
for this formula is always 0.)
(AlpacaEval's GLM also has an instruction-difficulty term, fitted across many models; with one model and one
reference it is omitted.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builders.config import BestOfNConfig, LengthControlConfig, RankConfig, validate_best_of_n
from builders.errors import InputError, IterdpoError, one_line


def candidates_path(output: Path) -> Path:
    """The sidecar beside model_outputs.json: every candidate and its score (not .json: nothing globbing *.json for
    model outputs should pick it up)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.candidates.jsonl")


def _check_writable(path: Path, what: str) -> None:
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path}: no such folder {parent}", option="output")
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder", option="output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: cannot write in {parent}", option="output")


def _write_files(contents: dict[Path, str]) -> None:
    """Whole or not at all: every file goes to a temporary file beside its target first; only when all are written
    are they renamed (the last one, model_outputs.json, is what a reader looks for)."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, text in contents.items():
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
            temps.append((tmp, Path(path)))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)  # nothing half-written is left beside the targets
        raise


def _check_options(cfg: BestOfNConfig) -> None:
    """Every option, before any model is loaded (a bad one must not cost a generation run)."""
    from builders.generate import validate_generate
    from builders.rank import validate_rank

    # the stages' own checks: sampling, backend and its options, ranker, dtype, device, batch sizes
    validate_generate(cfg.generation)
    validate_rank(cfg.ranker)
    validate_best_of_n(cfg)
    _check_writable(cfg.output, "output")
    _check_writable(candidates_path(cfg.output), "output's sidecar")


def _read_rows(cfg: BestOfNConfig) -> tuple[list[str | None], list[str | None]]:
    """The prompt column exactly as the file has it, and each row's `dataset` (AlpacaEval's column; else the
    row's `source`, UltraFeedback's name for it; else None)."""
    from builders.prompts import read_source

    cols = read_source(str(cfg.prompts), cfg.column)
    datasets: list[str | None] = [None] * len(cols.prompts)
    if "dataset" in cols.names:
        try:
            datasets = read_source(str(cfg.prompts), "dataset").prompts
        except InputError:
            raise InputError(f"{cfg.prompts}: the `dataset` column must be text") from None
    sources = cols.sources or [None] * len(cols.prompts)
    return cols.prompts, [d if d is not None else s for d, s in zip(datasets, sources)]


def best_of_n(cfg: BestOfNConfig, progress: bool = True) -> dict[str, Any]:
    """`progress`: a bar on stderr for the generation and one for the ranking (prompts, prompts/s, tokens/s), as
    generate and rank show."""
    _check_options(cfg)
    with contextlib.ExitStack() as stack:
        ray = [c.scale_out for c in (cfg.generation, cfg.ranker) if c.scale_out.executor == "ray"]
        if ray:  # one Ray session for the generation replicas, then the ranking ones
            from builders.backends.ray import session

            stack.enter_context(session(ray[0]))
        return _best_of_n(cfg, progress)


def _answered(finished) -> dict[str, list[str]]:
    """The generate producer's Finished rows as each prompt's responses, in response order (skipped prompts: none)."""
    out: dict[str, list[str]] = {}
    for item in finished:
        for pid, text in zip(item.rows.column("prompt_id").to_pylist(), item.rows.column("response").to_pylist()):
            out.setdefault(pid, []).append(text)
    return out


def _best_of_n(cfg: BestOfNConfig, progress: bool) -> dict[str, Any]:
    from builders.config import ExecutorConfig
    from builders.generate import producer
    from builders.models import model_identity
    from builders.prompts import prompt_id
    from builders.rank import check_finite, make_ranker, score_all
    from builders.stage import counted, progress_bar

    gen = cfg.generation
    instructions, datasets = _read_rows(cfg)
    # generation sees the stripped prompt (as the catalog stores it); the rows keep the instruction verbatim
    keep = [i for i, p in enumerate(instructions) if isinstance(p, str) and p.strip()]
    if not keep:
        raise InputError(f"{cfg.prompts}: no prompts")
    # the models exist (a folder, or a hub id in the cache or on the Hub) before the long part starts
    if gen.backend != "openai":
        model_identity(gen.model)
    ranker = None
    if cfg.ranker.ranker == "python":  # imports module:function now (on Ray the replicas import it again)
        local = make_ranker(dataclasses.replace(cfg.ranker, scale_out=ExecutorConfig()))
        ranker = local if cfg.ranker.scale_out.executor == "local" else None
    else:
        model_identity(cfg.ranker.ranker_model)

    prompts = list(dict.fromkeys(instructions[i].strip() for i in keep))  # each distinct prompt once
    generation = producer(gen)  # the generate stage's producer: same seeds, chat template, batching, executor
    generator = generation.build()
    try:
        with progress_bar(len(prompts), f"best-of-{gen.sampling.num_responses} generate", progress) as bar:
            answered = _answered(counted(generation.run(generator, [(prompt_id(p), p) for p in prompts]), bar))
    finally:
        generator.close()
    ranked = [(p, answered[prompt_id(p)]) for p in prompts if answered.get(prompt_id(p))]
    scores = (
        score_all(cfg.ranker, [p for p, _ in ranked], [c for _, c in ranked], ranker, progress, "best-of-n rank")
        if ranked
        else []
    )
    by_prompt: dict[str, tuple[list[str], list[float], int]] = {}
    for (p, cands), values in zip(ranked, scores):
        scored = [i for i, v in enumerate(values) if v is not None]  # a judge leaves what it cannot score as None
        if not scored:
            raise IterdpoError(f"the judge scored none of the {len(cands)} responses of prompt {prompt_id(p)}")
        check_finite(prompt_id(p), [values[i] for i in scored])
        best = max(scored, key=lambda i: (values[i], -i))
        by_prompt[p] = (cands, [float(v) if v is not None else None for v in values], best)

    name = cfg.generator_name or f"{Path(gen.model).name}-{cfg.ranker.ranker}-best-of-{gen.sampling.num_responses}"
    default_dataset = Path(str(cfg.prompts)).stem  # rows that name no dataset: the prompt file's name
    rows, sidecar = [], []
    for i in keep:
        instruction, prompt = instructions[i], instructions[i].strip()
        cands, values, best = by_prompt.get(prompt, ([], [], None))
        dataset = datasets[i] if datasets[i] is not None else default_dataset
        output = cands[best] if best is not None else ""
        rows.append({"instruction": instruction, "output": output, "generator": name, "dataset": dataset})
        sidecar.append(
            {
                "instruction": instruction,
                "prompt_id": prompt_id(prompt),
                "dataset": dataset,
                "generator": name,
                "selected_index": best,
                "selection_score": values[best] if best is not None else None,
                "candidates": cands,
                "candidate_scores": values,
                "skipped": None if best is not None else "too_long",
            }
        )
    side = candidates_path(cfg.output)
    _write_files(
        {
            side: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sidecar),
            Path(cfg.output): json.dumps(rows, indent=2, ensure_ascii=False),
        }
    )
    return {
        "output": str(cfg.output),
        "candidates": str(side),
        "generator": name,
        "prompts": len(rows),
        "skipped_empty": len(instructions) - len(keep),
        "skipped_too_long": sum(1 for r in sidecar if r["skipped"]),
    }


# ------------------------------------------------------------------------------------------------------------ eval
def _load_outputs(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({one_line(str(e))})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected AlpacaEval's format, a JSON list of {{instruction, output, generator}}")
    for i, row in enumerate(data):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("instruction"), str)
            or not isinstance(row.get("output"), str)
        ):
            raise InputError(f"{path}: record {i} lacks a text instruction and output")
    return data


def length_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by: dict[str, list[int]] = {}
    for row in rows:
        by.setdefault(str(row.get("generator", "unknown")), []).append(len(row["output"]))
    return {
        g: {"n": len(v), "avg_length": statistics.fmean(v), "median_length": float(statistics.median(v))}
        for g, v in by.items()
    }


@dataclass(frozen=True)
class LengthControlled:
    win_rate: float  # in [0, 1]: the predicted win rate at equal lengths
    standard_error: float  # bootstrap over prompts
    length_weight: float  # b: > 0 when the judge prefers the longer answer


def _fit(y, x, weights, prior_precision: float):
    """MAP of sigmoid(a + b x) on soft labels y, one fit per row of `weights` (prompt counts): Newton's method on
    the concave log-posterior (flat prior on a, N(0, 1/prior_precision) on b). Returns (rate, b) arrays."""
    import numpy as np

    tot = weights.sum(axis=1)
    mean = (weights @ y) / tot
    # all wins or all losses: nothing to weigh against the length, the rate is the raw one (a is infinite)
    flat = (mean <= 0) | (mean >= 1)
    m = np.clip(mean, 1e-6, 1 - 1e-6)
    a, b = np.log(m / (1 - m)), np.zeros(len(mean))
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(a[:, None] + b[:, None] * x, -50, 50)))
        r, v = weights * (y - p), weights * p * (1 - p)
        ga, gb = r.sum(axis=1), r @ x - prior_precision * b
        haa, hab, hbb = v.sum(axis=1) + 1e-12, v @ x, v @ (x * x) + prior_precision + 1e-12
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        da[flat], db[flat] = 0.0, 0.0
        step = np.maximum(np.abs(da), np.abs(db))
        shrink = np.minimum(1.0, 5.0 / np.maximum(step, 1e-300))  # damped: never more than 5 in one step
        a, b = a + shrink * da, b + shrink * db
        if step.max() < 1e-10:
            break
    rate = np.where(flat, mean, 1 / (1 + np.exp(-np.clip(a, -50, 50))))
    return rate, np.where(flat, 0.0, b)


def length_controlled(
    prefs: list[float], length_diffs: list[float], cfg: LengthControlConfig = LengthControlConfig()
) -> LengthControlled:
    """The length-controlled win rate of soft preferences (1 win, 0.5 tie, 0 loss) given each pair's length
    difference (output minus reference, characters), its bootstrap standard error and the length weight."""
    import numpy as np

    y = np.asarray(prefs, dtype=float)
    d = np.asarray(length_diffs, dtype=float)
    n = len(y)
    if n == 0 or len(d) != n:
        raise InputError("length control needs one length difference per preference, and at least one")
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    x = np.tanh(d / sd) if sd > 0 else np.zeros(n)
    precision = 1.0 / cfg.length_prior_sd**2
    rate, b = _fit(y, x, np.ones((1, n)), precision)
    rng = np.random.default_rng(cfg.seed)
    boot = []
    chunk = max(1, min(cfg.bootstrap, 2_000_000 // n))  # bounded memory: chunk x n floats per array
    for start in range(0, cfg.bootstrap, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, cfg.bootstrap - start)).astype(float)
        boot.append(_fit(y, x, counts, precision)[0])
    se = float(np.concatenate(boot).std(ddof=1)) if cfg.bootstrap > 1 else 0.0
    return LengthControlled(float(rate[0]), se, float(b[0]))


def evaluate(outputs: Path, reference: Path | None = None, ranker: RankConfig | None = None) -> dict[str, Any]:
    rows = _load_outputs(outputs)
    report: dict[str, Any] = {"outputs": str(outputs), "length": length_stats(rows)}
    if reference is None:
        return report
    from builders.rank import make_ranker

    refs = {}
    for row in _load_outputs(reference):
        refs.setdefault(row["instruction"].strip(), row["output"])
    pairs = [
        (r["instruction"], r["output"], refs[r["instruction"].strip()])
        for r in rows
        if r["instruction"].strip() in refs
    ]
    if not pairs:
        raise InputError(f"no instruction of {outputs} is in the reference {reference}")
    scorer = make_ranker(ranker or RankConfig())
    try:
        scores = scorer.score([p for p, _, _ in pairs], [[o, r] for _, o, r in pairs])
        described = scorer.describe()
    finally:
        scorer.close()  # a judge's engine (an openai client's loop thread, a model) goes with it
    # a judge leaves a response it could not score with None: that comparison is counted apart, never a tie or loss
    unscored = sum(None in s for s in scores)
    pairs = [pair for pair, s in zip(pairs, scores) if None not in s]
    scores = [s for s in scores if None not in s]
    if not pairs:
        raise InputError(
            f"the ranker could not score any of the {unscored} comparisons (an LLM judge's unscored answers)"
        )
    prefs = [1.0 if s[0] > s[1] else 0.5 if s[0] == s[1] else 0.0 for s in scores]
    n = len(prefs)
    win = statistics.fmean(prefs)
    se = (statistics.stdev(prefs) / math.sqrt(n)) if n > 1 else 0.0
    lc = length_controlled(prefs, [len(o) - len(r) for _, o, r in pairs])
    report.update(
        {
            "reference": str(reference),
            "ranker": described,
            "compared": n,
            "unmatched": len(rows) - n - unscored,
            "unscored": unscored,
            "win_rate": 100 * win,
            "standard_error": 100 * se,
            "length_controlled_win_rate": 100 * lc.win_rate,
            "length_controlled_standard_error": 100 * lc.standard_error,
            "length_weight": lc.length_weight,
            "reference_avg_length": statistics.fmean(len(r) for _, _, r in pairs),
        }
    )
    return report
