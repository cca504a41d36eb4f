"""Ratings from two-choice votes, as Chatbot Arena (FastChat) computes them, with a prior.

A battle is (model_a, model_b, score_a) with score_a 1 (a won), 0 (b won) or 0.5 (tie or
both bad: FastChat counts "tie (bothbad)" as a tie too). Ratings are on the Elo scale:

- online Elo: one pass in vote order, K=4, base 10, scale 400, initial 1000. It depends on
  the order and drifts with K; kept because people know it.
- Bradley-Terry: P(i beats j) = 1 / (1 + 10^((r_j - r_i) / 400)), fitted over all battles at
  once (order-free) with a Gaussian prior N(1000, prior_sd^2) on each rating: the maximum a
  posteriori ratings, which are centred on 1000 by the prior itself. Maximum likelihood
  alone diverges on separated data (a model that won every battle gets +infinity, which a
  ridge of 1e-6 turns into ~2,400 Elo); the prior makes it finite and shrinks ratings with
  few battles towards the mean. The 95% interval spans two: the posterior's (Laplace: the
  MAP +- 1.96 sd from the inverse Hessian, after centring), which is finite on a perfect
  record and shrinks as battles accumulate, and the bootstrap's (percentiles of refits on
  resampled battles, FastChat's), which also sees what the model does not (annotators who
  disagree more than Bradley-Terry predicts) but is zero-width on a perfect record.
- Style control (FastChat, 2024): the same regression per battle with covariates for the
  difference in length and markdown (each (a - b) / (a + b), standardized over the
  battles), so a model is not rated up for writing longer or more formatted answers. The
  covariates' coefficients are reported in Elo points per standard deviation.

Server-chosen matchups draw the pair (a, b) with probability proportional to the posterior
variance of r_a - r_b: the pairs whose rating difference is least known (never compared, or
compared least) come up most, and every pair keeps some chance. It is the variance of the
difference, not the chance that their order is wrong: a lopsided pair tells less per game
(p(1 - p) is small), so it keeps more weight than an even pair with as many games.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import combinations

import numpy as np

ELO_K, ELO_BASE, ELO_SCALE, ELO_INIT = 4.0, 10.0, 400.0, 1000.0
ELO_PER_NAT = ELO_SCALE / math.log(ELO_BASE)  # 173.7: Elo points per unit of natural-log strength
PRIOR_SD = 200.0  # Elo: before any vote, 95% of models within +-400 of the mean (win odds 1:10..10:1)
PRIOR_SD_RANGE = (1.0, 10_000.0)  # Elo; what GetLeaderboard and --prior-sd accept
STYLE_BOOTSTRAP_ROUNDS = 100  # at most, for the style-controlled fit: each round refits every battle
Z95 = 1.959963984540054
# Maximum likelihood (prior_sd None) keeps a whisper of L2 so a model that never won stays
# finite (FastChat's LogisticRegression has C=1e6 for the same reason).
BT_RIDGE = 1e-6

# Style covariates (FastChat's style control): length in characters (no tokenizer needed to
# rate, and the same for every model) and counts of markdown headers, list items and bold spans.
STYLE_FEATURES = ("length", "headers", "lists", "bold")
_HEADER = re.compile(r"^ {0,3}#{1,6}[ \t]", re.M)
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]", re.M)
_BOLD = re.compile(r"\*\*(?=\S)[^\n]*?\S\*\*|__(?=\S)[^\n]*?\S__")


def style_features(text: str) -> dict[str, int]:
    """The style covariates of one response."""
    return {"length": len(text), "headers": len(_HEADER.findall(text)), "lists": len(_LIST_ITEM.findall(text)),
            "bold": len(_BOLD.findall(text))}


def online_elo(battles: list[tuple[str, str, float]], k: float = ELO_K) -> dict[str, float]:
    rating: dict[str, float] = {}
    for a, b, score_a in battles:
        ra, rb = rating.get(a, ELO_INIT), rating.get(b, ELO_INIT)
        expected_a = 1 / (1 + ELO_BASE ** ((rb - ra) / ELO_SCALE))
        rating[a] = ra + k * (score_a - expected_a)
        rating[b] = rb + k * ((1 - score_a) - (1 - expected_a))
    return rating


def fit_logistic(X: np.ndarray, y: np.ndarray, weight: np.ndarray, precision: np.ndarray,
                 beta: np.ndarray | None = None, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Maximum a posteriori of P(y = 1) = sigmoid(X @ beta) with y in [0, 1] (ties 0.5), rows
    weighted, and a N(0, 1/precision) prior on each coefficient, by Newton's method with step
    halving (a full step from a warm start far from the optimum can overshoot and run off).
    Returns beta and the negative Hessian of the log-posterior there (the Laplace precision)."""

    def log_posterior(b):
        z = X @ b  # y log p + (1 - y) log(1 - p), with log p = -log(1 + e^-z), without overflow
        return -(weight * (y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z))).sum() - 0.5 * (precision * b * b).sum()

    beta = np.zeros(X.shape[1]) if beta is None else beta.copy()
    value = log_posterior(beta)
    for _ in range(iters):
        p = 0.5 * (1 + np.tanh(0.5 * (X @ beta)))  # sigmoid without overflow
        hess = (X * (weight * p * (1 - p))[:, None]).T @ X + np.diag(precision)
        grad = X.T @ (weight * (y - p)) - precision * beta
        step = np.linalg.solve(hess, grad)
        if np.abs(step).max() < 1e-10:
            break
        for _ in range(60):  # the log-posterior is concave: some fraction of a Newton step raises it
            new = log_posterior(beta + step)
            if new >= value - 1e-12 * abs(value):
                break
            step = step / 2
        beta, value = beta + step, new
    else:
        raise ArithmeticError(f"Bradley-Terry fit did not converge in {iters} Newton steps (gradient "
                              f"{np.abs(grad).max():.3g})")
    return beta, hess


def pair_rows(wins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The win matrix (wins[i, j]: wins of i over j, ties counting half) as logistic rows:
    one per pair that met, +1 for i and -1 for j, y = i's share, weight = games."""
    games = wins + wins.T
    i, j = np.nonzero(np.triu(games, 1))
    X = np.zeros((len(i), wins.shape[0]))
    X[np.arange(len(i)), i], X[np.arange(len(i)), j] = 1.0, -1.0
    return X, wins[i, j] / games[i, j], games[i, j]


def _precision(m: int, prior_sd: float | None) -> np.ndarray:
    return np.full(m, BT_RIDGE if prior_sd is None else (ELO_PER_NAT / prior_sd) ** 2)


def _centred(theta: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elo ratings centred on 1000 and their posterior sd, from log-strengths theta whose
    posterior covariance is cov (that of theta - mean(theta) is P cov P)."""
    m = len(theta)
    centre = np.eye(m) - 1.0 / m
    cov = centre @ cov @ centre
    return ELO_INIT + ELO_PER_NAT * (theta - theta.mean()), ELO_PER_NAT * np.sqrt(np.clip(np.diag(cov), 0, None))


def bradley_terry(wins: np.ndarray, prior_sd: float | None = None) -> np.ndarray:
    """Ratings (Elo scale, centred on 1000) from wins[i, j] = (possibly fractional) wins of i
    over j: maximum likelihood, or the MAP under a N(1000, prior_sd^2) prior per model."""
    X, y, w = pair_rows(wins)
    theta, _ = fit_logistic(X, y, w, _precision(wins.shape[0], prior_sd))
    return ELO_INIT + ELO_PER_NAT * (theta - theta.mean())


def matchup_weights(votes: list[tuple[str, str, str]], candidates: list[str],
                    prior_sd: float = PRIOR_SD) -> dict[tuple[str, str], float]:
    """For every pair of candidates, the posterior variance (Elo^2) of their rating
    difference given the votes: how uncertain the pair's order is. Models that are not
    candidates (retired) still inform the fit."""
    battles = _battles(votes)
    models = sorted({x for a, b, *_ in battles for x in (a, b)} | set(candidates))
    index = {name: i for i, name in enumerate(models)}
    X, y, w = pair_rows(_wins(battles, index))
    _, hess = fit_logistic(X, y, w, _precision(len(models), prior_sd))
    cov = np.linalg.inv(hess) * ELO_PER_NAT ** 2
    return {(a, b): float(cov[index[a], index[a]] + cov[index[b], index[b]] - 2 * cov[index[a], index[b]])
            for a, b in combinations(sorted(set(candidates)), 2)}


def draw_matchup(weights: dict[tuple[str, str], float], rng: np.random.Generator) -> tuple[str, str]:
    """A pair drawn with probability proportional to its weight (matchup_weights)."""
    pairs = list(weights)
    p = np.array([weights[k] for k in pairs])
    return pairs[rng.choice(len(pairs), p=p / p.sum())]


@dataclass
class Rating:
    model: str
    elo: float
    bradley_terry: float
    lower: float
    upper: float
    battles: int
    wins: int
    losses: int
    ties: int
    both_bad: int
    style_controlled: float = math.nan  # NaN when the responses were not given
    style_lower: float = math.nan
    style_upper: float = math.nan


@dataclass
class StyleEffect:
    feature: str
    elo_per_sd: float
    lower: float
    upper: float


@dataclass
class Ratings:
    ratings: list[Rating]  # best first
    models: list[str]
    win_rates: np.ndarray  # [i, j]: (wins + ties/2) / battles of models[i] vs models[j]; NaN if none
    battles: np.ndarray  # [i, j]: battles between models[i] and models[j]
    num_battles: int
    prior_sd: float
    style: list[StyleEffect]  # the style covariates that varied, empty without responses


SCORE = {"left": 1.0, "right": 0.0}  # tie and both_bad: 0.5


def _battles(votes, responses=None) -> list[tuple]:
    """(a, b, score_a, choice, responses) of the votes between two different models."""
    responses = responses or [None] * len(votes)
    return [(a, b, SCORE.get(c, 0.5), c, r) for (a, b, c), r in zip(votes, responses, strict=True) if a != b]


def _wins(battles, index) -> np.ndarray:
    wins = np.zeros((len(index), len(index)))
    for a, b, s, *_ in battles:
        wins[index[a], index[b]] += s
        wins[index[b], index[a]] += 1 - s
    return wins


def rate(votes: list[tuple[str, str, str]], bootstrap_rounds: int = 100, seed: int = 0,
         prior_sd: float = PRIOR_SD, responses: list[tuple[str, str]] | None = None) -> Ratings:
    """votes: (left_model, right_model, choice) in vote order, choice one of left, right,
    tie, both_bad; responses: the (left, right) texts of each vote, for style control. A vote
    between a model and itself is not a battle."""
    if not PRIOR_SD_RANGE[0] <= prior_sd <= PRIOR_SD_RANGE[1]:  # NaN fails too
        raise ValueError(f"prior_sd must be in [{PRIOR_SD_RANGE[0]:g}, {PRIOR_SD_RANGE[1]:g}] Elo points, got {prior_sd}")
    battles = _battles(votes, responses)
    models = sorted({x for a, b, *_ in battles for x in (a, b)})
    index = {name: i for i, name in enumerate(models)}
    m = len(models)
    wins = _wins(battles, index)
    counts = {name: dict(wins=0, losses=0, ties=0, both_bad=0) for name in models}
    for a, b, _, choice, _ in battles:
        if choice == "left":
            counts[a]["wins"] += 1
            counts[b]["losses"] += 1
        elif choice == "right":
            counts[b]["wins"] += 1
            counts[a]["losses"] += 1
        else:
            for x in (a, b):
                counts[x]["ties" if choice == "tie" else "both_bad"] += 1
    games = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        win_rates = np.where(games > 0, wins / games, np.nan)
    elo = online_elo([(a, b, s) for a, b, s, *_ in battles])
    rng = np.random.default_rng(seed)
    bt, lower, upper = _plain_fit(battles, index, prior_sd, bootstrap_rounds, rng)
    style_fit = (_style_fit(battles, index, prior_sd, min(bootstrap_rounds, STYLE_BOOTSTRAP_ROUNDS), rng)
                 if responses is not None and m else None)
    ratings = []
    for i, name in enumerate(models):
        r = Rating(name, elo[name], float(bt[i]), float(lower[i]), float(upper[i]), int(games[i].sum()), **counts[name])
        if style_fit is not None:
            r.style_controlled, r.style_lower, r.style_upper = (float(x[i]) for x in style_fit[0])
        ratings.append(r)
    ratings.sort(key=lambda r: -r.bradley_terry)
    return Ratings(ratings, models, win_rates, games.astype(int), len(battles), prior_sd,
                   style_fit[1] if style_fit is not None else [])


def _interval(estimate, sd, samples) -> tuple[np.ndarray, np.ndarray]:
    """The interval spanning both the Laplace one (estimate +- 1.96 sd) and the bootstrap's
    2.5-97.5 percentiles: the lower of the two lower ends to the higher of the upper ends."""
    lower, upper = estimate - Z95 * sd, estimate + Z95 * sd
    if len(samples):
        lower = np.minimum(lower, np.percentile(samples, 2.5, axis=0))
        upper = np.maximum(upper, np.percentile(samples, 97.5, axis=0))
    return lower, upper


def _plain_fit(battles, index, prior_sd, rounds, rng):
    """MAP ratings and their 95% intervals. Resampling N battles with replacement is a
    multinomial over the distinct (pair, outcome) cells, so a round costs one small fit
    whatever N is."""
    m = len(index)
    if not m:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    precision = _precision(m, prior_sd)
    cells: dict[tuple[int, int, float], int] = {}
    for a, b, s, *_ in battles:
        key = (index[a], index[b], s)
        cells[key] = cells.get(key, 0) + 1
    keys = list(cells)
    X = np.zeros((len(keys), m))
    for r, (i, j, _) in enumerate(keys):
        X[r, i], X[r, j] = 1.0, -1.0
    y = np.array([k[2] for k in keys])
    counts = np.array([cells[k] for k in keys], dtype=float)
    theta, hess = fit_logistic(X, y, counts, precision)  # the cells weighted by their counts: every battle once
    ratings, sd = _centred(theta, np.linalg.inv(hess))
    samples = np.empty((rounds, m))
    for r in range(rounds):
        beta, _ = fit_logistic(X, y, rng.multinomial(len(battles), counts / len(battles)).astype(float), precision, theta)
        samples[r] = ELO_INIT + ELO_PER_NAT * (beta - beta.mean())
    return (ratings, *_interval(ratings, sd, samples))


def style_covariates(responses: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
    """Per battle, each style feature's (left - right) / (left + right) (0 when both are 0),
    standardized over the battles; features that do not vary are left out."""
    counts = [[list(style_features(text).values()) for text in pair] for pair in responses]
    left, right = (np.array([c[side] for c in counts], dtype=float).reshape(-1, len(STYLE_FEATURES)) for side in (0, 1))
    total = left + right
    diff = np.divide(left - right, total, out=np.zeros_like(total), where=total > 0)
    sd = diff.std(0)
    keep = sd > 1e-12
    return [f for f, k in zip(STYLE_FEATURES, keep) if k], (diff[:, keep] - diff[:, keep].mean(0)) / sd[keep]


def _style_fit(battles, index, prior_sd, rounds, rng):
    """Per-battle regression on [model +-1 columns | style covariates]; ratings and their
    intervals, and each covariate's effect in Elo per sd. The bootstrap reweights battles."""
    m, n = len(index), len(battles)
    features, Z = style_covariates([r for *_, r in battles])
    X = np.zeros((n, m + len(features)))
    X[np.arange(n), [index[a] for a, *_ in battles]] = 1.0
    X[np.arange(n), [index[b] for _, b, *_ in battles]] = -1.0
    X[:, m:] = Z
    y = np.array([s for _, _, s, *_ in battles])
    precision = _precision(m + len(features), prior_sd)
    beta, hess = fit_logistic(X, y, np.ones(n), precision)
    cov = np.linalg.inv(hess)
    ratings, sd = _centred(beta[:m], cov[:m, :m])
    coef, coef_sd = ELO_PER_NAT * beta[m:], ELO_PER_NAT * np.sqrt(np.diag(cov)[m:])
    rating_samples, coef_samples = np.empty((rounds, m)), np.empty((rounds, len(features)))
    for r in range(rounds):
        b, _ = fit_logistic(X, y, rng.multinomial(n, np.full(n, 1.0 / n)).astype(float), precision, beta)
        rating_samples[r] = ELO_INIT + ELO_PER_NAT * (b[:m] - b[:m].mean())
        coef_samples[r] = ELO_PER_NAT * b[m:]
    lower, upper = _interval(ratings, sd, rating_samples)
    c_lower, c_upper = _interval(coef, coef_sd, coef_samples)
    effects = [StyleEffect(f, float(coef[k]), float(c_lower[k]), float(c_upper[k])) for k, f in enumerate(features)]
    return (ratings, lower, upper), effects
