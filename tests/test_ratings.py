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


def neg_log_likelihood(theta, pairs, prior_sd=None):
    """-log L of Bradley-Terry in Elo units, from (i, j, score_i) battles: written from the
    definition, one battle at a time, for scipy's general-purpose optimiser; with prior_sd,
    minus the log-posterior under a N(1000, prior_sd^2) prior on each rating."""
    total = 0.0 if prior_sd is None else sum((t - 1000) ** 2 for t in theta) / (2 * prior_sd ** 2)
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

    # The same maximum a posteriori from scipy on the per-battle likelihood and the prior
    # (another algorithm; rate() fits with the default prior, 200 Elo).
    idx = {m: i for i, m in enumerate(r.models)}
    votes = simulate(true, 600, seed=1)  # with ties, which count half in both
    pairs = [(idx[a], idx[b], {"left": 1.0, "right": 0.0, "tie": 0.5}[c]) for a, b, c in votes]
    ref = minimize(neg_log_likelihood, np.full(5, 1000.0), args=(pairs, 200.0), method="BFGS").x
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


# ---- the prior (issue #17): finite ratings on separated data, honest intervals ----------

NAT = 400 / math.log(10)  # Elo points per natural-log unit of strength
PRIOR = 200.0  # rate()'s default prior sd, Elo


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def bisect(f, lo, hi, steps=200):
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("wins", [1, 12])
def test_a_perfect_record_gets_finite_ratings_and_a_real_interval(wins):
    """A beat B in every one of `wins` battles. By symmetry the MAP is theta_A = x = -theta_B
    (natural-log units), where the score equation wins * (1 - sigmoid(2x)) = x / s^2 holds
    (s = the prior sd in nats). The posterior precision is w [[1,-1],[-1,1]] + I / s^2 with
    w = wins p (1 - p), p = sigmoid(2x); the centred rating of A is (theta_A - theta_B) / 2,
    whose variance is 1 / (2 (2w + 1/s^2)). The bootstrap of a perfect record is zero-width
    (every resample is the same record), so the interval is the posterior's."""
    lam = (NAT / PRIOR) ** 2
    x = bisect(lambda t: wins * (1 - sigmoid(2 * t)) - lam * t, 0.0, 20.0)
    p = sigmoid(2 * x)
    sd = math.sqrt(1 / (2 * (2 * wins * p * (1 - p) + lam))) * NAT
    r = rate([("A", "B", "left")] * wins, bootstrap_rounds=50)
    a, b = r.ratings
    assert (a.model, b.model) == ("A", "B")
    assert a.bradley_terry == pytest.approx(1000 + x * NAT, abs=1e-6)
    assert b.bradley_terry == pytest.approx(1000 - x * NAT, abs=1e-6)
    assert (a.lower, a.upper) == pytest.approx((a.bradley_terry - 1.959964 * sd, a.bradley_terry + 1.959964 * sd),
                                               abs=1e-4)
    # Worked by hand from the equations above: 1-0 is a gap of 141.4 Elo, sd 113.1; 12-0 a gap of 429.7, sd 78.1.
    assert 2 * x * NAT == pytest.approx({1: 141.4, 12: 429.7}[wins], abs=0.1)
    assert sd == pytest.approx({1: 113.1, 12: 78.1}[wins], abs=0.1)


def test_intervals_shrink_with_the_number_of_battles():
    one = rate([("A", "B", "left")], bootstrap_rounds=50).ratings[0]
    twelve = rate([("A", "B", "left")] * 12, bootstrap_rounds=50).ratings[0]
    assert twelve.upper - twelve.lower < 0.7 * (one.upper - one.lower)  # a perfect record: slowly (1 / log n)
    assert twelve.lower > one.lower  # ...and its lower end rises: 12-0 says more than 1-0
    mixed = [("A", "B", "left")] * 3 + [("A", "B", "right")]
    w = [rate(mixed * k, bootstrap_rounds=100).ratings[0] for k in (16, 256)]
    width = [x.upper - x.lower for x in w]
    assert width[1] == pytest.approx(width[0] / 4, rel=0.15)  # a mixed record: 1 / sqrt(n) (64 -> 1,024 battles)


def test_intervals_cover_the_truth_at_their_nominal_rate():
    """60 tournaments of 300 battles drawn from Bradley-Terry with known ratings (no ties, so
    the data come from the model being fitted): the 95% intervals cover the true (centred)
    rating about 95% of the time, and the MAP recovers the order on average."""
    true = {"m1200": 1200, "m1100": 1100, "m1000": 1000, "m900": 900, "m800": 800}
    covered = total = 0
    means = {m: 0.0 for m in true}
    for rep in range(60):
        r = rate(simulate(true, 300, seed=1000 + rep, tie_rate=0.0), bootstrap_rounds=50, seed=rep)
        for x in r.ratings:
            total += 1
            covered += x.lower <= true[x.model] <= x.upper
            means[x.model] += x.bradley_terry / 60
    assert 0.90 <= covered / total <= 0.99, covered / total  # measured 0.94
    assert sorted(means, key=means.get, reverse=True) == list(true)
    assert all(abs(means[m] - t) < 15 for m, t in true.items())  # the prior's pull is small at 120 battles each


def test_prior_sd_is_checked_and_changes_the_pull():
    with pytest.raises(ValueError, match="prior_sd"):
        rate([("A", "B", "left")], prior_sd=0)
    gap = [rate([("A", "B", "left")] * 5, bootstrap_rounds=5, prior_sd=sd).ratings[0].bradley_terry for sd in (50, 400)]
    assert 1000 < gap[0] < gap[1]


# ---- style control ------------------------------------------------------------------------

def test_style_control_recovers_a_planted_length_bias():
    """Three models of equal strength; `wordy` writes about three times longer answers, and
    annotators prefer the longer answer: P(left wins) = sigmoid(beta z), z the standardized
    (len_left - len_right) / (len_left + len_right) (FastChat's covariate, computed here from
    its definition). The plain ratings put wordy on top; the style-controlled ones do not,
    and the length coefficient comes back near beta."""
    rng = random.Random(7)
    beta = 0.6  # natural-log units per sd: 104 Elo
    mean_len = {"wordy": 300, "terse": 100, "plain": 100}
    battles = []
    for _ in range(1500):
        a, b = rng.sample(list(mean_len), 2)
        battles.append((a, b, "x" * rng.randint(mean_len[a] // 2, mean_len[a] * 3 // 2),
                        "y" * rng.randint(mean_len[b] // 2, mean_len[b] * 3 // 2)))
    ratio = [(len(x) - len(y)) / (len(x) + len(y)) for _, _, x, y in battles]
    mu = sum(ratio) / len(ratio)
    sd = math.sqrt(sum((v - mu) ** 2 for v in ratio) / len(ratio))
    votes = [(a, b, "left" if rng.random() < sigmoid(beta * (v - mu) / sd) else "right")
             for (a, b, _, _), v in zip(battles, ratio)]
    r = rate(votes, bootstrap_rounds=50, responses=[(x, y) for _, _, x, y in battles])
    by = {x.model: x for x in r.ratings}
    assert r.ratings[0].model == "wordy" and by["wordy"].bradley_terry - by["terse"].bradley_terry > 80
    assert [e.feature for e in r.style] == ["length"]  # no markdown in these answers: not a covariate
    effect = r.style[0]
    assert effect.lower < beta * NAT < effect.upper and effect.elo_per_sd == pytest.approx(beta * NAT, abs=25)
    for x in r.ratings:
        assert x.style_lower < 1000 < x.style_upper, x  # equal strength, once length is accounted for
        assert abs(x.style_controlled - 1000) < 25


def test_style_covariates_by_hand():
    from rlhfkit.server.ratings import style_covariates, style_features

    assert style_features("# T\n\n- a\n- b\n**x** and __y__\n") == {"length": 29, "headers": 1, "lists": 2, "bold": 2}
    assert style_features("#no header\n-no list\n**open") == {"length": 26, "headers": 0, "lists": 0, "bold": 0}
    features, z = style_covariates([("aaa", "a"), ("a", "aaa"), ("- x", "- x")])
    # length ratios (3-1)/4 = 0.5, -0.5, 0; mean 0, sd sqrt(1/6); lists: 0, 0, 0/2 -> constant, left out.
    assert features == ["length"]
    assert z[:, 0] == pytest.approx([0.5 / math.sqrt(1 / 6), -0.5 / math.sqrt(1 / 6), 0.0])


# ---- server-chosen matchups ----------------------------------------------------------------

def test_matchup_weights_by_hand():
    """A and B tied 4 times, C never played. The MAP is 0 for all (ties are symmetric), so
    p = 1/2 and the pair's rows give A and B a posterior precision of lam I + [[1, -1], [-1, 1]]
    (4 games x 1/4), C just lam (lam = 1 / s^2, s the prior sd in nats):
    var(A - B) = 2 / (lam + 2); var(A - C) = var(B - C) = (1/lam + 1/(lam + 2)) / 2 + 1/lam."""
    from rlhfkit.server.ratings import draw_matchup, matchup_weights

    lam = (NAT / PRIOR) ** 2
    weights = matchup_weights([("A", "B", "tie")] * 4, ["A", "B", "C"])
    ab = 2 / (lam + 2) * NAT ** 2
    ac = ((1 / lam + 1 / (lam + 2)) / 2 + 1 / lam) * NAT ** 2
    assert weights == pytest.approx({("A", "B"): ab, ("A", "C"): ac, ("B", "C"): ac}, rel=1e-9)
    rng = np.random.default_rng(0)
    draws = [draw_matchup(weights, rng) for _ in range(20000)]
    assert draws.count(("A", "B")) / 20000 == pytest.approx(ab / (ab + 2 * ac), abs=0.01)  # 0.117
    # Nothing voted yet: every pair equally uncertain.
    assert len(set(matchup_weights([], ["A", "B", "C"]).values())) == 1


def test_a_fit_from_a_far_start_converges_to_the_same_optimum():
    """The bootstrap starts each refit from the full data's fit; for a resample that dropped a
    model's only battles that start is far off, and plain Newton ran off to 1e6 Elo (found in
    review). With step halving the fit from anywhere is the fit from zero."""
    from rlhfkit.server.ratings import fit_logistic, pair_rows

    votes = [("m4", "m0", "tie"), ("m4", "m2", "left"), ("m1", "m4", "left"), ("m0", "m3", "left"),
             ("m4", "m0", "left"), ("m1", "m0", "left"), ("m1", "m2", "left"), ("m2", "m0", "left"),
             ("m2", "m4", "right"), ("m2", "m0", "left")]
    names = sorted({x for a, b, _ in votes for x in (a, b)})
    wins = np.zeros((5, 5))
    for a, b, c in votes:
        s = {"left": 1.0, "right": 0.0}.get(c, 0.5)
        wins[names.index(a), names.index(b)] += s
        wins[names.index(b), names.index(a)] += 1 - s
    X, y, w = pair_rows(wins)
    precision = np.full(5, (NAT / 10_000) ** 2)  # the widest prior the server accepts
    from_zero, _ = fit_logistic(X, y, w, precision)
    for start in (np.full(5, 40.0), np.array([60.0, -60, 30, -30, 0])):
        far, _ = fit_logistic(X, y, w, precision, start)
        assert far == pytest.approx(from_zero, abs=1e-6)
    p = 1 / (1 + np.exp(-(X @ from_zero)))
    assert np.abs(X.T @ (w * (y - p)) - precision * from_zero).max() < 1e-8  # the score equations hold
    for x in rate(votes, bootstrap_rounds=100, seed=0, prior_sd=10_000).ratings:
        assert -10_000 < x.lower < x.bradley_terry < x.upper < 12_000, x  # was -3191..1152293 for m1
    with pytest.raises(ValueError, match=r"prior_sd must be in \[1, 10000\]"):
        rate(votes, prior_sd=float("inf"))
