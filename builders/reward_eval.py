"""`reward eval`: how often a scorer agrees with labelled pairs, before an iteration is spent on it.

Any ranker that `rank` runs scores both answers of each pair (built as `rank` builds them: builders.rank), or several
rankers combined (builders.combine: each pair is one prompt with two responses; `zscore` standardises each
component over every answer scored). Per pair: a win when the scorer scores the chosen answer higher, a loss when
lower, a tie when equal (counted apart, in no accuracy); a pair with an answer a judge could not score is
counted apart too (`unscored`). Reported: accuracy = wins / (wins + losses), its standard
error sqrt(a (1 - a) / n) over those n pairs, and the length bias: how often the scorer prefers the longer answer
(characters; pairs of equal lengths left out), beside how often the labels do.

    >>> import pyarrow as pa
    >>> from builders.config import RankConfig
    >>> from builders.preferences import preferences_table
    >>> pairs = preferences_table([{"prompt": "Why?", "chosen": "Because it rains.", "rejected": "No."},
    ...                            {"prompt": "How?", "chosen": "By hand, slowly.", "rejected": "Ok"}], "example")
    >>> report = evaluate_pairs(pairs, RankConfig(ranker="python", ranker_model="tests.scorers:longer_is_better"))
    >>> report["accuracy"], report["pairs"], report["prefers_longer"]
    (1.0, 2, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa

from builders.catalog import Catalog
from builders.config import RankConfig, RewardEvalConfig
from builders.errors import InputError, NotFound
from builders.preferences import answer_text, load_preferences, prompt_text, without_ties


def parse_spec(spec: str, base: RankConfig = RankConfig()) -> tuple[RankConfig, float]:
    """`KIND:MODEL=WEIGHT` (e.g. `scalar:models/my-reward=1`, `python:builders.rewards:complete_concise_answer=0.5`)
    -> (the ranker's config, its weight). MODEL may hold `:` (module:function); WEIGHT is after the last `=`, and
    defaults to 1 when there is none."""
    body, eq, weight_text = spec.rpartition("=")
    if not eq:
        body, weight_text = spec, "1"
    kind, colon, model = body.partition(":")
    if not colon or not kind or not model:
        raise InputError(
            f"ranker spec {spec!r} is not KIND:MODEL=WEIGHT (e.g. scalar:models/my-reward=1)", option="ranker_spec"
        )
    try:
        weight = float(weight_text)
    except ValueError:
        raise InputError(
            f"ranker spec {spec!r}: weight {weight_text!r} is not a number", option="ranker_spec"
        ) from None
    if not math.isfinite(weight):
        raise InputError(f"ranker spec {spec!r}: weight {weight_text!r} is not finite", option="ranker_spec")
    return replace(base, ranker=kind, ranker_model=model), weight


def _scores(
    cfg: RankConfig, prompts: list[str], candidates: list[list[str]], progress: bool, desc: str
) -> list[float | None]:
    """Each answer's score, in pair order; None where a judge could not score it (its pair is counted apart)."""
    from builders.rank import check_finite, score_all

    got = score_all(cfg, prompts, candidates, progress=progress, desc=desc)
    flat: list[float | None] = []
    for i, values in enumerate(got):
        if len(values) != 2:
            raise InputError(f"the {cfg.ranker} ranker returned {len(values)} scores for the 2 answers of pair {i + 1}")
        check_finite(str(i + 1), [v for v in values if v is not None])
        flat.extend(None if v is None else float(v) for v in values)
    return flat


def evaluate_pairs(
    table: pa.Table,
    ranker: RankConfig | None = None,
    components: Sequence[tuple[RankConfig, float]] = (),
    method: str = "zscore",
    progress: bool = False,
) -> dict[str, Any]:
    """Agreement of one ranker (or a weighted combination of `components`) with `preferences` rows (ties in the
    labels already dropped: builders.preferences.without_ties)."""
    from builders.rank import validate_rank

    if (ranker is None) == (not components):
        raise InputError("give one ranker or a combination of components", option="ranker")
    configs = [ranker] if ranker is not None else [c for c, _ in components]
    for cfg in configs:
        validate_rank(cfg)
    if components:
        from builders.combine import check_combination

        # every option of the combination, checked before any model is loaded
        check_combination(0, [[] for _ in components], [w for _, w in components], method)
    if table.num_rows == 0:
        raise InputError("no labelled pairs to evaluate on", option="data")
    prompts = [prompt_text(p) for p in table.column("prompt").to_pylist()]
    chosen = [answer_text(a) for a in table.column("chosen").to_pylist()]
    rejected = [answer_text(a) for a in table.column("rejected").to_pylist()]
    # scored shortest first: a model ranker's batches then hold texts of similar lengths (little padding); the
    # figures do not depend on the order
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]) + max(len(chosen[i]), len(rejected[i])), i))
    prompts, chosen, rejected = ([xs[i] for i in order] for xs in (prompts, chosen, rejected))
    candidates = [[c, r] for c, r in zip(chosen, rejected)]
    if ranker is not None:
        flat = _scores(ranker, prompts, candidates, progress, "reward eval")
        described: dict[str, Any] = {"ranker": ranker.ranker, "ranker_model": ranker.ranker_model}
    else:
        from builders.combine import combine_scores

        parts = [
            _scores(cfg, prompts, candidates, progress, f"reward eval {k + 1}/{len(components)}")
            for k, (cfg, _) in enumerate(components)
        ]
        # each pair is one prompt of two responses (`rank` ranks within a pair)
        pair_of = [str(i) for i in range(len(prompts)) for _ in range(2)]
        flat = combine_scores(pair_of, parts, [w for _, w in components], method=method)
        described = {
            "method": method,
            "components": [{"ranker": c.ranker, "ranker_model": c.ranker_model, "weight": w} for c, w in components],
        }
    return {**described, **agreement(flat[0::2], flat[1::2], chosen, rejected)}


def agreement(
    chosen_scores: Sequence[float | None],
    rejected_scores: Sequence[float | None],
    chosen: Sequence[str],
    rejected: Sequence[str],
) -> dict[str, Any]:
    """The figures of `evaluate_pairs` from each pair's two scores and texts. A pair with an answer the scorer
    could not score (a judge's None) is counted apart (`unscored`), never as a win, loss or tie."""
    pairs = len(chosen_scores)
    scored = [i for i in range(pairs) if chosen_scores[i] is not None and rejected_scores[i] is not None]
    chosen_scores, rejected_scores = [chosen_scores[i] for i in scored], [rejected_scores[i] for i in scored]
    chosen, rejected = [chosen[i] for i in scored], [rejected[i] for i in scored]
    wins = sum(c > r for c, r in zip(chosen_scores, rejected_scores))
    losses = sum(c < r for c, r in zip(chosen_scores, rejected_scores))
    ties = len(chosen_scores) - wins - losses
    n = wins + losses
    accuracy = wins / n if n else None
    se = math.sqrt(accuracy * (1 - accuracy) / n) if n else None
    longer = [
        (sc > sr) == (len(c) > len(r))
        for sc, sr, c, r in zip(chosen_scores, rejected_scores, chosen, rejected)
        if sc != sr and len(c) != len(r)
    ]
    label_longer = [len(c) > len(r) for c, r in zip(chosen, rejected) if len(c) != len(r)]
    return {
        "pairs": pairs,
        "unscored": pairs - len(scored),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "accuracy": accuracy,
        "standard_error": se,
        "prefers_longer": sum(longer) / len(longer) if longer else None,
        "labels_prefer_longer": sum(label_longer) / len(label_longer) if label_longer else None,
    }


def eval_reward(catalog: Catalog | None, cfg: RewardEvalConfig, progress: bool = False) -> dict[str, Any]:
    """`reward eval`: the agreement of `cfg`'s scorer with the labelled pairs of `cfg.data`. A reward snapshot as
    data: the pairs it held out when it was trained, scored by that model unless a ranker is given."""
    from builders.combine import check_combination

    if cfg.components:
        check_combination(0, [[] for _ in cfg.components], [w for _, w in cfg.components], cfg.method)
    reward = None
    if catalog is not None:
        try:
            snap = catalog.get(cfg.data)
        except (NotFound, InputError):
            snap = None
        reward = snap if snap is not None and snap.kind == "reward" else None
    ranker = cfg.ranker
    if reward is not None:
        from builders.preferences import heldout_of, model_path

        prefs, table = heldout_of(catalog, reward)
        label_ties = 0
        if ranker is None and not cfg.components:
            ranker = RankConfig(ranker="scalar", ranker_model=model_path(catalog, reward))
        source = {"data": cfg.data, "reward_snapshot": reward.id, "heldout_of": prefs.source}
    else:
        prefs = load_preferences(catalog, cfg.data)
        table, label_ties = without_ties(prefs.table)
        if table.num_rows == 0:
            raise InputError(
                f"preference data {cfg.data}: all {label_ties} pairs are ties (equal scores)", option="data"
            )
        source = {"data": cfg.data, "data_snapshots": prefs.snapshots}
        if ranker is None and not cfg.components:
            ranker = RankConfig()
    report = evaluate_pairs(table, None if cfg.components else ranker, cfg.components, cfg.method, progress)
    return {**source, "label_ties_dropped": label_ties, **report}
