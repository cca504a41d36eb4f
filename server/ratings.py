"""Ratings from two-choice votes, as Chatbot Arena (FastChat) computes them.

A battle is (model_a, model_b, score_a) with score_a 1 (a won), 0 (b won) or 0.5 (tie or
both bad: FastChat counts "tie (bothbad)" as a tie too). Two ratings on the Elo scale:

- online Elo: one pass in vote order, K=4, base 10, scale 400, initial 1000. It depends on
  the order and drifts with K; kept because people know it.
- Bradley-Terry: P(i beats j) = 1 / (1 + 10^((r_j - r_i) / 400)), fitted by maximum
  likelihood over all battles at once (order-free), centred so the mean rating is 1000,
  with a 95% interval from resampling the battles with replacement (bootstrap).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

ELO_K, ELO_BASE, ELO_SCALE, ELO_INIT = 4.0, 10.0, 400.0, 1000.0
# A whisper of L2 on the log-strengths keeps the fit finite when a model never won
# (FastChat's LogisticRegression has C=1e6 for the same reason); it moves ratings ~1e-4.
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


def bradley_terry(wins: np.ndarray, iters: int = 100) -> np.ndarray:
    """Ratings from wins[i, j] = (possibly fractional) wins of i over j, by Newton's method
    on the log-likelihood in natural-log strengths, then mapped to the Elo scale."""
    m = wins.shape[0]
    games = wins + wins.T
    theta = np.zeros(m)
    for _ in range(iters):
        p = 1 / (1 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j] = P(i beats j)
        grad = wins.sum(1) - (games * p).sum(1) - BT_RIDGE * theta
        w = games * p * p.T
        hess = np.diag(w.sum(1) + BT_RIDGE) - w  # negative Hessian, positive definite with the ridge
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    theta -= theta.mean()
    return ELO_INIT + ELO_SCALE / math.log(ELO_BASE) * theta


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


@dataclass
class Ratings:
    ratings: list[Rating]  # best first
    models: list[str]
    win_rates: np.ndarray  # [i, j]: (wins + ties/2) / battles of models[i] vs models[j]; NaN if none
    battles: np.ndarray  # [i, j]: battles between models[i] and models[j]
    num_battles: int


def rate(votes: list[tuple[str, str, str]], bootstrap_rounds: int = 100, seed: int = 0) -> Ratings:
    """votes: (left_model, right_model, choice) in vote order, choice one of left, right,
    tie, both_bad. A vote between a model and itself is not a battle."""
    battles = [(a, b, {"left": 1.0, "right": 0.0}.get(c, 0.5), c) for a, b, c in votes if a != b]
    models = sorted({x for a, b, _, _ in battles for x in (a, b)})
    index = {name: i for i, name in enumerate(models)}
    m = len(models)
    wins = np.zeros((m, m))
    counts = {name: dict(wins=0, losses=0, ties=0, both_bad=0) for name in models}
    for a, b, s, choice in battles:
        i, j = index[a], index[b]
        wins[i, j] += s
        wins[j, i] += 1 - s
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
    elo = online_elo([(a, b, s) for a, b, s, _ in battles])
    bt = bradley_terry(wins) if m else np.zeros(0)
    lower, upper = _bootstrap(battles, index, bootstrap_rounds, seed) if m else (bt, bt)
    ratings = [Rating(name, elo[name], float(bt[i]), float(lower[i]), float(upper[i]), int(games[i].sum()),
                      **counts[name]) for i, name in enumerate(models)]
    ratings.sort(key=lambda r: -r.bradley_terry)
    return Ratings(ratings, models, win_rates, games.astype(int), len(battles))


def _bootstrap(battles, index, rounds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2.5 and 97.5 percentiles of the BT ratings over `rounds` resamples of the battles.
    Resampling N battles with replacement = multinomial counts over the distinct
    (pair, outcome) cells, so each round costs one small fit whatever N is."""
    m = len(index)
    cells: dict[tuple[int, int, float], int] = {}
    for a, b, s, _ in battles:
        key = (index[a], index[b], s)
        cells[key] = cells.get(key, 0) + 1
    keys = list(cells)
    n = len(battles)
    probs = np.array([cells[k] for k in keys], dtype=float) / n
    ii = np.array([k[0] for k in keys])
    jj = np.array([k[1] for k in keys])
    ss = np.array([k[2] for k in keys])
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, m))
    for r in range(rounds):
        c = rng.multinomial(n, probs)
        wins = np.zeros((m, m))
        np.add.at(wins, (ii, jj), c * ss)
        np.add.at(wins, (jj, ii), c * (1 - ss))
        samples[r] = bradley_terry(wins)
    return np.percentile(samples, 2.5, axis=0), np.percentile(samples, 97.5, axis=0)
