"""Python scorers for the `python` ranker tests (importable as tests.scorers:NAME)."""


def longer_is_better(prompts, responses):
    return [float(len(r)) for r in responses]


def nan_for_second(prompts, responses):
    return [float("nan") if i == 1 else 1.0 for i, _ in enumerate(responses)]


def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


def not_numbers(prompts, responses):
    return ["good"] * len(responses)
