"""eval's length-controlled win rate on synthetic preferences whose true rate is known.

The judge prefers the model's answer with probability sigmoid(theta + beta * tanh(length difference / s)): the
true length-controlled win rate is sigmoid(theta) (equal lengths), while the model's answers are longer, so the raw
win rate overstates it. AlpacaEval's `length_controlled_minimal` GLM is implemented below as the reference (an
L1-penalised logistic regression on [tanh(std_delta_len), 1] without an intercept, the penalty chosen among
logspace(-4, 4, 10) by 5-fold cross-validated soft-label log loss, then refitted on everything).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from builders.config import LengthControlConfig
from builders.errors import InputError
from builders.evaluate import length_controlled

TRUE_RATE = 0.31
THETA = math.log(TRUE_RATE / (1 - TRUE_RATE))


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.clip(z, -50, 50)))


def synthetic(n: int, seed: int, beta: float = 1.5) -> tuple[list[float], list[float]]:
    """Preferences (1 = the model wins) and length differences (model minus reference, characters)."""
    rng = np.random.default_rng(seed)
    reference = rng.lognormal(math.log(1100), 0.4, n)
    model = rng.lognormal(math.log(1500), 0.5, n)  # ~40% longer: a length-biased judge favours it
    diff = model - reference
    p = _sigmoid(THETA + beta * np.tanh(diff / 1000))
    return [float(v) for v in (rng.random(n) < p)], [float(v) for v in diff]


def _l1_logistic(X, y, C, iters=500):
    """argmin |w|_1 + C * sum_i CE(y_i, sigmoid(X_i w)): cyclic coordinate proximal Newton (liblinear's problem)."""
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        old = w.copy()
        for j in range(X.shape[1]):
            p = _sigmoid(X @ w)
            g = C * ((p - y) * X[:, j]).sum()
            h = C * (p * (1 - p) * X[:, j] ** 2).sum() + 1e-12
            u = w[j] - g / h
            w[j] = np.sign(u) * max(abs(u) - 1 / h, 0.0)
        if np.abs(w - old).sum() < 1e-10:
            break
    return w


def alpaca_eval_minimal(prefs, diffs, folds: int = 5) -> float:
    y, d = np.asarray(prefs), np.asarray(diffs)
    X = np.column_stack([np.tanh(d / d.std(ddof=1)), np.ones(len(y))])
    fold = np.arange(len(y)) % folds
    best = None
    for C in np.logspace(-4, 4, 10):
        losses = []
        for f in range(folds):
            w = _l1_logistic(X[fold != f], y[fold != f], C)
            p = np.clip(_sigmoid(X[fold == f] @ w), 1e-15, 1 - 1e-15)
            losses.append(-np.mean(y[fold == f] * np.log(p) + (1 - y[fold == f]) * np.log(1 - p)))
        if best is None or np.mean(losses) < best[0]:
            best = (np.mean(losses), C)
    return float(_sigmoid(_l1_logistic(X, y, best[1])[1]))


def test_agrees_with_alpaca_eval_at_805_prompts():
    for seed in range(3):
        prefs, diffs = synthetic(805, seed)
        ours = length_controlled(prefs, diffs)
        theirs = alpaca_eval_minimal(prefs, diffs)
        assert abs(ours.win_rate - theirs) < 0.01, (seed, ours.win_rate, theirs)
        # the scenario is length-biased: the raw rate is far off, the length-controlled one near the truth
        assert np.mean(prefs) - TRUE_RATE > 0.08
        assert abs(ours.win_rate - TRUE_RATE) < 3 * ours.standard_error
        assert ours.length_weight > 0.5  # the judge's bias towards the longer answer is found


def test_closer_to_the_truth_than_the_raw_rate_at_50_prompts():
    raw, lc = [], []
    for seed in range(20):
        prefs, diffs = synthetic(50, 100 + seed)
        raw.append(abs(np.mean(prefs) - TRUE_RATE))
        lc.append(abs(length_controlled(prefs, diffs, LengthControlConfig(bootstrap=0)).win_rate - TRUE_RATE))
    assert np.mean(lc) < 0.7 * np.mean(raw)
    assert np.mean(np.array(lc) < np.array(raw)) >= 0.6  # most seeds, not a lucky average


def test_stays_sensible_at_10_prompts():
    # ten prompts cannot establish a length effect: the estimate stays near the raw rate, with a wide standard
    # error, where an unpenalised fit finds a separating length weight (b > 100) and reports a win rate of 0
    raw, lc, weights, loose_weights = [], [], [], []
    for seed in range(30):
        prefs, diffs = synthetic(10, 200 + seed)
        est = length_controlled(prefs, diffs)
        loose = length_controlled(prefs, diffs, LengthControlConfig(length_prior_sd=1e3, bootstrap=0))
        assert abs(est.win_rate - np.mean(prefs)) < 0.2 and est.standard_error > 0.05, (seed, est)
        raw.append(abs(np.mean(prefs) - TRUE_RATE))
        lc.append(abs(est.win_rate - TRUE_RATE))
        weights.append(abs(est.length_weight))
        loose_weights.append(abs(loose.length_weight))
    assert np.mean(lc) <= np.mean(raw)
    assert max(weights) < 3 < max(loose_weights)


def test_standard_error_matches_the_spread_across_samples():
    estimates, errors = [], []
    for seed in range(40):
        prefs, diffs = synthetic(100, 300 + seed)
        est = length_controlled(prefs, diffs, LengthControlConfig(bootstrap=300))
        estimates.append(est.win_rate)
        errors.append(est.standard_error)
    spread = np.std(estimates, ddof=1)
    assert 0.7 < np.mean(errors) / spread < 1.4, (np.mean(errors), spread)


def test_reproducible_and_degenerate_inputs():
    prefs, diffs = synthetic(60, 7)
    assert length_controlled(prefs, diffs) == length_controlled(prefs, diffs)  # fixed bootstrap seed
    wins = length_controlled([1.0] * 5, [10.0, -3.0, 4.0, 0.0, 8.0])
    assert wins.win_rate == 1.0 and wins.standard_error == 0.0 and wins.length_weight == 0.0
    same_length = length_controlled([1.0, 0.0, 1.0, 0.5], [0.0] * 4)
    assert same_length.win_rate == pytest.approx(0.625) and same_length.length_weight == 0.0
    with pytest.raises(InputError):
        length_controlled([], [])
