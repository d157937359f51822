"""Transparent Python rewards for the `python` ranker: `iterdpo rank --ranker python --ranker-model MODULE:FUNCTION`.

The worked example of "bring your own reward model": a scorer is any function `(prompts, responses) -> scores`
over flat, equal-length lists of strings, returning one float per response (higher is better). It must be
deterministic: the scores are part of the dataset's identity.

`complete_concise_answer` is the quickstart's reward, written for a small instruct model (SmolLM2-135M) answering
with a budget of ~100 tokens. It rewards what a reader wants from such a model and what can be checked without
another model:
- the answer is finished (0.6): it ends like a sentence, a code block or a JSON object ends, not cut mid-sentence
  by the token budget;
- it has a sensible length (0.4): 10 to 60 words earns the full share, falling linearly to 0 at 0 words and at
  120 words (a one-word reply and a rambling one are both worse than a short answer);
- it does not repeat itself: the sum above is multiplied by the share of distinct word 3-grams, so an answer that
  loops (small models do) is worth little however it ends.
The total lies in [0, 1]; an empty answer scores 0. It is deliberately not "longer is better" (the classic reward
hack) and not "shorter is better": an answer must be finished and of useful length to score high.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The weights and band of complete_concise_answer (module constants: the scores are the dataset's identity,
# so changing one is a new reward; rename the function when you do).
FINISHED_WEIGHT, LENGTH_WEIGHT = 0.6, 0.4
BAND_WORDS = (10, 60)  # full length credit inside this band of words
ZERO_WORDS = 120  # no length credit from here on

# How a finished answer ends: sentence punctuation (optionally followed by closing quotes, brackets or bold/italic
# markers), a closed code block, or closed JSON/code brackets.
_FINISHED = re.compile(r"""([.!?…。]["'”’)\]*_]*|```|[)\]}])\s*$""")
_WORD = re.compile(r"\w+", re.UNICODE)


def finished(response: str) -> bool:
    """True when the text ends the way a complete answer ends (not cut off mid-sentence)."""
    return bool(_FINISHED.search(response.strip()))


def length_credit(words: int) -> float:
    low, high = BAND_WORDS
    if words < low:
        return words / low
    if words <= high:
        return 1.0
    return max(0.0, (ZERO_WORDS - words) / (ZERO_WORDS - high))


def variety(words: Sequence[str]) -> float:
    """Distinct word 3-grams / all word 3-grams (1.0 for texts too short to repeat one)."""
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def score_answer(response: str) -> float:
    words = [w.lower() for w in _WORD.findall(response)]
    if not words:
        return 0.0
    return variety(words) * (FINISHED_WEIGHT * finished(response) + LENGTH_WEIGHT * length_credit(len(words)))


def complete_concise_answer(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The quickstart's reward (see the module docstring). The prompt is not used: the reward judges the answer's
    form, which is what a 135M model most visibly gets wrong."""
    return [round(score_answer(r), 6) for r in responses]


def distinct_trigrams(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """A second axis, for `iterdpo combine`'s example: the share of distinct word 3-grams (1.0: the answer never
    repeats itself), whatever its length or ending."""
    return [round(variety([w.lower() for w in _WORD.findall(r)]), 6) for r in responses]
