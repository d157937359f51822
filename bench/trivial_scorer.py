"""A scorer that costs nothing, for bench/scale.py: `iterdpo rank --ranker python --ranker-model
bench.trivial_scorer:score` then measures only iterdpo's own cost. Longer responses score higher."""


def score(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]
