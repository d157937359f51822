"""Combining scorers: the numbers of each method (checked against numpy or by hand, not the module's code)."""

from __future__ import annotations

import numpy as np
import pytest

from builders.combine import combine_scores
from builders.errors import InputError

PIDS = ["a", "a", "a", "b", "b"]
HELPFUL = [1.0, 4.0, 2.0, 10.0, 0.0]
STYLE = [0.5, 0.5, 3.0, -1.0, 2.0]


def test_zscore_is_the_weighted_sum_of_population_standardised_components():
    got = combine_scores(PIDS, [HELPFUL, STYLE], [2.0, 0.5])
    h, s = np.array(HELPFUL), np.array(STYLE)
    expected = 2.0 * (h - h.mean()) / h.std() + 0.5 * (s - s.mean()) / s.std()  # numpy's std is the population sd
    assert got == pytest.approx(expected.tolist(), abs=1e-12)


def test_zscore_cancels_scale_and_offset_and_a_constant_component_counts_zero():
    scaled = [1000.0 * x - 7.0 for x in HELPFUL]
    assert combine_scores(PIDS, [scaled], [1.0]) == pytest.approx(combine_scores(PIDS, [HELPFUL], [1.0]))
    constant = [0.1] * 5
    alone = combine_scores(PIDS, [HELPFUL], [1.0])
    assert combine_scores(PIDS, [HELPFUL, constant], [1.0, 3.0]) == pytest.approx(alone)
    assert combine_scores(PIDS, [constant], [1.0]) == [0.0] * 5


def test_rank_is_the_per_prompt_weighted_mean_rank_with_ties_averaged():
    got = combine_scores(PIDS, [HELPFUL, STYLE], [3.0, 1.0], method="rank")
    # prompt a: HELPFUL 1,4,2 -> ranks 1,3,2; STYLE 0.5,0.5,3 -> tied lowest share (1+2)/2 = 1.5, then 3
    # prompt b: HELPFUL 10,0 -> 2,1; STYLE -1,2 -> 1,2
    helpful_ranks = [1, 3, 2, 2, 1]
    style_ranks = [1.5, 1.5, 3, 1, 2]
    expected = [(3 * h + 1 * s) / 4 for h, s in zip(helpful_ranks, style_ranks)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_a_negative_weight_turns_an_axis_round():
    got = combine_scores(PIDS, [HELPFUL], [-1.0], method="rank")
    assert got == pytest.approx([-1, -3, -2, -2, -1])  # the best is the one HELPFUL likes least
    assert combine_scores(PIDS, [HELPFUL], [-2.0], method="weighted-sum") == [-2.0, -8.0, -4.0, -20.0, -0.0]


def test_weighted_sum_is_the_plain_weighted_sum():
    got = combine_scores(PIDS, [HELPFUL, STYLE], [0.25, 2.0], method="weighted-sum")
    assert got == pytest.approx([0.25 * h + 2.0 * s for h, s in zip(HELPFUL, STYLE)], abs=1e-12)


@pytest.mark.parametrize("method", ["zscore", "rank", "weighted-sum"])
def test_a_response_missing_in_any_component_is_unscored(method):
    style = [0.5, None, 3.0, -1.0, 2.0]
    got = combine_scores(PIDS, [HELPFUL, style], [1.0, 1.0], method=method)
    assert got[1] is None and all(g is not None for i, g in enumerate(got) if i != 1)


def test_rank_ranks_only_the_responses_every_component_scored():
    # response 1 is unscored by STYLE: prompt a's ranks are among responses 0 and 2 only
    got = combine_scores(PIDS, [HELPFUL, [0.5, None, 3.0, -1.0, 2.0]], [1.0, 1.0], method="rank")
    assert got[:3] == [1.0, None, 2.0]


def test_zscore_standardises_a_component_over_all_the_responses_it_scored():
    style = [0.5, None, 3.0, -1.0, 2.0]
    got = combine_scores(PIDS, [HELPFUL, style], [0.0, 1.0])
    s = np.array([0.5, 3.0, -1.0, 2.0])
    expected = ((s - s.mean()) / s.std()).tolist()
    assert [g for g in got if g is not None] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "components, weights, method, message",
    [
        ([HELPFUL], [1.0], "median", "unknown combine method"),
        ([HELPFUL, STYLE], [1.0], "zscore", "1 weights for 2 components"),
        ([HELPFUL], [float("nan")], "zscore", "finite number"),
        ([HELPFUL], ["1"], "zscore", "finite number"),
        ([HELPFUL, STYLE], [0.0, 0.0], "zscore", "every weight is 0"),
        ([HELPFUL[:4]], [1.0], "zscore", "4 scores for 5 responses"),
        ([[1.0, float("inf"), 0.0, 0.0, 0.0]], [1.0], "rank", "non-finite"),
        ([], [], "zscore", "at least one component"),
    ],
)
def test_bad_arguments_are_one_clear_error(components, weights, method, message):
    with pytest.raises(InputError, match=message):
        combine_scores(PIDS, components, weights, method=method)
