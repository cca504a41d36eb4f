"""Elo and Bradley-Terry against hand-worked values, an independent optimiser, and a
simulated tournament whose true strengths the ratings must recover."""

import math
import random

import numpy as np
import pytest
from scipy.optimize import minimize

from rlhfkit.server.ratings import bradley_terry, online_elo, rate


def test_online_elo_by_hand():
    # K=4, base 10, scale 400, start 1000. Equal ratings: expected 0.5, the winner gains 2.
    r = online_elo([("A", "B", 1.0)])
    assert r == {"A": 1002.0, "B": 998.0}
    # B beats A: E_B = 1 / (1 + 10^(4/400)) = 1 / 2.0232930 = 0.4942440, B gains 4 * 0.5057560 = 2.0230240
    r = online_elo([("A", "B", 1.0), ("B", "A", 1.0)])
    assert r["B"] == pytest.approx(998 + 2.0230240, abs=1e-6) and r["A"] == pytest.approx(1002 - 2.0230240, abs=1e-6)
    # then a tie: A is 0.0460480 below B, E_A = 1 / (1 + 10^(0.046048/400)) = 0.4999337, A gains 4 * 0.0000663
    r = online_elo([("A", "B", 1.0), ("B", "A", 1.0), ("A", "B", 0.5)])
    assert r["A"] == pytest.approx(999.976976 + 0.000265, abs=2e-6)
    assert r["A"] + r["B"] == pytest.approx(2000)  # Elo is zero-sum


def test_bradley_terry_by_hand():
    # Two models, A won 3 of 4: odds 3, gap 400 log10(3) = 190.849, centred on 1000.
    assert bradley_terry(np.array([[0, 3], [1, 0.0]])) == pytest.approx([1095.4243, 904.5757], abs=1e-3)
    # Three models with consistent odds A:B = 2, B:C = 2, A:C = 4 fit exactly: strengths 4, 2, 1,
    # so ratings 1000 + 400 log10(2) * (1, 0, -1).
    wins = np.array([[0, 2, 4], [1, 0, 2], [1, 1, 0.0]])
    step = 400 * math.log10(2)
    assert bradley_terry(wins) == pytest.approx([1000 + step, 1000, 1000 - step], abs=1e-3)


def test_ties_count_half_and_self_battles_are_not_battles():
    # A-B: one win each way and two ties -> 2 : 2, equal ratings; both_bad counts as a tie too.
    votes = [("A", "B", "left"), ("A", "B", "right"), ("B", "A", "tie"), ("A", "B", "both_bad"), ("A", "A", "left")]
    r = rate(votes, bootstrap_rounds=20)
    assert r.num_battles == 4 and r.models == ["A", "B"]
    a, b = sorted(r.ratings, key=lambda x: x.model)
    assert a.bradley_terry == pytest.approx(1000, abs=1e-6) and b.bradley_terry == pytest.approx(1000, abs=1e-6)
    assert (a.wins, a.losses, a.ties, a.both_bad, a.battles) == (1, 1, 1, 1, 4)
    assert r.win_rates[0, 1] == pytest.approx(0.5) and math.isnan(r.win_rates[0, 0])


def neg_log_likelihood(theta, pairs):
    """-log L of Bradley-Terry in Elo units, from (i, j, score_i) battles: written from the
    definition, one battle at a time, for scipy's general-purpose optimiser."""
    total = 0.0
    for i, j, s in pairs:
        p = 1 / (1 + 10 ** ((theta[j] - theta[i]) / 400))
        total -= s * math.log(p) + (1 - s) * math.log(1 - p)
    return total


def simulate(true, n, seed, tie_rate=0.1):
    rng = random.Random(seed)
    names = list(true)
    votes = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        p_a = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
        u = rng.random()
        votes.append((a, b, "tie" if u < tie_rate else "left" if rng.random() < p_a else "right"))
    return votes


def test_simulated_tournament_recovers_true_strengths():
    true = {"m1200": 1200.0, "m1100": 1100.0, "m1000": 1000.0, "m900": 900.0, "m800": 800.0}
    # No ties here: ties drawn independently of strength are not Bradley-Terry outcomes and
    # shrink every gap (as they do in Arena); how ties count is checked by hand above.
    votes = simulate(true, 4000, seed=0, tie_rate=0.0)
    r = rate(votes, bootstrap_rounds=100, seed=0)
    order = [x.model for x in r.ratings]
    assert order == ["m1200", "m1100", "m1000", "m900", "m800"]
    assert sorted(true, key=lambda m: -r.ratings[order.index(m)].elo) == order  # online Elo too
    bt = {x.model: x.bradley_terry for x in r.ratings}
    for m, t in true.items():
        assert bt[m] == pytest.approx(t, abs=30)  # the truth is centred on 1000 too
    covered = sum(x.lower <= true[x.model] <= x.upper for x in r.ratings)
    assert covered >= 4  # 95% intervals
    assert all(x.upper - x.lower < 80 for x in r.ratings)

    # The same maximum likelihood from scipy on the per-battle likelihood (another algorithm).
    idx = {m: i for i, m in enumerate(r.models)}
    votes = simulate(true, 600, seed=1)  # with ties, which count half in both
    pairs = [(idx[a], idx[b], {"left": 1.0, "right": 0.0, "tie": 0.5}[c]) for a, b, c in votes]
    ref = minimize(neg_log_likelihood, np.zeros(5), args=(pairs,), method="BFGS").x
    ref = ref - ref.mean() + 1000
    sub = rate(votes, bootstrap_rounds=10)
    got = {x.model: x.bradley_terry for x in sub.ratings}
    assert [got[m] for m in sub.models] == pytest.approx(list(ref), abs=0.05)


def test_bootstrap_is_reproducible_and_narrows_with_more_votes():
    true = {"a": 1100.0, "b": 1000.0, "c": 900.0}
    few, many = simulate(true, 150, seed=1), simulate(true, 3000, seed=1)
    r1, r2 = rate(few, 200, seed=5), rate(few, 200, seed=5)
    assert [(x.lower, x.upper) for x in r1.ratings] == [(x.lower, x.upper) for x in r2.ratings]
    width = lambda r: np.mean([x.upper - x.lower for x in r.ratings])  # noqa: E731
    assert width(rate(many, 200, seed=5)) < width(r1) / 2  # ~ 1/sqrt(n): 20x the votes, ~4.5x narrower
