"""Python scorers for the `python` ranker tests (importable as tests.scorers:NAME)."""


def longer_is_better(prompts, responses):
    return [float(len(r)) for r in responses]


def nan_for_second(prompts, responses):
    return [float("nan") if i == 1 else 1.0 for i, _ in enumerate(responses)]


def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


def not_numbers(prompts, responses):
    return ["good"] * len(responses)


def slow_longer_is_better(prompts, responses):
    """longer_is_better at a model's pace (0.2 s a call): a run long enough to be killed in the middle."""
    import time

    time.sleep(0.2)
    return longer_is_better(prompts, responses)


def records_prompts(prompts, responses):
    """longer_is_better that appends each prompt it receives (a string, or a conversation's message list) to the
    JSON-lines file $ITERDPO_TEST_SEEN: what a user's scorer sees."""
    import json
    import os

    with open(os.environ["ITERDPO_TEST_SEEN"], "a", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    return longer_is_better(prompts, responses)


def shorter_is_better(prompts, responses):
    return [-float(len(r)) for r in responses]
